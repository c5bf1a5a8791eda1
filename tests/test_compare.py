"""--compare and --baseline (paired comparison), the external-predictions reader, DeLong's test,
the clustered McNemar test and the subgroup analysis: known answers and independent
recomputations (scikit-learn, scipy, statsmodels, explicit loops)."""

from pathlib import Path

import numpy as np
import pytest

from orbital_clip import answers as answer_files
from conftest import TINY_MODEL, tiny_metadata, tree_state, write_csv
from conftest import write_model_checkpoint

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]
PATHS = ["orbital disease/a.png", "healthy eyes/b.png", "healthy eyes/c.png",
         "non-orbital disease/d.png"]
TRUE = ["orbital disease", "healthy eyes", "healthy eyes", "non-orbital disease"]


# -- the reader -----------------------------------------------------------------------------------

def test_reader_matches_paths_to_the_cohort_order_and_maps_probabilities_by_name(tmp_path):
    # rows in another order, prob columns in another class order, Windows separators
    rows = [["non-orbital disease\\d.png", "non-orbital disease", 0.1, 0.7, 0.2, "ok"],
            ["./orbital disease/a.png", " Orbital Disease ", 0.2, 0.1, 0.7, "ok"],
            ["healthy eyes/c.png", "", "", "", "", "failed: truncated image"],
            ["healthy eyes/b.png", "healthy eyes", 1.0, 0.0, 0.0, "ok"]]
    path = write_csv(tmp_path / "p.csv", ["path", "pred_label", "prob_healthy eyes",
                                          "prob_non-orbital disease", "prob_orbital disease", "status"], rows)
    result = answer_files.read_external_predictions(path, PATHS, FOLDERS)
    assert result.paths == PATHS
    assert result.pred_index.tolist() == [0, 1, -1, 2]
    assert result.statuses == ["ok", "ok", "failed: truncated image", "ok"]
    np.testing.assert_allclose(result.probs[0], [0.7, 0.2, 0.1])  # orbital, healthy, non-orbital
    np.testing.assert_allclose(result.probs[3], [0.2, 0.1, 0.7])
    np.testing.assert_allclose(result.probs[1], [0.0, 1.0, 0.0])
    assert np.isnan(result.probs[2]).all()
    assert result.answer_column == "pred_label"


def test_reader_without_probabilities_and_with_an_answer_column(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["answer", "path"],
                     [["orbital disease", p] for p in PATHS])
    result = answer_files.read_external_predictions(path, PATHS, FOLDERS)
    assert result.probs is None and result.answer_column == "answer"
    assert result.pred_index.tolist() == [0, 0, 0, 0]


def test_label_map_turns_unmapped_empty_and_refused_answers_into_failed_rows(tmp_path):
    answers = ["Orbital  CELLULITIS", "I cannot answer that", "", "normal"]
    path = write_csv(tmp_path / "p.csv", ["path", "answer"], list(zip(PATHS, answers)))
    label_map = {"orbital disease": ["orbital cellulitis", "thyroid eye disease"],
                 "healthy eyes": ["Normal", "no disease"]}
    result = answer_files.read_external_predictions(path, PATHS, FOLDERS, label_map=label_map)
    assert result.pred_index.tolist() == [0, -1, -1, 1]
    assert result.statuses == ["ok", "failed: unmapped answer 'I cannot answer that'",
                               "failed: unmapped answer ''", "ok"]


@pytest.mark.parametrize("header, rows, label_map, expected", [
    (["path", "pred_label"], [[p, "healthy eyes"] for p in PATHS[:3]], None,
     "no row for image 'non-orbital disease/d.png'"),
    (["path", "pred_label"], [[p, "healthy eyes"] for p in PATHS] + [["x/e.png", "healthy eyes"]],
     None, "row 6: image 'x/e.png' is not in the cohort"),
    (["path", "pred_label"], [[p, "healthy eyes"] for p in PATHS[:2]] + [[PATHS[0], "healthy eyes"]],
     None, "row 4: image 'orbital disease/a.png' already on row 2"),
    (["path", "pred_label"], [[PATHS[0], "healthy eyes"], [PATHS[1], "glaucoma"]], None,
     "row 3: pred_label 'glaucoma' is not a class"),
    (["path", "pred_label"], [[PATHS[0], "healthy eyes"], [PATHS[1], ""]], None,
     "row 3: pred_label '' is not a class"),
    (["path", "pred_label"], [[PATHS[0], "healthy eyes"], [PATHS[1], "healthy eyes", "x"]], None,
     "row 3: 3 fields, the header has 2"),
    (["path", "label"], [[p, "healthy eyes"] for p in PATHS], None,
     "row 1: needs a 'path' and a 'pred_label' (or 'answer') column"),
    (["path", "pred_label", "prob_orbital disease"], [[p, "healthy eyes", 0.5] for p in PATHS], None,
     "row 1: has prob_ columns but lacks 'prob_healthy eyes'"),
    (["path", "pred_label", "prob_glaucoma"], [[p, "healthy eyes", 0.5] for p in PATHS], None,
     "row 1: column 'prob_glaucoma' is not a class"),
    (["path", "pred_label", "prob_orbital disease", "prob_healthy eyes", "prob_non-orbital disease"],
     [[PATHS[0], "healthy eyes", 0.1, 0.8, 0.1], [PATHS[1], "healthy eyes", 0.1, "high", 0.1]], None,
     "row 3: probabilities"),
    (["path", "pred_label", "true_label"], [[PATHS[0], "healthy eyes", "healthy eyes"]], None,
     "row 2: true_label 'healthy eyes' of 'orbital disease/a.png' differs"),
    (["path", "pred_label"], [], None, "row 2: no data rows"),
    (["path", "answer"], [[PATHS[0], "x"]], {"glaucoma": ["g"]}, "label map names 'glaucoma'"),
])
def test_reader_refusals_name_the_flag_file_and_first_offending_row(tmp_path, header, rows,
                                                                    label_map, expected):
    path = write_csv(tmp_path / "p.csv", header, rows)
    with pytest.raises(ValueError) as info:
        answer_files.read_external_predictions(path, PATHS, FOLDERS, "--compare cnn=", label_map,
                                            true_labels=TRUE)
    message = str(info.value)
    assert message.startswith(f"--compare cnn= {path}: ") and "\n" not in message
    assert expected in message


