"""Comparing other models' (or readers') predictions with ours on the same images (--compare,
--baseline): paired bootstrap differences, McNemar's, DeLong's and Obuchowski's tests. Pure:
arrays in, plain dicts out.
"""

import dataclasses
import math

import numpy as np
from scipy.stats import binom, binomtest, norm
from scipy.stats import chi2 as chi2_dist

from orbital_clip.metrics.bootstrap import (bootstrap_strata, finite_or_none, group_indices,
                                            mark_unusable, percentile_interval, resample_weights,
                                            tie_blocks, weighted_auroc_auprc)
from orbital_clip.metrics.classification import (CONFIDENCE_LEVEL, DEFAULT_BOOTSTRAP, DEFAULT_SEED,
                                                 metrics_from_confusion)


def mcnemar_test(correct_a, correct_b):
    """Exact and mid-p McNemar tests on the discordant pairs (binomial, p = 1/2, two-sided).

    Returns
    -------
    dict with a_only (A right, B wrong), b_only, p_exact, p_mid (None without discordant pairs).
    """
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    a_only, b_only = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_exact": None, "p_mid": None}
    small = min(a_only, b_only)
    p_exact = float(binomtest(a_only, n, 0.5).pvalue)
    # mid-p: twice the lower tail with half the probability of the observed count
    p_mid = min(1.0, 2.0 * (float(binom.cdf(small, n, 0.5)) - 0.5 * float(binom.pmf(small, n, 0.5))))
    return {"a_only": a_only, "b_only": b_only, "p_exact": p_exact, "p_mid": p_mid}


def format_p(p, n_resamples=None):
    """A p-value for text: 'n/a', '<0.001' or three decimals. A two-sided bootstrap p of 0 from
    `n_resamples` resamples only says p < 2/B (twice the smaller tail share, whose smallest
    non-zero value is 1/B): '< 0.001' for 2,000, '< 0.01' for 200."""
    if p is None:
        return "n/a"
    if p == 0 and n_resamples:
        return f"< {2.0 / n_resamples:.2g}"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


COMPARISON_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "rare_sensitivity",
                      "rare_specificity", "macro_auroc", "rare_auroc")


def delong_placements(positive, scores):
    """DeLong's structural components of one AUROC: (auc, V10 per positive, V01 per negative).

    V10 of a positive is the share of negatives it outranks (ties one half), V01 of a negative
    the share of positives that outrank it; AUROC is the mean of either. Computed by binary search
    in the sorted scores (O(n log n)) rather than DeLong's n_pos x n_neg comparisons.
    """
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    below = lambda sorted_, x: (np.searchsorted(sorted_, x, "left")  # noqa: E731
                                + np.searchsorted(sorted_, x, "right")) / 2.0  # ties count one half
    v10 = below(neg, scores[positive]) / len(neg)
    v01 = (len(pos) - below(pos, scores[~positive])) / len(pos)
    return float(v10.mean()), v10, v01


