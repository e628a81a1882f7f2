#!/usr/bin/env bash
# The main job: set up .venv, build the embedded synthetic dataset, run the whole pipeline on it at
# CPU-demo sizes, then the same on the second synthetic style (settings chosen on style 1 only), and
# score every stage of both on their held-out splits (output/demo/report.md, per_class_ap.png).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash orchestration_scripts/setup_env.sh
export DATASET=${DATASET:-input/synthetic} OUTPUT=${OUTPUT:-output} DATASET_STYLE2=${DATASET_STYLE2:-input/synthetic_style2}
export N_FOLDS=${N_FOLDS:-3} WORKERS=${WORKERS:-2} ARCH=${ARCH:-densenet_small}
export IMAGE_SIZE=${IMAGE_SIZE:-128} FULL_CACHE_SIZE=${FULL_CACHE_SIZE:-native} CELL_SIZE=${CELL_SIZE:-64} BATCH=${BATCH:-8} CELL_BATCH=${CELL_BATCH:-16}
export ACCUM=${ACCUM:-2} CELL_ACCUM=${CELL_ACCUM:-2} SCHEDULER=${SCHEDULER:-Cosine}
export LR_MULT=${LR_MULT:-200} CELL_LR_MULT=${CELL_LR_MULT:-300} IMAGE_EPOCHS=${IMAGE_EPOCHS:-40}
export CELL_EPOCHS=${CELL_EPOCHS:-12} KNN=${KNN:-30} EIGEN=${EIGEN:-20} SELECT_ABOVE=${SELECT_ABOVE:-}
export TRAIN_FLAGS=${TRAIN_FLAGS:---init-weights none}
# 160 training fields make a weak image-level model, so its pseudo-labels alone teach the cell models
# little; the demo blends them half and half with the image labels (0 = the reference's recipe).
export IMAGE_LABEL_WEIGHT=${IMAGE_LABEL_WEIGHT:-0.5} CELL_FLAGS=${CELL_FLAGS:---select-by loss}
export FEATURE_WEIGHT=${FEATURE_WEIGHT:-0.5} IMAGE_CONTEXT=${IMAGE_CONTEXT:-0.5}  # chosen on style 1
started=$(date +%s)
.venv/bin/python -m src.data.make_synthetic --out "$DATASET"
bash orchestration_scripts/run_pipeline.sh
# Style 2 (src/data/synthetic_style2.py) at the same settings: 64 + 32 non-square 16-bit fields (the
# native-size cache spares the cell crops decoding them).
.venv/bin/python -m src.data.make_synthetic --style 2 --out "$DATASET_STYLE2"
DATASET=$DATASET_STYLE2 OUTPUT=$OUTPUT/style2 FULL_CACHE_SIZE=native bash orchestration_scripts/run_pipeline.sh
.venv/bin/python -m src.evaluation.demo_report --run "style 1" "$DATASET" "$OUTPUT" \
  --run "style 2" "$DATASET_STYLE2" "$OUTPUT/style2" --report-dir "$OUTPUT/demo" --folds "$(seq -s, 0 $((N_FOLDS - 1)))" \
  --image-run image_level --cell-run cellwise --image-size "$IMAGE_SIZE" --cell-size "$CELL_SIZE" \
  --feature-weight "$FEATURE_WEIGHT" --image-context "$IMAGE_CONTEXT"
echo "demo finished in $(( $(date +%s) - started )) s; report: $OUTPUT/demo/report.md"
