"""evaluation.py: the cohort record, per-image metadata, the subgroup rows of scored images, the
output folder, and the direction of imports between the evaluation modules. The flows that use
them end to end are tested in test_inference.py, test_compare.py and test_answer_files.py."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orbital_clip import evaluation

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]


def small_cohort(root, groups=None):
    items = [(root / "orbital disease" / "a.png", 0), (root / "healthy eyes" / "b.png", 1),
             (root / "healthy eyes" / "sub" / "c.png", 1), (root / "non-orbital disease" / "d.png", 2)]
    return evaluation.Cohort(items, True, root, groups=groups)


def test_cohort_labels_paths_and_groups_of_scored_images(tmp_path):
    cohort = small_cohort(tmp_path, groups=["P1", "P2", "P2", "P3"])
    assert cohort.labels().tolist() == [0, 1, 1, 2] and cohort.labels().dtype == np.int64
    assert cohort.relative_paths() == ["orbital disease/a.png", "healthy eyes/b.png",
                                       "healthy eyes/sub/c.png", "non-orbital disease/d.png"]
    scored = np.array([True, False, True, True])
    assert cohort.scored_groups(scored).tolist() == ["P1", "P2", "P3"]
    assert small_cohort(tmp_path).scored_groups(scored) is None  # each image its own unit


def test_subgroups_are_scored_on_the_scored_images_only(tmp_path):
    """An unreadable image leaves its label, its probabilities (NaN), its level and its patient
    out together: a level held only by it disappears, and counts are of the scored images."""
    cohort = small_cohort(tmp_path, groups=["P1", "P2", "P2", "P3"])
    probs = np.array([[0.8, 0.1, 0.1], [np.nan] * 3, [0.2, 0.7, 0.1], [0.6, 0.2, 0.2]])
    scored = np.isfinite(probs).all(axis=1)
    subgroups = {"site": ["A", "ONLY_UNREADABLE", "A", "B"]}
    args = argparse.Namespace(bootstrap=0, seed=0)
    (block,) = evaluation.score_subgroups(cohort, subgroups, probs, scored, 0, args)
    rows = {row["level"]: row for row in block["rows"]}
    assert set(rows) == {"A", "B"}
    assert (rows["A"]["n"], rows["A"]["n_patients"], rows["A"]["accuracy"]) == (2, 2, 1.0)
    assert (rows["B"]["n"], rows["B"]["n_rare"], rows["B"]["accuracy"]) == (1, 0, 0.0)
    assert rows["A"]["rare_sensitivity"] == 1.0  # the one rare image, at site A, found
    assert evaluation.score_subgroups(cohort, None, probs, scored, 0, args) is None


def test_bin_labels():
    assert evaluation.bin_label(39.9, [0, 40, 60, 120]) == "[0, 40)"
    assert evaluation.bin_label(40, [0, 40, 60, 120]) == "[40, 60)"
    assert evaluation.bin_label(120, [0, 40, 60, 120]) == "[60, 120]"
    assert evaluation.bin_label(121, [0, 40, 60, 120]) is None


@pytest.mark.parametrize("text", ["40", "0,0", "60,40", "a,b"])
def test_age_bins_need_two_increasing_numbers(text):
    with pytest.raises(ValueError):
        evaluation.parse_bins(text)


def test_clearing_an_output_folder_removes_only_our_files(tmp_path):
    ours = ["metrics.json", "report.md", "roc_curves.pdf", "subgroups.csv"]
    theirs = ["notes.txt", "metrics.json.bak"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / evaluation.FAILURE_DIR).mkdir()
    (tmp_path / evaluation.FAILURE_DIR / "true0_1.png").write_bytes(b"png")
    alpha = tmp_path / "wise_ft_alpha_0.5"
    alpha.mkdir()
    (alpha / "predictions.csv").write_text("x")
    evaluation.clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


@pytest.mark.slow
def test_evaluation_modules_import_one_way():
    """evaluation <- answer_files <- inference: the shared parts never import the script."""
    code = ("import sys; from orbital_clip import evaluation; "
            "assert not {'orbital_clip.answers', 'orbital_clip.scoring'} & set(sys.modules); "
            "from orbital_clip import answers; assert 'orbital_clip.scoring' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)
