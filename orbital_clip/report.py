"""The tables, figures and report.md of an evaluation (values in, frames, figures or text out):
predictions.csv, per_class_metrics.csv, confusion_matrix.csv and comparison.csv as DataFrames,
the STARD flow table, the markdown of report.md with its reporting-checklist map, and the journal
figures (one 3.5-inch panel per class, 8-pt type, PNG and vector PDF). Statistics come from
metrics.py; inference.py, answer_files.py and evaluation.py decide what is written where.
"""

import contextlib
import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.gridspec import GridSpecFromSubplotSpec
from sklearn.metrics import precision_recall_curve, roc_curve

from orbital_clip.metrics import CALIBRATION_METRICS, OVERALL_METRICS, PROPORTIONS, format_p, reliability_table

METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
    "weighted_f1": "weighted F1", "mcc": "Matthews correlation (multi-class)",
    "macro_auroc": "macro AUROC (one-vs-rest)", "macro_auprc": "macro AUPRC (one-vs-rest)",
    "brier": "Brier score (multi-class, 0-2)", "log_loss": "log-loss",
    "ece": "expected calibration error"}
FIGURE_NAMES = ("confusion_matrix", "roc_curves", "pr_curves", "calibration", "prob_histograms")
PANEL_WIDTH_IN = 3.5  # one journal column
PANEL_HEIGHT_IN = 3.2
FONT_PT = 8  # the smallest size journals accept in print
FIGURE_DPI = 300


# ----------------------------------------------------------------------------------------------
# Tables and the report (pure: values in, frames or text out)


def relative_path(path, root):
    """path relative to root, with forward slashes (the same on every OS)."""
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def predictions_frame(cohort, folders, probs, statuses, probs_cal=None, rule_pred=None,
                      anonymize=None, decision_rule="argmax"):
    """predictions.csv as a DataFrame: one row per image in input order, failed rows included.

    `cohort` is an evaluation.Cohort: items [(path, class index)], labelled, root (paths are
    written relative to it) and groups (or None). Columns: path (a salted hash with `anonymize`),
    [group], true_label, pred_label, prob_<folder> (uncalibrated), [prob_cal_<folder>],
    [pred_label_threshold], prediction, status. pred_label is always the argmax and
    pred_label_threshold the operating rule's; `prediction` repeats the one of `decision_rule`
    ('argmax' or 'threshold', which needs `rule_pred`), the model's decision.
    """
    items, labelled = cohort.items, cohort.labelled
    finite = np.isfinite(probs).all(axis=1)
    paths = [relative_path(path, cohort.root) for path, _label in items]
    columns = {"path": [anonymize(p) for p in paths] if anonymize else paths}
    if cohort.groups is not None:
        columns["group"] = [anonymize(g) if anonymize else g for g in cohort.groups]
    columns["true_label"] = [folders[label] if labelled else "" for _path, label in items]
    columns["pred_label"] = [folders[int(np.argmax(row))] if ok else "" for row, ok in zip(probs, finite)]
    for k, folder in enumerate(folders):
        columns[f"prob_{folder}"] = probs[:, k]  # NaN (an empty cell) on failed rows
    if probs_cal is not None:
        for k, folder in enumerate(folders):
            columns[f"prob_cal_{folder}"] = probs_cal[:, k]
    if rule_pred is not None:
        columns["pred_label_threshold"] = [folders[p] if ok else "" for p, ok in zip(rule_pred, finite)]
    if decision_rule == "threshold" and rule_pred is None:
        raise ValueError("decision rule 'threshold' without threshold predictions")
    columns["prediction"] = list(columns["pred_label_threshold" if decision_rule == "threshold"
                                         else "pred_label"])
    if anonymize:  # a reason could quote the file name; never let it through
        names = [(str(path), Path(path).name, rel) for (path, _), rel in zip(items, paths)]
        statuses = [scrub(status, names[i]) for i, status in enumerate(statuses)]
    columns["status"] = list(statuses)
    return pd.DataFrame(columns)


def scrub(text, names):
    """text with each of `names` (longest first) replaced by '<file>'."""
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, "<file>")
    return text


def confusion_frame(cm, folders):
    """The confusion matrix as a DataFrame: rows true, columns predicted, folder names as headers."""
    frame = pd.DataFrame(np.asarray(cm, dtype=np.int64), columns=list(folders))
    frame.insert(0, "true_label", list(folders))
    return frame


def per_class_frame(metrics, folders):
    """per_class_metrics.csv: one row per class, each interval as <name>_ci_low/_ci_high."""
    rows = []
    for folder in folders:
        row = {"class": folder}
        for key, value in metrics["per_class"][folder].items():
            if key.endswith("_ci"):
                row[f"{key}_low"], row[f"{key}_high"] = value if value else (None, None)
            else:
                row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


COMPARISON_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
    "rare_sensitivity": "rare-class sensitivity", "rare_specificity": "rare-class specificity",
    "macro_auroc": "macro AUROC (one-vs-rest)", "rare_auroc": "rare-class AUROC"}
COMPARISON_P_COLUMNS = {  # comparison.csv column -> what the p-value is, for report.md
    "p_bootstrap": "paired bootstrap", "p_mcnemar_exact": "McNemar exact (binomial)",
    "p_mcnemar_mid": "McNemar mid-p", "p_mcnemar_clustered": "clustered McNemar (Obuchowski 1998)",
    "p_delong": "DeLong (images independent)"}


def rare_summary(metrics):
    """The rare class in inference.py's last log line, at the stored operating point (else under
    argmax): 'orbital disease sensitivity 0.750 (...)  specificity 0.900 (...) at p >= 0.312'."""
    rare, op = metrics["rare_class"], metrics.get("operating_point")
    stats, where = ((op["rule"], f"at p >= {op['threshold']:.3f}") if op
                    else (metrics["per_class"][rare], "(argmax)"))
    return (f"{rare} sensitivity {format_value(stats['sensitivity'], stats['sensitivity_ci'])}  "
            f"specificity {format_value(stats['specificity'], stats['specificity_ci'])} {where}")


def summary_row(alpha, folder, metrics, rare_class):
    """One row of wise_ft_summary.csv (inference.py --wise-ft-alpha)."""
    row = {"alpha": alpha, "output_dir": folder, "n": None if metrics is None else metrics["n"]}
    names = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc", "log_loss", "ece")
    for name in names:
        value = None if metrics is None else metrics[name]
        ci = None if metrics is None else metrics[f"{name}_ci"]
        row.update({name: value, f"{name}_ci_low": ci[0] if ci else None,
                    f"{name}_ci_high": ci[1] if ci else None})
    for name in ("sensitivity", "specificity"):
        stats = {} if metrics is None else metrics["per_class"].get(rare_class, {})
        ci = stats.get(f"{name}_ci")
        row.update({f"rare_{name}": stats.get(name), f"rare_{name}_ci_low": ci[0] if ci else None,
                    f"rare_{name}_ci_high": ci[1] if ci else None})
    return row


