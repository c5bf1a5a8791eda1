"""report.py: known answers of the tables and the text of report.md (no model, no torch)."""

import numpy as np
import pytest
from scipy.stats import binomtest

from orbital_clip import metrics
from orbital_clip import report

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]


def test_format_value():
    assert report.format_value(None) == "n/a"
    assert report.format_value(0.83333, [0.5, 0.95]) == "0.833 (0.500–0.950)"


def test_flow_counts_add_up_per_class_and_reason():
    labels = [0, 0, 1, 1, 1, 2]
    statuses = ["ok", "failed: truncated image (x.jpg)", "ok", "failed: truncated image (y)",
                "failed: not an image", "ok"]
    flow = report.flow_counts(labels, statuses, FOLDERS, labelled=True)
    assert flow["rows"]["orbital disease"] == {"received": 2, "unreadable": 1, "scored": 1}
    assert flow["rows"]["healthy eyes"] == {"received": 3, "unreadable": 2, "scored": 1}
    assert flow["rows"]["total"] == {"received": 6, "unreadable": 3, "scored": 3}
    assert flow["reasons"] == {"truncated image": {"orbital disease": 1, "healthy eyes": 1,
                                                   "non-orbital disease": 0},
                               "not an image": {"orbital disease": 0, "healthy eyes": 1,
                                                "non-orbital disease": 0}}
    unlabelled = report.flow_counts([-1, -1], ["ok", "failed: x"], FOLDERS, labelled=False)
    assert unlabelled["rows"]["all images"] == {"received": 2, "unreadable": 1, "scored": 1}


def test_per_class_table_and_markdown_carry_the_metrics_json_values():
    y_true = np.array([0, 0, 1, 1, 1, 2, 2])
    probs = np.array([[.7, .2, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.6, .3, .1],
                      [.1, .2, .7], [.2, .1, .7]])
    result = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=0)
    frame = report.per_class_frame(result, FOLDERS)
    assert list(frame["class"]) == FOLDERS
    rare = frame.iloc[0]
    assert (rare["support"], rare["tp"], rare["fn"], rare["fp"]) == (2, 1, 1, 1)
    assert rare["sensitivity"] == pytest.approx(0.5)
    ci = binomtest(1, 2).proportion_ci(method="wilson")  # scipy's, not the code under test
    assert (rare["sensitivity_ci_low"], rare["sensitivity_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert rare["auroc_ci_low"] is None  # no bootstrap: no interval, an empty cell
    lines = report.metrics_markdown(result, FOLDERS)
    assert f"| accuracy | {report.format_value(5 / 7)} |" in lines
    row = next(line for line in lines if line.startswith("| orbital disease |"))
    assert row.startswith("| orbital disease | 2 (0.286) | 0.500 (0.095–0.905) |")


def test_lr_of_no_false_positive_is_infinite_without_an_interval_in_both_outputs():
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    probs = np.array([[.7, .2, .1], [.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.2, .7, .1],
                      [.1, .2, .7], [.2, .1, .7], [.1, .1, .8]])  # class 0: tp 2, fp 0
    result = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=0)
    rare = result["per_class"]["orbital disease"]
    assert (rare["fp"], rare["lr_pos"], rare["lr_pos_ci"]) == (0, None, None)
    frame = report.per_class_frame(result, FOLDERS)
    assert frame.loc[0, ["lr_pos", "lr_pos_ci_low", "lr_pos_ci_high"]].isna().all()  # empty cells
    row = next(line for line in report.metrics_markdown(result, FOLDERS)
               if line.startswith("| orbital disease |"))
    assert row.split(" | ")[6] == "∞ (FP = 0)"
    assert row.split(" | ")[7] == report.format_value(rare["lr_neg"], rare["lr_neg_ci"], 2)


def test_markdown_names_the_random_ranking_auprc_and_the_unusable_resamples():
    y_true = np.array([0, 1, 1, 1, 2, 2, 2, 2])
    probs = np.array([[.7, .2, .1], [.1, .8, .1], [.2, .7, .1], [.6, .3, .1], [.1, .2, .7],
                      [.2, .1, .7], [.1, .1, .8], [.3, .3, .4]])
    result = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=200, seed=0)
    lines = report.metrics_markdown(result, FOLDERS)
    row = next(line for line in lines if line.startswith("| orbital disease |"))
    chance = metrics.expected_random_average_precision(1, 8)  # H_8 / 8 = 0.340
    assert row.endswith(f"({chance:.3f}) |") and round(chance, 3) == 0.340
    # one rare image: stratified, every resample keeps it, so no interval lost a resample
    assert result["macro_auroc_ci_n_resamples"] == 200
    assert not any(line.startswith("Intervals resting on fewer") for line in lines)
    result["per_class"]["orbital disease"]["auroc_ci_n_resamples"] = 150
    note = next(line for line in report.metrics_markdown(result, FOLDERS)
                if line.startswith("Intervals resting on fewer"))
    assert "AUROC of orbital disease 150 of 200" in note


