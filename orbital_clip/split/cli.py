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
import os
import sys
from pathlib import Path, PurePosixPath

from orbital_clip import cli
from orbital_clip import outputs
from orbital_clip import patients
from orbital_clip import prompts as prompt_sets
from orbital_clip.split.allocate import split_records
from orbital_clip.split.duplicates import NEAR_DUP_DISTANCE, duplicates_table, report_duplicates
from orbital_clip.split.grouping import check_grouping, folder_group, grouping_rule, grouping_summary
from orbital_clip.split.manifest import (build_manifest, render_tables, split_summary, splits_in_play,
                                         with_table1,
                                         summary_columns, write_tables)
from orbital_clip.split.materialise import (check_destination, check_hardlink_possible, materialise,
                                            move_split, plan_jobs, plan_resizing, recover_move,
                                            remove_previous_outputs)
from orbital_clip.split.records import DUPLICATES_NAME, JOURNAL_NAME, LOG, MANIFEST_NAME, MODES
from orbital_clip.split.scan import (attach_metadata, check_paths, item_paths, metadata_header,
                                     scan_cohort, scan_labels_layout, validate_cohort)

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
    cli.add_prompts(data, help="JSON prompt set whose 'folder' names are the classes (default: "
                               "the published three classes)")
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
    cli.add_seed(split, help="shuffling seed (default: 2024); the same seed gives the same split")
    add_grouping_arguments(parser)
    audit = parser.add_argument_group("leakage audit")
    audit.add_argument("--near-dup-distance", type=int, default=NEAR_DUP_DISTANCE, metavar="BITS",
                       help="near-duplicates: 64-bit pHashes differing in at most BITS bits, 0-32 "
                            f"(default: {NEAR_DUP_DISTANCE}; 0: exact duplicates only). Re-encoded "
                            "or resized copies differ by 0-2, brightness/contrast edits by 2-4; "
                            "above ~8 unrelated photographs start to match")
    add_output_arguments(parser)
    running = parser.add_argument_group("running")
    threads = running.add_argument("--threads", type=int, default=None, metavar="N",
                                   help="threads that read, hash and resize images (default: the "
                                        "number of cores, at most 8)")
    cli.add_old_spellings(running, threads, "--workers")  # --workers is DataLoader processes elsewhere
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
    cli.add_out_dir(output, old=("--output-dir", "--save-dir"), default=None,
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
    cli.add_overwrite(output, help="replace an earlier split in --out-dir: its train/val/test "
                                   "folders and our CSVs; class folders are never touched (default: off)")
    cli.add_table1_continuous(output)
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
    cli.refuse_conflicting_spellings(parser, argv if argv is not None else sys.argv[1:])
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
    if args.group_regex is not None and patients.group_regex_problem(args.group_regex):
        parser.error(patients.group_regex_problem(args.group_regex))
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
    if args.threads is None:
        args.threads = min(8, os.cpu_count() or 1)
    elif args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")


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
    records, rejected = validate_cohort(root, items, folders, args.threads, args.no_progress or None,
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
    materialise(jobs, args.mode, args.threads, args.no_progress or None)
    for record in records:
        record.sha256_written = record.sha256_written or record.sha256
    write_tables(out_dir, tables_for(records))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    argv = cli.canonical_argv(build_parser(), argv)  # args.json spells the flags' current names
    cli.configure_logging()
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
        return with_table1(render_tables(manifest, rejected, duplicates_table(records, pairs),
                             split_summary(manifest, folders, columns),
                             outputs.run_record("data_preprocess.py", argv, args, {
                                 "classes": folders, "images": len(records), "rejected": len(rejected),
                                 "duplicate_pairs": len(pairs), "conflicting_duplicates": conflicts,
                                 "grouping": {"rule": grouping.rule, "grouped_by": grouping.grouped_by,
                                              "ungrouped": len(grouping.ungrouped),
                                              "groups": grouping.n_groups}})),
                           manifest, folders, columns, metadata_columns, args.table1_continuous)

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
