"""Sequential readings: the same images diagnosed at several steps as information is added (the
paper's second step: image, + demographics, + symptoms). Pure: labels and predictions in.
"""

import numpy as np
from scipy.stats import chi2 as chi2_dist

from orbital_clip.metrics.bootstrap import (bootstrap_strata, group_indices, percentile_interval,
                                            resample_weights)
from orbital_clip.metrics.classification import (CONFIDENCE_LEVEL, DEFAULT_BOOTSTRAP, DEFAULT_SEED,
                                                 proportion, wilson_interval)
from orbital_clip.metrics.compare import mcnemar_test, obuchowski_test

SEQUENTIAL_MEASURES = ("sensitivity", "specificity")
# y_pred codes that name no class: FAILED_READING is left out of its step (the answered-only
# table); NO_CLASS_NAMED is counted, worst case (STARD's intention to diagnose): a miss of its
# true class and a false call of every other, so refusing never raises a specificity
FAILED_READING, NO_CLASS_NAMED = -1, -2


def cochrans_q(successes):
    """Cochran's Q test that K paired binary outcomes share one success rate.

    Written out because metrics.py is numpy/scipy only; the tests check it against
    statsmodels.stats.contingency_tables.cochrans_q. With K = 2 it is McNemar's chi-square
    without continuity correction.

    Parameters
    ----------
    successes : (N, K) bool or 0/1 array
        One row per subject read at every step (complete cases), one column per step.

    Returns
    -------
    dict: q, df (K - 1), p_value (chi-square with K - 1 df), n. q and p_value are None when no
    row differs between steps (every row all-success or all-failure: the test is undefined).
    """
    x = np.asarray(successes, dtype=np.float64)
    n, k = x.shape
    per_step, per_subject = x.sum(axis=0), x.sum(axis=1)
    total = per_subject.sum()
    denominator = k * total - float((per_subject ** 2).sum())  # 0 when no row is discordant
    if k < 2 or denominator <= 0:
        return {"q": None, "df": k - 1, "p_value": None, "n": int(n)}
    q = (k - 1) * (k * float((per_step ** 2).sum()) - total ** 2) / denominator
    return {"q": float(q), "df": k - 1, "p_value": float(chi2_dist.sf(q, k - 1)), "n": int(n)}


