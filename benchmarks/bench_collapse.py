"""Time `diagnose collapse` on a large .npy file against one plain X^T X pass over the same file.

Both are run as separate processes, in turn, on the same file, so the ratio holds while the machine's
speed drifts. Peak resident memory is read from each finished process (ru_maxrss).

    python benchmarks/bench_collapse.py                 # 1,000,000 x 512 float32 (a 2 GB file)
    python benchmarks/bench_collapse.py --rows 100000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLAIN_PASS = r"""
import sys
import numpy as np
path, chunk_rows = sys.argv[1], int(sys.argv[2])
with open(path, "rb") as handle:
    np.lib.format.read_magic(handle)
    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    gram = np.zeros((shape[1], shape[1]), dtype=np.float64)
    block = np.empty((chunk_rows, shape[1]), dtype=dtype)
    for start in range(0, shape[0], chunk_rows):
        rows = min(chunk_rows, shape[0] - start)
        view = block[:rows]
        handle.readinto(memoryview(view).cast("B"))
        gram += (view.T @ view).astype(np.float64)
print(float(np.trace(gram)))
"""


def write_matrix(path: Path, rows: int, dim: int, seed: int, near_singular: bool = False) -> None:
    """Write a float32 [rows, dim] matrix with a decaying spectrum and an offset, chunk by chunk.

    By default the standard deviations along a random rotation fall from 1 to 0.02 (covariance
    eigenvalues from 1 to 4e-4). ``near_singular`` mixes with a random square Gaussian matrix instead,
    whose smallest eigenvalues fall to about 1e-8 of the largest: that spectrum takes the float64 pass.
    """
    rng = np.random.default_rng(seed)
    if near_singular:
        mixing = rng.standard_normal((dim, dim)).astype(np.float32) * np.geomspace(1.0, 0.02, dim, dtype=np.float32)
    else:
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        mixing = (np.geomspace(1.0, 0.02, dim)[:, None] * rotation.T).astype(np.float32)
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, rows, 65_536):
            count = min(65_536, rows - start)
            block = rng.standard_normal((count, dim), dtype=np.float32) @ mixing + 0.1
            handle.write(block.astype(np.float32).tobytes())


def run_timed(command: list[str]) -> float:
    """Run a command to completion and return its wall time in seconds."""
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"benchmark command failed ({completed.returncode}): {' '.join(command)}\n{completed.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each command")
    parser.add_argument("--chunk-rows", type=int, default=32_768)
    parser.add_argument("--keep", type=Path, help="folder to keep the generated file in (reused when present)")
    parser.add_argument("--near-singular", action="store_true",
                        help="a spectrum down to 1e-8 of its largest eigenvalue, which takes the float64 pass")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-collapse-"))
    folder.mkdir(parents=True, exist_ok=True)
    kind = "near_singular" if args.near_singular else "spread"
    path = folder / f"{kind}_{args.rows}x{args.dim}.npy"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        write_matrix(path, args.rows, args.dim, seed=0, near_singular=args.near_singular)
    size_gib = path.stat().st_size / 2**30

    plain = [sys.executable, "-c", PLAIN_PASS, str(path), str(args.chunk_rows)]
    report_json = folder / "collapse.json"
    report = [sys.executable, "-m", "diagnose.cli", "collapse", str(path), "--json", str(report_json),
              "--chunk-rows", str(args.chunk_rows)]

    # The first run of each warms the page cache; peak memory is measured separately per command below.
    run_timed(plain)
    plain_times, report_times, ratios = [], [], []
    for _ in range(args.repeats):
        plain_seconds = run_timed(plain)
        report_seconds = run_timed(report)
        plain_times.append(plain_seconds)
        report_times.append(report_seconds)
        ratios.append(report_seconds / plain_seconds)

    report_peak = peak_memory(report)
    plain_peak = peak_memory(plain)

    precision = json.loads(report_json.read_text())["modalities"]["fused"]["gram_precision"]
    print(f"input: {args.rows:,} x {args.dim} float32 ({size_gib:.2f} GiB, {kind} spectrum), {os.cpu_count()} CPU(s), "
          f"chunk {args.chunk_rows:,} rows, second moment: {precision}")
    print(f"plain X^T X pass:        median {np.median(plain_times):7.2f} s  peak RSS {plain_peak:7.0f} MiB")
    print(f"diagnose collapse:       median {np.median(report_times):7.2f} s  peak RSS {report_peak:7.0f} MiB")
    print(f"ratio report / plain:    median {np.median(ratios):7.2f}  (goal <= 2.0; pairs: "
          + ", ".join(f"{ratio:.2f}" for ratio in ratios) + ")")
    print(f"peak memory of report:   {report_peak:.0f} MiB (goal < 1024 MiB)")


def peak_memory(command: list[str]) -> float:
    """Peak resident memory of one run of ``command`` in MiB, measured in a fresh child process."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    completed = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    return int(completed.stdout.strip()) / 1024.0


if __name__ == "__main__":
    main()
