"""Per-class sensitivity, specificity, PPV and NPV with an image-level interval (Wilson or
Clopper-Pearson) and, when patients are known, a patient-level one (the cluster bootstrap of
`compute_metrics`: the same seed, patients and class strata); and sensitivity at a fixed
specificity (and the reverse) with the threshold re-chosen in every resample, so the interval
carries the uncertainty of where the threshold falls. Every row names its unit.
"""

import numpy as np

from orbital_clip.metrics.bootstrap import (bootstrap_strata, group_indices, percentile_interval,
                                            resample_weights, tie_blocks)
from orbital_clip.metrics.classification import CONFIDENCE_LEVEL, DEFAULT_SEED, proportion
from orbital_clip.metrics.intervals import proportion_interval

# name -> (numerator, denominator) as indices into (tp, fp, fn, tn)
RATIOS = {"sensitivity": (0, (0, 2)), "specificity": (3, (3, 1)), "ppv": (0, (0, 1)),
          "npv": (3, (3, 2))}


def one_vs_rest_cells(cms, k):
    """(tp, fp, fn, tn) of class k from (B, C, C) confusion matrices, each (B,)."""
    tp = cms[:, k, k]
    fp, fn = cms[:, :, k].sum(axis=1) - tp, cms[:, k, :].sum(axis=1) - tp
    return tp, fp, fn, cms.sum(axis=(1, 2)) - tp - fp - fn


def confusion_replicates(y_true, y_pred, n_classes, groups, n_bootstrap, seed):
    """(B, C, C) confusion matrices of the class-stratified (cluster) bootstrap of `compute_metrics`."""
    index = group_indices(groups, len(y_true))
    cells = np.eye(n_classes * n_classes)[y_true * n_classes + y_pred]  # (N, C*C)
    strata = bootstrap_strata(y_true, index)
    return np.concatenate([w @ cells for w in resample_weights(index, n_bootstrap, seed, strata=strata)]
                          ).reshape(-1, n_classes, n_classes)


# name -> the images in its denominator, from (y_true == k, y_pred == k)
DENOMINATORS = {"sensitivity": lambda true_k, called_k: true_k,
                "specificity": lambda true_k, called_k: ~true_k,
                "ppv": lambda true_k, called_k: called_k, "npv": lambda true_k, called_k: ~called_k}


def no_patient_interval_reason(k, n, n_patients):
    """Why a percentile cluster bootstrap of k/n cannot vary, or '' when it can: at 0/n or n/n
    every resample gives the same proportion, and with one patient every resample is that
    patient; a zero-width 'interval' would claim a certainty the data do not have."""
    if n == 0:
        return "no image in the denominator"
    if n_patients < 2:
        return f"{n_patients} patient in the denominator: a bootstrap of patients cannot vary"
    if k in (0, n):
        return f"{k}/{n}: every resample gives {k // n}, a bootstrap interval cannot vary"
    return ""