def test_operating_table_and_itd_lines_carry_patient_intervals_and_the_rule():
    y_true = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[.9, .05, .05], [.9, .05, .05], [.1, .8, .1], [.1, .8, .1], [.1, .8, .1],
                      [.1, .1, .8]])
    op = metrics.operating_point_metrics(y_true, probs, 0, 0.5, groups=np.array(list("AABCDE")),
                                         n_bootstrap=400, seed=0)
    op.update({"class": "orbital disease", "threshold": 0.5, "source": "user (--threshold)"})
    lines = report.operating_markdown(op)
    assert "sensitivity (patient CI)" in lines[2]
    rule = next(line for line in lines if line.startswith("| p ≥ 0.5000 |"))
    assert rule.endswith(f" {report.format_value(2 / 3, [0.0, 1.0])} | "
                         f"{report.format_value(1.0, [1.0, 1.0])} |")
    itd = metrics.intention_to_diagnose(y_true, np.array([0, 0, 1, 1, -1, 2]), 0)
    itd.update(metrics.intention_to_diagnose(y_true, np.array([0, 0, 0, 1, -1, 2]), 0, prefix="itd_rule"))
    (line,) = report.itd_markdown(itd, "orbital disease")
    # argmax: 3 of 6 right, 2 of 3 rare found; rule: 4 of 6, 3 of 3 (the failed image is an error)
    assert "argmax: accuracy 0.500 (" in line and "the operating rule: accuracy 0.667 (" in line
    assert "orbital disease sensitivity 0.667 (" in line and "orbital disease sensitivity 1.000 (" in line


def test_flow_counts_of_patients_when_groups_are_known():
    labels = [0, 0, 0, 1, 1, 2, 1]
    statuses = ["ok", "failed: truncated image", "ok", "ok", "failed: x", "ok", "ok"]
    groups = ["A", "A", "B", "C", "D", "D", "B"]  # B has images in classes 0 and 1, D in 1 and 2
    flow = report.flow_counts(labels, statuses, FOLDERS, True, groups)
    rows = flow["rows"]
    assert rows["orbital disease"] == {"received": 3, "unreadable": 1, "scored": 2, "patients_received": 2,
                                       "patients_unreadable": 1, "patients_scored": 2}
    assert rows["healthy eyes"] == {"received": 3, "unreadable": 1, "scored": 2, "patients_received": 3,
                                    "patients_unreadable": 1, "patients_scored": 2}
    assert (rows["total"]["patients_received"], rows["total"]["patients_unreadable"],
            rows["total"]["patients_scored"]) == (4, 2, 4)  # each patient once
    assert "patients_received" not in report.flow_counts(labels, statuses, FOLDERS, True)["rows"]["total"]
    lines = report.flow_markdown(flow)
    assert "patients received" in lines[0] and "| **total** | 7 | 2 | 5 | 4 | 2 | 4 |" in lines


def test_most_confident_errors_per_true_class():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[.2, .7, .1], [.1, .1, .8], [.9, .05, .05], [.6, .3, .1], [.1, .8, .1],
                      [.3, .3, .4]])
    rows = report.most_confident_errors(y_true, probs, 1)
    assert [(r["true"], r["index"], r["pred"], r["p_pred"]) for r in rows] == [(0, 1, 2, .8), (1, 3, 0, .6)]
    rows = report.most_confident_errors(y_true, probs, 5)
    assert [(r["true"], r["rank"], r["index"]) for r in rows] == [(0, 1, 1), (0, 2, 0), (1, 1, 3)]
    assert rows[1]["p_true"] == pytest.approx(.2)
    lines = report.failure_markdown([dict(rows[0], file="abc", thumbnail="failure_analysis/true0_1.png")],
                                    FOLDERS)
    assert lines[-1] == ("| orbital disease | 1 | ![error](failure_analysis/true0_1.png) | "
                         "non-orbital disease | 0.800 | 0.100 | `abc` |")


