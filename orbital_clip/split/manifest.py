"""The tables a split writes: manifest.csv (stable order), split_summary.csv and the rendering and
atomic writing of every table, the manifest last."""

import json

import pandas as pd

from orbital_clip import outputs
from orbital_clip.metadata import MANIFEST_COLUMNS
from orbital_clip.report.table1 import table1, table1_markdown
from orbital_clip.split.records import (ARGS_NAME, DUPLICATES_NAME, MANIFEST_NAME, REJECTED_NAME,
                                        SPLITS, SUMMARY_NAME, TABLE1_CSV_NAME, TABLE1_MD_NAME)

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


def summary_bucket(manifest):
    """Each image's column in the split tables: its split, or with --folds "fold k" (test: test)."""
    bucket = manifest["split"]
    if "fold" in manifest.columns:
        bucket = bucket.where(manifest["fold"] == "", "fold " + manifest["fold"])
    return bucket


def with_table1(tables, manifest, folders, columns, metadata_columns, style):
    """`tables` with table1.csv and table1.md (report.table1: by split or fold, the --metadata
    columns as characteristics) inserted before the manifest, which stays last."""
    frame = manifest.assign(split=summary_bucket(manifest))
    table = table1(frame, folders, "split", metadata_columns, style, strata=columns)
    note = ("Patients are the manifest's groups (each image its own group when the split was not "
            "grouped); an attribute counts each patient once per column.")
    text = "\n".join(["# Table 1: the cohort by split", "", *table1_markdown(table, "split", note)]) + "\n"
    out = {name: body for name, body in tables.items() if name != MANIFEST_NAME}
    out[TABLE1_CSV_NAME] = table.to_csv(index=False, lineterminator="\n")
    out[TABLE1_MD_NAME] = text
    out[MANIFEST_NAME] = tables[MANIFEST_NAME]
    return out


def split_summary(manifest, folders, columns):
    """Images per class and split (or fold: columns "fold k") with totals, plus a last row of
    groups per split."""
    bucket = summary_bucket(manifest)
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
        outputs.atomic_write_text(out_dir / name, text)
