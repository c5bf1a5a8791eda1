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


# ----------------------------------------------------------------------------------------------
# The checkpoint path (with --compare and --subgroups): rows permuted, paths renamed, classes
# permuted (a --prompts file listing the classes in another order)


def checkpoint_run(root, cohort_dir, checkpoint, variant):
    """inference.py on a manifest of the cohort with a reader's --compare file and a site
    column, all three written in the variant's row order, paths and class order; metrics.json."""
    import shutil
    from orbital_clip import prompts
    from test_inference import run_inference
    files = sorted(p.relative_to(cohort_dir) for p in cohort_dir.rglob("*") if p.is_file())
    names = {f: f for f in files}
    if variant == "paths renamed":  # other names, the same sort order within each class
        names = {f: f.parent / f"patient_{i:02d}_x{f.suffix}" for i, f in enumerate(files)}
    for f, new in names.items():
        (root / "images" / new).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cohort_dir / f, root / "images" / new)
    order = np.random.default_rng(5).permutation(len(files)) if variant == "rows permuted" else range(len(files))
    rows = [[f"images/{names[files[i]].as_posix()}", files[i].parts[0], "test",
             "north" if i % 3 else "south", files[i].parts[0] if i % 4 else "healthy eyes"]
            for i in order]
    manifest = write_csv(root / "manifest.csv", ["path", "label", "split", "site"],
                         [r[:4] for r in rows])
    reader = write_csv(root / "reader.csv", ["path", "answer"], [[r[0], r[4]] for r in rows])
    extra = []
    if variant == "classes permuted":
        classes = prompts.prompt_set_to_dict(prompts.load_prompt_set(None))
        first, *rest = classes["classes"]  # the rare class (index 0) stays the prompt set's
        classes["classes"] = [first, *rest[::-1]]
        (root / "prompts.json").write_text(json.dumps(classes))
        extra = ["--prompts", str(root / "prompts.json")]
    out = root / "out"
    assert run_inference(manifest, checkpoint, out, "--compare", f"reader={reader}",
                         "--subgroups", "site", "--seed", "4", *extra) == 0
    return json.loads((out / "metrics.json").read_text())


def assert_same_comparison_and_subgroups(base, other):
    key = lambda row: (row["model"], row["metric"])  # noqa: E731
    theirs = {key(row): row for row in other["comparison"]["rows"]}
    for row in base["comparison"]["rows"]:
        for name in ("value", "value_ci", "difference", "difference_ci"):
            if name in row:
                assert theirs[key(row)][name] == pytest.approx(row[name]), (key(row), name)
    theirs = {(b["model"], r["level"]): r for b in other["subgroups"] for r in b["rows"]}
    for block in base["subgroups"]:
        for row in block["rows"]:
            mine = theirs[(block["model"], row["level"])]
            for name in ("n", "accuracy", "accuracy_ci", "balanced_accuracy_ci", "macro_auroc_ci"):
                assert mine[name] == pytest.approx(row[name]), (block["model"], row["level"], name)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rows permuted", "paths renamed", "classes permuted"])
def test_checkpoint_compare_and_subgroup_numbers_do_not_move(make_cohort, checkpoint, tmp_path, variant):
    cohort_dir = make_cohort("external", (6, 8, 6), seed=3)
    base = checkpoint_run(tmp_path / "a", cohort_dir, checkpoint, "base")
    other = checkpoint_run(tmp_path / "b", cohort_dir, checkpoint, variant)
    assert_same_numbers(base, other)
    assert_same_comparison_and_subgroups(base, other)


# ----------------------------------------------------------------------------------------------
# The sequential-steps path: two answer files, under row order and --classes order


def sequential_run(root, order, classes):
    """Two steps of labels (the second right on more images) over a 24-image cohort of 12
    patients; metrics.json's sequential block."""
    rng = np.random.default_rng(2)
    truth = [CLASSES[i % 3] for i in range(24)]
    steps = [[t if rng.random() < p else CLASSES[(CLASSES.index(t) + 1) % 3] for t in truth]
             for p in (0.5, 0.8)]
    files = []
    for s, answers in enumerate(steps):
        rows = []
        for i in range(24):
            path = root / "cohort" / truth[i] / f"P{i // 2:02d}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read")
            rows.append([f"{truth[i]}/P{i // 2:02d}_{i}.png", answers[i]])
        files.append(write_csv(root / f"step{s}.csv", ["path", "answer"], [rows[i] for i in order]))
    out = root / "out"
    assert answer_files.main(["--test-dir", str(root / "cohort"), "--predictions", str(files[0]),
                              "--compare", f"later={files[1]}", "--classes", ",".join(classes),
                              "--group-regex", r"(P\d+)_", "--output-dir", str(out),
                              "--bootstrap", "100", "--seed", "3", "--no-figures"]) == 0
    return json.loads((out / "metrics.json").read_text())["sequential"]


@pytest.mark.parametrize("variant", ["rows permuted", "classes permuted"])
def test_sequential_numbers_do_not_move(tmp_path, variant):
    base = sequential_run(tmp_path / "a", range(24), CLASSES)
    other = sequential_run(tmp_path / "b", np.random.default_rng(1).permutation(24)
                           if variant == "rows permuted" else range(24),
                           ["healthy", "common", "rare"] if variant == "classes permuted" else CLASSES)
    key = lambda r: (r["class"], r["measure"])  # noqa: E731
    theirs = {key(r): r for r in other["changes"]}
    for row in base["changes"]:
        for name in ("difference", "difference_ci", "difference_ci_n_resamples", "p_mid", "p_clustered"):
            assert theirs[key(row)][name] == pytest.approx(row[name]), (key(row), name)
    theirs = {(r["class"], r["measure"], r["step"]): r["value"] for r in other["per_step"]}
    assert {(r["class"], r["measure"], r["step"]): r["value"] for r in base["per_step"]} == pytest.approx(theirs)


# ----------------------------------------------------------------------------------------------
# The same probabilities scored as a checkpoint's predictions and as an answer file


@pytest.mark.slow
def test_a_checkpoints_probabilities_scored_as_an_answer_file_give_the_same_metrics(make_cohort, checkpoint, tmp_path):
    import pandas as pd
    from test_inference import run_inference
    cohort_dir = make_cohort("external", (6, 8, 6), seed=3)
    assert run_inference(cohort_dir, checkpoint, tmp_path / "model", "--seed", "4") == 0
    preds = pd.read_csv(tmp_path / "model" / "predictions.csv", keep_default_na=False)
    columns = ["path", "pred_label"] + [c for c in preds.columns if c.startswith("prob_")
                                        and not c.startswith("prob_cal_")]
    preds[columns].to_csv(tmp_path / "answers.csv", index=False)
    out = tmp_path / "answers"
    assert answer_files.main(["--test-dir", str(cohort_dir), "--predictions", str(tmp_path / "answers.csv"),
                              "--output-dir", str(out), "--bootstrap", "50", "--seed", "4",
                              "--no-figures"]) == 0
    model = json.loads((tmp_path / "model" / "metrics.json").read_text())
    answered = json.loads((out / "metrics.json").read_text())
    assert answered["class_folders"] == model["class_folders"]
    for name in NUMBERS:
        assert answered[name] == pytest.approx(model[name], abs=1e-6), name
        assert answered[f"{name}_ci"] == pytest.approx(model[f"{name}_ci"], abs=1e-6), name
