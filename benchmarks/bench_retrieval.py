"""Time exact bidirectional retrieval against the two matrix products it cannot avoid, and approximate
retrieval at a larger scale with its measured recall loss.

Exact part: N vision/text pairs (default 100,000, D = 512) are ranked in both directions over the whole
gallery. The floor is the two products Q @ G.T (vision against text and text against vision), computed
tile by tile with the same tile height and discarded. Floor and evaluation run in turn in one worker
process, so that both see similar load on a shared machine. Wall and CPU time (all threads of the worker)
are both reported, because load from other jobs makes wall time noisy. Peak resident memory is the
worker's VmHWM.

Approximate part: a separate worker ranks N pairs (default 1,000,000) with an approximate index (IVF by
default) in both directions and reports recall@K, the index's recall loss against exact search on a
seeded sample of 1,000 queries, time and peak memory.

The data are seeded and clustered, and vision and text are two noisy views of one latent vector per pair,
so that recall is neither 0 nor 1.

    python benchmarks/bench_retrieval.py                          # 100,000 exact, 1,000,000 IVF
    python benchmarks/bench_retrieval.py --pairs 20000 --approx-pairs 100000   # a quick run
    python benchmarks/bench_retrieval.py --approx-pairs 0         # exact part only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate_pairs(pairs: int, dim: int, seed: int, clusters: int, spread: float, noise: float,
                   centre_scale: float = 3.0):
    """Return L2-normalised float32 vision and text matrices, generated chunk by chunk.

    Each pair has a latent vector: a cluster centre (``centre_scale`` times Gaussian) plus ``spread``
    times Gaussian noise. Vision and text are two views of it, each with its own ``noise`` times Gaussian
    noise, so both directions are equally hard. Only the normalised matrices are ever held whole.
    """
    from diagnose.retrieval import normalize_rows

    rng = np.random.default_rng(seed)
    centres = centre_scale * rng.standard_normal((clusters, dim), dtype=np.float32)
    vision = np.empty((pairs, dim), dtype=np.float32)
    text = np.empty((pairs, dim), dtype=np.float32)
    for start in range(0, pairs, 65_536):
        count = min(65_536, pairs - start)
        latent = centres[rng.integers(0, clusters, count)]
        latent += spread * rng.standard_normal((count, dim), dtype=np.float32)
        for matrix, name in ((vision, "vision"), (text, "text")):
            view = latent + noise * rng.standard_normal((count, dim), dtype=np.float32)
            normalize_rows(view, name, out=matrix[start:start + count], row_offset=start)
    return vision, text


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (VmHWM, or ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function, *args, **kwargs):
    """Call ``function`` and return its result, wall seconds and CPU seconds of this process (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def floor_products(vision: np.ndarray, text: np.ndarray, tile: int) -> None:
    """Compute vision @ text.T and text @ vision.T tile by tile into one reused buffer, discarding them."""
    buffer = np.empty((tile, len(text)), dtype=np.float32)
    for queries, gallery in ((vision, text), (text, vision)):
        for start in range(0, len(queries), tile):
            block = queries[start:start + tile]
            np.matmul(block, gallery.T, out=buffer[:len(block)])


def best(runs: list[dict], key: str) -> float:
    return min(run[key] for run in runs)


def exact_worker(args) -> dict:
    from diagnose.retrieval import _auto_tile, bidirectional_retrieval

    began = time.perf_counter()
    vision, text = generate_pairs(args.pairs, args.dim, args.seed, args.clusters, args.spread, args.noise,
                                  args.centre_scale)
    generated = time.perf_counter() - began
    rss_data = peak_rss_mib()
    tile = _auto_tile(args.pairs)

    timings = {"evaluation": [], "floor": []}
    result = None
    for round_index in range(args.rounds):
        # Alternate the order so that neither side always runs on a warmer or quieter machine.
        order = ("floor", "evaluation") if round_index % 2 == 0 else ("evaluation", "floor")
        for step in order:
            if step == "floor":
                _, wall, cpu = timed(floor_products, vision, text, tile)
            else:
                result, wall, cpu = timed(bidirectional_retrieval, vision, text, scopes=["global"], normalized=True,
                                          device="cpu")
            timings[step].append({"wall_s": wall, "cpu_s": cpu})

    pages = np.arange(args.pairs) // 6
    began = time.perf_counter()
    paged = bidirectional_retrieval(vision, text, first_pages=pages, second_pages=pages, scopes=["page"],
                                    normalized=True, device="cpu")
    page_seconds = time.perf_counter() - began
    return {
        "pairs": args.pairs, "dim": args.dim, "tile_rows": tile, "generate_s": generated,
        "evaluation": timings["evaluation"], "floor": timings["floor"],
        "ratio_wall": best(timings["evaluation"], "wall_s") / best(timings["floor"], "wall_s"),
        "ratio_cpu": best(timings["evaluation"], "cpu_s") / best(timings["floor"], "cpu_s"),
        "page_scope_s": page_seconds,
        "peak_rss_mib": peak_rss_mib(), "rss_after_data_mib": rss_data,
        "directions": {name: entry["global"] for name, entry in result["directions"].items()},
        "page": {name: entry["page"] for name, entry in paged["directions"].items()},
    }


def approximate_worker(args) -> dict:
    from diagnose.retrieval import bidirectional_retrieval

    began = time.perf_counter()
    vision, text = generate_pairs(args.approx_pairs, args.dim, args.seed + 1, args.approx_clusters, args.spread,
                                  args.noise, args.centre_scale)
    generated = time.perf_counter() - began
    params = {"nprobe": args.nprobe, "search": args.ivf_search} if args.index == "ivf" else {"ef_search": args.ef_search}
    result, wall, cpu = timed(bidirectional_retrieval, vision, text, scopes=["global"], normalized=True,
                              index=args.index, index_params=params, sample=args.sample, device="cpu")
    return {
        "pairs": args.approx_pairs, "dim": args.dim, "index": args.index, "generate_s": generated,
        "evaluation": {"wall_s": wall, "cpu_s": cpu}, "peak_rss_mib": peak_rss_mib(),
        "directions": {name: entry["global"] for name, entry in result["directions"].items()},
    }


def run_worker(kind: str, argv: list[str]) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--worker", kind, *argv], capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"{kind} worker failed with exit status {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def describe_direction(name: str, metrics: dict) -> str:
    line = (f"    {name}: recall@1 {metrics['recall@1']:.4f}  recall@5 {metrics['recall@5']:.4f}  "
            f"recall@10 {metrics['recall@10']:.4f}  MRR {metrics['mrr']:.4f}")
    if "approx_recall_loss" in metrics and metrics["approx_recall_loss"]:
        losses = "  ".join(f"{key} {value:+.4f}" for key, value in metrics["approx_recall_loss"].items())
        line += f"\n      recall loss vs exact on {metrics['approx_sample']} queries: {losses}"
        where = f"in the top {metrics['search_depth']}" if "search_depth" in metrics else "among the candidates"
        line += f"\n      censored queries (no positive {where}): {metrics['censored']}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs for the exact part (0 skips it)")
    parser.add_argument("--approx-pairs", type=int, default=1_000_000, help="pairs for the approximate part (0 skips it)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clusters", type=int, default=1000, help="clusters in the exact part's data")
    parser.add_argument("--approx-clusters", type=int, default=4000, help="clusters in the approximate part's data")
    parser.add_argument("--spread", type=float, default=0.5, help="latent = centre + spread * N(0, 1)")
    parser.add_argument("--noise", type=float, default=1.4, help="vision, text = latent + noise * N(0, 1)")
    parser.add_argument("--centre-scale", type=float, default=3.0, help="cluster centres = centre_scale * N(0, 1)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating floor/evaluation rounds (best of)")
    parser.add_argument("--index", choices=["ivf", "hnsw"], default="ivf")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ivf-search", choices=["lists", "faiss"], default="lists",
                        help="lists: score each probed list with one matrix product; faiss: IndexIVFFlat search")
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--sample", type=int, default=1000, help="queries checked against exact search")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", choices=["exact", "approximate"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "exact":
        print(json.dumps(exact_worker(args)))
        return
    if args.worker == "approximate":
        print(json.dumps(approximate_worker(args)))
        return

    forwarded = sys.argv[1:]
    report = {}
    if args.pairs > 0:
        exact = report["exact"] = run_worker("exact", forwarded)
        print(f"exact, {exact['pairs']:,} pairs, D = {exact['dim']}, tile {exact['tile_rows']} rows")
        for name, key in (("bidirectional evaluation (global)", "evaluation"), ("floor, two tiled products", "floor")):
            print(f"  {name + ':':35s}{best(exact[key], 'wall_s'):.1f} s wall, {best(exact[key], 'cpu_s'):.1f} s CPU")
        print(f"  ratio (best of {args.rounds}):                 {exact['ratio_wall']:.3f} wall, {exact['ratio_cpu']:.3f} CPU")
        print(f"  peak RSS:                          {exact['peak_rss_mib']:.0f} MiB "
              f"({exact['rss_after_data_mib']:.0f} MiB after generating the data)")
        print(f"  page scope, both directions:       {exact['page_scope_s']:.1f} s")
        for name, metrics in exact["directions"].items():
            print(describe_direction(name, metrics))
    if args.approx_pairs > 0:
        approximate = report["approximate"] = run_worker("approximate", forwarded)
        print(f"approximate ({approximate['index']}), {approximate['pairs']:,} pairs, D = {approximate['dim']}")
        print(f"  bidirectional evaluation (global): {approximate['evaluation']['wall_s']:.1f} s wall, "
              f"{approximate['evaluation']['cpu_s']:.1f} s CPU (data generation {approximate['generate_s']:.1f} s)")
        print(f"  peak RSS:                          {approximate['peak_rss_mib']:.0f} MiB")
        for name, metrics in approximate["directions"].items():
            print(describe_direction(name, metrics))
            print(f"      index {metrics['index_parameters']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