def comparison_frame(comparison):
    """comparison.csv: one row per compared model and metric. `model` names the compared model,
    `model_value`/`model_ci_*` are its metric, `ours_value`/`ours_ci_*` ours on the same images,
    `difference` = ours - model (positive: ours better); each p-value column is named for its test
    (empty where the test does not apply); `ci_n_resamples` counts the resamples the CIs rest on."""
    rows = []
    for row in comparison["rows"]:
        flat = {"model": row["model"], "metric": row["metric"], "n": row["n"],
                "n_no_answer": row["n_no_answer"]}
        for key, ci_key, name in (("value", "value_ci", "model_value"),
                                  ("reference_value", "reference_ci", "ours_value"),
                                  ("difference", "difference_ci", "difference")):
            ci, stem = row[ci_key], name.removesuffix("_value")
            flat.update({name: row[key], f"{stem}_ci_low": ci[0] if ci else None,
                         f"{stem}_ci_high": ci[1] if ci else None})
        flat.update({column: row[column] for column in COMPARISON_P_COLUMNS})
        flat.update(ours_only_correct=row["reference_only_correct"],
                    model_only_correct=row["model_only_correct"],
                    ci_unit="patient" if comparison["bootstrap_unit"] == "group" else "image",
                    ci_n_resamples=row.get("n_resamples"))
        rows.append(flat)
    frame = pd.DataFrame(rows)
    if len(frame):  # a count, empty where there is no interval (not 2000.0)
        frame["ci_n_resamples"] = frame["ci_n_resamples"].astype("Int64")
    return frame


def failure_category(status):
    """'truncated image' from 'failed: truncated image (detail...)'; an unsupported format keeps
    its extension ('unsupported format (.heic)'), the detail a reader needs to convert the files;
    'unmapped answer' from "failed: unmapped answer 'text'" (one reason, not one per answer)."""
    reason = status.removeprefix("failed: ")
    if reason.startswith("unsupported format ("):  # common.UNSUPPORTED_FORMAT
        return reason
    return reason.split(" (")[0].split(" '")[0].strip() or "unreadable"


def flow_counts(labels, statuses, folders, labelled, groups=None):
    """STARD flow of images (and, with `groups`, of patients): received -> unreadable (by reason)
    -> scored, per class.

    Returns
    -------
    dict: rows -> {class: {received, unreadable, scored}} ('all images' when unlabelled) and
    'total'; with groups each row also has patients_received, patients_unreadable (patients with
    at least one unreadable image) and patients_scored (at least one scored image), a patient
    counted in every class it has images of and once in the total; reasons -> {reason: {class:
    count}}.
    """
    keys = [folders[label] if labelled else "all images" for label in labels]
    order = list(folders) if labelled else ["all images"]
    rows = {key: {"received": 0, "unreadable": 0, "scored": 0} for key in order}
    reasons = {}
    for key, status in zip(keys, statuses):
        rows[key]["received"] += 1
        if status == "ok":
            rows[key]["scored"] += 1
        else:
            rows[key]["unreadable"] += 1
            by_class = reasons.setdefault(failure_category(status), dict.fromkeys(order, 0))
            by_class[key] += 1
    rows["total"] = {name: sum(r[name] for r in rows.values())
                     for name in ("received", "unreadable", "scored")}
    if groups is not None:
        for key in order + ["total"]:
            mine = [(g, st) for g, k, st in zip(groups, keys, statuses) if key in (k, "total")]
            rows[key].update(patients_received=len({g for g, _ in mine}),
                             patients_unreadable=len({g for g, st in mine if st != "ok"}),
                             patients_scored=len({g for g, st in mine if st == "ok"}))
    return {"rows": rows, "reasons": reasons}


def most_confident_errors(y_true, probs, n_per_class):
    """The failure analysis: per true class, its misclassified images (argmax) with the highest
    probability of the wrong class first, at most `n_per_class` of them.

    Returns
    -------
    list of dicts: true, rank (1..), index (into y_true), pred, p_pred, p_true.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    rows = []
    for k in range(probs.shape[1]):
        wrong = np.flatnonzero((y_true == k) & (pred != k))
        order = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n_per_class]
        rows += [{"true": k, "rank": rank, "index": int(i), "pred": int(pred[i]),
                  "p_pred": float(probs[i, pred[i]]), "p_true": float(probs[i, k])}
                 for rank, i in enumerate(order, 1)]
    return rows


def failure_markdown(failures, folders):
    """The failure-analysis section: per true class its most confident errors, thumbnails linked."""
    lines = ["The most confident errors of each true class (argmax), highest probability of the "
             "wrong class first: patterns here (image quality, look-alike conditions, label "
             "errors) are what a reader checks before trusting the metrics.", "",
             "| true class | rank | image | predicted | p(predicted) | p(true) | file |",
             "| --- | ---: | --- | --- | ---: | ---: | --- |"]
    for row in failures:
        image = f"![error]({row['thumbnail']})" if row.get("thumbnail") else "(not readable)"
        lines.append(f"| {folders[row['true']]} | {row['rank']} | {image} | {folders[row['pred']]} | "
                     f"{row['p_pred']:.3f} | {row['p_true']:.3f} | `{row['file']}` |")
    if not failures:
        lines = ["No misclassified image: there is no error to analyse."]
    return lines


def format_value(value, ci=None, digits=3):
    """`0.833 (0.552–0.953)`, or `n/a` for an undefined value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else text


