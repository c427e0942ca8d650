#!/usr/bin/env bash
# Train embedded v2's larger configuration (8 blocks x 192, about 21 MB in fp16) on a GPU, then send the
# exported weights back as a tar in parts of at most 15 MiB (the device tool returns files of at most 16 MiB).
#
# Prepare on this machine (ignored folders; they travel with `carry`):
#   python -m specdiff.lab.embedded.text_encoder --export-compact .gpu/minilm      # 22.7 MB, MiniLM is not there
#   diffusers' wheel in .whl/ (see the device tool's README; the GPU machine has no diffusers)
# Run there:  device run, carry [".whl", ".gpu"], command "bash scripts/gpu_train_v2.sh", timeout 600.
# Back here:  cat <files_at>/embedded-v2-gpu.tar.part-* | tar -xf - -C /tmp   (-> /tmp/gpu-export, hash-checked)
# Tiny test on a CPU: DEVICE=cpu MINUTES=0.3 LAYERS=1 BATCH=2 WORKERS=1 OUT=/tmp/o bash scripts/gpu_train_v2.sh
# INIT=specdiff/lab/embedded/weights_v2 continues the shipped model instead (its size; LAYERS / HEADS unused):
# an earlier run's 3.5 minutes from scratch gave 1,253 steps, far too few for the 8-block model. INIT with GROW=N
# (N above the folder's blocks) starts an N-block model that computes the shipped one's function, its new
# blocks copies with zero output gates, so minutes of a GPU add depth without starting over.
set -euo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
DEVICE=${DEVICE:-cuda} MINUTES=${MINUTES:-6} LAYERS=${LAYERS:-8} HEADS=${HEADS:-3} BATCH=${BATCH:-256}
WORKERS=${WORKERS:-14} LR=${LR:-1e-3} RUN=${RUN:-/tmp/gpu-run} MARGIN=${MARGIN:-4} INIT=${INIT:-}
if [ -n "$INIT" ]; then SIZE=(--init-from "$INIT"); else SIZE=(--layers "$LAYERS" --heads "$HEADS"); fi
if [ -n "$INIT" ] && [ -n "${GROW:-}" ]; then SIZE+=(--layers "$GROW"); fi
source scripts/gpu_env.sh
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
rm -rf "$RUN" /tmp/gpu-export
python3 -m specdiff.lab.embedded.train --style v2 --out "$RUN" --device "$DEVICE" --precision bf16 "${SIZE[@]}" \
    --batch-size "$BATCH" --workers "$WORKERS" --lr "$LR" --lr-decay cosine --minutes "$MINUTES" \
    --steps 100000000 --save-every 100000000 --object-margin "$MARGIN" --text-encoder .gpu/minilm 2> /tmp/train-progress.log || { tail -c 2000 /tmp/train-progress.log; exit 1; }
tail -c 400 /tmp/train-progress.log; echo
python3 -m specdiff.lab.embedded.train --out "$RUN" --loss-summary "$RUN/loss.csv" | tee "$OUT/loss-summary.txt"
python3 -m specdiff.lab.embedded.train --out "$RUN" --export /tmp/gpu-export
tar -cf - -C /tmp gpu-export | split -b 15m -d - "$OUT/embedded-v2-gpu.tar.part-"
ls -l "$OUT"