def test_reader_refuses_an_empty_and_a_binary_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81\x82path")
    for path, expected in ((empty, "row 1: empty file"), (binary, "not a readable UTF-8 CSV")):
        with pytest.raises(ValueError, match=expected):
            answer_files.read_external_predictions(path, PATHS, FOLDERS)


# -- DeLong, clustered McNemar ------------------------------------------------------------------

def delong_by_definition(positive, a, b):
    """DeLong 1988 written out with the n_pos x n_neg kernel comparisons (independent of the
    binary-search implementation): (auc_a, auc_b, variance of the difference)."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    kernel = lambda x, y: 1.0 if x > y else (0.5 if x == y else 0.0)  # noqa: E731
    components = []
    for s in (a, b):
        v10 = np.array([np.mean([kernel(s[i], s[j]) for j in neg]) for i in pos])
        v01 = np.array([np.mean([kernel(s[i], s[j]) for i in pos]) for j in neg])
        components.append((v10, v01))
    (a10, a01), (b10, b01) = components
    m, n = len(pos), len(neg)
    s10 = np.cov(a10, b10)
    s01 = np.cov(a01, b01)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return a10.mean(), b10.mean(), var


def test_delong_equals_the_definition_and_sklearn_with_ties():
    from scipy.stats import norm
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(3)
    positive = rng.random(60) < 0.3
    a = np.round(rng.random(60) + positive * 0.6, 1)  # rounded: many ties
    b = np.round(rng.random(60) + positive * 0.3, 1)
    result = __import__("orbital_clip.metrics").metrics.delong_test(positive, a, b)
    auc_a, auc_b, var = delong_by_definition(positive, a, b)
    assert result["auroc_a"] == pytest.approx(roc_auc_score(positive, a)) == pytest.approx(auc_a)
    assert result["auroc_b"] == pytest.approx(roc_auc_score(positive, b)) == pytest.approx(auc_b)
    assert result["se"] == pytest.approx(np.sqrt(var))
    assert result["p"] == pytest.approx(2 * norm.sf(abs(auc_a - auc_b) / np.sqrt(var)))


def test_delong_of_identical_scores_has_no_p():
    from orbital_clip import metrics
    positive = np.array([1, 0, 1, 0, 0, 1], bool)
    scores = np.array([0.9, 0.1, 0.4, 0.5, 0.2, 0.8])
    result = metrics.delong_test(positive, scores, scores)
    assert result["difference"] == 0 and result["p"] is None


def test_obuchowski_clustered_mcnemar_hand_computed_example():
    """A hand-computed example (the 1998 paper's own data were not at hand): four patients with
    d = A correct - B correct of [1, 0], [1], [-1, 0, 0], [0, 0]: D_k = 1, 1, -1, 0, K = 4;
    X^2 = (K - 1) / K * (sum D_k)^2 / sum D_k^2 = 3/4 * 1 / 3 = 1/4."""
    from orbital_clip import metrics
    from scipy.stats import chi2
    correct_a = np.array([1, 1, 1, 0, 1, 1, 0, 0])
    correct_b = np.array([0, 1, 0, 1, 1, 1, 0, 0])
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3", "p4", "p4"])
    result = metrics.obuchowski_test(correct_a, correct_b, groups)
    assert result["difference"] == pytest.approx(1 / 8)
    assert result["chi2"] == pytest.approx(1 / 4)
    assert result["p"] == pytest.approx(chi2.sf(1 / 4, 1))
    assert result["n_clusters"] == 4


def test_obuchowski_is_mcnemar_with_one_image_per_patient_and_never_collapses():
    """One image per patient: McNemar's uncorrected chi-square (statsmodels) times (K - 1) / K.
    Every patient favouring one model (the same discordance everywhere) must not give an
    absurdly small p: 10 patients of 2 images, B wrong on one image of 9 of them: 9/10 * 81/9."""
    from orbital_clip import metrics
    from statsmodels.stats.contingency_tables import mcnemar
    rng = np.random.default_rng(7)
    correct_a, correct_b = rng.random(60) < 0.7, rng.random(60) < 0.5
    table = [[np.sum(correct_a & correct_b), np.sum(correct_a & ~correct_b)],
             [np.sum(~correct_a & correct_b), np.sum(~correct_a & ~correct_b)]]
    reference = mcnemar(table, exact=False, correction=False).statistic
    result = metrics.obuchowski_test(correct_a, correct_b, np.arange(60).astype(str))
    assert result["chi2"] == pytest.approx(59 / 60 * reference)
    groups = np.repeat([f"p{i}" for i in range(10)], 2)
    a = np.ones(20, bool)
    b = a.copy()
    b[0:18:2] = False
    result = metrics.obuchowski_test(a, b, groups)
    assert result["chi2"] == pytest.approx(8.1) and result["p"] > 1e-3
    b[18] = False  # all ten patients favour A: still a p-value, not 'n/a'
    assert metrics.obuchowski_test(a, b, groups)["chi2"] == pytest.approx(9.0)
    assert metrics.obuchowski_test(a, a, groups)["p"] is None  # no discordant patient


def recomputed_metrics(y, pred, probs, rare):
    """COMPARISON_METRICS by scikit-learn (an independent recomputation)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score
    out = {"accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
           "macro_f1": f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0),
           "rare_sensitivity": recall_score(y == rare, pred == rare),
           "rare_specificity": recall_score(y != rare, pred != rare)}
    if probs is not None:
        aucs = [roc_auc_score(y == k, probs[:, k]) for k in range(3)]
        out.update(macro_auroc=np.mean(aucs), rare_auroc=aucs[rare])
    return out


