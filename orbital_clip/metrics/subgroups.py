"""The subgroup analysis (--subgroups): metrics per level of a metadata attribute, small levels
flagged, a chi-square test of homogeneity across levels and its class-adjusted (stratified
Cochran-Mantel-Haenszel) counterpart, and a patient's attribute made one level per patient.
"""

import numpy as np
from scipy.stats import chi2 as chi2_dist
from scipy.stats import chi2_contingency

from orbital_clip.metrics.bootstrap import (bootstrap_strata, finite_or_none, group_indices,
                                            mark_unusable, percentile_interval, resample_weights,
                                            tie_blocks)
from orbital_clip.metrics.classification import (CONFIDENCE_LEVEL, DEFAULT_BOOTSTRAP, DEFAULT_SEED,
                                                 proportion, wilson_interval)
from orbital_clip.metrics.compare import prediction_columns, prediction_metrics

SMALL_SUBGROUP_N = 30  # fewer units (patients when known, else images) in a level: flag it
SMALL_SUBGROUP_RARE_N = 10  # fewer rare-class units: its sensitivity is barely estimable
BOOTSTRAP_COLUMNS = ("accuracy", "balanced_accuracy", "rare_auroc", "macro_auroc")


def cannot_vary(y_true, group_index):
    """True when the class-stratified bootstrap of a level can draw only one resample: every
    class present rests on one unit (one patient per class, or one image), so each resample
    redraws that unit and an interval of zero width would pass for the most precise."""
    strata = bootstrap_strata(y_true, group_index)
    return bool(len(strata)) and bool((np.bincount(strata) <= 1).all())


INCONSISTENT_LEVEL = "inconsistent"  # a patient whose images tie between two values


def patient_levels(levels, groups, missing="missing"):
    """One level per patient: each image takes its patient's most frequent non-missing value
    (race, site: a property of the patient, not of a photograph), a tie between values becomes
    INCONSISTENT_LEVEL, a patient with no value keeps `missing`. Counted once, in one level,
    rather than in every level one of their images names.

    Parameters
    ----------
    levels, groups : (N,) str arrays (the attribute, and the patient of each image).

    Returns
    -------
    (levels (N,) str array, n_varying: patients whose images give more than one value, missing
    included, n_inconsistent: patients set to INCONSISTENT_LEVEL).
    """
    levels, groups = np.asarray(levels, dtype=object), np.asarray(groups, dtype=str)
    out = levels.copy()
    n_varying = n_inconsistent = 0
    for patient in np.unique(groups):
        mine = groups == patient
        values = levels[mine].tolist()
        if len(set(values)) < 2:
            continue
        n_varying += 1
        given = [v for v in values if v != missing]
        counts = {v: given.count(v) for v in set(given)}
        top = max(counts.values())
        winners = [v for v, c in counts.items() if c == top]
        out[mine] = winners[0] if len(winners) == 1 else INCONSISTENT_LEVEL
        n_inconsistent += len(winners) > 1
    return out.astype(str), n_varying, n_inconsistent


def homogeneity_test(outcome, levels):
    """Chi-square test that a binary outcome has the same rate in every level (a 2 x L table;
    images independent). Returns dict chi2, df, p, min_expected (None with fewer than 2 levels
    holding images or an outcome that never varies)."""
    outcome, levels = np.asarray(outcome, bool), np.asarray(levels, dtype=str)
    names = sorted(set(levels.tolist()))
    table = np.array([[np.sum(outcome & (levels == name)), np.sum(~outcome & (levels == name))]
                      for name in names], dtype=np.float64).reshape(-1, 2)  # (L, 2), L may be 0
    table = table[table.sum(axis=1) > 0]
    out = {"chi2": None, "df": None, "p": None, "min_expected": None}
    if len(table) < 2 or (table.sum(axis=0) == 0).any():
        return out
    result = chi2_contingency(table, correction=False)
    out.update(chi2=float(result.statistic), df=int(result.dof), p=float(result.pvalue),
               min_expected=float(result.expected_freq.min()))
    return out


