r"""Split a folder-per-class image cohort into train/val(/test) folders and a manifest.

Every file but junk and notes is read once, by content whatever its extension (unreadable files,
such as a phone .heic, go to rejected.csv with the reason and are left out),
hashed, and assigned to a split: stratified by class with largest-remainder rounding, so a rare
class keeps its prevalence and every class with two or more images gets a validation image.
With a grouping flag the split is patient-level: all images of one patient land in the same
split. --group-from-folder takes the first sub-folder under the class folder as the patient
(class/Patient 001/IMG_0001.JPG); --group-regex takes the first capture group of a regex searched
in the path relative to --data-root (else in the file name); --groups reads a path,group CSV.
Without one, each image is its own group, named by its path (camera names such as IMG_0001.JPG
repeat in every patient folder, so file stems never name groups). A flag that groups no image
is refused. Images are copied by default, so the source tree is never changed; same-stem
.txt/.json/.xml sidecar files travel with their image. The same seed gives the same split and a
byte-identical manifest.csv.

    $ python data_preprocess.py --data-root dataset_root
    $ python data_preprocess.py --data-root dataset_root --out-dir splits --val-ratio 0.2 \
          --test-ratio 0.1 --seed 2024 --mode hardlink
    $ python data_preprocess.py --data-root dataset_root --out-dir splits --group-from-folder
    $ python data_preprocess.py --data-root photos --out-dir splits --labels photos/labels.csv \
          --path-col filename --label-col diagnosis --group-col patient_id
    $ python data_preprocess.py --data-root dataset_root --out-dir cv --folds 5 --resize-px 448

Labels CSV layout. With --labels, --data-root is a folder of images in any arrangement and the
CSV names each image (--path-col, relative to --data-root) and its class (--label-col, a class
folder name); --group-col optionally gives its patient. A label that is not a class, an empty
cell, a path listed with two labels and a listed file that does not exist are refused; images
the CSV does not list are left out with a warning. The split folders get the class folders:
OUT/<split>/<label>/<path>.

Writes into --out-dir (default: --data-root): train/<class>/, val/<class>/ (test/<class>/ with
--test-ratio), manifest.csv (path, source, label, split, group, sha256), rejected.csv (path,
reason), duplicates.csv, split_summary.csv (images per class and split, groups per split) and
split_args.json.

Leakage audit. Byte-identical files (same SHA-256) and near-duplicates (the same photograph
re-encoded, resized or slightly brightened: 64-bit perceptual hashes within --near-dup-distance
bits, confirmed by a 256-bit perceptual hash, because standardised eye photographs can share a
64-bit hash without being the same picture) are listed in duplicates.csv (path, duplicate_of,
kind exact|near, distance in pHash bits, same_label; paths relative to --data-root) and always
kept in one split. A pair filed under two different classes is logged as a WARNING naming both
files and counted in the printed summary: one of the two labels is probably wrong.

--folds K (cross-validation): the images not held out by --test-ratio all get split "train" and
a `fold` column 0..K-1 in the manifest, stratified by class and group-aware (duplicates and
patients stay in one fold); no val/ folder is written and --val-ratio does not apply.
`clip_train.py --train-dir M --val-dir M --fold k` (M = OUT/manifest.csv) trains on the other
folds and validates on fold k.

--resize-px N writes, instead of the original bytes, a copy whose shorter side is N pixels
(Lanczos; aspect kept; EXIF orientation applied; metadata dropped) for every image whose shorter
side is larger than N: as JPEG quality 95 (4:4:4) when the source is a JPEG, otherwise as PNG
(lossless sources, 16-bit and DICOM, which thereby leave their headers behind). Smaller images
are copied unchanged. The manifest gains resized_px (N, or empty when copied unchanged) and
sha256_written; sha256 stays the hash of the source file.

--mode move is journaled: the planned (source, target) pairs are written and fsynced to
OUT/.move_journal.jsonl before the first file moves; each move is a rename (atomic on one file
system; across file systems a synced copy, then the source is removed). A rerun after an
interruption finds the journal and finishes the run, or with --rollback moves every file back;
when the run completes the manifest is written first, then the journal becomes OUT/move_log.jsonl,
with which --rollback can also undo a finished move run.
"""

import argparse
import contextlib
import errno
import hashlib
import io
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
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from orbital_clip import common
from orbital_clip import prompts as prompt_sets

LOG = logging.getLogger("data_preprocess")
SPLITS = common.SPLIT_NAMES  # ("train", "val", "test"); also the split order of manifest rows
MODES = ("copy", "hardlink", "symlink", "move")
MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.csv"
DUPLICATES_NAME = "duplicates.csv"
SUMMARY_NAME = "split_summary.csv"
ARGS_NAME = "split_args.json"
JOURNAL_NAME = ".move_journal.jsonl"  # present only while a --mode move run is unfinished
MOVE_LOG_NAME = "move_log.jsonl"  # the journal of a finished move run, for --rollback
JOURNAL_FORMAT = "orbital-clip-move-journal/1"
# what --overwrite removes
OUTPUT_FILES = (MANIFEST_NAME, REJECTED_NAME, DUPLICATES_NAME, SUMMARY_NAME, ARGS_NAME,
                MOVE_LOG_NAME)
MANIFEST_COLUMNS = ["path", "source", "label", "split", "group", "sha256"]
METADATA_RESERVED = {*MANIFEST_COLUMNS, "fold", "resized_px", "sha256_written"}  # not --metadata names
DUPLICATE_COLUMNS = ["path", "duplicate_of", "kind", "distance", "same_label"]
# Ratios are used as exact fractions (0.2 -> 1/5), so 10 x 0.2 is 2 and not 2.0000000000000004.
RATIO_MAX_DENOMINATOR = 1_000_000
# Re-encoded or resized copies of a photograph differ by 0-2 bits of a 64-bit pHash, brightness
# and contrast edits by 2-4; unrelated standardised eye photographs can be as close as 0-4 bits,
# hence the confirmation by a 256-bit pHash within FINE_BITS_PER_BIT * N + FINE_EXTRA_BITS bits
# (measured on the synthetic demo cohort: edited copies <= 16, distinct photographs >= 30).
NEAR_DUP_DISTANCE = 4
FINE_BITS_PER_BIT, FINE_EXTRA_BITS = 4, 8
PHASH_SIDE_PX = 128  # box-reduce to about this side before hashing (pHash looks at 32-64 px)
HAMMING_BLOCK_ELEMENTS = 1 << 22  # pairs compared per vectorised block (bounds the memory used)
POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
RESIZE_JPEG_QUALITY = 95


class SplitError(ValueError):
    """A cohort or destination this script cannot split into; the message names the path/flag."""


@dataclass
class ImageRecord:
    """One readable image of the cohort and where it goes."""

    path: Path  # the source file
    source: str  # relative to --data-root, posix ("healthy eyes/x.jpg")
    label: int  # class index
    dest: str  # relative to a split folder: <class>/<path within the class folder>
    sha256: str
    phash: bytes = b""  # 64-bit perceptual hash (8 bytes): the near-duplicate screen
    phash_fine: bytes = b""  # 256-bit perceptual hash (32 bytes): its confirmation
    size_px: tuple = (0, 0)  # (width, height) as read, EXIF orientation applied
    sidecars: tuple = ()  # same-stem .txt/.json/.xml files that travel with the image
    group: str = ""
    split: int = 0  # index into SPLITS
    fold: int | None = None  # with --folds, for images of the train pool
    written: str = ""  # with --resize-px: the path within the split folder, when resized
    resized_px: int | None = None
    attributes: dict = field(default_factory=dict)  # --metadata columns of this image (site, sex, ...)
    sha256_written: str = ""


