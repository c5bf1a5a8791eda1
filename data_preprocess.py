r"""Split a folder-per-class image cohort into train/val(/test) folders and a manifest.

Every image is read once (unreadable files go to rejected.csv with the reason and are left out),
hashed, and assigned to a split: stratified by class with largest-remainder rounding, so a rare
class keeps its prevalence and every class with two or more images gets a validation image.
With --group-regex or --groups the split is patient-level: all images of one group land in the
same split. Images are copied by default, so the source tree is never changed; same-stem
.txt/.json/.xml sidecar files travel with their image. The same seed gives the same split and a
byte-identical manifest.csv.

    $ python data_preprocess.py --data-root dataset_root
    $ python data_preprocess.py --data-root dataset_root --out-dir splits --val-ratio 0.2 \
          --test-ratio 0.1 --seed 2024 --mode hardlink
    $ python data_preprocess.py --data-root dataset_root --out-dir splits --group-regex '^(P\d+)_'

Writes into --out-dir (default: --data-root): train/<class>/, val/<class>/ (test/<class>/ with
--test-ratio), manifest.csv (path, source, label, split, group, sha256), rejected.csv (path,
reason), split_summary.csv (images per class and split, groups per split) and split_args.json.
"""

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

import common
import prompts as prompt_sets

LOG = logging.getLogger("data_preprocess")
SPLITS = common.SPLIT_NAMES  # ("train", "val", "test"); also the split order of manifest rows
MODES = ("copy", "hardlink", "symlink", "move")
MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.csv"
SUMMARY_NAME = "split_summary.csv"
ARGS_NAME = "split_args.json"
OUTPUT_FILES = (MANIFEST_NAME, REJECTED_NAME, SUMMARY_NAME, ARGS_NAME)  # what --overwrite removes
MANIFEST_COLUMNS = ["path", "source", "label", "split", "group", "sha256"]
# Ratios are used as exact fractions (0.2 -> 1/5), so 10 x 0.2 is 2 and not 2.0000000000000004.
RATIO_MAX_DENOMINATOR = 1_000_000


class SplitError(ValueError):
    """A cohort or destination this script cannot split into; the message names the path/flag."""


@dataclass
class ImageRecord:
    """One readable image of the cohort and where it goes."""

    path: Path  # the source file
    source: str  # relative to --data-root, posix ("healthy eyes/x.jpg")
    label: int  # class index
    sha256: str
    sidecars: tuple = ()  # same-stem .txt/.json/.xml files that travel with the image
    group: str = ""
    split: int = 0  # index into SPLITS


# ----------------------------------------------------------------------------------------------
# Pure functions


def _exact_ratio(ratio):
    return Fraction(ratio).limit_denominator(RATIO_MAX_DENOMINATOR)


