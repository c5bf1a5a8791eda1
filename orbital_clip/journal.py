"""The statistics a journal's statistical review asks for (issue 28), for inference.py and
score_answers.py: metrics.json's `journal` block (journal_statistics, clustered_tests) and its
CSVs and figure (write_journal_outputs). Each statistic lives in orbital_clip/metrics/; this
module only gathers them for one evaluation, as evaluation.py does for the rest."""
from pathlib import Path

import numpy as np

from orbital_clip import outputs
from orbital_clip.evaluation import figure_saver
from orbital_clip.metrics import clustered, decision, itd, patient_level, prevalence, recalibration
from orbital_clip.report import journal as journal_report
from orbital_clip.report.figures import plot_decision_curve

def journal_statistics(labels, probs, pred, compared, groups, rare_index, threshold, folders, args,
                       decided=None):
    """metrics.json's `journal`: patient-level per-class intervals, calibration slope and
    intercept, the rare class's decision curve, sensitivity at a fixed specificity (and the
    reverse), PPV/NPV at --prevalence, and with compared models the intention-to-diagnose
    comparison, the Holm-adjusted primary family and the clustered paired tests.

    Parameters
    ----------
    labels : (N,) int, every image received
    probs : (N, C) float, NaN rows where not scored; None when only labels were given
    pred : (N,) int, the argmax (or given) class, -1 where not scored or answered
    compared : list of ComparedModel over every image received
    groups : (N,) patients or None
    decided : (N,) int, our decisions under the declared rule for the comparisons (`pred` if None)
    """
    labels, pred = np.asarray(labels, np.int64), np.asarray(pred, np.int64)
    method, seed, n_boot = getattr(args, "ci_method", "wilson"), args.seed, args.bootstrap
    scored = pred >= 0
    y, g = labels[scored], None if groups is None else np.asarray(groups, dtype=str)[scored]
    out = {"ci_method": method, "unit": "patient" if groups is not None else "image",
           "rare_class": folders[rare_index], "decision_rule": "argmax",
           "per_class": patient_level.per_class_intervals(y, pred[scored], folders, g, n_boot, seed,
                                                          method=method),
           "recalibration": None, "decision_curve": None, "fixed_points": None, "prevalence": None}
    positive = y == rare_index
    if probs is not None and scored.any():
        p_scored = np.asarray(probs, np.float64)[scored]
        out["recalibration"] = recalibration.per_class_recalibration(y, p_scored, folders)
        curve = decision.net_benefit(positive, p_scored[:, rare_index])
        out["decision_curve"] = {key: value.tolist() for key, value in curve.items()}
        out["decision_curve"].update(operating_threshold=threshold, operating_net_benefit=(
            None if threshold is None else decision.net_benefit_at(positive, p_scored[:, rare_index], threshold)))
        out["fixed_points"] = [patient_level.at_fixed_point(
            positive, p_scored[:, rare_index], target, fixed, g, n_boot, seed, method=method)
            for fixed, target in (("specificity", args.fixed_specificity),
                                  ("sensitivity", args.fixed_sensitivity))]
    if getattr(args, "prevalence", None) is not None and scored.any():
        rules = [("argmax", pred[scored] == rare_index)]
        if threshold is not None and probs is not None:  # the operating rule a clinic would use
            rules.append((f"p >= {threshold:.3g}", np.asarray(probs)[scored, rare_index] >= threshold))
        out["prevalence"] = [dict(rule=rule, **prevalence.predictive_values_at_prevalence(
            int(np.sum(positive & called)), int(np.sum(positive & ~called)),
            int(np.sum(~positive & ~called)), int(np.sum(~positive & called)), args.prevalence))
            for rule, called in rules]
    if compared:
        ours = pred if decided is None else np.asarray(decided, np.int64)
        rows = itd.itd_comparison(labels, ours, [(m.name, m.pred) for m in compared], rare_index,
                                  groups, method=method)
        out.update(itd_comparison=rows, primary=itd.primary_comparisons(rows),
                   clustered_tests=clustered_tests(labels, ours, probs, compared, groups, rare_index)
                   if groups is not None else None)
    return out


def clustered_tests(labels, pred, probs, compared, groups, rare_index):
    """Per compared model, on the images both answered: the exact clustered McNemar of accuracy
    and Obuchowski's clustered DeLong of the rare class's AUROC (patients as the unit)."""
    rows = []
    for model in compared:
        both = (pred >= 0) & (np.asarray(model.pred) >= 0)
        g, y = np.asarray(groups, dtype=str)[both], labels[both]
        mcnemar = clustered.clustered_mcnemar_exact(pred[both] == y, model.pred[both] == y, g)
        row = {"model": model.name, "n": int(both.sum()), "n_patients": len(set(g)),
               "accuracy_difference": mcnemar["difference"],
               "n_discordant_patients": mcnemar["n_discordant_patients"],
               "p_mcnemar_clustered_exact": mcnemar["p"], "mcnemar_method": mcnemar["method"],
               "rare_auroc_difference": None, "rare_auroc_se_clustered": None, "p_delong_clustered": None}
        if probs is not None and model.probs is not None:
            test = clustered.clustered_delong_test(y == rare_index, np.asarray(probs)[both, rare_index],
                                                   np.asarray(model.probs)[both, rare_index], g)
            row.update(rare_auroc_difference=test["difference"], rare_auroc_se_clustered=test["se"],
                       p_delong_clustered=test["p"])
        rows.append(row)
    return rows


def write_journal_outputs(output_dir, journal, figures):
    """per_class_intervals.csv, calibration_slope.csv, decision_curve.csv (+ .png/.pdf with
    `figures`), fixed_points.csv, prevalence.csv, itd_comparison.csv, primary_endpoint.csv and
    clustered_tests.csv: each written when its block of `journal` exists."""
    output_dir = Path(output_dir)
    for name, frame in journal_report.journal_frames(journal).items():
        outputs.atomic_write_csv(output_dir / name, frame)
    if figures and journal.get("decision_curve"):
        plot_decision_curve(journal["decision_curve"], journal["rare_class"], figure_saver(output_dir))
