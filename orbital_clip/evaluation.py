"""What every evaluation shares, of a model (inference.py) or of answer files (answer_files.py):
the cohort read from --test-dir (class folders, a flat folder, a manifest.csv, one image) with its
patients (--group-regex, a manifest's group column), per-image metadata and subgroups
(--metadata, --subgroups, --age-bins), and the output folder (which files are ours, the tables,
the failure analysis, args.json). No model and no torch code here.
"""

import csv
import dataclasses
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from orbital_clip import cohort as cohort_io
from orbital_clip import images
from orbital_clip import outputs
from orbital_clip.metadata import RESERVED_COLUMNS, read_csv_rows, read_metadata
from orbital_clip.patients import (class_relative_path, folder_groups, none_grouped_message, patient_folder_example,
                                   regex_patients)
from orbital_clip.metrics import (INCONSISTENT_LEVEL, ComparedModel, compare_predictions, label_probs,
                                  patient_levels, subgroup_analysis)
from orbital_clip.report.table1 import table1, table1_markdown
from orbital_clip.report.tables import table2_frame
from orbital_clip.report.markdown import table2_markdown
from orbital_clip.report import (FIGURE_NAMES, comparison_frame, confusion_frame, most_confident_errors,
                    per_class_frame, plot_comparison, plot_subgroups, relative_path, subgroups_frame)

LOG = logging.getLogger("inference")  # a part of the inference.py command, logged as such
DEFAULT_SPLIT = "test"  # manifest rows evaluated when --test-dir is a manifest.csv
FAILURE_DIR = "failure_analysis"  # thumbnails of the most confident errors (report.md)
EXPLAIN_PREFIX = "explain_"  # inference.py --explain maps in FAILURE_DIR (cleared with the thumbnails)
THUMBNAIL_PX = 160  # longer side of a thumbnail


def _figure(stem, what):
    """A figure's two files (.png for reading, .pdf for print)."""
    return tuple(outputs.OutputFile(f"{stem}.{ext}", what) for ext in ("png", "pdf"))


# Everything inference.py (and score_answers.py) writes into --out-dir, declared once:
# --overwrite clears the files marked so (in each wise_ft_alpha_<alpha>/ folder too), and
# docs/outputs.md lists them all.
OUTPUTS = (
    outputs.OutputFile("predictions.csv", "one row per image"),
    outputs.OutputFile("metrics.json", "every metric with its CI"),
    outputs.OutputFile("per_class_metrics.csv", "one-vs-rest metrics per class"),
    outputs.OutputFile("classification_report.txt", "scikit-learn's report"),
    outputs.OutputFile("confusion_matrix.csv", "counts"),
    *(f for stem in FIGURE_NAMES for f in _figure(stem, "report.figures")),
    outputs.OutputFile("report.md", "the report"),
    outputs.OutputFile("table1.csv", "Table 1 of the cohort by class"),
    outputs.OutputFile("table1.md", "Table 1 in Markdown"),
    outputs.OutputFile(f"{FAILURE_DIR}/", "thumbnails of the most confident errors (cleared below)",
                       cleared_by_overwrite=False),
    outputs.OutputFile("comparison.csv", "--baseline/--compare"),
    outputs.OutputFile("table2.csv", "--baseline/--compare: one row per model"),
    outputs.OutputFile("table2.md", "--baseline/--compare: Table 2 in Markdown"),
    outputs.OutputFile("table2_by_site.csv", "--compare with --subgroups site: Table 2 per site"),
    *_figure("comparison", "--baseline/--compare"),
    outputs.OutputFile("baseline_predictions.csv", "--baseline"),
    outputs.OutputFile("subgroups.csv", "--subgroups"),
    *_figure("subgroups", "--subgroups"),
    outputs.OutputFile("sequential.csv", "score_answers.py --compare"),
    outputs.OutputFile("sequential_changes.csv", "score_answers.py --compare"),
    *_figure("sequential", "score_answers.py --compare"),
    outputs.OutputFile("sequential_answered.csv", "score_answers.py --compare (secondary)"),
    outputs.OutputFile("sequential_answered_changes.csv", "score_answers.py --compare (secondary)"),
    *_figure("sequential_answered", "score_answers.py --compare (secondary)"),
    outputs.OutputFile("confusion_matrix_itd.csv", "score_answers.py: every image, outcome columns"),
    *_figure("confusion_matrix_itd", "score_answers.py"),
    outputs.OutputFile("unmapped_answers.csv", "score_answers.py: answers the label map does not map"),
    outputs.OutputFile("step<k>_<name>/", "score_answers.py --compare: a later step's outputs",
                       cleared_by_overwrite=False),
    outputs.OutputFile("wise_ft_alpha_<alpha>/", "--wise-ft-alphas: one alpha's outputs (cleared below)",
                       cleared_by_overwrite=False),
    outputs.OutputFile("wise_ft_summary.csv", "--wise-ft-alphas"),
    outputs.OutputFile("args.json", "the run record"),
    # issue 28: the statistics a journal asks for (metrics.json's `journal` block)
    outputs.OutputFile("per_class_intervals.csv", "per-class metrics, image- and patient-level CIs"),
    outputs.OutputFile("calibration_slope.csv", "calibration slope and intercept per class"),
    outputs.OutputFile("decision_curve.csv", "net benefit of the rare class by threshold"),
    *_figure("decision_curve", "the decision curve"),
    outputs.OutputFile("fixed_points.csv", "sensitivity at --fixed-specificity and the reverse"),
    outputs.OutputFile("prevalence.csv", "--prevalence: PPV/NPV at that prevalence"),
    outputs.OutputFile("itd_comparison.csv", "--baseline/--compare: intention to diagnose"),
    outputs.OutputFile("primary_endpoint.csv", "--baseline/--compare: Holm-adjusted primary family"),
    outputs.OutputFile("clustered_tests.csv", "--baseline/--compare with patients"),
)