def flow_markdown(flow):
    """The flow table (and the reasons) of report.md."""
    patients = "patients_received" in flow["rows"]["total"]
    lines = ["| class | received | unreadable (excluded) | scored |"
             + (" patients received | patients with an unreadable image | patients scored |"
                if patients else ""),
             "| --- | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if patients else "")]
    for key, row in flow["rows"].items():
        name = f"**{key}**" if key == "total" else key
        lines.append(f"| {name} | {row['received']} | {row['unreadable']} | {row['scored']} |"
                     + (f" {row['patients_received']} | {row['patients_unreadable']} | "
                        f"{row['patients_scored']} |" if patients else ""))
    if flow["reasons"]:
        lines += ["", "Reasons for exclusion: " + "; ".join(
            f"{reason}: {sum(by_class.values())} ("
            + ", ".join(f"{k} {v}" for k, v in by_class.items() if v) + ")"
            for reason, by_class in flow["reasons"].items()) + "."]
    return lines


def metrics_markdown(metrics, folders):
    """The overall and per-class metric tables of report.md."""
    scaled = metrics.get("temperature_scaled")
    lines = ["| metric | value (95% CI) |" + (" temperature-scaled |" if scaled else ""),
             "| --- | --- |" + (" --- |" if scaled else "")]
    for name in OVERALL_METRICS:
        cell = format_value(metrics[name], metrics[name + "_ci"])
        extra = ""
        if scaled:
            extra = (f" {format_value(scaled[name], scaled[name + '_ci'])} |"
                     if name in CALIBRATION_METRICS else " — |")
        lines.append(f"| {METRIC_LABELS[name]} | {cell} |{extra}")
    if scaled:
        lines += ["", f"Temperature scaling (T = {scaled['temperature']:.3f}, {scaled['source']}) "
                  "keeps every argmax; only calibration is re-scored."]
    lines += ["", "| class | n (prevalence) | sensitivity | specificity | PPV | NPV | LR+ | LR− | F1 "
              "| AUROC | AUPRC (random ranking) |", "| --- " * 11 + "|"]
    for folder in folders:
        s = metrics["per_class"][folder]
        cells = [format_value(s[name], s[name + "_ci"], 2 if name.startswith("lr") else 3)
                 for name in (*PROPORTIONS, "lr_pos", "lr_neg", "f1", "auroc", "auprc")]
        for index, name, zero, other in ((4, "lr_pos", "fp", "tp"), (5, "lr_neg", "tn", "fn")):
            if s[name] is None and s[zero] == 0 and s[other] > 0:  # infinite: no interval either
                cells[index] = f"∞ ({zero.upper()} = 0)"
        cells[-1] += f" ({format_value(s['auprc_baseline'])})"
        lines.append(f"| {folder} | {s['support']} ({format_value(s['prevalence'])}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "AUPRC (random ranking): the expected AUPRC of a random ranking of this cohort's "
              "counts, the chance level (the prevalence is its large-sample limit)."]
    notes = resample_notes(metrics, folders)
    if notes:
        lines += ["", "Intervals resting on fewer usable resamples than drawn (a resample without "
                  "an image of a class leaves a class-averaged metric, or that class's F1, AUROC "
                  "and AUPRC, undefined): " + "; ".join(notes) + "."]
    return lines


def resample_notes(metrics, folders):
    """'macro AUROC 1,873 of 2,000', one per bootstrap interval with unusable resamples."""
    total = (metrics.get("bootstrap_design") or {}).get("resamples")
    if not total:
        return []
    found = [(METRIC_LABELS[name], metrics.get(f"{name}_ci_n_resamples")) for name in OVERALL_METRICS]
    for folder in folders:
        stats = metrics["per_class"][folder]
        found += [(f"{label} of {folder}", stats.get(f"{name}_ci_n_resamples"))
                  for name, label in (("f1", "F1"), ("auroc", "AUROC"), ("auprc", "AUPRC"))]
    return [f"{label} {used:,} of {total:,}" for label, used in found
            if used is not None and used < total]


def comparison_resample_notes(comparison):
    """'cnn: balanced accuracy on 1,873 of 2,000 resamples', one per comparison interval with
    unusable resamples (metrics.compare_predictions: no answered image of a class in them)."""
    total = comparison.get("n_bootstrap")
    return [f"{row['model']}: {COMPARISON_LABELS[row['metric']]} on {row['n_resamples']:,} of "
            f"{total:,} resamples" for row in comparison["rows"]
            if total and row.get("n_resamples") is not None and row["n_resamples"] < total]


def unanswered_notes(comparison, folders):
    """"reader answered no image of 'healthy eyes'", one per compared model that never answered
    some class (its balanced accuracy and macro F1 are then undefined, metrics.compare_predictions)."""
    found = {row["model"]: row.get("unanswered_classes") for row in comparison["rows"]}
    return [f"{model} answered no image of {', '.join(repr(folders[k]) for k in classes)}"
            for model, classes in found.items() if classes]


def levels_markdown(levels):
    """Which intervals are image-level and which patient-level (metrics.json interval_levels)."""
    return ["Interval levels: " + "; ".join(f"{key}: {value}" for key, value in levels.items()) + "."]


def operating_markdown(op):
    """Argmax and the validation threshold rule side by side for the rare class."""
    origin = [f"source: {op['source']}"]
    if op.get("target_sensitivity") is not None:
        origin.append(f"target sensitivity {op['target_sensitivity']}")
    if op.get("val_sensitivity") is not None:
        origin.append(f"validation sensitivity {format_value(op['val_sensitivity'])}, specificity "
                      f"{format_value(op.get('val_specificity'))}")
    patient = "sensitivity_ci_patient" in op["rule"]
    lines = [f"Rare class **{op['class']}**: positive if p ≥ {op['threshold']:.4f} "
             f"({'; '.join(origin)}), applied to the uncalibrated probability, never tuned on "
             "this cohort; otherwise the most probable other class. Intervals: Wilson (images "
             "as independent)" + ("; sensitivity and specificity also with a patient-level "
                                  "interval (cluster bootstrap of patients, stratified by class)"
                                  if patient else "") + ".", "",
             "| rule | TP | FP | FN | TN | sensitivity | specificity | PPV | NPV |"
             + (" sensitivity (patient CI) | specificity (patient CI) |" if patient else ""),
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"
             + (" --- | --- |" if patient else "")]
    for label, key in (("argmax", "argmax"), (f"p ≥ {op['threshold']:.4f}", "rule")):
        s = op[key]
        extra = "".join(f" {format_value(s[n], s[n + '_ci_patient'])} |"
                        for n in ("sensitivity", "specificity")) if patient else ""
        lines.append(f"| {label} | {s['tp']} | {s['fp']} | {s['fn']} | {s['tn']} | "
                     + " | ".join(format_value(s[n], s[n + "_ci"]) for n in PROPORTIONS) + " |" + extra)
    return lines


def comparison_markdown(comparison, sources, folders):
    """The comparison section of report.md: per model and metric, ours minus the model."""
    unit = (f"{comparison['n_groups']} patients (cluster bootstrap)"
            if comparison["bootstrap_unit"] == "group" else "images")
    lines = [f"Each model against ours on the images both answered (of {comparison['n']} scored by "
             f"ours): difference = ours − model (positive: ours better), 95% CIs from the same "
             f"bootstrap resamples of {unit} for every model.", ""]
    lines += [f"- `{name}`: {source}" for name, source in sources.items()] + [""]
    lines += ["| model | metric | n | model (95% CI) | ours (95% CI) | ours − model (95% CI) | p (test) |",
              "| --- | --- | ---: | --- | --- | --- | --- |"]
    for row in comparison["rows"]:
        # a bootstrap p of 0 only says p < 2/B, B the resamples it rests on
        floor = {"p_bootstrap": row.get("n_resamples")}
        tests = [f"{format_p(row[column], floor.get(column))} ({label})"
                 for column, label in COMPARISON_P_COLUMNS.items() if row[column] is not None]
        if row["model_only_correct"] is not None:
            tests.append(f"discordant: ours only {row['reference_only_correct']}, model only "
                         f"{row['model_only_correct']}")
        lines.append(f"| {row['model']} | {COMPARISON_LABELS[row['metric']]} | {row['n']} | "
                     f"{format_value(row['value'], row['value_ci'])} | "
                     f"{format_value(row['reference_value'], row['reference_ci'])} | "
                     f"{format_value(row['difference'], row['difference_ci'])} | "
                     f"{'; '.join(tests) or '—'} |")
    if comparison["bootstrap_unit"] == "group":
        lines += ["", "McNemar's exact and mid-p tests treat images as independent; with patients "
                  "the clustered test (Obuchowski 1998) and the bootstrap p respect them."]
    unanswered = unanswered_notes(comparison, folders)
    if unanswered:
        lines += ["", "Balanced accuracy and macro F1 are n/a where a model answered no image of a "
                  "class (they average over every class): " + "; ".join(unanswered) + "."]
    notes = comparison_resample_notes(comparison)
    if notes:
        lines += ["", "Intervals resting on fewer usable resamples than drawn (a resample without "
                  "an answered image of a class leaves a class-averaged metric undefined, one "
                  "without an answered rare-class image its sensitivity and AUROC): "
                  + "; ".join(notes) + "."]
    return lines


# STARD 2015 numbers checked against the published list (Cohen et al., BMJ Open 2016); TRIPOD+AI
# 2024 numbers against the statement's checklist (Collins et al., BMJ 2024;385:e078378); CLAIM 2024
# items are named, not numbered: their numbers could not be checked against the published table.
CHECKLIST_NOTE = ("STARD 2015 and TRIPOD+AI 2024 item numbers as published; CLAIM 2024 items by "
                  "name (their numbers were not checked against the published table).")
CHECKLIST_ROWS = (
    ("Flow table (above), `flow` in metrics.json",
     "images (and patients, when groups are known) received, unreadable with reasons, scored, by class",
     "19 flow of participants; 15 indeterminate and 16 missing index test results",
     "20a flow of participants; 11 missing data",
     "numbers of patients/examinations included and excluded (flowchart); missing data"),
    ("[confusion_matrix.png](confusion_matrix.png), confusion_matrix.csv, classification_report.txt",
     "predicted by true class (counts, row %)",
     "23 cross tabulation of the index test by the reference standard",
     "23a model performance", "failure analysis (confusion matrix)"),
    ("Metric tables (above), metrics.json, per_class_metrics.csv",
     "accuracy, balanced accuracy, F1, MCC; per class sensitivity, specificity, PPV, NPV, LR±, "
     "AUROC, AUPRC with 95% CIs, each named image- or patient-level",
     "14 methods for estimating diagnostic accuracy; 24 estimates and their precision",
     "12e performance measures; 23a model performance with confidence intervals",
     "performance metrics; measures of uncertainty; diagnostic accuracy estimates with 95% CIs"),
    ("[roc_curves.png](roc_curves.png), [pr_curves.png](pr_curves.png)",
     "one-vs-rest discrimination; operating point marked; random-ranking AUPRC",
     "24 estimates of diagnostic accuracy", "12e performance plots; 23a model performance",
     "diagnostic accuracy estimates (ROC analysis)"),
    ("[calibration.png](calibration.png), Brier / log-loss / ECE",
     "reliability per class with counts per bin; before and after temperature scaling (the "
     "temperature was fitted on the development validation split: model development, not updating)",
     "—", "12e calibration measures and plots; 12c model building (the temperature)",
     "performance metrics"),
    ("[prob_histograms.png](prob_histograms.png), operating point table",
     "model output by true class; pre-specified threshold from validation",
     "12a index test positivity cut-off, pre-specified", "15 model output and thresholds",
     "performance metrics"),
    ("Intention-to-diagnose line", "unreadable images counted as errors (argmax and the rule)",
     "15 indeterminate results; 16 missing data", "11 missing data", "missing data"),
    ("comparison.csv, comparison.png (with --baseline or --compare)",
     "paired differences with CIs, McNemar (clustered with patients), DeLong",
     "14 methods for comparing measures of diagnostic accuracy",
     "12e measures to compare models",
     "comparison with other models; statistical significance"),
    ("Failure analysis (above), failure_analysis/",
     "the most confident errors per true class, with thumbnails", "—", "—",
     "failure analysis of incorrectly classified cases"),
    ("predictions.csv", "per-image probabilities and status", "—", "15 model output",
     "—"),
    ("Header of this report, args.json", "checkpoint SHA-256, model, prompts, thresholds, versions",
     "10a index test in sufficient detail", "22 model specification; 18f code sharing",
     "model description; software libraries and versions"),
)


def report_header(run):
    """What was evaluated: checkpoint, classes, prompts, thresholds, statistics, software."""
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    mapping = ", ".join(f"{i} = {folder}" for i, folder in enumerate(run["class_folders"]))
    threshold = run.get("operating_threshold")
    lines = [f"- checkpoint: `{run['checkpoint']}` ({run['checkpoint_kind']}); SHA-256 "
             f"`{run['checkpoint_sha256'] or 'n/a (pretrained tag)'}`",
             f"- model `{run['model_name']}`, logit scale `{run['logit_scale_mode']}`"
             + (f"; WiSE-FT α = {run['wise_ft_alpha']:g} with base {run['wise_ft_base']}"
                if run.get("wise_ft_alpha") is not None else ""),
             f"- classes (index = folder name, matched by name): {mapping}; rare class: "
             f"**{run['rare_class']}**",
             f"- prompts ({run['prompt_source']}): " + "; ".join(
                 f"{c['folder']}: " + ", ".join(f'"{p}"' for p in c["eval"])
                 for c in run["prompts"]["classes"]),
             "- operating threshold: " + (f"{threshold:.4f} ({run['operating_threshold_source']})"
                                          if threshold is not None else
                                          f"none ({run['operating_threshold_source']}); argmax only"),
             "- decision rule (the `prediction` column of predictions.csv): " + (
                 f"**threshold**: {run['rare_class']} when its probability is at least the operating "
                 "threshold, else the most probable other class (the metrics tables are of argmax; "
                 "the operating-point section is of this rule)" if run.get("decision_rule") == "threshold"
                 else "**argmax** (the most probable class)"),
             "- temperature: " + (f"{run['temperature']:.4f} (fitted on validation at training; "
                                  "logits / T before the softmax)" if run.get("temperature")
                                  else f"none ({run['temperature_source']})"),
             f"- test cohort: `{run['test_dir']}`" + (f", split {run['split']}" if run.get("split") else "")
             + ("; paths pseudonymised (salted SHA-256)" if run.get("anonymized") else ""),
             f"- statistics: {run['confidence_level']:.0%} CIs; percentile bootstrap of "
             f"{run['bootstrap_unit']}s stratified by class ({run['bootstrap']} resamples, seed "
             f"{run['seed']}) for the "
             "overall metrics, F1, AUROC and AUPRC; Wilson intervals for proportions; log method "
             f"for LR±; ECE over {run['ece_bins']} equal-width bins of the max probability",
             f"- software: {versions}; device {run['device']}, precision {run['precision']}"]
    return lines


def itd_markdown(itd, rare_class, what="unreadable images", decision="argmax"):
    """The intention-to-diagnose line(s): `decision` (argmax, or the given answers), and the
    operating rule when there is one."""
    rules = [(decision, "itd")] + ([("the operating rule", "itd_rule")]
                                   if "itd_rule_accuracy" in itd else [])
    return [f"Intention-to-diagnose ({what} counted as errors, n = {itd['itd_n']}; "
            "Wilson intervals, images): " + "; ".join(
                f"{label}: accuracy {format_value(itd[p + '_accuracy'], itd[p + '_accuracy_ci'])}, "
                f"{rare_class} sensitivity "
                f"{format_value(itd[p + '_rare_sensitivity'], itd[p + '_rare_sensitivity_ci'])}"
                for label, p in rules) + "."]


def answers_header(run):
    """What was scored when the predictions come from a file (inference.py --predictions)."""
    mapping = ", ".join(f"{i} = {folder}" for i, folder in enumerate(run["class_folders"]))
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    return [f"- answers: `{run['predictions_file']}` (step `{run['step']}`); SHA-256 "
            f"`{run['predictions_sha256']}`; no model was run here",
            f"- classes (index = folder name, {run['class_order']}): {mapping}",
            "- answers to classes: " + (f"label map `{run['label_map']}` (case- and "
                                        "whitespace-insensitive; an answer it does not map is a "
                                        "failed row, never guessed)" if run.get("label_map")
                                        else "answers must be class folder names"),
            "- probabilities: " + ("given (`prob_<class>` columns): AUROC, AUPRC and calibration "
                                   "scored" if run["probabilities"] else
                                   "none: AUROC, AUPRC and calibration are not defined (n/a)"),
            f"- test cohort: `{run['test_dir']}`" + (f", split {run['split']}" if run.get("split") else "")
            + ("; paths pseudonymised (salted SHA-256)" if run.get("anonymized") else ""),
            f"- statistics: {run['confidence_level']:.0%} CIs; percentile bootstrap of "
            f"{run['bootstrap_unit']}s ({run['bootstrap']} resamples, seed {run['seed']}) for the "
            "overall metrics and F1; Wilson intervals for proportions; log method for LR±",
            f"- software: {versions}"]


FIGURES = (("confusion_matrix.png", "Confusion matrices (counts and row-normalised)"),
           ("roc_curves.png", "ROC curves per class"), ("pr_curves.png", "Precision-recall curves per class"),
           ("calibration.png", "Reliability diagram"), ("prob_histograms.png", "Predicted probabilities by class"))


def independence_warning(run):
    """The report's first lines when the test cohort overlaps the checkpoint's training or
    validation images (evaluation.training_overlap), else none."""
    overlap = run.get("test_overlap") or {}
    if run.get("independent_test_set") is not False:
        return []
    return [f"> **Warning: not an independent test set.** {overlap['train']} test image(s) are "
            f"training images and {overlap['val']} are validation images of this checkpoint "
            "(the same file or the same bytes); the numbers below overstate how it does on new "
            "patients.", ""]


def render_report(run, flow, metrics, folders, operating=None, itd=None, comparison=None,
                  subgroups=None, failures=None, sequential=None):
    """report.md: one page mapping every output to the reporting checklist item it serves."""
    answers = run.get("source") == "answer file"
    header = answers_header(run) if answers else report_header(run)
    lines = ["# Orbital-CLIP evaluation", ""] + independence_warning(run) + header + [""]
    if metrics is None:
        lines += ["No class folders in the test folder: the images were **predicted, not scored**.", ""]
        lines += flow_markdown(flow)
        return "\n".join(lines) + "\n"
    patients = "patients_received" in flow["rows"]["total"]
    lines += [f"## Flow of images{' and patients' if patients else ''} (STARD 19)", ""]
    lines += flow_markdown(flow) + [""]
    if itd is not None:
        what = "failed and unmapped answers" if answers else "unreadable images"
        lines += itd_markdown(itd, run["rare_class"], what, "the answers" if answers else "argmax") + [""]
    if not metrics["n"]:
        return "\n".join(lines + ["No answer could be scored: there is nothing to score." if answers
                                  else "No image could be read: there is nothing to score."]) + "\n"
    lines += [f"## Metrics on the {metrics['n']} scored images", ""]
    if metrics["bootstrap_unit"] == "group":
        lines += [f"Bootstrap resamples {metrics['n_groups']} patient groups (cluster bootstrap, "
                  "stratified by class); Wilson intervals treat images as independent.", ""]
    if metrics.get("interval_levels"):
        lines += levels_markdown(metrics["interval_levels"]) + [""]
    lines += metrics_markdown(metrics, folders) + ["", "## Operating point", ""]
    lines += operating_markdown(operating) if operating else [
        "The answers are labels: results are for the given labels only (no threshold)." if answers
        else "The checkpoint stores no validation operating threshold (and none was given with "
        "--threshold): results are for argmax only."]
    if sequential is not None:
        lines += ["", "## Sequential readings: what each added piece of information changes", ""]
        lines += sequential_markdown(sequential)
        if run.get("figures", True):
            lines += ["", "![sensitivity and specificity by step](sequential.png)"]
    if comparison is not None:
        lines += ["", "## Comparison with other models", ""]
        lines += comparison_markdown(comparison, run.get("compared_models", {}), folders)
    if subgroups:
        lines += ["", "## Subgroups", ""]
        lines += subgroups_markdown(subgroups, run["rare_class"], metrics["bootstrap_unit"] == "group")
    if failures is not None:
        lines += ["", "## Failure analysis", ""] + failure_markdown(failures, folders)
    if run.get("figures", True) and not answers:  # an answer file draws only its confusion matrix
        lines += ["", "## Figures", ""] + [f"![{title}]({name})" for name, title in FIGURES]
    lines += ["", "## Outputs and the checklist items they serve", "",
              "| output | content | STARD 2015 | TRIPOD+AI 2024 | CLAIM 2024 |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in CHECKLIST_ROWS
              if failures is not None or not row[0].startswith("Failure analysis")]
    lines += ["", CHECKLIST_NOTE]
    if not run.get("figures", True):
        lines += ["", "Figures were not drawn (--no-figures)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures: one 3.5-inch panel per class (a journal column), 8-pt type, PNG and vector PDF


@contextlib.contextmanager
def figure_style():
    """matplotlib (Agg) with 8-pt type throughout and editable text in the PDF."""
    matplotlib.use("Agg")  # files only: no display, the same output on a headless server
    with plt.rc_context({"font.size": FONT_PT, "axes.titlesize": FONT_PT, "axes.labelsize": FONT_PT,
                         "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT,
                         "legend.fontsize": FONT_PT, "figure.titlesize": FONT_PT,
                         "pdf.fonttype": 42, "ps.fonttype": 42, "axes.linewidth": 0.8,
                         "lines.linewidth": 1.4}):
        yield plt


def panel_grid(plt, n_panels, ncols=2, height_in=PANEL_HEIGHT_IN):
    """A figure of n panels, `ncols` per row, each one column wide; unused cells hidden."""
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_WIDTH_IN * ncols, height_in * nrows),
                             squeeze=False)
    axes = axes.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def save_figure(plt, fig, save, stem):
    """stem.png (300 dpi) and stem.pdf (vector) through `save(fig, file_name, **savefig_kwargs)`,
    called inside `figure_style` because the PDF font type is read when the file is written."""
    fig.tight_layout()
    for ext, kwargs in (("png", {"dpi": FIGURE_DPI}), ("pdf", {})):
        save(fig, f"{stem}.{ext}", **kwargs)
    plt.close(fig)


