#!/usr/bin/env bash
# The main job on the embedded synthetic dataset: set up .venv, build the dataset, run every stage
# that exists so far. Environment: DATASET (default input/synthetic), OUTPUT (default output), WORKERS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash orchestration_scripts/setup_env.sh
py=.venv/bin/python
dataset=${DATASET:-input/synthetic}
workers=${WORKERS:-2}

$py -m src.data.make_synthetic --out "$dataset"
$py -m src.preprocessing.cache_images --dataset "$dataset" --size 256 --workers "$workers"
$py -m src.preprocessing.bestfitting_duplicates_search --dataset "$dataset" --workers "$workers"
$py -m src.preprocessing.create_imagelevel_folds --dataset "$dataset" --drop-duplicates
echo "demo finished: dataset and preprocessing outputs in $dataset"
