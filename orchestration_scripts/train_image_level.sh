#!/usr/bin/env bash
# Image-level training, both passes of the reference recipe, for every fold:
#   pass 1: 200-step gradient accumulation, Adam10 x 4 (start lr 4e-5), from the previous-competition model
#   pass 2: 20-step accumulation, Adam10 x 0.3 (start lr 3e-6), from pass 1's final.pth
# Re-running continues interrupted runs (--resume) and skips finished ones.
#
# Settings (environment variables):
#   DATASET=input/synthetic OUTPUT=output FOLDS="0 1 2 3 4" IMG_SIZE=1024 BATCH_SIZE=8 WORKERS=16 EPOCHS=10
#   ARCH=densenet121_large PYTHON=python EXTRA_ARGS="" (appended to both passes, e.g. "--public-data")
#   GPU_IDS="0"     one fold after the other on GPU 0; with several ids ("0 1 2 3 4") the folds run in
#                   parallel, fold i on the i-th id (round robin), like the reference's five GPUs.
#   NPROC=1         GPUs per fold through torchrun (DDP). The accumulation steps are divided by NPROC so
#                   that the effective batch stays BATCH_SIZE x 200 (pass 1) and BATCH_SIZE x 20 (pass 2).
# Example (CPU demo on the synthetic data):
#   FOLDS=0 ARCH=densenet_tiny IMG_SIZE=128 WORKERS=2 EPOCHS=2 EXTRA_ARGS="--device cpu" \
#       orchestration_scripts/train_image_level.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-input/synthetic}
OUTPUT=${OUTPUT:-output}
FOLDS=${FOLDS:-"0 1 2 3 4"}
IMG_SIZE=${IMG_SIZE:-1024}
BATCH_SIZE=${BATCH_SIZE:-8}
WORKERS=${WORKERS:-16}
EPOCHS=${EPOCHS:-10}
ARCH=${ARCH:-densenet121_large}
PYTHON=${PYTHON:-python}
EXTRA_ARGS=${EXTRA_ARGS:-}
GPU_IDS=${GPU_IDS:-0}
NPROC=${NPROC:-1}
RUN_1=${RUN_1:-${ARCH}_${IMG_SIZE}_all_data__obvious_neg__gradaccum_200__start_lr_4e5}
RUN_2=${RUN_2:-${ARCH}_${IMG_SIZE}_all_data__obvious_neg__gradaccum_20__start_lr_3e6}

ACCUM_1=$(( 200 / NPROC )); (( ACCUM_1 >= 1 )) || ACCUM_1=1
ACCUM_2=$(( 20 / NPROC )); (( ACCUM_2 >= 1 )) || ACCUM_2=1

launch() {  # launch GPU_ID ARGS...: one training run on one GPU (or NPROC GPUs starting from it)
  local gpu=$1; shift
  if (( NPROC > 1 )); then
    CUDA_VISIBLE_DEVICES=$(seq -s, "$gpu" $(( gpu + NPROC - 1 ))) \
      "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m src.train.train_bestfitting "$@"
  else
    "$PYTHON" -m src.train.train_bestfitting --gpu-id "$gpu" "$@"
  fi
}

train_fold() {  # train_fold FOLD GPU_ID: both passes for one fold
  local fold=$1 gpu=$2
  local common=(--dataset "$DATASET" --output "$OUTPUT" --fold "$fold" --arch "$ARCH" --img_size "$IMG_SIZE"
                --batch_size "$BATCH_SIZE" --workers "$WORKERS" --scheduler Adam10 --epochs "$EPOCHS"
                --eval-at-start --resume)
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
  launch "$gpu" "${common[@]}" --gradient-accumulation-steps "$ACCUM_1" --scheduler-lr-multiplier 4 \
    --out_dir "$RUN_1" $EXTRA_ARGS
  local first_final="$OUTPUT/models/$RUN_1/fold$fold/final.pth"
  [[ -f "$first_final" ]] || { echo "fold $fold: $first_final missing after pass 1" >&2; return 1; }
  # shellcheck disable=SC2086
  launch "$gpu" "${common[@]}" --gradient-accumulation-steps "$ACCUM_2" --scheduler-lr-multiplier 0.3 \
    --out_dir "$RUN_2" --load-state-dict-path "$first_final" $EXTRA_ARGS
  echo "fold $fold done: $OUTPUT/models/$RUN_2/fold$fold/final.pth"
}

read -r -a gpus <<< "$GPU_IDS"
read -r -a folds <<< "$FOLDS"
if (( ${#gpus[@]} == 1 )); then
  for fold in "${folds[@]}"; do train_fold "$fold" "${gpus[0]}"; done
else
  mkdir -p "$OUTPUT/logs"
  pids=()
  status=0
  # Every fold of a round is waited for even when one fails (a bare `wait` under set -e would exit at the
  # first failure and leave the other folds running); a failed fold makes the exit status 1.
  for i in "${!folds[@]}"; do
    fold=${folds[$i]}
    gpu=${gpus[$(( i % ${#gpus[@]} ))]}
    train_fold "$fold" "$gpu" > "$OUTPUT/logs/train_image_level_fold$fold.log" 2>&1 &
    pids+=($!)
    if (( (i + 1) % ${#gpus[@]} == 0 )); then
      for pid in "${pids[@]}"; do wait "$pid" || status=1; done
      pids=()
    fi
  done
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=1; done  # ${a[@]+...}: empty under set -u in bash < 4.4
  exit $status
fi
