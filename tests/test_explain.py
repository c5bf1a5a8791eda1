"""inference.py --explain: which images are explained, where a map lies on the original image,
the model-parameter randomisation check (Adebayo et al. 2018) for the CLIP ViT and ResNet towers
and a torchvision CNN, and the files and report section inference writes."""

import re
import types

import numpy as np
import pandas as pd
import pytest
import torch

from orbital_clip import explain
from orbital_clip import models
from orbital_clip import prompts
from orbital_clip import scoring
from orbital_clip.model_loading import Checkpoint
from conftest import TINY_MODEL

# 128 px: the ResNet tower's last stage is a 4 x 4 map (at 64 px, 2 x 2 maps of random weights
# are mostly flat after Grad-CAM's ReLU)
TINY_RN_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                               "layers": 1}}
# Maps of the same images and classes under two independent weight draws: a map that reflects
# the weights correlates weakly; one that reflects only the image (an edge map) near 1.
RANDOMISED_MAX_CORRELATION = 0.5


def test_cases_to_explain_known_answer():
    """The most confident errors first (ties in cohort order), then the most confident correct
    image of each class; a class without a correct image adds none."""
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.9, 0.05, 0.05],   # correct 0
                      [0.2, 0.7, 0.1],     # error, 0.7
                      [0.1, 0.6, 0.3],     # correct 1
                      [0.05, 0.15, 0.8],   # error, 0.8
                      [0.3, 0.6, 0.1],     # error, 0.6
                      [0.5, 0.2, 0.3]])    # error, 0.5
    assert explain.cases_to_explain(y_true, probs, 2) == [
        (3, "error", 1), (1, "error", 2), (0, "correct", 1), (2, "correct", 1)]


@pytest.mark.parametrize("mode, box, inner", [
    ("shortest", (50, 0, 150, 100), (0, 0, 1, 1)),
    ("squash", (0, 0, 200, 100), (0, 0, 1, 1)),
    ("longest", (0, 0, 200, 100), (0, 0.25, 1, 0.75)),
])
def test_input_region_of_a_wide_image(mode, box, inner):
    """A 200 x 100 image: centre crop sees the middle square; squash all of it; letterboxing puts
    it in the middle half of the square input."""
    got_box, got_inner = explain.input_region(200, 100, mode)
    np.testing.assert_allclose(got_box, box)
    np.testing.assert_allclose(got_inner, inner)


def clip_bundle(model, tokenizer):
    """The parts of a ModelBundle the maps need: zero-shot over the published classes."""
    classes = prompts.load_prompt_set(None)
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, classes=classes,
                                 folders=prompts.class_folders(classes),
                                 logit_scale_mode="exp", checkpoint=Checkpoint("tag", "t", None, None))


def fixed_images(n=8, seed=3, size_px=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size_px, size_px, generator=generator)


TARGETS = [0, 1, 2, 0, 1, 2, 0, 1]


def clip_maps(seed, tower):
    torch.manual_seed(seed)
    if tower == "vit":
        model, _train_tf, _val_tf, tokenizer = models.create_model(TINY_MODEL, None)
    else:
        model, _train_tf, _val_tf, tokenizer = models.create_model("tiny_rn_explain", None,
                                                                   model_config=TINY_RN_CONFIG)
    images = fixed_images(size_px=models.model_image_size(model))
    return explain.explain_clip(clip_bundle(model, tokenizer), images, TARGETS, "cpu")


def assert_maps_follow_the_weights(first, other):
    """Maps of two weight draws: most are real maps (not flat: Grad-CAM's ReLU leaves some random
    draws without positive evidence), and where both are, they correlate weakly."""
    real = (first.std(axis=(1, 2)) > 0.01) & (other.std(axis=(1, 2)) > 0.01)
    assert real.sum() >= len(real) // 2, first.std(axis=(1, 2))
    correlations = [explain.map_correlation(a, b) for a, b in zip(first[real], other[real])]
    assert np.mean(correlations) < RANDOMISED_MAX_CORRELATION, correlations


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_clip_maps_change_when_the_weights_are_randomised(tower):
    """Model-parameter randomisation test (Adebayo et al. 2018): maps over the whole input,
    the same for the same weights, changed when the weights are re-drawn."""
    first, again, other = clip_maps(0, tower), clip_maps(0, tower), clip_maps(1, tower)
    assert first.shape[0] == len(TARGETS) and first.shape[1] == first.shape[2]
    assert ((first.max(axis=(1, 2)) == 1.0) | (first.max(axis=(1, 2)) == 0.0)).all()  # normalised
    np.testing.assert_allclose(first, again, atol=1e-5)  # deterministic for the same weights
    assert_maps_follow_the_weights(first, other)


def test_cnn_maps_change_when_the_weights_are_randomised():
    """The same check for a torchvision baseline (resnet18, the CNN baselines' quick --arch)."""
    from torchvision.models import resnet18
    maps = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = resnet18(num_classes=3).eval()
        maps.append(explain.grad_cam(model, explain.cnn_cam_layer(model, "resnet18"),
                                     fixed_images(), TARGETS))
    assert_maps_follow_the_weights(*maps)


