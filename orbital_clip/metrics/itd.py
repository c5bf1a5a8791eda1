"""Intention-to-diagnose comparison (STARD 2015 item 24; issue 28): every image received, a
non-answer or an unreadable image counted as an error, each model's abstention rate with its
interval, and the declared primary family with Holm-adjusted p-values. `compare` keeps the
comparison on the images both models answered, where a reader that abstains on the hard cases
gains; this one charges the abstentions. Pure: arrays in, plain dicts out.
"""

import numpy as np

from orbital_clip.metrics.classification import CONFIDENCE_LEVEL
from orbital_clip.metrics.clustered import clustered_mcnemar_exact
from orbital_clip.metrics.compare import mcnemar_test
from orbital_clip.metrics.intervals import proportion_interval
from orbital_clip.metrics.multiplicity import PRIMARY_ENDPOINT, holm_adjust


def itd_correct(y_true, pred):
    """(N,) bool: answered and right; a non-answer (-1) or an unreadable image is wrong."""
    pred = np.asarray(pred, np.int64)
    return (pred >= 0) & (pred == np.asarray(y_true, np.int64))


def paired_p(correct_a, correct_b, groups):
    """Exact McNemar p (images independent) or, with patients, the exact clustered sign-flip p."""
    if groups is None:
        return mcnemar_test(correct_a, correct_b)["p_exact"]
    return clustered_mcnemar_exact(correct_a, correct_b, groups)["p"]


def itd_row(name, correct, pred, rare, confidence, method):
    """One model's intention-to-diagnose numbers over every image received."""
    n, abstained = len(correct), int(np.sum(np.asarray(pred) < 0))
    hits, n_rare = int(np.sum(correct & rare)), int(rare.sum())
    return {"model": name, "n": n, "n_abstained": abstained,
            "abstention_rate": abstained / n if n else None,
            "abstention_rate_ci": proportion_interval(abstained, n, confidence, method),
            "itd_accuracy": float(correct.mean()) if n else None,
            "itd_accuracy_ci": proportion_interval(int(correct.sum()), n, confidence, method),
            "itd_rare_sensitivity": hits / n_rare if n_rare else None,
            "itd_rare_sensitivity_ci": proportion_interval(hits, n_rare, confidence, method),
            "ci_method": method, "accuracy_difference": None, "p_accuracy": None,
            "rare_sensitivity_difference": None, "p_rare_sensitivity": None}


def itd_comparison(y_true, reference_pred, others, rare_index=0, groups=None,
                   confidence=CONFIDENCE_LEVEL, method="wilson"):
    """Each model against the reference (our model) over every image received.

    Parameters
    ----------
    y_true : (N,) int
    reference_pred : (N,) int, -1 where our model could not read the image
    others : list of (name, (N,) int pred, -1 where that model gave no answer)
    groups : (N,) patients, optional: paired p-values by the exact clustered sign-flip test

    Returns
    -------
    list of dicts, ours first (see `itd_row`); the others with accuracy_difference and
    rare_sensitivity_difference (ours - model, positive when ours is better) and their exact
    paired p-values (p_accuracy, p_rare_sensitivity).
    """
    y_true = np.asarray(y_true, np.int64)
    rare = y_true == rare_index
    rare_groups = None if groups is None else np.asarray(groups)[rare]
    ours = itd_correct(y_true, reference_pred)
    rows = [itd_row("ours", ours, reference_pred, rare, confidence, method)]
    for name, pred in others:
        correct = itd_correct(y_true, pred)
        row = itd_row(name, correct, pred, rare, confidence, method)
        row.update(accuracy_difference=rows[0]["itd_accuracy"] - row["itd_accuracy"],
                   p_accuracy=paired_p(ours, correct, groups))
        if rare.any():
            row.update(rare_sensitivity_difference=(rows[0]["itd_rare_sensitivity"]
                                                    - row["itd_rare_sensitivity"]),
                       p_rare_sensitivity=paired_p(ours[rare], correct[rare], rare_groups))
        rows.append(row)
    return rows


def primary_comparisons(itd_rows, endpoint=PRIMARY_ENDPOINT):
    """The declared primary family: `endpoint` (intention to diagnose) of our model against each
    compared model, Holm-adjusted across the family. Everything else is exploratory."""
    compared = itd_rows[1:]
    p_raw = [row[f"p_{endpoint}"] for row in compared]
    return [{"endpoint": f"itd_{endpoint}", "model": row["model"],
             "ours": itd_rows[0][f"itd_{endpoint}"], "model_value": row[f"itd_{endpoint}"],
             "difference": row[f"{endpoint}_difference"], "p": p, "p_holm": p_holm,
             "family_size": sum(q is not None for q in p_raw), "status": "primary (confirmatory)"}
            for row, p, p_holm in zip(compared, p_raw, holm_adjust(p_raw))]
