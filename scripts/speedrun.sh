#!/usr/bin/env bash
# The whole pipeline in one go: data + tokenizer -> train -> evaluations -> report (as karpathy/nanochat's speedrun).
#
#   bash scripts/speedrun.sh                       # CPU: d20 for 15 minutes of training
#   CONFIG=nano_125m BUDGET=8m bash scripts/speedrun.sh                 # 1 GPU (bf16; torch.compile via COMPILE=1)
#   CONFIG=nano_125m BUDGET=8m NPROC=8 bash scripts/speedrun.sh         # 8 GPUs on one node (torchrun, nccl)
#
# Settings (environment): CONFIG (d20), BUDGET (training wall time, e.g. 15m, 2h), NPROC (processes; >1 uses torchrun),
# DEVICE (auto), COMPILE (0/1), OUT (runs/speedrun-<config>-<time>), SAMPLES (HumanEval samples per problem, 20).
set -euo pipefail
CONFIG=${CONFIG:-d20}
BUDGET=${BUDGET:-15m}
NPROC=${NPROC:-1}
DEVICE=${DEVICE:-auto}
COMPILE=${COMPILE:-0}
SAMPLES=${SAMPLES:-20}
OUT=${OUT:-runs/speedrun-$CONFIG-$(date +%Y%m%d-%H%M%S)}

train=(--config "$CONFIG" --time-budget "$BUDGET" --device "$DEVICE" --out "$OUT")
[ "$COMPILE" = 1 ] && train+=(--compile)

echo "== 1. data, tokenizer and training ($CONFIG, $BUDGET, $NPROC process(es)) -> $OUT"
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$NPROC" -m nanochat.train "${train[@]}"
else
  nanochat-train "${train[@]}"
fi
# nanochat-train ends with held-out bpb, HumanEval bpb and line completion (left to right and FIM) in summary.json

echo "== 2. HumanEval pass@k ($SAMPLES samples per problem, bubblewrap sandbox; needs a context of >= 512 tokens)"
KS=1; [ "$SAMPLES" -ge 10 ] && KS=1,10   # pass@k needs at least k samples per problem
nanochat-eval humaneval --model "$OUT" -n "$SAMPLES" -k "$KS" --out "$OUT/humaneval.json"

echo "== 3. span completion (whole indented blocks)"
nanochat-eval lines --model "$OUT" --span

echo "== 4. GGUF export (llama.cpp's bitnet for standard-residual models, nanochat otherwise)"
nanochat-export "$OUT" --format gguf --out "$OUT/model.gguf"

echo "== 5. report"
nanochat-eval report "$OUT"
