"""orchestration_scripts/train_image_level.sh with folds in parallel, on a stand-in for Python."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stands in for `python -m src.train.train_bestfitting ...`: fold 0 fails at once; any other fold takes
# a moment, then writes its run's final.pth (pass 2 finds pass 1's) and a marker naming the pass.
STAND_IN = """#!/usr/bin/env bash
while (( $# )); do
  case $1 in --fold) fold=$2; shift;; --output) output=$2; shift;; --out_dir) run=$2; shift;; esac
  shift
done
[ "$fold" = 0 ] && exit 3
sleep 1
mkdir -p "$output/models/$run/fold$fold"
touch "$output/models/$run/fold$fold/final.pth" "$output/finished_${run}_fold$fold"
"""


def run_script(tmp_path: Path, folds: str, gpus: str) -> subprocess.CompletedProcess:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in), "OUTPUT": str(tmp_path / "out"), "FOLDS": folds, "GPU_IDS": gpus,
           "RUN_1": "first", "RUN_2": "second"}
    return subprocess.run(["bash", "orchestration_scripts/train_image_level.sh"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_failed_fold_waits_for_the_others_of_its_round_and_fails_the_run(tmp_path):
    # two folds on two GPUs: one full round, nothing left after it
    result = run_script(tmp_path, "0 1", "0 1")
    assert result.returncode == 1, result.stderr
    # the script returned only after fold 1 finished both passes
    assert (tmp_path / "out" / "finished_second_fold1").is_file()
    assert not (tmp_path / "out" / "finished_first_fold0").exists()


def test_folds_left_after_the_last_full_round_are_waited_for(tmp_path):
    result = run_script(tmp_path, "1 2 3", "0 1")
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / "out" / f"finished_second_fold{fold}").is_file() for fold in (1, 2, 3))
