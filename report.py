"""The tables, figures and report.md of an evaluation (values in, frames, figures or text out):
predictions.csv, per_class_metrics.csv, confusion_matrix.csv and comparison.csv as DataFrames,
the STARD flow table, the markdown of report.md with its reporting-checklist map, and the journal
figures (one 3.5-inch panel per class, 8-pt type, PNG and vector PDF). Statistics come from
metrics.py; inference.py decides what is written where.
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

from metrics import CALIBRATION_METRICS, OVERALL_METRICS, PROPORTIONS, format_p, reliability_table

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

    `cohort` is inference.py's Cohort: items [(path, class index)], labelled, root (paths are
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


def comparison_frame(comparison):
    """comparison.csv: one row per compared metric (and the McNemar row)."""
    rows = []
    for row in comparison["rows"]:
        flat = {"metric": row["metric"], "n": comparison["n"]}
        for key in ("model", "baseline", "difference"):
            ci = row[f"{key}_ci"]
            flat.update({key: row[key], f"{key}_ci_low": ci[0] if ci else None,
                         f"{key}_ci_high": ci[1] if ci else None})
        flat.update(p_value=row["p_value"], test=row["test"])
        rows.append(flat)
    return pd.DataFrame(rows)


def failure_category(status):
    """'truncated image' from 'failed: truncated image (detail...)'."""
    return status.removeprefix("failed: ").split(" (")[0].strip() or "unreadable"


def flow_counts(labels, statuses, folders, labelled):
    """STARD flow of images: received -> unreadable (by reason) -> scored, per class.

    Returns
    -------
    dict: rows -> {class: {received, unreadable, scored}} ('all images' when unlabelled) and
    'total'; reasons -> {reason: {class: count}}.
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
    return {"rows": rows, "reasons": reasons}