def per_class_intervals(y_true, y_pred, class_names, groups=None, n_bootstrap=0, seed=DEFAULT_SEED,
                        confidence=CONFIDENCE_LEVEL, method="wilson"):
    """One row per class and metric: value, ci (image-level, `method`), ci_patient (cluster
    bootstrap percentile interval when `groups` and `n_bootstrap`; None with ci_patient_note
    saying why where it could not vary: 0/n, n/n or fewer than 2 patients in the denominator),
    n_resamples, and the units."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    n_classes = len(class_names)
    cm = np.zeros((1, n_classes, n_classes))
    np.add.at(cm[0], (y_true, y_pred), 1)
    boot = (confusion_replicates(y_true, y_pred, n_classes, groups, n_bootstrap, seed)
            if groups is not None and n_bootstrap and len(y_true) else None)
    rows = []
    for k, name in enumerate(class_names):
        point = [int(c[0]) for c in one_vs_rest_cells(cm, k)]
        reps = None if boot is None else one_vs_rest_cells(boot, k)
        true_k, called_k = y_true == k, y_pred == k
        for metric, (num, den) in RATIOS.items():
            k_hits, n_total = point[num], point[den[0]] + point[den[1]]
            row = {"class": name, "metric": metric, "k": k_hits, "n": n_total,
                   "value": proportion(k_hits, n_total),
                   "ci": proportion_interval(k_hits, n_total, confidence, method),
                   "ci_unit": f"image ({method})", "ci_patient": None, "ci_patient_unit": None,
                   "ci_patient_note": "", "n_resamples": None}
            if reps is not None:
                in_denominator = DENOMINATORS[metric](true_k, called_k)
                reason = no_patient_interval_reason(
                    k_hits, n_total, len(set(np.asarray(groups)[in_denominator].tolist())))
                if reason:
                    row["ci_patient_note"] = reason
                    rows.append(row)
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratio = reps[num] / (reps[den[0]] + reps[den[1]])
                row.update(ci_patient=percentile_interval(ratio, confidence),
                           ci_patient_unit=f"patient (cluster bootstrap, {n_bootstrap} resamples)",
                           n_resamples=int(np.isfinite(ratio).sum()))
            rows.append(row)
    return rows


def threshold_curves(weights, positive, p):
    """Sensitivity and specificity of 'p >= t' for t at each distinct score (ascending) and at
    +inf (last column), under each row of weights: ((B, J+1), (B, J+1), thresholds (J+1,))."""
    order, starts = tie_blocks(p)
    ranked, hit = weights[:, order], positive[order].astype(np.float64)
    pos = np.add.reduceat(ranked * hit, starts, axis=1)  # (B, J)
    neg = np.add.reduceat(ranked * (1.0 - hit), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1, keepdims=True), neg.sum(axis=1, keepdims=True)
    pos_below = np.cumsum(pos, axis=1) - pos
    neg_below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.hstack([(n_pos - pos_below) / n_pos, np.zeros_like(n_pos)])
        spec = np.hstack([neg_below / n_neg, np.ones_like(n_neg)])
    thresholds = np.append(np.asarray(p, np.float64)[order][starts], np.inf)
    return sens, spec, thresholds


def pick(chosen_from, constraint, target, lowest):
    """Per row, `chosen_from` at the lowest (highest) threshold whose `constraint` >= target."""
    ok = constraint >= target - 1e-12
    column = ok.argmax(axis=1) if lowest else ok.shape[1] - 1 - ok[:, ::-1].argmax(axis=1)
    value = chosen_from[np.arange(len(ok)), column]
    return np.where(ok.any(axis=1) & np.isfinite(constraint).all(axis=1), value, np.nan), column


def at_fixed_point(positive, p, target, fixed="specificity", groups=None, n_bootstrap=0,
                   seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL, method="wilson"):
    """Sensitivity at the lowest threshold reaching specificity >= target (`fixed`
    'specificity'), or specificity at the highest reaching sensitivity >= target ('sensitivity'),
    as the ROC curve reads it (scikit-learn's roc_curve points, no interpolation).

    Returns
    -------
    dict: fixed, target, threshold, achieved (the fixed metric's value there), metric, value,
    ci (image-level by `method`, threshold taken as given), ci_bootstrap (the threshold re-chosen
    in each resample; patients when `groups`), bootstrap_unit, n_resamples.
    """
    positive, p = np.asarray(positive, bool), np.asarray(p, np.float64)
    sens, spec, thresholds = threshold_curves(np.ones((1, len(p))), positive, p)
    by_spec = fixed == "specificity"
    value, column = pick(sens if by_spec else spec, spec if by_spec else sens, target, by_spec)
    n_den = int(positive.sum() if by_spec else (~positive).sum())
    value = None if np.isnan(value[0]) else float(value[0])
    k = None if value is None else int(round(value * n_den))
    out = {"fixed": fixed, "target": target, "metric": "sensitivity" if by_spec else "specificity",
           "threshold": None if value is None else float(thresholds[column[0]]),
           "achieved": None if value is None else float((spec if by_spec else sens)[0, column[0]]),
           "value": value, "ci": None if value is None else proportion_interval(k, n_den, confidence, method),
           "ci_unit": f"image ({method})", "ci_bootstrap": None, "bootstrap_unit": None,
           "n_resamples": None}
    if n_bootstrap and value is not None:
        index = group_indices(groups, len(p))
        strata = bootstrap_strata(positive.astype(np.int64), index)
        reps = []
        for w in resample_weights(index, n_bootstrap, seed, strata=strata):
            s, c, _ = threshold_curves(w, positive, p)
            reps.append(pick(s if by_spec else c, c if by_spec else s, target, by_spec)[0])
        reps = np.concatenate(reps)
        out.update(ci_bootstrap=percentile_interval(reps, confidence),
                   bootstrap_unit="image" if groups is None else "patient",
                   n_resamples=int(np.isfinite(reps).sum()))
    return out
