"""inference.py: known-answer tests of the metric functions, argument checks, and real runs of the
tiny model on synthetic cohorts (checkpoint kinds, failed images, unlabelled folders, manifests and
groups, the validation operating point and temperature, baseline comparison, the embedding cache,
WiSE-FT, anonymised outputs). More metric tests: test_metrics.py."""

import argparse
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report,
                             confusion_matrix, f1_score, roc_auc_score)
from statsmodels.stats.proportion import proportion_confint

from orbital_clip import checkpoint as ckpt
from orbital_clip import cli
from orbital_clip import images as image_io
from orbital_clip import model_loading
from orbital_clip import models
from orbital_clip import zero_shot
from orbital_clip import evaluation
from orbital_clip import scoring as inference
from orbital_clip import metrics
from orbital_clip import prompts
from orbital_clip import report
from conftest import REPO_ROOT, TINY_CONFIG, TINY_MODEL, tiny_metadata
from conftest import write_model_checkpoint

from benchmarks import evaluation_speed

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]


class NotWeights:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self):
        self.payload = "anything"


def run_inference(test_dir, checkpoint, output_dir, *extra, figures=False):
    argv = ["--test-dir", str(test_dir), "--checkpoint", str(checkpoint), "--output-dir",
            str(output_dir), "--workers", "0", "--bootstrap", "50", "--no-progress", *extra]
    return inference.main(argv + ([] if figures else ["--no-figures"]))


def exit_code(*argv):
    """main's return value, or the code of the SystemExit argparse raises."""
    try:
        return run_inference(*argv)
    except SystemExit as exit_info:
        return exit_info.code


