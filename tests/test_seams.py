"""The seams between tested functions, and four option combinations that once failed.

Each test here was checked by planting the bug it names (a mutant: the wrong class column, `>`
for `>=`, a count that overwrites instead of adding, ...) and seeing the test fail; the
expected values come from a hand computation or a reference library, never from the function
under test. `make mutate` runs this file with test_metrics.py and test_report.py."""

import json
import random
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from orbital_clip.train import loop as train_loop
from orbital_clip.train import sampling as train_sampling
from orbital_clip import checkpoint as ckpt
from orbital_clip import images
from orbital_clip import models
from orbital_clip import zero_shot
from orbital_clip import split as data_preprocess
from orbital_clip.split import allocate
from orbital_clip import scoring as inference
from orbital_clip import metrics
from orbital_clip import report
from conftest import TINY_CONFIG, TINY_MODEL
from conftest import write_model_checkpoint


def train_argv(train_dir, val_dir, save_dir, *extra):
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir", str(save_dir),
            "--model-config", str(TINY_CONFIG), "--lr", "1e-3", "--batch-size", "16",
            "--epochs", "1", "--workers", "0", "--no-progress", *extra]


def wilson(k, n):
    """statsmodels' Wilson interval: the reference for metrics.wilson_interval."""
    return list(proportion_confint(k, n, alpha=0.05, method="wilson"))


# -- metrics.py: the rules that connect the pure functions ----------------------------------------

def test_the_threshold_rule_includes_a_probability_equal_to_the_threshold():
    probs = np.array([[.30, .50, .20], [.29, .50, .21], [.10, .20, .70]])
    assert metrics.rule_predictions(probs, 0, 0.30).tolist() == [0, 1, 2]  # >=, not >
    op = metrics.operating_point_metrics(np.array([0, 0, 2]), probs, 0, 0.30)
    assert (op["rule"]["tp"], op["rule"]["fn"]) == (1, 1)


def test_the_rule_confusion_matrix_is_the_rules_not_argmax():
    probs = np.array([[.30, .60, .10], [.10, .80, .10], [.25, .70, .05], [.05, .15, .80],
                      [.50, .30, .20]])
    y_true = np.array([0, 0, 1, 2, 1])
    # rule at 0.2 predicts [0, 1, 0, 2, 0]; argmax predicts [1, 1, 1, 2, 0]
    op = metrics.operating_point_metrics(y_true, probs, 0, 0.2)
    assert op["confusion_matrix"] == [[1, 1, 0], [2, 0, 0], [0, 0, 1]]


def test_intention_to_diagnose_sensitivity_ci_counts_only_rare_images():
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, -1, 1, 1, 1, -1, 2, 2, 0, 2])
    itd = metrics.intention_to_diagnose(y_true, y_pred, 0)
    assert itd["itd_rare_sensitivity"] == pytest.approx(1 / 3)
    assert itd["itd_rare_sensitivity_ci"] == pytest.approx(wilson(1, 3))  # n = 3 rare, not 10
    assert itd["itd_accuracy_ci"] == pytest.approx(wilson(6, 10))