# ----------------------------------------------------------------------------------------------
# The cohort (--test-dir, --split, --group-regex)


@dataclasses.dataclass
class Cohort:
    """The evaluated images."""
    items: list  # [(path, class index)], -1 where unlabelled
    labelled: bool  # False: no class folders, predicted but not scored
    root: Path  # paths in predictions.csv are relative to it
    split: str | None = None  # manifest split evaluated
    groups: list | None = None  # patient of each image (bootstrap unit), None: each image its own
    group_source: str | None = None

    def labels(self):
        """(N,) int64: each image's class index, -1 where unlabelled."""
        return np.array([label for _path, label in self.items], dtype=np.int64)

    def relative_paths(self):
        """Each image's path as predictions.csv writes it (relative to the root, forward slashes)."""
        return [relative_path(path, self.root) for path, _label in self.items]

    def scored_groups(self, scored):
        """The patient of each image of the mask `scored`, or None (each image its own unit)."""
        return None if self.groups is None else np.asarray(self.groups, dtype=str)[scored]


def collect_items(test_dir, folders, output_dir):
    """(items, labelled): class-folder images with their class index, or, when no class folder
    exists, every image under test_dir with label -1 (predicted, not scored)."""
    test_dir, output_dir = Path(test_dir), Path(output_dir).resolve()
    items, unknown = cohort_io.list_class_folder_images(test_dir, folders)
    unknown = [name for name in unknown if (test_dir / name).resolve() != output_dir]
    known = [folder for folder in folders if (test_dir / folder).is_dir()]
    if known:
        if unknown:
            raise cohort_io.CohortError(
                f"--test-dir {test_dir}: folder(s) {', '.join(repr(u) for u in unknown)} are not classes of "
                f"this model {folders}; move them out, or pass --prompts defining them")
        if not items:
            raise cohort_io.CohortError(f"--test-dir {test_dir}: no images in the class folders {known}")
        return items, True
    items = [(path, -1) for path in sorted(test_dir.rglob("*"))
             if path.is_file() and images.is_candidate_image(path)
             and output_dir not in path.resolve().parents
             and not any(part.startswith(".") for part in path.relative_to(test_dir).parts)]
    if not items:
        raise cohort_io.CohortError(f"--test-dir {test_dir}: no images found (and no class folders {folders})")
    if unknown:
        LOG.warning("--test-dir %s: none of the class folders %s, only %s: every image is predicted, "
                    "not scored (rename the folders to score them, or pass --prompts defining them)",
                    test_dir, folders, unknown)
    return items, False


def refuse_duplicate_rows(manifest, rows):
    """CohortError naming both rows (row 1 = the header) when two rows of a manifest.csv name the
    same image: checkpoint mode would count it twice and answer files could not match it. Every
    evaluation path reads a manifest through `read_manifest_rows`, so this is the one check."""
    seen = {}
    for line, row in enumerate(rows, start=2):
        image = str((manifest.parent / (row.get("path") or "")).resolve())
        if image in seen:
            raise cohort_io.CohortError(
                f"--test-dir {manifest}: row {line}: image {row.get('path')!r} already on row "
                f"{seen[image]}; give one row per image")
        seen[image] = line


def read_manifest_rows(manifest):
    """({resolved path: (group, source)}, sorted splits) of a manifest.csv: each row's patient
    ('' when the group column does not name patients; then the bootstrap resamples images) and its
    `source`, the path relative to the data root that data_preprocess.py's --group-regex searched."""
    manifest = Path(manifest)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    refuse_duplicate_rows(manifest, rows)
    patient_groups, reason = cohort_io.manifest_patient_groups(rows)
    if patient_groups is None:
        log = LOG.warning if reason == cohort_io.STEM_GROUPS_REASON else LOG.info
        log("%s: %s; the bootstrap resamples images", manifest, reason)
        patient_groups = [""] * len(rows)
    found = {str((manifest.parent / row.get("path", "")).resolve()): (group, row.get("source") or "")
             for row, group in zip(rows, patient_groups)}
    return found, sorted({row.get("split", "") for row in rows})


