"""Other models' and readers' answers on a cohort, and scoring them without a model.

An answer file is a CSV with `path` (relative to the cohort root, as in predictions.csv) and
`pred_label` or `answer` (free text, mapped to a class folder by --label-map), optional
`prob_<folder>` for every class and `status`. inference.py reads them with --compare (rows of
comparison.csv against the model); score_answers.py scores them with no model at all
(run_answers): the statistics of a checkpoint evaluation, and with --compare files as later
steps of the same reader, the sequential table (the paper's second step):

    $ python score_answers.py --test-dir subtypes --predictions image=step1.csv \\
          --label-map label_map.json --classes "orbital tumour,orbital inflammation,thyroid eye disease"
    $ python score_answers.py --test-dir subtypes --predictions image=step1.csv \\
          --compare image+symptoms=step2.csv --label-map label_map.json --out-dir second_step

`inference.py --predictions ...` still runs the same scoring, with a deprecation warning.
"""

import dataclasses
import logging
import re
import secrets
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from orbital_clip import cli
from orbital_clip import scoring_args
from orbital_clip.answer_args import named_file, parse_compare_specs
from orbital_clip import images
from orbital_clip import outputs
from orbital_clip import prompts as prompt_sets
from orbital_clip.evaluation import (DEFAULT_SPLIT, Cohort, args_record, check_output_dir, clear_previous_outputs,
                        cohort_class_names, cohort_subgroups, collect_cohort, figure_saver,
                        make_anonymizer, package_versions,
                        score_subgroups, write_scored_tables, write_subgroup_outputs,
                        written_figures)
from orbital_clip.journal import journal_statistics, write_journal_outputs  # issue 28
from orbital_clip.metadata import normalise_relpath, read_csv_rows
from orbital_clip.metrics import (CONFIDENCE_LEVEL, compute_metrics, format_p, intention_to_diagnose,
                     interval_levels, label_probs, sequential_analysis, with_class_patient_intervals,
                     without_probability_metrics)
from orbital_clip.metrics.sequential import NO_CLASS_NAMED
from orbital_clip.report import (confusion_frame, flow_counts, format_value, plot_confusion_matrices,
                    plot_sequential,
                    predictions_frame, render_report, sequential_changes_frame,
                    sequential_frame, write_figures)

LOG = logging.getLogger("inference")  # a part of the inference.py command, logged as such
DEPRECATED_ANSWER_MODE = "'inference.py --predictions' is deprecated; use 'python score_answers.py ...'"
# rounding 3 to 6 classes to 3 decimals moves a sum by at most ~0.003; 0.01 allows that and
# refuses scores that are not a distribution (independent sigmoids, a 1.0 beside 0.999s)
PROBABILITY_SUM_TOLERANCE = 0.01
# What a row that names no class counts as, besides the label map's declared outcomes: each is
# an outcome of the reading (a miss of the true class in the intention-to-diagnose tables)
UNMAPPED_OUTCOME = "answer not in the label map"
FAILED_OUTCOME = "no answer (failed)"


# ----------------------------------------------------------------------------------------------
# Reading answer files (--compare NAME=FILE, --predictions [NAME=]FILE, --label-map)


@dataclasses.dataclass
class ExternalPredictions:
    """Another model's (or reader's) answers on the cohort, in the cohort's image order."""
    source: str  # the file read
    paths: list  # cohort paths (relative, forward slashes), the order of `cohort_paths`
    pred_index: np.ndarray  # (N,) int class index in `folders`, -1 for a failed row
    probs: np.ndarray | None  # (N, C) float in `folders` order, NaN rows where failed; None: no prob_ columns
    statuses: list  # 'ok', or 'failed: <reason>' (the file's own, or 'failed: unmapped answer ...')
    answer_column: str  # 'pred_label' or 'answer'
    rows: list  # the file's row of each image (row 1 = the header), for messages
    # per image: None (a class answer), a declared outcome, UNMAPPED_OUTCOME or FAILED_OUTCOME
    outcomes: list = dataclasses.field(default_factory=list)
    raw_answers: list = dataclasses.field(default_factory=list)  # the answer as written ('' if failed)


def normalise_answer(text):
    """An answer or synonym compared case- and whitespace-insensitively ('  Orbital  Disease ');
    prompts.normalise_answer is the one rule (shared with --label-map)."""
    return prompt_sets.normalise_answer(str(text))