def paired_case(seed=0, n=60):
    """Labels, a good model and a poor one (argmax right ~90% vs ~40% of the time)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    good = np.full((n, 3), 0.1)
    good[np.arange(n), np.where(rng.random(n) < 0.9, y_true, (y_true + 1) % 3)] = 0.8
    poor = np.full((n, 3), 0.1)
    poor[np.arange(n), np.where(rng.random(n) < 0.4, y_true, (y_true + 2) % 3)] = 0.8
    return y_true, good, poor


def compare(y_true, ours, other, **kwargs):
    """compare_predictions of `other` against `ours` (probabilities), rows by metric."""
    result = metrics.compare_predictions(
        y_true, metrics.ComparedModel("ours", ours.argmax(axis=1), ours),
        [metrics.ComparedModel("other", other.argmax(axis=1), other)], **kwargs)
    return {row["metric"]: row for row in result["rows"]}


def test_comparison_bootstrap_p_value_is_two_sided():
    y_true, good, poor = paired_case()
    forward = compare(y_true, good, poor, n_bootstrap=300, seed=1)
    backward = compare(y_true, poor, good, n_bootstrap=300, seed=1)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        # a two-sided p is the same whichever model is named first, and small for a clear gap
        assert forward[name]["p_bootstrap"] == pytest.approx(backward[name]["p_bootstrap"])
        assert forward[name]["p_bootstrap"] < 0.05
        assert forward[name]["difference"] == pytest.approx(-backward[name]["difference"])
    # the point estimates are each model's own (sklearn), and their difference (ours - model)
    assert forward["accuracy"]["reference_value"] == pytest.approx(accuracy_score(y_true, good.argmax(axis=1)))
    assert forward["accuracy"]["value"] == pytest.approx(accuracy_score(y_true, poor.argmax(axis=1)))
    assert forward["accuracy"]["difference"] == pytest.approx(
        forward["accuracy"]["reference_value"] - forward["accuracy"]["value"])


def test_comparison_resamples_patient_groups():
    # 10 patients of 4 images; each model is right or wrong on a whole patient at once, so the
    # patient (cluster) bootstrap is wider than one that treats the 40 images as independent.
    n = 40
    y_true = np.arange(n) % 3
    patient = np.arange(n) // 4
    groups = [f"p{k}" for k in patient]

    def model(right_patients):
        probs = np.full((n, 3), 0.1)
        right = np.isin(patient, right_patients)
        probs[np.arange(n), np.where(right, y_true, (y_true + 1) % 3)] = 0.8
        return probs

    good, poor = model(range(7)), model(range(4))
    kwargs = dict(n_bootstrap=400, seed=3)
    grouped = compare(y_true, good, poor, groups=groups, **kwargs)["accuracy"]
    single = compare(y_true, good, poor, **kwargs)["accuracy"]
    # our model's interval is that of metrics.json with the same groups and seed
    reference = metrics.compute_metrics(y_true, good, ["a", "b", "c"], groups=groups, **kwargs)
    assert grouped["reference_ci"] == pytest.approx(reference["accuracy_ci"])
    width = [ci[1] - ci[0] for ci in (grouped["reference_ci"], single["reference_ci"])]
    assert width[0] > 1.5 * width[1]


def independent_temperature(logits, y_true):
    """The NLL minimiser over T in [0.01, 100] by a golden-section search on T itself (not log T),
    with the NLL written out here: an independent reference for metrics.fit_temperature."""
    def nll(t):
        return -log_softmax(logits / t, axis=1)[np.arange(len(y_true)), y_true].mean()
    return minimize_scalar(nll, bounds=(0.01, 100.0), method="bounded",
                           options={"xatol": 1e-8}).x


@pytest.mark.parametrize("true_temperature", [0.5, 3.0, 12.0])
def test_fit_temperature_equals_an_independent_minimiser(true_temperature):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 3)) * 2
    probs = np.exp(base) / np.exp(base).sum(1, keepdims=True)
    y_true = (rng.random((3000, 1)) > probs.cumsum(1)).sum(1)  # a draw from each row's softmax
    logits = base * true_temperature
    fitted = metrics.fit_temperature(logits, y_true)
    assert fitted == pytest.approx(independent_temperature(logits, y_true), rel=1e-3)
    assert fitted == pytest.approx(true_temperature, rel=0.1)  # and near the temperature planted


# -- report.py -----------------------------------------------------------------------------------

def test_flow_counts_add_failures_of_one_reason_in_one_class():
    folders = ["orbital disease", "healthy eyes", "non-orbital disease"]
    statuses = ["failed: truncated image (a)", "failed: truncated image (b)",
                "failed: truncated image (c)", "ok"]
    flow = report.flow_counts([1, 1, 1, 0], statuses, folders, labelled=True)
    assert flow["reasons"]["truncated image"] == {"orbital disease": 0, "healthy eyes": 3,
                                                  "non-orbital disease": 0}
    lines = report.flow_markdown(flow)
    assert "Reasons for exclusion: truncated image: 3 (healthy eyes 3)." in lines


# -- data_preprocess.py: group allocation ties ----------------------------------------------------

def split_sizes(assignment, unit_sizes):
    sizes = [0, 0, 0]
    for key, split in assignment.items():
        sizes[split] += unit_sizes[key]
    return sizes


def test_group_allocation_ties_serve_the_smaller_split_while_it_has_room():
    # Largest unit first. {a:1, b:3}, quotas (2, 2): b ties (deficit 2 and 2) -> val, the smaller
    # split; a -> train (deficit 2 vs -1). Preferring train on ties gives (3, 1) instead.
    units = {"a": 1, "b": 3}
    for seed in range(3):
        assert split_sizes(allocate.assign_units_to_splits(units, (2, 2, 0), random.Random(seed)),
                           units) == [1, 3, 0]
    # {a:1, b:3, c:3}, quotas (5, 2): 3 -> train (5 > 2); 3 ties (2, 2) -> val; 1 -> train.
    units = {"a": 1, "b": 3, "c": 3}
    for seed in range(3):
        assert split_sizes(allocate.assign_units_to_splits(units, (5, 2, 0), random.Random(seed)),
                           units) == [4, 3, 0]


# -- clip_train.py: validation, sampler, resume ----------------------------------------------------

def test_validation_metrics_use_the_rare_column_and_macro_averages(monkeypatch):
    """validate() with known logits: every selection metric against scikit-learn / a hand value."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, 0.0], [0.0, 2.0, 1.0], [0.2, 0.1, 2.0],
                           [1.0, 0.0, 0.5], [0.0, 1.0, 1.2], [0.3, 2.5, 0.0], [0.1, 0.0, 0.2]])
    labels = [0, 0, 1, 2, 1, 2, 1, 1]
    monkeypatch.setattr(zero_shot, "build_zero_shot_classifier", lambda *a: torch.zeros(2, 3))
    monkeypatch.setattr(zero_shot, "encode_image_batches",
                        lambda *a, **k: (torch.zeros(8, 2), torch.ones(8, dtype=torch.bool)))
    monkeypatch.setattr(zero_shot, "zero_shot_logits", lambda features, classifier, scale: logits.clone())
    monkeypatch.setattr(train_loop, "loss_scale", lambda model, mode: torch.tensor(1.0))
    loader = types.SimpleNamespace(dataset=types.SimpleNamespace(items=[(f"{i}.jpg", y) for i, y in enumerate(labels)]))
    args = types.SimpleNamespace(logit_scale_mode="exp", device="cpu", precision="fp32",
                                 target_sensitivity=1.0)
    ctx = {"args": args, "tokenizer": None, "classes": [types.SimpleNamespace(eval=["x"])] * 3}
    result = train_loop.validate(torch.nn.Linear(1, 1), loader, ctx)
    probs = logits.softmax(dim=1).numpy()
    y_true, y_pred = np.array(labels), probs.argmax(axis=1)
    assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert result["macro_f1"] != pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert result["macro_auroc"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr"))
    # target sensitivity 1: include the lower rare score (image 1, p0 = softmax([.5, 1.5, 0])[0]);
    # the threshold sits midway to the next lower p(rare) of any image.
    p_rare = probs[:, 0]
    below = p_rare[p_rare < p_rare[1]].max()
    assert result["operating_threshold"] == pytest.approx((p_rare[1] + below) / 2)
    assert result["val_loss"] == pytest.approx(
        -log_softmax(logits.numpy().astype(float), axis=1)[np.arange(8), y_true].mean())


def test_distributed_balanced_sampler_draws_a_new_order_each_epoch():
    weights = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    ranks = [train_sampling.DistributedBalancedSampler(weights, 12, rank, 2, seed=7) for rank in (0, 1)]
    orders = {}
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        orders[epoch] = [list(sampler) for sampler in ranks]
        # the reference: one global draw from (seed + epoch), dealt out to the ranks in turn
        draws = torch.multinomial(weights, 12, replacement=True,
                                  generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert orders[epoch] == [draws[0::2], draws[1::2]]
    assert orders[0] != orders[1]


@pytest.mark.slow
def test_resume_restores_the_step_so_warmup_and_cosine_continue(splits, tmp_path, monkeypatch):
    """An interrupted run (stopped after epoch 1 of 2) resumed: the learning rate of epoch 2 and
    the final weights equal a straight run's. With the step counter restarted at 0 the resumed
    epoch would warm up again (lr 1e-3 instead of the cosine's 5e-4 at its last step)."""
    train_dir, val_dir = splits
    schedule = ("--epochs", "2", "--schedule", "cosine", "--warmup", "2")  # 2 steps per epoch
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "straight", *schedule)) == 0
    real_end = train_loop.end_of_epoch

    def interrupted(*args, **kwargs):  # stop after the first epoch as a crash would
        metrics_row, _stop = real_end(*args, **kwargs)
        return metrics_row, True

    monkeypatch.setattr(train_loop, "end_of_epoch", interrupted)
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", *schedule)) == 0
    monkeypatch.setattr(train_loop, "end_of_epoch", real_end)
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", *schedule,
                                      "--resume", "auto")) == 0
    straight = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    resumed = pd.read_csv(tmp_path / "split" / "metrics.csv")
    # 4 steps, warmup 2: step 1 lr 1e-3 (2/2 of warmup), step 3 cosine halfway: 5e-4
    assert straight["lr"].tolist() == pytest.approx([1e-3, 5e-4])
    assert resumed["lr"].tolist() == pytest.approx([1e-3, 5e-4])
    a = torch.load(tmp_path / "straight" / train_checkpoints.FINAL_NAME, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / train_checkpoints.FINAL_NAME, weights_only=True)["state_dict"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


@pytest.fixture
def splits(make_cohort):
    return make_cohort("train", (6, 12, 9), seed=0), make_cohort("val", (3, 6, 4), seed=1)


# -- the four combinations of issue 19 -------------------------------------------------------------

@pytest.mark.slow
def test_two_class_prompts_train_and_a_relative_pretrained_file_is_recorded_absolute(
        make_cohort, tmp_path, monkeypatch, capsys):
    """--prompts with two classes trains and validates (macro AUROC is the binary AUROC), and a
    relative --pretrained is recorded as an absolute path with its SHA-256: inference's WiSE-FT
    finds it from another folder, and refuses a different file found at that path."""
    train_dir, val_dir = make_cohort("train", (6, 10, 0), seed=0), make_cohort("val", (4, 5, 0), seed=1)
    for root in (train_dir, val_dir):
        shutil.rmtree(root / "non-orbital disease", ignore_errors=True)
    prompts_file = tmp_path / "two.json"
    prompts_file.write_text(json.dumps({"classes": [
        {"folder": "orbital disease", "train": ["an orbit with disease"], "eval": ["orbital disease"]},
        {"folder": "healthy eyes", "train": ["healthy eyes"], "eval": ["no eye disease"]}]}))
    torch.manual_seed(3)
    model, *_ = models.create_model(TINY_MODEL, None)
    (tmp_path / "work").mkdir()
    torch.save(model.state_dict(), tmp_path / "work" / "base.pt")
    monkeypatch.chdir(tmp_path / "work")
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "run", "--prompts", str(prompts_file),
                                      "--pretrained", "base.pt", "--wise-ft-alphas", "0.5,1")) == 0
    best = torch.load(tmp_path / "run" / train_checkpoints.BEST_NAME, weights_only=True)
    assert best["pretrained"] == str(tmp_path / "work" / "base.pt")
    assert best["pretrained_sha256"] == images.file_sha256(tmp_path / "work" / "base.pt")
    assert best["class_folders"] == ["orbital disease", "healthy eyes"]
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert 0.0 <= history["macro_auroc"].iloc[0] <= 1.0  # defined for two classes

    test_dir = make_cohort("external", (3, 4, 0), seed=2)
    shutil.rmtree(test_dir / "non-orbital disease", ignore_errors=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    torch.save(model.state_dict(), tmp_path / "elsewhere" / "base.pt")  # same name, same bytes: unused
    out = tmp_path / "wise"
    argv = ["--test-dir", str(test_dir), "--checkpoint", str(tmp_path / "run" / train_checkpoints.BEST_NAME),
            "--workers", "0", "--bootstrap", "0", "--no-progress", "--no-figures",
            "--wise-ft-alpha", "0", "--output-dir", str(out)]
    assert inference.main(argv) == 0
    assert json.loads((out / "wise_ft_alpha_0" / "metrics.json").read_text())["n"] == 7
    # a different file at the recorded path: refused, naming the flag and the fix
    torch.manual_seed(4)
    other, *_ = models.create_model(TINY_MODEL, None)
    torch.save(other.state_dict(), tmp_path / "work" / "base.pt")
    capsys.readouterr()
    assert inference.main(argv[:-1] + [str(tmp_path / "wise2")]) == 2
    err = capsys.readouterr().err
    assert "not the file training started from" in err and "--wise-ft-base" in err
    assert not (tmp_path / "wise2").exists()


def fold_manifest(make_cohort, tmp_path):
    """A 3-fold manifest of a cohort with 2 rare images: fold 2 has none (data_preprocess allows it)."""
    cohort = make_cohort("cohort", (2, 6, 6), seed=0)
    assert data_preprocess.main(["--data-root", str(cohort), "--out-dir", str(tmp_path / "cv"),
                                 "--folds", "3", "--no-progress"]) == 0
    manifest = tmp_path / "cv" / "manifest.csv"
    frame = pd.read_csv(manifest)
    rare_folds = set(frame.loc[frame["label"] == "orbital disease", "fold"])
    (empty,) = {0, 1, 2} - rare_folds
    return manifest, empty


@pytest.mark.parametrize("metric", ["macro_auroc", "rare_sensitivity"])
def test_a_fold_without_the_rare_class_refuses_an_undefined_select_metric(make_cohort, tmp_path, capsys,
                                                                          metric):
    manifest, fold = fold_manifest(make_cohort, tmp_path)
    save_dir = tmp_path / "run"
    code = train_cli.main(train_argv(manifest, manifest, save_dir, "--fold", str(fold),
                                      "--select-metric", metric, "--patience", "1",
                                      "--wise-ft-alphas", "0.5,1", "--epochs", "2"))
    assert code == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"--fold {fold}" in err and f"--select-metric {metric}" in err and "orbital disease" in err
    assert not save_dir.exists()  # refused before anything is written


@pytest.mark.slow
def test_a_metric_undefined_at_validation_time_still_keeps_a_best_checkpoint(make_cohort, tmp_path, capsys):
    """The validation folder has a rare image, but it is unreadable: rare sensitivity is NaN at
    every epoch. The run keeps the first epoch as best (with a warning), WiSE-FT still runs."""
    train_dir, val_dir = make_cohort("train", (6, 12, 9), seed=0), make_cohort("val", (0, 3, 3), seed=1)
    (val_dir / "orbital disease").mkdir(exist_ok=True)
    (val_dir / "orbital disease" / "broken.jpg").write_bytes(b"not an image")
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--select-metric", "rare_sensitivity",
                                      "--patience", "1", "--wise-ft-alphas", "0.5,1")) == 0
    best = torch.load(save_dir / train_checkpoints.BEST_NAME, weights_only=True)
    assert best["epoch"] == 1
    assert (save_dir / "wise_ft_validation.csv").exists()
    assert "validation rare_sensitivity is undefined" in capsys.readouterr().err


