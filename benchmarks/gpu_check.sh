#!/usr/bin/env bash
# A short end-to-end check for a machine with one CUDA GPU (planned to take under 5 minutes there):
#
#   1. trains configs/pretrained.toml on the bundled fixtures on the GPU (bf16 autocast, frozen
#      EfficientNet-Lite0 and MiniLM with cached features) and prints the training panels per second
#      of every epoch;
#   2. runs `diagnose retrieval --device gpu` on that run (the command-line path);
#   3. ranks GPU_CHECK_ROWS synthetic image/text pairs in both directions with exact FAISS GPU
#      search and prints queries per second.
#
# It exits non-zero when a step fails, when the run did not train on CUDA, or when FAISS searched on
# the CPU (faiss-cpu installed, or the GPU index failed). Without a GPU (torch.cuda.is_available()
# is false) it prints a message and runs the same steps on the CPU at a smaller size, as a smoke
# test of the script, and exits 0 if they pass.
#
#   benchmarks/gpu_check.sh
#   PYTHON=/path/to/python GPU_CHECK_ROWS=100000 GPU_CHECK_DIR=/tmp/gpu-check benchmarks/gpu_check.sh

set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
fi
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    MODE=gpu
    "$PYTHON" -c 'import torch; print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")'
    EPOCHS=3
    ROWS=${GPU_CHECK_ROWS:-50000}
else
    MODE=cpu
    echo "gpu_check: torch sees no CUDA device; skipping the GPU checks and running a CPU smoke test of this script"
    EPOCHS=1
    ROWS=${GPU_CHECK_ROWS:-2000}
fi
DEVICE=$([ "$MODE" = gpu ] && echo cuda || echo cpu)
started=$SECONDS

# 1. Training.
RUN="$WORK/run"
TRAIN_LOG="$WORK/train.log"
if ! "$PYTHON" -m trainer fit --config configs/pretrained.toml --out "$RUN" --overwrite \
        --set "device=\"$DEVICE\"" --set "optim.epochs=$EPOCHS" 2>"$TRAIN_LOG"; then
    tail -n 20 "$TRAIN_LOG" >&2
    fail "trainer fit (see $TRAIN_LOG)"
fi
grep -E '^(vision|text) features|^epoch ' "$TRAIN_LOG" | sed 's/^/gpu_check: /'
"$PYTHON" - "$RUN" "$DEVICE" <<'EOF' || fail "the run did not train on the expected device"
import json, sys
info = json.load(open(f"{sys.argv[1]}/run.json"))
if not info["device"].startswith(sys.argv[2]):
    sys.exit(f"run.json device is {info['device']!r}, expected {sys.argv[2]}")
print(f"gpu_check: trained on {info['device']} ({info['device_name']})")
EOF
rates=$(grep -oE '[0-9.]+ panels/s' "$TRAIN_LOG" | awk '{print $1}' | paste -sd' ' -)
[ -n "$rates" ] || fail "no panels/s figure in the trainer output"
echo "gpu_check: training panels/s per epoch: $rates (epoch 1 includes warm-up)"

# 2. The retrieval command on the run.
FAISS_DEVICE=$([ "$MODE" = gpu ] && echo gpu || echo cpu)
"$PYTHON" -m diagnose.cli retrieval "$RUN" --last-only --device "$FAISS_DEVICE" --json "$WORK/run_retrieval.json" \
    >"$WORK/run_retrieval.txt" 2>&1 || { tail -n 20 "$WORK/run_retrieval.txt" >&2; fail "diagnose retrieval on the run"; }
echo "gpu_check: diagnose retrieval on the run: ok ($WORK/run_retrieval.json)"

# 3. Retrieval throughput on synthetic pairs.
"$PYTHON" - "$WORK" "$ROWS" "$FAISS_DEVICE" <<'EOF' || fail "FAISS retrieval throughput"
import sys
import time

import numpy as np

from diagnose.documents import retrieval_document

folder, rows, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
dim = 256
text = rng.standard_normal((rows, dim), dtype=np.float32)
vision = (text + 0.8 * rng.standard_normal((rows, dim), dtype=np.float32)).astype(np.float32)
path = f"{folder}/pairs_{rows}.npz"
np.savez(path, vision=vision, text=text)

# A small warm-up run pays for FAISS's GPU set-up, so the timed run measures the search.
np.savez(f"{folder}/warmup.npz", vision=vision[:1000], text=text[:1000])
retrieval_document(f"{folder}/warmup.npz", scopes=("global",), device=device)

started = time.perf_counter()
document = retrieval_document(path, scopes=("global",), device=device)
seconds = time.perf_counter() - started
index = document["index"]
if device == "gpu" and index["device"] != "gpu":
    sys.exit(f"the search ran on the CPU: {index.get('note')}")
queries = sum(direction["global"]["n_queries"] for direction in document["directions"].values())
recall = document["directions"]["vision->text"]["global"]["recall@1"]
print(f"gpu_check: exact retrieval, {rows:,} x {rows:,} pairs of dim {dim}, both directions on {index['device']}: "
      f"{queries / seconds:,.0f} queries/s ({seconds:.2f} s, vision->text recall@1 {recall:.3f})")
EOF

echo "gpu_check: passed in $((SECONDS - started)) s ($MODE mode; files in $WORK)"