def stratified_homogeneity_test(outcome, levels, strata):
    """Generalized Cochran-Mantel-Haenszel test that a binary outcome has the same rate in every
    level within each stratum (here the true class): the level x outcome table of each stratum,
    conditioned on its margins (hypergeometric), summed over strata. A crude test across levels
    that differ only in their class mix (more healthy eyes, which are easier) finds a
    difference that is not one; this one does not. Written out because scipy has no generalized
    CMH; the tests check it against statsmodels' StratifiedTable (two levels) and against the
    crude chi-square times (n - 1) / n (one stratum).

    Returns dict chi2, df (rank of the covariance: levels - 1 when every level is informative),
    p, method; None values with fewer than 2 levels or no stratum where the outcome varies.
    """
    outcome, levels = np.asarray(outcome, bool), np.asarray(levels, dtype=str)
    strata = np.asarray(strata)
    names = sorted(set(levels.tolist()))
    out = {"chi2": None, "df": None, "p": None,
           "method": "Cochran-Mantel-Haenszel (generalized), stratified by true class"}
    if len(names) < 2:
        return out
    deviation, covariance = np.zeros(len(names)), np.zeros((len(names), len(names)))
    for stratum in np.unique(strata):
        mine = strata == stratum
        rows = np.array([np.sum(mine & (levels == n)) for n in names], dtype=np.float64)  # (L,)
        hits = np.array([np.sum(mine & outcome & (levels == n)) for n in names], dtype=np.float64)
        total, successes = rows.sum(), hits.sum()
        if total < 2 or successes in (0, total):  # a stratum whose outcome never varies
            continue
        deviation += hits - rows * successes / total
        covariance += (successes * (total - successes) / (total ** 2 * (total - 1))
                       * (total * np.diag(rows) - np.outer(rows, rows)))
    df = int(np.linalg.matrix_rank(covariance))
    if df == 0:
        return out
    chi2 = float(deviation @ np.linalg.pinv(covariance) @ deviation)
    out.update(chi2=chi2, df=df, p=float(chi2_dist.sf(chi2, df)))
    return out


