"""``python -m diagnose``: the same command as the ``diagnose`` console script."""

from diagnose.cli import main

if __name__ == "__main__":
    main()
