#!/usr/bin/env bash
# The main job: set up .venv, build the embedded synthetic dataset, run the whole pipeline on it at
# CPU-demo sizes, then score every stage on the held-out split (output/demo/report.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash orchestration_scripts/setup_env.sh
export DATASET=${DATASET:-input/synthetic} OUTPUT=${OUTPUT:-output}
export N_FOLDS=${N_FOLDS:-3} WORKERS=${WORKERS:-2} ARCH=${ARCH:-densenet_small}
export IMAGE_SIZE=${IMAGE_SIZE:-128} FULL_CACHE_SIZE=${FULL_CACHE_SIZE:-256} CELL_SIZE=${CELL_SIZE:-64} BATCH=${BATCH:-8} CELL_BATCH=${CELL_BATCH:-16}
export ACCUM=${ACCUM:-2} CELL_ACCUM=${CELL_ACCUM:-2} SCHEDULER=${SCHEDULER:-Cosine}
export LR_MULT=${LR_MULT:-200} CELL_LR_MULT=${CELL_LR_MULT:-300} IMAGE_EPOCHS=${IMAGE_EPOCHS:-40}
export CELL_EPOCHS=${CELL_EPOCHS:-30} KNN=${KNN:-30} EIGEN=${EIGEN:-20} SELECT_ABOVE=${SELECT_ABOVE:-}
export TRAIN_FLAGS=${TRAIN_FLAGS:---init-weights none}
# 160 training fields make a weak image-level model, so its pseudo-labels alone teach the cell model
# little; the demo blends them half and half with the image labels (0 = the reference's recipe).
export CELL_FLAGS=${CELL_FLAGS:---image-label-weight 0.5 --select-by loss}
started=$(date +%s)
.venv/bin/python -m src.data.make_synthetic --out "$DATASET"
bash orchestration_scripts/run_pipeline.sh
.venv/bin/python -m src.evaluation.demo_report --dataset "$DATASET" --output-dir "$OUTPUT" --folds "$(seq -s, 0 $((N_FOLDS - 1)))" \
  --image-run image_level --cell-run cellwise --image-size "$IMAGE_SIZE" --cell-size "$CELL_SIZE"
echo "demo finished in $(( $(date +%s) - started )) s; report: $OUTPUT/demo/report.md"
