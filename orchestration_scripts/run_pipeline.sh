#!/usr/bin/env bash
# Every stage, every fold, for one dataset folder (train/ + test/), from preprocessing to submission.
# Sizes and schedules come from the environment; the defaults are the reference's full-scale recipe
# (image-level training here is one pass; orchestration_scripts/train_image_level.sh has both passes).
#   DATASET=input/hpa OUTPUT=output N_FOLDS=5 bash orchestration_scripts/run_pipeline.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-.venv/bin/python}
DATASET=${DATASET:-input/synthetic}
OUTPUT=${OUTPUT:-output}
N_FOLDS=${N_FOLDS:-5}
WORKERS=${WORKERS:-4}
ARCH=${ARCH:-densenet121_large}
IMAGE_SIZE=${IMAGE_SIZE:-1024}        # image-level model input side
FULL_CACHE_SIZE=${FULL_CACHE_SIZE:-}  # full-resolution cache for the cell crops: native (any shape) or a square side; empty: none
CELL_SIZE=${CELL_SIZE:-512}           # cell-level model input side
BATCH=${BATCH:-8}
CELL_BATCH=${CELL_BATCH:-32}
ACCUM=${ACCUM:-200}
CELL_ACCUM=${CELL_ACCUM:-4}
SCHEDULER=${SCHEDULER:-Adam10}
LR_MULT=${LR_MULT:-4}
CELL_LR_MULT=${CELL_LR_MULT:-4}
IMAGE_EPOCHS=${IMAGE_EPOCHS:-10}
CELL_EPOCHS=${CELL_EPOCHS:-5}
DENOISE_FOLDS=${DENOISE_FOLDS:-3}
KNN=${KNN:-200}
EIGEN=${EIGEN:-50}
SELECT_ABOVE=${SELECT_ABOVE:-}        # absolute Y_opt threshold; empty: select_candidates' default (outliers) rule
IMAGE_LABEL_WEIGHT=${IMAGE_LABEL_WEIGHT:-0}  # cell-level targets: (1 - w) * pseudo-label + w * image label (0: the reference)
FEATURE_WEIGHT=${FEATURE_WEIGHT:-0}   # weight of the cell feature model beside the cell-level CNN (0: none; the demo: 0.5)
RELABEL_FOLDS=${RELABEL_FOLDS:-0}     # folds of the feature model's multiple-instance relabelling (0: off, as in the demo)
IMAGE_CONTEXT=${IMAGE_CONTEXT:-0}     # weight of the field's highest cell prediction in each cell's (0: off; the demo: 0.5)
FUSION_WEIGHT=${FUSION_WEIGHT:-0}  # image-level weight in the submission (0: off); choose: per class on out-of-fold training images, from the image labels
IMAGE_RUN=${IMAGE_RUN:-image_level}
CELL_RUN=${CELL_RUN:-cellwise}
TRAIN_FLAGS=${TRAIN_FLAGS:-}          # extra flags for both trainers, e.g. "--init-weights none"
CELL_FLAGS=${CELL_FLAGS:-}            # extra flags for train_cellwise, e.g. "--select-by loss" (targets: IMAGE_LABEL_WEIGHT)
last_fold=$((N_FOLDS - 1))
folds=$(seq -s, 0 "$last_fold")

step() { echo; echo "=== $* ==="; }

step "input check"
$py -m src.preprocessing.check_inputs --dataset "$DATASET"

step "preprocessing"
for source in "" --test-data; do
  for size in "$IMAGE_SIZE" $FULL_CACHE_SIZE; do
    $py -m src.preprocessing.cache_images --dataset "$DATASET" --size "$size" --workers "$WORKERS" $source
  done
done
$py -m src.preprocessing.bestfitting_duplicates_search --dataset "$DATASET" --workers "$WORKERS"
$py -m src.preprocessing.create_imagelevel_folds --dataset "$DATASET" --n-folds "$N_FOLDS" --drop-duplicates
for source in "" --test-data; do
  $py -m src.preprocessing.generate_cell_bboxes --dataset "$DATASET" --output-dir "$OUTPUT" --workers "$WORKERS" \
    --no-progress $source
done
$py -m src.preprocessing.detect_negatives_with_obvious_staining --dataset "$DATASET" --output-dir "$OUTPUT"
$py -m src.preprocessing.create_denoising_folds --output-dir "$OUTPUT" --n-folds "$DENOISE_FOLDS"