def wrap(name, width=16):
    """A class name broken over lines between words (never abbreviated)."""
    return textwrap.fill(name, width, break_long_words=False, break_on_hyphens=False)


def plot_confusion_matrices(matrices, folders, save):
    """One heatmap per (title, matrix): colour by row %, each cell its count and row %."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(matrices), height_in=PANEL_WIDTH_IN)
        for ax, (title, cm) in zip(axes, matrices):
            cm = np.asarray(cm, dtype=np.int64)
            support = cm.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                row_pct = np.where(support > 0, 100.0 * cm / support, np.nan)
            annot = np.array([[f"{cm[i, j]}\n{row_pct[i, j]:.1f}%" if support[i, 0] else f"{cm[i, j]}\n–"
                               for j in range(len(folders))] for i in range(len(folders))])
            labels = [wrap(f, 9) for f in folders]
            sns.heatmap(np.nan_to_num(row_pct), annot=annot, fmt="", cmap="Blues", vmin=0, vmax=100,
                        xticklabels=labels, yticklabels=labels, linewidths=0.5, square=True,
                        cbar_kws={"label": "% of the true class", "shrink": 0.7},
                        annot_kws={"fontsize": FONT_PT}, ax=ax)
            ax.set(xlabel="predicted class", ylabel="true class", title=title)
            plt.setp(ax.get_xticklabels(), rotation=0)
            plt.setp(ax.get_yticklabels(), rotation=0, va="center")
        save_figure(plt, fig, save, "confusion_matrix")


def mark_operating_points(ax, points, kind):
    """Argmax and threshold-rule points of the rare class on its ROC (kind 'roc') or PR panel."""
    for label, stats, marker in points:
        if stats["sensitivity"] is None:
            continue
        if kind == "roc" and stats["specificity"] is not None:
            ax.plot(1 - stats["specificity"], stats["sensitivity"], marker, ms=6, mec="black", label=label)
        elif kind == "pr" and stats["ppv"] is not None:
            ax.plot(stats["sensitivity"], stats["ppv"], marker, ms=6, mec="black", label=label)


def operating_markers(operating):
    if not operating:
        return []
    return [("argmax", operating["argmax"], "o"),
            (f"p ≥ {operating['threshold']:.3f} ({operating['source']})", operating["rule"], "D")]


def plot_roc_curves(y_true, probs, folders, metrics, operating, rare_index, save):
    """One-vs-rest ROC panel per class (AUROC with CI; the operating point on the rare class)."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auroc"] is not None:
                fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
                ax.plot(fpr, tpr, color=f"C{k}",
                        label=f"AUROC {format_value(stats['auroc'], stats['auroc_ci'])}")
                overlay.plot(fpr, tpr, color=f"C{k}", label=wrap(folder, 30))
            else:
                ax.text(0.5, 0.5, "AUROC n/a\n(class absent or alone)", ha="center", va="center")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="chance")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "roc")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                   ylabel="sensitivity", title=f"{folder} vs rest (n = {stats['support']})")
            ax.set_aspect("equal")
            ax.legend(loc="lower right", frameon=False)
        overlay.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":")
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                    ylabel="sensitivity", title="All classes, macro AUROC "
                    + format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]))
        overlay.set_aspect("equal")
        overlay.legend(loc="lower right", frameon=False)
        save_figure(plt, fig, save, "roc_curves")


def plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, save):
    """One-vs-rest precision-recall panel per class, with the prevalence (chance) line."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auprc"] is not None:
                precision, recall, _ = precision_recall_curve(y_true == k, probs[:, k])
                ax.step(recall, precision, where="post", color=f"C{k}",
                        label=f"AUPRC {format_value(stats['auprc'], stats['auprc_ci'])}")
                overlay.step(recall, precision, where="post", color=f"C{k}", label=wrap(folder, 30))
                ax.axhline(stats["prevalence"], color="grey", lw=0.8, linestyle=":",
                           label=f"prevalence {stats['prevalence']:.3f} (random-ranking AUPRC "
                                 f"{format_value(stats['auprc_baseline'])})")
            else:
                ax.text(0.5, 0.5, "AUPRC n/a\n(class absent or alone)", ha="center", va="center")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "pr")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                   ylabel="precision (PPV)", title=f"{folder} vs rest (n = {stats['support']})")
            ax.legend(loc="best", frameon=False)
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                    ylabel="precision (PPV)", title="All classes, macro AUPRC "
                    + format_value(metrics["macro_auprc"], metrics["macro_auprc_ci"]))
        overlay.legend(loc="lower left", frameon=False)
        save_figure(plt, fig, save, "pr_curves")


def plot_calibration(y_true, probs, probs_cal, folders, n_bins, save):
    """Reliability diagram per class (observed frequency against mean predicted probability in
    equal-width bins) over a bar chart of the images per bin, uncalibrated and, when a validation
    temperature exists, temperature-scaled; a last panel for the max probability (the ECE)."""
    panels = [(f"p({folder})", k) for k, folder in enumerate(folders)] + [("max probability", None)]
    sets = [("uncalibrated", probs, "C0")] + ([("temperature-scaled", probs_cal, "C3")]
                                               if probs_cal is not None else [])
    edges = np.linspace(0, 1, n_bins + 1)
    with figure_style() as plt:
        fig, cells = panel_grid(plt, len(panels), height_in=PANEL_HEIGHT_IN + 0.6)
        for cell, (title, k) in zip(cells, panels):
            spec = cell.get_subplotspec()
            cell.remove()
            inner = GridSpecFromSubplotSpec(2, 1, subplot_spec=spec, height_ratios=(3, 1), hspace=0.08)
            ax, ax_count = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="perfect")
            for offset, (label, p, colour) in enumerate(sets):
                scores = p.max(axis=1) if k is None else p[:, k]
                hits = p.argmax(axis=1) == y_true if k is None else y_true == k
                count, mean_score, observed = reliability_table(scores, hits, n_bins)
                ax.plot(mean_score, observed, "o-", color=colour, ms=3, label=label)
                width = 0.9 / n_bins / len(sets)
                bars = ax_count.bar(edges[:-1] + (offset + 0.5) * width + 0.05 / n_bins, count,
                                    width=width, color=colour, alpha=0.6)
                if offset == 0:
                    ax_count.bar_label(bars, labels=[str(c) if c else "" for c in count],
                                       fontsize=FONT_PT - 1 if n_bins > 10 else FONT_PT, padding=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency",
                   title=title if k is not None else "max probability vs accuracy (ECE)")
            ax.tick_params(labelbottom=False)
            ax.legend(loc="upper left", frameon=False)
            ax_count.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images")
            ax_count.set_ylim(0, max(1, ax_count.get_ylim()[1]) * 1.45)  # room for the labels
        save_figure(plt, fig, save, "calibration")


def plot_prob_histograms(y_true, probs, folders, operating, rare_index, save):
    """Per class, the distribution of its probability in each true class (share of that true
    class, so the rare class stays visible); the operating threshold on the rare class."""
    bins = np.linspace(0, 1, 21)
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            for j, true_folder in enumerate(folders):
                mine = y_true == j
                if mine.any():
                    ax.hist(probs[mine, k], bins=bins, weights=np.full(mine.sum(), 1.0 / mine.sum()),
                            histtype="step", lw=1.4, color=f"C{j}",
                            label=f"{wrap(true_folder, 30)} (n = {int(mine.sum())})")
            if k == rare_index and operating:
                ax.axvline(operating["threshold"], color="black", lw=1, linestyle="--",
                           label=f"threshold {operating['threshold']:.3f}")
            ax.set(xlim=(0, 1), xlabel=f"p({folder})", ylabel="share of the true class",
                   title=f"Probability of {folder}")
        handles, labels = [], []
        for ax in axes[:-1]:  # one legend for all panels, in the last cell
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle), labels.append(label)
        axes[-1].axis("off")
        axes[-1].legend(handles, labels, loc="center", frameon=False, title="true class")
        save_figure(plt, fig, save, "prob_histograms")


def write_figures(save, y_true, probs, probs_cal, folders, metrics, operating, rare_index):
    """Every figure, PNG and PDF."""
    matrices = [("argmax", metrics["confusion_matrix"])]
    if operating:
        matrices.append((f"{folders[rare_index]} if p ≥ {operating['threshold']:.3f}",
                         operating["confusion_matrix"]))
    plot_confusion_matrices(matrices, folders, save)
    plot_roc_curves(y_true, probs, folders, metrics, operating, rare_index, save)
    plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, save)
    plot_calibration(y_true, probs, probs_cal, folders, metrics["ece_bins"], save)
    plot_prob_histograms(y_true, probs, folders, operating, rare_index, save)


# ----------------------------------------------------------------------------------------------
# Sequential readings (inference.py --predictions with --compare): tables, report section, figure


def sequential_frame(sequential):
    """sequential.csv: one row per class, measure and step (value, Wilson CI, hits / n)."""
    return pd.DataFrame([{"class": r["class"], "measure": r["measure"], "step": r["step"],
                          "n": r["n"], "hits": r["hits"], "value": r["value"],
                          "ci_low": r["ci"][0] if r["ci"] else None,
                          "ci_high": r["ci"][1] if r["ci"] else None}
                         for r in sequential["per_step"]])


def sequential_changes_frame(sequential):
    """sequential_changes.csv: the paired change between consecutive steps (McNemar rows), then
    per class and measure the omnibus test across all steps (Cochran's Q rows)."""
    rows = []
    for r in sequential["changes"]:
        ci = r["difference_ci"]
        rows.append({"class": r["class"], "measure": r["measure"], "from_step": r["from_step"],
                     "to_step": r["to_step"], "n": r["n"], "from_value": r["from_value"],
                     "to_value": r["to_value"], "difference": r["difference"],
                     "difference_ci_low": ci[0] if ci else None,
                     "difference_ci_high": ci[1] if ci else None, "gained": r["gained"],
                     "lost": r["lost"], "statistic": None, "df": None, "p_value": r["p_mid"],
                     "p_exact": r["p_exact"], "p_clustered": r.get("p_clustered"),
                     "test": "McNemar mid-p (paired images)"})
    steps = sequential["steps"]
    for r in sequential["omnibus"]:
        rows.append({"class": r["class"], "measure": r["measure"], "from_step": steps[0],
                     "to_step": steps[-1], "n": r.get("n"), "statistic": r.get("q"),
                     "df": r.get("df"), "p_value": r.get("p_value"),
                     "test": f"Cochran's Q across {len(steps)} steps (complete cases)"})
    return pd.DataFrame(rows)


def sequential_markdown(sequential):
    """The sequential section of report.md: per class sensitivity and specificity at each step,
    Cochran's Q across the steps, and the change between consecutive steps."""
    steps = sequential["steps"]
    clustered = sequential["bootstrap_unit"] == "group"
    lines = [f"Steps, in order: {' → '.join(f'`{s}`' for s in steps)}. Each step is scored on the "
             "images it read (failed readings and unmapped answers excluded, counted in its flow "
             f"table); a change compares the images both steps read; Cochran's Q uses the "
             f"{sequential['n_complete']} of {sequential['n_received']} images read at every step. "
             f"Bootstrap unit: {sequential['bootstrap_unit']}"
             + ("; the clustered p of a change is Obuchowski's test on patients (asymptotic: with "
                "few discordant patients it runs small); McNemar and "
                "Cochran's Q treat images as independent (two eyes of a patient are not: read their "
                "p-values as approximate)." if clustered else "."), "",
             "| class | measure | " + " | ".join(steps) + " | Cochran's Q (p) |",
             "| --- | --- |" + " --- |" * (len(steps) + 1)]
    omnibus = {(r["class"], r["measure"]): r for r in sequential["omnibus"]}
    cells = {}
    for r in sequential["per_step"]:
        text = f"{format_value(r['value'], r['ci'])} [{r['hits']}/{r['n']}]"
        cells.setdefault((r["class"], r["measure"]), []).append(text)
    for (name, measure), values in cells.items():
        q = omnibus[(name, measure)]
        test = "n/a" if q.get("q") is None else f"{q['q']:.2f}, df {q['df']} ({format_p(q['p_value'])})"
        lines.append(f"| {name} | {measure} | " + " | ".join(values) + f" | {test} |")
    lines += ["", "| class | measure | change | n | difference (95% CI) | gained / lost | "
              "McNemar mid-p (exact) |" + (" clustered p (Obuchowski) |" if clustered else ""),
              "| --- | --- | --- | ---: | --- | --- | --- |" + (" --- |" if clustered else "")]
    for r in sequential["changes"]:
        lines.append(f"| {r['class']} | {r['measure']} | {r['from_step']} → {r['to_step']} | "
                     f"{r['n']} | {format_value(r['difference'], r['difference_ci'])} | "
                     f"{r['gained']} / {r['lost']} | {format_p(r['p_mid'])} "
                     f"({format_p(r['p_exact'])}) |"
                     + (f" {format_p(r.get('p_clustered'))} |" if clustered else ""))
    return lines


def plot_sequential(sequential, folders, save):
    """Per class sensitivity (left) and specificity (right) against step, Wilson 95% CIs."""
    steps = sequential["steps"]
    x = np.arange(len(steps))
    with figure_style() as plt:
        fig, axes = panel_grid(plt, 2)
        for ax, measure in zip(axes, ("sensitivity", "specificity")):
            for k, folder in enumerate(folders):
                rows = [r for r in sequential["per_step"]
                        if r["class"] == folder and r["measure"] == measure]
                value = np.array([np.nan if r["value"] is None else r["value"] for r in rows])
                low = np.array([np.nan if r["ci"] is None else r["ci"][0] for r in rows])
                high = np.array([np.nan if r["ci"] is None else r["ci"][1] for r in rows])
                shift = (k - (len(folders) - 1) / 2) * 0.06  # side by side, CIs do not overlap
                ax.errorbar(x + shift, value, yerr=[value - low, high - value], marker="o", ms=4,
                            capsize=3, color=f"C{k}", label=wrap(folder, 30))
            ax.set(ylim=(-0.02, 1.02), xlim=(-0.4, len(steps) - 0.6), ylabel=measure,
                   title=f"{measure.capitalize()} by step (95% Wilson CI)")
            # '+' joins what each step adds (image+demographics): one line per part, no overlap
            ax.set_xticks(x, ["\n+".join(wrap(part, 14) for part in s.split("+")) for s in steps])
            ax.legend(loc="best", frameon=False)
        save_figure(plt, fig, save, "sequential")


def forest_rows(rows, label_of, value_key, ci_key):
    """(labels, values, lows, highs) of the rows with a finite value, for a forest plot."""
    kept = [r for r in rows if r[value_key] is not None]
    lows = [r[ci_key][0] if r[ci_key] else r[value_key] for r in kept]
    highs = [r[ci_key][1] if r[ci_key] else r[value_key] for r in kept]
    return [label_of(r) for r in kept], [r[value_key] for r in kept], lows, highs


def plot_forest(panels, save, stem, xlabel, reference_line=None):
    """One forest panel per (title, labels, values, lows, highs): a point and its 95% CI per
    row, a dotted vertical line at `reference_line` (0 for differences)."""
    with figure_style() as plt:
        heights = [max(1.2, 0.28 * len(p[1]) + 0.8) for p in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(PANEL_WIDTH_IN * 2, sum(heights)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (title, labels, values, lows, highs) in zip(axes[:, 0], panels):
            y = np.arange(len(labels))[::-1]
            ax.errorbar(values, y, xerr=[np.subtract(values, lows), np.subtract(highs, values)],
                        fmt="o", color="C0", ms=4, capsize=2, lw=1)
            if reference_line is not None:
                ax.axvline(reference_line, color="grey", lw=0.8, linestyle=":")
            ax.set_yticks(y, [wrap(label, 40) for label in labels])
            ax.set(title=title, xlabel=xlabel)
        save_figure(plt, fig, save, stem)


def plot_comparison(comparison, save):
    """comparison.png: per metric, ours − each model with its paired-bootstrap 95% CI."""
    panels = []
    for metric, label in COMPARISON_LABELS.items():
        rows = [r for r in comparison["rows"] if r["metric"] == metric]
        labels, values, lows, highs = forest_rows(rows, lambda r: r["model"], "difference", "difference_ci")
        if labels:
            panels.append((label, labels, values, lows, highs))
    if panels:
        plot_forest(panels, save, "comparison", "ours − model (95% CI)", reference_line=0.0)


SUBGROUP_COLUMNS = ("accuracy", "balanced_accuracy", "rare_sensitivity", "rare_specificity",
                    "rare_auroc", "macro_auroc")


def subgroups_frame(analysis):
    """subgroups.csv: one row per attribute level, each interval as <name>_ci_low/_ci_high, and
    the attribute's heterogeneity p-values repeated on its rows."""
    rows = []
    for block in analysis:
        for row in block["rows"]:
            flat = {"attribute": block["attribute"], "level": row["level"], "n": row["n"],
                    "n_patients": row["n_patients"], "n_rare": row["n_rare"],
                    "prevalence": row["prevalence"]}
            for name in SUBGROUP_COLUMNS:
                ci = row[f"{name}_ci"]
                flat.update({name: row[name], f"{name}_ci_low": ci[0] if ci else None,
                             f"{name}_ci_high": ci[1] if ci else None})
            flat.update(small_n=row["small_n"],
                        p_heterogeneity_accuracy=block["accuracy_test"]["p"],
                        p_heterogeneity_rare_sensitivity=block["rare_sensitivity_test"]["p"])
            rows.append(flat)
    return pd.DataFrame(rows)


def heterogeneity_text(test):
    """'chi-square 3.21, df 1, p 0.073' (with a note when an expected count is under 5)."""
    if test["p"] is None:
        return "not testable (one level, or no variation)"
    text = f"χ² {test['chi2']:.2f}, df {test['df']}, p {format_p(test['p'])}"
    return text + (" (an expected count < 5: approximate)" if test["min_expected"] < 5 else "")


def subgroups_markdown(analysis, rare_class, grouped):
    """The subgroup section of report.md: one table per attribute, tests and small-n warnings."""
    ci_note = ("bootstrap of patients within each level" if grouped else "bootstrap of images")
    lines = [f"Accuracy, balanced accuracy and AUROC with 95% CIs by {ci_note}; {rare_class} "
             "sensitivity and specificity with Wilson intervals (images independent). "
             "Heterogeneity: chi-square test of equal rates across levels (images independent).", ""]
    for block in analysis:
        lines += [f"### {block['attribute']}", "",
                  f"| level | n (patients) | {rare_class} n | accuracy | balanced accuracy | "
                  "sensitivity | specificity | AUROC (rare) |", "| --- " * 8 + "|"]
        for row in block["rows"]:
            warn = " ⚠" if row["small_n"] else ""
            lines.append(f"| {row['level']}{warn} | {row['n']} ({row['n_patients']}) | {row['n_rare']} | "
                         + " | ".join(format_value(row[name], row[f"{name}_ci"])
                                      for name in SUBGROUP_COLUMNS[:5]) + " |")
        lines += ["", f"Heterogeneity of accuracy: {heterogeneity_text(block['accuracy_test'])}; "
                  f"of {rare_class} sensitivity: {heterogeneity_text(block['rare_sensitivity_test'])}.", ""]
        small = [row["level"] for row in block["rows"] if row["small_n"]]
        if small:
            lines += [f"⚠ Small subgroups ({', '.join(small)}): fewer than 30 images or fewer than 10 "
                      f"{rare_class} images; their intervals are wide and a difference between "
                      "levels is not evidence of a difference in performance.", ""]
    return lines


def plot_subgroups(analysis, save):
    """subgroups.png: per metric, each attribute level's value and 95% CI (small levels marked)."""
    panels = []
    for name, title in (("accuracy", "accuracy"), ("rare_sensitivity", "rare-class sensitivity (Wilson)"),
                        ("rare_auroc", "rare-class AUROC")):
        rows = [dict(row, attribute=block["attribute"]) for block in analysis for row in block["rows"]]
        labels, values, lows, highs = forest_rows(
            rows, lambda r: f"{r['attribute']} = {r['level']} (n {r['n']}){' *' if r['small_n'] else ''}",
            name, f"{name}_ci")
        if labels:
            panels.append((title, labels, values, lows, highs))
    if panels:
        plot_forest(panels, save, "subgroups", "value (95% CI); * small subgroup")
