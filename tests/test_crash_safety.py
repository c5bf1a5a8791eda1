"""Crash safety of clip_train.py: SIGKILL at several moments (one of them while a checkpoint is
being written) never leaves a broken checkpoint, and --resume auto then finishes the run with the
same weights as an uninterrupted one. A read-only save folder fails cleanly."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from orbital_clip.train import cli as train_cli
from conftest import REPO_ROOT, TINY_CONFIG

EPOCHS = 6


def argv(train_dir, val_dir, save_dir, *extra):
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir", str(save_dir),
            "--model-config", str(TINY_CONFIG), "--lr", "1e-3", "--batch-size", "16",
            "--epochs", str(EPOCHS), "--workers", "0", "--no-progress", "--precision", "fp32", *extra]


def start(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "clip_train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(process, condition, timeout_s=120):
    """SIGKILL the process as soon as condition() holds; False if it ended first."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    process.wait()
    return False


def writing_checkpoint(save_dir):
    return lambda: any(p.name.startswith(".clip_model") and p.name.endswith(".tmp")
                       for p in save_dir.glob(".*.tmp"))


def test_sigkill_anywhere_then_resume_matches_a_straight_run(make_cohort, tmp_path):
    train_dir = make_cohort("train", (6, 12, 9), seed=0)
    val_dir = make_cohort("val", (3, 6, 4), seed=1)
    straight = tmp_path / "straight"
    # Every run in a subprocess with one thread: the same float reduction order throughout.
    assert start(argv(train_dir, val_dir, straight), tmp_path).wait() == 0

    save_dir = tmp_path / "killed"
    moments = [writing_checkpoint(save_dir),  # in the middle of a checkpoint write
               lambda: (save_dir / "clip_model_last.pt").exists(),  # between epochs
               writing_checkpoint(save_dir)]
    kills = 0
    for i, moment in enumerate(moments):
        process = start(argv(train_dir, val_dir, save_dir, *(["--resume", "auto"] if i else [])), tmp_path)
        kills += kill_when(process, moment)
        for name in ("clip_model_last.pt", "clip_model_epoch_best.pt"):
            if (save_dir / name).exists():  # whatever exists is complete and loadable
                torch.load(save_dir / name, weights_only=True)
    assert kills >= 2  # the run was really interrupted, not just restarted
    assert start(argv(train_dir, val_dir, save_dir, "--resume", "auto"), tmp_path).wait() == 0

    history = pd.read_csv(save_dir / "metrics.csv")
    assert list(history["epoch"]) == list(range(1, EPOCHS + 1))
    a = torch.load(straight / "clip_model_final.pt", weights_only=True)["state_dict"]
    b = torch.load(save_dir / "clip_model_final.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_full_disk_keeps_previous_checkpoints_and_names_the_path(make_cohort, tmp_path, monkeypatch, capsys):
    import errno

    from orbital_clip import outputs
    train_dir, val_dir = make_cohort("train", (4, 4, 4), seed=0), make_cohort("val", (2, 2, 2), seed=1)
    save_dir = tmp_path / "run"
    assert train_cli.main(argv(train_dir, val_dir, save_dir, "--epochs", "1")) == 0
    before = {n: (save_dir / n).read_bytes() for n in ("clip_model_last.pt", "clip_model_epoch_best.pt")}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full_disk)
    code = train_cli.main(argv(train_dir, val_dir, save_dir, "--epochs", "2", "--resume", "auto"))
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and str(save_dir) in err and "No space left" in err
    for name, data in before.items():
        assert (save_dir / name).read_bytes() == data
    assert not list(save_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_ctrl_c_during_wise_ft_says_resume_auto_and_that_completes_the_run(make_cohort, tmp_path,
                                                                           monkeypatch, capsys):
    """A Ctrl-C in the WiSE-FT step after the last epoch (issue 26, defect 8): the message names
    `--resume auto`, and that command runs the step without training another epoch."""
    from orbital_clip.train import runner
    train_dir, val_dir = make_cohort("train", (4, 4, 4), seed=0), make_cohort("val", (2, 2, 2), seed=1)
    save_dir = tmp_path / "run"
    run_argv = argv(train_dir, val_dir, save_dir, "--epochs", "1", "--wise-ft-alphas", "0.5", "1")
    real_wise_ft = runner.choose_wise_ft_alpha

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "choose_wise_ft_alpha", interrupted)
    assert train_cli.main(run_argv) == runner.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "WiSE-FT" in err and "--resume auto" in err and "nothing to resume" not in err
    assert not (save_dir / "wise_ft_validation.csv").exists()

    monkeypatch.setattr(runner, "choose_wise_ft_alpha", real_wise_ft)
    assert train_cli.main(runner_resume := [*run_argv, "--resume", "auto"]) == 0, runner_resume
    assert pd.read_csv(save_dir / "metrics.csv")["epoch"].tolist() == [1]  # no epoch trained again
    assert pd.read_csv(save_dir / "wise_ft_validation.csv")["alpha"].tolist() == [0.5, 1.0]
    assert torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)["wise_ft"]["chosen_alpha"] in (0.5, 1.0)
    assert (save_dir / "MODEL_CARD.md").exists()
