"""Tests that can fail on the bugs they name: one per mutant that survived the 2026-12-03 audit
(issue 27). Each fixture is built so its bug can show (units of several images, a regex matching
only some images, two models in different class orders, a replaced image of the same size, a
second checkpoint sharing a cache). tools/mutants/run_mutants.py plants each mutant and runs
the test named for it here.

Written against stable entry points (the top-level scripts' main, and pure functions imported
by one name each) so that the package's reorganisation moves only the imports below."""

import os
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
from orbital_clip import prompts
from orbital_clip import checkpoint as ckpt
from orbital_clip import models
from orbital_clip.evaluation import regex_groups
from orbital_clip.report import comparison_frame, subgroups_frame
from orbital_clip.split.allocate import assign_folds
from conftest import TINY_MODEL, tiny_metadata
from conftest import write_model_checkpoint

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]
PROB_COLUMNS = [f"prob_{folder}" for folder in FOLDERS]


def run_inference(test_dir, checkpoint, output_dir, *extra):
    return inference.main(["--test-dir", str(test_dir), "--checkpoint", str(checkpoint),
                           "--output-dir", str(output_dir), "--workers", "0", "--bootstrap", "20",
                           "--no-progress", "--no-figures", *map(str, extra)])


def probs_by_path(output_dir, name="predictions.csv"):
    frame = pd.read_csv(output_dir / name, keep_default_na=False, na_values=[""])
    return frame.set_index("path")[PROB_COLUMNS].astype(float).sort_index()


# -- split: assign_folds stratifies by class before balancing totals ------------------------------

def test_assign_folds_balances_each_class_before_the_fold_totals():
    """A 3-image unit of class 0 fills fold 0; class 1's four one-image units must still go 2/2
    (the class count decides first), not 1/3 (what the fold totals alone would give)."""
    labels = [0, 0, 0, 1, 1, 1, 1]
    units = ["a", "a", "a", "b", "c", "d", "e"]
    folds = assign_folds(labels, units, 2, seed=0)
    assert folds[:3] == [0, 0, 0]
    assert sorted(Counter(f for f, y in zip(folds, labels) if y == 1).values()) == [2, 2]


# -- evaluation: an image a --group-regex misses is its own group ---------------------------------

def test_group_regex_misses_are_each_their_own_group_not_one_shared_patient():
    texts = ["orbital disease/P01_a.jpg", "orbital disease/P01_b.jpg", "healthy eyes/P02_a.jpg",
             "healthy eyes/scan7.jpg", "healthy eyes/scan8.jpg", "non-orbital disease/scan9.jpg"]
    groups = regex_groups(texts, texts, r"^(P\d+)_")
    assert groups[:3] == ["P01", "P01", "P02"]
    missed = groups[3:]
    assert len(set(missed)) == 3  # three images, three bootstrap units
    assert not set(missed) & {"P01", "P02"}


# -- report: comparison.csv and subgroups.csv columns hold what their names say -------------------

def comparison_row(metric="accuracy"):
    return {"model": "baseline", "metric": metric, "n": 10, "n_no_answer": 0,
            "value": 0.6, "value_ci": [0.41, 0.79], "reference_value": 0.8, "reference_ci": [0.62, 0.97],
            "difference": 0.2, "difference_ci": [0.01, 0.39], "p_bootstrap": 0.04,
            "p_mcnemar_exact": 0.05, "p_mcnemar_mid": 0.03, "p_mcnemar_clustered": None,
            "p_delong": None, "reference_only_correct": 3, "model_only_correct": 1, "n_resamples": 20}


def test_comparison_frame_puts_each_models_ci_beside_its_own_value():
    frame = comparison_frame({"rows": [comparison_row()], "bootstrap_unit": "image"})
    row = frame.iloc[0]
    assert (row["model_value"], row["model_ci_low"], row["model_ci_high"]) == (0.6, 0.41, 0.79)
    assert (row["ours_value"], row["ours_ci_low"], row["ours_ci_high"]) == (0.8, 0.62, 0.97)
    assert (row["difference"], row["difference_ci_low"], row["difference_ci_high"]) == (0.2, 0.01, 0.39)
    assert (row["ours_only_correct"], row["model_only_correct"]) == (3, 1)


def subgroup_level(level):
    row = {"level": level, "n": 8, "n_patients": 8, "n_rare": 2, "prevalence": 0.25, "small_n": True}
    for name in ("accuracy", "balanced_accuracy", "rare_sensitivity", "rare_specificity",
                 "rare_auroc", "macro_auroc"):
        row.update({name: 0.5, f"{name}_ci": [0.25, 0.75]})
    return row


