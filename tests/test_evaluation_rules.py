"""The evaluation rules of issue 25, each a known-answer cohort run through every path that
applies it: compute_metrics (checkpoint mode), answer files (score_answers), --compare,
subgroups. Each test failed on the code before its rule was put in its one home."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from orbital_clip import answers as answer_files
from orbital_clip import metrics
from conftest import write_csv

CLASSES = ["rare", "common", "healthy"]  # index 0 is the rare class


def one_hot(pred, n_classes=3):
    return np.eye(n_classes)[np.asarray(pred)] * 0.8 + 0.2 / n_classes


def write_cohort(root, per_class=4):
    """Class folders of files never read (answer files are scored, not images); the paths."""
    paths = []
    for name in CLASSES:
        for i in range(per_class):
            path = root / name / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read")
            paths.append(f"{name}/img{i}.png")
    return paths


def score_answers(tmp_path, rows, *extra, header=("path", "answer", "status")):
    """Run score_answers on the cohort with one answer file; (exit code, metrics.json or None)."""
    cohort = tmp_path / "cohort"
    if not cohort.exists():
        write_cohort(cohort)
    answers = write_csv(tmp_path / "answers.csv", list(header), rows)
    out = tmp_path / "out"
    code = answer_files.main(["--test-dir", str(cohort), "--predictions", str(answers),
                              "--classes", ",".join(CLASSES), "--output-dir", str(out),
                              "--bootstrap", "50", "--no-figures", *extra])
    found = out / "metrics.json"
    return code, json.loads(found.read_text()) if found.exists() else None


# ----------------------------------------------------------------------------------------------
# 1. A class with no scored image: class-averaged metrics n/a, with a warning naming it


def test_a_class_never_scored_makes_class_averages_na_in_compute_metrics(caplog):
    # 'healthy' (index 2) has no scored image; rare and common are all right
    y_true = [0, 0, 1, 1, 1]
    with caplog.at_level(logging.WARNING):
        result = metrics.compute_metrics(y_true, one_hot(y_true), CLASSES, n_bootstrap=40, seed=0)
    assert result["accuracy"] == pytest.approx(1.0)
    for name in ("balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc"):
        assert result[name] is None and result[f"{name}_ci"] is None, name
    assert result["unscored_classes"] == ["healthy"]
    assert "healthy" in caplog.text and "balanced_accuracy" in caplog.text
    row = result["per_class"]["healthy"]
    assert row["support"] == 0 and row["specificity"] is None and row["npv"] is None
    assert row["f1"] is None and row["lr_neg"] is None


def test_every_class_scored_keeps_the_class_averages(caplog):
    y_true = [0, 1, 1, 2, 2]
    with caplog.at_level(logging.WARNING):
        result = metrics.compute_metrics(y_true, one_hot([0, 1, 2, 2, 2]), CLASSES, n_bootstrap=0)
    assert result["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert result["unscored_classes"] == [] and "no scored image" not in caplog.text


def test_an_answer_file_that_answers_no_image_of_a_class_gives_no_class_averages(tmp_path):
    paths = write_cohort(tmp_path / "cohort")
    rows = [[p, p.split("/")[0], "ok"] if not p.startswith("healthy")
            else [p, "", "failed: refused to answer"] for p in paths]
    code, result = score_answers(tmp_path, rows)
    assert code == 0 and result["accuracy"] == pytest.approx(1.0)
    assert result["balanced_accuracy"] is None and result["macro_f1"] is None
    assert result["unscored_classes"] == ["healthy"]
    assert result["per_class"]["healthy"]["specificity"] is None


def test_a_subgroup_level_holding_one_class_reports_no_balanced_accuracy():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    levels = np.array(["A", "A", "B", "B", "B", "B"])  # level A holds only the rare class
    rows = {row["level"]: row for row in
            metrics.subgroup_rows(y_true, one_hot(y_true), levels, n_bootstrap=30, seed=0)}
    assert rows["A"]["accuracy"] == pytest.approx(1.0)
    assert rows["A"]["balanced_accuracy"] is None and rows["A"]["balanced_accuracy_ci"] is None
    assert rows["B"]["balanced_accuracy"] is None  # no rare image in B either


def test_a_compared_reader_who_answers_no_image_of_a_class_gets_no_class_averages():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    ours = metrics.ComparedModel("ours", y_true.copy(), one_hot(y_true))
    reader = metrics.ComparedModel("reader", np.array([0, 0, 1, 1, -1, -1]), None)
    rows = metrics.compare_predictions(y_true, ours, [reader], n_bootstrap=30, seed=0)["rows"]
    by_metric = {row["metric"]: row for row in rows}
    assert by_metric["balanced_accuracy"]["value"] is None
    assert by_metric["accuracy"]["value"] == pytest.approx(1.0)
    assert by_metric["accuracy"]["unanswered_classes"] == [2]


# ----------------------------------------------------------------------------------------------
# 3. Answer-file probabilities must sum to 1 (refused with the row number)


def probability_rows(paths, bad_row=None):
    """Right answers with probabilities 0.8/0.1/0.1; the cohort row `bad_row` gives 1.0 to its
    class and 0.999 to the others (the issue's file that scored log-loss and ECE 0.000)."""
    rows = []
    for i, path in enumerate(paths):
        k = CLASSES.index(path.split("/")[0])
        p = [0.999] * 3 if i == bad_row else [0.1] * 3
        p[k] = 1.0 if i == bad_row else 0.8
        rows.append([path, CLASSES[k], "ok", *p])
    return rows


PROB_HEADER = ("path", "answer", "status", *(f"prob_{c}" for c in CLASSES))


def test_answer_file_probabilities_that_do_not_sum_to_one_are_refused_with_the_row(tmp_path, capsys):
    paths = write_cohort(tmp_path / "cohort")
    code, result = score_answers(tmp_path, probability_rows(paths, bad_row=5), header=PROB_HEADER)
    err = capsys.readouterr().err
    assert code == 2 and result is None
    assert "row 7" in err and "sum to 2.998" in err  # row 1 is the header


def test_answer_file_probabilities_rounded_to_three_decimals_are_accepted(tmp_path):
    paths = write_cohort(tmp_path / "cohort")
    rows = [[p, a, s, "0.334", "0.333", "0.333"] if i == 0 else [p, a, s, *probs]
            for i, (p, a, s, *probs) in enumerate(probability_rows(paths))]
    code, result = score_answers(tmp_path, rows, header=PROB_HEADER)
    assert code == 0 and result["n"] == 12 and result["log_loss"] is not None


# ----------------------------------------------------------------------------------------------
# 7. A duplicated manifest row is refused with both row numbers, in checkpoint and answer mode


def duplicated_manifest(root, folders):
    """A manifest.csv of test rows (files never read) whose 5th data row repeats the 2nd."""
    rows = []
    for name in folders:
        for i in range(2):
            path = root / "images" / name / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read")
            rows.append([f"images/{name}/img{i}.png", name, "test"])
    rows.insert(4, rows[1])  # on file row 6 (row 1 is the header), first on row 3
    return write_csv(root / "manifest.csv", ["path", "label", "split"], rows)


def test_a_duplicated_manifest_row_is_refused_in_answer_mode(tmp_path, capsys):
    manifest = duplicated_manifest(tmp_path, CLASSES)
    answers = write_csv(tmp_path / "answers.csv", ["path", "answer"],
                        [[f"images/{c}/img{i}.png", c] for c in CLASSES for i in range(2)])
    out = tmp_path / "out"
    code = answer_files.main(["--test-dir", str(manifest), "--predictions", str(answers),
                              "--classes", ",".join(CLASSES), "--output-dir", str(out)])
    assert code == 2 and not out.exists()
    assert "row 6: image 'images/rare/img1.png' already on row 3" in capsys.readouterr().err


def test_a_duplicated_manifest_row_is_refused_in_checkpoint_mode(tmp_path, checkpoint, capsys):
    from conftest import tiny_metadata
    from orbital_clip import scoring
    manifest = duplicated_manifest(tmp_path, tiny_metadata()["class_folders"])
    out = tmp_path / "out"
    code = scoring.main(["--checkpoint", str(checkpoint), "--test-dir", str(manifest),
                         "--output-dir", str(out), "--device", "cpu"])
    first = tiny_metadata()["class_folders"][0]
    assert code == 2 and not (out / "metrics.json").exists()
    assert f"row 6: image 'images/{first}/img1.png' already on row 3" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 9. "n (patients)" prints no patient count when no groups are given


def test_subgroups_without_groups_print_no_patient_count(tmp_path):
    paths = write_cohort(tmp_path / "cohort")
    sites = write_csv(tmp_path / "metadata.csv", ["path", "site"],
                      [[p, "north" if i % 2 else "south"] for i, p in enumerate(paths)])
    rows = [[p, p.split("/")[0], "ok"] for p in paths]
    code, result = score_answers(tmp_path, rows, "--metadata", str(sites), "--subgroups", "site")
    assert code == 0
    assert [row["n_patients"] for row in result["subgroups"][0]["rows"]] == [None, None]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| north ⚠ | 6 | 2 |" in report and "6 (6)" not in report and "n (patients)" not in report


def test_subgroups_with_groups_print_the_patient_count():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    rows = metrics.subgroup_rows(y_true, one_hot(y_true), np.array(["A"] * 6),
                                 groups=np.array(["p1", "p1", "p2", "p3", "p4", "p4"]), n_bootstrap=0)
    assert rows[0]["n_patients"] == 4


# ----------------------------------------------------------------------------------------------
# 5. A numeric metadata column with a few 'NA' cells is binned, those cells 'missing', warned


def test_a_numeric_column_with_a_few_na_cells_is_binned_with_them_missing(tmp_path, capfd):
    paths = write_cohort(tmp_path / "cohort")
    ages = [str(20 + 5 * i) for i in range(len(paths))]  # 12 distinct ages
    ages[3], ages[7] = "NA", "unknown"
    metadata = write_csv(tmp_path / "metadata.csv", ["path", "age"], zip(paths, ages))
    rows = [[p, p.split("/")[0], "ok"] for p in paths]
    code, result = score_answers(tmp_path, rows, "--metadata", str(metadata),
                                 "--subgroups", "age", "--age-bins", "0,50,120")
    log = capfd.readouterr().err
    assert code == 0
    levels = {row["level"]: row["n"] for row in result["subgroups"][0]["rows"]}
    # ages 20..75 by 5 without 35 and 55: below 50 20,25,30,40,45; from 50 on 50,60,65,70,75
    assert levels == {"[0, 50)": 5, "[50, 120]": 5, "missing": 2}
    assert "--subgroups age: 2 of 12 values" in log and ("'NA'" in log or "'unknown'" in log)


def test_a_word_column_stays_categorical():
    from orbital_clip import evaluation
    levels = evaluation.attribute_levels("site", ["north", "south", "1", ""], None,
                                         ["a", "b", "c", "d"], "meta.csv")
    assert levels == ["north", "south", "1", "missing"]


# ----------------------------------------------------------------------------------------------
# 4. The declared --decision-rule decides comparison.csv and subgroups.csv, and each names it


def rare_sensitivity(y_true, pred):
    rare = np.asarray(y_true) == 0
    return float(np.mean(np.asarray(pred)[rare] == 0))


@pytest.mark.slow
def test_the_threshold_rule_decides_the_comparison_and_subgroup_tables(make_cohort, checkpoint, tmp_path):
    from test_inference import run_inference
    test_dir = make_cohort("external", (6, 8, 6), seed=3)
    first = tmp_path / "first"
    assert run_inference(test_dir, checkpoint, first) == 0
    ours = pd.read_csv(first / "predictions.csv", keep_default_na=False)
    folders = [c.removeprefix("prob_") for c in ours.columns if c.startswith("prob_")]
    probs = ours[[f"prob_{f}" for f in folders]].to_numpy()
    y = ours["true_label"].map(folders.index).to_numpy()
    cut = float(np.median(probs[:, 0]))  # a threshold at which the two rules disagree
    others = probs.copy()
    others[:, 0] = -1
    by_rule = np.where(probs[:, 0] >= cut, 0, others.argmax(axis=1))
    assert rare_sensitivity(y, by_rule) != rare_sensitivity(y, probs.argmax(axis=1))
    reader = ours[["path"]].assign(answer=[folders[k] for k in y])  # a reader who is always right
    reader.to_csv(tmp_path / "reader.csv", index=False)
    sites = write_csv(tmp_path / "sites.csv", ["path", "site"], [[p, "one"] for p in ours["path"]])
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--threshold", repr(cut), "--decision-rule",
                         "threshold", "--compare", f"reader={tmp_path / 'reader.csv'}",
                         "--metadata", str(sites), "--subgroups", "site") == 0
    comparison = pd.read_csv(out / "comparison.csv").set_index("metric")
    assert comparison.loc["rare_sensitivity", "ours_value"] == pytest.approx(rare_sensitivity(y, by_rule))
    assert comparison.loc["accuracy", "ours_value"] == pytest.approx(np.mean(by_rule == y))
    assert set(comparison["decision_rule"]) == {"threshold"}
    subgroups = pd.read_csv(out / "subgroups.csv")
    assert subgroups.loc[0, "rare_sensitivity"] == pytest.approx(rare_sensitivity(y, by_rule))
    assert subgroups.loc[0, "accuracy"] == pytest.approx(np.mean(by_rule == y))
    assert subgroups.loc[0, "decision_rule"] == "threshold"
    # item 13: the compared reader gets its own subgroup rows (always right)
    assert subgroups["model"].tolist() == ["ours", "reader"]
    assert subgroups.loc[1, "accuracy"] == pytest.approx(1.0)
    assert json.loads((out / "metrics.json").read_text())["decision_rule"] == "threshold"


