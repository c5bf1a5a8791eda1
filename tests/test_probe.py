"""linear_probe.py: the probe's fit against scikit-learn, its C sweep, its refusals, and its
checkpoint scored by inference.py exactly as the probe computes it (as --checkpoint and as
--baseline)."""

import argparse
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from orbital_clip import checkpoint as ckpt
from orbital_clip import fewshot
from orbital_clip import probe
from orbital_clip import probe_fit
from orbital_clip import prompts
from orbital_clip import scoring
from orbital_clip.metrics import softmax
from orbital_clip.model_loading import PROBE_KEY, linear_head, resolve_checkpoint
from conftest import TINY_CONFIG, tree_state


def separable_features(n_per_class, n_classes, dim=8, seed=0, spread=0.6):
    """L2-normalised features of `n_classes` noisy directions, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_reproduces_scikit_learn_probabilities(n_classes):
    """The stored head, applied by model_loading's rule, gives LogisticRegression's predict_proba
    (two classes: sklearn keeps one row, the head two)."""
    x, y = separable_features(7, n_classes)
    weight, bias = probe_fit.fit_logistic(x, y, n_classes, c=2.0, seed=0)
    reference = LogisticRegression(C=2.0, class_weight="balanced", max_iter=2000).fit(x, y)
    assert weight.shape == (n_classes, x.shape[1]) and bias.shape == (n_classes,)
    np.testing.assert_allclose(softmax(probe.head_logits(x, weight, bias)),
                               reference.predict_proba(x), atol=1e-6)


def test_class_weights_are_balanced():
    """An imbalanced training set: the fit equals sklearn's with class_weight='balanced', not
    the unweighted one (whose probabilities lean to the large class)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.array([0] * 5 + [1] * 35)
    weight, bias = probe_fit.fit_logistic(x, y, 2, c=1.0, seed=0)
    balanced = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(x, y)
    plain = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    ours = softmax(probe.head_logits(x, weight, bias))
    np.testing.assert_allclose(ours, balanced.predict_proba(x), atol=1e-6)
    assert np.abs(ours - plain.predict_proba(x)).max() > 0.05


def test_fit_refuses_a_missing_class():
    x, y = separable_features(3, 2)
    with pytest.raises(ValueError, match=r"class index \[2\]"):
        probe_fit.fit_logistic(x, y, 3, c=1.0, seed=0)


def test_sweep_selects_the_best_validation_balanced_accuracy_then_the_lower_loss():
    """The selected row is the highest validation balanced accuracy, ties broken by the lower
    loss; its head is the one refitted at that C. Small C collapses to the prior here, so the
    choice is not the grid's first or last by accident."""
    x, y = separable_features(12, 3, seed=2, spread=1.2)
    vx, vy = separable_features(8, 3, seed=2, spread=1.2)
    fit = probe.sweep_c(x, y, vx, vy, 3, probe.C_GRID, seed=0)
    table = pd.DataFrame(fit.sweep)
    assert table["selected"].sum() == 1
    best = table[table["val_balanced_accuracy"] == table["val_balanced_accuracy"].max()]
    chosen = table[table["selected"]].iloc[0]
    assert chosen["val_loss"] == best["val_loss"].min()
    assert fit.c == chosen["c"]
    assert table["val_balanced_accuracy"].nunique() > 1  # the sweep really chose something
    weight, bias = probe_fit.fit_logistic(x, y, 3, fit.c, 0)
    np.testing.assert_allclose(fit.weight, weight)