def error_lines(stderr):
    """The `error: ...` lines of stderr (the log lines of the run go there too)."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def read_predictions(output_dir):
    return pd.read_csv(output_dir / "predictions.csv", keep_default_na=False, na_values=[""])


def prob_columns(folders=FOLDERS):
    return [f"prob_{folder}" for folder in folders]


# -- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--bootstrap", "-1"], "--bootstrap"),
    (["--workers", "-2"], "--workers"),
    (["--precision", "fp8"], "--precision"),
])
def test_parse_args_rejects(cohort, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.parse_args(["--test-dir", str(cohort), "--checkpoint", "x.pt", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_missing_test_dir_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        inference.parse_args(["--test-dir", str(tmp_path / "nowhere"), "--checkpoint", "x.pt"])
    assert "--test-dir" in capsys.readouterr().err


def test_parse_args_defaults(cohort):
    args = inference.parse_args(["--test-dir", str(cohort), "--checkpoint", "x.pt"])
    assert (args.output_dir, args.batch_size, args.bootstrap, args.seed) == (
        "inference_results", 64, 2000, 2024)
    assert args.workers == cli.default_workers(args.device) and args.model_name is None


# -- real runs ------------------------------------------------------------------------------------

def test_metrics_equal_sklearn_recomputed_from_predictions(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (3, 12, 7), seed=1)
    out = tmp_path / "results"
    assert run_inference(test_dir, checkpoint, out) == 0
    frame = read_predictions(out)
    assert len(frame) == 22 and (frame["status"] == "ok").all()
    y_true = frame["true_label"].map(FOLDERS.index).to_numpy()
    y_pred = frame["pred_label"].map(FOLDERS.index).to_numpy()
    probs = frame[prob_columns()].to_numpy()
    assert np.array_equal(probs.argmax(axis=1), y_pred)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    result = json.loads((out / "metrics.json").read_text())
    assert (result["n"], result["n_failed"], result["n_received"]) == (22, 0, 22)
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0))
    aurocs = [roc_auc_score(y_true == k, probs[:, k]) for k in range(3)]
    assert result["macro_auroc"] == pytest.approx(np.mean(aurocs))
    for k, folder in enumerate(FOLDERS):
        stats = result["per_class"][folder]
        assert stats["support"] == [3, 12, 7][k]
        assert stats["auroc"] == pytest.approx(aurocs[k])
        positives = y_true == k
        sensitivity = (y_pred[positives] == k).mean()
        assert stats["sensitivity"] == pytest.approx(sensitivity)
        assert stats["sensitivity_ci"] == pytest.approx(list(proportion_confint(
            int((y_pred[positives] == k).sum()), int(positives.sum()), method="wilson")))
        assert stats["specificity"] == pytest.approx((y_pred[~positives] != k).mean())
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        assert len(result[f"{name}_ci"]) == 2 and result[f"{name}_ci"][0] <= result[f"{name}_ci"][1]
    assert result["checkpoint_sha256"] == image_io.file_sha256(checkpoint)
    assert result["checkpoint"] == str(checkpoint)
    assert (result["model_name"], result["class_folders"]) == (TINY_MODEL, FOLDERS)
    assert (result["bootstrap"], result["seed"]) == (50, 2024)
    assert result["prompts"]["classes"][0]["eval"] == ["orbital disease"]
    # the tables hold the values recomputed here, not merely some bytes
    assert (out / "classification_report.txt").read_text() == classification_report(
        y_true, y_pred, labels=[0, 1, 2], target_names=FOLDERS, digits=3, zero_division=0)
    cm = pd.read_csv(out / "confusion_matrix.csv")
    assert cm["true_label"].tolist() == FOLDERS
    assert cm[FOLDERS].to_numpy().tolist() == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    per_class = pd.read_csv(out / "per_class_metrics.csv")
    assert per_class["class"].tolist() == FOLDERS and per_class["support"].tolist() == [3, 12, 7]
    assert per_class["sensitivity"].tolist() == pytest.approx(
        [(y_pred[y_true == k] == k).mean() for k in range(3)])
    assert json.loads((out / "args.json").read_text())["script"] == "inference.py"
    report = (out / "report.md").read_text()
    assert image_io.file_sha256(checkpoint) in report and "confusion_matrix.png (not drawn)" in report  # --no-figures: no link
    assert "| orbital disease | 3 | 0 | 3 |" in report


@pytest.mark.slow
def test_rare_class_is_row_0_of_confusion_matrix_and_report(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (3, 12, 7), seed=1)
    out = tmp_path / "results"
    assert run_inference(test_dir, checkpoint, out) == 0
    frame = read_predictions(out)
    cm = pd.read_csv(out / "confusion_matrix.csv")
    assert list(cm.columns) == ["true_label", *FOLDERS]  # class order, not alphabetical
    assert list(cm["true_label"]) == FOLDERS
    expected = pd.crosstab(frame["true_label"], frame["pred_label"]).reindex(
        index=FOLDERS, columns=FOLDERS, fill_value=0)
    assert np.array_equal(cm[FOLDERS].to_numpy(), expected.to_numpy())
    assert cm[FOLDERS].to_numpy().sum(axis=1).tolist() == [3, 12, 7]
    rows = [line.split() for line in (out / "classification_report.txt").read_text().splitlines()
            if line.strip()]
    assert rows[1][:2] == ["orbital", "disease"] and rows[1][-1] == "3"  # row 0: the rare class
    assert rows[2][:2] == ["healthy", "eyes"] and rows[2][-1] == "12"


@pytest.mark.slow
def test_unreadable_image_is_a_failed_row_and_shifts_nothing(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (3, 5, 4), seed=1)
    clean_out, dirty_out = tmp_path / "clean", tmp_path / "dirty"
    assert run_inference(test_dir, checkpoint, clean_out, "--batch-size", "4") == 0
    (test_dir / "healthy eyes" / "x.jpg").write_bytes(np.random.default_rng(0).bytes(2048))
    assert run_inference(test_dir, checkpoint, dirty_out, "--batch-size", "4") == 0
    clean, dirty = read_predictions(clean_out), read_predictions(dirty_out)
    failed = dirty[dirty["status"] != "ok"]
    assert list(failed["path"]) == ["healthy eyes/x.jpg"]
    assert failed["status"].iloc[0].startswith("failed: ")
    assert failed[prob_columns()].isna().all(axis=None) and failed["pred_label"].isna().all()
    assert failed["true_label"].iloc[0] == "healthy eyes"
    merged = clean.merge(dirty, on="path", suffixes=("_clean", "_dirty"))
    assert len(merged) == len(clean) == len(dirty) - 1
    for column in prob_columns():
        assert np.allclose(merged[f"{column}_clean"], merged[f"{column}_dirty"], rtol=0, atol=1e-6)
    assert (merged["pred_label_clean"] == merged["pred_label_dirty"]).all()
    metrics = json.loads((dirty_out / "metrics.json").read_text())
    assert (metrics["n_failed"], metrics["n"], metrics["n_received"]) == (1, 12, 13)
    assert metrics["per_class"]["healthy eyes"]["support"] == 5
    assert "| healthy eyes | 6 | 1 | 5 |" in (dirty_out / "report.md").read_text()


def test_jfif_is_scored_and_heic_fails_with_its_reason_both_in_the_flow_table(make_cohort, checkpoint,
                                                                               tmp_path):
    test_dir = make_cohort("external", (3, 5, 4), seed=1)
    rare = test_dir / "orbital disease"
    source = sorted(rare.glob("*.jpg"))[0]
    (rare / "copy.jfif").write_bytes(source.read_bytes())  # a JPEG under the phone's name
    (rare / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (rare / "notes.csv").write_text("a,b\n")  # notes: no row
    (rare / ".hidden.jpg").write_bytes(source.read_bytes())  # hidden: no row
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out) == 0
    frame = read_predictions(out).set_index("path")
    assert len(frame) == 14  # 12 + .jfif + .heic
    assert frame.loc["orbital disease/copy.jfif", "status"] == "ok"
    assert frame.loc["orbital disease/phone.heic", "status"] == "failed: unsupported format (.heic)"
    original = frame.loc[f"orbital disease/{source.name}", prob_columns()].to_numpy(float)
    assert np.allclose(frame.loc["orbital disease/copy.jfif", prob_columns()].to_numpy(float), original)
    result = json.loads((out / "metrics.json").read_text())
    assert (result["n_received"], result["n_failed"], result["n"], result["itd_n"]) == (14, 1, 13, 14)
    assert result["flow"]["rows"]["orbital disease"] == {"received": 5, "unreadable": 1, "scored": 4}
    assert result["flow"]["reasons"] == {"unsupported format (.heic)": {
        "orbital disease": 1, "healthy eyes": 0, "non-orbital disease": 0}}
    assert result["per_class"]["orbital disease"]["support"] == 4
    # intention to diagnose: the .heic counts as a missed rare image
    assert result["itd_rare_sensitivity"] == pytest.approx(result["per_class"]["orbital disease"]["tp"] / 5)
    report_text = (out / "report.md").read_text()
    assert "| orbital disease | 5 | 1 | 4 |" in report_text
    assert "unsupported format (.heic): 1 (orbital disease 1)" in report_text


def test_no_readable_image_writes_the_reasons_and_exits_1(checkpoint, tmp_path, capsys):
    test_dir = tmp_path / "external"
    (test_dir / "healthy eyes").mkdir(parents=True)
    (test_dir / "healthy eyes" / "a.jpg").write_bytes(b"not a jpeg at all")
    (test_dir / "healthy eyes" / "b.png").write_bytes(b"")
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out) == 1
    (err,) = error_lines(capsys.readouterr().err)
    assert "none of the 2 images" in err
    frame = read_predictions(out)
    assert frame["status"].tolist() == ["failed: not an image (unrecognised content)",
                                        "failed: empty file (0 bytes)"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n"], metrics["n_failed"], metrics["accuracy"]) == (0, 2, None)


@pytest.mark.slow
def test_plain_state_dict_gives_identical_predictions(make_cohort, checkpoint, tiny_model, tmp_path,
                                                      capsys):
    test_dir = make_cohort("external", (2, 4, 3), seed=1)
    plain = tmp_path / "published_model.pt"
    torch.save(tiny_model.state_dict(), plain)
    assert run_inference(test_dir, checkpoint, tmp_path / "ours") == 0
    assert run_inference(test_dir, plain, tmp_path / "plain", "--model-name", TINY_MODEL) == 0
    # --model-config alone names the architecture (its stem)
    assert run_inference(test_dir, plain, tmp_path / "config", "--model-config", str(TINY_CONFIG)) == 0
    ours = read_predictions(tmp_path / "ours")
    for other in ("plain", "config"):
        frame = read_predictions(tmp_path / other)
        assert list(frame["path"]) == list(ours["path"])
        assert np.array_equal(frame[prob_columns()].to_numpy(), ours[prob_columns()].to_numpy())
    metrics = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert metrics["checkpoint_kind"] == "plain state_dict"
    capsys.readouterr()
    assert run_inference(test_dir, plain, tmp_path / "no_name") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert err.startswith("error: --model-name is required")


def test_stock_open_clip_loads_our_checkpoint(checkpoint, tiny_model):
    model, _train_tf, _val_tf = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(checkpoint))
    loaded = model.state_dict()
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("mode", ["exp", "published-log"])
@pytest.mark.slow
def test_probabilities_equal_a_zero_shot_computation_by_hand(make_cohort, tiny_model, tmp_path, mode):
    test_dir = make_cohort("external", (1, 1, 1), seed=2)
    path = tmp_path / "ckpt.pt"
    write_model_checkpoint(path, tiny_model, tiny_metadata(logit_scale_mode=mode))
    assert run_inference(test_dir, path, tmp_path / "out") == 0
    frame = read_predictions(tmp_path / "out")
    _model, _train_tf, preprocess, tokenizer = models.create_model(TINY_MODEL, None)
    tiny_model.eval()
    with torch.no_grad():
        text = tiny_model.encode_text(tokenizer(["orbital disease", "no eye disease",
                                                 "non-orbital disease"]), normalize=True)
        scale = tiny_model.logit_scale if mode == "published-log" else tiny_model.logit_scale.exp()
        for _index, row in frame.iterrows():
            image = preprocess(image_io.read_image(test_dir / row["path"]))[None]
            image_features = tiny_model.encode_image(image, normalize=True)
            expected = (scale * image_features @ text.T).softmax(dim=-1)[0].numpy()
            assert row[prob_columns()].to_numpy(dtype=float) == pytest.approx(expected, abs=1e-5)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["logit_scale_mode"] == mode


@pytest.mark.slow
def test_classes_are_matched_by_folder_name_not_order(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (2, 4, 3), seed=1)
    reversed_set = prompts.prompt_set_to_dict(list(reversed(prompts.load_prompt_set(None))))
    prompt_file = tmp_path / "reversed.json"
    prompt_file.write_text(json.dumps(reversed_set))
    assert run_inference(test_dir, checkpoint, tmp_path / "ours") == 0
    assert run_inference(test_dir, checkpoint, tmp_path / "rev", "--prompts", str(prompt_file)) == 0
    ours = read_predictions(tmp_path / "ours").sort_values("path").reset_index(drop=True)
    rev = read_predictions(tmp_path / "rev").sort_values("path").reset_index(drop=True)
    assert list(rev.columns[3:6]) == prob_columns(FOLDERS[::-1])
    assert (ours["true_label"] == rev["true_label"]).all()
    assert (ours["pred_label"] == rev["pred_label"]).all()
    assert np.allclose(ours[prob_columns()].to_numpy(), rev[prob_columns()].to_numpy(), atol=1e-6)
    cm = pd.read_csv(tmp_path / "rev" / "confusion_matrix.csv")
    assert list(cm["true_label"]) == FOLDERS[::-1]


def test_unlabelled_folder_is_predicted_not_scored(make_cohort, checkpoint, tmp_path):
    source = make_cohort("source", (1, 2, 1), seed=3)
    test_dir = tmp_path / "unlabelled"
    (test_dir / "batch_7").mkdir(parents=True)
    images = sorted(source.rglob("*.jpg"))
    for i, image in enumerate(images):
        target = test_dir / f"img_{i}.jpg" if i % 2 else test_dir / "batch_7" / f"img_{i}.jpg"
        target.write_bytes(image.read_bytes())
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out) == 0
    frame = read_predictions(out)
    assert len(frame) == len(images) and frame["true_label"].isna().all()
    assert set(frame["pred_label"]) <= set(FOLDERS) and (frame["status"] == "ok").all()
    assert not (out / "metrics.json").exists() and not (out / "confusion_matrix.csv").exists()
    assert "predicted, not scored" in (out / "report.md").read_text()


def test_unknown_folder_beside_class_folders_is_an_error(make_cohort, checkpoint, tmp_path, capsys):
    test_dir = make_cohort("external", (1, 2, 1), seed=1)
    (test_dir / "glaucoma").mkdir()
    assert run_inference(test_dir, checkpoint, tmp_path / "out") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "glaucoma" in err


def test_model_name_mismatch_is_an_error_naming_both(make_cohort, checkpoint, tmp_path, capsys):
    test_dir = make_cohort("external", (1, 2, 1), seed=1)
    assert run_inference(test_dir, checkpoint, tmp_path / "out", "--model-name", "ViT-B-32-256") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "ViT-B-32-256" in err and TINY_MODEL in err
    assert run_inference(test_dir, checkpoint, tmp_path / "out", "--model-name", TINY_MODEL) == 0


def test_existing_output_dir_needs_overwrite(make_cohort, checkpoint, tmp_path, capsys):
    test_dir = make_cohort("external", (1, 2, 1), seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run")
    capsys.readouterr()
    assert run_inference(test_dir, checkpoint, out) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert err.startswith("error: --output-dir")
    assert not (out / "predictions.csv").exists()
    assert run_inference(test_dir, checkpoint, out, "--overwrite") == 0
    assert (out / "metrics.json").exists() and (out / "notes.txt").exists()


@pytest.mark.parametrize("payload", [
    lambda: NotWeights(),
    lambda: {"state_dict": {}, "args": argparse.Namespace(lr=1e-3)},
])
def test_checkpoint_needing_arbitrary_unpickling_is_refused(make_cohort, tmp_path, capsys, payload):
    test_dir = make_cohort("external", (1, 1, 1), seed=1)
    path = tmp_path / "suspicious.pt"
    torch.save(payload(), path)
    assert run_inference(test_dir, path, tmp_path / "out", "--model-name", TINY_MODEL) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert str(path) in err and "refused" in err


@pytest.mark.parametrize("spec, message", [
    ("missing_model.pt", "no such checkpoint file"),
    ("laion400m_e32", "nor a pretrained tag of tiny_clip"),
])
def test_bad_checkpoint_spec_is_a_clear_error(make_cohort, tmp_path, capsys, spec, message):
    test_dir = make_cohort("external", (1, 1, 1), seed=1)
    assert run_inference(test_dir, spec, tmp_path / "out", "--model-name", TINY_MODEL) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert message in err


def test_weights_of_another_architecture_are_a_clear_error(make_cohort, tmp_path, capsys):
    test_dir = make_cohort("external", (1, 1, 1), seed=1)
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    assert run_inference(test_dir, path, tmp_path / "out", "--model-name", TINY_MODEL) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "do not fit architecture tiny_clip" in err


def test_help_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--help"])
    assert exit_info.value.code == 0 and "$ python inference.py" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_subprocess_run(make_cohort, checkpoint, tmp_path):
    script = str(REPO_ROOT / "inference.py")
    test_dir = make_cohort("external", (2, 3, 2), seed=1)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, script, "--test-dir", str(test_dir), "--checkpoint",
                          str(checkpoint), "--output-dir", str(out), "--workers", "0",
                          "--bootstrap", "20"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "metrics.json").read_text())["n"] == 7
    from PIL import Image
    for name in report.FIGURE_NAMES:  # figures are on by default: PNG at 300 dpi + vector PDF
        with Image.open(out / f"{name}.png") as image:
            assert image.info["dpi"][0] == pytest.approx(300, abs=1)
            assert image.width >= 3.0 * 300  # at least one journal column wide
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert "](roc_curves.png)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_checkpoint_of_clip_train_evaluates_with_its_own_metadata(make_cohort, tmp_path):
    from orbital_clip.train import cli as train_cli
    train_dir, val_dir = make_cohort("train", (4, 8, 6), seed=0), make_cohort("val", (2, 4, 3), seed=1)
    save_dir = tmp_path / "run"
    assert train_cli.main(["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir",
                            str(save_dir), "--model-config", str(TINY_CONFIG), "--pretrained", "none",
                            "--lr", "1e-3", "--batch-size", "16", "--epochs", "1", "--workers", "0",
                            "--no-progress"]) == 0
    test_dir = make_cohort("external", (2, 5, 3), seed=2)
    best = save_dir / "clip_model_epoch_best.pt"
    assert run_inference(test_dir, best, tmp_path / "out") == 0  # no --model-name, no --prompts
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["model_name"], metrics["class_folders"], metrics["n"]) == (TINY_MODEL, FOLDERS, 10)
    assert metrics["checkpoint_kind"] == "Orbital-CLIP checkpoint"


# -- the validation operating point and temperature ----------------------------------------------

OPERATING_POINT = {"class": "orbital disease", "target_sensitivity": 0.9, "threshold": 0.1,
                   "val_sensitivity": 0.9, "val_specificity": 0.4}


@pytest.fixture
def calibrated_checkpoint(tmp_path, tiny_model):
    """Our checkpoint with the rare-class threshold and temperature clip_train fits on validation."""
    path = tmp_path / "calibrated.pt"
    write_model_checkpoint(path, tiny_model, tiny_metadata(operating_point=dict(OPERATING_POINT),
                                                           temperature=2.0))
    return path


@pytest.fixture
def other_weights(tmp_path):
    """A plain state_dict of a differently initialised tiny model (a baseline / WiSE-FT base)."""
    torch.manual_seed(1)
    model, *_ = models.create_model(TINY_MODEL, None)
    path = tmp_path / "other.pt"
    torch.save(model.state_dict(), path)
    return path


def test_outputs_of_a_calibrated_checkpoint(make_cohort, calibrated_checkpoint, tmp_path):
    test_dir = make_cohort("external", (3, 12, 7), seed=1)
    out = tmp_path / "out"
    assert run_inference(test_dir, calibrated_checkpoint, out) == 0
    result = json.loads((out / "metrics.json").read_text())
    for name in metrics.OVERALL_METRICS:
        assert result[name] is not None and len(result[f"{name}_ci"]) == 2, name
    assert (result["ece_bins"], result["bootstrap_unit"], result["n_groups"]) == (10, "image", 22)
    frame = read_predictions(out)
    probs = frame[prob_columns()].to_numpy()
    # temperature divides the logits: softmax(z / T) = p^(1/T) / sum; the file keeps both
    expected_cal = probs ** 0.5 / (probs ** 0.5).sum(axis=1, keepdims=True)
    assert np.allclose(frame[[f"prob_cal_{f}" for f in FOLDERS]].to_numpy(), expected_cal, atol=1e-6)
    scaled = result["temperature_scaled"]
    assert (scaled["temperature"], scaled["source"]) == (2.0, "validation (clip_train.py)")
    y_true = frame["true_label"].map(FOLDERS.index).to_numpy()
    assert scaled["log_loss"] == pytest.approx(-np.log(expected_cal[np.arange(22), y_true]).mean())
    op = result["operating_point"]
    assert (op["threshold"], op["source"], op["class"]) == (0.1, "validation", "orbital disease")
    rule = probs[:, 0] >= 0.1
    rare = y_true == 0
    assert (op["rule"]["tp"], op["rule"]["fp"]) == (int((rule & rare).sum()), int((rule & ~rare).sum()))
    assert (op["argmax"]["tp"] + op["argmax"]["fn"]) == 3
    assert (frame["pred_label_threshold"] == "orbital disease").to_numpy().tolist() == rule.tolist()
    per_class = pd.read_csv(out / "per_class_metrics.csv")
    assert list(per_class["class"]) == FOLDERS
    assert {"prevalence", "lr_pos", "lr_neg_ci_low", "auprc", "auprc_baseline",
            "f1_ci_high"} <= set(per_class)
    assert per_class["auprc"].tolist() == pytest.approx(
        [result["per_class"][f]["auprc"] for f in FOLDERS])
    report = (out / "report.md").read_text()
    assert "0 = orbital disease, 1 = healthy eyes, 2 = non-orbital disease" in report
    assert "0.1000 (validation)" in report and "temperature: 2.0000" in report
    assert "| p ≥ 0.1000 |" in report and "| argmax |" in report
    assert "STARD 2015" in report and "TRIPOD+AI 2024" in report and "CLAIM 2024" in report
    assert "sklearn " in report and "open_clip " in report and "torch " in report
    assert "itd_accuracy" in result and result["itd_accuracy"] == pytest.approx(result["accuracy"])


@pytest.mark.slow
def test_operating_threshold_comes_from_validation_not_the_test_cohort(make_cohort, calibrated_checkpoint,
                                                                       tmp_path):
    first = make_cohort("external_a", (3, 12, 7), seed=1)
    second = make_cohort("external_b", (8, 2, 5), seed=4)
    for name, test_dir in (("a", first), ("b", second)):
        assert run_inference(test_dir, calibrated_checkpoint, tmp_path / name) == 0
    thresholds = [json.loads((tmp_path / name / "metrics.json").read_text())["operating_point"]
                  for name in ("a", "b")]
    assert [op["threshold"] for op in thresholds] == [0.1, 0.1]  # the cohort changed; it did not
    assert [op["source"] for op in thresholds] == ["validation", "validation"]
    assert run_inference(first, calibrated_checkpoint, tmp_path / "user", "--threshold", "0.5") == 0
    op = json.loads((tmp_path / "user" / "metrics.json").read_text())["operating_point"]
    assert (op["threshold"], op["source"]) == (0.5, "user (--threshold)")


@pytest.mark.slow
def test_another_softmax_drops_the_stored_threshold_and_temperature(make_cohort, calibrated_checkpoint,
                                                                   tmp_path, capsys):
    test_dir = make_cohort("external", (3, 6, 4), seed=1)
    same = prompts.prompt_set_to_dict(prompts.load_prompt_set(None))
    (tmp_path / "same.json").write_text(json.dumps(same))
    other = json.loads(json.dumps(same))
    other["classes"][0]["eval"] = ["an eye with an orbital mass"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    fewer = {"classes": same["classes"][:2]}  # another class set
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    runs = {"kept": [], "same_prompts": ["--prompts", str(tmp_path / "same.json")],
            "mode": ["--logit-scale-mode", "published-log"],
            "prompts": ["--prompts", str(tmp_path / "other.json")],
            "classes": ["--prompts", str(tmp_path / "fewer.json")],
            "mode_user": ["--logit-scale-mode", "published-log", "--threshold", "0.3"]}
    results = {}
    for name, extra in runs.items():
        capsys.readouterr()
        if name == "classes":  # a two-class cohort: the third folder removed
            test_dir = make_cohort("two", (3, 6, 1), seed=2)
            shutil.rmtree(test_dir / "non-orbital disease")
        assert run_inference(test_dir, calibrated_checkpoint, tmp_path / name, *extra) == 0
        results[name] = (json.loads((tmp_path / name / "metrics.json").read_text()),
                         (tmp_path / name / "report.md").read_text(),
                         [line for line in capsys.readouterr().err.splitlines() if "not applied" in line])
    for name in ("kept", "same_prompts"):
        result, _report, warnings = results[name]
        assert result["operating_threshold"] == 0.1 and result["temperature"] == 2.0 and not warnings
    for name, phrase in (("mode", "logit scale 'exp' (evaluated: 'published-log')"),
                         ("prompts", "other evaluation prompts"), ("classes", "classes [")):
        result, report_text, warnings = results[name]
        assert result["operating_point"] is None and result["temperature_scaled"] is None, name
        assert result["operating_threshold"] is None and result["temperature"] is None
        assert result["operating_threshold_source"].startswith("dropped: fitted on validation under")
        assert phrase in result["temperature_source"] and len(warnings) == 1, name
        assert "operating threshold: none (dropped: fitted on validation under" in report_text
    result, report_text, warnings = results["mode_user"]  # --threshold given: it is applied
    assert (result["operating_threshold"], result["operating_threshold_source"]) == (0.3, "user (--threshold)")
    assert result["temperature"] is None and "--threshold is applied" in warnings[0]


def test_no_stored_threshold_or_temperature_means_argmax_only(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (2, 4, 3), seed=1)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["operating_point"] is None and metrics["temperature_scaled"] is None
    assert "argmax only" in (out / "report.md").read_text()
    columns = read_predictions(out).columns
    assert "pred_label_threshold" not in columns and not any(c.startswith("prob_cal_") for c in columns)


def test_unreadable_image_is_in_the_flow_table_and_intention_to_diagnose(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (3, 5, 4), seed=1)
    (test_dir / "orbital disease" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_received"], metrics["n_failed"], metrics["n"]) == (13, 1, 12)
    flow = metrics["flow"]
    assert flow["rows"]["orbital disease"] == {"received": 4, "unreadable": 1, "scored": 3}
    assert flow["rows"]["total"] == {"received": 13, "unreadable": 1, "scored": 12}
    ((reason, by_class),) = flow["reasons"].items()
    assert by_class["orbital disease"] == 1 and reason in read_predictions(out).set_index("path").loc["orbital disease/broken.jpg", "status"]
    report = (out / "report.md").read_text()
    assert "| orbital disease | 4 | 1 | 3 |" in report and f"{reason}: 1" in report
    # intention to diagnose: the failure counts as an error of the rare class
    assert metrics["itd_accuracy"] == pytest.approx(metrics["accuracy"] * 12 / 13)
    rare = metrics["per_class"]["orbital disease"]
    assert metrics["itd_rare_sensitivity"] == pytest.approx(rare["tp"] / 4)
    assert "Intention-to-diagnose" in report


# -- manifests and patient groups ------------------------------------------------------------------

def write_manifest(root, val_every=4):
    """manifest.csv beside the class folders: every `val_every`-th image in split val, the rest
    test; two images per patient group."""
    rows = ["path,source,label,split,group,sha256"]
    for i, path in enumerate(sorted(root.rglob("*.jpg"))):
        rel = path.relative_to(root).as_posix()
        split = "val" if i % val_every == 0 else "test"
        rows.append(f"{rel},{rel},{path.parent.name},{split},P{i // 2:03d},")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


@pytest.mark.slow
def test_manifest_split_and_group_column_drive_a_cluster_bootstrap(make_cohort, checkpoint, tmp_path, capsys):
    manifest = write_manifest(make_cohort("splits", (4, 8, 6), seed=1))
    out = tmp_path / "out"
    assert run_inference(manifest, checkpoint, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n"], metrics["split"], metrics["bootstrap_unit"]) == (13, "test", "group")
    assert metrics["n_groups"] == 9 and metrics["group_source"] == "manifest group column"
    frame = read_predictions(out)
    assert frame["path"].str.endswith(".jpg").all() and frame["group"].str.startswith("P").all()
    assert run_inference(manifest, checkpoint, tmp_path / "val", "--split", "val") == 0
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["n"] == 5
    capsys.readouterr()
    assert run_inference(manifest, checkpoint, tmp_path / "train", "--split", "train") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "split 'train'" in err and "test, val" in err and "--split" in err
    assert not (tmp_path / "train").exists()


@pytest.mark.slow
def test_failure_analysis_shows_the_most_confident_errors_with_thumbnails(make_cohort, checkpoint,
                                                                           tmp_path):
    manifest = write_manifest(make_cohort("splits", (4, 8, 6), seed=1))
    out = tmp_path / "out"
    assert run_inference(manifest, checkpoint, out, "--failure-examples", "2") == 0
    frame = read_predictions(out)
    result = json.loads((out / "metrics.json").read_text())
    expected = []
    for k, folder in enumerate(FOLDERS):  # by hand from predictions.csv
        wrong = frame[(frame["true_label"] == folder) & (frame["pred_label"] != folder)]
        p_pred = [row[f"prob_{row['pred_label']}"] for _, row in wrong.iterrows()]
        order = np.argsort(-np.array(p_pred), kind="stable")[:2]
        expected += [(k, wrong["path"].iloc[i]) for i in order]
    rows = result["failure_analysis"]
    assert [(r["true"], r["file"]) for r in rows] == expected and expected
    report_text = (out / "report.md").read_text()
    assert "## Failure analysis" in report_text
    for row in rows:
        thumbnail = out / row["thumbnail"]
        with Image.open(thumbnail) as image:
            assert image.format == "PNG" and max(image.size) <= evaluation.THUMBNAIL_PX
        assert f"![error]({row['thumbnail']})" in report_text and f"`{row['file']}`" in report_text
    # patients in the flow table (the manifest names them)
    assert result["flow"]["rows"]["total"]["patients_received"] == result["n_groups"] == 9
    assert "## Flow of images and patients" in report_text
    assert run_inference(manifest, checkpoint, out, "--failure-examples", "0", "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["failure_analysis"] is None
    assert "## Failure analysis" not in (out / "report.md").read_text()
    assert not list((out / "failure_analysis").glob("*.png"))  # the earlier thumbnails removed


def test_group_regex_groups_images_by_file_name(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (3, 5, 4), seed=1)  # names like healthy_eyes_1_004.jpg
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--group-regex", r"^([a-z_]+)_\d+_") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["bootstrap_unit"], metrics["n_groups"]) == ("group", 3)
    assert set(read_predictions(out)["group"]) == {"orbital_disease", "healthy_eyes", "non_orbital_disease"}


def test_group_regex_searches_the_path_then_the_file_name_like_the_split(patient_cohort, checkpoint,
                                                                        tmp_path, capsys):
    """The rule of data_preprocess.py: '(Patient \\d+)' finds the patient folder (the file names,
    IMG_0001.JPG in every folder, name nobody); a regex that matches no image is refused."""
    out = tmp_path / "by_folder"
    assert run_inference(patient_cohort.root, checkpoint, out, "--group-regex", r"(Patient \d+)") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["bootstrap_unit"], metrics["n_groups"]) == ("group", 12)
    groups = dict(zip(read_predictions(out)["path"], read_predictions(out)["group"]))
    assert groups == patient_cohort.patient_of  # path -> 'Patient NNN', as the split would group
    capsys.readouterr()
    assert exit_code(patient_cohort.root, checkpoint, tmp_path / "none", "--group-regex", r"^(P\d+)_") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "--group-regex '^(P\\d+)_': grouped none of the 24 images" in err
    assert not (tmp_path / "none").exists()


def test_group_regex_on_a_manifest_groups_as_the_split_did(patient_cohort, checkpoint, tmp_path):
    """A manifest row is searched by its source path, as data_preprocess.py searched it: a regex
    anchored at the class folder finds the patient (not the split folder's class name)."""
    from orbital_clip import split as data_preprocess
    regex = r"^[^/]+/([^/]+)/"  # <class>/<patient>/... in the source; val/<class>/... in the copy
    split = tmp_path / "split"
    assert data_preprocess.main(["--data-root", str(patient_cohort.root), "--out-dir", str(split),
                                 "--val-ratio", "0.3", "--test-ratio", "0.3", "--group-regex", regex,
                                 "--no-progress"]) == 0
    manifest = pd.read_csv(split / "manifest.csv")
    val = manifest[manifest["split"] == "val"]
    out = tmp_path / "eval"
    assert run_inference(split / "manifest.csv", checkpoint, out, "--split", "val", "--group-regex", regex) == 0
    predicted = read_predictions(out)
    assert dict(zip(predicted["path"], predicted["group"])) == dict(zip(val["path"], val["group"]))
    assert set(val["group"]) <= set(patient_cohort.patient_of.values())  # patients, not classes
    assert json.loads((out / "metrics.json").read_text())["n_groups"] == val["group"].nunique()


def test_group_regex_that_makes_one_patient_of_all_is_refused(make_cohort, checkpoint, tmp_path, capsys):
    test_dir = make_cohort("external", (2, 3, 2), seed=1)  # every name is <class>_1_<k>.jpg
    assert exit_code(test_dir, checkpoint, tmp_path / "out", "--group-regex", r"_(\d)_") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "grouped all 7 images into one patient ('1')" in err and not (tmp_path / "out").exists()
    # a refusal under --anonymize-paths names no image and no group
    assert exit_code(test_dir, checkpoint, tmp_path / "out", "--group-regex", r"(P\d+)",
                     "--anonymize-paths") == 2
    err = capsys.readouterr().err
    assert "grouped none of the 7 images" in err and "_1_" not in err and ".jpg" not in err


@pytest.mark.slow
def test_patients_in_several_classes_are_warned(make_cohort, checkpoint, tmp_path, capsys):
    test_dir = make_cohort("external", (2, 3, 2), seed=1)  # <class>_1_000.jpg, _001, (_002)
    assert run_inference(test_dir, checkpoint, tmp_path / "out", "--group-regex", r"_(\d{3})\.") == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "more than one class" in line]
    assert "2 patient(s) have images in more than one class, e.g. '000'" in warning
    assert run_inference(test_dir, checkpoint, tmp_path / "anon", "--group-regex", r"_(\d{3})\.",
                         "--anonymize-paths") == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "more than one class" in line]
    assert "e.g." not in warning