@dataclass
class Grouping:
    """How the images were grouped into patients (the summary line and split_args.json)."""

    rule: str | None  # the grouping flag as written ("--group-from-folder"); None: no grouping
    grouped_by: dict  # {how the rule matched ("path", "file name", ...): images}
    ungrouped: list  # sources of the images the rule left alone (each is its own group)
    n_groups: int  # distinct groups, the images left alone included


class ImageCheck(NamedTuple):
    """What validating one file found: hashes and size, or the reason it is rejected."""

    sha256: str | None = None
    phash: bytes = b""
    phash_fine: bytes = b""
    size_px: tuple = (0, 0)
    reason: str | None = None


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


def assign_folds(labels, units, n_folds, seed):
    """Fold index (0..n_folds-1) per image: stratified by class, units never divided.

    Per class (of a unit's majority label), units are shuffled with a per-class generator, then
    placed largest first into the fold holding the fewest images of that class (ties: the fold
    with the fewest images overall, then the lowest index). A class with at least n_folds units
    so reaches every fold, and fold sizes differ by at most one unit per class.
    """
    members = defaultdict(list)
    for index, key in enumerate(units):
        members[key].append(index)
    unit_label = {key: majority_label([labels[i] for i in idx]) for key, idx in members.items()}
    total = [0] * n_folds
    unit_fold = {}
    for label in sorted(set(unit_label.values())):
        keys = sorted(key for key in members if unit_label[key] == label)
        random.Random(f"{seed}/fold/{label}").shuffle(keys)
        keys.sort(key=lambda k: -len(members[k]))
        of_class = [0] * n_folds
        for key in keys:
            fold = min(range(n_folds), key=lambda f: (of_class[f], total[f], f))
            unit_fold[key] = fold
            of_class[fold] += len(members[key])
            total[fold] += len(members[key])
    return [unit_fold[key] for key in units]