def regex_groups(texts, paths, pattern, anonymized=False):
    """Each image's patient by --group-regex, with data_preprocess.py's rule (cohort_io.regex_group):
    the first capture group of `pattern` searched in the image's path relative to the data root
    (`texts`: relative to --test-dir, or a manifest's `source` column), else in its file name; an
    image that matches neither is its own group ('image:' + its entry of `paths`). Refused
    (CohortError naming the flag) when no image matches or all fall into one patient: either
    would pass off an image bootstrap, or none at all, as a patient-level one."""
    found = [group for group, _where in regex_patients(texts, pattern)]
    patients = {group for group in found if group is not None}
    if not patients:
        raise cohort_io.CohortError(none_grouped_message(
            f"--group-regex '{pattern}'", len(texts), None if anonymized else texts[0],
            "a bootstrap of images", root="the data root"))
    if len(patients) == 1 and all(found) and len(texts) > 1:
        raise cohort_io.CohortError(
            f"--group-regex '{pattern}': grouped all {len(texts)} images into one patient "
            f"({'<anonymized>' if anonymized else repr(patients.pop())}), so no interval could vary; "
            "fix --group-regex (its capture group must name the patient) or leave it out")
    n_found = sum(group is not None for group in found)
    LOG.info("--group-regex '%s' grouped %d of %d images into %d patient(s)%s", pattern, n_found,
             len(texts), len(patients),
             "" if n_found == len(texts) else "; each of the others is its own group")
    return [group if group is not None else f"image:{path}" for group, path in zip(found, paths)]


def warn_about_patients(cohort, folders, anonymized=False):
    """Warn when a class rests on one bootstrap unit, or the patients look misnamed. A class whose
    images are all one image's or one patient's never varies between the class-stratified
    resamples (each keeps a class's unit count), so every interval that depends on it is too
    narrow; patients with images in several classes are possible, but more often a regex that
    names something else."""
    if not cohort.labelled:
        return
    labels = cohort.labels()
    grouped = cohort.groups is not None
    units = np.asarray(cohort.groups, dtype=str) if grouped else np.arange(len(labels))
    single = [f"{folders[k]!r} ({int(np.sum(labels == k))} image{'s' if np.sum(labels == k) > 1 else ''})"
              for k in range(len(folders)) if np.any(labels == k) and len(set(units[labels == k])) == 1]
    if single:
        LOG.warning("%s: each of the classes %s rests on %s; it never varies between bootstrap "
                    "resamples, so the intervals are too narrow (%s)",
                    cohort.group_source or "bootstrap of images", ", ".join(single),
                    "one patient" if grouped else "a single image",
                    "check the grouping, or evaluate more patients" if grouped else "evaluate more images")
    if not grouped:
        return
    classes = {}
    for group, label in zip(units.tolist(), labels.tolist()):
        classes.setdefault(group, set()).add(label)
    spanning = sorted(group for group, held in classes.items() if len(held) > 1)
    if spanning:
        LOG.warning("%s: %d patient(s) have images in more than one class%s; the bootstrap counts "
                    "each under its rarest class (check the grouping if each patient has one "
                    "diagnosis)", cohort.group_source, len(spanning),
                    "" if anonymized else f", e.g. {spanning[0]!r}")


def canonical_order(cohort):
    """Sort the cohort's images (and their patients) by path, in place: every bootstrap draws on
    rows in this order, so the order of --classes, of a manifest's rows or of an answer file is
    presentation only and the same seed gives the same intervals."""
    order = sorted(range(len(cohort.items)), key=cohort.relative_paths().__getitem__)
    cohort.items = [cohort.items[i] for i in order]
    if cohort.groups is not None:
        cohort.groups = [cohort.groups[i] for i in order]