def delong_test(positive, scores_a, scores_b):
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUROCs on the same images.

    Var(A - B) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + S01_bb - 2 S01_ab) / n, with S10
    (S01) the covariance matrix (divisor m - 1, n - 1) of the positives' (negatives') structural
    components and m, n the positive and negative counts. The images are independent units.

    Returns
    -------
    dict with auroc_a, auroc_b, difference, se, z, p (two-sided normal); p is None when the
    variance is 0 (identical rankings) or a class has fewer than 2 images.
    """
    positive = np.asarray(positive, bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        return {"auroc_a": None, "auroc_b": None, "difference": None, "se": None, "z": None, "p": None}
    auc_a, v10_a, v01_a = delong_placements(positive, scores_a)
    auc_b, v10_b, v01_b = delong_placements(positive, scores_b)
    s10, s01 = np.cov(np.vstack([v10_a, v10_b])), np.cov(np.vstack([v01_a, v01_b]))
    variance = ((s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n)
    out = {"auroc_a": auc_a, "auroc_b": auc_b, "difference": auc_a - auc_b, "se": None, "z": None,
           "p": None}
    if variance > 1e-15:
        out["se"] = math.sqrt(variance)
        out["z"] = out["difference"] / out["se"]
        out["p"] = float(2.0 * norm.sf(abs(out["z"])))
    return out


def obuchowski_test(correct_a, correct_b, groups):
    """Obuchowski (1998) test of two correlated proportions with clustered data: McNemar's
    question (is accuracy A = accuracy B?) when images come in patients.

    With d_i = correct_a_i - correct_b_i, D_k its sum over the images of cluster k and K
    clusters, the variance of sum(d) is estimated under the null hypothesis (no difference, so
    the clusters' D_k are centred at 0) as K / (K - 1) * sum_k D_k^2, which gives
    X^2 = (K - 1) / K * (sum_k D_k)^2 / sum_k D_k^2 on 1 df (Yang, Sun & Hardin 2010's form of
    Obuchowski's statistic, as in R's clust.bin.pair). With one image per cluster it is McNemar's
    (B - C)^2 / (B + C) times (K - 1) / K. Centring at the observed difference instead (a Wald
    test) collapses when every patient favours the same model and gives absurdly small p.

    Returns
    -------
    dict with difference, chi2, p (None when no cluster is discordant), n_clusters.
    """
    d = np.asarray(correct_a, np.float64) - np.asarray(correct_b, np.float64)
    index = group_indices(groups, len(d))
    k = int(index.max()) + 1 if len(d) else 0
    out = {"difference": float(d.mean()) if len(d) else None, "chi2": None, "p": None, "n_clusters": k}
    if k < 2:
        return out
    sums = np.bincount(index, d, minlength=k)  # D_k
    denominator = np.sum(sums ** 2)
    if denominator > 0:
        out["chi2"] = float((k - 1) / k * sums.sum() ** 2 / denominator)
        out["p"] = float(chi2_dist.sf(out["chi2"], 1))
    return out


def prediction_columns(y_true, y_pred, n_classes):
    """(N, C*C) one-hot confusion cells of each image: weighted sums give the confusion matrix."""
    return np.eye(n_classes * n_classes)[np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)]


def prediction_metrics(weights, cells, n_classes, rare_index, rankings=None, positive=None):
    """COMPARISON_METRICS of one model's predictions under each row of weights.

    Parameters
    ----------
    weights : (B, N) float array
    cells : (N, C*C) from `prediction_columns`
    rankings : per class `tie_blocks` of its probability, or None (no probabilities: no AUROC)
    positive : (N, C) bool, the images of each class

    Returns
    -------
    dict name -> (B,) float array, NaN where undefined.
    """
    cms = (np.atleast_2d(weights) @ cells).reshape(-1, n_classes, n_classes)
    out = {key: value for key, value in metrics_from_confusion(cms).items() if key != "f1"}
    row, col = cms.sum(axis=2)[:, rare_index], cms.sum(axis=1)[:, rare_index]
    total, hit = cms.sum(axis=(1, 2)), cms[:, rare_index, rare_index]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["rare_sensitivity"] = hit / row
        out["rare_specificity"] = (total - row - col + hit) / (total - row)
    nan = np.full(len(cms), np.nan)
    out["macro_auroc"], out["rare_auroc"] = nan, nan.copy()
    if rankings is not None:
        aurocs = np.stack([weighted_auroc_auprc(np.atleast_2d(weights), order, starts, positive[:, k])[0]
                           for k, (order, starts) in enumerate(rankings)], axis=1)
        out["macro_auroc"], out["rare_auroc"] = aurocs.mean(axis=1), aurocs[:, rare_index]
    return out


def bootstrap_p(differences):
    """Two-sided paired-bootstrap p: twice the smaller share of replicate differences on either
    side of 0 (a rough guide; the interval is the result to report). None without replicates."""
    finite = np.asarray(differences, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    return float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))))


@dataclasses.dataclass
class ComparedModel:
    """One model's answers on the scored images, for `compare_predictions`."""
    name: str
    pred: np.ndarray  # (N,) int class index, -1 where the model gave no answer
    probs: np.ndarray | None  # (N, C) or None (labels only: no AUROC)


def comparison_rows(name, point, boot, mask, confidence):
    """The COMPARISON_METRICS rows of one model against the reference (see `compare_predictions`)."""
    rows = []
    for metric in COMPARISON_METRICS:
        value, ref = finite_or_none(point[1][metric][0]), finite_or_none(point[0][metric][0])
        row = {"model": name, "metric": metric, "n": int(mask.sum()),
               "n_no_answer": int(len(mask) - mask.sum()), "n_resamples": None,
               "value": value, "value_ci": None,
               "reference_value": ref, "reference_ci": None,
               "difference": None if value is None or ref is None else ref - value,  # ours - model
               "difference_ci": None, "p_bootstrap": None, "p_mcnemar_exact": None,
               "p_mcnemar_mid": None, "p_mcnemar_clustered": None, "p_delong": None,
               "model_only_correct": None, "reference_only_correct": None}
        if boot is not None and row["difference"] is not None:
            diff = boot[0][metric] - boot[1][metric]
            row.update(n_resamples=int(np.isfinite(diff).sum()),  # usable ones: see compare_predictions
                       value_ci=percentile_interval(boot[1][metric], confidence),
                       reference_ci=percentile_interval(boot[0][metric], confidence),
                       difference_ci=percentile_interval(diff, confidence), p_bootstrap=bootstrap_p(diff))
        rows.append(row)
    return rows


def compare_predictions(y_true, reference, others, rare_index=0, groups=None,
                        n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """Each model in `others` against `reference` (our model) on the same images.

    Each comparison uses the images both models answered (a model's -1 rows drop out of its own
    comparison only). Every model is scored on the SAME bootstrap resamples (drawn once over all
    images, by patient when `groups` is given, as `compute_metrics` draws them): an image a model
    did not answer has weight 0 in its replicates. Per model and metric: its value and the
    reference's on those images with percentile CIs, the paired difference (reference - model,
    positive when our model is better) with its CI and a two-sided bootstrap p, and how many
    resamples gave the metric (`n_resamples`: a resample without an answered image of a class
    gives no class-averaged metric, as in `compute_metrics`; one without an answered rare image no
    rare-class sensitivity or AUROC; a class it never answered, none at all: `unanswered_classes`); for accuracy McNemar's exact and mid-p tests and,
    with groups, Obuchowski's clustered test; for the rare class's AUROC DeLong's test (images
    independent) when both models have probabilities.

    Parameters
    ----------
    y_true : (N,) int array
    reference : ComparedModel (every pred >= 0)
    others : list of ComparedModel
    rare_index : int
        The class whose sensitivity, specificity and AUROC are compared.
    groups : (N,) array of str, optional

    Returns
    -------
    dict: n, n_groups, bootstrap_unit, rows (list of dicts, see `comparison_rows`).
    """
    y_true = np.asarray(y_true, np.int64)
    n, n_classes = len(y_true), (reference.probs.shape[1] if reference.probs is not None
                                 else int(max(y_true.max(), reference.pred.max())) + 1)
    group_index = group_indices(groups, n)
    positive = y_true[:, None] == np.arange(n_classes)
    ranking = lambda probs: None if probs is None else [tie_blocks(probs[:, k]) for k in range(n_classes)]  # noqa: E731
    rows = []
    for other in others:
        mask = np.asarray(other.pred) >= 0
        has_probs = other.probs is not None and reference.probs is not None
        models = [(prediction_columns(y_true, reference.pred, n_classes),
                   ranking(reference.probs) if has_probs else None),
                  (prediction_columns(y_true, np.where(mask, other.pred, 0), n_classes),
                   ranking(np.nan_to_num(other.probs)) if has_probs else None)]
        evaluate = lambda weights: [prediction_metrics(weights * mask, cells, n_classes, rare_index,  # noqa: E731
                                                       ranks, positive) for cells, ranks in models]
        # metrics.json's rule (`mark_unusable`) on the images the model answered: without an
        # answered image of a declared class (in the resample, or at all) there is no balanced
        # accuracy or macro F1 (NaN: left out of the interval and counted in n_resamples; None
        # when never answered), rather than an average over fewer classes
        point = [mark_unusable(metric) for metric in evaluate(np.ones((1, n)))]
        boot = None
        if n_bootstrap:
            # the resamples of metrics.json: same seed, groups and class strata
            strata = bootstrap_strata(y_true, group_index)
            parts = [evaluate(w) for w in resample_weights(group_index, n_bootstrap, seed, strata=strata)]
            boot = [mark_unusable({key: np.concatenate([part[i][key] for part in parts])
                                   for key in parts[0][i]}) for i in range(2)]
        model_rows = comparison_rows(other.name, point, boot, mask, confidence)
        unanswered = np.flatnonzero(~(positive & mask[:, None]).any(axis=0)).tolist()
        for row in model_rows:
            row["unanswered_classes"] = unanswered  # classes of the cohort it answered no image of
        add_paired_tests(model_rows, y_true[mask], reference, other, mask, rare_index,
                         None if groups is None else np.asarray(groups)[mask], has_probs)
        rows += model_rows
    return {"n": n, "n_groups": int(group_index.max()) + 1 if n else 0,
            "bootstrap_unit": "image" if groups is None else "group", "n_bootstrap": int(n_bootstrap),
            "rows": rows}


def add_paired_tests(rows, y_true, reference, other, mask, rare_index, groups, has_probs):
    """McNemar (exact, mid-p, clustered) on the accuracy row, DeLong on the rare AUROC row."""
    correct_ref = reference.pred[mask] == y_true
    correct_other = other.pred[mask] == y_true
    by_metric = {row["metric"]: row for row in rows}
    mcnemar = mcnemar_test(correct_ref, correct_other)
    by_metric["accuracy"].update(p_mcnemar_exact=mcnemar["p_exact"], p_mcnemar_mid=mcnemar["p_mid"],
                                 reference_only_correct=mcnemar["a_only"],
                                 model_only_correct=mcnemar["b_only"])
    if groups is not None:
        by_metric["accuracy"]["p_mcnemar_clustered"] = obuchowski_test(correct_ref, correct_other, groups)["p"]
    if has_probs:
        delong = delong_test(y_true == rare_index, reference.probs[mask, rare_index],
                             other.probs[mask, rare_index])
        by_metric["rare_auroc"]["p_delong"] = delong["p"]
