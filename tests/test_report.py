"""report.py: known answers of the tables and the text of report.md (no model, no torch)."""

import numpy as np
import pytest

import metrics
import report

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
    assert (rare["sensitivity_ci_low"], rare["sensitivity_ci_high"]) == pytest.approx(
        metrics.wilson_interval(1, 2))
    assert rare["auroc_ci_low"] is None  # no bootstrap: no interval, an empty cell
    lines = report.metrics_markdown(result, FOLDERS)
    assert f"| accuracy | {report.format_value(5 / 7)} |" in lines
    row = next(line for line in lines if line.startswith("| orbital disease |"))
    assert row.startswith("| orbital disease | 2 (0.286) | 0.500 (0.095–0.905) |")


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