def collect_cohort(args, folders):
    """The evaluated images (--test-dir, --split, --group-regex) as a Cohort."""
    spec, sources = Path(args.test_dir), None
    if spec.is_file() and spec.suffix.lower() != ".csv":  # a single image: predicted, not scored
        cohort = Cohort([(spec, -1)], False, spec.parent)
    elif spec.is_file():
        split = args.split or DEFAULT_SPLIT
        manifest_rows, splits = read_manifest_rows(spec)
        if split not in splits:
            # No silent fallback to another split: evaluating val or train rows must be asked for.
            raise cohort_io.CohortError(f"--test-dir {spec}: no rows of split {split!r} (its splits: "
                                     f"{', '.join(splits) or 'none'}); pass --split to choose one")
        items = cohort_io.load_labelled_items(spec, folders, split)
        cohort = Cohort(items, True, spec.parent, split)
        rows = [manifest_rows.get(str(Path(p).resolve()), ("", "")) for p, _ in items]
        named = any(group for group, _source in rows)
        cohort.groups = [group or f"image:{path}" for (group, _source), path
                         in zip(rows, cohort.relative_paths())] if named else None
        cohort.group_source = "manifest group column" if named else None
        sources = [source for _group, source in rows]
    else:
        items, labelled = collect_items(spec, folders, args.output_dir)
        cohort = Cohort(items, labelled, spec)
    if args.group_regex:
        paths = cohort.relative_paths()
        # A manifest row is searched by its source path, as the split did (not by its copy's path,
        # which starts with the split's folder).
        texts = [source or path for source, path in zip(sources, paths)] if sources else paths
        cohort.groups = regex_groups(texts, paths, args.group_regex, args.anonymize_paths)
        cohort.group_source = f"--group-regex {args.group_regex}"
    group_patient_folders(args, cohort, sources, folders)
    canonical_order(cohort)  # after grouping: the patients are sorted with their images
    if args.bootstrap:  # what the warnings are about
        warn_about_patients(cohort, folders, args.anonymize_paths)
    return cohort


def group_patient_folders(args, cohort, sources, folders):
    """--group-from-folder: each image's patient is its folder under the class folder (the rule
    of data_preprocess.py, patients.folder_patient); without any grouping, a warning when the
    class folders hold sub-folders, which usually are patients. A manifest row is read by its
    `source` (relative to the data root), else by its path from its class folder on (the split
    folder in front of the class folder is not a class folder)."""
    if not cohort.labelled:
        return
    paths = cohort.relative_paths()
    texts = paths
    if sources is not None:
        texts = [source or class_relative_path(path, folders[label])
                 for source, path, (_image, label) in zip(sources, paths, cohort.items)]
    if getattr(args, "group_from_folder", False):
        try:
            cohort.groups = folder_groups(texts, paths, args.anonymize_paths)
        except cohort_io.CohortError as err:
            if sources is None or any(sources):
                raise
            raise cohort_io.CohortError(f"{err} (the manifest {args.test_dir} has no `source` "
                                        "column: its images' original patient folders are not "
                                        "recorded; use --group-regex or a `group` column)") from None
        cohort.group_source = "--group-from-folder"
    elif cohort.groups is None and args.bootstrap and patient_folder_example(texts):
        example = "" if args.anonymize_paths else f" (e.g. {patient_folder_example(texts)!r})"
        LOG.warning("--test-dir: the class folders hold sub-folders%s; if they are patients, pass "
                    "--group-from-folder: the bootstrap now resamples images, and its intervals are "
                    "too narrow when a patient has several images", example)


def cohort_class_names(test_dir, split):
    """The class folders a cohort holds: its sub-folders, or the labels of a manifest's split."""
    spec = Path(test_dir)
    if spec.is_file():
        with open(spec, newline="", encoding="utf-8") as handle:
            return sorted({row.get("label", "") for row in csv.DictReader(handle)
                           if row.get("split") == split} - {""})
    _items, found = cohort_io.list_class_folder_images(spec, [])
    return found


def training_overlap(checkpoint, cohort, test_spec):
    """Test images that are also training or validation images of the checkpoint (same file
    or same bytes), from the folders or manifest its metadata records: {"train": n, "val": n,
    "unchecked": [splits whose images could not be listed], "independent_test_set": False when
    any overlap, None when nothing or not everything could be checked, else True}; None for a
    plain state_dict or a tag (no record of where it was trained)."""
    data = checkpoint.data if checkpoint.kind == "ours" else None
    if not isinstance(data, dict):
        return None
    recorded, args = data.get("data") or {}, data.get("args") or {}
    folders = data.get("class_folders") or []
    test_paths = [path for path, _label in cohort.items]
    result = {"train": 0, "val": 0, "unchecked": []}
    for split in ("train", "val"):
        spec = recorded.get(f"{split}_dir") or args.get(f"{split}_dir")
        try:
            items = cohort_io.load_labelled_items(spec, folders, split, recorded.get("fold", args.get("fold")))
        except (TypeError, ValueError, OSError):  # not recorded, moved, or unreadable
            result["unchecked"].append(split)
            continue
        known = {**images.manifest_sha256(test_spec), **images.manifest_sha256(spec)}
        result[split] = len(images.overlapping_images(test_paths, [p for p, _ in items], known))
    overlapping = result["train"] + result["val"] > 0
    result["independent_test_set"] = False if overlapping else (None if result["unchecked"] else True)
    if overlapping:
        LOG.warning("--test-dir %s is not an independent test set: %d of its %d images are training "
                    "and %d validation images of --checkpoint %s", test_spec, result["train"],
                    len(test_paths), result["val"], checkpoint.spec)
    return result