@pytest.mark.slow
def test_a_class_of_one_patient_or_one_image_is_warned(make_cohort, checkpoint, tmp_path, capsys):
    """The class-stratified bootstrap never varies a class that rests on one unit: its intervals
    are too narrow, which the log says (here a regex that names the class, not the patient, and a
    class of one image); --bootstrap 0 has nothing to warn about."""
    test_dir = make_cohort("external", (2, 3, 2), seed=1)
    assert run_inference(test_dir, checkpoint, tmp_path / "out", "--group-regex", r"^([a-z_]+)_\d") == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "rests on" in line]
    assert ("each of the classes 'orbital disease' (2 images), 'healthy eyes' (3 images), "
            "'non-orbital disease' (2 images) rests on one patient") in warning
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["accuracy_ci"][0] == metrics["accuracy_ci"][1]  # what the warning is about
    assert run_inference(test_dir, checkpoint, tmp_path / "plain") == 0
    assert "rests on" not in capsys.readouterr().err
    lone = make_cohort("lone", (1, 3, 2), seed=1)
    assert run_inference(lone, checkpoint, tmp_path / "lone_out") == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "rests on" in line]
    assert "bootstrap of images: each of the classes 'orbital disease' (1 image) rests on a single image" in warning
    assert run_inference(lone, checkpoint, tmp_path / "lone_out0", "--bootstrap", "0") == 0
    assert "rests on" not in capsys.readouterr().err


