#!/usr/bin/env bash
# Everything a GPU run should measure, as one prepared call (at most 10 minutes; each stage has its own timeout, and
# whatever a stage wrote under $OUT comes back even if a later one runs out of time). Speed first:
#   1. whole SD3-medium generations (real config, random weights, bf16, 1024 px, 28 steps): eager and compiled
#      stock, the CUDA-graph path (full compute, SpecDiff, RAS 0.9), SpecDiff eager, compiled SpecDiff with
#      graphs, FORA / TaylorSeer eager and FORA compiled, in one interleaved run          -> $OUT/sd3-medium/
#   2. the same for FLUX.1-dev, fewer methods and one timed round                         -> $OUT/flux-dev/
#   3. only with TRAIN_MINUTES > 0: the embedded model's training on the GPU              -> $OUT/train/
# Device run: carry [".whl"] (diffusers' wheel: the GPU machine has none; .venv/bin/pip download diffusers==<the
# version setup.sh installs> --no-deps -d .whl), command "bash scripts/gpu_session.sh", timeout_s 600.
# Add ".gpu" to carry and TRAIN_MINUTES=N for training (scripts/gpu_train_v2.sh says how to prepare it).
# Tiny test on a CPU: PATH=$PWD/.venv/bin:$PATH TINY=1 OUT=/tmp/o bash scripts/gpu_session.sh
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
TRAIN_MINUTES=${TRAIN_MINUTES:-0}
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
SD3_METHODS="stock stock+compile full+graphs specdiff specdiff+graphs specdiff+graphs+compile ras:cache_ratio=0.9+graphs fora taylorseer fora+compile"
FLUX_METHODS="stock full+graphs specdiff specdiff+graphs ras:cache_ratio=0.9+graphs fora taylorseer"
if [ -n "${TINY:-}" ]; then
    COMMON="--tiny --steps 3 --latents --rounds 1"
    SD3_METHODS="stock full+graphs specdiff specdiff+graphs ras:cache_ratio=0.9+graphs fora"
    FLUX_METHODS="stock specdiff+graphs fora"
    TRAIN_ENV="DEVICE=cpu LAYERS=1 BATCH=2 WORKERS=1" TRAIN_MINUTES=${TRAIN_MINUTES/#0/}
else
    COMMON="--latents"
    TRAIN_ENV=""
fi
mkdir -p "$OUT"
start=$SECONDS
echo "== 1. SD3-medium, whole generations"
timeout 300 python3 benchmarks/gpu_speed.py $COMMON --models sd3-medium --methods $SD3_METHODS --rounds 2 \
    --budget-minutes 3 --out "$OUT/sd3-medium" 2>&1 | grep -v "it/s\]\|kept in float32" | tail -n 20
echo "== 2. FLUX.1-dev, whole generations ($(( SECONDS - start )) s so far)"
timeout $(( 560 - (SECONDS - start) )) python3 benchmarks/gpu_speed.py $COMMON --models flux-dev --methods $FLUX_METHODS \
    --rounds 1 --budget-minutes 2 --out "$OUT/flux-dev" 2>&1 | grep -v "it/s\]\|kept in float32" | tail -n 14
if [ -n "$TRAIN_MINUTES" ] && [ "$TRAIN_MINUTES" != 0 ]; then
    echo "== 3. training ($TRAIN_MINUTES min, $(( SECONDS - start )) s so far)"
    mkdir -p "$OUT/train"
    env $TRAIN_ENV MINUTES=$TRAIN_MINUTES OUT="$OUT/train" timeout $(( ${TRAIN_MINUTES%.*} * 60 + 150 )) \
        bash scripts/gpu_train_v2.sh 2>&1 | grep -v "should be kept in float32" | tail -n 20
fi
echo "== done in $(( SECONDS - start )) s"; ls -lR "$OUT"
