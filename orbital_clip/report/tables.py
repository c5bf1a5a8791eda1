"""The tables of an evaluation as DataFrames (pure: values in, frames out): predictions.csv,
per_class_metrics.csv, confusion_matrix.csv, comparison.csv, the sequential and subgroup tables,
and the STARD flow counts and failure listing they rest on.
"""

from pathlib import Path

import numpy as np
import pandas as pd

METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
    "weighted_f1": "weighted F1", "mcc": "Matthews correlation (multi-class)",
    "macro_auroc": "macro AUROC (one-vs-rest)", "macro_auprc": "macro AUPRC (one-vs-rest)",
    "brier": "Brier score (multi-class, 0-2)", "log_loss": "log-loss",
    "ece": "expected calibration error"}


# ----------------------------------------------------------------------------------------------
# Tables (pure: values in, frames out)


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


def confusion_frame(cm, folders, columns=None):
    """The confusion matrix as a DataFrame: rows true, columns predicted, folder names as headers
    (`columns`: the classes then an answer file's outcomes outside them)."""
    frame = pd.DataFrame(np.asarray(cm, dtype=np.int64), columns=list(columns or folders))
    frame.insert(0, "true_label", list(folders))
    return frame


def per_class_frame(metrics, folders):
    """per_class_metrics.csv: one row per class, each interval as <name>_ci_low/_ci_high."""
    rows = []
    for folder in folders:
        row = {"class": folder}
        for key, value in metrics["per_class"][folder].items():
            if key.endswith(("_ci", "_ci_patient")):  # sensitivity_ci_patient: with patients
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


def short_model_name(name, max_chars=56):
    """A model's name for a figure or table row: a checkpoint path keeps its last folder and file
    ('baseline runs/zs/clip_model_epoch_best.pt' -> 'baseline zs/clip_model_epoch_best.pt'), as
    every run's best checkpoint has the same file name; longer names are cut in the middle."""
    prefix, _, rest = name.rpartition(" ") if "/" in name or "\\" in name else ("", "", name)
    parts = rest.replace("\\", "/").rstrip("/").split("/")
    short = (prefix + " " if prefix else "") + "/".join(parts[-2:])
    if len(short) > max_chars:
        keep = (max_chars - 1) // 2
        short = short[:keep] + "…" + short[-keep:]
    return short


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


# comparison.csv compares the images both models answered; the declared primary family (issue 28)
# is intention to diagnose, in primary_endpoint.csv, so no comparison.csv row is confirmatory.
COMPARISON_P_STATUS = "exploratory"
COMPARISON_P_NOTE = ("Every p-value in this section is exploratory (answered by both, not adjusted "
                     "for multiplicity; comparison.csv's p_status). The declared primary endpoints, "
                     "Holm-adjusted, are under \"Intention-to-diagnose comparison and primary "
                     "endpoint\" (primary_endpoint.csv).")


def comparison_frame(comparison):
    """comparison.csv: one row per compared model and metric. `model` names the compared model,
    `model_value`/`model_ci_*` are its metric, `ours_value`/`ours_ci_*` ours on the same images,
    `difference` = ours - model (positive: ours better); each p-value column is named for its test
    (empty where the test does not apply); `ci_n_resamples` counts the resamples the CIs rest on;
    `decision_rule` names the rule that decided our model's predictions; `p_status` says every
    p-value here is exploratory (the primary family is intention to diagnose, elsewhere)."""
    rows = []
    for row in comparison["rows"]:
        flat = {"model": row["model"], "metric": row["metric"],
                "decision_rule": comparison.get("decision_rule"), "n": row["n"],
                "n_no_answer": row["n_no_answer"]}
        for key, ci_key, name in (("value", "value_ci", "model_value"),
                                  ("reference_value", "reference_ci", "ours_value"),
                                  ("difference", "difference_ci", "difference")):
            ci, stem = row[ci_key], name.removesuffix("_value")
            flat.update({name: row[key], f"{stem}_ci_low": ci[0] if ci else None,
                         f"{stem}_ci_high": ci[1] if ci else None})
        flat.update({column: row[column] for column in COMPARISON_P_COLUMNS})
        flat["p_status"] = COMPARISON_P_STATUS
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
    if reason.startswith("unsupported format ("):  # images.UNSUPPORTED_FORMAT
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


