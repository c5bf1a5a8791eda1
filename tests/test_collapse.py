"""Training that went wrong says so (issue 26, defects 10 and 11): known answers of the collapse
signs, and a tiny run made to collapse (--lr 1) against a healthy one (--lr 1e-3)."""

import math

import pandas as pd
import pytest

from orbital_clip.train import cli as train_cli
from orbital_clip.train.card import run_warnings
from orbital_clip.train.health import (NONFINITE_STOP_STEPS, chance_loss, collapse_signs, nonfinite_signs,
                                       should_stop_nonfinite)
from conftest import TINY_CONFIG


def test_chance_loss_weights_the_last_smaller_batch_by_its_images():
    assert chance_loss(18, 8) == pytest.approx((16 * math.log(8) + 2 * math.log(2)) / 18)
    assert chance_loss(16, 8) == pytest.approx(math.log(8))
    assert chance_loss(17, 8) == pytest.approx(16 * math.log(8) / 17)  # a batch of one: loss 0


def test_collapse_signs_need_every_one_of_the_last_epochs():
    chance = math.log(8)
    healthy = {"train_loss": 1.5, "predicted_classes": 3, "temperature": 1.2}
    collapsed = {"train_loss": chance * 1.01, "predicted_classes": 1, "temperature": math.exp(4)}
    assert collapse_signs([healthy] * 3, chance) == []
    assert collapse_signs([healthy, collapsed, collapsed, collapsed], chance) == [
        "loss_at_chance", "one_predicted_class", "temperature_at_bound"]
    assert collapse_signs([collapsed, healthy, collapsed, collapsed], chance) == []
    assert collapse_signs([{**collapsed, "temperature": math.exp(-4)}], chance)[-1] == "temperature_at_bound"


def test_skipped_non_finite_steps_stop_the_run_in_a_row_or_for_a_whole_epoch():
    assert NONFINITE_STOP_STEPS == 5
    assert not should_stop_nonfinite(4, 10, 4, epoch_over=False)
    assert should_stop_nonfinite(5, 10, 5, epoch_over=False)
    assert not should_stop_nonfinite(0, 10, 9, epoch_over=True)  # one finite step: the epoch trained
    assert should_stop_nonfinite(2, 2, 2, epoch_over=True)  # a short epoch with no finite step
    assert not should_stop_nonfinite(0, 0, 0, epoch_over=True)  # no step ran (every batch unreadable)
    # from the first epoch that skipped a step on, so the last row still says so
    assert nonfinite_signs([{"nonfinite_steps": 0}, {"nonfinite_steps": 1}, {"nonfinite_steps": 0}]) == [
        "non_finite_steps"]
    assert nonfinite_signs([{"nonfinite_steps": 0}, {}]) == []


def test_a_best_epoch_blind_to_the_rare_class_is_named():
    state = {"best_epoch": 2, "history": [{"epoch": 1, "rare_sensitivity": 0.5, "collapse": ""},
                                          {"epoch": 2, "rare_sensitivity": 0.0, "collapse": ""}]}
    assert len(run_warnings(state)) == 1 and "best epoch (2)" in run_warnings(state)[0]
    state["best_epoch"] = 1
    assert run_warnings(state) == []


@pytest.mark.slow
@pytest.mark.parametrize("lr, collapses", [("1", True), ("1e-3", False)])
def test_a_collapsed_run_warns_in_log_last_line_metrics_and_card(make_cohort, tmp_path, capsys, lr, collapses):
    train_dir, val_dir = make_cohort("train", (4, 8, 6), seed=0), make_cohort("val", (2, 4, 3), seed=1)
    out = tmp_path / "run"
    assert train_cli.main(["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--out-dir", str(out),
                           "--model-config", str(TINY_CONFIG), "--lr", lr, "--batch-size", "8",
                           "--epochs", "3", "--workers", "0", "--no-progress", "--precision", "fp32"]) == 0
    log = capsys.readouterr().err.splitlines()  # main() logs to stderr itself
    last = [line for line in log if " clip_train: == done" in line][-1]
    history = pd.read_csv(out / "metrics.csv", keep_default_na=False)
    card = (out / "MODEL_CARD.md").read_text()
    if collapses:
        assert "one_predicted_class" in history["collapse"].iloc[-1]
        assert "WARNING collapse: one_predicted_class" in last and "--balanced-sampling" in last
        assert "one_predicted_class" in card
        assert any("clip_train: epoch 3: collapse: one_predicted_class" in line for line in log)
    else:
        assert (history["collapse"] == "").all() and history["predicted_classes"].min() > 1
        assert "WARNING collapse" not in last and "collapse:" not in card
    best = history[history["is_best"].astype(str) == "True"].iloc[-1]  # defect 11: named when blind
    assert (f"the best epoch ({best['epoch']}) finds no rare-class" in last) == (float(best["rare_sensitivity"]) == 0)
