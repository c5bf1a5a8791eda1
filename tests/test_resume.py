"""Exact resume (issue 26): 1 + 1 epochs resumed equal 2 straight, bit for bit, on a cohort whose
augmentation draws really vary (images well above the tiny model's 64 px input, so every
RandomResizedCrop draw changes the crop), at --workers 0 and 2 and after a Ctrl-C; and
--resume-with-changes, where each changed flag takes effect or is refused by name."""

import math

import pandas as pd
import pytest
import torch

from orbital_clip import checkpoint as ckpt
from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from orbital_clip.train import loop as train_loop
from orbital_clip.train import runner as train_runner
from conftest import train_argv, write_large_splits


def weights(save_dir, name=train_checkpoints.FINAL_NAME):
    return ckpt.read_checkpoint(save_dir / name).state_dict


def max_abs_difference(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_each_epoch_starts_from_the_same_random_state_after_a_resume(large_splits, tmp_path, monkeypatch):
    # Validation must not draw from the global generator between the RNG snapshot and the next
    # epoch (its DataLoader drew its base seed there): a resume would start epoch 2 from another
    # state, and with --workers 0 the augmentations of the main process follow it.
    train_dir, val_dir = large_splits
    real_epoch, states = train_loop.train_one_epoch, []

    def recording(model, loader, state, ctx):
        states.append((state["epoch"], torch.get_rng_state().clone()))
        return real_epoch(model, loader, state, ctx)

    monkeypatch.setattr(train_loop, "train_one_epoch", recording)
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "straight")) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "1")) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--resume", "auto")) == 0
    (straight_epoch_2,), (resumed_epoch_2,) = [[s for e, s in states[i:j] if e == 1]
                                               for i, j in ((0, 2), (3, 4))]
    assert torch.equal(straight_epoch_2, resumed_epoch_2)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_is_bit_identical_on_images_where_crops_vary(large_splits, tmp_path, workers):
    train_dir, val_dir = large_splits
    extra = ("--workers", workers)
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "straight", *extra)) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "1", *extra)) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--resume", "auto", *extra)) == 0
    assert max_abs_difference(weights(tmp_path / "straight"), weights(tmp_path / "split")) == 0.0


@pytest.mark.slow
def test_resume_after_ctrl_c_in_epoch_2_is_bit_identical(large_splits, tmp_path, monkeypatch, capsys):
    train_dir, val_dir = large_splits
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "straight", "--epochs", "3")) == 0
    real_step = train_loop.accumulate_gradients
    calls = {"n": 0}

    def interrupted_in_epoch_2(*args, **kwargs):  # 27 images, batch 16: 2 steps per epoch
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "accumulate_gradients", interrupted_in_epoch_2)
    save_dir = tmp_path / "split"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "3")) != 0
    assert "--resume auto" in capsys.readouterr().err
    monkeypatch.setattr(train_loop, "accumulate_gradients", real_step)
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "3", "--resume", "auto")) == 0
    assert max_abs_difference(weights(tmp_path / "straight"), weights(save_dir)) == 0.0
    assert list(pd.read_csv(save_dir / "metrics.csv")["epoch"]) == [1, 2, 3]


# -- --resume-with-changes: each changed flag takes effect or is refused by name -------------------

def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_changes_a_resume_cannot_apply_are_refused_by_name_before_anything_is_written(splits, tmp_path,
                                                                                      capsys):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1")) == 0
    before = file_bytes(save_dir)
    for change in (("--select-metric", "balanced_accuracy"), ("--lock-image",)):
        capsys.readouterr()
        code = train_cli.main(train_argv(train_dir, val_dir, save_dir, "--resume", "auto",
                                         "--resume-with-changes", *change))
        err = capsys.readouterr().err
        assert code == 2 and f"{change[0]} (" in err and "cannot change on resume" in err
        assert "Traceback" not in err and file_bytes(save_dir) == before