# ----------------------------------------------------------------------------------------------
# CSV files: answer files' and metadata rows; per-image metadata and subgroups (--metadata,
# --subgroups, --age-bins)


MISSING_LEVEL = "missing"  # the level of an image whose attribute cell is empty or absent
MAX_NUMERIC_LEVELS = 10  # a numeric attribute with more distinct values needs --age-bins
MAX_NON_NUMERIC_SHARE = 0.2  # up to this share of words ('NA') in a numeric column: missing cells


def parse_bins(text):
    """--age-bins '0,40,60,120' -> [0.0, 40.0, 60.0, 120.0] (increasing), or ValueError."""
    edges = [float(part) for part in text.split(",") if part.strip()]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError("needs at least two increasing numbers, e.g. 0,40,60,120")
    return edges


def bin_label(value, edges):
    """'[40, 60)' for 45 with edges 0,40,60,120 (the last bin closed), or None outside them."""
    for i, (low, high) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        if low <= value < high or (last and value == high):
            return f"[{low:g}, {high:g}{']' if last else ')'}"
    return None


def as_number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def attribute_levels(name, values, edges, paths, where):
    """Each image's level of one attribute: empty -> 'missing' (and so, with a warning, a few
    non-numeric cells of a numeric column: up to MAX_NON_NUMERIC_SHARE); numeric values binned by
    --age-bins (refused outside the bins, or unbinned with more than MAX_NUMERIC_LEVELS values)."""
    given = [v.strip() for v in values if v.strip()]
    words = [v for v in given if as_number(v) is None]
    # a numeric column with a few non-numeric cells ('NA', 'unknown') stays numeric, those cells
    # missing: never one level per value, nor --age-bins silently ignored
    numeric = bool(given) and len(words) <= MAX_NON_NUMERIC_SHARE * len(given)
    if numeric and words:
        LOG.warning("--subgroups %s: %d of %d values in %s are not numbers (e.g. %r); counted as "
                    "level '%s'", name, len(words), len(given), where, words[0], MISSING_LEVEL)
        values = ["" if as_number(v.strip()) is None else v for v in values]
        given = [v for v in given if as_number(v) is not None]
    if not numeric or edges is None:
        if numeric and len(set(given)) > MAX_NUMERIC_LEVELS:
            raise ValueError(f"--subgroups {name}: {where} holds {len(set(given))} numeric values; "
                             "pass --age-bins EDGES (e.g. 0,40,60,120) to group them")
        return [v.strip() or MISSING_LEVEL for v in values]
    levels = []
    for value, path in zip(values, paths):
        if not value.strip():
            levels.append(MISSING_LEVEL)
            continue
        label = bin_label(as_number(value), edges)
        if label is None:
            raise ValueError(f"--age-bins: {name} {value} of {path!r} in {where} lies outside the "
                             f"bins {edges[0]:g}-{edges[-1]:g}; widen them")
        levels.append(label)
    return levels


def metadata_table(args, cohort):
    """(where, {column: [value per cohort image]}) from --metadata (keyed by path or by file
    name) or, for a manifest --test-dir, the manifest's own extra columns."""
    paths = cohort.relative_paths()
    if args.metadata:
        where = f"--metadata {args.metadata}"
        table = read_metadata(args.metadata, where)
        header, key = table.header, table.key
        if key is None:
            raise ValueError(f"{where}: row 1: needs a 'path' column (as in predictions.csv) or a "
                             f"'file' column of file names, has {header}")
        names = [Path(p).name for p in paths]
        if key == "file" and len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{where}: file name {twice!r} occurs twice in the cohort; give a "
                             "'path' column instead")
        if table.duplicate:
            line, cell, first = table.duplicate
            raise ValueError(f"{where}: row {line}: {key} {cell!r} already on row {first}")
        lookup = {cell: row for cell, (_line, row) in table.rows.items()}
        matched = [lookup.get(p if key == "path" else Path(p).name, {}) for p in paths]
        columns = table.attributes()
    else:
        where = f"--test-dir {args.test_dir}"
        header, rows = read_csv_rows(args.test_dir, where)
        lookup = {str((Path(args.test_dir).parent / row.get("path", "")).resolve()): row for _l, row in rows}
        matched = [lookup.get(str(Path(path).resolve()), {}) for path, _label in cohort.items]
        columns = [c for c in header if c not in RESERVED_COLUMNS]
    if not any(matched):
        raise ValueError(f"{where}: none of its rows names an image of the cohort (paths are relative "
                         "to the test folder, as in predictions.csv)")
    return where, {c: [row.get(c, "") for row in matched] for c in columns}


