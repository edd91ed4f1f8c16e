#!/usr/bin/env bash
# One prepared device check for packed attention: writes every GPU result file in one run.
#
#   benchmarks/gpu_check.sh                                   # on the device machine (cuda)
#   DEVICE=cpu SHAPE=tiny BASE_SHAPE=tiny DOCS=20 REPEATS=2 benchmarks/gpu_check.sh   # dry run on a CPU
#
# Assumptions about the device machine: it has a copy of this working tree (maybe without .git),
# no network, and a Python with CUDA torch, transformers, tokenizers, celery, redis and
# pydantic-settings already installed. Nothing is installed: the script uses ./.venv/bin/python
# if present, else $PYTHON, else python3, runs our code from the tree (PYTHONPATH), and stops at
# once, naming what is missing, before spending device time. redis-server, sentence-transformers
# and matplotlib are optional: without them the Redis rows or the benchmarks.run refresh are
# skipped and the summary says so.
#
# Steps, most important first, each under `timeout` so the whole stays within BUDGET_S (450 s, so
# under 8 minutes on one H100/H200):
#   1. versions, card, whether variable-length FlashAttention is usable;
#   2. random-weight models with the bge-reranker-v2-m3 and bge-reranker-base shapes (.bench-cache);
#   3. benchmarks.attention, v2-m3 shape, DTYPE (fp16), 100 docs, median of 7 warm runs: the seed's
#      simple loop, ours padded, ours packed, packed with each fusion on/off, tokenizing ahead or not,
#      scores against the loop in fp32; then padded and packed through Redis and a real worker;
#   3a. benchmarks.profile_forward: a torch.profiler summary of one 100-doc forward (v2-m3 shape);
#   3b. benchmarks.fleet_throughput on the v2-m3 shape: open loop (2 producer processes at fixed
#      rates) and closed loop, 10-passage jobs and 100-paper two-stage jobs, the threads shape
#      beside host processes feeding a device process (jobs/s held, p50/p99, host CPU per job);
#   3c. benchmarks.chain_overhead on the v2-m3 shape: where a two-stage job's time goes besides compute;
#   4. the same in-process rows on the bge-reranker-base shape;
#   5. if time is left, benchmarks.run on the v2-m3 shape (refreshes cuda-bge-reranker-v2-m3.*).
# Every result file lands in ${OUT:-benchmarks/results}; gpu-check.md there lists them with the card.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-bge-reranker-v2-m3}
BASE_SHAPE=${BASE_SHAPE:-bge-reranker-base}
DTYPE=${DTYPE:-auto}
DOCS=${DOCS:-100}
REPEATS=${REPEATS:-7}
BUDGET_S=${BUDGET_S:-450}
BASELINE_REV=${BASELINE_REV:-30207dc}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
SUMMARY="$OUT/gpu-check.md"
: >"$LOG"

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - SECONDS)); }
step() {  # step NAME SECONDS_WANTED COMMAND...: run under a timeout, never past the budget; a failure is logged, not fatal
  local name=$1 wanted=$2
  shift 2
  local limit
  limit=$(left)
  if ((limit < 30)); then say "SKIPPED $name: budget spent"; echo "- $name: skipped (budget spent)" >>"$SUMMARY"; return 0; fi
  ((wanted < limit)) && limit=$wanted
  say "START $name (limit ${limit}s): $*"
  local started=$SECONDS
  if timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"; then
    say "DONE $name in $((SECONDS - started))s"
    echo "- $name: done in $((SECONDS - started)) s" >>"$SUMMARY"
  else
    say "FAILED $name after $((SECONDS - started))s (see gpu-check.log)"
    echo "- $name: FAILED after $((SECONDS - started)) s (see gpu-check.log)" >>"$SUMMARY"
  fi
}