def synthetic_models(seed=0, n=80):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.2, 0.5, 0.3])
    logits_a, logits_b = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    logits_a[np.arange(n), y] += 1.5
    logits_b[np.arange(n), y] += 0.8
    probs_a = np.exp(logits_a) / np.exp(logits_a).sum(1, keepdims=True)
    probs_b = np.exp(logits_b) / np.exp(logits_b).sum(1, keepdims=True)
    return y, probs_a, probs_b


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.slow
def test_compare_predictions_equals_sklearn_and_an_explicit_paired_bootstrap(grouped):
    from orbital_clip import metrics
    from statsmodels.stats.contingency_tables import mcnemar
    y, probs_a, probs_b = synthetic_models()
    n, rare, n_boot = len(y), 0, 40
    pred_b = probs_b.argmax(1)
    pred_b[[3, 10]] = -1  # two images the other model did not answer
    groups = np.array([f"p{i // 3}" for i in range(n)]) if grouped else None
    reference = metrics.ComparedModel("ours", probs_a.argmax(1), probs_a)
    other = metrics.ComparedModel("cnn", pred_b, np.where(pred_b[:, None] >= 0, probs_b, np.nan))
    result = metrics.compare_predictions(y, reference, [other], rare, groups, n_boot, seed=11)
    rows = {row["metric"]: row for row in result["rows"]}
    keep = pred_b >= 0
    mine = recomputed_metrics(y[keep], pred_b[keep], probs_b[keep], rare)
    theirs = recomputed_metrics(y[keep], probs_a.argmax(1)[keep], probs_a[keep], rare)
    for metric, row in rows.items():
        assert row["n"] == 78 and row["n_no_answer"] == 2
        assert row["value"] == pytest.approx(mine[metric])
        assert row["reference_value"] == pytest.approx(theirs[metric])
        assert row["difference"] == pytest.approx(theirs[metric] - mine[metric])  # ours - model
    # the bootstrap, replayed: the resamples of metrics.json (groups or images, stratified by
    # class; their draws are tested in test_metrics), metrics by scikit-learn
    group_index = metrics.group_indices(groups, n)
    strata = metrics.bootstrap_strata(y, group_index)
    weights = np.concatenate(list(metrics.resample_weights(group_index, n_boot, 11, strata=strata)))
    diffs = {metric: [] for metric in rows}
    for weight in weights:
        idx = np.repeat(np.arange(n), weight.astype(int))
        idx = idx[keep[idx]]
        a = recomputed_metrics(y[idx], pred_b[idx], probs_b[idx], rare)
        b = recomputed_metrics(y[idx], probs_a.argmax(1)[idx], probs_a[idx], rare)
        for metric in rows:
            diffs[metric].append(b[metric] - a[metric])
    for metric, row in rows.items():
        assert row["difference_ci"] == pytest.approx(list(np.percentile(diffs[metric], [2.5, 97.5])))
    correct_a, correct_b = pred_b[keep] == y[keep], probs_a.argmax(1)[keep] == y[keep]
    table = [[np.sum(correct_a & correct_b), np.sum(correct_a & ~correct_b)],
             [np.sum(~correct_a & correct_b), np.sum(~correct_a & ~correct_b)]]
    assert rows["accuracy"]["p_mcnemar_exact"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert rows["accuracy"]["model_only_correct"] == table[0][1]
    assert (rows["accuracy"]["p_mcnemar_clustered"] is not None) == grouped
    expected = metrics.delong_test(y[keep] == rare, probs_a[keep, rare], probs_b[keep, rare])["p"]
    assert rows["rare_auroc"]["p_delong"] == pytest.approx(expected)


def one_metric(metric, y, pred, probs, rare=0):
    """One COMPARISON_METRICS value by scikit-learn."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score
    return {"accuracy": lambda: accuracy_score(y, pred),
            "balanced_accuracy": lambda: balanced_accuracy_score(y, pred),
            "macro_f1": lambda: f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0),
            "rare_sensitivity": lambda: recall_score(y == rare, pred == rare),
            "rare_specificity": lambda: recall_score(y != rare, pred != rare),
            "macro_auroc": lambda: np.mean([roc_auc_score(y == k, probs[:, k]) for k in range(3)]),
            "rare_auroc": lambda: roc_auc_score(y == rare, probs[:, rare])}[metric]()


USABLE_IF = {  # which classes a resample's answered images must hold for each metric
    "accuracy": (), "rare_specificity": (), "balanced_accuracy": (0, 1, 2), "macro_f1": (0, 1, 2),
    "macro_auroc": (0, 1, 2), "rare_sensitivity": (0,), "rare_auroc": (0,)}


@pytest.mark.parametrize("sparse_class", [0, 2])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.slow
def test_comparison_leaves_out_resamples_without_an_answered_image_of_a_class(sparse_class, grouped):
    """metrics.json's rule in the comparison: the other model answered 2 images of one class, so
    some resamples hold no answered image of it. Those give no balanced accuracy, macro F1 or
    macro AUROC (and, for the rare class, no rare sensitivity or AUROC): left out for both models
    and counted in n_resamples, instead of an average over two classes."""
    from orbital_clip import metrics
    from orbital_clip import report
    y, probs_a, probs_b = synthetic_models(seed=3, n=40)
    rare, n, n_boot = 0, len(y), 200
    groups = np.array([f"p{i // 2}" for i in range(n)]) if grouped else None
    pred_b = probs_b.argmax(1)
    pred_b[np.flatnonzero(y == sparse_class)[2:]] = -1  # answered only two images of the class
    reference = metrics.ComparedModel("ours", probs_a.argmax(1), probs_a)
    other = metrics.ComparedModel("mllm", pred_b, np.where(pred_b[:, None] >= 0, probs_b, np.nan))
    result = metrics.compare_predictions(y, reference, [other], rare, groups, n_boot, seed=5)
    rows = {row["metric"]: row for row in result["rows"]}
    keep = pred_b >= 0
    index = metrics.group_indices(groups, n)
    weights = np.concatenate(list(metrics.resample_weights(
        index, n_boot, 5, strata=metrics.bootstrap_strata(y, index))))
    replay = {metric: ([], []) for metric in rows}  # (model, ours) per usable resample
    for weight in weights:
        idx = np.repeat(np.arange(n), weight.astype(int))
        idx = idx[keep[idx]]
        for metric, needed in USABLE_IF.items():
            if set(needed) <= set(y[idx].tolist()):
                replay[metric][0].append(one_metric(metric, y[idx], pred_b[idx], probs_b[idx]))
                replay[metric][1].append(one_metric(metric, y[idx], probs_a.argmax(1)[idx], probs_a[idx]))
    for metric, (theirs, mine) in replay.items():
        row, diff = rows[metric], np.subtract(mine, theirs)
        assert row["n_resamples"] == len(diff), metric
        assert row["value_ci"] == pytest.approx(list(np.percentile(theirs, [2.5, 97.5]))), metric
        assert row["reference_ci"] == pytest.approx(list(np.percentile(mine, [2.5, 97.5]))), metric
        assert row["difference_ci"] == pytest.approx(list(np.percentile(diff, [2.5, 97.5]))), metric
        tied = np.round(diff, 12)  # scikit-learn's ties are off zero by ~1e-16
        assert row["p_bootstrap"] == pytest.approx(min(1.0, 2 * min(np.mean(tied <= 0), np.mean(tied >= 0))))
    short = rows["balanced_accuracy"]["n_resamples"]
    assert 0 < short < n_boot and rows["accuracy"]["n_resamples"] == n_boot  # the case happens
    assert (rows["rare_sensitivity"]["n_resamples"] < n_boot) == (sparse_class == rare)
    notes = report.comparison_resample_notes(result)
    assert f"mllm: balanced accuracy on {short} of {n_boot} resamples" in notes
    assert rows["accuracy"]["unanswered_classes"] == []


def test_a_class_never_answered_leaves_class_averaged_metrics_undefined():
    """A reader who answered no image of class 2: balanced accuracy and macro F1 are n/a (as
    macro AUROC), not averages over two classes; one who answered nothing has no metric at all."""
    from orbital_clip import metrics
    from orbital_clip import report
    y, probs_a, _ = synthetic_models(seed=6, n=40)
    reference = metrics.ComparedModel("ours", probs_a.argmax(1), probs_a)
    pred = np.where(y == 2, -1, probs_a.argmax(1))
    silent = metrics.ComparedModel("silent", np.full(len(y), -1), None)
    result = metrics.compare_predictions(y, reference, [metrics.ComparedModel("partial", pred, None), silent],
                                         0, None, 50, seed=1)
    rows = {(row["model"], row["metric"]): row for row in result["rows"]}
    for metric in ("balanced_accuracy", "macro_f1"):
        row = rows["partial", metric]
        assert (row["value"], row["reference_value"], row["difference"], row["difference_ci"]) == (None,) * 4
    assert rows["partial", "accuracy"]["value"] == pytest.approx(np.mean((pred == y)[pred >= 0]))
    assert rows["partial", "rare_sensitivity"]["difference"] == 0.0  # the rare class was answered
    assert rows["partial", "accuracy"]["unanswered_classes"] == [2]
    assert all(row["value"] is None for (model, _), row in rows.items() if model == "silent")
    assert report.unanswered_notes(result, FOLDERS) == [
        "partial answered no image of 'non-orbital disease'",
        "silent answered no image of 'orbital disease', 'healthy eyes', 'non-orbital disease'"]


def test_the_same_model_in_another_class_order_gives_zero_differences():
    """Issue 14 item 1: the same predictions, their probability columns permuted and mapped back
    by folder name, differ from the reference by exactly 0 with no discordant pair."""
    from orbital_clip import metrics
    y, probs_a, _ = synthetic_models(seed=4)
    reference = metrics.ComparedModel("ours", probs_a.argmax(1), probs_a)
    result = metrics.compare_predictions(y, reference, [metrics.ComparedModel("same", probs_a.argmax(1), probs_a)],
                                         0, None, 30, seed=1)
    for row in result["rows"]:
        assert row["difference"] == 0 and row["difference_ci"] == [0.0, 0.0]
    accuracy = next(r for r in result["rows"] if r["metric"] == "accuracy")
    assert accuracy["model_only_correct"] == accuracy["reference_only_correct"] == 0
    assert accuracy["p_mcnemar_exact"] is None


def test_labels_only_model_has_no_auroc_rows_values():
    from orbital_clip import metrics
    y, probs_a, probs_b = synthetic_models(seed=5)
    reference = metrics.ComparedModel("ours", probs_a.argmax(1), probs_a)
    result = metrics.compare_predictions(y, reference, [metrics.ComparedModel("reader", probs_b.argmax(1), None)],
                                         0, None, 20)
    rows = {row["metric"]: row for row in result["rows"]}
    assert rows["macro_auroc"]["value"] is None and rows["rare_auroc"]["p_delong"] is None
    assert rows["accuracy"]["value"] == pytest.approx(np.mean(probs_b.argmax(1) == y))


# -- inference.py --compare / --baseline end to end ----------------------------------------------

import json  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from orbital_clip import checkpoint as ckpt
from orbital_clip import models
from orbital_clip import prompts
from test_inference import exit_code, run_inference  # noqa: E402


def read_csv(path):
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


@pytest.mark.slow
def test_compare_file_rows_equal_sklearn_on_the_predictions_files(make_cohort, checkpoint, tmp_path):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    test_dir = make_cohort("external", (4, 10, 6), seed=1)
    first = tmp_path / "first"
    assert run_inference(test_dir, checkpoint, first) == 0
    ours = read_csv(first / "predictions.csv")
    # another model: our answers with 5 changed, probability columns in another order, one no-answer
    other = ours[["path", "true_label", "pred_label"] + [f"prob_{f}" for f in reversed(FOLDERS)]].copy()
    columns = [f"prob_{f}" for f in FOLDERS]
    right = ours.index[ours["pred_label"] == ours["true_label"]]  # changes that are discordant
    for i in right[:5]:  # class k's probability moves to class k + 1, and the answer with it
        other.loc[i, "pred_label"] = FOLDERS[(FOLDERS.index(other.loc[i, "pred_label"]) + 1) % 3]
        other.loc[i, columns] = np.roll(ours.loc[i, columns].to_numpy(dtype=float), 1)
    other["status"] = "ok"
    other.loc[7, "status"] = "failed: no answer"
    other = other.sample(frac=1.0, random_state=0)  # row order does not matter
    other.to_csv(tmp_path / "other.csv", index=False)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--compare", f"cnn={tmp_path / 'other.csv'}",
                         "--seed", "5") == 0
    table = read_csv(out / "comparison.csv")
    assert list(table["model"].unique()) == ["cnn"]
    rows = table.set_index("metric")
    other = other.set_index("path").loc[ours["path"]]  # back in cohort order
    keep = (other["status"] == "ok").to_numpy()
    y = ours["true_label"].map(FOLDERS.index).to_numpy()[keep]
    pred_ours = ours["pred_label"].map(FOLDERS.index).to_numpy()[keep]
    pred_other = other["pred_label"].map(FOLDERS.index).to_numpy()[keep]
    assert rows.loc["accuracy", "n"] == 19 and rows.loc["accuracy", "n_no_answer"] == 1
    assert rows.loc["accuracy", "model_value"] == pytest.approx(accuracy_score(y, pred_other))
    assert rows.loc["accuracy", "ours_value"] == pytest.approx(accuracy_score(y, pred_ours))
    assert rows.loc["balanced_accuracy", "difference"] == pytest.approx(
        balanced_accuracy_score(y, pred_ours) - balanced_accuracy_score(y, pred_other))
    p_other = other[[f"prob_{f}" for f in FOLDERS]].to_numpy()[keep]
    assert rows.loc["rare_auroc", "model_value"] == pytest.approx(roc_auc_score(y == 0, p_other[:, 0]), abs=1e-6)
    assert rows.loc["accuracy", "ours_only_correct"] == np.sum((pred_ours == y) & (pred_other != y))
    assert not np.isnan(rows.loc["rare_auroc", "p_delong"]) and np.isnan(rows.loc["accuracy", "p_delong"])
    assert {"p_bootstrap", "p_mcnemar_exact", "p_mcnemar_mid", "p_mcnemar_clustered"} <= set(table.columns)
    assert "p_value" not in table.columns
    report_md = (out / "report.md").read_text()
    assert "## Comparison with other models" in report_md and "McNemar mid-p" in report_md
    assert json.loads((out / "metrics.json").read_text())["compared_models"]["cnn"].startswith("--compare")


@pytest.mark.slow
def test_compare_file_without_most_rare_answers_counts_its_usable_resamples(make_cohort, checkpoint,
                                                                          tmp_path, capsys):
    """A reader who answered 1 of the 4 rare images: the rare class is missing from some
    resamples of the images it answered; comparison.csv says on how many resamples each interval
    rests, report.md and the log name the short ones."""
    test_dir = make_cohort("external", (4, 10, 6), seed=1)
    assert run_inference(test_dir, checkpoint, tmp_path / "first") == 0
    other = read_csv(tmp_path / "first" / "predictions.csv")[["path", "pred_label", "true_label"]]
    other["status"] = "ok"
    other.loc[other.index[other["true_label"] == FOLDERS[0]][1:], "status"] = "failed: no answer"
    other.to_csv(tmp_path / "reader.csv", index=False)
    capsys.readouterr()
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--compare", f"reader={tmp_path / 'reader.csv'}") == 0
    rows = read_csv(out / "comparison.csv").set_index("metric")
    assert rows.loc["accuracy", "ci_n_resamples"] == 50  # run_inference: --bootstrap 50
    assert (out / "comparison.csv").read_text().splitlines()[1].endswith(",image,50")  # a count, not 50.0
    short = int(rows.loc["balanced_accuracy", "ci_n_resamples"])
    assert 0 < short < 50 and rows.loc["rare_sensitivity", "ci_n_resamples"] == short
    assert f"reader: balanced accuracy on {short} of 50 resamples" in (out / "report.md").read_text()
    assert f"comparison: reader: balanced accuracy on {short} of 50 resamples" in capsys.readouterr().err


@pytest.mark.slow
def test_baseline_with_the_same_weights_in_another_class_order_gives_zero_differences(
        make_cohort, tmp_path, tiny_model):
    """Issue 14 item 1: a checkpoint whose stored prompt set lists (orbital, non-orbital,
    healthy) against the same weights as a plain state_dict (published order)."""
    classes = prompts.load_prompt_set(None)
    reordered = [classes[0], classes[2], classes[1]]
    checkpoint = tmp_path / "reordered.pt"
    write_model_checkpoint(checkpoint, tiny_model, tiny_metadata(
        class_folders=prompts.class_folders(reordered), prompts=prompts.prompt_set_to_dict(reordered)))
    plain = tmp_path / "plain.pt"
    torch.save(tiny_model.state_dict(), plain)
    test_dir = make_cohort("external", (4, 10, 6), seed=2)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--baseline", str(plain),
                         "--baseline-model-name", TINY_MODEL) == 0
    table = read_csv(out / "comparison.csv")
    assert (table["difference"].dropna().abs() < 1e-12).all() and table["difference"].notna().sum() >= 5
    accuracy = table.set_index("metric").loc["accuracy"]
    assert accuracy["ours_only_correct"] == 0 and accuracy["model_only_correct"] == 0
    assert table["model"].iloc[0] == f"baseline {plain}"


def test_compare_refusal_exits_2_names_file_and_row_and_writes_nothing(make_cohort, checkpoint,
                                                                       tmp_path, capsys):
    test_dir = make_cohort("external", (1, 2, 1), seed=1)
    bad = tmp_path / "bad.csv"
    write_csv(bad, ["path", "pred_label"], [["orbital disease/img_000.png", "orbital disease"],
                                            ["healthy eyes/nope.png", "healthy eyes"]])
    out = tmp_path / "out"
    capsys.readouterr()
    assert exit_code(test_dir, checkpoint, out, "--compare", f"llm={bad}") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert f"--compare llm= {bad}: row" in line and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("value, message", [("nameless.csv", "expected NAME=FILE"),
                                            ("a=missing.csv", "no such file")])
def test_compare_spec_errors(make_cohort, checkpoint, tmp_path, capsys, value, message):
    test_dir = make_cohort("external", (1, 1, 1), seed=1)
    out = tmp_path / "out"
    assert exit_code(test_dir, checkpoint, out, "--compare", value) == 2
    assert message in capsys.readouterr().err and not out.exists()


# -- subgroups -------------------------------------------------------------------------------------

def test_subgroup_rows_equal_sklearn_wilson_and_a_hand_chi_square():
    from orbital_clip import metrics
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    from statsmodels.stats.proportion import proportion_confint
    y, probs, _ = synthetic_models(seed=9, n=120)
    site = np.where(np.arange(120) % 3 == 0, "B", "A")
    (block,) = metrics.subgroup_analysis(y, probs, {"site": site}, 0, None, 30, seed=2)
    pred = probs.argmax(1)
    for row in block["rows"]:
        mine = site == row["level"]
        yy, pp = y[mine], pred[mine]
        rare = yy == 0
        assert row["n"] == mine.sum() and row["n_rare"] == rare.sum()
        assert row["accuracy"] == pytest.approx(accuracy_score(yy, pp))
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yy, pp))
        assert row["rare_auroc"] == pytest.approx(roc_auc_score(rare, probs[mine, 0]))
        tp = np.sum(rare & (pp == 0))
        assert row["rare_sensitivity"] == pytest.approx(tp / rare.sum())
        assert row["rare_sensitivity_ci"] == pytest.approx(
            list(proportion_confint(tp, rare.sum(), method="wilson")))
        assert row["small_n"] == (mine.sum() < 30 or rare.sum() < 10)
    # the heterogeneity test by hand: sum (O - E)^2 / E over the 2 x 2 table of correct by site
    correct = pred == y
    table = np.array([[np.sum(correct & (site == s)), np.sum(~correct & (site == s))] for s in "AB"])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert block["accuracy_test"]["chi2"] == pytest.approx(chi2)
    from scipy.stats import chi2 as chi2_dist
    assert block["accuracy_test"]["p"] == pytest.approx(chi2_dist.sf(chi2, 1))


def write_metadata(test_dir, path, seed=0):
    from demo import make_demo_metadata
    assert make_demo_metadata.main(["--cohort", str(test_dir), "--out", str(path), "--seed", str(seed)]) == 0
    return read_csv(path)


@pytest.mark.slow
def test_subgroups_end_to_end_equal_hand_counts_from_the_files(make_cohort, checkpoint, tmp_path):
    test_dir = make_cohort("external", (6, 12, 9), seed=1)
    meta = write_metadata(test_dir, tmp_path / "meta.csv")
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--metadata", str(tmp_path / "meta.csv"),
                         "--subgroups", "site,age", "--age-bins", "0,40,60,120", figures=True) == 0
    table = read_csv(out / "subgroups.csv")
    preds = read_csv(out / "predictions.csv").merge(meta, on="path")
    assert set(table["attribute"]) == {"site", "age"}
    for _i, row in table[table["attribute"] == "site"].iterrows():
        mine = preds[preds["site"] == row["level"]]
        assert row["n"] == len(mine)
        assert row["accuracy"] == pytest.approx((mine["pred_label"] == mine["true_label"]).mean())
        rare = mine[mine["true_label"] == FOLDERS[0]]
        assert row["rare_sensitivity"] == pytest.approx((rare["pred_label"] == FOLDERS[0]).mean())
    ages = table[table["attribute"] == "age"]
    assert set(ages["level"]) <= {"[0, 40)", "[40, 60)", "[60, 120]"}
    assert ages["n"].sum() == 27 and table[table["attribute"] == "site"]["n"].sum() == 27
    young = preds[preds["age"] < 40]
    assert ages.set_index("level").loc["[0, 40)", "n"] == len(young)
    assert (out / "subgroups.png").is_file()
    report_md = (out / "report.md").read_text()
    assert "## Subgroups" in report_md and "Small subgroups" in report_md  # 27 images: all small
    assert json.loads((out / "metrics.json").read_text())["subgroups"][0]["attribute"] == "site"


@pytest.mark.parametrize("extra, message", [
    (["--subgroups", "ethnicity"], "--subgroups ethnicity: no such column"),
    (["--subgroups", "age", "--age-bins", "0,30"], "--age-bins: age"),
    (["--subgroups", "age"], "pass --age-bins"),
    (["--metadata", "meta.csv"], "--metadata needs --subgroups"),
    (["--subgroups", "site", "--age-bins", "50,40"], "--age-bins 50,40"),
    (["--subgroups", "site", "--metadata", "nope.csv"], "--metadata"),
    (["--subgroups", "site", "--metadata", "empty.csv"],
     "empty.csv: row 1: empty file (expected a header with path or file and the attributes)"),
])
def test_subgroup_refusals_exit_2_and_write_nothing(make_cohort, checkpoint, tmp_path, capsys,
                                                   extra, message):
    test_dir = make_cohort("external", (6, 12, 9), seed=1)
    write_metadata(test_dir, tmp_path / "meta.csv")
    (tmp_path / "empty.csv").write_text("")
    extra = [str(tmp_path / e) if e.endswith(".csv") else e for e in extra]
    if "--metadata" not in extra:
        extra += ["--metadata", str(tmp_path / "meta.csv")]
    out = tmp_path / "out"
    capsys.readouterr()
    assert exit_code(test_dir, checkpoint, out, *extra) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert message in line and "Traceback" not in err
    assert not out.exists()


# -- data_preprocess.py --metadata / --stratify-by ----------------------------------------------

@pytest.mark.slow
def test_split_stratified_by_class_and_site_carries_the_metadata(make_cohort, tmp_path):
    from orbital_clip import split as data_preprocess
    from orbital_clip.split import allocate
    data = make_cohort("data", (10, 24, 15), seed=3)
    meta = write_metadata(data, tmp_path / "meta.csv", seed=1)
    out = tmp_path / "split"
    assert data_preprocess.main(["--data-root", str(data), "--out-dir", str(out), "--metadata",
                                 str(tmp_path / "meta.csv"), "--stratify-by", "site", "--test-ratio",
                                 "0.2", "--near-dup-distance", "0", "--no-progress"]) == 0
    manifest = read_csv(out / "manifest.csv")
    assert list(manifest.columns)[-3:] == ["site", "sex", "age"]
    joined = manifest.merge(meta, left_on="source", right_on="path", suffixes=("", "_meta"))
    assert len(joined) == len(meta) and (joined["site"] == joined["site_meta"]).all()
    assert (joined["age"] == joined["age_meta"]).all()
    for (label, site), stratum in manifest.groupby(["label", "site"]):
        expected = allocate.allocate_split_counts(len(stratum), 0.2, 0.2)
        counts = tuple(int((stratum["split"] == s).sum()) for s in ("train", "val", "test"))
        assert counts == expected, (label, site)
    # the manifest's columns drive inference's subgroups directly
    run_args = ["--split", "test", "--subgroups", "site"]
    ours = tmp_path / "ours.pt"  # not `ckpt`: that name is the checkpoint module
    torch.manual_seed(0)
    model, *_ = models.create_model(TINY_MODEL, None)
    write_model_checkpoint(ours, model, tiny_metadata())
    assert run_inference(out / "manifest.csv", ours, tmp_path / "eval", *run_args) == 0
    table = read_csv(tmp_path / "eval" / "subgroups.csv")
    test_rows = manifest[manifest["split"] == "test"]
    assert dict(zip(table["level"], table["n"])) == test_rows["site"].value_counts().to_dict()
    # in combination: a manifest cohort, --compare of that run's own predictions.csv (paths
    # relative to the manifest's folder), --subgroups and --anonymize-paths
    own = tmp_path / "eval" / "predictions.csv"
    assert run_inference(out / "manifest.csv", ours, tmp_path / "eval2", *run_args,
                         "--compare", f"same={own}", "--anonymize-paths") == 0
    comparison = read_csv(tmp_path / "eval2" / "comparison.csv")
    assert (comparison["difference"].dropna() == 0).all() and comparison["difference"].notna().any()
    again = read_csv(tmp_path / "eval2" / "subgroups.csv")  # ours, then the compared model's rows
    assert again[again["model"] == "ours"].equals(table)
    for name in ("predictions.csv", "report.md", "comparison.csv", "subgroups.csv"):
        text = (tmp_path / "eval2" / name).read_text()
        assert not any(Path(p).name in text for p in test_rows["path"]), name


@pytest.mark.parametrize("extra, message", [
    (["--stratify-by", "site"], "--stratify-by names a column of --metadata"),
    (["--metadata", "meta.csv", "--stratify-by", "hospital"], "--stratify-by hospital: no such column"),
    (["--metadata", "reserved.csv"], "column 'split' is a manifest column"),
    (["--metadata", "twice.csv"], "row 3: path"),
])
def test_split_metadata_refusals_exit_2_and_write_nothing(make_cohort, tmp_path, capsys, extra, message):
    from orbital_clip import split as data_preprocess
    data = make_cohort("data", (4, 6, 5), seed=3)
    meta = write_metadata(data, tmp_path / "meta.csv")
    meta.assign(split="x").to_csv(tmp_path / "reserved.csv", index=False)
    pd.concat([meta.iloc[:1], meta]).to_csv(tmp_path / "twice.csv", index=False)
    extra = [str(tmp_path / e) if e.endswith(".csv") else e for e in extra]
    before = tree_state(data)
    capsys.readouterr()
    try:
        code = data_preprocess.main(["--data-root", str(data), "--out-dir", str(tmp_path / "split"),
                                     "--no-progress", *extra])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "split").exists() and tree_state(data) == before


@pytest.mark.slow
def test_with_patient_groups_mcnemar_is_clustered_and_the_bootstrap_resamples_patients(
        make_cohort, checkpoint, tmp_path):
    """--group-regex makes patients of 3-4 images: p_mcnemar_clustered equals Obuchowski's test
    recomputed from the two predictions files and their group column; CIs are patient-level."""
    from orbital_clip import metrics
    test_dir = make_cohort("external", (6, 12, 9), seed=1)
    first = tmp_path / "first"
    assert run_inference(test_dir, checkpoint, first) == 0
    ours = read_csv(first / "predictions.csv")
    other = ours[["path", "pred_label"]].copy()
    for i in range(0, 27, 4):  # every 4th answer changed
        other.loc[i, "pred_label"] = FOLDERS[(FOLDERS.index(other.loc[i, "pred_label"]) + 1) % 3]
    other.to_csv(tmp_path / "other.csv", index=False)
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--compare", f"reader={tmp_path / 'other.csv'}",
                         "--group-regex", r"^(.+_\d\d)\d\.") == 0
    preds = read_csv(out / "predictions.csv")
    assert preds["group"].nunique() < len(preds)
    row = read_csv(out / "comparison.csv").set_index("metric").loc["accuracy"]
    truth = preds["true_label"].to_numpy()
    expected = metrics.obuchowski_test(preds["pred_label"].to_numpy() == truth,
                                       other["pred_label"].to_numpy() == truth,
                                       preds["group"].to_numpy())
    assert row["p_mcnemar_clustered"] == pytest.approx(expected["p"])
    assert row["ci_unit"] == "patient" and not np.isnan(row["model_ci_low"])
    assert np.isnan(read_csv(out / "comparison.csv").set_index("metric").loc["rare_auroc", "model_value"])
