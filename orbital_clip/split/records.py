"""What the split steps pass each other: the image record, the grouping, a file's check, the
refusal type, and the names of the files a split writes."""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from orbital_clip import cohort
from orbital_clip import outputs

LOG = logging.getLogger("data_preprocess")
SPLITS = cohort.SPLIT_NAMES  # ("train", "val", "test"); also the split order of manifest rows
MODES = ("copy", "hardlink", "symlink", "move")
MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.csv"
DUPLICATES_NAME = "duplicates.csv"
SUMMARY_NAME = "split_summary.csv"
TABLE1_CSV_NAME, TABLE1_MD_NAME = "table1.csv", "table1.md"  # report.table1, by split
ARGS_NAME = "split_args.json"
JOURNAL_NAME = ".move_journal.jsonl"  # present only while a --mode move run is unfinished
MOVE_LOG_NAME = "move_log.jsonl"  # the journal of a finished move run, for --rollback
JOURNAL_FORMAT = "orbital-clip-move-journal/1"
# Everything data_preprocess.py writes into --out-dir, declared once: --overwrite removes the
# split folders (materialise.remove_previous_outputs) and the files marked so; docs/outputs.md
# lists them all.
OUTPUTS = (
    *(outputs.OutputFile(f"{split}/<class>/", "the split images and their sidecars")
      for split in SPLITS),
    outputs.OutputFile(MANIFEST_NAME, "one row per image"),
    outputs.OutputFile(REJECTED_NAME, "files that are not readable images"),
    outputs.OutputFile(DUPLICATES_NAME, "exact and near duplicates"),
    outputs.OutputFile(SUMMARY_NAME, "images per class and split"),
    outputs.OutputFile(TABLE1_CSV_NAME, "Table 1: patients, images, classes and --metadata attributes by split"),
    outputs.OutputFile(TABLE1_MD_NAME, "Table 1 in Markdown"),
    outputs.OutputFile(ARGS_NAME, "the run record"),
    outputs.OutputFile(MOVE_LOG_NAME, "--mode move: the finished move's journal, for --rollback"),
    outputs.OutputFile(JOURNAL_NAME, "--mode move: present only while a move is unfinished",
                       cleared_by_overwrite=False),
)
OUTPUT_FILES = outputs.cleared_files(OUTPUTS)  # what --overwrite removes besides the split folders


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