@pytest.mark.slow
def test_changed_batch_size_continues_the_schedule_and_weight_decay_is_applied(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    common = ("--schedule", "cosine", "--warmup", "0")
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--batch-size", "8",
                                     *common)) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--resume", "auto", "--resume-with-changes",
                                     "--weight-decay", "0.5", *common)) == 0
    lr = pd.read_csv(save_dir / "metrics.csv").set_index("epoch")["lr"]
    # 27 images: 4 steps at batch 8 (epoch 1), then 2 per epoch at batch 16: epoch 2 runs steps
    # 2 and 3 of 4 (not 4 and 5, past the end of the cosine: lr 0); the last step's lr is logged
    assert lr[2] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 3 / 4)))
    groups = ckpt.read_checkpoint(save_dir / train_checkpoints.LAST_NAME).resume.optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


@pytest.mark.slow
def test_a_changed_patience_on_an_early_stopped_run_is_refused_by_name(splits, tmp_path, capsys):
    # lr 1e-12 leaves the weights (and the validation accuracy) unchanged: patience 1 stops the
    # run after epoch 2. A larger --patience would be recorded and then ignored (nothing to train).
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "5", "--patience", "1", "--lr", "1e-12")
    assert train_cli.main(argv) == 0
    assert ckpt.read_checkpoint(save_dir / train_checkpoints.LAST_NAME).resume.stopped
    before = file_bytes(save_dir)
    capsys.readouterr()
    assert train_cli.main(argv + ["--patience", "4", "--resume", "auto", "--resume-with-changes"]) == 2
    err = capsys.readouterr().err
    assert "--patience (1 -> 4) cannot change on resume" in err and "already stopped early" in err
    assert "Traceback" not in err and file_bytes(save_dir) == before


# -- property: N epochs straight equal k + resume + (N - k), whatever the short schedule -------------

@pytest.mark.slow
def test_k_epochs_then_a_resume_equal_n_straight_for_random_short_schedules(tmp_path_factory):
    # The run of N epochs is interrupted (Ctrl-C) right after epoch k's checkpoint, as a user's
    # would be, so its schedule (cosine, a percentage warmup) is the N-epoch one throughout.
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    train_dir, val_dir = write_large_splits(tmp_path_factory.mktemp("large"))
    runs = iter(range(1000))
    real_end_of_epoch = train_loop.end_of_epoch

    @settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.generate],  # no shrinking:
              suppress_health_check=[HealthCheck.too_slow])  # each example trains three runs
    @given(n_epochs=st.integers(2, 3), data=st.data(), batch=st.sampled_from(["8", "16"]),
           schedule=st.sampled_from(["const", "cosine"]), warmup=st.sampled_from(["0", "2", "20%"]),
           workers=st.sampled_from(["0", "2"]))
    def check(n_epochs, data, batch, schedule, warmup, workers):
        k = data.draw(st.integers(1, n_epochs - 1), label="k")
        root = tmp_path_factory.mktemp(f"run{next(runs)}")
        argv = [*train_argv(train_dir, val_dir, root / "split", "--batch-size", batch, "--schedule", schedule,
                            "--warmup", warmup, "--workers", workers), "--epochs", str(n_epochs)]

        def interrupted_after_k(model, ctx, state, *rest):
            result = real_end_of_epoch(model, ctx, state, *rest)
            if state["epoch"] == k:
                raise KeyboardInterrupt
            return result

        straight = [a if a != str(root / "split") else str(root / "straight") for a in argv]
        assert train_cli.main(straight) == 0
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_loop, "end_of_epoch", interrupted_after_k)
            assert train_cli.main(argv) == train_runner.EXIT_INTERRUPTED
        # resumed with every flag repeated at its old value, as a user repeating the command does
        assert train_cli.main(argv + ["--resume", "auto", "--resume-with-changes"]) == 0
        assert max_abs_difference(weights(root / "straight"), weights(root / "split")) == 0.0
        straight, split = (pd.read_csv(root / name / "metrics.csv") for name in ("straight", "split"))
        assert list(split["epoch"]) == list(range(1, n_epochs + 1))
        assert list(split["lr"]) == list(straight["lr"]) and list(split["train_loss"]) == list(straight["train_loss"])

    check()