# ----------------------------------------------------------------------------------------------
# 10. The rare class is named by the prompt set, and class order is presentation only


def test_answer_files_on_the_projects_classes_keep_orbital_disease_rare(tmp_path):
    from orbital_clip import prompts
    folders = prompts.class_folders(prompts.load_prompt_set(None))  # orbital disease first
    rows = []
    for name in sorted(folders):  # 'healthy eyes' sorts first
        for i in range(3):
            path = tmp_path / "cohort" / name / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read")
            rows.append([f"{name}/img{i}.png", name])
    answers = write_csv(tmp_path / "answers.csv", ["path", "answer"], rows)
    out = tmp_path / "out"
    assert answer_files.main(["--test-dir", str(tmp_path / "cohort"), "--predictions",
                              str(answers), "--output-dir", str(out), "--bootstrap", "0",
                              "--no-figures"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["rare_class"] == "orbital disease" == result["class_folders"][0]
    assert result["class_order"] == "the published prompt set's order"


@pytest.mark.parametrize("classes", [CLASSES, ["healthy", "common", "rare"]])
def test_a_label_tied_for_the_top_probability_is_refused_under_any_class_order(tmp_path, capsys, classes):
    paths = write_cohort(tmp_path / "cohort")
    rows = probability_rows(paths)
    rows[4][3:] = [0.45, 0.45, 0.1]  # common/img0, labelled common: tied with rare
    code, _result = score_answers(tmp_path, rows, "--classes", ",".join(classes), header=PROB_HEADER)
    assert code == 2 and "row 6" in capsys.readouterr().err


def test_renumbered_strata_draw_the_same_resamples():
    group_index = np.arange(9)
    y = np.array([0, 0, 1, 2, 2, 2, 1, 0, 2])
    relabel = np.array([2, 0, 1])  # class k is called relabel[k]
    draws = lambda strata: np.concatenate(list(metrics.resample_weights(group_index, 20, 5, strata=strata)))  # noqa: E731
    assert np.array_equal(draws(y), draws(relabel[y]))


def test_a_tie_in_rarity_does_not_follow_the_class_index():
    # patient a holds classes 0 and 1, each held by two patients: a tie broken by the first
    # patient holding the class, so renumbering the classes keeps a in the same stratum
    groups = np.array([0, 0, 1, 2])
    y = np.array([0, 1, 0, 1])
    relabel = np.array([1, 0])
    strata = metrics.bootstrap_strata(y, groups)
    assert np.array_equal(relabel[strata], metrics.bootstrap_strata(relabel[y], groups))


# ----------------------------------------------------------------------------------------------
# 2. Subgroup intervals that cannot vary are marked, untested and not drawn; small counts patients


def fixed_and_varying_cohort():
    """Site A: 3 patients, one per class, 10 images each (rare and common right, healthy wrong:
    accuracy 2/3); site B: one image; sites C and D: 24 one-image patients each, 8 per class."""
    y, pred, site, groups = [], [], [], []
    for k, right in ((0, True), (1, True), (2, False)):
        y += [k] * 10
        pred += [k if right else 0] * 10
        site += ["A"] * 10
        groups += [f"A{k}"] * 10
    y, pred, site, groups = y + [0], pred + [0], site + ["B"], groups + ["B0"]
    rng = np.random.default_rng(4)
    for name, p_right in (("C", 0.9), ("D", 0.4)):
        for i in range(24):
            k = i % 3
            y.append(k)
            pred.append(k if rng.random() < p_right else (k + 1) % 3)
            site.append(name)
            groups.append(f"{name}{i}")
    return np.array(y), np.array(pred), np.array(site), np.array(groups)


def test_a_level_of_one_patient_per_class_or_one_image_has_no_interval_and_is_not_tested():
    y, pred, site, groups = fixed_and_varying_cohort()
    (block,) = metrics.subgroup_analysis(y, one_hot(pred), {"site": site}, 0, groups, 60, seed=1)
    rows = {row["level"]: row for row in block["rows"]}
    assert rows["A"]["accuracy"] == pytest.approx(2 / 3)
    for level in "AB":
        assert rows[level]["no_variation"] and rows[level]["accuracy_ci"] is None, level
    assert not rows["C"]["no_variation"] and rows["C"]["accuracy_ci"] is not None
    assert rows["C"]["accuracy_ci_n_resamples"] == 60
    # 30 images and 10 rare images, but 3 patients: small by patients
    assert rows["A"]["small_n"] and rows["A"]["n_rare_patients"] == 1
    assert block["levels_not_tested"] == ["A", "B"]
    kept = np.isin(site, ["C", "D"])
    expected = metrics.homogeneity_test((pred == y)[kept], site[kept])
    assert block["accuracy_test"]["chi2"] == pytest.approx(expected["chi2"])
    assert block["accuracy_test"]["df"] == 1
    from orbital_clip.report import subgroups_markdown, subgroups_frame
    text = "\n".join(subgroups_markdown([block], "rare", True))
    assert "| A ⚠ | 30 (3) | 10 | 0.667 (no variation) |" in text
    assert "No variation (A, B)" in text and "fewer than 30 patients" in text
    assert subgroups_frame([block]).set_index("level")["no_variation"].to_dict() == {
        "A": True, "B": True, "C": False, "D": False}


# ----------------------------------------------------------------------------------------------
# 8. The sequential-change bootstrap is class-stratified and counts the resamples it drops


def test_the_sequential_change_bootstrap_keeps_the_rare_patients_and_counts_resamples():
    # 40 images of 20 patients (2 images each); 2 rare patients: an unstratified resample
    # lacks both about (18/20)^20 = 12% of the time (358 of 400 usable when planted)
    y = np.repeat([0, 0] + [1] * 9 + [2] * 9, 2)
    groups = np.repeat([f"p{i}" for i in range(20)], 2)
    step1 = y.copy()
    step1[[0, 2, 4, 6]] = 1  # misses of the rare class and of common
    step2 = y.copy()
    result = metrics.sequential_analysis(y, [step1, step2], CLASSES, ["a", "b"], groups,
                                         n_bootstrap=400, seed=0)
    rows = {(r["class"], r["measure"]): r for r in result["changes"]}
    rare = rows[("rare", "sensitivity")]
    assert rare["difference"] == pytest.approx(0.5)  # 2/4 -> 4/4
    assert rare["difference_ci_n_resamples"] == 400  # every resample holds both rare patients
    assert result["bootstrap_resamples"] == 400
    from orbital_clip.report import sequential_changes_frame
    frame = sequential_changes_frame(result)
    assert frame["difference_ci_n_resamples"].iloc[0] == 400


# ----------------------------------------------------------------------------------------------
# 13. Subgroup heterogeneity adjusted for class, and subgroup rows for every compared model


def class_mix_cohort():
    """Two age bins that differ only in their share of healthy eyes: within each class the
    accuracy is the same in both bins (rare 50%, healthy 100%), crude accuracy is not."""
    y, correct, age = [], [], []
    for level, n_rare, n_healthy in (("young", 40, 10), ("old", 10, 40)):
        for k, n, rate in ((0, n_rare, 0.5), (2, n_healthy, 1.0)):
            y += [k] * n
            correct += [i < rate * n for i in range(n)]
            age += [level] * n
    return np.array(y), np.array(correct), np.array(age)


def test_class_adjusted_heterogeneity_finds_none_where_only_the_class_mix_differs():
    y, correct, age = class_mix_cohort()
    assert metrics.homogeneity_test(correct, age)["p"] < 0.001  # the confounded crude test
    adjusted = metrics.stratified_homogeneity_test(correct, age, y)
    assert adjusted["chi2"] == pytest.approx(0.0, abs=1e-12) and adjusted["df"] == 1
    assert adjusted["p"] == pytest.approx(1.0)


def test_the_stratified_test_equals_statsmodels_for_two_levels():
    from statsmodels.stats.contingency_tables import StratifiedTable
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 300)
    level = rng.choice(["a", "b"], 300)
    correct = rng.random(300) < np.where(level == "a", 0.7, 0.55) - 0.1 * y
    tables = [np.array([[np.sum(m & (level == lv) & correct), np.sum(m & (level == lv) & ~correct)]
                        for lv in "ab"]) for m in (y == k for k in range(3))]
    reference = StratifiedTable(tables).test_null_odds(correction=False)
    ours = metrics.stratified_homogeneity_test(correct, level, y)
    assert ours["chi2"] == pytest.approx(reference.statistic) and ours["p"] == pytest.approx(reference.pvalue)


def test_the_stratified_test_with_one_stratum_is_the_crude_chi_square_times_n_minus_1_over_n():
    rng = np.random.default_rng(8)
    level = rng.choice(["a", "b", "c", "d"], 120)
    correct = rng.random(120) < np.select([level == "a", level == "b"], [0.8, 0.5], 0.65)
    crude = metrics.homogeneity_test(correct, level)
    ours = metrics.stratified_homogeneity_test(correct, level, np.zeros(120))
    assert ours["df"] == 3 and ours["chi2"] == pytest.approx(crude["chi2"] * 119 / 120)


def test_subgroup_analysis_reports_the_class_adjusted_test_beside_the_crude_one():
    y, correct, age = class_mix_cohort()
    pred = np.where(correct, y, 1)
    (block,) = metrics.subgroup_analysis(y, one_hot(pred), {"age": age}, 0, None, 0)
    assert block["accuracy_test"]["p"] < 0.001
    assert block["accuracy_test_class_adjusted"]["p"] == pytest.approx(1.0)
    from orbital_clip.report import subgroups_frame, subgroups_markdown
    frame = subgroups_frame([block])
    assert frame["p_heterogeneity_accuracy_class_adjusted"].tolist() == pytest.approx([1.0, 1.0])
    assert "adjusted for class" in "\n".join(subgroups_markdown([block], "rare", False))


def test_subgroup_rows_are_given_for_every_compared_model(tmp_path):
    from types import SimpleNamespace
    from orbital_clip import evaluation
    from orbital_clip.report import subgroups_frame
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 2])
    site = ["N"] * 6 + ["S"] * 4
    cohort = evaluation.Cohort([(tmp_path / f"{i}.png", k) for i, k in enumerate(y)], True, tmp_path)
    ours = one_hot(y)  # always right
    reader = metrics.ComparedModel("reader", np.array([0, 1, 1, 1, 2, -1, 0, 0, 0, 2]), None)
    args = SimpleNamespace(bootstrap=0, seed=0)
    analysis = evaluation.score_subgroups(cohort, {"site": site}, ours, np.ones(10, bool), 0, args,
                                          compared=[reader])
    frame = subgroups_frame(analysis).set_index(["model", "level"])
    assert frame.loc[("ours", "N"), "accuracy"] == pytest.approx(1.0)
    # the reader on the images it answered: N 4 of 5 right, S 2 of 4
    assert frame.loc[("reader", "N"), "n"] == 5
    assert frame.loc[("reader", "N"), "accuracy"] == pytest.approx(4 / 5)
    assert frame.loc[("reader", "S"), "accuracy"] == pytest.approx(2 / 4)
    assert pd.isna(frame.loc[("reader", "S"), "rare_auroc"])  # labels only: nothing ranked