def merge_linked_units(units, links):
    """Unit keys after joining the units of every linked (i, j) pair of image indices
    (union-find; a merged unit is named by its smallest key)."""
    parent = {key: key for key in units}

    def find(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for i, j in links:
        a, b = find(units[i]), find(units[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(key) for key in units]


def hash_matrix(hashes):
    """(n, words) uint64 matrix of equal-length hash byte strings (8 bytes per word)."""
    if not hashes:
        return np.zeros((0, 1), dtype=np.uint64)
    data = np.frombuffer(b"".join(hashes), dtype=">u8").astype(np.uint64)
    return data.reshape(len(hashes), -1)


def popcount(words):
    """Set bits of each uint64 (same shape)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return POPCOUNT8[as_bytes].sum(axis=-1)


def hamming_distances(a, b):
    """(m, n) bit distances between the rows of (m, w) and (n, w) uint64 hash matrices."""
    return popcount(a[:, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int64)


def near_duplicate_pairs(coarse, fine, max_distance):
    """(i, j, distance) with i < j for images whose 64-bit pHashes (`coarse`, bytes) differ in
    at most max_distance bits and whose 256-bit pHashes (`fine`) in at most
    FINE_BITS_PER_BIT * max_distance + FINE_EXTRA_BITS; distance is the 64-bit one.

    All pairs are compared, vectorised in row blocks (~0.6 s for 10,000 images); [] when
    max_distance is 0.
    """
    n = len(coarse)
    if max_distance <= 0 or n < 2:
        return []
    fine_limit = FINE_BITS_PER_BIT * max_distance + FINE_EXTRA_BITS
    a, b = hash_matrix(coarse), hash_matrix(fine)
    rows_per_block = max(1, HAMMING_BLOCK_ELEMENTS // (n * a.shape[1]))
    pairs = []
    for start in range(0, n, rows_per_block):
        distance = hamming_distances(a[start:start + rows_per_block], a)  # (rows, n)
        rows, cols = np.nonzero(distance <= max_distance)
        upper = cols > rows + start
        rows, cols = rows[upper], cols[upper]
        confirmed = popcount(b[rows + start] ^ b[cols]).sum(axis=-1) <= fine_limit
        pairs += [(int(r) + start, int(c), int(distance[r, c]))
                  for r, c in zip(rows[confirmed], cols[confirmed])]
    return pairs


def find_duplicates(digests, coarse, fine, max_distance):
    """Duplicate pairs (index, index of the earlier image it duplicates, kind, distance).

    exact: same SHA-256; every later copy is paired with the first (distance 0).
    near: `near_duplicate_pairs` among the first copies of each distinct content.
    """
    first, pairs = {}, []
    for index, digest in enumerate(digests):
        if digest in first:
            pairs.append((index, first[digest], "exact", 0))
        else:
            first[digest] = index
    unique = sorted(first.values())
    for i, j, distance in near_duplicate_pairs([coarse[k] for k in unique],
                                               [fine[k] for k in unique], max_distance):
        pairs.append((unique[j], unique[i], "near", distance))
    return pairs


def folder_group(dest):
    """The patient folder of an image: the first folder below its class folder ('orbital
    disease/Patient 001/IMG_0002.JPG' -> 'Patient 001'), or None for a file directly in it."""
    parts = PurePosixPath(dest).parts
    return parts[1] if len(parts) > 2 else None


def group_images(paths, rule, lookup):
    """Group every image; images the rule does not group are their own group, named by their
    path (never by their file stem: camera names such as IMG_0001.JPG repeat in every patient
    folder, and their stems would join unrelated patients).

    Args:
        paths: (source, dest) of each image (see ImageRecord).
        rule: the grouping flag as the user wrote it ("--group-from-folder"), or None.
        lookup: (source, dest) -> (group or None, how it matched); unused without a rule.
    Returns:
        (group per image, Grouping).
    """
    found = [lookup(*p) for p in paths] if rule else [(None, None)] * len(paths)
    groups = [group or source for (source, _), (group, _) in zip(paths, found)]
    grouped_by = Counter(how for group, how in found if group)
    ungrouped = [source for (source, _), (group, _) in zip(paths, found) if not group]
    return groups, Grouping(rule, dict(sorted(grouped_by.items())), ungrouped, len(set(groups)))


def grouping_summary(grouping, n_images, subfolder_example=None):
    """One line saying how the images were grouped into patients (printed with the table)."""
    if grouping.rule is None:
        line = (f"patient groups: none (no grouping flag); each of the {n_images} images is its "
                "own group, so one patient's images can land in different splits")
        if subfolder_example:
            line += (f"; the class folders hold sub-folders (e.g. {subfolder_example!r}): if they "
                     "are patients, pass --group-from-folder")
        return line
    n_grouped = n_images - len(grouping.ungrouped)
    ways = ", ".join(f"{count} by their {how}" for how, count in grouping.grouped_by.items())
    line = (f"patient groups: {grouping.rule} grouped {n_grouped} of {n_images} images "
            f"({ways}) into {grouping.n_groups - len(grouping.ungrouped)} group(s)")
    if grouping.ungrouped:
        line += (f"; {len(grouping.ungrouped)} image(s) are their own group (not matched), e.g. "
                 f"{grouping.ungrouped[0]!r}")
    return line


def normalise_relpath(text):
    """A user-written relative path as the posix string used in the manifest."""
    return PurePosixPath(text.strip().replace("\\", "/")).as_posix()


def build_manifest(records, folders, folds=False, resized=False, metadata_columns=()):
    """Manifest rows in a stable order: split, then class index, then source path. `fold` with
    --folds (empty for test rows); `resized_px`, `sha256_written` with --resize-px; then the
    --metadata columns (empty for an image the file does not list)."""
    columns = (MANIFEST_COLUMNS + (["fold"] if folds else [])
               + (["resized_px", "sha256_written"] if resized else []) + list(metadata_columns))
    rows = []
    for r in sorted(records, key=lambda r: (r.split, r.label, r.source)):
        row = {"path": f"{SPLITS[r.split]}/{r.written or r.dest}", "source": r.source,
               "label": folders[r.label], "split": SPLITS[r.split], "group": r.group,
               "sha256": r.sha256}
        if folds:
            row["fold"] = "" if r.fold is None else str(r.fold)
        if resized:
            row["resized_px"] = "" if r.resized_px is None else str(r.resized_px)
            row["sha256_written"] = r.sha256_written
        row.update({column: r.attributes.get(column, "") for column in metadata_columns})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def duplicates_table(records, pairs):
    """duplicates.csv rows for `find_duplicates` pairs, sorted by kind, path, duplicate_of."""
    rows = [{"path": records[j].source, "duplicate_of": records[i].source, "kind": kind,
             "distance": distance, "same_label": records[i].label == records[j].label}
            for j, i, kind, distance in pairs]
    frame = pd.DataFrame(rows, columns=DUPLICATE_COLUMNS)
    return frame.sort_values(["kind", "path", "duplicate_of"], kind="stable").reset_index(drop=True)


def split_summary(manifest, folders, columns):
    """Images per class and split (or fold: columns "fold k") with totals, plus a last row of
    groups per split."""
    bucket = manifest["split"]
    if "fold" in manifest.columns:
        bucket = bucket.where(manifest["fold"] == "", "fold " + manifest["fold"])
    rows = []
    for folder in folders:
        of_class = bucket[manifest["label"] == folder]
        rows.append({"class": folder, **{c: int((of_class == c).sum()) for c in columns},
                     "total": len(of_class)})
    rows.append({"class": "total images", **{c: int((bucket == c).sum()) for c in columns},
                 "total": len(manifest)})
    rows.append({"class": "groups",
                 **{c: int(manifest.loc[bucket == c, "group"].nunique()) for c in columns},
                 "total": int(manifest["group"].nunique())})
    return pd.DataFrame(rows, columns=["class", *columns, "total"])


def splits_in_play(val_ratio, test_ratio):
    """Names of the splits this run writes."""
    return [name for name, ratio in zip(SPLITS, (1.0, val_ratio, test_ratio)) if ratio > 0]


def summary_columns(val_ratio, test_ratio, folds=None):
    """Columns of the summary table: the splits, or with --folds the folds and test."""
    if not folds:
        return splits_in_play(val_ratio, test_ratio)
    return [f"fold {k}" for k in range(folds)] + (["test"] if test_ratio > 0 else [])


def resized_size(size_px, resize_px):
    """(width, height) with the shorter side exactly resize_px, aspect ratio kept."""
    width, height = size_px
    if width <= height:
        return resize_px, max(resize_px, round(height * resize_px / width))
    return max(resize_px, round(width * resize_px / height)), resize_px


def resized_name(source, as_jpeg):
    """Relative path of a resized copy: .jpg/.jpeg names kept for JPEG output, else a new
    suffix (.jpg for JPEG, .png otherwise)."""
    path = PurePosixPath(source)
    if path.suffix.lower() in ((".jpg", ".jpeg") if as_jpeg else (".png",)):
        return path.as_posix()
    return path.with_suffix(".jpg" if as_jpeg else ".png").as_posix()


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


def scan_cohort(root, out_dir, folders, exclude=()):
    """Candidate image files [(path, class index)], refusing sub-folders that are neither classes
    nor named by --exclude-folders (`exclude`)."""
    classes = sorted(set(exclude) & set(folders))
    if classes:
        raise SplitError(f"--exclude-folders {classes[0]!r}: is a class folder; to split without "
                         "a class, define the classes with --prompts")
    items, unknown = common.list_class_folder_images(root, folders)
    if out_dir.resolve().parent == root.resolve():  # an --out-dir inside the data root is ours
        unknown = [name for name in unknown if name != out_dir.name]
    report_excluded_folders(root, exclude, unknown)
    unknown = [name for name in unknown if name not in exclude]
    if unknown:
        raise SplitError(f"--data-root {root}: folder(s) {', '.join(repr(u) for u in unknown)} "
                         f"are not classes{common.did_you_mean_clause(unknown, folders)}; expected "
                         f"{folders} (rename it, leave it out with --exclude-folders NAME, or "
                         "define other classes with --prompts)")
    counts = Counter(label for _, label in items)
    for index, folder in enumerate(folders):
        if not (root / folder).is_dir():
            LOG.warning("class folder %s is missing; splitting without it", root / folder)
        elif counts[index] == 0:
            LOG.warning("class folder %s holds no image files", root / folder)
    if not items:
        raise SplitError(f"--data-root {root}: no image files in the class folders {folders}")
    return items


def report_excluded_folders(root, exclude, unknown):
    """Log what --exclude-folders leaves out, and warn about names that match no folder."""
    for name in exclude:
        if name in unknown:
            n_files = sum(path.is_file() for path in (root / name).rglob("*"))
            LOG.info("--exclude-folders: left out %s (%d files)", root / name, n_files)
        else:
            LOG.warning("--exclude-folders %r: no such folder in --data-root %s%s", name, root,
                        common.did_you_mean_clause([name], unknown))


def read_labels_table(path, columns):
    """The --labels CSV as strings, refusing it unless it has every `columns` {flag: name}."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise SplitError(f"--labels {path}: not a readable CSV ({err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for flag, column in columns.items():
        if column not in frame.columns:
            raise SplitError(f"{flag} {column!r}: no such column in --labels {path}"
                             f"{common.did_you_mean_clause([column], list(frame.columns))}; its "
                             f"columns are {list(frame.columns)}")
    return frame


def labelled_rows(frame, columns, folders, where):
    """{source: (class index, group)} from the --labels table; refuses empty path or label
    cells, labels that are not classes, and a path listed twice with different values.

    Args:
        columns: (path column, label column, group column or None).
        where: "--labels FILE", the start of every message.
    """
    path_col, label_col, group_col = columns
    groups = frame[group_col] if group_col else [""] * len(frame)
    rows, unknown = {}, defaultdict(list)
    for index, (rel, label, group) in enumerate(zip(frame[path_col], frame[label_col], groups)):
        line = index + 2  # the header is line 1
        rel, label, group = rel.strip(), label.strip(), group.strip()
        if not rel or not label:
            empty = path_col if not rel else label_col
            raise SplitError(f"{where}: line {line} has an empty {empty!r} cell; fill it in or "
                             "delete the row")
        if label not in folders:
            unknown[label].append(line)
            continue
        source, value = normalise_relpath(rel), (folders.index(label), group)
        if rows.setdefault(source, value) != value:
            raise SplitError(f"{where}: {rel!r} is listed twice with different labels or groups "
                             f"(again on line {line}); keep one row")
    if unknown:
        names = sorted(unknown)
        raise SplitError(f"{where}: label(s) "
                         + ", ".join(f"{n!r} (line {unknown[n][0]})" for n in names)
                         + f" are not classes{common.did_you_mean_clause(names, folders)}; the "
                         f"classes are {folders} (fix the labels, or define classes with --prompts)")
    return rows


def scan_labelled_files(root, out_dir, rows, where):
    """Items [(path, class index)] and {source: group} of the --labels rows; refuses paths that
    leave --data-root, lie in a split folder this script writes, or name no file."""
    root_abs = os.path.abspath(root)
    own = [os.path.abspath(out_dir / name) for name in SPLITS]
    items, groups, missing = [], {}, []
    for listed, (label, group) in rows.items():
        # normpath, not resolve: a symlinked image is still listed where the user put it
        path = os.path.normpath(os.path.join(root_abs, listed))
        if os.path.commonpath([root_abs, path]) != root_abs:
            raise SplitError(f"{where}: {listed!r} is outside --data-root {root}; list paths "
                             "relative to it")
        if any(os.path.commonpath([folder, path]) == folder for folder in own):
            raise SplitError(f"{where}: {listed!r} lies in {out_dir}'s split folders, which this "
                             "script writes; list the original files")
        if not os.path.isfile(path):
            missing.append(listed)
            continue
        source = Path(os.path.relpath(path, root_abs)).as_posix()
        items.append((Path(root) / source, label))
        groups[source] = group
    if missing:
        raise SplitError(f"{where}: {len(missing)} listed file(s) do not exist under --data-root "
                         f"{root}, e.g. {missing[0]!r}; fix the paths (relative to --data-root) "
                         "or delete those rows")
    return sorted(items, key=lambda item: (item[1], item[0].as_posix())), groups


def warn_unlisted_images(root, out_dir, items, where):
    """Warn about images under --data-root that the --labels CSV does not list (left out)."""
    listed = {os.path.abspath(path) for path, _ in items}
    own = [Path(os.path.abspath(out_dir / name)) for name in SPLITS]
    unlisted = [p for p in sorted(root.rglob("*")) if p.is_file() and common.is_candidate_image(p)
                and os.path.abspath(p) not in listed
                and not any(d in Path(os.path.abspath(p)).parents for d in own)]
    if unlisted:
        LOG.warning("%s does not list %d image file(s) under --data-root, e.g. %s; they are left "
                    "out", where, len(unlisted), unlisted[0].relative_to(root))


def scan_labels_layout(root, out_dir, args, folders):
    """The --labels layout: (items [(path, class index)], {source: group})."""
    where = f"--labels {args.labels}"
    columns = {"--path-col": args.path_col, "--label-col": args.label_col}
    if args.group_col:
        columns["--group-col"] = args.group_col
    frame = read_labels_table(args.labels, columns)
    rows = labelled_rows(frame, (args.path_col, args.label_col, args.group_col), folders, where)
    if not rows:
        raise SplitError(f"{where}: no rows")
    items, groups = scan_labelled_files(root, out_dir, rows, where)
    warn_unlisted_images(root, out_dir, items, where)
    return items, groups


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


def scan_flat_sidecars(paths):
    """Sidecar files beside the listed images (--labels layout), indexed by (folder, stem)."""
    sidecars = defaultdict(list)
    for folder in sorted({path.parent for path in paths}):
        for path in sorted(folder.iterdir()):
            if (path.is_file() and path.suffix.lower() in common.SIDECAR_EXTENSIONS
                    and not common.is_junk_file(path)):
                sidecars[(path.parent, path.stem)].append(path)
    return sidecars, []


def perceptual_hashes(image):
    """(64-bit, 256-bit) DCT perceptual hashes (imagehash.phash) of a PIL image, as bytes."""
    import imagehash
    grey = image.convert("L")
    factor = min(grey.size) // PHASH_SIDE_PX
    if factor >= 2:  # box-average first: the same hash up to rounding, far faster on photographs
        grey = grey.reduce(factor)
    coarse = imagehash.phash(grey, hash_size=8)
    fine = imagehash.phash(grey, hash_size=16)
    return np.packbits(coarse.hash.ravel()).tobytes(), np.packbits(fine.hash.ravel()).tobytes()


def check_image(path):
    """An ImageCheck: hashes and size of a readable image, or the reason it is not one.

    The image decoded for validation (a full decode: what passes here decodes in training too)
    is the one hashed, so each file is decoded once.
    """
    try:
        image = common.read_image(path)
        phash, phash_fine = perceptual_hashes(image)
        return ImageCheck(common.file_sha256(path), phash, phash_fine, image.size)
    except common.ImageReadError as err:
        return ImageCheck(reason=str(err))
    except OSError as err:
        return ImageCheck(reason=f"cannot read file ({err.strerror or type(err).__name__})")
    except Exception as err:  # noqa: BLE001 - a loader bug must cost one image, not the run
        return ImageCheck(reason=f"unexpected error while reading ({type(err).__name__})")


def item_paths(root, path, label, folders, flat):
    """(source, dest) of a scanned image: its path relative to --data-root, and relative to a
    split folder (the same in the class-folder layout; <label>/<source> with --labels)."""
    source = path.relative_to(root).as_posix()
    return source, (f"{folders[label]}/{source}" if flat else source)


def validate_cohort(root, items, folders, workers, disable_progress, flat=False):
    """Read and hash every candidate; returns (records, rejected rows [(path, reason)]).

    flat: the --labels layout, where paths under root carry no class folder; the split folders
    then get one (<split>/<label>/<path>).
    """
    paths = [path for path, _ in items]
    # Decoding and hashing release the GIL, so threads give a real speed-up. read_image's
    # warnings filter is process-global; interleaved threads can only leave the stricter
    # filter on, and oversized images are refused by its explicit pixel check either way.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(check_image, paths), total=len(paths), desc="validate",
                            unit="img", disable=disable_progress))
    sidecars, others = scan_flat_sidecars(paths) if flat else scan_extra_files(root, folders)
    records, rejected = [], []
    for (path, label), check in zip(items, results):
        source, dest = item_paths(root, path, label, folders, flat)
        if check.reason is not None:
            rejected.append((source, check.reason))
            continue
        own = tuple(sidecars.pop((path.parent, path.stem), ()))  # the first image claims them
        records.append(ImageRecord(path, source, label, dest, check.sha256, check.phash,
                                   check.phash_fine, check.size_px, own))
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


def grouping_rule(args, label_groups=None):
    """(the grouping flag as written, lookup (source, dest) -> (group or None, how it
    matched)), or (None, None) without a grouping flag. label_groups: {source: group} from
    --labels with --group-col."""
    if args.group_from_folder:
        return "--group-from-folder", lambda source, dest: (folder_group(dest), "patient folder")
    if args.group_regex is not None:
        pattern = re.compile(args.group_regex)
        return (f"--group-regex '{args.group_regex}'",
                lambda source, dest: common.regex_group(source, pattern))
    if args.groups is not None:
        mapping = read_group_csv(args.groups)
        return f"--groups {args.groups}", lambda source, dest: (mapping.get(source) or None,
                                                                "CSV row")
    if args.group_col is not None:
        return (f"--group-col {args.group_col}",
                lambda source, dest: (label_groups.get(source) or None, "CSV row"))
    return None, None


def no_group_message(rule, example, n_images):
    """The refusal for a grouping flag that groups none of the images."""
    flag = rule.split(" ", 1)[0]
    how = {"--group-from-folder": "none sits in a sub-folder of its class folder (of --data-root "
                                  "with --labels)",
           "--group-regex": "the regex matches neither the path relative to --data-root nor "
                            "the file name of any",
           "--groups": "the CSV lists none of them by its path relative to --data-root",
           "--group-col": "the column is empty on every row"}[flag]
    return (f"{rule}: grouped none of the {n_images} images ({how}, e.g. {example!r}); fix "
            f"{flag} or leave it out for an image-level split")


def check_grouping(paths, rule, lookup, groups_csv=None):
    """Before any image is read: refuse a grouping flag that groups none of the scanned images
    (paths: their (source, dest)); warn about --groups entries naming no scanned image."""
    if rule is None:
        return
    _, grouping = group_images(paths, rule, lookup)
    if not grouping.grouped_by:
        raise SplitError(no_group_message(rule, paths[0][0], len(paths)))
    if groups_csv is not None:
        unused = set(read_group_csv(groups_csv)) - {source for source, _ in paths}
        if unused:
            LOG.warning("--groups: %d listed path(s) are not image files here, e.g. %s",
                        len(unused), sorted(unused)[0])


def assign_group_labels(records, rule, lookup):
    """Set each record's group by the grouping rule (see `grouping_rule`); returns (unit key
    per record: its group, Grouping)."""
    groups, grouping = group_images([(r.source, r.dest) for r in records], rule, lookup)
    if rule and not grouping.grouped_by:  # every image the rule matched was unreadable
        raise SplitError(no_group_message(rule, records[0].source, len(records)))
    if rule and grouping.ungrouped:
        LOG.warning("%d of %d images are not grouped by %s, e.g. %s; each is its own group, "
                    "named by its path", len(grouping.ungrouped), len(records), rule,
                    grouping.ungrouped[0])
    for record, group in zip(records, groups):
        record.group = group
    return groups, grouping


def report_mixed_groups(records, units):
    """Warn about patient groups spanning classes (each is kept whole with its majority)."""
    labels_of = defaultdict(set)
    for record, unit in zip(records, units):
        labels_of[unit].add(record.label)
    mixed = sorted(unit for unit, labels in labels_of.items() if len(labels) > 1)
    if mixed:
        LOG.warning("%d group(s) span two or more classes, e.g. %r; each is kept whole and split "
                    "with its majority class", len(mixed), mixed[0])


def report_duplicates(records, pairs, folders):
    """Log the leakage audit; every pair with conflicting labels gets its own WARNING line.
    Returns the number of conflicting pairs."""
    conflicts = 0
    for j, i, kind, distance in pairs:
        a, b = records[i], records[j]
        if a.label != b.label:
            conflicts += 1
            LOG.warning("CONFLICTING LABELS: %r (%s) and %r (%s) are %s duplicates (pHash "
                        "distance %d); kept in one split, but one of the labels is probably wrong",
                        a.source, folders[a.label], b.source, folders[b.label], kind, distance)
    n_exact = sum(kind == "exact" for _, _, kind, _ in pairs)
    if pairs:
        LOG.warning("leakage audit: %d exact duplicate(s) and %d near-duplicate pair(s), kept "
                    "together in one split (see %s)", n_exact, len(pairs) - n_exact,
                    DUPLICATES_NAME)
    return conflicts


def assign_pool_folds(records, units, n_folds, seed, folders):
    """Set `fold` on the records of the training pool (split 0), in place."""
    pool = [i for i, r in enumerate(records) if r.split == 0]
    pool_units = [units[i] for i in pool]
    if len(set(pool_units)) < n_folds:
        raise SplitError(f"--folds {n_folds}: the training pool holds only "
                         f"{len(set(pool_units))} group(s) (after merging duplicates); use fewer "
                         "folds")
    folds = assign_folds([records[i].label for i in pool], pool_units, n_folds, seed)
    for i, fold in zip(pool, folds):
        records[i].fold = fold
    for label in sorted({records[i].label for i in pool}):
        reached = {records[i].fold for i in pool if records[i].label == label}
        if len(reached) < n_folds:
            LOG.warning("class %r has images in only %d of the %d folds (too few groups); "
                        "the other folds validate without it", folders[label], len(reached),
                        n_folds)


def strata_labels(records, column=None):
    """The stratum of each image: its class, or with `column` (--stratify-by) class x that
    attribute, numbered so that the class stays the leading key (an empty cell is a level too)."""
    if not column:
        return [r.label for r in records]
    levels = sorted({r.attributes.get(column, "") for r in records})
    return [r.label * len(levels) + levels.index(r.attributes.get(column, "")) for r in records]


def split_records(records, args, folders, rule=(None, None)):
    """Assign group, split (and fold) to every record in place; returns (the duplicate pairs,
    Grouping). rule: (flag, lookup) from `grouping_rule`."""
    groups, grouping = assign_group_labels(records, *rule)
    report_mixed_groups(records, groups)
    pairs = find_duplicates([r.sha256 for r in records], [r.phash for r in records],
                            [r.phash_fine for r in records], args.near_dup_distance)
    units = merge_linked_units(groups, [(i, j) for j, i, _, _ in pairs])
    splits = stratified_group_split(strata_labels(records, getattr(args, "stratify_by", None)),
                                    units, args.val_ratio, args.test_ratio, args.seed)
    for record, split in zip(records, splits):
        record.split = split
    if args.folds:
        assign_pool_folds(records, units, args.folds, args.seed, folders)
    return pairs, grouping


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


def is_jpeg_file(path):
    """True when the file's content starts with the JPEG SOI marker."""
    with open(path, "rb") as handle:
        return handle.read(3) == b"\xff\xd8\xff"


def plan_resizing(records, resize_px):
    """With --resize-px: mark the images whose shorter side exceeds resize_px (in place) and
    refuse output names that two images would share (a.png and a.tif both become a.png)."""
    for record in records:
        if min(record.size_px) > resize_px:
            record.written = resized_name(record.dest, is_jpeg_file(record.path))
            record.resized_px = resize_px
    taken = {}
    for record in records:
        key = (record.split, record.written or record.dest)
        if key in taken:
            raise SplitError(f"--resize-px: {taken[key]} and {record.source} would both be "
                             f"written as {SPLITS[key[0]]}/{key[1]}; rename one of them")
        taken[key] = record.source


def plan_jobs(records, out_dir):
    """(source, target, record to resize or None) for every image and sidecar:
    OUT/<split>/<class>/<path within class>."""
    jobs = []
    for record in sorted(records, key=lambda r: (r.split, r.label, r.source)):
        split_dir = out_dir / SPLITS[record.split]
        resize = record if record.resized_px else None
        jobs.append((record.path, split_dir / (record.written or record.dest), resize))
        for source in record.sidecars:  # beside their image, which may be renamed by --resize-px
            jobs.append((source, split_dir / PurePosixPath(record.dest).parent / source.name, None))
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
        settle_move(source, target)
    else:
        raise ValueError(f"unknown mode {mode!r}")


def write_resized(source, target, resize_px):
    """Write the shorter-side-resize_px copy of an image (see the module docstring) atomically;
    returns the SHA-256 of the bytes written."""
    try:
        image = common.read_image(source, min_side_px=resize_px)
    except common.ImageReadError as err:
        raise SplitError(f"{source}: became unreadable since validation ({err})") from None
    image = image.resize(resized_size(image.size, resize_px), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if target.suffix.lower() in (".jpg", ".jpeg"):
        image.save(buffer, "JPEG", quality=RESIZE_JPEG_QUALITY, subsampling=0)
    else:
        image.save(buffer, "PNG")
    data = buffer.getvalue()
    common.atomic_write(target, lambda handle: handle.write(data))
    return hashlib.sha256(data).hexdigest()


def materialise(jobs, mode, workers, disable_progress):
    """Place every file (resized copies in threads); a target that exists already is an error,
    never overwritten."""
    for _, target, _ in jobs:
        if target.exists() or target.is_symlink():
            raise SplitError(f"{target}: already exists")
    for source, target, resize in tqdm(jobs, desc=mode, unit="file", disable=disable_progress):
        target.parent.mkdir(parents=True, exist_ok=True)
        if resize is None:
            place_file(source, target, mode)
    resized = [(source, target, record) for source, target, record in jobs if record is not None]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda job: write_resized(job[0], job[1], job[2].resized_px), resized)
        for (_, _, record), digest in zip(resized, tqdm(digests, total=len(resized), desc="resize",
                                                          unit="img", disable=disable_progress)):
            record.sha256_written = digest


def render_tables(manifest, rejected, duplicates, summary, args_dict):
    """{file name: text} of every table, in writing order: the manifest last, as the mark of
    completion."""
    def to_csv(frame):
        return frame.to_csv(index=False, lineterminator="\n")

    return {REJECTED_NAME: to_csv(pd.DataFrame(sorted(rejected), columns=["path", "reason"])),
            DUPLICATES_NAME: to_csv(duplicates),
            SUMMARY_NAME: to_csv(summary),
            ARGS_NAME: json.dumps(args_dict, indent=2) + "\n",
            MANIFEST_NAME: to_csv(manifest)}


def write_tables(out_dir, tables):
    """Each table atomically, in order (see `render_tables`)."""
    for name, text in tables.items():
        common.atomic_write_text(out_dir / name, text)


# ----------------------------------------------------------------------------------------------
# --mode move: journal, resume, rollback


def fsync_dir(folder):
    """Make a rename or unlink in `folder` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_journal(path, header, moves):
    """A header line (JSON) and one {"source", "target"} line per move, written and fsynced
    atomically."""
    lines = [json.dumps(header)]
    lines += [json.dumps({"source": str(source), "target": str(target)})
              for source, target in moves]
    common.atomic_write_text(path, "\n".join(lines) + "\n")
    fsync_dir(path.parent)


def read_journal(path):
    """(header, [(source, target)]) from a journal written by `write_journal`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        moves = [(Path(entry["source"]), Path(entry["target"]))
                 for entry in map(json.loads, lines[1:])]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise SplitError(f"{path}: not a readable move journal ({err})") from None
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        raise SplitError(f"{path}: not a move journal of this script (format "
                         f"{header.get('format') if isinstance(header, dict) else None!r})")
    return header, moves


def same_file_content(a, b):
    """Two paths holding the same bytes (or two symlinks to the same target)."""
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    return common.file_sha256(a) == common.file_sha256(b)


def settle_move(source, target):
    """Bring one planned move to its end state (the file at target, none at source).

    Idempotent, so a rerun after a crash at any point finishes it; returns True when a file was
    moved now. A rename within one file system is atomic; across file systems the file is copied
    to a synced temporary file, renamed into place, and only then is the source removed (a crash
    in between leaves two identical copies, which the rerun resolves).
    """
    at_source, at_target = os.path.lexists(source), os.path.lexists(target)
    if at_target and not at_source:
        return False
    if at_target:
        if not same_file_content(source, target):
            raise SplitError(f"{target}: exists and differs from {source}; move one of them "
                             "away and rerun")
        os.unlink(source)
        return False
    if not at_source:
        raise SplitError(f"{source}: missing, and not at {target} either; was it moved or "
                         "deleted by hand?")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        with open(source, "rb") as original:
            common.atomic_write(target, lambda handle: shutil.copyfileobj(original, handle))
        shutil.copystat(source, target)
        os.unlink(source)
    return True


def run_moves(moves, disable_progress):
    """settle_move for every (source, target) pair, in order."""
    for source, target in tqdm(moves, desc="move", unit="file", disable=disable_progress):
        settle_move(source, target)


def finish_move_run(out_dir, header, moves):
    """Tables (manifest last), then the journal becomes the move log."""
    write_tables(out_dir, header["tables"])
    log_header = {key: value for key, value in header.items() if key != "tables"}
    write_journal(out_dir / MOVE_LOG_NAME, log_header, moves)
    (out_dir / JOURNAL_NAME).unlink()
    fsync_dir(out_dir)


def move_split(root, out_dir, jobs, tables, disable_progress):
    """The journaled --mode move run: journal, moves, tables, move log."""
    header = {"format": JOURNAL_FORMAT, "data_root": os.path.abspath(root),
              "out_dir": os.path.abspath(out_dir), "tables": tables}
    moves = [(Path(os.path.abspath(s)), Path(os.path.abspath(t))) for s, t, _ in jobs]
    for _, target in moves:
        if os.path.lexists(target):
            raise SplitError(f"{target}: already exists")
    write_journal(out_dir / JOURNAL_NAME, header, moves)
    run_moves(moves, disable_progress)
    finish_move_run(out_dir, header, moves)


def remove_empty_split_folders(out_dir):
    """Delete the empty folders under OUT/train, val, test (folders holding files stay)."""
    for name in SPLITS:
        top = out_dir / name
        if top.is_dir() and not top.is_symlink():
            for folder, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def rollback_move_run(out_dir, moves, disable_progress):
    """Move every file back to its source, then remove our tables, the move log and the empty
    split folders; the journal (if any) goes last, so an interrupted rollback can be rerun."""
    for source, target in tqdm(moves[::-1], desc="rollback", unit="file", disable=disable_progress):
        settle_move(target, source)
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    remove_empty_split_folders(out_dir)
    (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
    fsync_dir(out_dir)


def recover_move(args, out_dir):
    """Finish (rerun with --mode move) or roll back (--rollback) an interrupted move run, or
    roll back a finished one (--rollback with move_log.jsonl). Returns the exit status."""
    journal = out_dir / JOURNAL_NAME
    try:
        if journal.exists():
            header, moves = read_journal(journal)
        elif (out_dir / MOVE_LOG_NAME).exists():
            header, moves = read_journal(out_dir / MOVE_LOG_NAME)
        else:
            raise SplitError(f"--rollback: {out_dir} holds neither {JOURNAL_NAME} nor "
                             f"{MOVE_LOG_NAME}; there is no move run to roll back")
        action = "roll back" if args.rollback else "complete"
        if not args.rollback and args.mode != "move":
            raise SplitError(f"{journal}: a --mode move run was interrupted here; rerun with "
                             "--mode move to complete it, or with --rollback to undo it")
        if args.dry_run:
            print(f"dry run: would {action} the move of {len(moves)} files recorded in "
                  f"{journal if journal.exists() else out_dir / MOVE_LOG_NAME}")
            return 0
        if args.rollback:
            LOG.info("== rolling back %d moves into %s ==", len(moves), header.get("data_root"))
            rollback_move_run(out_dir, moves, args.no_progress or None)
        else:
            LOG.warning("found the journal of an interrupted --mode move run (%s); completing it "
                        "(pass --rollback to undo it instead)", journal)
            run_moves(moves, args.no_progress or None)
            finish_move_run(out_dir, header, moves)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'rolled back' if args.rollback else 'completed'} the move of {len(moves)} files "
          f"({header.get('data_root')} -> {header.get('out_dir')})")
    return 0


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


def build_parser():
    """The command line; every option's help ends its first sentence with "(default: X)"."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-root", required=True, metavar="DIR",
                      help="folder with one sub-folder per class (names from --prompts), or the "
                           "folder the --labels paths are relative to (required)")
    data.add_argument("--prompts", default=None, metavar="JSON",
                      help="JSON prompt set whose 'folder' names are the classes (default: the "
                           "published three classes)")
    data.add_argument("--exclude-folders", nargs="+", default=[], metavar="NAME",
                      help="sub-folders of --data-root that are not classes and are left out, "
                           "e.g. 'unknown' 'to sort' (default: none; any other folder that is "
                           "not a class is refused)")
    labels = parser.add_argument_group(
        "labels CSV layout (a flat folder of images and a CSV naming each one's class)")
    labels.add_argument("--labels", default=None, metavar="CSV",
                        help="CSV with one row per image: its path relative to --data-root and "
                             "its class folder name (default: none; classes come from folders)")
    labels.add_argument("--path-col", default=None, metavar="NAME",
                        help="--labels column of image paths (default: path)")
    labels.add_argument("--label-col", default=None, metavar="NAME",
                        help="--labels column of class names (default: label)")
    split = parser.add_argument_group("split")
    split.add_argument("--val-ratio", type=ratio, default=None, metavar="FRACTION",
                       help="fraction of each class for validation, in [0, 1) (default: 0.2; "
                            "every class with >= 2 images gets at least one; not with --folds)")
    split.add_argument("--test-ratio", type=ratio, default=0.0, metavar="FRACTION",
                       help="fraction of each class for a held-out test split, in [0, 1) "
                            "(default: 0: evaluate on an external cohort instead)")
    split.add_argument("--folds", type=int, default=None, metavar="K",
                       help="cross-validation: K >= 2 stratified, group-aware folds of the "
                            "non-test images (default: none; manifest column 'fold'; all get "
                            "split 'train'); 5 is usual, fewer when the rare class has under ~10 "
                            "patients")
    split.add_argument("--metadata", default=None, metavar="CSV",
                          help="per-image attributes (site, sex, age, ...) carried into "
                               "manifest.csv: a 'path' column relative to --data-root, or a 'file' "
                               "column of file names, plus any columns (default: none)")
    split.add_argument("--stratify-by", default=None, metavar="COLUMN",
                          help="stratify the split by class x this --metadata column, e.g. site, "
                               "so every site keeps its share in each split (default: class only)")
    split.add_argument("--seed", type=int, default=2024,
                       help="shuffling seed (default: 2024); the same seed gives the same split")
    add_grouping_arguments(parser)
    audit = parser.add_argument_group("leakage audit")
    audit.add_argument("--near-dup-distance", type=int, default=NEAR_DUP_DISTANCE, metavar="BITS",
                       help="near-duplicates: 64-bit pHashes differing in at most BITS bits, 0-32 "
                            f"(default: {NEAR_DUP_DISTANCE}; 0: exact duplicates only). Re-encoded "
                            "or resized copies differ by 0-2, brightness/contrast edits by 2-4; "
                            "above ~8 unrelated photographs start to match")
    add_output_arguments(parser)
    running = parser.add_argument_group("running")
    running.add_argument("--workers", type=int, default=None, metavar="N",
                         help="threads that read, hash and resize images (default: the number "
                              "of cores, at most 8)")
    running.add_argument("--no-progress", action="store_true",
                         help="no tqdm progress bars (default: off)")
    return parser


def add_grouping_arguments(parser):
    """The patient-grouping flags (one at a time)."""
    grouping = parser.add_argument_group(
        "patient grouping (one flag; without one, each image is its own group)"
    ).add_mutually_exclusive_group()
    grouping.add_argument("--group-from-folder", action="store_true",
                          help="the first sub-folder under the class folder (under --data-root "
                               "with --labels) is the patient: 'orbital disease/Patient 001/"
                               "IMG_0002.JPG' is in group 'Patient 001' (default: off)")
    grouping.add_argument("--group-regex", default=None, metavar="RE",
                          help="the first capture group of RE searched in the path relative to "
                               r"--data-root, e.g. '(Patient \d+)', or, where that does not "
                               r"match, in the file name, e.g. '^(P\d+)_' (default: none)")
    grouping.add_argument("--groups", default=None, metavar="CSV",
                          help="a CSV with columns path,group (paths relative to --data-root) "
                               "(default: none)")
    grouping.add_argument("--group-col", default=None, metavar="NAME",
                          help="with --labels: its column of patient ids (default: none)")


def add_output_arguments(parser):
    """Where and how the split is written."""
    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", default=None, metavar="DIR",
                        help="where train/, val/, test/ and manifest.csv go (default: --data-root; "
                             "its split folders are never rescanned as classes)")
    output.add_argument("--mode", choices=MODES, default="copy",
                        help="copy (source untouched), hardlink (no extra space, same file "
                             "system), symlink (absolute links), move (the published behaviour: "
                             "empties the class folders; journaled, see --rollback) (default: copy)")
    output.add_argument("--resize-px", type=int, default=None, metavar="N",
                        help="write copies whose shorter side is N px (e.g. 2x the model input: "
                             "448 for 224) instead of the originals; --mode copy only (default: "
                             "none: the original bytes)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an earlier split in --out-dir: its train/val/test folders "
                             "and our CSVs; class folders are never touched (default: off)")
    output.add_argument("--dry-run", action="store_true",
                        help="read, check and plan as a real run would (refusals included), "
                             "print the table and file count, write nothing (default: off)")
    output.add_argument("--rollback", action="store_true",
                        help="undo a --mode move run into --out-dir, interrupted (journal) or "
                             "finished (move_log.jsonl): every file goes back to its source "
                             "(default: off)")


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser, args):
    """Flag combinations, checked right after parsing (parser.error exits with status 2)."""
    if args.folds is not None:
        if args.folds < 2:
            parser.error(f"--folds {args.folds}: needs K >= 2")
        if args.val_ratio is not None:
            parser.error("--folds K replaces --val-ratio (each fold validates in turn); drop "
                         "--val-ratio")
        args.val_ratio = 0.0
    elif args.val_ratio is None:
        args.val_ratio = 0.2
    if args.val_ratio + args.test_ratio >= 1.0:
        parser.error(f"--val-ratio {args.val_ratio} + --test-ratio {args.test_ratio} must be "
                     "below 1 (training needs images)")
    if not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root}: no such folder")
    if args.groups is not None and not Path(args.groups).is_file():
        parser.error(f"--groups {args.groups}: no such file")
    if args.metadata is not None and not Path(args.metadata).is_file():
        parser.error(f"--metadata {args.metadata}: no such file")
    if args.stratify_by is not None and args.metadata is None:
        parser.error("--stratify-by names a column of --metadata; pass --metadata too")
    validate_labels_args(parser, args)
    if args.group_regex is not None:
        try:
            pattern = re.compile(args.group_regex)
        except re.error as err:
            parser.error(f"--group-regex {args.group_regex!r}: not a valid regular expression ({err})")
        if pattern.groups < 1:
            parser.error(f"--group-regex {args.group_regex!r}: needs a capture group, e.g. '^(P\\d+)_'")
    if not 0 <= args.near_dup_distance <= 32:
        parser.error(f"--near-dup-distance {args.near_dup_distance}: must be in 0..32 bits")
    if args.resize_px is not None:
        if args.resize_px < 16:
            parser.error(f"--resize-px {args.resize_px}: must be >= 16 pixels")
        if args.mode != "copy":
            parser.error(f"--resize-px writes new files; it works with --mode copy only, not "
                         f"--mode {args.mode}")
    if args.rollback and args.overwrite:
        parser.error("--rollback undoes a move run; it does not combine with --overwrite")
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    elif args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1")


def validate_labels_args(parser, args):
    """The --labels layout's flags: columns default to path/label, and need --labels."""
    if args.labels is None:
        for flag, value in (("--path-col", args.path_col), ("--label-col", args.label_col),
                            ("--group-col", args.group_col)):
            if value is not None:
                parser.error(f"{flag} names a column of --labels CSV; pass --labels too")
        return
    if not Path(args.labels).is_file():
        parser.error(f"--labels {args.labels}: no such file")
    if args.exclude_folders:
        parser.error("--exclude-folders applies to class folders; with --labels, leave the "
                     "images out of the CSV instead")
    args.path_col = args.path_col or "path"
    args.label_col = args.label_col or "label"


def read_metadata_rows(path):
    """(header, key column, {key: row}) of a --metadata CSV keyed by `path` (relative to
    --data-root) or `file` (file name); SplitError naming the file and row when malformed."""
    where = f"--metadata {path}"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise SplitError(f"{where}: not a readable CSV ({str(err).splitlines()[0]})") from None
    header = [str(c).strip() for c in frame.columns]
    frame.columns = header
    key = "path" if "path" in header else "file" if "file" in header else None
    if key is None:
        raise SplitError(f"{where}: needs a 'path' column (relative to --data-root) or a 'file' "
                         f"column of file names; has {header}")
    taken = [c for c in header if c != key and c in METADATA_RESERVED]
    if taken:
        raise SplitError(f"{where}: column {taken[0]!r} is a manifest column; rename it")
    rows = {}
    for number, row in enumerate(frame.to_dict("records"), start=2):  # row 1 is the header
        cell = normalise_relpath(row[key]) if key == "path" else row[key].strip()
        if cell in rows:
            raise SplitError(f"{where}: row {number}: {key} {cell!r} appears twice")
        rows[cell] = row
    return header, key, rows


def metadata_header(path):
    """The --metadata columns carried into manifest.csv (all but the key column)."""
    header, key, _rows = read_metadata_rows(path)
    return [c for c in header if c != key]


def attach_metadata(records, path, stratify_by=None):
    """Set each record's `attributes` from --metadata (in place); warn about unlisted images."""
    header, key, rows = read_metadata_rows(path)
    if stratify_by and stratify_by not in header:
        raise SplitError(f"--stratify-by {stratify_by}: no such column in --metadata {path} "
                         f"(its columns: {', '.join(c for c in header if c != key)})")
    names = Counter(PurePosixPath(r.source).name for r in records)
    if key == "file" and any(count > 1 for count in names.values()):
        twice = next(name for name, count in names.items() if count > 1)
        raise SplitError(f"--metadata {path}: file name {twice!r} occurs twice under --data-root; "
                         "give a 'path' column instead")
    unlisted = 0
    for record in records:
        row = rows.get(record.source if key == "path" else PurePosixPath(record.source).name)
        unlisted += row is None
        record.attributes = {c: str(row[c]).strip() for c in header if c != key} if row else {}
    if unlisted:
        LOG.warning("--metadata %s lists no row for %d of %d images (their cells stay empty%s)",
                    path, unlisted, len(records),
                    "; --stratify-by treats empty as one more level" if stratify_by else "")


def prepare_split(args, root, out_dir):
    """Scan, check the destination, validate and split; returns (folders, records, rejected,
    duplicate pairs, Grouping)."""
    try:
        folders = prompt_sets.class_folders(prompt_sets.load_prompt_set(args.prompts))
    except prompt_sets.PromptSetError as err:
        raise prompt_sets.PromptSetError(f"--prompts {err}") from None
    check_paths(root, out_dir, folders)
    LOG.info("== scanning %s for classes %s ==", root, folders)
    if args.labels:
        items, label_groups = scan_labels_layout(root, out_dir, args, folders)
    else:
        items, label_groups = scan_cohort(root, out_dir, folders, args.exclude_folders), None
    rule = grouping_rule(args, label_groups)
    check_grouping([item_paths(root, path, label, folders, bool(args.labels))
                    for path, label in items], *rule, args.groups)
    check_destination(out_dir, args.overwrite)
    if args.mode == "hardlink":
        check_hardlink_possible(root, out_dir)
    LOG.info("== validating %d image files ==", len(items))
    records, rejected = validate_cohort(root, items, folders, args.workers, args.no_progress or None,
                                        flat=bool(args.labels))
    if args.metadata:
        attach_metadata(records, args.metadata, args.stratify_by)
    LOG.info("== leakage audit and split ==")
    pairs, grouping = split_records(records, args, folders, rule)
    if args.resize_px:
        plan_resizing(records, args.resize_px)
    return folders, records, rejected, pairs, grouping


def print_summary(summary, records, rejected, pairs, conflicts, args, n_sidecars, grouping):
    """The per-class table (with groups per split), the one-line totals, how the images were
    grouped into patients, and the leakage audit."""
    print(summary.to_string(index=False))
    buckets = summary.columns[1:-1]
    totals = summary.set_index("class").loc["total images"]
    print(f"{len(records)} images (+{n_sidecars} sidecar files) -> "
          + ", ".join(f"{b} {int(totals[b])}" for b in buckets) + f"; {len(rejected)} rejected")
    n_exact = sum(kind == "exact" for _, _, kind, _ in pairs)
    near = (f"pHash distance <= {args.near_dup_distance}" if args.near_dup_distance
            else "near-duplicate search off")
    nested = next((PurePosixPath(r.dest).parent.as_posix() for r in records
                   if folder_group(r.dest)), None)
    print(grouping_summary(grouping, len(records), nested))
    print(f"leakage audit: {n_exact} exact duplicate(s), {len(pairs) - n_exact} near-duplicate "
          f"pair(s) ({near}), {conflicts} with CONFLICTING labels; see {DUPLICATES_NAME}")


def write_split(args, root, out_dir, plan):
    """Create the split folders and place the files (journaled for --mode move); then tables."""
    folders, records, jobs, tables_for = plan
    if args.overwrite:
        remove_previous_outputs(out_dir)
    for split in splits_in_play(args.val_ratio, args.test_ratio):
        for folder in folders:  # every class folder exists in every split, even when empty
            (out_dir / split / folder).mkdir(parents=True, exist_ok=True)
    if args.mode == "move":
        move_split(root, out_dir, jobs, tables_for(records), args.no_progress or None)
        return
    materialise(jobs, args.mode, args.workers, args.no_progress or None)
    for record in records:
        record.sha256_written = record.sha256_written or record.sha256
    write_tables(out_dir, tables_for(records))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.configure_logging()
    for key, value in vars(args).items():
        LOG.info("  %s = %s", key, value)
    root = Path(args.data_root)
    out_dir = Path(args.out_dir) if args.out_dir else root
    if args.rollback or (out_dir / JOURNAL_NAME).exists():
        return recover_move(args, out_dir)
    try:
        folders, records, rejected, pairs, grouping = prepare_split(args, root, out_dir)
        metadata_columns = metadata_header(args.metadata) if args.metadata else []
    except (ValueError, OSError) as err:  # SplitError, CohortError, PromptSetError, I/O
        print(f"error: {err}", file=sys.stderr)
        return 2

    conflicts = report_duplicates(records, pairs, folders)
    columns = summary_columns(args.val_ratio, args.test_ratio, args.folds)

    def tables_for(records):
        manifest = build_manifest(records, folders, bool(args.folds), bool(args.resize_px),
                                  metadata_columns)
        return render_tables(manifest, rejected, duplicates_table(records, pairs),
                             split_summary(manifest, folders, columns),
                             common.run_record("data_preprocess.py", argv, args, {
                                 "classes": folders, "images": len(records), "rejected": len(rejected),
                                 "duplicate_pairs": len(pairs), "conflicting_duplicates": conflicts,
                                 "grouping": {"rule": grouping.rule, "grouped_by": grouping.grouped_by,
                                              "ungrouped": len(grouping.ungrouped),
                                              "groups": grouping.n_groups}}))

    manifest = build_manifest(records, folders, bool(args.folds), metadata_columns=metadata_columns)
    summary = split_summary(manifest, folders, columns)
    jobs = plan_jobs(records, out_dir)
    n_sidecars = len(jobs) - len(records)
    print_summary(summary, records, rejected, pairs, conflicts, args, n_sidecars, grouping)
    if args.dry_run:
        print(f"dry run: would {args.mode} {len(jobs)} files ({len(records)} images, {n_sidecars} "
              f"sidecars) into {out_dir}; nothing was written")
        return 0

    LOG.info("== writing the split into %s (%s) ==", out_dir, args.mode)
    try:
        write_split(args, root, out_dir, (folders, records, jobs, tables_for))
    except (ValueError, OSError) as err:
        hint = ("rerun the same command to finish the move, or add --rollback to undo it"
                if (out_dir / JOURNAL_NAME).exists() else "rerun with --overwrite")
        print(f"error: {err}; the split in {out_dir} is incomplete ({hint})", file=sys.stderr)
        return 1
    LOG.info("== done: %d images in %s, manifest %s ==", len(records), out_dir,
             out_dir / MANIFEST_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
