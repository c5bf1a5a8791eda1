"""torchrun on CPU (gloo): the distributed step equals the single-process step, and a 2-process
run of clip_train.py works end to end."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, TINY_CONFIG

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, tmp_path, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("loss", ["clip", "label-aware"])
def test_two_processes_with_accumulation_match_one_process_full_batch(tmp_path, loss):
    # 3 SGD steps; 2 processes x --accum-steps 2 (no_sync on the first micro-pass) against one
    # process on the whole batch, with one masked (unreadable) row on rank 0.
    script = str(REPO_ROOT / "tests" / "ddp_step_check.py")
    run([sys.executable, script, str(tmp_path / "single.pt"), loss, "1"], tmp_path)
    run(TORCHRUN + [script, str(tmp_path / "ddp.pt"), loss, "2"], tmp_path)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert len(set(single["losses"])) == 3  # the weights moved between steps
    torch.manual_seed(0)
    for key, value in single["state_dict"].items():
        assert torch.allclose(value, ddp["state_dict"][key], atol=1e-5), key


def test_two_process_training_run_end_to_end(make_cohort, tmp_path):
    train_dir = make_cohort("train", (6, 12, 9), seed=0)
    val_dir = make_cohort("val", (3, 6, 4), seed=1)
    save_dir = tmp_path / "run"
    argv = ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir", str(save_dir),
            "--model-config", str(TINY_CONFIG), "--lr", "1e-3", "--batch-size", "8", "--epochs", "2",
            "--workers", "0", "--no-progress", "--recipe", "recommended", "--patience", "0"]
    run(TORCHRUN + [str(REPO_ROOT / "clip_train.py"), *argv], tmp_path)
    history = pd.read_csv(save_dir / "metrics.csv")
    assert list(history["epoch"]) == [1, 2] and (history["val_images"] == 13).all()
    best = torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)
    assert best["args"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in best["state_dict"])


def test_global_batch_must_divide_by_processes(make_cohort, tmp_path):
    train_dir = make_cohort("train", (4, 4, 4), seed=0)
    cmd = TORCHRUN + [str(REPO_ROOT / "clip_train.py"), "--train-dir", str(train_dir), "--val-dir",
                      str(train_dir), "--save-dir", str(tmp_path / "run"), "--model-config",
                      str(TINY_CONFIG), "--batch-size", "7", "--epochs", "1", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--batch-size 7 is the global batch and must be divisible" in result.stderr