# ----------------------------------------------------------------------------------------------
# 14. A patient whose attribute varies between images: counted once, and reported


def test_a_patient_with_a_missing_or_varying_attribute_is_counted_once(tmp_path, caplog):
    from types import SimpleNamespace
    from orbital_clip import evaluation
    from orbital_clip.report import subgroups_markdown
    # p1: A, A, missing -> A; p2: A, B -> inconsistent; p3: B; p4: missing
    groups = ["p1", "p1", "p1", "p2", "p2", "p3", "p4"]
    race = ["A", "A", "missing", "A", "B", "B", "missing"]
    y = np.array([0, 0, 0, 1, 1, 2, 2])
    cohort = evaluation.Cohort([(tmp_path / f"{i}.png", k) for i, k in enumerate(y)], True,
                               tmp_path, groups=groups)
    with caplog.at_level(logging.WARNING):
        (block,) = evaluation.score_subgroups(cohort, {"race": race}, one_hot(y), np.ones(7, bool),
                                              0, SimpleNamespace(bootstrap=0, seed=0))
    patients = {row["level"]: row["n_patients"] for row in block["rows"]}
    assert patients == {"A": 1, "B": 1, "inconsistent": 1, "missing": 1}  # 4 patients, not 6
    assert {row["level"]: row["n"] for row in block["rows"]}["A"] == 3
    assert (block["patients_varying"], block["patients_inconsistent"]) == (2, 1)
    assert "race: 2 patient(s) have different values" in caplog.text
    assert "2 patient(s) have different race values" in "\n".join(subgroups_markdown([block], "rare", True))


def test_an_attribute_whose_every_level_cannot_vary_is_untested_not_a_crash():
    y = np.array([0, 1, 2, 0])
    (block,) = metrics.subgroup_analysis(y, one_hot(y), {"site": np.array(["a", "a", "a", "b"])},
                                         0, None, 20, seed=0)
    assert block["levels_not_tested"] == ["a", "b"] and block["accuracy_test"]["p"] is None