def test_few_shot_draws_cap_at_what_a_class_holds():
    """k per class without replacement, all of a smaller class; seeded; 'all' takes everything."""
    labels = np.array([0, 0, 1, 1, 1, 2, 1, 0])
    index, per_class = fewshot.draw_few_shot(labels, "2", 3, np.random.default_rng(0))
    assert per_class == [2, 2, 1] and len(set(index)) == 5
    assert np.bincount(labels[index], minlength=3).tolist() == [2, 2, 1]
    again, _ = fewshot.draw_few_shot(labels, "2", 3, np.random.default_rng(0))
    np.testing.assert_array_equal(index, again)
    everything, per_class = fewshot.draw_few_shot(labels, "all", 3, np.random.default_rng(1))
    assert everything.tolist() == list(range(8)) and per_class == [3, 4, 1]


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "x.pt", "--pretrained", "none"], "give one"),
    ([], "give --checkpoint PATH"),
    (["--pretrained", "none", "--c-grid", "1", "0"], "--c-grid"),
    (["--pretrained", "none", "--target-sensitivity", "1.5"], "--target-sensitivity"),
    (["--pretrained", "none", "--few-shot", "1", "2"], "--few-shot needs --test-dir"),
    (["--pretrained", "none", "--few-shot", "0"], "--few-shot"),
])
def test_parse_args_refuses(splits, tmp_path, extra, message, capsys):
    train, val = splits
    with pytest.raises(SystemExit) as exit_info:
        probe.parse_args(["--train-dir", str(train), "--val-dir", str(val),
                          "--out-dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def probe_argv(train, val, out_dir, *extra):
    """A tiny-model probe on random-init features (seeded), fp32."""
    return ["--train-dir", str(train), "--val-dir", str(val), "--out-dir", str(out_dir),
            "--model-config", str(TINY_CONFIG), "--pretrained", "none", "--precision", "fp32",
            "--workers", "0", "--no-progress", "--c-grid", "0.1", "10", "1000", *extra]


@pytest.mark.slow
def test_refused_out_dir_writes_nothing(splits, tmp_path, capsys):
    train, val = splits
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = tree_state(out)
    assert probe.main(probe_argv(train, val, out)) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert tree_state(out) == before


@pytest.mark.slow
def test_probe_checkpoint_is_scored_by_inference_as_the_probe_computes(
        splits, make_cohort, checkpoint, tmp_path):
    """linear_probe.py -> inference.py --checkpoint (and --baseline): predictions.csv holds
    scikit-learn's probabilities of a probe refitted here at the selected C on the same frozen
    features, in folder order; without the head hook inference would score the prompts."""
    train, val = splits
    test = make_cohort("test", (3, 4, 3), seed=5)
    out = tmp_path / "probe"
    assert probe.main(probe_argv(train, val, out, "--few-shot", "1", "8", "all", "--draws", "2",
                                 "--test-dir", str(test))) == 0
    record = ckpt.read_checkpoint(out / probe.PROBE_NAME)
    sweep = pd.read_csv(out / "c_sweep.csv")
    assert list(sweep["c"]) == [0.1, 10.0, 1000.0] and sweep["selected"].sum() == 1
    assert record.extra[PROBE_KEY]["c"] == sweep.loc[sweep["selected"], "c"].iloc[0]
    assert record.operating_point["class"] == record.class_folders[0]

    args = probe.parse_args(probe_argv(train, val, out))
    args.device, args.precision = torch.device("cpu"), "fp32"
    frozen = probe.load_frozen_model(args)
    folders = record.class_folders
    train_items, _val_items = probe.load_split_items(args, folders)
    train_x, train_y = probe.split_features(frozen, train_items, args, "--train-dir")
    reference = LogisticRegression(C=record.extra[PROBE_KEY]["c"], class_weight="balanced",
                                   max_iter=2000).fit(train_x, train_y)
    test_items = probe.load_split_items(argparse.Namespace(train_dir=test, val_dir=test), folders)[0]
    test_x, _ = probe.split_features(frozen, test_items, args, "--test-dir")
    expected = pd.DataFrame(reference.predict_proba(test_x), columns=[f"prob_{f}" for f in folders])
    expected["path"] = [str(p.relative_to(test)) for p, _label in test_items]

    run = tmp_path / "eval"
    assert scoring.main(["--test-dir", str(test), "--checkpoint", str(out / probe.PROBE_NAME),
                         "--out-dir", str(run), "--precision", "fp32", "--bootstrap", "0",
                         "--no-figures", "--no-progress", "--workers", "0"]) == 0
    predicted = pd.read_csv(run / "predictions.csv").merge(expected, on="path", suffixes=("", "_ref"))
    assert len(predicted) == len(test_items)
    for folder in folders:
        np.testing.assert_allclose(predicted[f"prob_{folder}"], predicted[f"prob_{folder}_ref"], atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["operating_threshold_source"] == "validation"

    # few-shot: zero-shot once, 2 draws of k 1 and 8 (class 0 has 6: capped), 'all' once, and
    # the 'all' probe is the checkpoint's (the same test balanced accuracy as inference reports)
    curves = pd.read_csv(out / "fewshot.csv", dtype={"k": str})
    assert list(curves["k"]) == ["0", "1", "1", "8", "8", "all"]
    assert list(curves["k_per_class"][1:]) == ["1 1 1", "1 1 1", "6 8 8", "6 8 8", "6 12 9"]
    assert list(curves["capped"]) == [False, False, False, True, True, False]
    assert curves["test_balanced_accuracy"].iloc[-1] == pytest.approx(metrics["balanced_accuracy"])
    assert (out / "fewshot.png").stat().st_size > 1000

    both = tmp_path / "vs_probe"  # the probe as --baseline of a fine-tuned checkpoint: comparison rows
    assert scoring.main(["--test-dir", str(test), "--checkpoint", str(checkpoint), "--baseline",
                         str(out / probe.PROBE_NAME), "--out-dir", str(both), "--precision", "fp32",
                         "--bootstrap", "0", "--no-figures", "--no-progress", "--workers", "0"]) == 0
    baseline = pd.read_csv(both / "baseline_predictions.csv").merge(expected, on="path", suffixes=("", "_ref"))
    np.testing.assert_allclose(baseline[f"prob_{folders[0]}"], baseline[f"prob_{folders[0]}_ref"], atol=1e-5)
    assert (pd.read_csv(both / "comparison.csv")["model"] == f"baseline {out / probe.PROBE_NAME}").any()


def test_a_damaged_head_is_refused_naming_the_file(tmp_path, tiny_model):
    """A probe entry whose head does not fit the classes is a CheckpointError, not a wrong score."""
    classes = prompts.load_prompt_set(None)
    record = ckpt.CheckpointRecord(state_dict=tiny_model.state_dict(), model_name="tiny_clip",
                                   class_folders=prompts.class_folders(classes),
                                   extra={PROBE_KEY: {"weight": torch.zeros(2, 64), "bias": torch.zeros(2)}})
    path = tmp_path / "bad_probe.pt"
    ckpt.write_checkpoint(path, record)
    with pytest.raises(ckpt.CheckpointError, match="bad_probe.pt"):
        linear_head(resolve_checkpoint(str(path)))


@pytest.mark.slow
def test_local_dir_probe_needs_no_folder_at_inference(splits, make_cohort, tmp_path):
    """A probe of a local-dir: model records its architecture: inference scores the checkpoint
    after the folder is gone, with the same probabilities as before."""
    from test_model_sources import write_model_folder
    train, val = splits
    test = make_cohort("test", (2, 2, 2), seed=5)
    write_model_folder(tmp_path / "model")
    spec = f"local-dir:{tmp_path / 'model'}"
    out = tmp_path / "probe"
    argv = probe_argv(train, val, out)
    argv[argv.index("--model-config"):argv.index("--model-config") + 4] = [
        "--model-name", spec, "--pretrained", spec]
    assert probe.main(argv) == 0
    runs = []
    for name in ("with_folder", "without_folder"):
        if name == "without_folder":
            shutil.rmtree(tmp_path / "model")
        assert scoring.main(["--test-dir", str(test), "--checkpoint", str(out / probe.PROBE_NAME),
                             "--out-dir", str(tmp_path / name), "--precision", "fp32", "--bootstrap",
                             "0", "--no-figures", "--no-progress", "--workers", "0"]) == 0
        runs.append(pd.read_csv(tmp_path / name / "predictions.csv"))
    prob = [c for c in runs[0].columns if c.startswith("prob_")]
    np.testing.assert_allclose(runs[0][prob], runs[1][prob], atol=1e-6)


@pytest.mark.slow
def test_help_runs_as_a_script():
    import subprocess
    import sys
    from conftest import REPO_ROOT
    done = subprocess.run([sys.executable, "linear_probe.py", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--c-grid" in done.stdout and "--few-shot" in done.stdout


def write_probe_checkpoint(path, model, seed=0):
    """A linear-probe checkpoint of the tiny model (published classes), its head drawn at random
    with large weights so the classes' probabilities differ clearly, as linear_probe.py writes it."""
    from conftest import tiny_metadata, write_model_checkpoint
    generator = torch.Generator().manual_seed(seed)
    head = {"weight": 5 * torch.randn(3, 64, generator=generator, dtype=torch.float64),
            "bias": torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)}
    folders = prompts.class_folders(prompts.load_prompt_set(None))
    return write_model_checkpoint(path, model, tiny_metadata(
        operating_point={"class": folders[0], "target_sensitivity": 0.9, "threshold": 0.3},
        temperature=1.5, **{PROBE_KEY: head}))


def score_argv(test, checkpoint, out, *extra):
    return ["--test-dir", str(test), "--checkpoint", str(checkpoint), "--out-dir", str(out),
            "--precision", "fp32", "--bootstrap", "0", "--no-figures", "--no-progress",
            "--workers", "0", *extra]


@pytest.mark.slow
def test_probe_scores_do_not_move_with_the_prompts_class_order(make_cohort, tiny_model, tmp_path):
    """--prompts with the probe's classes in reverse order: each class keeps its own head row
    (matched by name), so every probability and metric is the one of the checkpoint's order;
    another class set is refused, exit 2, naming --prompts."""
    test = make_cohort("test", (3, 4, 3), seed=5)
    probe_ck = write_probe_checkpoint(tmp_path / "probe.pt", tiny_model)
    published = prompts.prompt_set_to_dict(prompts.load_prompt_set(None))
    reversed_set = dict(published, classes=published["classes"][::-1])
    (tmp_path / "reversed.json").write_text(json.dumps(reversed_set))
    assert scoring.main(score_argv(test, probe_ck, tmp_path / "own")) == 0
    assert scoring.main(score_argv(test, probe_ck, tmp_path / "rev", "--prompts",
                                   str(tmp_path / "reversed.json"))) == 0
    own, rev = (pd.read_csv(tmp_path / name / "predictions.csv") for name in ("own", "rev"))
    prob = [c for c in own.columns if c.startswith("prob_")]
    assert np.abs(own[prob[0]] - own[prob[-1]]).min() > 0.01  # a swap of the two would show
    np.testing.assert_allclose(own[prob], rev[prob], atol=1e-9)
    assert list(own["pred_label"]) == list(rev["pred_label"])
    own_m, rev_m = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("own", "rev"))
    assert rev_m["balanced_accuracy"] == pytest.approx(own_m["balanced_accuracy"])
    for key in ("operating_threshold", "temperature", "rare_class"):  # calibration kept, by name
        assert rev_m[key] == own_m[key] is not None, key
    assert rev_m["operating_point"]["rule"] == own_m["operating_point"]["rule"]

    two = dict(published, classes=published["classes"][:2])
    (tmp_path / "two.json").write_text(json.dumps(two))
    assert scoring.main(score_argv(test, probe_ck, tmp_path / "two", "--prompts",
                                   str(tmp_path / "two.json"))) == 2
    assert not (tmp_path / "two").exists()


@pytest.mark.slow
def test_wise_ft_of_a_probe_is_refused(make_cohort, tiny_model, tmp_path, capsys):
    """A probe's tower is frozen: WiSE-FT would interpolate it with itself; exit 2, nothing written."""
    test = make_cohort("test", (2, 2, 2), seed=5)
    probe_ck = write_probe_checkpoint(tmp_path / "probe.pt", tiny_model)
    for extra in (["--wise-ft-alphas", "0", "1"],
                  ["--wise-ft-alphas", "0.5", "--wise-ft-base", str(probe_ck)]):
        assert scoring.main(score_argv(test, probe_ck, tmp_path / "wise", *extra)) == 2
        assert (f"--wise-ft-alphas: {probe_ck} is a linear-probe checkpoint (frozen tower); "
                "WiSE-FT does not apply") in capsys.readouterr().err
        assert not (tmp_path / "wise").exists()


@pytest.mark.slow
def test_probe_of_a_checkpoint_takes_its_classes_and_prompts(make_cohort, tiny_model, tmp_path):
    """linear_probe.py --checkpoint CK of a 2-class checkpoint (its own class order and prompts):
    the probe has CK's classes in CK's order (rare class = CK's first) and CK's prompts, and the
    few-shot zero-shot row is inference's score of CK itself, not of the published prompts."""
    from conftest import tiny_metadata, write_model_checkpoint
    published = prompts.prompt_set_to_dict(prompts.load_prompt_set(None))
    by_folder = {c["folder"]: c for c in published["classes"]}
    own = dict(published, classes=[dict(by_folder["healthy eyes"], eval=["a photo of a normal eye"]),
                                   dict(by_folder["orbital disease"], eval=["a photo of a bulging eye"])])
    folders = ["healthy eyes", "orbital disease"]
    ck = write_model_checkpoint(tmp_path / "two.pt", tiny_model, tiny_metadata(
        class_folders=folders, prompts=own))
    dirs = {}
    for name, counts, seed in (("train", (6, 8, 1), 0), ("val", (3, 4, 1), 1), ("test", (3, 4, 1), 2)):
        dirs[name] = make_cohort(name, counts, seed)
        shutil.rmtree(dirs[name] / "non-orbital disease")  # a cohort of CK's two classes
    out = tmp_path / "probe"
    argv = probe_argv(dirs["train"], dirs["val"], out, "--few-shot", "all", "--test-dir", str(dirs["test"]))
    argv[argv.index("--model-config"):argv.index("--model-config") + 4] = ["--checkpoint", str(ck)]
    assert probe.main(argv) == 0
    record = ckpt.read_checkpoint(out / probe.PROBE_NAME)
    assert list(record.class_folders) == folders and record.operating_point["class"] == "healthy eyes"
    assert [c["eval"] for c in record.prompts["classes"]] == [["a photo of a normal eye"],
                                                                ["a photo of a bulging eye"]]
    assert scoring.main(score_argv(dirs["test"], ck, tmp_path / "zero_shot")) == 0
    zero_shot = json.loads((tmp_path / "zero_shot" / "metrics.json").read_text())
    curves = pd.read_csv(out / "fewshot.csv", dtype={"k": str})
    row = curves[curves["method"] == "zero-shot"].iloc[0]
    assert row["test_balanced_accuracy"] == pytest.approx(zero_shot["balanced_accuracy"])
    assert row["test_macro_auroc"] == pytest.approx(zero_shot["macro_auroc"])
