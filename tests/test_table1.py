"""Table 1 (report.table1): known answers on a hand-made frame, patients counted once; the table
data_preprocess.py writes beside split_summary.csv, checked against the manifest by hand."""

import numpy as np
import pandas as pd
import pytest

import data_preprocess
from orbital_clip.report.table1 import table1, table1_markdown
from conftest import write_csv

FOLDERS = ["a", "b"]
COMPARISON_P = ("p_bootstrap", "p_mcnemar_exact", "p_mcnemar_mid", "p_mcnemar_clustered", "p_delong")


def small_frame():
    """8 images of 6 patients; P1 has two images (counted once), P3 has no age, P4 no sex."""
    return pd.DataFrame({
        "split": ["train"] * 5 + ["val"] * 3,
        "label": ["a", "a", "b", "b", "b", "a", "b", "b"],
        "group": ["P1", "P1", "P2", "P3", "P3", "P4", "P5", "P6"],
        "age": ["40", "40", "50", "", "", "70", "30", "35"],
        "sex": ["F", "F", "M", "F", "F", "", "M", "M"]})


def cell(table, characteristic, level, column):
    row = table[(table["characteristic"] == characteristic) & (table["level"] == level)]
    assert len(row) == 1, (characteristic, level)
    return row.iloc[0][column]


def test_table1_counts_patients_once_and_summarises_by_hand():
    table = table1(small_frame(), FOLDERS, "split", ["age", "sex"])
    assert list(table.columns) == ["characteristic", "level", "train", "val", "overall"]
    assert [cell(table, "images", "n", c) for c in ("train", "val", "overall")] == ["5", "3", "8"]
    assert [cell(table, "patients", "n", c) for c in ("train", "val", "overall")] == ["3", "3", "6"]
    assert cell(table, "class, images", "a", "train") == "2 (40.0%)"
    assert cell(table, "class, patients", "a", "train") == "1 (33.3%)"  # P1 once
    # train patients' ages 40 (P1, once), 50; P3 missing. numpy's percentiles of [40, 50]:
    assert cell(table, "age, median [IQR]", "", "train") == "45.0 [42.5, 47.5]"
    assert np.percentile([30, 35, 40, 50, 70], [50, 25, 75]).tolist() == [40, 35, 50]
    assert cell(table, "age, median [IQR]", "", "overall") == "40.0 [35.0, 50.0]"
    assert cell(table, "age", "missing", "train") == "1 (33.3%)"
    assert cell(table, "sex", "F", "overall") == "2 (33.3%)"  # P1 and P3, of 6 patients
    assert cell(table, "sex", "F", "val") == "0 (0.0%)"
    assert cell(table, "sex", "missing", "val") == "1 (33.3%)"
    mean = table1(small_frame(), FOLDERS, "split", ["age"], style="mean")
    assert cell(mean, "age, mean (SD)", "", "overall") == f"45.0 ({np.std([30, 35, 40, 50, 70], ddof=1):.1f})"
    text = "\n".join(table1_markdown(table, "split"))
    assert "| patients | 3 | 3 | 6 |" in text and "| sex: missing | 0 (0.0%) | 1 (33.3%) | 1 (16.7%) |" in text


def test_table1_is_the_same_whatever_the_row_order():
    frame = small_frame()
    shuffled = frame.sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(table1(frame, FOLDERS, "split", ["age", "sex"]),
                                  table1(shuffled, FOLDERS, "split", ["age", "sex"]))


def test_a_patient_whose_images_disagree_takes_the_most_common_value():
    frame = pd.DataFrame({"split": ["train"] * 3, "label": ["a"] * 3, "group": ["P1"] * 3,
                          "sex": ["M", "F", "F"]})
    table = table1(frame, FOLDERS, "split", ["sex"])
    assert cell(table, "sex", "F", "overall") == "1 (100.0%)" and cell(table, "sex", "M", "overall") == "0 (0.0%)"


