"""Metamorphic tests (issue 25): an evaluation's numbers do not move when only the presentation
does: a permutation of the rows, renamed images, a permuted --classes (class order is
presentation: the bootstrap draws on a canonical order), for every evaluation path."""

import json

import numpy as np
import pytest

from orbital_clip import answers as answer_files
from conftest import write_csv

CLASSES = ["rare", "common", "healthy"]
NUMBERS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "brier", "log_loss", "ece")


def cohort_and_answers(root, names, order):
    """12 images (4 per class) named by `names`, and an answer file of fixed probabilities whose
    rows come in `order`; returns (cohort, answer file)."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)
    rows = []
    for i in range(12):
        k = i // 4
        path = root / "cohort" / CLASSES[k] / names[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not read")
        rows.append([f"{CLASSES[k]}/{names[i]}", CLASSES[int(probs[i].argmax())],
                     *np.round(probs[i], 6)])
    header = ["path", "pred_label", *(f"prob_{c}" for c in CLASSES)]
    return root / "cohort", write_csv(root / "answers.csv", header, [rows[i] for i in order])


def scored(root, names, order, classes=CLASSES):
    cohort, answers = cohort_and_answers(root, names, order)
    out = root / "out"
    assert answer_files.main(["--test-dir", str(cohort), "--predictions", str(answers),
                              "--classes", ",".join(classes), "--output-dir", str(out),
                              "--bootstrap", "100", "--seed", "3", "--no-figures"]) == 0
    return json.loads((out / "metrics.json").read_text())


def assert_same_numbers(base, other):
    """metrics.json's overall values and CIs, and every class's row (keyed by name), equal."""
    for name in NUMBERS:
        assert other[name] == pytest.approx(base[name]), name
        assert other[f"{name}_ci"] == pytest.approx(base[f"{name}_ci"]), name
        assert other[f"{name}_ci_n_resamples"] == base[f"{name}_ci_n_resamples"], name
    for folder, row in base["per_class"].items():
        for key in ("support", "sensitivity", "f1", "f1_ci", "auroc", "auroc_ci"):
            assert other["per_class"][folder][key] == pytest.approx(row[key]), (folder, key)


@pytest.mark.parametrize("order", [["common", "healthy", "rare"], ["healthy", "rare", "common"]])
def test_answer_file_numbers_do_not_move_under_class_order(tmp_path, order):
    names = [f"img{i:02d}.png" for i in range(12)]
    assert_same_numbers(scored(tmp_path / "a", names, range(12)),
                        scored(tmp_path / "b", names, range(12), order))


@pytest.mark.parametrize("variant", ["rows permuted", "paths renamed"])
def test_answer_file_numbers_do_not_move_under_row_order_or_names(tmp_path, variant):
    names = [f"img{i:02d}.png" for i in range(12)]
    base = scored(tmp_path / "a", names, range(12))
    if variant == "rows permuted":
        other = scored(tmp_path / "b", names, np.random.default_rng(1).permutation(12))
    else:  # same sort order within each class folder, other names
        other = scored(tmp_path / "b", [f"patient_{i:02d}_x.jpg" for i in range(12)], range(12))
    for name in NUMBERS:
        assert other[name] == pytest.approx(base[name]), name
        assert other[f"{name}_ci"] == pytest.approx(base[f"{name}_ci"]), name