# -- comparison with a baseline --------------------------------------------------------------------

@pytest.mark.slow
def test_baseline_comparison_is_paired_on_the_same_images(make_cohort, checkpoint, other_weights, tmp_path):
    test_dir = make_cohort("external", (3, 8, 5), seed=1)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--baseline", str(other_weights),
                         "--baseline-model-name", TINY_MODEL) == 0
    assert run_inference(test_dir, other_weights, tmp_path / "alone", "--model-name", TINY_MODEL) == 0
    model, base = read_predictions(out), read_predictions(out.parent / "alone")
    baseline = read_predictions(out).pipe(lambda _: pd.read_csv(out / "baseline_predictions.csv"))
    assert np.allclose(baseline[prob_columns()].to_numpy(), base[prob_columns()].to_numpy(), atol=1e-6)
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison["metric"]) == list(metrics.COMPARISON_METRICS)
    y_true = model["true_label"].map(FOLDERS.index).to_numpy()
    acc_model = (model["pred_label"].map(FOLDERS.index).to_numpy() == y_true).mean()
    acc_base = (base["pred_label"].map(FOLDERS.index).to_numpy() == y_true).mean()
    first = comparison.iloc[0]
    assert first["difference"] == pytest.approx(acc_model - acc_base)  # ours - baseline
    assert first["difference_ci_low"] <= first["difference_ci_high"]
    assert 0 <= first["p_mcnemar_mid"] <= first["p_mcnemar_exact"] <= 1
    result = json.loads((out / "metrics.json").read_text())
    assert result["comparison"]["n"] == 16 and result["baseline"]["model_name"] == TINY_MODEL
    assert "Comparison with other models" in (out / "report.md").read_text()


