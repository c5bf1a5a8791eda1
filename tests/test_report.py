"""report.py: known answers of the tables and the text of report.md (no model, no torch)."""

import numpy as np
import pytest
from scipy.stats import binomtest

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
    ci = binomtest(1, 2).proportion_ci(method="wilson")  # scipy's, not the code under test
    assert (rare["sensitivity_ci_low"], rare["sensitivity_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert rare["auroc_ci_low"] is None  # no bootstrap: no interval, an empty cell
    lines = report.metrics_markdown(result, FOLDERS)
    assert f"| accuracy | {report.format_value(5 / 7)} |" in lines
    row = next(line for line in lines if line.startswith("| orbital disease |"))
    assert row.startswith("| orbital disease | 2 (0.286) | 0.500 (0.095–0.905) |")
