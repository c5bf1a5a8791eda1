"""Table 1 (report.table1): known answers on a hand-made frame, patients counted once; the table
data_preprocess.py writes beside split_summary.csv, checked against the manifest by hand."""

import numpy as np
import pandas as pd
import pytest

import data_preprocess
from orbital_clip.report.table1 import table1, table1_markdown
from conftest import write_csv

FOLDERS = ["a", "b"]


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