# -- the embedding cache ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cache_reanalysis_encodes_no_image_and_changes_nothing(make_cohort, checkpoint, tmp_path,
                                                               monkeypatch):
    test_dir = make_cohort("external", (3, 5, 4), seed=1)
    (test_dir / "healthy eyes" / "x.jpg").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    assert run_inference(test_dir, checkpoint, tmp_path / "first", "--cache-dir", str(cache)) == 0
    assert len(list(cache.glob("embeddings_*.npz"))) == 1

    def no_encoding(*_args, **_kwargs):
        raise AssertionError("an image was encoded despite the cache")

    read, real_read = [], image_io.read_image

    def thumbnails_only(path, *args, **kwargs):  # the failure analysis reads its few errors
        read.append(Path(path).relative_to(test_dir).as_posix())
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(zero_shot, "encode_image_batches", no_encoding)
    monkeypatch.setattr(image_io, "read_image", thumbnails_only)
    assert run_inference(test_dir, checkpoint, tmp_path / "second", "--cache-dir", str(cache)) == 0
    for name in ("predictions.csv", "metrics.json", "report.md"):
        assert (tmp_path / "first" / name).read_text() == (tmp_path / "second" / name).read_text(), name
    failures = json.loads((tmp_path / "second" / "metrics.json").read_text())["failure_analysis"]
    assert sorted(read) == sorted(row["file"] for row in failures)  # no other image was read
    # other prompts, threshold and bootstrap size: still no image encoded
    reversed_set = prompts.prompt_set_to_dict(list(reversed(prompts.load_prompt_set(None))))
    (tmp_path / "reversed.json").write_text(json.dumps(reversed_set))
    assert run_inference(test_dir, checkpoint, tmp_path / "third", "--cache-dir", str(cache),
                         "--prompts", str(tmp_path / "reversed.json"), "--threshold", "0.2",
                         "--bootstrap", "20") == 0
    first = read_predictions(tmp_path / "first").set_index("path")
    third = read_predictions(tmp_path / "third").set_index("path").loc[first.index]
    assert np.allclose(third[prob_columns()].to_numpy(dtype=float),
                       first[prob_columns()].to_numpy(dtype=float), atol=1e-6, equal_nan=True)
    assert third.loc["healthy eyes/x.jpg", "status"].startswith("failed: ")