def format_value(value, ci=None, digits=3):
    """`0.833 (0.552–0.953)`, or `n/a` for an undefined value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else text


def flow_markdown(flow):
    """The flow table (and the reasons) of report.md."""
    lines = ["| class | received | unreadable (excluded) | scored |", "| --- | ---: | ---: | ---: |"]
    for key, row in flow["rows"].items():
        name = f"**{key}**" if key == "total" else key
        lines.append(f"| {name} | {row['received']} | {row['unreadable']} | {row['scored']} |")
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
              "| AUROC | AUPRC (chance) |", "| --- " * 11 + "|"]
    for folder in folders:
        s = metrics["per_class"][folder]
        cells = [format_value(s[name], s[name + "_ci"], 2 if name.startswith("lr") else 3)
                 for name in (*PROPORTIONS, "lr_pos", "lr_neg", "f1", "auroc", "auprc")]
        cells[-1] += f" ({format_value(s['auprc_baseline'])})"
        lines.append(f"| {folder} | {s['support']} ({format_value(s['prevalence'])}) | "
                     + " | ".join(cells) + " |")
    return lines


def operating_markdown(op):
    """Argmax and the validation threshold rule side by side for the rare class."""
    origin = [f"source: {op['source']}"]
    if op.get("target_sensitivity") is not None:
        origin.append(f"target sensitivity {op['target_sensitivity']}")
    if op.get("val_sensitivity") is not None:
        origin.append(f"validation sensitivity {format_value(op['val_sensitivity'])}, specificity "
                      f"{format_value(op.get('val_specificity'))}")
    lines = [f"Rare class **{op['class']}**: positive if p ≥ {op['threshold']:.4f} "
             f"({'; '.join(origin)}), applied to the uncalibrated probability, never tuned on "
             "this cohort; otherwise the most probable other class.", "",
             "| rule | TP | FP | FN | TN | sensitivity | specificity | PPV | NPV |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for label, key in (("argmax", "argmax"), (f"p ≥ {op['threshold']:.4f}", "rule")):
        s = op[key]
        lines.append(f"| {label} | {s['tp']} | {s['fp']} | {s['fn']} | {s['tn']} | "
                     + " | ".join(format_value(s[n], s[n + "_ci"]) for n in PROPORTIONS) + " |")
    return lines


def comparison_markdown(comparison, baseline_label):
    lines = [f"Model minus baseline (`{baseline_label}`) on the same {comparison['n']} images:", "",
             "| metric | model | baseline | difference (95% CI) | p | test |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in comparison["rows"]:
        lines.append(f"| {METRIC_LABELS[row['metric']]} | {format_value(row['model'])} | "
                     f"{format_value(row['baseline'])} | "
                     f"{format_value(row['difference'], row['difference_ci'])} | "
                     f"{format_p(row['p_value'])} | {row['test']} |")
    return lines


CHECKLIST_ROWS = (
    ("Flow table (above), `flow` in metrics.json",
     "images received, unreadable with reasons, scored, by class",
     "19 flow diagram; 16 missing/indeterminate index test results",
     "flow of participants; missing data", "flow of participants/cases; data exclusions"),
    ("[confusion_matrix.png](confusion_matrix.png), confusion_matrix.csv, classification_report.txt",
     "predicted by true class (counts, row %)", "23 cross tabulation by the reference standard",
     "model performance (classification)", "estimates of diagnostic accuracy"),
    ("Metric tables (above), metrics.json, per_class_metrics.csv",
     "accuracy, balanced accuracy, F1, MCC; per class sensitivity, specificity, PPV, NPV, LR±, "
     "AUROC, AUPRC with 95% CIs",
     "24 estimates of diagnostic accuracy and their precision",
     "model performance with CIs (discrimination)",
     "metrics of model performance; measures of uncertainty"),
    ("[roc_curves.png](roc_curves.png), [pr_curves.png](pr_curves.png)",
     "one-vs-rest discrimination; operating point marked", "24 estimates of diagnostic accuracy",
     "performance measures and plots (discrimination)", "metrics of model performance"),
    ("[calibration.png](calibration.png), Brier / log-loss / ECE",
     "reliability per class with counts per bin; before and after temperature scaling", "—",
     "calibration; model updating (recalibration)", "metrics of model performance"),
    ("[prob_histograms.png](prob_histograms.png), operating point table",
     "model output by true class; pre-specified threshold from validation",
     "12a/12b positivity cut-offs, pre-specified", "model output and classification thresholds",
     "model output; decision thresholds"),
    ("Intention-to-diagnose line", "unreadable images counted as errors",
     "15/16 handling of indeterminate and missing results", "missing data", "failure handling"),
    ("comparison.csv (when a baseline is given)", "paired differences with CIs, McNemar",
     "—", "comparison of models", "statistical measures of significance; benchmarking"),
    ("predictions.csv", "per-image probabilities and status", "—", "model output",
     "failure analysis of misclassified cases"),
    ("Header of this report, args.json", "checkpoint SHA-256, model, prompts, thresholds, versions",
     "10a index test in sufficient detail", "model specification; software and code availability",
     "model description; software and versions"),
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
             f"{run['bootstrap_unit']}s ({run['bootstrap']} resamples, seed {run['seed']}) for the "
             "overall metrics, F1, AUROC and AUPRC; Wilson intervals for proportions; log method "
             f"for LR±; ECE over {run['ece_bins']} equal-width bins of the max probability",
             f"- software: {versions}; device {run['device']}, precision {run['precision']}"]
    return lines


FIGURES = (("confusion_matrix.png", "Confusion matrices (counts and row-normalised)"),
           ("roc_curves.png", "ROC curves per class"), ("pr_curves.png", "Precision-recall curves per class"),
           ("calibration.png", "Reliability diagram"), ("prob_histograms.png", "Predicted probabilities by class"))


def independence_warning(run):
    """The report's first lines when the test cohort overlaps the checkpoint's training or
    validation images (inference.training_overlap), else none."""
    overlap = run.get("test_overlap") or {}
    if run.get("independent_test_set") is not False:
        return []
    return [f"> **Warning: not an independent test set.** {overlap['train']} test image(s) are "
            f"training images and {overlap['val']} are validation images of this checkpoint "
            "(the same file or the same bytes); the numbers below overstate how it does on new "
            "patients.", ""]


def render_report(run, flow, metrics, folders, operating=None, itd=None, comparison=None):
    """report.md: one page mapping every output to the reporting checklist item it serves."""
    lines = ["# Orbital-CLIP evaluation", ""] + independence_warning(run) + report_header(run) + [""]
    if metrics is None:
        lines += ["No class folders in the test folder: the images were **predicted, not scored**.", ""]
        lines += flow_markdown(flow)
        return "\n".join(lines) + "\n"
    lines += ["## Flow of images (STARD 19)", ""] + flow_markdown(flow) + [""]
    if itd is not None:
        lines += [f"Intention-to-diagnose (unreadable images counted as errors, n = {itd['itd_n']}): "
                  f"accuracy {format_value(itd['itd_accuracy'], itd['itd_accuracy_ci'])}, "
                  f"{run['rare_class']} sensitivity "
                  f"{format_value(itd['itd_rare_sensitivity'], itd['itd_rare_sensitivity_ci'])}.", ""]
    if not metrics["n"]:
        return "\n".join(lines + ["No image could be read: there is nothing to score."]) + "\n"
    lines += [f"## Metrics on the {metrics['n']} scored images", ""]
    if metrics["bootstrap_unit"] == "group":
        lines += [f"Bootstrap resamples {metrics['n_groups']} patient groups (cluster bootstrap); "
                  "Wilson intervals treat images as independent.", ""]
    lines += metrics_markdown(metrics, folders) + ["", "## Operating point", ""]
    lines += operating_markdown(operating) if operating else [
        "The checkpoint stores no validation operating threshold (and none was given with "
        "--threshold): results are for argmax only."]
    if comparison is not None:
        lines += ["", "## Comparison with the baseline", ""]
        lines += comparison_markdown(comparison, run["baseline"]["checkpoint"])
    if run.get("figures", True):
        lines += ["", "## Figures", ""] + [f"![{title}]({name})" for name, title in FIGURES]
    lines += ["", "## Outputs and the checklist items they serve", "",
              "| output | content | STARD 2015 | TRIPOD+AI 2024 | CLAIM 2024 |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in CHECKLIST_ROWS]
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
                           label=f"chance (prevalence {stats['prevalence']:.3f})")
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