def inference_argv(test_dir, checkpoint, out, *extra):
    return ["--test-dir", str(test_dir), "--checkpoint", str(checkpoint), "--output-dir", str(out),
            "--workers", "0", "--bootstrap", "0", "--no-progress", "--no-figures", *extra]


@pytest.mark.slow
def test_inference_overwrite_leaves_exactly_one_runs_outputs(make_cohort, tmp_path):
    torch.manual_seed(0)
    model, *_ = models.create_model(TINY_MODEL, None)
    classes = __import__("prompts").load_prompt_set(None)
    checkpoint = tmp_path / "ck.pt"
    write_model_checkpoint(checkpoint, model, {
        "model_name": TINY_MODEL, "model_config": json.loads(TINY_CONFIG.read_text()),
        "pretrained": None, "class_folders": [c.folder for c in classes],
        "prompts": __import__("prompts").prompt_set_to_dict(classes), "epoch": 1, "metrics": {},
        "args": {}, "logit_scale_mode": "exp"})
    torch.manual_seed(1)
    base, *_ = models.create_model(TINY_MODEL, None)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    test_dir = make_cohort("external", (2, 2, 2), seed=1)
    out = tmp_path / "out"
    wise = ("--wise-ft-alpha", "0", "1", "--wise-ft-base", str(tmp_path / "base.pt"))

    def files():
        return sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    assert inference.main(inference_argv(test_dir, checkpoint, out)) == 0
    plain_files = files()
    (out / "my_notes.txt").write_text("the user's own file")
    assert inference.main(inference_argv(test_dir, checkpoint, out, "--overwrite", *wise)) == 0
    assert "predictions.csv" not in files() and "metrics.json" not in files()
    assert {"wise_ft_alpha_0", "wise_ft_alpha_1", "wise_ft_summary.csv"} <= set(files())
    # a WiSE-FT run with fewer alphas: the old alpha's folder goes too
    assert inference.main(inference_argv(test_dir, checkpoint, out, "--overwrite",
                                         "--wise-ft-alpha", "1", "--wise-ft-base", str(tmp_path / "base.pt"))) == 0
    assert not (out / "wise_ft_alpha_0").exists()
    assert inference.main(inference_argv(test_dir, checkpoint, out, "--overwrite")) == 0
    assert files() == sorted(plain_files + ["my_notes.txt"])
    assert (out / "my_notes.txt").read_text() == "the user's own file"