def format_value(value, ci=None, digits=3):
    """`0.833 (0.552–0.953)`, or `n/a` for an undefined value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else text


# ----------------------------------------------------------------------------------------------
# Sequential readings (answer files with several steps): tables


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
                     "difference_ci_high": ci[1] if ci else None,
                     "difference_ci_n_resamples": r.get("difference_ci_n_resamples"),
                     "gained": r["gained"],
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


SUBGROUP_COLUMNS = ("accuracy", "balanced_accuracy", "rare_sensitivity", "rare_specificity",
                    "rare_auroc", "macro_auroc")


def subgroups_frame(analysis):
    """subgroups.csv: one row per attribute level, each interval as <name>_ci_low/_ci_high, and
    the attribute's heterogeneity p-values repeated on its rows; `decision_rule` names the rule
    that decided the predictions its accuracies and sensitivities count; `no_variation` marks a
    level whose bootstrap could not vary (no interval, left out of the heterogeneity tests);
    `model` the model scored (ours, or each --compare / --baseline model)."""
    rows = []
    for block in analysis:
        for row in block["rows"]:
            flat = {"model": block.get("model", "ours"), "attribute": block["attribute"],
                    "decision_rule": block.get("decision_rule"),
                    "level": row["level"], "n": row["n"],
                    "n_patients": row["n_patients"], "n_rare": row["n_rare"],
                    "n_rare_patients": row.get("n_rare_patients"),
                    "prevalence": row["prevalence"]}
            for name in SUBGROUP_COLUMNS:
                ci = row[f"{name}_ci"]
                flat.update({name: row[name], f"{name}_ci_low": ci[0] if ci else None,
                             f"{name}_ci_high": ci[1] if ci else None})
                if f"{name}_ci_n_resamples" in row:  # bootstrap intervals: the resamples behind
                    flat[f"{name}_ci_n_resamples"] = row[f"{name}_ci_n_resamples"]
            flat.update(small_n=row["small_n"], no_variation=row.get("no_variation"),
                        patients_varying=block.get("patients_varying"),
                        p_heterogeneity_accuracy=block["accuracy_test"]["p"],
                        p_heterogeneity_accuracy_class_adjusted=(
                            block.get("accuracy_test_class_adjusted") or {}).get("p"),
                        p_heterogeneity_rare_sensitivity=block["rare_sensitivity_test"]["p"])
            rows.append(flat)
    return pd.DataFrame(rows)


# Table 2: one row per model, from comparison.csv's own frame, so every cell is one of its numbers
PRIMARY_P_ORDER = ("p_mcnemar_clustered", "p_mcnemar_mid", "p_delong", "p_bootstrap")  # first present


def primary_p(row):
    """(p, test column) of a comparison row: the clustered McNemar with patients, else McNemar's
    mid-p for accuracy, DeLong for the rare-class AUROC, else the paired bootstrap."""
    for column in PRIMARY_P_ORDER:
        value = row.get(column)
        if value is not None and not pd.isna(value):
            return float(value), column
    return None, None


def table2_frame(comparison):
    """table2.csv: one row per model ('ours' first), per metric its value and CI and, for each
    other model, ours − model with its CI and the primary p (`primary_p`). Built from
    `comparison_frame(comparison)`, so every number is a comparison.csv cell; ours is its
    `ours_value` on the most images any comparison used (the same on every row when each model
    answered every image)."""
    frame = comparison_frame(comparison)
    if not len(frame):
        return pd.DataFrame()
    metrics = [m for m in COMPARISON_LABELS if m in set(frame["metric"])]
    widest = frame.loc[frame.groupby("metric")["n"].idxmax()].set_index("metric")
    ours = {"model": "ours", "n": int(widest["n"].max())}
    for m in metrics:
        ours.update({m: widest.loc[m, "ours_value"], f"{m}_ci_low": widest.loc[m, "ours_ci_low"],
                     f"{m}_ci_high": widest.loc[m, "ours_ci_high"]})
    rows = [ours]
    for model, block in frame.groupby("model", sort=False):
        row = {"model": model, "n": int(block["n"].max())}
        for m, r in block.set_index("metric").iterrows():
            p, test = primary_p(r.to_dict())
            row.update({m: r["model_value"], f"{m}_ci_low": r["model_ci_low"],
                        f"{m}_ci_high": r["model_ci_high"], f"{m}_difference": r["difference"],
                        f"{m}_difference_ci_low": r["difference_ci_low"],
                        f"{m}_difference_ci_high": r["difference_ci_high"], f"{m}_p": p,
                        f"{m}_p_test": test})
        rows.append(row)
    columns = ["model", "n"] + [c for m in metrics for c in (
        m, f"{m}_ci_low", f"{m}_ci_high", f"{m}_difference", f"{m}_difference_ci_low",
        f"{m}_difference_ci_high", f"{m}_p", f"{m}_p_test")]
    return pd.DataFrame(rows, columns=columns)