def cohort_subgroups(args, cohort):
    """{attribute: [level per cohort image]} of --subgroups, or None without it (ValueError: exit 2)."""
    if not args.subgroups:
        return None
    if not args.metadata and not Path(args.test_dir).is_file():
        raise ValueError("--subgroups needs --metadata FILE.csv (or a manifest.csv --test-dir with "
                         "the columns)")
    if not cohort.labelled:
        raise ValueError(f"--subgroups: {args.test_dir} has no class folders; there is nothing to score")
    where, table = metadata_table(args, cohort)
    edges = parse_bins(args.age_bins) if args.age_bins else None
    paths = cohort.relative_paths()
    attributes = {}
    for name in [n.strip() for n in args.subgroups.split(",") if n.strip()]:
        if name not in table:
            raise ValueError(f"--subgroups {name}: no such column in {where} (its columns: "
                             f"{', '.join(table) or 'none'})")
        attributes[name] = attribute_levels(name, table[name], edges, paths, where)
        missing = attributes[name].count(MISSING_LEVEL)
        if missing:
            LOG.warning("--subgroups %s: %d of %d images have no value (level '%s')", name, missing,
                        len(paths), MISSING_LEVEL)
    return attributes


def check_subgroup_args(parser, args):
    """--metadata, --subgroups and --age-bins: files exist, values parse, each needs the other."""
    if args.metadata and not Path(args.metadata).is_file():
        parser.error(f"--metadata {args.metadata}: no such file")
    if args.metadata and not args.subgroups:
        parser.error("--metadata needs --subgroups (the columns to analyse), e.g. --subgroups site")
    if args.age_bins is not None:
        if not args.subgroups:
            parser.error("--age-bins needs --subgroups")
        try:
            parse_bins(args.age_bins)
        except ValueError as err:
            parser.error(f"--age-bins {args.age_bins}: {err}")
    if args.subgroups is not None and not [n for n in args.subgroups.split(",") if n.strip()]:
        parser.error("--subgroups: name at least one column, e.g. site,sex")


# ----------------------------------------------------------------------------------------------
# The output folder


def make_anonymizer(salt):
    """text -> hex SHA-256 of salt + text: the same file gets the same pseudonym within a run (or
    across runs sharing --anonymize-salt), and the salt is never written anywhere."""
    prefix = salt.encode("utf-8") + b"\x00"
    return lambda text: hashlib.sha256(prefix + str(text).encode("utf-8")).hexdigest()


def check_output_dir(output_dir, overwrite):
    """Refuse a non-empty --output-dir unless --overwrite (checked before any work is done)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"--output-dir {output_dir}: exists and is not empty; pass --overwrite to "
                         "replace its evaluation files, or choose another folder")


def clear_previous_outputs(output_dir):
    """Remove our own files of an earlier run (so no stale metrics.json outlives an unlabelled run)."""
    for name in outputs.cleared_files(OUTPUTS):
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
    failures = Path(output_dir) / FAILURE_DIR
    for path in [*failures.glob("true*_*.png"), *failures.glob(f"{EXPLAIN_PREFIX}*.png")]:  # ours
        path.unlink()
    if failures.is_dir() and not failures.is_symlink() and not any(failures.iterdir()):
        failures.rmdir()  # an empty folder of ours would look like a failure analysis


def clear_previous_run(output_dir):
    """--overwrite: remove our files of an earlier run of either kind (plain, or WiSE-FT with its
    wise_ft_alpha_<a>/ folders), so the folder holds exactly one run's outputs afterwards; files
    we did not write are left, and a folder is removed only when nothing else is in it."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    clear_previous_outputs(output_dir)
    for folder in output_dir.glob("wise_ft_alpha_*"):
        if folder.is_dir() and not folder.is_symlink():
            clear_previous_outputs(folder)
            if not any(folder.iterdir()):
                folder.rmdir()


def write_failure_analysis(output_dir, cohort, scored, probs, n_per_class, anonymize):
    """The most confident errors per true class (report.most_confident_errors), each with a
    thumbnail in failure_analysis/ named by class index and rank (never by the file's name) and
    its path as in predictions.csv (a pseudonym with --anonymize-paths)."""
    index = np.flatnonzero(scored)  # row of each scored image in the cohort
    y_true = cohort.labels()[index]
    rows = most_confident_errors(y_true, probs[index], n_per_class)
    for row in rows:
        path = cohort.items[index[row.pop("index")]][0]
        rel = relative_path(path, cohort.root)
        row["file"] = anonymize(rel) if anonymize else rel
        row["thumbnail"] = f"{FAILURE_DIR}/true{row['true']}_{row['rank']}.png"
        try:
            image = images.read_image(path, THUMBNAIL_PX)
        except images.ImageReadError:  # changed on disk since it was scored
            row["thumbnail"] = None
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        (Path(output_dir) / FAILURE_DIR).mkdir(exist_ok=True)
        outputs.atomic_write(Path(output_dir) / row["thumbnail"],
                            lambda handle, image=image: image.save(handle, format="PNG"))
    return rows