def answer_index(answer, lookup, folders):
    """The class index an answer names, or None: prompts.map_answer is the one home of the
    answer-to-folder rule (never the nearest class)."""
    folder = prompt_sets.map_answer(answer, lookup)
    return None if folder is None else folders.index(folder)


def external_prob_columns(header, folders, where):
    """The prob_<folder> columns in `folders` order, or None when the file has none; refused
    when only some classes have one or a prob_ column names another class (prob_cal_* of our own
    predictions.csv are ignored)."""
    named = [c for c in header if c.startswith("prob_") and not c.startswith("prob_cal_")]
    if not named:
        return None
    unknown = [c for c in named if c[len("prob_"):] not in folders]
    if unknown:
        raise ValueError(f"{where}: row 1: column {unknown[0]!r} is not a class of {folders}")
    missing = [f"prob_{f}" for f in folders if f"prob_{f}" not in header]
    if missing:
        raise ValueError(f"{where}: row 1: has prob_ columns but lacks {missing[0]!r} (give one "
                         "per class, or none)")
    return [f"prob_{f}" for f in folders]


def parse_probabilities(cells, where):
    """(C,) floats of one ok row, each finite and in [0, 1], summing to 1 within
    PROBABILITY_SUM_TOLERANCE (refused, not renormalised: a row that gives 1.0 to one class and
    0.999 to the others is not a distribution, and its log-loss and ECE would be meaningless)."""
    try:
        values = np.array([float(cell) for cell in cells], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: probabilities {cells} are not all numbers") from None
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"{where}: probabilities {cells} must be numbers in [0, 1]")
    if abs(values.sum() - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"{where}: probabilities {cells} sum to {values.sum():.4g}, not 1 (within "
                         f"{PROBABILITY_SUM_TOLERANCE}); give each row's class probabilities (a "
                         "softmax), not independent scores")
    return values