def subgroup_rows(y_true, probs, levels, rare_index=0, groups=None, n_bootstrap=DEFAULT_BOOTSTRAP,
                  seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL, pred=None):
    """Per level of one attribute: n, patients and rare-class patients (None without `groups`:
    not the image count), rare-class prevalence, accuracy and balanced accuracy (bootstrap CIs,
    by patient with `groups`, resampled within the level, each with the usable resamples behind
    it), rare-class sensitivity and specificity (Wilson, images independent) and rare-class and
    macro AUROC (bootstrap), with a `small_n` flag (counting patients when known) and a
    `no_variation` flag (`cannot_vary`: then no bootstrap interval, rather than one of zero
    width).

    Parameters
    ----------
    y_true : (N,) int; probs : (N, C) float; levels : (N,) str, the attribute's level per image.
    pred : (N,) int, optional
        The decided class per image (the declared decision rule); argmax of `probs` without it.

    Returns
    -------
    list of dicts, one per level in sorted order.
    """
    y_true, probs = np.asarray(y_true, np.int64), np.asarray(probs, np.float64)
    levels = np.asarray(levels, dtype=str)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, np.int64)
    n_classes = probs.shape[1]
    rows = []
    for level in sorted(set(levels.tolist())):
        mine = levels == level
        y, p, hat = y_true[mine], probs[mine], pred[mine]
        sub_groups = None if groups is None else np.asarray(groups, dtype=str)[mine]
        index = group_indices(sub_groups, len(y))
        cells = prediction_columns(y, hat, n_classes)
        ranks = [tie_blocks(p[:, k]) for k in range(n_classes)]
        positive = y[:, None] == np.arange(n_classes)
        evaluate = lambda w: prediction_metrics(w, cells, n_classes, rare_index, ranks, positive)  # noqa: E731
        # metrics.json's rule: a level without an image of some class has no balanced accuracy
        point = mark_unusable(evaluate(np.ones((1, len(y)))))
        parts = ([mark_unusable(evaluate(w)) for w in resample_weights(
                     index, n_bootstrap, seed, strata=bootstrap_strata(y, index))]
                 if n_bootstrap else [])
        rare = y == rare_index
        tp, fn = int(np.sum(rare & (hat == rare_index))), int(np.sum(rare & (hat != rare_index)))
        tn, fp = int(np.sum(~rare & (hat != rare_index))), int(np.sum(~rare & (hat == rare_index)))
        row = {"level": level, "n": int(len(y)), "n_patients": None if groups is None else int(index.max()) + 1,
               "n_rare": int(rare.sum()),
               "n_rare_patients": None if groups is None else len(set(index[rare].tolist())),
               "prevalence": proportion(int(rare.sum()), len(y)),
               "rare_sensitivity": proportion(tp, tp + fn), "rare_sensitivity_ci": wilson_interval(tp, tp + fn, confidence),
               "rare_specificity": proportion(tn, tn + fp), "rare_specificity_ci": wilson_interval(tn, tn + fp, confidence)}
        row["no_variation"] = cannot_vary(y, index)
        for name in BOOTSTRAP_COLUMNS:
            row[name] = finite_or_none(point[name][0])
            replicates = np.concatenate([part[name] for part in parts]) if parts else None
            usable = None if replicates is None else int(np.isfinite(replicates).sum())
            defined = bool(usable) and row[name] is not None and not row["no_variation"]
            row[f"{name}_ci"] = percentile_interval(replicates, confidence) if defined else None
            row[f"{name}_ci_n_resamples"] = usable if defined else None
        units = row["n"] if groups is None else row["n_patients"]  # patients when known
        rare_units = row["n_rare"] if groups is None else row["n_rare_patients"]
        row["small_n"] = units < SMALL_SUBGROUP_N or rare_units < SMALL_SUBGROUP_RARE_N
        rows.append(row)
    return rows


def subgroup_analysis(y_true, probs, attributes, rare_index=0, groups=None,
                      n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL,
                      pred=None):
    """`subgroup_rows` of each attribute plus its heterogeneity tests: chi-square homogeneity of
    accuracy across levels and of rare-class sensitivity across levels (among rare images).

    Parameters
    ----------
    attributes : dict attribute name -> (N,) str levels
    pred : (N,) int, optional
        The decided class per image (the declared decision rule); argmax of `probs` without it.

    Returns
    -------
    list of dicts: attribute, rows, levels_not_tested (levels that cannot vary, left out of the
    tests), accuracy_test, rare_sensitivity_test (`homogeneity_test`), and
    accuracy_test_class_adjusted (`stratified_homogeneity_test` within each true class: the
    heterogeneity that the levels' class mix does not explain).
    """
    y_true, probs = np.asarray(y_true, np.int64), np.asarray(probs, np.float64)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, np.int64)
    correct = pred == y_true
    rare = y_true == rare_index
    out = []
    for name, levels in attributes.items():
        levels = np.asarray(levels, dtype=str)
        rows = subgroup_rows(y_true, probs, levels, rare_index, groups, n_bootstrap, seed,
                             confidence, pred)
        # a level that cannot vary is one unit per class: its images are not independent
        # evidence of its rate, so it stays out of the tests
        fixed = [row["level"] for row in rows if row["no_variation"]]
        kept = ~np.isin(levels, fixed)
        out.append({"attribute": name, "rows": rows, "levels_not_tested": fixed,
                    "accuracy_test": homogeneity_test(correct[kept], levels[kept]),
                    "accuracy_test_class_adjusted": stratified_homogeneity_test(
                        correct[kept], levels[kept], y_true[kept]),
                    "rare_sensitivity_test": homogeneity_test(correct[rare & kept],
                                                              levels[rare & kept])})
    return out
