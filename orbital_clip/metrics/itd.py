"""Intention-to-diagnose comparison (STARD 2015 item 24; issue 28): every image received, a
non-answer or an unreadable image counted as an error, each model's abstention rate with its
interval, and the declared primary family with Holm-adjusted p-values: the rare class's ITD
sensitivity and its ITD specificity (a non-answer on a non-rare image counted as an error, i.e.
as a false positive), co-primary in one Holm family. `compare` keeps the
comparison on the images both models answered, where a reader that abstains on the hard cases
gains; this one charges the abstentions. Pure: arrays in, plain dicts out.
"""

import numpy as np

from orbital_clip.metrics.classification import CONFIDENCE_LEVEL
from orbital_clip.metrics.clustered import clustered_mcnemar_exact
from orbital_clip.metrics.compare import mcnemar_test
from orbital_clip.metrics.intervals import proportion_interval
from orbital_clip.metrics.multiplicity import PRIMARY_ENDPOINTS, holm_adjust


def itd_correct(y_true, pred):
    """(N,) bool: answered and right; a non-answer (-1) or an unreadable image is wrong."""
    pred = np.asarray(pred, np.int64)
    return (pred >= 0) & (pred == np.asarray(y_true, np.int64))


def paired_p(correct_a, correct_b, groups):
    """(p, note): exact McNemar p (images independent) or, with patients, the exact clustered
    sign-flip p. With no discordant pair the exact p is 1 (every outcome is as extreme as the
    observed 0), not missing: note 'no discordant pairs'. p None only with no image at all."""
    if not len(correct_a):
        return None, "no image"
    if groups is None:
        p = mcnemar_test(correct_a, correct_b)["p_exact"]
    else:
        p = clustered_mcnemar_exact(correct_a, correct_b, groups)["p"]
    return (1.0, "no discordant pairs") if p is None else (p, "")


def not_called_rare(pred, rare_index):
    """(N,) bool: answered and not the rare class; a non-answer counts as a false positive."""
    pred = np.asarray(pred, np.int64)
    return (pred >= 0) & (pred != rare_index)


def itd_row(name, correct, pred, rare, rejected, confidence, method):
    """One model's intention-to-diagnose numbers over every image received; `rejected` (N,)
    bool is `not_called_rare`, read on the non-rare images for the ITD specificity."""
    n, abstained = len(correct), int(np.sum(np.asarray(pred) < 0))
    hits, n_rare = int(np.sum(correct & rare)), int(rare.sum())
    true_negatives, n_other = int(np.sum(rejected & ~rare)), int((~rare).sum())
    return {"model": name, "n": n, "n_abstained": abstained,
            "abstention_rate": abstained / n if n else None,
            "abstention_rate_ci": proportion_interval(abstained, n, confidence, method),
            "itd_accuracy": float(correct.mean()) if n else None,
            "itd_accuracy_ci": proportion_interval(int(correct.sum()), n, confidence, method),
            "itd_rare_sensitivity": hits / n_rare if n_rare else None,
            "itd_rare_sensitivity_ci": proportion_interval(hits, n_rare, confidence, method),
            "itd_rare_specificity": true_negatives / n_other if n_other else None,
            "itd_rare_specificity_ci": proportion_interval(true_negatives, n_other, confidence, method),
            "ci_method": method, "accuracy_difference": None, "p_accuracy": None,
            "p_accuracy_note": "", "rare_sensitivity_difference": None, "p_rare_sensitivity": None,
            "p_rare_sensitivity_note": "", "rare_specificity_difference": None,
            "p_rare_specificity": None, "p_rare_specificity_note": ""}


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
    list of dicts, ours first (see `itd_row`); the others with accuracy_difference,
    rare_sensitivity_difference and rare_specificity_difference (ours - model, positive when
    ours is better), their exact paired p-values (p_accuracy, p_rare_sensitivity,
    p_rare_specificity) and each p's note ('no discordant pairs' where p is 1 for that reason).
    """
    y_true = np.asarray(y_true, np.int64)
    rare = y_true == rare_index
    subsets = {"accuracy": np.ones(len(y_true), bool), "rare_sensitivity": rare,
               "rare_specificity": ~rare}
    ours = {"accuracy": itd_correct(y_true, reference_pred),
            "rare_sensitivity": itd_correct(y_true, reference_pred),
            "rare_specificity": not_called_rare(reference_pred, rare_index)}
    rows = [itd_row("ours", ours["accuracy"], reference_pred, rare, ours["rare_specificity"],
                    confidence, method)]
    for name, pred in others:
        theirs = {"accuracy": itd_correct(y_true, pred), "rare_sensitivity": itd_correct(y_true, pred),
                  "rare_specificity": not_called_rare(pred, rare_index)}
        row = itd_row(name, theirs["accuracy"], pred, rare, theirs["rare_specificity"],
                      confidence, method)
        for endpoint, subset in subsets.items():
            value = "itd_" + endpoint
            if rows[0][value] is not None and row[value] is not None:
                row[endpoint + "_difference"] = rows[0][value] - row[value]
            p, note = paired_p(ours[endpoint][subset], theirs[endpoint][subset],
                               None if groups is None else np.asarray(groups)[subset])
            row.update({"p_" + endpoint: p, "p_" + endpoint + "_note": note})
        rows.append(row)
    return rows


def primary_comparisons(itd_rows, endpoints=PRIMARY_ENDPOINTS):
    """The declared primary family: each of `endpoints` (intention to diagnose) of our model
    against each compared model, Holm-adjusted across the whole family (endpoints x models, its
    size fixed by the declaration, not by which p-values exist). Everything else is exploratory."""
    pairs = [(endpoint, row) for endpoint in endpoints for row in itd_rows[1:]]
    p_raw = [row[f"p_{endpoint}"] for endpoint, row in pairs]
    return [{"endpoint": f"itd_{endpoint}", "model": row["model"],
             "ours": itd_rows[0][f"itd_{endpoint}"], "model_value": row[f"itd_{endpoint}"],
             "difference": row[f"{endpoint}_difference"], "p": p, "p_note": row[f"p_{endpoint}_note"],
             "p_holm": p_holm, "family_size": len(pairs), "status": "primary (confirmatory)"}
            for (endpoint, row), p, p_holm in zip(pairs, p_raw, holm_adjust(p_raw))]