def package_versions():
    """The versions named in metrics.json and report.md (args.json has the whole environment)."""
    info = outputs.environment_info()
    return {name: info[name] for name in ("python", "torch", "open_clip", "sklearn", "numpy", "scipy")}


def args_record(args, setup, run=None):
    """args.json (outputs.run_record): never the salt, and no test path when anonymising."""
    hidden = {"anonymize_salt": "<hidden>"}
    if setup.anonymize:
        hidden["test_dir"] = hidden["cwd"] = "<anonymized>"
    return outputs.run_record(setup.script, setup.argv, args, run, hidden)


def score_subgroups(cohort, subgroups, probs, scored, rare_index, args, pred=None,
                    decision_rule="argmax", compared=()):
    """metrics.subgroup_analysis of --subgroups (`subgroups`: attribute -> level per image) on the
    images of the mask `scored`, or None without it. `pred` (N,): the class the declared
    `decision_rule` decides per image (argmax of `probs` without it); each attribute's block
    names the rule, so subgroups.csv says which rule its accuracies follow, and the model.
    `compared`: metrics.ComparedModels over every cohort image (--compare, --baseline), each
    scored the same way on the images both it and ours scored (its label decides)."""
    if not subgroups:
        return None
    subgroups, varying = one_level_per_patient(cohort, subgroups, scored)
    analysis = [dict(block, model="ours", decision_rule=decision_rule) for block in
                subgroup_blocks(cohort, subgroups, probs, scored, rare_index, args, pred)]
    for model in compared:
        answered = scored & (np.asarray(model.pred) >= 0)
        model_probs = label_probs(model.pred, probs.shape[1]) if model.probs is None else model.probs
        blocks = subgroup_blocks(cohort, subgroups, model_probs, answered, rare_index, args, model.pred)
        for block in blocks:
            if model.probs is None:  # a one-hot column ranks nothing
                for row in block["rows"]:
                    row.update(rare_auroc=None, rare_auroc_ci=None, macro_auroc=None,
                               macro_auroc_ci=None)
            analysis.append(dict(block, model=model.name, decision_rule="the model's label"))
    return [dict(block, **varying[block["attribute"]]) for block in analysis]


def one_level_per_patient(cohort, subgroups, scored):
    """({attribute: level per image}, {attribute: {patients_varying, patients_inconsistent}}):
    with patients known, each patient's scored images take one level (metrics.patient_levels: the
    most frequent non-missing value, a tie 'inconsistent'), warned about; without, unchanged. An
    unscored image is left out with its level and its patient, so it neither votes nor ties."""
    varying = {name: {"patients_varying": None, "patients_inconsistent": None} for name in subgroups}
    if cohort.groups is None:
        return subgroups, varying
    harmonised = {}
    kept = np.flatnonzero(scored)
    for name, levels in subgroups.items():
        one, n_varying, n_tied = patient_levels([levels[i] for i in kept],
                                                [cohort.groups[i] for i in kept], MISSING_LEVEL)
        harmonised[name] = list(levels)
        for i, level in zip(kept, one):
            harmonised[name][i] = level
        varying[name] = {"patients_varying": n_varying, "patients_inconsistent": n_tied}
        if n_varying:
            LOG.warning("--subgroups %s: %d patient(s) have different values on different images "
                        "(a value missing on some included); each is counted once, at their most "
                        "frequent value (%d tied: level '%s')", name, n_varying, n_tied,
                        INCONSISTENT_LEVEL)
    return harmonised, varying


def subgroup_blocks(cohort, subgroups, probs, scored, rare_index, args, pred=None):
    """metrics.subgroup_analysis of one model on the images of the mask `scored`."""
    if not scored.any():
        return []
    attributes = {name: np.asarray(levels, dtype=str)[scored] for name, levels in subgroups.items()}
    return subgroup_analysis(cohort.labels()[scored], np.nan_to_num(probs[scored]), attributes,
                             rare_index, cohort.scored_groups(scored), args.bootstrap, args.seed,
                             pred=None if pred is None else np.asarray(pred)[scored])


def write_subgroup_outputs(output_dir, subgroups, figures):
    """subgroups.csv (and subgroups.png/.pdf with `figures`)."""
    if subgroups is None:
        return
    outputs.atomic_write_csv(Path(output_dir) / "subgroups.csv", subgroups_frame(subgroups))
    if figures:
        plot_subgroups(subgroups, figure_saver(output_dir))


def write_scored_tables(output_dir, y_true, probs, folders, metrics, comparison, figures=False):
    """per_class_metrics.csv, classification_report.txt, confusion_matrix.csv, comparison.csv
    (and comparison.png with `figures`)."""
    outputs.atomic_write_csv(output_dir / "per_class_metrics.csv", per_class_frame(metrics, folders))
    report = classification_report(y_true, probs.argmax(axis=1), labels=list(range(len(folders))),
                                   target_names=folders, digits=3, zero_division=0)
    outputs.atomic_write_text(output_dir / "classification_report.txt", report)
    outputs.atomic_write_csv(output_dir / "confusion_matrix.csv",
                            confusion_frame(metrics["confusion_matrix"], folders))
    if comparison is not None:
        outputs.atomic_write_csv(output_dir / "comparison.csv", comparison_frame(comparison))
        write_table2(output_dir, comparison)
        if figures:
            plot_comparison(comparison, figure_saver(output_dir))


