#!/usr/bin/env bash
# The demo: set up, make the embedded sample data, preprocess it with 2 MPI ranks into a zarr store,
# then train the debug SPHINX-X model with tensor parallelism over 2 CPU processes (gloo),
# printing a falling loss (training, and on a held-out 5% of the store) and saving a checkpoint.
# Usage: bash scripts/demo.sh [extra train args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
PY=.venv/bin/python
OUT=${DEMO_DIR:-runs/demo}
STEPS=${DEMO_STEPS:-60}
mkdir -p "$OUT"
if [ ! -f "$OUT/sample_data/mix.yaml" ]; then
  rm -rf "$OUT/sample_data"
  $PY -m megatron_sphinx.data.sample_data --out "$OUT/sample_data"
fi
echo "[demo] preprocessing with 2 MPI ranks"
.venv/bin/mpiexec -n 2 $PY tools/preprocess_data.py --mix "$OUT/sample_data/mix.yaml" \
  --tokenizer "$OUT/sample_data/tokenizer" --out "$OUT/store.zarr" --seq-length 4096 \
  --image-size 448 --summary-json "$OUT/preprocess_summary.json"
echo "[demo] training debug SPHINX-X, TP=2 on 2 processes (gloo), $STEPS steps"
rm -rf "$OUT/train"
.venv/bin/torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29533}" \
  -m megatron_sphinx.train --recipe debug --tp 2 --steps "$STEPS" --data "$OUT/store.zarr" \
  --save "$OUT/train" --log-interval 5 --eval-split 0.05 --eval-interval 20 --eval-batches 4 "$@"
$PY - "$OUT/train/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
k = max(1, len(rows) // 5)
first = sum(r["loss"] for r in rows[:k]) / k
last = sum(r["loss"] for r in rows[-k:]) / k
print(f"[demo] mean loss of the first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
if len(evals) > 1:
    print(f"[demo] held-out loss at step {evals[0][0]} {evals[0][1]:.3f} -> step {evals[-1][0]} "
          f"{evals[-1][1]:.3f}")
by_source = [r["eval_source_loss"] for r in rows if "eval_source_loss" in r]
if len(by_source) > 1:
    print("[demo] held-out loss per source: " + ", ".join(
        f"{name} {by_source[0][name]:.2f} -> {loss:.2f}" for name, loss in by_source[-1].items()
        if name in by_source[0]))
sys.exit(0 if last < first and (len(evals) < 2 or evals[-1][1] < evals[0][1]) else 1)
PYEOF
echo "[demo] checkpoint: $(cat "$OUT/train/latest") in $OUT/train"