# -- WiSE-FT ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_wise_ft_alpha_0_is_the_base_and_1_the_fine_tuned(make_cohort, checkpoint, other_weights, tmp_path):
    test_dir = make_cohort("external", (2, 4, 3), seed=1)
    out = tmp_path / "wise"
    assert run_inference(test_dir, checkpoint, out, "--wise-ft-alpha", "0", "0.5", "1",
                         "--wise-ft-base", str(other_weights)) == 0
    assert run_inference(test_dir, other_weights, tmp_path / "base", "--model-name", TINY_MODEL) == 0
    assert run_inference(test_dir, checkpoint, tmp_path / "tuned") == 0
    probs = {name: read_predictions(tmp_path / name)[prob_columns()].to_numpy() for name in ("base", "tuned")}
    for alpha in ("0", "0.5", "1"):
        probs[alpha] = read_predictions(out / f"wise_ft_alpha_{alpha}")[prob_columns()].to_numpy()
        assert (out / f"wise_ft_alpha_{alpha}" / "metrics.json").exists()
    assert np.allclose(probs["0"], probs["base"], atol=1e-6)
    assert np.allclose(probs["1"], probs["tuned"], atol=1e-6)
    assert not np.allclose(probs["0.5"], probs["base"], atol=1e-4)
    assert not np.allclose(probs["0.5"], probs["tuned"], atol=1e-4)
    summary = pd.read_csv(out / "wise_ft_summary.csv")
    assert summary["alpha"].tolist() == [0.0, 0.5, 1.0] and (summary["n"] == 9).all()
    assert {"accuracy", "balanced_accuracy", "macro_auroc", "rare_sensitivity"} <= set(summary.columns)
    metrics = json.loads((out / "wise_ft_alpha_0.5" / "metrics.json").read_text())
    assert metrics["wise_ft_alpha"] == 0.5 and str(other_weights) in metrics["wise_ft_base"]