SITE_ATTRIBUTE = "site"  # the --subgroups attribute whose levels get a Table 2 each


def compare_by_site(subgroups, scored, y_true, decided, probs, compared, rare, groups, args):
    """{site: compare_predictions on that site's scored images} when --subgroups names `site`,
    else None: Table 2 per site for every model (the same resampling as the pooled one)."""
    if not subgroups or SITE_ATTRIBUTE not in subgroups:
        return None
    sites = np.asarray(subgroups[SITE_ATTRIBUTE], dtype=str)[scored]
    out = {}
    for site in sorted(set(sites)):
        mask = sites == site
        others = [dataclasses.replace(model, pred=model.pred[scored][mask],
                                      probs=None if model.probs is None else model.probs[scored][mask])
                  for model in compared]
        out[site] = compare_predictions(
            y_true[mask], ComparedModel("ours", decided[mask], probs[mask]), others, rare,
            None if groups is None else np.asarray(groups)[mask], args.bootstrap, args.seed)
    return out


def write_table2(output_dir, comparison):
    """table2.csv and table2.md: one row per model (report.table2_frame, from comparison.csv's
    numbers); with sites (`compare_by_site`) table2_by_site.csv and a table per site in table2.md."""
    table = table2_frame(comparison)
    outputs.atomic_write_csv(Path(output_dir) / "table2.csv", table)
    lines = ["# Table 2: each model against ours", "", *table2_markdown(table, comparison.get("n_bootstrap"))]
    by_site = comparison.get("by_site") or {}
    if by_site:
        frames = [table2_frame(site_comparison).assign(**{SITE_ATTRIBUTE: site})
                  for site, site_comparison in by_site.items()]
        outputs.atomic_write_csv(Path(output_dir) / "table2_by_site.csv", pd.concat(frames, ignore_index=True))
        for site, site_comparison in by_site.items():
            lines += ["", f"## {SITE_ATTRIBUTE} = {site}", "",
                      *table2_markdown(table2_frame(site_comparison), site_comparison.get("n_bootstrap"))]
    outputs.atomic_write_text(Path(output_dir) / "table2.md", "\n".join(lines) + "\n")


def write_cohort_table1(output_dir, args, cohort, folders):
    """table1.csv and table1.md of the evaluated cohort by class (report.table1), with the
    --metadata columns (or a manifest --test-dir's own) as characteristics; returns the Markdown
    lines for report.md. Patients are the cohort's groups, else each image is its own."""
    paths = cohort.relative_paths()
    frame = pd.DataFrame({"label": [folders[k] if k >= 0 else "unlabelled" for _p, k in cohort.items],
                          "group": cohort.groups if cohort.groups is not None else paths})
    attributes = {}
    if args.metadata or Path(args.test_dir).is_file():
        try:
            attributes = metadata_table(args, cohort)[1]
        except ValueError:  # a manifest without extra columns naming these images: counts only
            attributes = {}
    frame = frame.assign(**{f"{name}": values for name, values in attributes.items()
                            if name not in ("label", "group")})
    strata = [f for f in folders if f in set(frame["label"])] + (["unlabelled"] if not cohort.labelled else [])
    table = table1(frame, folders, "label", [c for c in attributes if c not in ("label", "group")],
                   args.table1_continuous, strata=strata)
    note = ("Patients: " + (f"the groups of {cohort.group_source}" if cohort.groups is not None
                            else "unknown, each image counted as its own patient")
            + "; an attribute counts each patient once per column.")
    lines = table1_markdown(table, "class", note)
    outputs.atomic_write_csv(Path(output_dir) / "table1.csv", table)
    outputs.atomic_write_text(Path(output_dir) / "table1.md",
                              "\n".join(["# Table 1: the evaluated cohort", "", *lines]) + "\n")
    return lines


def written_figures(output_dir):
    """The PNG figures in output_dir, read from disk after the figures are drawn, so that
    report.md embeds each figure written and links none that was not (report.render_report)."""
    return sorted(path.name for path in Path(output_dir).glob("*.png"))


def figure_saver(output_dir):
    """save(fig, file_name, **savefig_kwargs) for report.write_figures: atomic files in output_dir."""
    def save(fig, name, **kwargs):
        outputs.atomic_save_figure(fig, Path(output_dir) / name, **kwargs)
    return save


# ----------------------------------------------------------------------------------------------
# The statistics a journal asks for (issue 28): metrics.json's `journal` block and its CSVs