def read_external_predictions(path, cohort_paths, folders, flag="--compare", label_map=None,
                              true_labels=None, lookup=None, declared=None):
    """Read another model's or reader's answers and match them to the cohort by path.

    Signature: read_external_predictions(path, cohort_paths, folders, flag="--compare",
    label_map=None, true_labels=None, lookup=None, declared=None) -> ExternalPredictions.

    Parameters
    ----------
    path : str or Path
        A CSV with columns `path` (as in our predictions.csv: relative to the cohort root, forward
        slashes; backslashes and a leading './' are tolerated) and `pred_label` (or `answer`);
        optional `prob_<folder>` for every class (all or none), optional `status` (a row whose
        status starts with 'failed' is a failed row: no prediction, no probabilities), optional
        `true_label` (checked against `true_labels` when both exist). Other columns are ignored.
    cohort_paths : list of str
        The cohort's images in evaluation order, written like predictions.csv's path column.
    folders : list of str
        Class folder names; class index = position.
    flag : str
        Named in every error message ('--compare NAME=', '--baseline', ...).
    label_map : dict folder -> list of str, optional
        Synonyms of each class (case- and whitespace-insensitive; the folder name always counts).
        Without it an answer must be a folder name (case- and whitespace-insensitive) or the file
        is refused; with it an empty, unmapped or refused answer becomes a failed row with status
        "failed: unmapped answer '<answer>'".
    true_labels : list of str, optional
        The cohort's true folder per image, checked against a `true_label` column.
    lookup : dict, optional
        The label map already parsed ({normalised answer: folder}, prompts.load_label_map), in
        place of `label_map`: the scripts parse their --label-map once for every file.
    declared : dict, optional
        With `lookup`: the label map's declared outcomes ({normalised answer: outcome},
        prompts.parse_outcomes), answers outside the classes that are readings, not failures.

    Returns
    -------
    ExternalPredictions (pred_index -1 and NaN probabilities on failed rows).

    Raises
    ------
    ValueError, one line naming `flag`, the file and the first offending row (row 1 = header):
    a malformed or empty file, no path or pred_label/answer column, a duplicate, extra or missing
    image, an unknown label (without `label_map`), a probability that is not a number in [0, 1],
    a true_label that differs from the cohort's.
    """
    where = f"{flag} {path}"
    mapped = lookup is not None or label_map is not None  # unknown answers fail rows, not the file
    if lookup is None:
        lookup = prompt_sets.parse_label_map(label_map or {}, list(folders), where)
    if declared is None:
        declared = prompt_sets.parse_outcomes(label_map or {}, list(folders), where)
    header, rows = read_csv_rows(path, where)
    answer_column = next((c for c in ("pred_label", "answer") if c in header), None)
    if "path" not in header or answer_column is None:
        raise ValueError(f"{where}: row 1: needs a 'path' and a 'pred_label' (or 'answer') column, "
                         f"has {header}")
    prob_columns = external_prob_columns(header, list(folders), where)
    position = {p: i for i, p in enumerate(cohort_paths)}
    n = len(cohort_paths)
    pred_index = np.full(n, -1, dtype=np.int64)
    probs = None if prob_columns is None else np.full((n, len(folders)), np.nan)
    statuses, seen, outcomes, raw = [None] * n, {}, [FAILED_OUTCOME] * n, [""] * n
    for line, row in rows:
        here = f"{where}: row {line}"
        image = normalise_relpath(row["path"])
        if image not in position:
            raise ValueError(f"{here}: image {image!r} is not in the cohort (an extra image, or "
                             "a path not relative to the test folder)")
        if image in seen:
            raise ValueError(f"{here}: image {image!r} already on row {seen[image]}")
        seen[image], i = line, position[image]
        if true_labels is not None and "true_label" in row and row["true_label"].strip() \
                and normalise_answer(row["true_label"]) != normalise_answer(true_labels[i]):
            raise ValueError(f"{here}: true_label {row['true_label']!r} of {image!r} differs from "
                             f"the cohort's {true_labels[i]!r} (predictions of another cohort?)")
        status = row.get("status", "ok").strip() or "ok"
        if status.lower().startswith("failed"):
            statuses[i] = status
            continue
        answer = row[answer_column]
        raw[i] = str(answer or "").strip()
        index = answer_index(answer, lookup, list(folders))
        if index is None and not mapped:
            raise ValueError(f"{here}: {answer_column} {answer!r} is not a class of {list(folders)} "
                             "(pass a label map of synonyms to count it as a failed answer)")
        outcome = declared.get(prompt_sets.normalise_answer(answer)) if index is None else None
        if outcome is not None:  # declared: an answer a reader gives, not a failure to read
            statuses[i], outcomes[i] = f"outside the options: {outcome}", outcome
            continue
        if index is None:
            statuses[i], outcomes[i] = f"failed: unmapped answer {answer.strip()!r}", UNMAPPED_OUTCOME
            continue
        pred_index[i], statuses[i], outcomes[i] = index, "ok", None
        if prob_columns is not None:
            probs[i] = parse_probabilities([row[c].strip() for c in prob_columns], here)
    missing = [p for p in cohort_paths if p not in seen]
    if missing:
        raise ValueError(f"{where}: no row for image {missing[0]!r} ({len(missing)} cohort "
                         "images missing); give one row per image")
    return ExternalPredictions(str(path), list(cohort_paths), pred_index, probs, statuses, answer_column,
                               [seen[p] for p in cohort_paths], outcomes, raw)


def read_label_map(path, folders):
    """The --label-map file parsed once: (lookup, declared outcomes) of prompts.load_label_map
    ({normalised answer: folder}, {normalised answer: outcome}), or None without one."""
    if not path:
        return None
    try:
        return prompt_sets.load_label_map(path, folders, with_outcomes=True)
    except prompt_sets.LabelMapError as err:
        raise ValueError(f"--label-map {err}") from None


def read_compared(args, cohort, folders):
    """{name: ExternalPredictions} of --compare, matched to the cohort (ValueError: exit 2)."""
    specs, _bad, _why = parse_compare_specs(args.compare)
    label_map = read_label_map(args.label_map, folders)
    return {name: read_cohort_answers(path, cohort, folders, f"--compare {name}=", label_map)
            for name, path in specs.items()}


def read_cohort_answers(path, cohort, folders, flag, label_map):
    """read_external_predictions matched to a labelled Cohort (its paths and true labels);
    `label_map`: the parsed --label-map, (lookup, declared outcomes) of read_label_map, or None."""
    lookup, declared = label_map if label_map is not None else (None, None)
    return read_external_predictions(path, cohort.relative_paths(), folders, flag, lookup=lookup,
                                     declared=declared,
                                     true_labels=[folders[label] for _path, label in cohort.items])


# ----------------------------------------------------------------------------------------------
# Answers outside the options: counted as a reader counts them (issue 25 item 11)