def test_wise_ft_without_recorded_base_asks_for_wise_ft_base(make_cohort, checkpoint, tmp_path, capsys):
    test_dir = make_cohort("external", (1, 1, 1), seed=1)
    assert run_inference(test_dir, checkpoint, tmp_path / "out", "--wise-ft-alpha", "0.5") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "--wise-ft-base" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("recorded, message", [
    ("/nowhere/ViT-B-32.pt", "the recorded pretrained weights /nowhere/ViT-B-32.pt are not on this machine"),
    ("runs/start.safetensors", "are not on this machine"),  # a weights file, not a tag
    ("no_such_tag", "could not load the pretrained weights no_such_tag"),  # a tag: open_clip refuses it
    ("local-dir:/nowhere/biomedclip", "could not load the pretrained weights local-dir:/nowhere/biomedclip"),
])
def test_wise_ft_refuses_a_recorded_base_it_cannot_load(recorded, message):
    checkpoint = model_loading.Checkpoint("ours", "best.pt", {"pretrained": recorded, "state_dict": {}}, "0" * 64)
    bundle = types.SimpleNamespace(checkpoint=checkpoint, model_name=TINY_MODEL)
    with pytest.raises((ValueError, ckpt.CheckpointError), match="--wise-ft-alpha") as caught:
        model_loading.wise_ft_base_weights(types.SimpleNamespace(wise_ft_base=None), bundle)
    assert message in str(caught.value) and "--wise-ft-base PATH" in str(caught.value)