def allocate_split_counts(n, val_ratio, test_ratio=0.0):
    """(n_train, n_val, n_test) for a class of n images, by largest remainder.

    The quotas n*ratio are floored and the images left over go to the largest fractional
    remainders (ties: train, then val, then test). Then minimums: a class with >= 1 image keeps a
    training image, one with >= 2 images gets a validation image (when val_ratio > 0), one with
    >= 3 a test image (when test_ratio > 0); each is taken from the split with the most images to
    spare above its own minimum (train on ties), so the last training image is never taken.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    val, test = _exact_ratio(val_ratio), _exact_ratio(test_ratio)
    quotas = [n * (1 - val - test), n * val, n * test]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    minimum = [int(n >= 1), int(val > 0 and n >= 2), int(test > 0 and n >= 3)]
    for i in range(3):
        if counts[i] < minimum[i]:  # sum(minimum) <= n, so a donor with images to spare exists
            donor = max(range(3), key=lambda j: (counts[j] - minimum[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return tuple(counts)


def assign_units_to_splits(unit_sizes, quotas, rng):
    """Greedy group-level allocation for one class: {unit key: split index}.

    Args:
        unit_sizes: {unit key: number of images}; a unit (a patient, say) is never divided.
        quotas: (train, val, test) image counts to aim for, from `allocate_split_counts`.
        rng: a `random.Random`; the only source of randomness.
    Units are shuffled, then placed largest first (a big unit placed last would overshoot a small
    split; equal sizes keep the shuffled order), each into the split furthest below its quota.
    With units of one image this reproduces the quotas exactly.
    """
    keys = sorted(unit_sizes)
    rng.shuffle(keys)
    keys.sort(key=lambda k: -unit_sizes[k])
    open_splits = [i for i, quota in enumerate(quotas) if quota > 0] or [0]
    filled = [0] * len(quotas)

    def priority(i):
        deficit = quotas[i] - filled[i]
        # Ties: while there is room, serve the small splits first; once all are full, overflow
        # into train, where one unit more matters least.
        return deficit, (i if deficit > 0 else -i)

    assignment = {}
    for key in keys:
        split = max(open_splits, key=priority)
        assignment[key] = split
        filled[split] += unit_sizes[key]
    _ensure_minimum_units(assignment, unit_sizes, quotas)
    return assignment


def _ensure_minimum_units(assignment, unit_sizes, quotas):
    """Group-level minimums, as in `allocate_split_counts` but counted in units (in place)."""
    n_units = len(assignment)
    minimum = [int(n_units >= 1), int(quotas[1] > 0 and n_units >= 2),
               int(quotas[2] > 0 and n_units >= 3)]

    def members(split):
        return [key for key, value in assignment.items() if value == split]

    for split in range(3):
        if len(members(split)) < minimum[split]:
            donor = max(range(3), key=lambda s: (len(members(s)) - minimum[s], -s))
            smallest = min(members(donor), key=lambda k: (unit_sizes[k], k))
            assignment[smallest] = split


def majority_label(labels):
    """The most frequent class index (ties: the lowest index, i.e. the rarer-by-design class)."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def stratified_group_split(labels, units, val_ratio, test_ratio, seed):
    """Split index (0 train, 1 val, 2 test) for each image, stratified by class.

    Args:
        labels: class index per image.
        units: key per image; images sharing a key always land in the same split. A unit
            spanning classes is kept whole and allocated with its majority class.
        seed: int; each class draws from its own generator, so adding images to one class does
            not reshuffle the others.
    """
    members = defaultdict(list)
    for index, key in enumerate(units):
        members[key].append(index)
    unit_label = {key: majority_label([labels[i] for i in idx]) for key, idx in members.items()}
    unit_split = {}
    for label in sorted(set(unit_label.values())):
        sizes = {key: len(members[key]) for key in members if unit_label[key] == label}
        quotas = allocate_split_counts(sum(sizes.values()), val_ratio, test_ratio)
        rng = random.Random(f"{seed}/{label}")
        unit_split.update(assign_units_to_splits(sizes, quotas, rng))
    return [unit_split[key] for key in units]


def merge_duplicate_units(units, hashes):
    """Unit keys in which byte-identical files (same sha256) share one unit, so that a photo
    stored twice cannot sit in train and in val at once."""
    parent = {key: key for key in units}

    def find(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    first_unit = {}
    for key, digest in zip(units, hashes):
        if digest not in first_unit:
            first_unit[digest] = key
            continue
        a, b = find(first_unit[digest]), find(key)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(key) for key in units]


def group_from_name(name, pattern):
    """The first capture group of `pattern` searched in a file name, or None."""
    match = pattern.search(name)
    return match.group(1) if match and match.group(1) else None


def normalise_relpath(text):
    """A user-written relative path as the posix string used in the manifest."""
    return PurePosixPath(text.strip().replace("\\", "/")).as_posix()


def build_manifest(records, folders):
    """Manifest rows in a stable order: split, then class index, then source path."""
    rows = [{"path": f"{SPLITS[r.split]}/{r.source}", "source": r.source, "label": folders[r.label],
             "split": SPLITS[r.split], "group": r.group, "sha256": r.sha256}
            for r in sorted(records, key=lambda r: (r.split, r.label, r.source))]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def split_summary(manifest, folders, splits):
    """Images per class and split with totals, plus a last row of groups per split."""
    rows = []
    for folder in folders:
        of_class = manifest[manifest["label"] == folder]
        rows.append({"class": folder, **{s: int((of_class["split"] == s).sum()) for s in splits},
                     "total": len(of_class)})
    rows.append({"class": "total images", **{s: int((manifest["split"] == s).sum()) for s in splits},
                 "total": len(manifest)})
    rows.append({"class": "groups",
                 **{s: int(manifest.loc[manifest["split"] == s, "group"].nunique()) for s in splits},
                 "total": int(manifest["group"].nunique())})
    return pd.DataFrame(rows, columns=["class", *splits, "total"])


