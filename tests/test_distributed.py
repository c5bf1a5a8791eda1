"""torchrun on CPU (gloo): the distributed step equals the single-process step, and a 2-process
run of clip_train.py works end to end."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, TINY_CONFIG

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, tmp_path, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    """ddp_step_check.py for both losses: one plain process and one torchrun start in all."""
    tmp_path = tmp_path_factory.mktemp("ddp_steps")
    script = str(REPO_ROOT / "tests" / "ddp_step_check.py")
    run([sys.executable, script, str(tmp_path / "single.pt"), "clip,label-aware", "1"], tmp_path)
    run(TORCHRUN + [script, str(tmp_path / "ddp.pt"), "clip,label-aware", "2"], tmp_path)
    return (torch.load(tmp_path / "single.pt", weights_only=True),
            torch.load(tmp_path / "ddp.pt", weights_only=True))


@pytest.mark.parametrize("loss", ["clip", "label-aware"])
def test_two_processes_with_accumulation_match_one_process_full_batch(step_results, loss):
    # 3 SGD steps; 2 processes x --accum-steps 2 (no_sync on the first micro-pass) against one
    # process on the whole batch, with one masked (unreadable) row on rank 0.
    single, ddp = step_results[0][loss], step_results[1][loss]
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    from orbital_clip import models
    models.register_model_config(TINY_CONFIG)
    torch.manual_seed(0)  # the script's seed: the weights both layouts started from
    initial = models.create_model("tiny_clip", None)[0].state_dict()
    assert not torch.allclose(initial["logit_scale"], single["state_dict"]["logit_scale"])  # trained
    for key, value in single["state_dict"].items():
        assert torch.allclose(value, ddp["state_dict"][key], atol=1e-5), key


def ddp_argv(train_dir, val_dir, save_dir, *extra):
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir", str(save_dir),
            "--model-config", str(TINY_CONFIG), "--lr", "1e-3", "--batch-size", "8", "--epochs", "3",
            "--workers", "0", "--no-progress", *extra]


def test_two_processes_unreadable_image_accumulation_and_resume_equal_a_straight_run(make_cohort, tmp_path):
    # One unreadable training image (rank-dependent: it lands in one rank's batch), --accum-steps 2,
    # label-aware loss; 3 epochs straight against 1 epoch + resume to 3. Captions come from a
    # per-rank RNG, so the resume must restore each rank's own state.
    train_dir = make_cohort("train", (6, 12, 9), seed=0)
    val_dir = make_cohort("val", (3, 6, 4), seed=1)
    (train_dir / "orbital disease" / "broken.jpg").write_bytes(b"not a JPEG at all")
    options = ("--accum-steps", "2", "--loss", "label-aware", "--wise-ft-alphas", "0,1")
    clip = [str(REPO_ROOT / "clip_train.py")]
    run(TORCHRUN + clip + ddp_argv(train_dir, val_dir, tmp_path / "straight", *options), tmp_path)
    run(TORCHRUN + clip + ddp_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "1", *options), tmp_path)
    run(TORCHRUN + clip + ddp_argv(train_dir, val_dir, tmp_path / "split", "--resume", "auto", *options),
        tmp_path)
    history = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    assert list(history["epoch"]) == [1, 2, 3] and (history["val_images"] == 13).all()
    # Every image once per epoch (28 over 2 ranks, no padding): the broken one skipped once.
    assert (history["skipped_images"] == 1).all() and history["train_loss"].gt(0).all()
    pd.testing.assert_frame_equal(history.drop(columns=["seconds", "samples_per_s"]),
                                  pd.read_csv(tmp_path / "split" / "metrics.csv").drop(
                                      columns=["seconds", "samples_per_s"]), atol=1e-5)
    finals = [torch.load(tmp_path / run_dir / "clip_model_final.pt", weights_only=True)
              for run_dir in ("straight", "split")]
    assert finals[0]["args"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in finals[0]["state_dict"])
    for key, value in finals[0]["state_dict"].items():
        assert torch.allclose(value, finals[1]["state_dict"][key], atol=1e-5), key
    last = torch.load(tmp_path / "split" / "clip_model_last.pt", weights_only=True)
    assert len(last["rng"]) == 2 and last["rng"][0]["caption_rng"] != last["rng"][1]["caption_rng"]
    # augmentations and dropout run in each process (--workers 0): each rank has its own stream
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])
    assert last["rng"][0]["python"] != last["rng"][1]["python"]


def test_torchrun_resume_is_bit_identical_on_images_where_crops_vary(large_splits, tmp_path):
    # 2 epochs straight against 1 + resume under torchrun (2 processes, gloo, --workers 0): each
    # rank draws its own crops (400x300 images against a 64 px input, so every draw counts) and
    # restores its own RNG state; the weights must match bit for bit.
    train_dir, val_dir = large_splits
    clip = [str(REPO_ROOT / "clip_train.py")]
    run(TORCHRUN + clip + ddp_argv(train_dir, val_dir, tmp_path / "straight", "--epochs", "2"), tmp_path)
    run(TORCHRUN + clip + ddp_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "1"), tmp_path)
    run(TORCHRUN + clip + ddp_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "2", "--resume", "auto"),
        tmp_path)
    finals = [torch.load(tmp_path / run_dir / "clip_model_final.pt", weights_only=True)["state_dict"]
              for run_dir in ("straight", "split")]
    assert max(float((finals[0][k] - finals[1][k]).abs().max()) for k in finals[0]) == 0.0
    assert list(pd.read_csv(tmp_path / "split" / "metrics.csv")["epoch"]) == [1, 2]


def test_two_processes_one_image_each_train_and_ssa_is_refused(make_cohort, tmp_path):
    # --batch-size 2 over 2 processes: one image per process, and still every step runs (the
    # skip is decided on the global batch). With locked image tower, checkpointing, WiSE-FT and
    # macro-F1 selection. Then --ssa under torchrun: refused before anything is written.
    import open_clip

    from orbital_clip import models
    train_dir = make_cohort("train", (2, 3, 3), seed=0)
    val_dir = make_cohort("val", (2, 2, 2), seed=1)
    save_dir = tmp_path / "run"
    run(TORCHRUN + [str(REPO_ROOT / "clip_train.py"), *ddp_argv(
        train_dir, val_dir, save_dir, "--batch-size", "2", "--epochs", "1", "--lock-image",
        "--grad-checkpointing", "--select-metric", "macro_f1", "--wise-ft-alphas", "0,0.5,1",
        "--recipe", "recommended", "--patience", "0")], tmp_path)
    history = pd.read_csv(save_dir / "metrics.csv")
    assert history["skipped_images"].tolist() == [0] and history["train_loss"].gt(0).all()
    models.register_model_config(TINY_CONFIG)
    torch.manual_seed(2024)  # the run's seed: the weights it started from
    initial, *_ = models.create_model("tiny_clip", None)
    final = torch.load(save_dir / "clip_model_final.pt", weights_only=True)["state_dict"]
    assert not torch.equal(initial.state_dict()["text_projection"], final["text_projection"])
    assert torch.equal(initial.state_dict()["visual.conv1.weight"], final["visual.conv1.weight"])  # locked
    model = open_clip.create_model("tiny_clip", pretrained=str(save_dir / "clip_model_epoch_best.pt"))
    assert torch.equal(model.state_dict()["text_projection"], torch.load(
        save_dir / "clip_model_epoch_best.pt", weights_only=True)["state_dict"]["text_projection"])

    ssa_dir = tmp_path / "ssa"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(TORCHRUN + [str(REPO_ROOT / "clip_train.py"), *ddp_argv(
        train_dir, val_dir, ssa_dir, "--ssa", "lr=1e-3,1e-4")], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not ssa_dir.exists()
    assert "--ssa runs its trials one after another" in result.stderr and "torchrun" in result.stderr


def test_global_batch_must_divide_by_processes(make_cohort, tmp_path):
    train_dir = make_cohort("train", (4, 4, 4), seed=0)
    cmd = TORCHRUN + [str(REPO_ROOT / "clip_train.py"), "--train-dir", str(train_dir), "--val-dir",
                      str(train_dir), "--save-dir", str(tmp_path / "run"), "--model-config",
                      str(TINY_CONFIG), "--batch-size", "7", "--epochs", "1", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--batch-size 7 is the global batch and must be divisible" in result.stderr