step "image-level training, $N_FOLDS folds"
for fold in $(seq 0 "$last_fold"); do
  $py -m src.train.train_bestfitting --dataset "$DATASET" --output "$OUTPUT" --fold "$fold" --arch "$ARCH" \
    --img_size "$IMAGE_SIZE" --batch_size "$BATCH" --workers "$WORKERS" --gradient-accumulation-steps "$ACCUM" \
    --scheduler "$SCHEDULER" --scheduler-lr-multiplier "$LR_MULT" --epochs "$IMAGE_EPOCHS" \
    --out_dir "$IMAGE_RUN" --eval-at-start --resume --log-every 0 $TRAIN_FLAGS
done

step "pseudo-labels"
$py -m src.predict.predict_cells_from_image_level_densenet --dataset "$DATASET" --output-dir "$OUTPUT" \
  --run-name "$IMAGE_RUN" --img-size "$IMAGE_SIZE" --workers "$WORKERS"

step "graph denoising, $DENOISE_FOLDS folds"
for fold in $(seq 0 $((DENOISE_FOLDS - 1))); do
  $py -m src.denoising.graph_denoising --fold "$fold" --output-dir "$OUTPUT" --n-neighbors "$KNN" \
    --n-eigenvectors "$EIGEN" --plot-class "Mitotic spindle"
done
threshold=()  # the default outliers rule; SELECT_ABOVE sets an absolute threshold instead
# (the ${a[@]+...} form: bash before 4.4 calls an empty array unbound under set -u)
[ -n "$SELECT_ABOVE" ] && threshold=(--denoised-above "$SELECT_ABOVE")
$py -m src.denoising.select_candidates --class "Mitotic spindle" --init-below 0.4 ${threshold[@]+"${threshold[@]}"} \
  --output-dir "$OUTPUT" --dataset "$DATASET" --out "$OUTPUT/mitotic_cells_selection.csv"

step "cell-level training, $N_FOLDS folds"
for fold in $(seq 0 "$last_fold"); do
  $py -m src.train.train_cellwise --dataset "$DATASET" --output "$OUTPUT" --fold "$fold" --arch "$ARCH" \
    --img_size "$CELL_SIZE" --batch_size "$CELL_BATCH" --workers "$WORKERS" --gradient-accumulation-steps "$CELL_ACCUM" \
    --scheduler "$SCHEDULER" --scheduler-lr-multiplier "$CELL_LR_MULT" --epochs "$CELL_EPOCHS" --out_dir "$CELL_RUN" \
    --load-state-dict-path "$OUTPUT/models/$IMAGE_RUN/fold$fold/final.pth" \
    --selection "$OUTPUT/mitotic_cells_selection.csv" --image-label-weight "$IMAGE_LABEL_WEIGHT" --resume --log-every 0 \
    $TRAIN_FLAGS $CELL_FLAGS
done

features=()
feature_model="$OUTPUT/models/cell_features/feature_model.joblib"
rm -f "$feature_model"  # a model left from an earlier run must not be taken for this one's
if awk "BEGIN { exit !($FEATURE_WEIGHT > 0) }"; then
  step "cell feature model"
  $py -m src.train.train_cell_features --dataset "$DATASET" --output "$OUTPUT" --workers "$WORKERS" --no-progress \
    --selection "$OUTPUT/mitotic_cells_selection.csv" --image-label-weight "$IMAGE_LABEL_WEIGHT" --relabel-folds "$RELABEL_FOLDS"
  features=(--feature-model "$feature_model" --feature-weight "$FEATURE_WEIGHT")
fi

fusion=(--fusion-weight "$FUSION_WEIGHT")
rm -f "$OUTPUT/fusion_weights.csv"  # a stale file from an earlier choose run would mislabel the report
if [ "$FUSION_WEIGHT" = choose ]; then
  step "fusion weights"
  $py -m src.predict.choose_fusion --dataset "$DATASET" --output-dir "$OUTPUT" --cell-run "$CELL_RUN" --image-run "$IMAGE_RUN" \
    --folds "$folds" --img-size "$CELL_SIZE" --fusion-img-size "$IMAGE_SIZE" --out "$OUTPUT/fusion_weights.csv"
  fusion=(--fusion-weights "$OUTPUT/fusion_weights.csv")
fi

step "submission"
$py -m src.predict.predict_submission --dataset "$DATASET" --output-dir "$OUTPUT" --run-name "$CELL_RUN" \
  --folds "$folds" --img-size "$CELL_SIZE" --fusion-run "$IMAGE_RUN" --fusion-img-size "$IMAGE_SIZE" \
  "${fusion[@]}" ${features[@]+"${features[@]}"} --image-context "$IMAGE_CONTEXT" --out "$OUTPUT/submission.csv"
echo "pipeline finished: $OUTPUT/submission.csv"