def splits_in_play(val_ratio, test_ratio):
    """Names of the splits this run writes."""
    return [name for name, ratio in zip(SPLITS, (1.0, val_ratio, test_ratio)) if ratio > 0]


# ----------------------------------------------------------------------------------------------
# Scanning and validating the cohort


def check_paths(root, out_dir, folders):
    """Refuse layouts where outputs would be rescanned as images, or --overwrite would delete
    the data root."""
    clash = sorted(set(folders) & set(SPLITS))
    if clash:
        raise SplitError(f"class folder(s) {clash} clash with the split folders {list(SPLITS)}; "
                         "rename the class (and its --prompts entry)")
    if out_dir.exists() and not out_dir.is_dir():
        raise SplitError(f"--out-dir {out_dir}: exists and is not a folder")
    root_r, out_r = root.resolve(), out_dir.resolve()
    for folder in folders:
        class_dir = root_r / folder
        if out_r == class_dir or class_dir in out_r.parents:
            raise SplitError(f"--out-dir {out_dir}: inside the class folder {root / folder}; its "
                             "outputs would be read as images of that class next time")
    for name in SPLITS:
        split_dir = out_r / name
        if root_r == split_dir or split_dir in root_r.parents:
            raise SplitError(f"--data-root {root}: inside {out_dir / name}, which this script "
                             "writes (and --overwrite deletes)")


def scan_cohort(root, out_dir, folders):
    """Candidate image files [(path, class index)], refusing sub-folders that are not classes."""
    items, unknown = common.list_class_folder_images(root, folders)
    if out_dir.resolve().parent == root.resolve():  # an --out-dir inside the data root is ours
        unknown = [name for name in unknown if name != out_dir.name]
    if unknown:
        raise SplitError(f"--data-root {root}: folder(s) {', '.join(repr(u) for u in unknown)} "
                         f"are not classes; expected {folders} (use --prompts to define other "
                         "classes, or move the folder out)")
    counts = Counter(label for _, label in items)
    for index, folder in enumerate(folders):
        if not (root / folder).is_dir():
            LOG.warning("class folder %s is missing; splitting without it", root / folder)
        elif counts[index] == 0:
            LOG.warning("class folder %s holds no image files", root / folder)
    if not items:
        raise SplitError(f"--data-root {root}: no image files in the class folders {folders}")
    return items


def scan_extra_files(root, folders):
    """Sidecar files indexed by (folder, stem), and files that are neither images nor sidecars."""
    sidecars, others = defaultdict(list), []
    for folder in folders:
        class_dir = root / folder
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or common.is_candidate_image(path) or common.is_junk_file(path):
                continue
            if path.suffix.lower() in common.SIDECAR_EXTENSIONS:
                sidecars[(path.parent, path.stem)].append(path)
            else:
                others.append(path)
    return sidecars, others


def check_image(path):
    """(sha256, None) for a readable image, (None, reason) for anything else."""
    try:
        common.read_image(path)  # full decode: what passes here decodes in training too
        return common.file_sha256(path), None
    except common.ImageReadError as err:
        return None, str(err)
    except OSError as err:
        return None, f"cannot read file ({err.strerror or err})"


def validate_cohort(root, items, folders, workers, disable_progress):
    """Read and hash every candidate; returns (records, rejected rows [(path, reason)])."""
    paths = [path for path, _ in items]
    # Decoding and hashing release the GIL, so threads give a real speed-up. read_image's
    # warnings filter is process-global; interleaved threads can only leave the stricter
    # filter on, and oversized images are refused by its explicit pixel check either way.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(check_image, paths), total=len(paths), desc="validate",
                            unit="img", disable=disable_progress))
    sidecars, others = scan_extra_files(root, folders)
    records, rejected = [], []
    for (path, label), (digest, reason) in zip(items, results):
        source = path.relative_to(root).as_posix()
        if reason is not None:
            rejected.append((source, reason))
            continue
        own = tuple(sidecars.pop((path.parent, path.stem), ()))  # the first image claims them
        records.append(ImageRecord(path, source, label, digest, own))
    if others:
        LOG.warning("%d file(s) that are neither images nor sidecars stay where they are, e.g. %s",
                    len(others), others[0])
    if rejected:
        LOG.warning("%d file(s) are not readable images and are left out (see %s), e.g. %s: %s",
                    len(rejected), REJECTED_NAME, *rejected[0])
    if not records:
        raise SplitError(f"--data-root {root}: none of the {len(items)} image files could be "
                         f"read, e.g. {rejected[0][0]}: {rejected[0][1]}")
    return records, rejected