# -- privacy ---------------------------------------------------------------------------------------

def test_a_run_repeats_from_the_argv_in_its_args_json(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (2, 3, 2), seed=1)
    assert run_inference(test_dir, checkpoint, tmp_path / "first", "--seed", "3") == 0
    record = json.loads((tmp_path / "first" / "args.json").read_text())
    assert record["script"] == "inference.py" and record["args"]["seed"] == 3
    assert record["run"]["checkpoint_sha256"] == image_io.file_sha256(checkpoint)
    argv = record["argv"]
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "again")  # args.json spells the current name
    assert inference.main(argv) == 0
    for name in ("predictions.csv", "metrics.json", "report.md"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name


@pytest.mark.slow
def test_anonymized_outputs_contain_no_file_name(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (2, 3, 2), seed=1)
    (test_dir / "healthy eyes" / "Doe_John_1961.jpg").write_bytes(b"garbage, not a picture")
    stems = [path.stem for path in test_dir.rglob("*.jpg")]
    salt = "pepper-8d1f"
    for name in ("a", "b"):
        assert run_inference(test_dir, checkpoint, tmp_path / name, "--anonymize-paths",
                             "--anonymize-salt", salt, "--group-regex", r"^([a-z_]+)_\d",
                             figures=name == "a") == 0
    assert run_inference(test_dir, checkpoint, tmp_path / "c", "--anonymize-paths") == 0
    for output in (tmp_path / "a", tmp_path / "c"):
        files = [path for path in output.rglob("*") if path.is_file()]
        assert len(files) >= 7
        for path in files:
            data = path.read_bytes()
            for stem in stems + [salt, str(test_dir), "orbital_disease_1"]:
                assert stem.encode() not in data, (path.name, stem)
    a, b, c = (read_predictions(tmp_path / name) for name in ("a", "b", "c"))
    assert a["path"].str.fullmatch(r"[0-9a-f]{64}").all() and a["path"].is_unique
    assert list(a["path"]) == list(b["path"])  # same salt, same pseudonyms
    assert not set(a["path"]) & set(c["path"])  # a random salt cannot be linked
    assert (a["status"] != "ok").sum() == 1


# -- every user error: exit 2, one error line naming the flag, nothing written ----------------------

@pytest.mark.parametrize("extra, flag", [
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "-0.1"], "--threshold"),
    (["--wise-ft-alpha", "0.5", "1.2"], "--wise-ft-alpha"),
    (["--baseline", "missing_baseline.pt"], "--baseline"),
    (["--baseline", "laion400m_e32"], "--baseline"),
    (["--baseline-model-name", TINY_MODEL], "--baseline-model-name"),
    (["--cache-dir", "FILE"], "--cache-dir"),
    (["--anonymize-salt", "x"], "--anonymize-salt"),
    (["--group-regex", r"P\d+"], "--group-regex"),
    (["--group-regex", "(unclosed"], "--group-regex"),
    (["--ece-bins", "1"], "--ece-bins"),
    (["--failure-examples", "-1"], "--failure-examples"),
    (["--split", "test"], "--split"),
    (["--wise-ft-base", "other.pt"], "--wise-ft-base"),
])
def test_user_errors_exit_2_and_write_nothing(make_cohort, checkpoint, tmp_path, capsys, extra, flag):
    test_dir = make_cohort("external", (1, 1, 1), seed=1)
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "other.pt").write_bytes(b"")
    extra = [str(tmp_path / e) if e in ("FILE", "other.pt") else e for e in extra]
    out = tmp_path / "out"
    capsys.readouterr()
    assert exit_code(test_dir, checkpoint, out, *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error: " in line]
    assert flag in line
    assert not out.exists()


# -- the whole evaluation on a large synthetic cohort (its timing: benchmarks/evaluation_speed.py) ---

@pytest.mark.slow
def test_full_evaluation_of_a_synthetic_cohort_with_2000_resamples(tmp_path):
    """Everything after the embeddings (metrics, 2000 bootstrap resamples, tables, the figures as
    PNG and PDF, the report), checked on values; the 10-second budget for 5,000 images is a
    benchmark (`python benchmarks/evaluation_speed.py`), not a test."""
    setup, bundle, args, scores = evaluation_speed.synthetic_evaluation(1000, tmp_path)
    assert args.bootstrap == 2000
    result = inference.write_evaluation(tmp_path / "out", args, setup, bundle, scores)
    y_true = np.array([label for _path, label in setup.cohort.items])
    p_rare = metrics.softmax(scores.logits)[:, 0]
    assert result["n"] == 1000
    assert result["operating_point"]["rule"]["tp"] == int(np.sum((p_rare >= 0.2) & (y_true == 0)))
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, scores.logits.argmax(axis=1)))
    low, high = result["accuracy_ci"]
    assert low < result["accuracy"] < high and high - low < 0.1
    for name in report.FIGURE_NAMES:
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / "out" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