def test_checklist_map_numbers():
    text = "\n".join(" | ".join(row) for row in report.CHECKLIST_ROWS)
    assert "12a index test positivity cut-off" in text and "12b" not in text
    assert "19 flow of participants; 15 indeterminate and 16 missing" in text
    assert "14 methods for comparing measures of diagnostic accuracy" in text
    assert "updating (recalibration)" not in text and "model development, not updating" in text
    failure = next(row for row in report.CHECKLIST_ROWS if row[0].startswith("Failure analysis"))
    assert failure[4] == "failure analysis of incorrectly classified cases"
    predictions = next(row for row in report.CHECKLIST_ROWS if row[0] == "predictions.csv")
    assert "failure" not in predictions[4]


# -- the sequential section (answer files read at several steps) ------------------------------------

SEQ_STEPS = ["image", "image+demographics", "image+demographics+symptoms"]
SUBTYPES = ["thyroid eye disease", "orbital inflammation", "orbital tumour"]


def sequential_example():
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    preds = np.array([[0, 1, 2, 1, 0, 1, 2, 0, 0], [0, 0, -1, 1, 1, 1, 2, 2, 0],
                      [0, 0, 0, 1, -1, 0, 2, 2, 2]])
    return metrics.sequential_analysis(y, preds, SUBTYPES, SEQ_STEPS, n_bootstrap=0)


def test_unmapped_answers_are_one_reason_in_the_flow_table():
    statuses = ["ok", "failed: unmapped answer 'I cannot determine'", "failed: unmapped answer ''",
                "failed: image missing (not sent)"]
    flow = report.flow_counts([0, 0, 1, 2], statuses, SUBTYPES, labelled=True)
    assert flow["reasons"] == {"unmapped answer": {SUBTYPES[0]: 1, SUBTYPES[1]: 1, SUBTYPES[2]: 0},
                               "image missing": {SUBTYPES[0]: 0, SUBTYPES[1]: 0, SUBTYPES[2]: 1}}


def test_sequential_tables_and_markdown_carry_the_hand_values():
    seq = sequential_example()
    steps = report.sequential_frame(seq)
    ted = steps[(steps["class"] == SUBTYPES[0]) & (steps["measure"] == "sensitivity")]
    assert ted["step"].tolist() == SEQ_STEPS
    assert ted["hits"].tolist() == [1, 2, 3] and ted["n"].tolist() == [3, 2, 3]
    assert ted["ci_low"].iloc[0] == pytest.approx(metrics.wilson_interval(1, 3)[0])
    changes = report.sequential_changes_frame(seq)
    assert len(changes) == 12 + 6  # 2 changes x 3 classes x 2 measures, then 6 Cochran rows
    q = changes[changes["test"].str.startswith("Cochran")]
    tum = q[(q["class"] == SUBTYPES[2]) & (q["measure"] == "sensitivity")].iloc[0]
    assert tum["statistic"] == pytest.approx(3.0) and tum["df"] == 2 and tum["n"] == 3
    assert (tum["from_step"], tum["to_step"]) == (SEQ_STEPS[0], SEQ_STEPS[2])
    text = "\n".join(report.sequential_markdown(seq))
    assert ("| thyroid eye disease | sensitivity | 0.333 (0.061–0.792) [1/3] | "
            "1.000 (0.342–1.000) [2/2] | 1.000 (0.439–1.000) [3/3] | 2.00, df 2 (0.368) |") in text
    assert ("| orbital inflammation | sensitivity | image+demographics → "
            "image+demographics+symptoms | 2 | -0.500 | 0 / 1 | 0.500 (1.000) |") in text
    assert "the 7 of 9 images read at every step" in text


@pytest.mark.slow
def test_sequential_figure_is_drawn_from_the_per_step_values(tmp_path):
    saved = {}

    def save(fig, name, **kwargs):
        if name.endswith(".png"):
            ax = fig.axes[0]
            saved["ys"] = [line.get_ydata().tolist() for line in ax.lines if len(line.get_ydata()) == 3]
        fig.savefig(tmp_path / name, **kwargs)

    report.plot_sequential(sequential_example(), SUBTYPES, save)
    assert (tmp_path / "sequential.png").stat().st_size > 0 and (tmp_path / "sequential.pdf").is_file()
    assert [1 / 3, 1.0, 1.0] in [[pytest.approx(v) for v in ys] for ys in saved["ys"]]