@pytest.mark.slow
def test_inference_explain_writes_maps_and_the_report_section(make_cohort, checkpoint, tmp_path):
    """--explain 2: one figure per chosen image (the two most confident errors and each class's
    most confident correct image, chosen from predictions.csv's probabilities), each linked in
    report.md with its true and predicted class."""
    test = make_cohort("test", (3, 4, 3), seed=5)
    out = tmp_path / "eval"
    assert scoring.main(["--test-dir", str(test), "--checkpoint", str(checkpoint), "--out-dir", str(out),
                         "--precision", "fp32", "--bootstrap", "0", "--no-figures", "--no-progress",
                         "--workers", "0", "--explain", "2"]) == 0
    predictions = pd.read_csv(out / "predictions.csv")
    folders = [c[len("prob_"):] for c in predictions.columns if c.startswith("prob_")]
    y_true = predictions["true_label"].map(folders.index).to_numpy()
    expected = explain.cases_to_explain(y_true, predictions[[f"prob_{f}" for f in folders]].to_numpy(), 2)
    report = (out / "report.md").read_text()
    rows = re.findall(r"^\| (error|correct) (\d) \| !\[map\]\((failure_analysis/explain_[^)]+\.png)\) \| "
                      r"([^|]+) \| ([^|]+) \|.*`([^`]+)` \|$", report, flags=re.M)
    assert len(rows) == len(expected) > 0
    for (row, kind, rank), (r_kind, r_rank, png, true, pred, file) in zip(expected, rows):
        assert (kind, str(rank)) == (r_kind, r_rank)
        assert file == predictions["path"][row]
        assert true.strip() == predictions["true_label"][row]
        assert pred.strip() == predictions["pred_label"][row]
        assert (out / png).stat().st_size > 1000
    written = sorted(p.name for p in (out / "failure_analysis").glob("explain_*"))
    assert written == sorted(png.split("/")[1] for _k, _r, png, *_rest in rows)


@pytest.mark.slow
def test_cnn_run_maps_follow_its_predictions(tmp_path):
    """python -m orbital_clip.explain on a baselines.train_cnn run: one figure per case chosen
    from its predictions.csv, listed in explain.md with the true and predicted class."""
    from orbital_clip import cnn
    from conftest import write_cohorts
    from test_train_cnn import cohort_argv
    write_cohorts(tmp_path, train=(3, 6, 4), val=(2, 3, 3), test=(3, 4, 3))
    assert cnn.main(cohort_argv(tmp_path / "train", tmp_path / "val", tmp_path / "test",
                                tmp_path / "run", "--epochs", "1")) == 0
    assert explain.main(["--cnn-run", str(tmp_path / "run"), "--test-dir", str(tmp_path / "test"),
                         "--explain", "2", "--out-dir", str(tmp_path / "maps")]) == 0
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    folders = [c[len("prob_"):] for c in predictions.columns if c.startswith("prob_")]
    expected = explain.cases_to_explain(predictions["true_label"].map(folders.index).to_numpy(),
                                        predictions[[f"prob_{f}" for f in folders]].to_numpy(), 2)
    text = (tmp_path / "maps" / "explain.md").read_text()
    rows = re.findall(r"^\| (error|correct) (\d) \| !\[map\]\((failure_analysis/[^)]+)\) \| ([^|]+) \| "
                      r"([^|]+) \|.*`([^`]+)` \|$", text, flags=re.M)
    assert [(k, str(r)) for _i, k, r in expected] == [(k, r) for k, r, *_ in rows]
    assert [predictions["path"][i] for i, _k, _r in expected] == [row[-1] for row in rows]
    assert all((tmp_path / "maps" / row[2]).stat().st_size > 1000 for row in rows)


@pytest.mark.slow
def test_each_map_is_of_the_class_it_is_labelled_with(make_cohort):
    """An error (true 0, predicted 2) and a correct image: the case's map under the predicted
    class is Grad-CAM of the predicted class, the one under the true class of the true class,
    and the two differ (so a map drawn for the wrong class would show)."""
    torch.manual_seed(0)
    model, _train_tf, preprocess, tokenizer = models.create_model(TINY_MODEL, None)
    bundle = clip_bundle(model, tokenizer)
    bundle.preprocess = preprocess
    root = make_cohort("maps", (2, 0, 1), seed=4)
    items = sorted((p, 0 if p.parent.name == bundle.folders[0] else 2)
                   for p in root.rglob("*.jpg") if p.parent.name in (bundle.folders[0], bundle.folders[2]))
    y_true = np.array([label for _path, label in items])
    probs = np.tile([0.2, 0.1, 0.7], (len(items), 1))  # every image predicted class 2
    cases = explain.explain_cohort(bundle, items, y_true, probs, 1, "cpu")
    error = next(case for case in cases if case.kind == "error")
    assert (error.true, error.pred) == (0, 2) and sorted(error.maps) == [0, 2]
    batch = torch.stack([preprocess(explain.images.read_image(items[error.index][0]))])
    for k in (0, 2):
        np.testing.assert_allclose(error.maps[k], explain.explain_clip(bundle, batch, [k], "cpu")[0],
                                   atol=1e-5)
    assert explain.map_correlation(error.maps[0], error.maps[2]) < 0.99