def test_subgroups_frame_keeps_each_heterogeneity_p_under_its_own_test():
    block = {"attribute": "sex", "rows": [subgroup_level("F"), subgroup_level("M")],
             "accuracy_test": {"p": 0.011}, "rare_sensitivity_test": {"p": 0.722}}
    frame = subgroups_frame([block])
    assert frame["p_heterogeneity_accuracy"].tolist() == [0.011, 0.011]
    assert frame["p_heterogeneity_rare_sensitivity"].tolist() == [0.722, 0.722]


# -- inference: the embedding cache sees a replaced image and another checkpoint ------------------

@pytest.fixture
def bmp_cohort(make_cohort):
    """The synthetic cohort re-saved as uncompressed BMP: every image of one size has the same
    byte count, so a replaced image differs from the old one only in content and mtime."""
    root = make_cohort("external", (2, 3, 3), seed=1)
    for path in sorted(root.rglob("*.jpg")):
        Image.open(path).convert("RGB").save(path.with_suffix(".bmp"))
        path.unlink()
    return root


@pytest.mark.slow
def test_cache_sees_a_replaced_image_of_the_same_size(bmp_cohort, checkpoint, tmp_path):
    cache = tmp_path / "cache"
    assert run_inference(bmp_cohort, checkpoint, tmp_path / "first", "--cache-dir", cache) == 0
    images = sorted((bmp_cohort / "healthy eyes").glob("*.bmp"))
    target, other = images[0], images[1]
    assert target.stat().st_size == other.stat().st_size
    stat = target.stat()
    target.write_bytes(other.read_bytes())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # a later copy
    assert run_inference(bmp_cohort, checkpoint, tmp_path / "cached", "--cache-dir", cache) == 0
    assert run_inference(bmp_cohort, checkpoint, tmp_path / "fresh") == 0
    cached, fresh = probs_by_path(tmp_path / "cached"), probs_by_path(tmp_path / "fresh")
    first = probs_by_path(tmp_path / "first")
    key = target.relative_to(bmp_cohort).as_posix()
    assert not np.allclose(first.loc[key], fresh.loc[key], atol=1e-6)  # the image did change
    np.testing.assert_allclose(cached.to_numpy(), fresh.to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_cache_is_not_shared_between_two_checkpoints(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (2, 3, 3), seed=1)
    torch.manual_seed(1)
    model, *_ = models.create_model(TINY_MODEL, None)
    second = tmp_path / "second.pt"
    write_model_checkpoint(second, model, tiny_metadata())
    cache = tmp_path / "cache"
    assert run_inference(test_dir, checkpoint, tmp_path / "one", "--cache-dir", cache) == 0
    assert run_inference(test_dir, second, tmp_path / "two", "--cache-dir", cache) == 0
    assert run_inference(test_dir, second, tmp_path / "two_fresh") == 0
    one, two = probs_by_path(tmp_path / "one"), probs_by_path(tmp_path / "two")
    assert not np.allclose(one.to_numpy(), two.to_numpy(), atol=1e-4)
    np.testing.assert_allclose(two.to_numpy(), probs_by_path(tmp_path / "two_fresh").to_numpy(), atol=1e-6)


# -- inference: baseline_predictions.csv in our class order ---------------------------------------

@pytest.mark.slow
def test_baseline_in_another_class_order_is_written_under_our_headers(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (2, 3, 3), seed=1)
    reversed_set = list(reversed(prompts.load_prompt_set(None)))
    torch.manual_seed(1)
    model, *_ = models.create_model(TINY_MODEL, None)
    baseline = tmp_path / "reversed.pt"
    write_model_checkpoint(baseline, model, tiny_metadata(
        class_folders=prompts.class_folders(reversed_set),
        prompts=prompts.prompt_set_to_dict(reversed_set)))
    assert run_inference(test_dir, checkpoint, tmp_path / "pair", "--baseline", baseline) == 0
    assert run_inference(test_dir, baseline, tmp_path / "alone") == 0
    written = pd.read_csv(tmp_path / "pair" / "baseline_predictions.csv")
    assert [c for c in written.columns if c.startswith("prob_")] == PROB_COLUMNS
    np.testing.assert_allclose(probs_by_path(tmp_path / "pair", "baseline_predictions.csv").to_numpy(),
                               probs_by_path(tmp_path / "alone").to_numpy(), atol=1e-6)