def reading_successes(y_true, y_pred, k, measure):
    """(relevant, success) of class k's sensitivity (relevant: images of class k; success:
    predicted k) or specificity (relevant: images of other classes; success: not predicted k).
    A reading that names no class (y_pred < 0) is a miss of both: NO_CLASS_NAMED is scored so
    (worst case); callers leave FAILED_READING out first."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if measure == "sensitivity":
        return y_true == k, y_pred == k
    if measure == "specificity":
        return y_true != k, (y_pred != k) & (y_pred >= 0)
    raise ValueError(f"unknown measure {measure!r} (expected one of {SEQUENTIAL_MEASURES})")


def sequential_steps(y_true, preds, class_names, step_names, confidence=CONFIDENCE_LEVEL):
    """Per class sensitivity and specificity at each step (Wilson), on the images that step
    scored (failed readings, y_pred -1, left out as in that step's metrics.json).

    Returns
    -------
    list of dicts: class, measure, step, n (relevant images scored), hits, value, ci.
    """
    rows = []
    for k, name in enumerate(class_names):
        for measure in SEQUENTIAL_MEASURES:
            for step, y_pred in zip(step_names, preds):
                relevant, success = reading_successes(y_true, y_pred, k, measure)
                relevant &= np.asarray(y_pred) != FAILED_READING
                n, hits = int(relevant.sum()), int((relevant & success).sum())
                rows.append({"class": name, "measure": measure, "step": step, "n": n, "hits": hits,
                             "value": proportion(hits, n), "ci": wilson_interval(hits, n, confidence)})
    return rows


def paired_step_change(y_true, pred_from, pred_to, n_classes, group_index, n_bootstrap, seed,
                       confidence=CONFIDENCE_LEVEL, clustered=False):
    """Change of every class's sensitivity and specificity from one step to the next, on the
    images both steps scored: the difference with a percentile-bootstrap CI (the resamples of
    `resample_weights`, stratified by class as `bootstrap_strata`, so patients stay together with
    groups; the usable resamples counted beside it) and McNemar's test on the
    discordant images (and with `clustered`, Obuchowski's test, McNemar's question when images
    come in patients, on the groups of `group_index`).

    Parameters
    ----------
    y_true, pred_from, pred_to : (N,) int arrays of the images both steps scored.
    group_index : (N,) int array from `group_indices`.

    Returns
    -------
    list of dicts (class index order, sensitivity then specificity): k, measure, n, from_value,
    to_value, difference, difference_ci, difference_ci_n_resamples (resamples in which the
    measure was defined), gained (right only at the later step), lost, p_exact,
    p_mid, p_clustered (None unless `clustered`).
    """
    pairs = [reading_successes(y_true, pred, k, measure)
             for k in range(n_classes) for measure in SEQUENTIAL_MEASURES for pred in (pred_from, pred_to)]
    relevant = np.stack([pairs[i][0] for i in range(0, len(pairs), 2)], axis=1).astype(np.float64)
    before = np.stack([pairs[i][1] for i in range(0, len(pairs), 2)], axis=1) & (relevant > 0)
    after = np.stack([pairs[i][1] for i in range(1, len(pairs), 2)], axis=1) & (relevant > 0)
    diffs = []
    # stratified by class as metrics.json's bootstrap: a resample without a rare patient would
    # leave that class's change undefined, and those resamples are counted, not hidden
    strata = bootstrap_strata(y_true, group_index) if n_bootstrap else None
    for weights in (resample_weights(group_index, n_bootstrap, seed, strata=strata)
                    if n_bootstrap else ()):
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without the class: NaN
            diffs.append((weights @ (after.astype(float) - before)) / (weights @ relevant))  # (b, M)
    diffs = np.concatenate(diffs) if diffs else None
    rows = []
    for m in range(relevant.shape[1]):
        rel = relevant[:, m] > 0
        n = int(rel.sum())
        a, b = proportion(int(before[:, m].sum()), n), proportion(int(after[:, m].sum()), n)
        test = mcnemar_test(after[rel, m], before[rel, m])  # a_only: right only at the later step
        usable = int(np.isfinite(diffs[:, m]).sum()) if diffs is not None and n else None
        rows.append({"k": m // len(SEQUENTIAL_MEASURES),
                     "measure": SEQUENTIAL_MEASURES[m % len(SEQUENTIAL_MEASURES)], "n": n,
                     "from_value": a, "to_value": b, "difference": None if n == 0 else b - a,
                     "difference_ci": percentile_interval(diffs[:, m], confidence) if usable else None,
                     "difference_ci_n_resamples": usable,
                     "gained": test["a_only"], "lost": test["b_only"],
                     "p_exact": test["p_exact"], "p_mid": test["p_mid"],
                     "p_clustered": (obuchowski_test(after[rel, m], before[rel, m], group_index[rel])["p"]
                                     if clustered and n else None)})
    return rows


def sequential_analysis(y_true, preds, class_names, step_names, groups=None,
                        n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """The sequential table: per class sensitivity and specificity at each step (Wilson), the
    paired change between consecutive steps (bootstrap CI, McNemar; with groups also Obuchowski's
    clustered test) and Cochran's Q across all steps on the images every step scored.

    Parameters
    ----------
    y_true : (N,) int array
        True class of every image received.
    preds : (S, N) int array
        Predicted class of each image at each of S steps; FAILED_READING (-1) where the reading
        failed: left out of that step and of its pairs; NO_CLASS_NAMED (-2) where it named no
        class: scored as a miss for its class and a false call for every other.
    class_names, step_names : lists of str (C and S names).
    groups : (N,) array of str, optional
        Patient of each image: the bootstrap resamples patients.

    Returns
    -------
    dict: steps, n_received, n_complete (scored at every step), bootstrap_unit,
    bootstrap_resamples, bootstrap_stratified_by, per_step (see
    `sequential_steps`), changes (rows of `paired_step_change` with class, from_step, to_step),
    omnibus (class, measure, and `cochrans_q`'s q, df, p_value, n; None without two steps).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64).reshape(len(step_names), len(y_true))
    scored = preds != FAILED_READING  # (S, N); NO_CLASS_NAMED is scored, as a miss
    changes = []
    for s in range(1, len(step_names)):
        both = scored[s - 1] & scored[s]
        index = group_indices(None if groups is None else np.asarray(groups, dtype=str)[both],
                              int(both.sum()))
        boot = n_bootstrap if both.any() else 0  # no image read at both steps: nothing to resample
        for row in paired_step_change(y_true[both], preds[s - 1][both], preds[s][both],
                                      len(class_names), index, boot, seed, confidence,
                                      clustered=groups is not None):
            changes.append({"class": class_names[row.pop("k")], "from_step": step_names[s - 1],
                            "to_step": step_names[s], **row})
    complete = scored.all(axis=0)
    omnibus = []
    for k, name in enumerate(class_names):
        for measure in SEQUENTIAL_MEASURES:
            outcome = [reading_successes(y_true[complete], p[complete], k, measure) for p in preds]
            relevant = outcome[0][0]
            successes = np.stack([success[relevant] for _rel, success in outcome], axis=1)
            test = cochrans_q(successes) if len(step_names) > 1 else None
            omnibus.append({"class": name, "measure": measure, **(test or {})})
    return {"steps": list(step_names), "n_received": int(len(y_true)),
            "n_complete": int(complete.sum()),
            "bootstrap_unit": "image" if groups is None else "group",
            "bootstrap_resamples": int(n_bootstrap), "bootstrap_stratified_by": "true class",
            "per_step": sequential_steps(y_true, preds, class_names, step_names, confidence),
            "changes": changes, "omnibus": omnibus}
