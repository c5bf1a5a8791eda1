"""report.md (pure: values in, text out): the run header, the metrics, operating-rule, comparison,
sequential and subgroup sections, the STARD flow, and the reporting-checklist map.
"""

import re

from orbital_clip.metrics import (BOOTSTRAP_COLUMNS, CALIBRATION_METRICS, OVERALL_METRICS,
                                  PROPORTIONS, format_p)
from orbital_clip.report.journal import journal_markdown
from orbital_clip.report.tables import COMPARISON_P_NOTE  # issue 28
from orbital_clip.report.tables import (COMPARISON_LABELS, COMPARISON_P_COLUMNS, METRIC_LABELS,
                                        SUBGROUP_COLUMNS, format_value, short_model_name,
                                        table2_frame, PRIMARY_P_ORDER)


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


def flow_markdown(flow, answers=False):
    """The flow table (and the reasons) of report.md; for `answers` (an answer file) a row that
    names no class is an answer outside the options, not an unreadable image."""
    patients = "patients_received" in flow["rows"]["total"]
    lines = [("| class | received | no class answer (outside the options, unmapped or failed) | "
              "answered with a class |" if answers else "| class | received | unreadable (excluded) | scored |")
             + ((" patients received | patients with an answer naming no class | patients "
                 "answered with a class |" if answers else
                 " patients received | patients with an unreadable image | patients scored |")
                if patients else ""),
             "| --- | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if patients else "")]
    for key, row in flow["rows"].items():
        name = f"**{key}**" if key == "total" else key
        lines.append(f"| {name} | {row['received']} | {row['unreadable']} | {row['scored']} |"
                     + (f" {row['patients_received']} | {row['patients_unreadable']} | "
                        f"{row['patients_scored']} |" if patients else ""))
    if flow["reasons"]:
        lines += ["", ("Answers that name no class (misses in the intention-to-diagnose tables, "
                       "left out of the answered-only ones): " if answers else "Reasons for exclusion: ")
                  + "; ".join(
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
    patient = any("sensitivity_ci_patient" in metrics["per_class"][f] for f in folders)
    for folder in folders:
        s = metrics["per_class"][folder]
        # with patients, sensitivity and specificity show their patient-level interval
        cells = [format_value(s[name], s.get(name + "_ci_patient", s[name + "_ci"]),
                              2 if name.startswith("lr") else 3)
                 for name in (*PROPORTIONS, "lr_pos", "lr_neg", "f1", "auroc", "auprc")]
        for index, name, zero, other in ((4, "lr_pos", "fp", "tp"), (5, "lr_neg", "tn", "fn")):
            if s[name] is None and s[zero] == 0 and s[other] > 0:  # infinite: no interval either
                cells[index] = f"∞ ({zero.upper()} = 0)"
        cells[-1] += f" ({format_value(s['auprc_baseline'])})"
        lines.append(f"| {folder} | {s['support']} ({format_value(s['prevalence'])}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "AUPRC (random ranking): the expected AUPRC of a random ranking of this cohort's "
              "counts, the chance level (the prevalence is its large-sample limit)."]
    if patient:
        lines += ["", "Sensitivity and specificity intervals are patient-level (cluster bootstrap of "
                  "patients, stratified by class); their image-level Wilson intervals are in "
                  "per_class_metrics.csv (sensitivity_ci_low/_high)."]
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
    ("comparison.csv, [comparison.png](comparison.png) (with --baseline or --compare)",
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
                                        "whitespace-insensitive; an answer it does not map is "
                                        "an unmapped answer, never guessed; a declared outcome is a "
                                        "reading outside the options, not a failure)" if run.get("label_map")
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
SECTION_FIGURES = {"sequential.png": "sensitivity and specificity by step",  # in their own section
                   "comparison.png": "ours minus each model, 95% CIs",
                   "sequential_answered.png": "answered only: sensitivity and specificity by step",
                   "confusion_matrix_itd.png": "every image: classes and outcomes outside them",
                   "decision_curve.png": "net benefit of the rare-class rule",
                   "subgroups.png": "metrics by subgroup, 95% CIs"}


def embedded(name, written):
    """['', '![title](name)'] when the figure was written, else []: report.md shows no broken image."""
    title = dict(FIGURES).get(name) or SECTION_FIGURES.get(name, name)
    return ["", f"![{title}]({name})"] if name in written else []


def link_written(text, written):
    """A checklist cell with links only to figures that were written: '[x.png](x.png)' of a
    figure not drawn becomes 'x.png (not drawn)'."""
    return re.sub(r"\[([^\]]+\.png)\]\(\1\)",
                  lambda m: m.group(0) if m.group(1) in written else f"{m.group(1)} (not drawn)", text)


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
                  subgroups=None, failures=None, sequential=None, outside=None,
                  sequential_answered=None, figures_written=(), table1=None):
    """report.md: one page mapping every output to the reporting checklist item it serves.
    `outside` (answer files): the outcome columns and unmapped answers (`outside_markdown`);
    `sequential_answered`: the secondary, answered-only sequential table.
    `figures_written`: the PNG file names in the output folder (evaluation.written_figures):
    the report embeds each of them and links no other figure. `table1`: Table 1's Markdown lines
    (evaluation.write_cohort_table1), a section after the flow."""
    written = set(figures_written)
    answers = run.get("source") == "answer file"
    header = answers_header(run) if answers else report_header(run)
    lines = ["# Orbital-CLIP evaluation", ""] + independence_warning(run) + header + [""]
    if metrics is None:
        lines += ["No class folders in the test folder: the images were **predicted, not scored**.", ""]
        lines += flow_markdown(flow)
        return "\n".join(lines) + "\n"
    patients = "patients_received" in flow["rows"]["total"]
    lines += [f"## Flow of images{' and patients' if patients else ''} (STARD 19)", ""]
    lines += flow_markdown(flow, answers) + [""]
    if table1:
        lines += ["## Table 1: characteristics of the cohort (STARD 20)", "", *table1, ""]
    if itd is not None:
        what = ("answers naming no class (an outcome outside the options, unmapped, failed)" if answers
                else "unreadable images")
        lines += itd_markdown(itd, run["rare_class"], what, "the answers" if answers else "argmax") + [""]
    if not metrics["n"]:
        # answers that all name no class are still a reading: show what they named, and the
        # steps (the primary table counts them; the secondary one says it rests on none)
        shown = steps_sections(outside, sequential, sequential_answered, folders, written)
        return "\n".join(lines + ["No answer named a class: there is nothing to score on answered "
                                  "rows." if answers else "No image could be read: there is nothing "
                                  "to score."] + shown) + "\n"
    lines += [f"## Metrics on the {metrics['n']} " + ("images answered with a class (answered only: "
              "secondary to the intention-to-diagnose line)" if answers else "scored images"), ""]
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
    lines += steps_sections(outside, sequential, sequential_answered, folders, written)
    if comparison is not None:
        lines += ["", "## Comparison with other models", ""]
        lines += [COMPARISON_P_NOTE, ""]  # issue 28: the p-values below are exploratory
        lines += ["### Table 2: one row per model", ""]
        lines += table2_markdown(table2_frame(comparison), comparison.get("n_bootstrap")) + [""]
        lines += comparison_markdown(comparison, run.get("compared_models", {}), folders)
        lines += embedded("comparison.png", written)
    lines += journal_markdown(metrics.get("journal"), "decision_curve.png" in written)  # issue 28
    if subgroups:
        lines += ["", "## Subgroups", ""]
        lines += subgroups_markdown(subgroups, run["rare_class"], metrics["bootstrap_unit"] == "group")
        lines += embedded("subgroups.png", written)
    if failures is not None:
        lines += ["", "## Failure analysis", ""] + failure_markdown(failures, folders)
    if written & set(dict(FIGURES)):
        lines += ["", "## Figures"] + [line for name, _title in FIGURES for line in embedded(name, written)]
    lines += ["", "## Outputs and the checklist items they serve", "",
              "| output | content | STARD 2015 | TRIPOD+AI 2024 | CLAIM 2024 |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {link_written(' | '.join(row), written)} |" for row in CHECKLIST_ROWS
              if failures is not None or not row[0].startswith("Failure analysis")]
    lines += ["", CHECKLIST_NOTE]
    if not run.get("figures", True):
        lines += ["", "Figures were not drawn (--no-figures)."]
    return "\n".join(lines) + "\n"


def steps_sections(outside, sequential, sequential_answered, folders, written):
    """The answer-file sections that count every image received, whether or not any answer
    named a class: the answers outside the options and both sequential tables."""
    lines = []
    if outside is not None:
        lines += ["", "## Answers outside the options", ""] + outside_markdown(outside, folders)
        lines += embedded("confusion_matrix_itd.png", written)
    if sequential is not None:
        lines += ["", "## Sequential readings: what each added piece of information changes", ""]
        lines += sequential_markdown(sequential) + embedded("sequential.png", written)
    if sequential_answered is not None:
        lines += ["", "### Secondary: answered only", ""] + sequential_markdown(sequential_answered)
        lines += embedded("sequential_answered.png", written)
    return lines


def sequential_markdown(sequential):
    """The sequential section of report.md: per class sensitivity and specificity at each step,
    Cochran's Q across the steps, and the change between consecutive steps."""
    steps = sequential["steps"]
    clustered = sequential["bootstrap_unit"] == "group"
    population = sequential.get("population") or (
        "Each step is scored on the images it read (failed readings and unmapped answers excluded, "
        "counted in its flow table); a change compares the images both steps read")
    lines = [f"Steps, in order: {' → '.join(f'`{s}`' for s in steps)}. {population}; Cochran's Q uses the "
             f"{sequential['n_complete']} of {sequential['n_received']} images read at every step. "
             f"Bootstrap of each change: {sequential.get('bootstrap_resamples', '')} resamples "
             "stratified by class, [k] the resamples in which it was defined; unit: "
             f"{sequential['bootstrap_unit']}"
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
    lines += ["", "| class | measure | change | n | difference (95% CI) [resamples] | gained / lost | "
              "McNemar mid-p (exact) |" + (" clustered p (Obuchowski) |" if clustered else ""),
              "| --- | --- | --- | ---: | --- | --- | --- |" + (" --- |" if clustered else "")]
    for r in sequential["changes"]:
        used = r.get("difference_ci_n_resamples")
        lines.append(f"| {r['class']} | {r['measure']} | {r['from_step']} → {r['to_step']} | "
                     f"{r['n']} | {format_value(r['difference'], r['difference_ci'])}"
                     f"{'' if used is None else f' [{used}]'} | "
                     f"{r['gained']} / {r['lost']} | {format_p(r['p_mid'])} "
                     f"({format_p(r['p_exact'])}) |"
                     + (f" {format_p(r.get('p_clustered'))} |" if clustered else ""))
    return lines


def outside_markdown(outside, folders):
    """The answers-outside-the-options section: every image's answer by true class (the classes,
    then each outcome), and the distinct unmapped answers with their counts."""
    columns = outside["columns"]
    lines = ["Every image received, by what the answer named: a class, an outcome the label map "
             "declares outside the classes, an answer it does not map, or no answer. Each of the "
             "last counts as a miss of the true class in the intention-to-diagnose line and the "
             "primary sequential table (confusion_matrix_itd.csv).", "",
             "| true class | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    lines += [f"| {folder} | " + " | ".join(str(v) for v in row) + " |"
              for folder, row in zip(folders, outside["confusion_matrix_itd"])]
    unmapped = outside["unmapped_answers"]
    lines += ["", (f"{sum(r['n'] for r in unmapped)} answer(s) the label map does not map, "
                   f"{len(unmapped)} distinct (unmapped_answers.csv; add each to a class or to "
                   "`outcomes` in the label map):" if unmapped else
                   "Every answer was mapped to a class or a declared outcome.")]
    lines += [f"- {r['n']} × {code_span(r['answer']) if r['answer'] else '(empty)'}" for r in unmapped[:20]]
    if len(unmapped) > 20:
        lines.append(f"- … {len(unmapped) - 20} more in unmapped_answers.csv")
    return lines


def code_span(text, limit=120):
    """`text` as one Markdown code span on one line: line breaks and tabs shown as ' ⏎ ' and
    spaces, cut at `limit` characters, fenced by one more backtick than its longest backtick run
    (CommonMark), padded when it starts or ends with one. On one line in a list item, '|' cannot
    start a table (that needs a delimiter row), so it stays as written."""
    flat = " ".join(re.sub(r"\r\n|\r|\n", " ⏎ ", str(text)).split())
    flat = flat if len(flat) <= limit else flat[:limit - 1] + "…"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


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
             "Heterogeneity: chi-square test of equal rates across levels (images independent), "
             "and for accuracy the same question within each true class (a level with more "
             "easy-class images is not thereby better).", ""]
    for block in analysis:
        model = block.get("model", "ours")
        lines += [f"### {block['attribute']}" + ("" if model == "ours" else f" ({model})"), "",
                  f"| level | {'n (patients)' if grouped else 'n (images)'} | {rare_class} n | accuracy | balanced accuracy | "
                  "sensitivity | specificity | AUROC (rare) |", "| --- " * 8 + "|"]
        for row in block["rows"]:
            lines.append(subgroup_line(row))
        adjusted = block.get("accuracy_test_class_adjusted")
        lines += ["", f"Heterogeneity of accuracy: {heterogeneity_text(block['accuracy_test'])}"
                  + ("" if adjusted is None else
                     f"; adjusted for class (Cochran-Mantel-Haenszel within each true class): "
                     f"{heterogeneity_text(dict(adjusted, min_expected=5))}")
                  + f"; of {rare_class} sensitivity: "
                  f"{heterogeneity_text(block['rare_sensitivity_test'])}.", ""]
        if block.get("patients_varying"):
            lines += [f"{block['patients_varying']} patient(s) have different {block['attribute']} "
                      "values on different images (a value missing on some included); each is "
                      "counted once, at their most frequent value ("
                      f"{block['patients_inconsistent']} tied: level 'inconsistent').", ""]
        fixed = block.get("levels_not_tested") or []
        if fixed:
            lines += [f"No variation ({', '.join(fixed)}): one {'patient' if grouped else 'image'} "
                      "per class, so every bootstrap resample is the same; no interval is given "
                      "and these levels are left out of the heterogeneity tests.", ""]
        small = [row["level"] for row in block["rows"] if row["small_n"]]
        if small:
            unit = "patients" if grouped else "images"
            lines += [f"⚠ Small subgroups ({', '.join(small)}): fewer than 30 {unit} or fewer than 10 "
                      f"{rare_class} {unit}; their intervals are wide and a difference between "
                      "levels is not evidence of a difference in performance.", ""]
    return lines


def number(value):
    """None for an empty table2.csv cell (NaN), else the float."""
    return None if value is None or value != value else float(value)


def table2_markdown(table, n_bootstrap=None):
    """Table 2 (`table2_frame`): one row per model, per metric its value (95% CI) and, for each
    other model, ours − model (95% CI) and the primary p with its test."""
    if not len(table):
        return []
    metrics = [m for m in COMPARISON_LABELS if m in table.columns]
    lines = ["| model | n | " + " | ".join(COMPARISON_LABELS[m] for m in metrics) + " |",
             "| --- | ---: |" + " --- |" * len(metrics)]
    tests = set()
    for row in table.to_dict("records"):
        cells = []
        for m in metrics:
            ci = (number(row[f"{m}_ci_low"]), number(row[f"{m}_ci_high"]))
            cell = format_value(number(row[m]), None if ci[0] is None else ci)
            if row["model"] != "ours" and number(row.get(f"{m}_difference")) is not None:
                d_ci = (number(row[f"{m}_difference_ci_low"]), number(row[f"{m}_difference_ci_high"]))
                floor = n_bootstrap if row[f"{m}_p_test"] == "p_bootstrap" else None
                cell += (f"; ours − model {format_value(number(row[f'{m}_difference']), None if d_ci[0] is None else d_ci)}"
                         f", p {format_p(number(row[f'{m}_p']), floor)}")
                tests.add(row[f"{m}_p_test"])
            cells.append(cell)
        lines.append(f"| {short_model_name(row['model'])} | {row['n']} | " + " | ".join(cells) + " |")
    named = [COMPARISON_P_COLUMNS[t] for t in PRIMARY_P_ORDER if t in tests]
    return lines + ["", "p: " + ", ".join(named) + " (the first that applies: the clustered McNemar with "
                    "patients, McNemar's mid-p for accuracy, DeLong for the rare-class AUROC, else the "
                    "paired bootstrap); every number is a cell of comparison.csv."]


def subgroup_line(row):
    """One level's row of the subgroup table; a bootstrap cell of a level that cannot vary says
    'no variation' instead of an interval."""
    warn = " ⚠" if row["small_n"] else ""
    count = row["n"] if row["n_patients"] is None else f"{row['n']} ({row['n_patients']})"
    cells = []
    for name in SUBGROUP_COLUMNS[:5]:
        text = format_value(row[name], row[f"{name}_ci"])
        if row.get("no_variation") and name in BOOTSTRAP_COLUMNS and row[name] is not None:
            text += " (no variation)"
        cells.append(text)
    return f"| {row['level']}{warn} | {count} | {row['n_rare']} | " + " | ".join(cells) + " |"
