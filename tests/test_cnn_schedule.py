"""The CNN baseline's epoch loop seen through its outputs (issue 27): one 3-epoch run whose best
epoch is scripted to be epoch 2 (not the last), with --class-weights, and the test cohort the
validation cohort, so that predictions.csv holds the best checkpoint's probabilities on exactly
the images val_loss was computed on. Tests read the run; none trains its own."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

from orbital_clip.cnn import main as train_cnn_main
from conftest import write_cohorts

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]
PROB_COLUMNS = [f"prob_{folder}" for folder in FOLDERS]
EPOCHS, BATCH, LR = 3, 4, 1e-3
SCRIPTED_SCORES = [0.5, 0.9, 0.4]  # validation balanced accuracy per epoch: best is epoch 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn_schedule")
    write_cohorts(root, train=(2, 5, 3), val=(2, 4, 3))
    save_dir = root / "run"
    argv = ["--train-dir", str(root / "train"), "--val-dir", str(root / "val"),
            "--test-dir", str(root / "val"), "--save-dir", str(save_dir), "--arch", "resnet18",
            "--weights", "none", "--image-size", "32", "--batch-size", str(BATCH), "--lr", str(LR),
            "--epochs", str(EPOCHS), "--class-weights", "--workers", "0", "--no-progress"]
    scores = iter(SCRIPTED_SCORES)
    with pytest.MonkeyPatch.context() as patch:
        # the selection score is looked up by name in the module that main comes from
        patch.setattr(sys.modules[train_cnn_main.__module__], "selection_score",
                      lambda y_true, y_pred: next(scores))
        assert train_cnn_main(argv) == 0
    return save_dir


def test_lr_column_follows_a_cosine_over_all_steps(run):
    """lr at the start of epoch e is LR * (1 + cos(pi * steps done / all steps)) / 2: it decays
    to 0 once, at the end of the last epoch (T_max in epochs would reach 0 after 3 steps and
    climb back)."""
    history = pd.read_csv(run / "metrics.csv")
    steps_per_epoch = math.ceil(10 / BATCH)  # 10 training images
    total = EPOCHS * steps_per_epoch
    expected = [LR * (1 + math.cos(math.pi * (e - 1) * steps_per_epoch / total)) / 2
                for e in range(1, EPOCHS + 1)]
    np.testing.assert_allclose(history["lr"].to_numpy(), expected, rtol=1e-6)
    assert (np.diff(history["lr"].to_numpy()) < 0).all()


def test_best_epoch_is_not_the_last_and_predictions_come_from_it(run):
    history = pd.read_csv(run / "metrics.csv")
    assert history["val_balanced_accuracy"].tolist() == SCRIPTED_SCORES
    assert history["is_best"].tolist() == [True, True, False]
    # predictions.csv is the val cohort under the best weights: its loss and accuracy are
    # epoch 2's, not epoch 3's (the weights changed in epoch 3: lr > 0 throughout it).
    best, last = history.iloc[1], history.iloc[2]
    assert best["val_loss"] != pytest.approx(last["val_loss"], rel=1e-6)
    frame = pd.read_csv(run / "predictions.csv")
    y_true = frame["true_label"].map(FOLDERS.index).to_numpy()
    probs = frame[PROB_COLUMNS].to_numpy(dtype=float)
    weights = np.array(json.loads((run / "args.json").read_text())["run"]["class_weights"])
    picked = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None))
    weighted = (weights[y_true] * picked).sum() / weights[y_true].sum()
    assert weighted == pytest.approx(best["val_loss"], rel=1e-4)
    assert (probs.argmax(axis=1) == y_true).mean() == pytest.approx(best["val_accuracy"])


def test_class_weights_are_balanced_and_val_loss_uses_them(run):
    """--class-weights: n / (C * count) recorded, and val_loss the weighted cross-entropy of the
    saved predictions (the unweighted mean differs on this imbalanced validation cohort)."""
    weights = json.loads((run / "args.json").read_text())["run"]["class_weights"]
    np.testing.assert_allclose(weights, 10 / (3 * np.array([2, 5, 3])))
    history = pd.read_csv(run / "metrics.csv")
    frame = pd.read_csv(run / "predictions.csv")
    y_true = frame["true_label"].map(FOLDERS.index).to_numpy()
    probs = frame[PROB_COLUMNS].to_numpy(dtype=float)
    unweighted = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean()
    assert unweighted != pytest.approx(history.iloc[1]["val_loss"], rel=1e-4)