# 1. What we run on, and what is missing, before any device time is spent.
say "python: $PY"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform, sys
missing = [m for m in ("torch", "transformers", "tokenizers", "celery", "redis", "pydantic_settings") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}; this script installs nothing (no network): use a Python that has them (PYTHON=...)")
import torch, transformers, tokenizers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("torch.nn.attention.varlen: importable")
except ImportError as e:
    print(f"torch.nn.attention.varlen: NOT importable ({e}); packed attention will use the per-pair SDPA reference")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print(f"cuda:{i} {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
import producer, scoring.engine, scoring.packed  # noqa: F401  (our code, from the tree)
EOF
if [[ "$DEVICE" == cuda* ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'DEVICE=$DEVICE but torch sees no CUDA device')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee -a "$LOG"
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if '$DEVICE'.startswith('cuda') else 'CPU')")
E2E=--e2e
command -v redis-server >/dev/null || { say "no redis-server: the Redis + worker rows are skipped"; E2E=; }
BASELINE=()
if git cat-file -e "$BASELINE_REV^{commit}" 2>/dev/null; then BASELINE=(--baseline-engine "$BASELINE_REV"); fi

{
  echo "# GPU check: $CARD"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE ($CARD), dtype $DTYPE, $DOCS docs, median of $REPEATS warm runs."
  echo "Every figure in the files below was measured on this card in this run."
  echo
  echo "## Steps"
} >"$SUMMARY"

# 2. Models (random weights, real shapes), built once into .bench-cache.
step "build models" 180 "$PY" -c "
from benchmarks.corpus import model_dir
for shape in {'$SHAPE', '$BASE_SHAPE'}: print(model_dir(shape))"

# 3. The main shape: every in-process row, then Redis + a real worker.
step "attention $SHAPE" 300 "$PY" -m benchmarks.attention --device "$DEVICE" --shape "$SHAPE" --dtype "$DTYPE" \
  --docs "$DOCS" --repeats "$REPEATS" $E2E ${BASELINE[@]+"${BASELINE[@]}"} --out "$OUT"

# 3a. Where one forward's time goes, as a profile.
step "profile $SHAPE" 60 "$PY" -m benchmarks.profile_forward --device "$DEVICE" --shape "$SHAPE" --docs "$DOCS" --out "$OUT"

# 3b. One GPU, many jobs: the threads shape beside host processes + a device process (needs redis-server).
if [[ -n "$E2E" ]]; then
  step "fleet throughput $SHAPE" 200 "$PY" -m benchmarks.fleet_throughput --device "$DEVICE" --shape "$SHAPE" \
    --shapes threads,device+4,device+8 --seconds 4 --closed-jobs 32 --rates-k10 50,100,200,300,400,600 \
    --rates-two100 2,4,6,8,10,12 --out "$OUT"
  step "chain overhead $SHAPE" 90 "$PY" -m benchmarks.chain_overhead --device "$DEVICE" --shape "$SHAPE" --dtype "$DTYPE" \
    --runs 15 --out "$OUT"
fi

# 4. The base shape: the loop, padded and packed (a dry run with one shape skips it: same file name).
[[ "$BASE_SHAPE" == "$SHAPE" ]] || step "attention $BASE_SHAPE" 90 "$PY" -m benchmarks.attention --device "$DEVICE" --shape "$BASE_SHAPE" --dtype "$DTYPE" \
  --docs "$DOCS" --repeats "$REPEATS" --only "seed loop,ours padded,ours packed" --out "$OUT"

# 5. The standard benchmark with the new default attention, if time is left and its extras are here.
if "$PY" -c "import sentence_transformers, matplotlib" 2>/dev/null && (($(left) > 150)); then
  step "benchmarks.run $SHAPE" $(($(left) - 10)) "$PY" -m benchmarks.run --device "$DEVICE" --shape "$SHAPE" --docs "$DOCS" \
    --repeats "$REPEATS" --skip-e2e --out "$OUT"
else
  echo "- benchmarks.run $SHAPE: skipped (sentence-transformers/matplotlib missing, or under 150 s left)" >>"$SUMMARY"
fi

{
  echo
  echo "## Results ($CARD)"
  for md in "$OUT"/attention-*.md; do
    [[ -e "$md" ]] || continue
    echo
    echo "### $(basename "$md")"
    echo
    cat "$md"
  done
} >>"$SUMMARY"
say "finished in ${SECONDS}s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
