"""``python -m trainer``: the same command as the ``trainer`` console script."""

from trainer.cli import main

if __name__ == "__main__":
    main()