@pytest.mark.slow
def test_data_preprocess_writes_table1_equal_to_hand_counts_of_the_manifest(make_patient_cohort, tmp_path):
    cohort = make_patient_cohort(patients_per_class=(3, 5, 4), images_per_patient=(2, 3, 1))
    patients = sorted(set(cohort.patient_of.values()))
    age = {p: "" if i == 2 else str(30 + 3 * i) for i, p in enumerate(patients)}  # one patient without
    sex = {p: "FM"[i % 2] for i, p in enumerate(patients)}
    meta = tmp_path / "meta.csv"
    write_csv(meta, ["path", "age", "sex"],
              [[source, age[p], sex[p]] for source, p in sorted(cohort.patient_of.items())])
    out = tmp_path / "split"
    assert data_preprocess.main(["--data-root", str(cohort.root), "--out-dir", str(out),
                                 "--group-from-folder", "--val-ratio", "0.3", "--metadata", str(meta),
                                 "--no-progress"]) == 0
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    table = pd.read_csv(out / "table1.csv", dtype=str, keep_default_na=False)
    assert list(table.columns)[2:] == ["train", "val", "overall"]
    for split in ("train", "val"):
        mine = manifest[manifest["split"] == split]
        groups = sorted(mine["group"].unique())
        assert cell(table, "images", "n", split) == str(len(mine))
        assert cell(table, "patients", "n", split) == str(len(groups))
        ages = [float(age[g]) for g in groups if age[g]]
        q1, median, q3 = np.percentile(ages, [25, 50, 75])
        assert cell(table, "age, median [IQR]", "", split) == f"{median:.1f} [{q1:.1f}, {q3:.1f}]"
        women = sum(sex[g] == "F" for g in groups)
        assert cell(table, "sex", "F", split) == f"{women} ({100 * women / len(groups):.1f}%)"
    assert cell(table, "age", "missing", "overall") == f"1 ({100 / len(patients):.1f}%)"
    assert "| patients |" in (out / "table1.md").read_text()


@pytest.mark.slow
def test_inference_writes_table1_of_the_external_cohort_with_its_metadata(make_cohort, checkpoint, tmp_path):
    from test_compare import write_metadata
    from test_inference import run_inference
    test_dir = make_cohort("external", (4, 8, 6), seed=1)
    meta = write_metadata(test_dir, tmp_path / "meta.csv")
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--metadata", str(tmp_path / "meta.csv"),
                         "--subgroups", "site") == 0
    table = pd.read_csv(out / "table1.csv", dtype=str, keep_default_na=False)
    preds = pd.read_csv(out / "predictions.csv").merge(meta, on="path")
    folders = list(table.columns[2:-1])
    assert [cell(table, "images", "n", f) for f in folders] == [str((preds["true_label"] == f).sum()) for f in folders]
    for site, n in preds["site"].value_counts().items():  # no groups: each image its own patient
        assert cell(table, "site", site, "overall") == f"{n} ({100 * n / len(preds):.1f}%)"
    ages = preds["age"].dropna()
    q1, median, q3 = np.percentile(ages, [25, 50, 75])
    assert cell(table, "age, median [IQR]", "", "overall") == f"{median:.1f} [{q1:.1f}, {q3:.1f}]"
    report_md = (out / "report.md").read_text()
    assert "## Table 1" in report_md and (out / "table1.md").read_text().count("| site: site ") == len(preds["site"].unique())


# -- Table 2: one row per model, every number a comparison.csv cell ------------------------------

def assert_table2_equals_comparison(table2, comparison):
    """Each model's row of table2 against its comparison.csv rows, metric by metric."""
    assert table2["model"].tolist()[0] == "ours"
    assert table2["model"].tolist()[1:] == list(dict.fromkeys(comparison["model"]))
    for _i, r in comparison.iterrows():
        row = table2.set_index("model").loc[r["model"]]
        m = r["metric"]
        for mine, theirs in ((m, "model_value"), (f"{m}_ci_low", "model_ci_low"),
                             (f"{m}_difference", "difference"),
                             (f"{m}_difference_ci_high", "difference_ci_high")):
            assert row[mine] == pytest.approx(r[theirs], nan_ok=True), (r["model"], mine)
        test = row[f"{m}_p_test"]
        if isinstance(test, str):
            assert row[f"{m}_p"] == pytest.approx(r[test])
        else:  # no test applies (no difference): every p column of comparison.csv is empty
            assert r[list(COMPARISON_P)].isna().all() and np.isnan(row[f"{m}_p"])
        widest = comparison[comparison["metric"] == m].sort_values("n").iloc[-1]
        assert table2.set_index("model").loc["ours", m] == pytest.approx(widest["ours_value"], nan_ok=True)