def outcome_columns(declared, steps):
    """The outcomes after the classes in a step's full confusion matrix: the label map's declared
    outcomes (always, so every step has the same columns), then UNMAPPED_OUTCOME and
    FAILED_OUTCOME where some step has such a row."""
    found = {outcome for step in steps for outcome in step.answers.outcomes}
    return list(declared) + [o for o in (UNMAPPED_OUTCOME, FAILED_OUTCOME) if o in found]


def outcome_confusion(labels, answers, n_classes, outcomes):
    """(C, C + len(outcomes)) counts of every image received: rows the true class, columns the
    class answered, then each outcome (an answer that names no class is its own column)."""
    cm = np.zeros((n_classes, n_classes + len(outcomes)), dtype=np.int64)
    for label, pred, outcome in zip(labels, answers.pred_index, answers.outcomes):
        cm[label, pred if pred >= 0 else n_classes + outcomes.index(outcome)] += 1
    return cm


def unmapped_answers(answers):
    """[{answer, n}] of the distinct answers the label map does not map (the same answer up to
    case and spaces once, as first written), most frequent first: what the label map may add."""
    counts, shown = {}, {}
    for outcome, text in zip(answers.outcomes, answers.raw_answers):
        if outcome == UNMAPPED_OUTCOME:
            key = normalise_answer(text)
            counts[key] = counts.get(key, 0) + 1
            shown.setdefault(key, text)
    return [{"answer": shown[key], "n": n}
            for key, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def sequential_readings(setup, args):
    """(primary, secondary) sequential tables of the steps. Primary, intention-to-diagnose: every
    image received at every step, an answer that names no class (an outcome outside the
    options, an unmapped answer, no answer) a miss of the true class; secondary: the images
    answered with a class at every step. Each table's per-step rows and paired changes rest on
    the same images, which its `population` names."""
    labels, folders, steps = setup.cohort.labels(), setup.folders, setup.steps
    answered = np.stack([s.answers.pred_index for s in steps])  # (S, N), -1: no class named
    names, n = [s.name for s in steps], len(labels)
    # worst case (intention to diagnose): a miss of the true class and a false call of every
    # other, so a model that refuses more never gains specificity
    missed = np.where(answered >= 0, answered, NO_CLASS_NAMED)
    primary = sequential_analysis(labels, missed, folders, names, setup.cohort.groups,
                                  args.bootstrap, args.seed)
    complete = (answered >= 0).all(axis=0)
    secondary = sequential_analysis(labels, np.where(complete, answered, -1), folders, names,
                                    setup.cohort.groups, args.bootstrap, args.seed)
    primary["population"] = (f"Primary (intention-to-diagnose, worst case): all {n} images "
                             "received, at every step; an answer that names no class (an outcome "
                             "outside the options, an unmapped answer, no answer) is a miss of the "
                             "true class's sensitivity and a false positive against every other "
                             "class's specificity; the per-step rows and the paired changes rest on "
                             "these same images")
    secondary["population"] = (f"Secondary (answered only): the {int(complete.sum())} of {n} "
                               "images answered with a class at every step; the per-step rows and "
                               "the paired changes rest on these same images")
    primary["analysis"], secondary["analysis"] = "intention-to-diagnose", "answered only"
    return primary, secondary


# ----------------------------------------------------------------------------------------------
# Scoring answer files without a model (--predictions, steps with --compare)


@dataclasses.dataclass
class AnswerStep:
    """One answer file, scored as one step."""
    name: str  # the step's name (NAME= of the flag, else the file stem)
    file: str  # the answer file
    flag: str  # the flag that named the file, for messages
    answers: ExternalPredictions
    probs: np.ndarray  # (N, C): the file's probabilities, else one-hot labels; NaN rows where failed
    has_probs: bool
    sha256: str


@dataclasses.dataclass
class AnswerSetup:
    """What `prepare_answers` checks and reads before any output is written."""
    cohort: Cohort
    folders: list
    steps: list  # AnswerStep, in step order (--predictions first, then each --compare)
    anonymize: object  # text -> pseudonym, or None
    argv: list = dataclasses.field(default_factory=list)
    subgroups: dict | None = None  # --subgroups attribute -> level per cohort image
    outcomes: list = dataclasses.field(default_factory=list)  # the label map's, in its order
    script: str = "score_answers.py"  # the entry point that ran (args.json)


def step_probs(answers, n_classes, where):
    """(probs, has_probs): the file's probabilities (each ok row's most probable class must be its
    label, or the metrics would score another answer than the file gives), else one-hot labels."""
    if answers.probs is None:
        return label_probs(answers.pred_index, n_classes), False
    ok = answers.pred_index >= 0
    probs = np.nan_to_num(answers.probs, nan=-1.0)
    top = probs.max(axis=1, keepdims=True)
    # a label tied for the top probability is refused whatever the class order: argmax would
    # accept it under the order that lists it first and refuse it under another
    label_top = probs[np.arange(len(probs)), np.clip(answers.pred_index, 0, None)] == top[:, 0]
    disagree = np.flatnonzero(ok & (~label_top | ((probs == top).sum(axis=1) > 1)))
    if disagree.size:
        first = min(disagree, key=lambda i: answers.rows[i])  # the first in the file
        raise ValueError(f"{where}: row {answers.rows[first]}: image {answers.paths[first]!r}: its "
                         f"{answers.answer_column} is not its most probable class (or is tied with "
                         "another, refused under any class order); give labels that agree with "
                         "the prob_ columns (or drop the prob_ columns)")
    return answers.probs, True


def read_answer_step(name, path, flag, cohort, folders, label_map):
    """One AnswerStep (the file of `flag`), matched to the cohort by path; `label_map` as
    read_cohort_answers takes it."""
    answers = read_cohort_answers(path, cohort, folders, flag, label_map)
    probs, has_probs = step_probs(answers, len(folders), f"{flag} {path}")
    return AnswerStep(name, str(path), flag, answers, probs, has_probs, images.file_sha256(path))


def prepare_answers(args, argv):
    """Cohort, classes, label map and every answer file read and checked (ValueError/OSError)."""
    check_output_dir(args.output_dir, args.overwrite)
    split = (args.split or DEFAULT_SPLIT) if Path(args.test_dir).is_file() else None
    found = cohort_class_names(args.test_dir, split)
    if not found:
        raise ValueError(f"--test-dir {args.test_dir}: no class folders; answers are scored against "
                         "the class folders (or a manifest's labels) of the cohort")
    folders = prompt_sets.order_classes(found, args.classes.split(",") if args.classes else None)
    label_map = read_label_map(args.label_map, folders)
    cohort = collect_cohort(args, folders)
    compared, _bad, _why = parse_compare_specs(args.compare)
    specs = [(*named_file(args.predictions), "--predictions")] + [
        (name, path, f"--compare {name}=") for name, path in (compared or {}).items()]
    steps = [read_answer_step(name, path, flag, cohort, folders, label_map)
             for name, path, flag in specs]
    salt = args.anonymize_salt if args.anonymize_salt is not None else secrets.token_hex(16)
    declared = label_map[1] if label_map is not None else {}
    return AnswerSetup(cohort, folders, steps, make_anonymizer(salt) if args.anonymize_paths else None,
                       argv, cohort_subgroups(args, cohort), list(dict.fromkeys(declared.values())))


def answers_run_info(args, setup, step):
    """What was scored, for metrics.json, args.json and report.md (the answer-file header)."""
    cohort = setup.cohort
    return {"source": "answer file", "predictions_file": step.file,
            "predictions_sha256": step.sha256, "step": step.name,
            "steps": [s.name for s in setup.steps], "class_folders": setup.folders,
            "class_order": ("--classes" if args.classes else
                            prompt_sets.default_class_order(setup.folders)[1]),
            "rare_class": setup.folders[0], "label_map": args.label_map,
            "probabilities": step.has_probs,
            "test_dir": "<anonymized>" if setup.anonymize else str(args.test_dir),
            "split": cohort.split, "group_source": cohort.group_source,
            "anonymized": bool(setup.anonymize), "bootstrap": args.bootstrap,
            "bootstrap_unit": "group" if cohort.groups is not None else "image", "seed": args.seed,
            "confidence_level": CONFIDENCE_LEVEL, "ece_bins": args.ece_bins,
            "figures": args.figures, "versions": package_versions()}


def score_answer_step(step, setup, args):
    """(metrics, intention-to-diagnose) of one step on the rows it answered."""
    labels = setup.cohort.labels()
    scored = step.answers.pred_index >= 0
    metrics = compute_metrics(labels[scored], step.probs[scored], setup.folders, args.bootstrap,
                              args.seed, groups=setup.cohort.scored_groups(scored), ece_bins=args.ece_bins)
    if not step.has_probs:
        metrics = without_probability_metrics(metrics)
    grouped = setup.cohort.groups is not None
    metrics = with_class_patient_intervals(  # as a checkpoint's: the same function, same numbers
        {**metrics, "interval_levels": interval_levels(grouped, args.bootstrap)}, labels[scored],
        step.answers.pred_index[scored], setup.folders, setup.cohort.scored_groups(scored),
        args.bootstrap, args.seed)
    return metrics, intention_to_diagnose(labels, step.answers.pred_index, 0)


def score_answer_subgroups(setup, step, args):
    """evaluation.score_subgroups on the rows a step answered; AUROC only where the file gives
    probabilities."""
    analysis = score_subgroups(setup.cohort, setup.subgroups, step.probs,
                               step.answers.pred_index >= 0, 0, args, step.answers.pred_index,
                               "the answer file's label")
    for row in (row for attribute in analysis or () for row in attribute["rows"]):
        if not step.has_probs:  # a one-hot column ranks nothing
            row.update(rare_auroc=None, rare_auroc_ci=None, macro_auroc=None, macro_auroc_ci=None)
    return analysis


def write_outside_outputs(output_dir, setup, step, columns, figures):
    """confusion_matrix_itd.csv (and .png), unmapped_answers.csv: every image's answer, the
    outcomes outside the classes in columns of their own; returns metrics.json's record."""
    folders = setup.folders
    cm = outcome_confusion(setup.cohort.labels(), step.answers, len(folders), columns)
    unmapped = unmapped_answers(step.answers)
    outputs.atomic_write_csv(output_dir / "confusion_matrix_itd.csv",
                             confusion_frame(cm, folders, folders + columns))
    outputs.atomic_write_csv(output_dir / "unmapped_answers.csv",
                             pd.DataFrame(unmapped, columns=["answer", "n"]))
    if figures:
        plot_confusion_matrices([(f"every image, answers outside the options as columns: {step.name}", cm)],
                                folders, figure_saver(output_dir), stem="confusion_matrix_itd",
                                columns=folders + columns, xlabel="answer")
    return {"columns": folders + columns, "confusion_matrix_itd": cm.tolist(),
            "unmapped_answers": unmapped}


def write_sequential_outputs(output_dir, sequential, answered, folders, figures):
    """sequential*.csv (and .png): the primary intention-to-diagnose table and the secondary
    answered-only one, each row naming its analysis."""
    for stem, table in (("sequential", sequential), ("sequential_answered", answered)):
        for suffix, frame in (("", sequential_frame(table)), ("_changes", sequential_changes_frame(table))):
            frame.insert(0, "analysis", table["analysis"])
            outputs.atomic_write_csv(output_dir / f"{stem}{suffix}.csv", frame)
        if figures:
            plot_sequential(table, folders, figure_saver(output_dir), stem=stem, population=(
                "Primary: intention-to-diagnose, every image (no class named = a miss)"
                if table is sequential else "Secondary: answered only (images answered at every step)"))


def write_answer_evaluation(output_dir, args, setup, step, sequential=None, columns=()):
    """Every output of one answer file that needs no model (and the sequential tables, once:
    `sequential` = (primary, answered only)); `columns`: the outcome columns (`outcome_columns`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(output_dir)
    cohort, folders, statuses = setup.cohort, setup.folders, step.answers.statuses
    frame = predictions_frame(cohort, folders, step.probs, statuses, anonymize=setup.anonymize)
    if not step.has_probs:  # one-hot columns would pass for probabilities
        frame = frame.drop(columns=[f"prob_{folder}" for folder in folders])
    outputs.atomic_write_csv(output_dir / "predictions.csv", frame)
    run = answers_run_info(args, setup, step)
    outputs.atomic_write_json(output_dir / "args.json", args_record(args, setup, run))
    labels = [label for _path, label in cohort.items]
    flow = flow_counts(labels, statuses, folders, True, cohort.groups)
    metrics, itd = score_answer_step(step, setup, args)
    subgroups = score_answer_subgroups(setup, step, args) if metrics["n"] else None
    outside = write_outside_outputs(output_dir, setup, step, list(columns), args.figures)
    metrics = {"n": metrics.pop("n"), "n_received": len(labels),
               "n_failed": flow["rows"]["total"]["unreadable"], **metrics, "operating_point": None,
               **itd, "flow": flow, "comparison": None, "subgroups": subgroups,
               "answers_outside_options": outside, **run}
    metrics["journal"] = journal_statistics(labels, step.probs if step.has_probs else None,  # issue 28: steps are one reader, no primary family
                                            step.answers.pred_index, [], cohort.groups, 0, None, folders, args)
    primary, answered = sequential or (None, None)
    if sequential is not None:
        metrics["sequential"], metrics["sequential_answered"] = primary, answered
        write_sequential_outputs(output_dir, primary, answered, folders, args.figures)
    outputs.atomic_write_json(output_dir / "metrics.json", metrics)
    save = figure_saver(output_dir)
    if metrics["n"]:
        scored = step.answers.pred_index >= 0
        y_true, probs = np.asarray(labels)[scored], step.probs[scored]
        write_scored_tables(output_dir, y_true, probs, folders, metrics, None)
        write_subgroup_outputs(output_dir, subgroups, args.figures)
        write_journal_outputs(output_dir, metrics["journal"], args.figures)
        if args.figures and step.has_probs:
            write_figures(save, y_true, probs, None, folders, metrics, None, 0)
        elif args.figures:
            plot_confusion_matrices([(f"answered with a class only (secondary): {step.name}",
                                      metrics["confusion_matrix"])], folders, save)
    outputs.atomic_write_text(output_dir / "report.md",
                             render_report(run, flow, metrics, folders, None, itd, None,
                                           subgroups=subgroups, sequential=primary, outside=outside,
                                           sequential_answered=answered,
                                           figures_written=written_figures(output_dir)))
    return metrics


def step_folder(index, name):
    """The output folder of a later step: step<k>_<name> with only safe characters."""
    return f"step{index + 1}_" + (re.sub(r"[^\w.+-]+", "_", name).strip("_") or "answers")


def run_answers(args, argv, script="score_answers.py"):
    """Score answer files, no model (score_answers.py, or `script` inference.py's deprecated
    --predictions mode). Returns the exit code."""
    try:
        setup = dataclasses.replace(prepare_answers(args, argv), script=script)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    steps = setup.steps
    sequential = sequential_readings(setup, args) if len(steps) > 1 else None
    columns = outcome_columns(setup.outcomes, steps)
    output_dir, empty = Path(args.output_dir), []
    for i, step in enumerate(steps):
        LOG.info("== step %d/%d: %s (%s) ==", i + 1, len(steps), step.name, step.answers.source)
        folder = output_dir if i == 0 else output_dir / step_folder(i, step.name)
        metrics = write_answer_evaluation(folder, args, setup, step, sequential if i == 0 else None,
                                          columns)
        # no class named, but declared outcomes ('not orbital' on every image) are a result
        if not metrics["n"] and not any(o in setup.outcomes for o in step.answers.outcomes):
            empty.append(step.file)
        LOG.info("  n %d of %d answered with a class (%d naming no class)  accuracy %s  "
                 "balanced accuracy %s", metrics["n"], metrics["n_received"], metrics["n_failed"],
                 format_value(metrics["accuracy"], metrics["accuracy_ci"]),
                 format_value(metrics["balanced_accuracy"], metrics["balanced_accuracy_ci"]))
    if sequential is not None:
        for row in sequential[0]["omnibus"]:  # the primary (intention-to-diagnose) table
            LOG.info("  Cochran's Q %-28s %-11s %s", row["class"], row["measure"],
                     "n/a" if row["q"] is None else f"{row['q']:.2f} (p {format_p(row['p_value'])})")
    LOG.info("== done: outputs in %s ==", output_dir)
    if empty:  # as for a checkpoint whose images are all unreadable: written, but not a success
        print(f"error: no answer of {', '.join(empty)} could be scored; the reasons are in the "
              "status column of its predictions.csv", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """score_answers.py: score answer files without a model. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = scoring_args.parse_args(argv, __doc__, model=False)
    # args.json spells the flags' current names (--out-dir, not --output-dir)
    argv = cli.canonical_argv(scoring_args.build_parser(__doc__, model=False), argv)
    cli.configure_logging()
    LOG.info("== setup ==")
    for key, value in vars(args).items():
        LOG.debug("  %s = %s", key, "<hidden>" if key == "anonymize_salt" and value else value)
    return run_answers(args, argv)