# ----------------------------------------------------------------------------------------------
# Groups


def read_group_csv(path):
    """{source path relative to the data root: group} from a path,group CSV."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise SplitError(f"--groups {path}: not a readable CSV ({err})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = {"path", "group"} - set(frame.columns)
    if missing:
        raise SplitError(f"--groups {path}: missing column(s) {', '.join(sorted(missing))} "
                         "(expected: path,group with paths relative to --data-root)")
    mapping = {}
    for rel, group in zip(frame["path"], frame["group"]):
        key = normalise_relpath(rel)
        if mapping.get(key, group.strip()) != group.strip():
            raise SplitError(f"--groups {path}: {rel} is listed twice with different groups")
        mapping[key] = group.strip()
    return mapping


def assign_group_labels(records, group_regex=None, groups_csv=None):
    """Set each record's group (regex capture, CSV entry, or the file stem); returns the unit
    key per record (the group when grouping, else the image itself)."""
    stems = [PurePosixPath(r.source).stem for r in records]
    if group_regex is None and groups_csv is None:
        for record, stem in zip(records, stems):
            record.group = stem
        return [r.source for r in records]
    if group_regex is not None:
        pattern = re.compile(group_regex)
        found = [group_from_name(PurePosixPath(r.source).name, pattern) for r in records]
        how = f"--group-regex {group_regex!r} does not match their names"
    else:
        mapping = read_group_csv(groups_csv)
        found = [mapping.get(r.source) or None for r in records]
        how = f"--groups {groups_csv} does not list them"
        unused = set(mapping) - {r.source for r in records}
        if unused:
            LOG.warning("--groups: %d listed path(s) are not readable images here, e.g. %s",
                        len(unused), sorted(unused)[0])
    fallback = [r.source for r, g in zip(records, found) if not g]
    if fallback:
        LOG.warning("%d of %d images have no group (%s), e.g. %s; each is its own group, named "
                    "by its file stem", len(fallback), len(records), how, fallback[0])
    for record, group, stem in zip(records, found, stems):
        record.group = group or stem
    return [r.group for r in records]


def report_group_anomalies(records, units):
    """Warn about groups spanning classes and byte-identical files (which are kept together)."""
    labels_of = defaultdict(set)
    for record, unit in zip(records, units):
        labels_of[unit].add(record.label)
    mixed = sorted(unit for unit, labels in labels_of.items() if len(labels) > 1)
    if mixed:
        LOG.warning("%d group(s) span two or more classes, e.g. %r; each is kept whole and split "
                    "with its majority class", len(mixed), mixed[0])
    by_hash = defaultdict(list)
    for record in records:
        by_hash[record.sha256].append(record.source)
    duplicates = [sources for sources in by_hash.values() if len(sources) > 1]
    if duplicates:
        LOG.warning("%d image(s) are byte-identical copies of another, e.g. %s = %s; copies are "
                    "kept in one split", sum(len(d) - 1 for d in duplicates), *duplicates[0][:2])


def split_records(records, args):
    """Assign group and split to every record (in place)."""
    units = assign_group_labels(records, args.group_regex, args.groups)
    units = merge_duplicate_units(units, [r.sha256 for r in records])
    report_group_anomalies(records, units)
    splits = stratified_group_split([r.label for r in records], units, args.val_ratio,
                                    args.test_ratio, args.seed)
    for record, split in zip(records, splits):
        record.split = split


# ----------------------------------------------------------------------------------------------
# Destination and materialisation


def existing_outputs(out_dir):
    """Outputs of an earlier run in out_dir: split folders holding files, our CSV/JSON files."""
    found = []
    for name in SPLITS:
        folder = out_dir / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            found.append(folder)
        elif folder.is_dir() and any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            found.append(folder)
    found += [out_dir / name for name in OUTPUT_FILES
              if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    return found


def check_destination(out_dir, overwrite):
    """Refuse to write over an earlier split unless --overwrite, and never delete moved images."""
    found = existing_outputs(out_dir)
    if found and not overwrite:
        raise SplitError(f"{found[0]} already exists (an earlier split?); pass --overwrite to "
                         "replace it, or choose another --out-dir")
    if found and overwrite and previous_mode(out_dir) == "move":
        raise SplitError(f"--overwrite: {out_dir} holds images moved there by an earlier --mode "
                         "move run (their only copies); move them back or away first")


def previous_mode(out_dir):
    """--mode of the run that wrote out_dir's split_args.json, or None."""
    try:
        return json.loads((out_dir / ARGS_NAME).read_text(encoding="utf-8"))["args"]["mode"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_hardlink_possible(root, out_dir):
    """Hard links cannot cross file systems: say so before anything is written."""
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if os.stat(root).st_dev != os.stat(probe).st_dev:
        raise SplitError(f"--mode hardlink: {root} and {out_dir} are on different file systems, "
                         "which hard links cannot cross; use --mode copy or --mode symlink")


def remove_previous_outputs(out_dir):
    """Delete our own split folders and files (never the class folders)."""
    for name in SPLITS:
        path = out_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def plan_jobs(records, root, out_dir):
    """(source, target) for every image and sidecar: OUT/<split>/<class>/<path within class>."""
    jobs = []
    for record in sorted(records, key=lambda r: (r.split, r.label, r.source)):
        split_dir = out_dir / SPLITS[record.split]
        for source in (record.path, *record.sidecars):
            jobs.append((source, split_dir / source.relative_to(root)))
    return jobs


def place_file(source, target, mode):
    """Copy, hard-link, symlink (absolute target) or move one file."""
    if mode == "copy":
        shutil.copy2(source, target)
    elif mode == "hardlink":
        try:
            os.link(source, target)
        except OSError as err:  # EXDEV across file systems; EPERM where links are unsupported
            raise SplitError(f"--mode hardlink: cannot link {target} to {source} "
                             f"({err.strerror or err}); use --mode copy or --mode symlink") from None
    elif mode == "symlink":
        os.symlink(source.resolve(), target)
    elif mode == "move":
        shutil.move(source, target)
    else:
        raise ValueError(f"unknown mode {mode!r}")


def materialise(jobs, mode, disable_progress):
    """Place every file; a target that exists already is an error, never overwritten."""
    for source, target in tqdm(jobs, desc=mode, unit="file", disable=disable_progress):
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            raise SplitError(f"{target}: already exists")
        place_file(source, target, mode)


def write_tables(out_dir, manifest, rejected, summary, args_dict):
    """The CSVs and split_args.json, atomically; the manifest last, as the mark of completion."""
    rejected_frame = pd.DataFrame(sorted(rejected), columns=["path", "reason"])
    common.atomic_write_csv(out_dir / REJECTED_NAME, rejected_frame)
    common.atomic_write_csv(out_dir / SUMMARY_NAME, summary)
    common.atomic_write_json(out_dir / ARGS_NAME, args_dict)
    common.atomic_write_csv(out_dir / MANIFEST_NAME, manifest)


# ----------------------------------------------------------------------------------------------
# Command line


def ratio(text):
    """argparse type: a float in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1)")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="folder with one sub-folder per class (names from --prompts)")
    parser.add_argument("--out-dir", default=None, metavar="DIR",
                        help="where train/, val/, test/ and manifest.csv go (default: --data-root; "
                             "its split folders are never rescanned as classes)")
    parser.add_argument("--val-ratio", type=ratio, default=0.2, metavar="FRACTION",
                        help="fraction of each class for validation, in [0, 1) (default 0.2; every "
                             "class with >= 2 images gets at least one)")
    parser.add_argument("--test-ratio", type=ratio, default=0.0, metavar="FRACTION",
                        help="fraction of each class for a held-out test split, in [0, 1) "
                             "(default 0: evaluate on an external cohort instead)")
    parser.add_argument("--seed", type=int, default=2024, help="shuffling seed (default 2024); the same seed gives the same split")
    parser.add_argument("--mode", choices=MODES, default="copy",
                        help="copy (default; source untouched), hardlink (no extra space, same "
                             "file system), symlink (absolute links), move (the published "
                             "behaviour: empties the class folders)")
    grouping = parser.add_mutually_exclusive_group()
    grouping.add_argument("--group-regex", default=None, metavar="RE",
                          help=r"patient-level split: the first capture group of RE in each file "
                               r"name is its group, e.g. '^(P\d+)_'; non-matching files are "
                               "their own group")
    grouping.add_argument("--groups", default=None, metavar="CSV",
                          help="patient-level split: a CSV with columns path,group (paths "
                               "relative to --data-root)")
    parser.add_argument("--prompts", default=None, metavar="JSON",
                        help="JSON prompt set whose 'folder' names are the classes (default: "
                             "the published three classes)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier split in --out-dir (its train/val/test folders "
                             "and our CSVs; class folders are never touched)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read, check and plan as a real run would (refusals included), "
                             "print the table and file count, write nothing")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="threads that read and hash images (default: cores, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser, args):
    """Flag combinations, checked right after parsing (parser.error exits with status 2)."""
    if args.val_ratio + args.test_ratio >= 1.0:
        parser.error(f"--val-ratio {args.val_ratio} + --test-ratio {args.test_ratio} must be "
                     "below 1 (training needs images)")
    if not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root}: no such folder")
    if args.groups is not None and not Path(args.groups).is_file():
        parser.error(f"--groups {args.groups}: no such file")
    if args.group_regex is not None:
        try:
            pattern = re.compile(args.group_regex)
        except re.error as err:
            parser.error(f"--group-regex {args.group_regex!r}: not a valid regular expression ({err})")
        if pattern.groups < 1:
            parser.error(f"--group-regex {args.group_regex!r}: needs a capture group, e.g. '^(P\\d+)_'")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1")


def prepare_split(args, root, out_dir):
    """Scan, check the destination, validate and split; returns (folders, records, rejected)."""
    folders = prompt_sets.class_folders(prompt_sets.load_prompt_set(args.prompts))
    check_paths(root, out_dir, folders)
    LOG.info("== scanning %s for classes %s ==", root, folders)
    items = scan_cohort(root, out_dir, folders)
    check_destination(out_dir, args.overwrite)
    if args.mode == "hardlink":
        check_hardlink_possible(root, out_dir)
    LOG.info("== validating %d image files ==", len(items))
    records, rejected = validate_cohort(root, items, folders, args.workers, args.no_progress or None)
    split_records(records, args)
    return folders, records, rejected


def main(argv=None):
    args = parse_args(argv)
    common.configure_logging()
    for key, value in vars(args).items():
        LOG.info("  %s = %s", key, value)
    root = Path(args.data_root)
    out_dir = Path(args.out_dir) if args.out_dir else root
    try:
        folders, records, rejected = prepare_split(args, root, out_dir)
    except (ValueError, OSError) as err:  # SplitError, CohortError, PromptSetError, I/O
        print(f"error: {err}", file=sys.stderr)
        return 2

    splits = splits_in_play(args.val_ratio, args.test_ratio)
    manifest = build_manifest(records, folders)
    summary = split_summary(manifest, folders, splits)
    jobs = plan_jobs(records, root, out_dir)
    n_sidecars = len(jobs) - len(records)
    print(summary.to_string(index=False))
    print(f"{len(records)} images (+{n_sidecars} sidecar files) -> "
          + ", ".join(f"{s} {int((manifest['split'] == s).sum())}" for s in splits)
          + f"; {len(rejected)} rejected")
    if args.dry_run:
        print(f"dry run: would {args.mode} {len(jobs)} files ({len(records)} images, {n_sidecars} "
              f"sidecars) into {out_dir}; nothing was written")
        return 0

    LOG.info("== writing the split into %s (%s) ==", out_dir, args.mode)
    try:
        if args.overwrite:
            remove_previous_outputs(out_dir)
        for split in splits:  # every class folder exists in every split, even when empty
            for folder in folders:
                (out_dir / split / folder).mkdir(parents=True, exist_ok=True)
        materialise(jobs, args.mode, args.no_progress or None)
        write_tables(out_dir, manifest, rejected, summary,
                     {"args": vars(args), "classes": folders, "images": len(records),
                      "rejected": len(rejected)})
    except (ValueError, OSError) as err:
        print(f"error: {err}; the split in {out_dir} is incomplete (rerun with --overwrite)",
              file=sys.stderr)
        return 1
    LOG.info("== done: %d images in %s, manifest %s ==", len(records), out_dir,
             out_dir / MANIFEST_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