def test_table2_cells_are_comparison_cells_and_p_follows_the_test_rule():
    from orbital_clip import metrics
    from orbital_clip.report import comparison_frame, table2_frame, table2_markdown
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 12)
    probs = rng.dirichlet(np.ones(3), len(y))
    probs[np.arange(len(y)), y] += 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    other = np.roll(probs, 3, axis=0)
    labels_only = np.where(rng.random(len(y)) < 0.8, y, (y + 1) % 3)
    labels_only[5] = -1  # one image without an answer
    comparison = metrics.compare_predictions(
        y, metrics.ComparedModel("ours", probs.argmax(axis=1), probs),
        [metrics.ComparedModel("cnn", other.argmax(axis=1), other),
         metrics.ComparedModel("reader", labels_only, None)], n_bootstrap=200)
    table = table2_frame(comparison)
    assert_table2_equals_comparison(table, comparison_frame(comparison))
    row = table.set_index("model")
    assert row.loc["cnn", "accuracy_p_test"] == "p_mcnemar_mid" and row.loc["cnn", "rare_auroc_p_test"] == "p_delong"
    assert row.loc["cnn", "macro_f1_p_test"] == "p_bootstrap" and row.loc["ours", "n"] == 36
    text = "\n".join(table2_markdown(table, 200))
    assert text.count("\n| ") == 4 and "| reader | 35 |" in text


@pytest.mark.slow
def test_inference_table2_equals_its_comparison_csv(make_cohort, checkpoint, tmp_path):
    from test_inference import run_inference
    test_dir = make_cohort("external", (4, 8, 6), seed=1)
    first = tmp_path / "first"
    assert run_inference(test_dir, checkpoint, first) == 0
    other = pd.read_csv(first / "predictions.csv")
    other.loc[:4, "pred_label"] = other.loc[:4, "true_label"]  # another model: five answers changed
    other.to_csv(tmp_path / "other.csv", index=False)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--compare", f"other={tmp_path / 'other.csv'}") == 0
    table2 = pd.read_csv(out / "table2.csv")
    assert_table2_equals_comparison(table2, pd.read_csv(out / "comparison.csv"))
    assert "### Table 2" in (out / "report.md").read_text() and "| other | 18 |" in (out / "table2.md").read_text()


@pytest.mark.slow
def test_table2_per_site_holds_each_models_accuracy_on_that_sites_images(make_cohort, checkpoint, tmp_path):
    from test_compare import write_metadata
    from test_inference import run_inference
    test_dir = make_cohort("external", (4, 8, 6), seed=1)
    meta = write_metadata(test_dir, tmp_path / "meta.csv")
    first = tmp_path / "first"
    assert run_inference(test_dir, checkpoint, first) == 0
    other = pd.read_csv(first / "predictions.csv")
    other.loc[:6, "pred_label"] = other.loc[:6, "true_label"]
    other.to_csv(tmp_path / "other.csv", index=False)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--compare", f"other={tmp_path / 'other.csv'}",
                         "--metadata", str(tmp_path / "meta.csv"), "--subgroups", "site") == 0
    by_site = pd.read_csv(out / "table2_by_site.csv")
    ours = pd.read_csv(out / "predictions.csv").merge(meta, on="path")
    theirs = other.set_index("path").loc[ours["path"]]
    assert sorted(by_site["site"].unique()) == sorted(meta["site"].dropna().unique())
    for site, block in by_site.groupby("site"):
        mine = (ours["site"] == site).to_numpy()
        truth = ours["true_label"].to_numpy()[mine]
        row = block.set_index("model")
        assert row.loc["ours", "accuracy"] == pytest.approx((ours["prediction"].to_numpy()[mine] == truth).mean())
        assert row.loc["other", "accuracy"] == pytest.approx((theirs["pred_label"].to_numpy()[mine] == truth).mean())
        assert row.loc["other", "n"] == mine.sum()
    assert "## site = site A" in (out / "table2.md").read_text()
