"""Per-image metadata CSV files (--metadata of data_preprocess.py and inference.py): the one
reader, the columns a manifest keeps for itself, and the one rule that turns a user-written path
cell into the posix relative path the manifest and predictions.csv use."""

import csv
from dataclasses import dataclass
from pathlib import PurePosixPath

MANIFEST_COLUMNS = ["path", "source", "label", "split", "group", "sha256"]
# The manifest's own columns, never patient attributes (--metadata may not reuse them).
RESERVED_COLUMNS = frozenset({*MANIFEST_COLUMNS, "fold", "resized_px", "sha256_written"})
KEY_COLUMNS = ("path", "file")  # a metadata row names its image by path (preferred) or file name
EXPECTED_HEADER = "path or file and the attributes"


@dataclass
class MetadataRows:
    """A --metadata CSV keyed by its `key` column (None: it has neither key column)."""

    header: list  # column names, stripped
    key: str | None  # "path" (relative to the data root) or "file" (a file name)
    rows: dict  # {key cell, normalised: (line number, {column: cell})}, the first of each
    duplicate: tuple | None  # (line, key cell, line of its first row) of the first repeated key

    def attributes(self):
        """The columns that describe the images (all but the key columns)."""
        return [c for c in self.header if c not in KEY_COLUMNS]


def normalise_relpath(text):
    """A user-written relative path as the manifest and predictions.csv write it: forward
    slashes, no leading './', no doubled or trailing '/', no padding ('' stays '')."""
    text = str(text).strip().replace("\\", "/")
    return PurePosixPath(text).as_posix() if text else ""


def read_csv_rows(path, where, expected="path and pred_label"):
    """(header, [(line number, {column: cell})]) of a CSV file (an answer file, or --metadata);
    ValueError naming `where` and the row when malformed; `expected`: the header it needs."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise ValueError(f"{where}: row 1: empty file (expected a header with {expected})")
            header = [cell.strip() for cell in header]
            if len(set(header)) != len(header):
                raise ValueError(f"{where}: row 1: a column name appears twice")
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # a blank line, e.g. a trailing newline
                if len(cells) != len(header):
                    raise ValueError(f"{where}: row {reader.line_num}: {len(cells)} fields, the "
                                     f"header has {len(header)} (a malformed CSV)")
                rows.append((reader.line_num, dict(zip(header, cells))))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{where}: not a readable UTF-8 CSV ({err})") from None
    if not rows:
        raise ValueError(f"{where}: row 2: no data rows")
    return header, rows


def read_metadata(path, where):
    """The --metadata CSV `path` keyed by its `path` column (normalised) or else its `file` column
    (stripped). ValueError naming `where` and the row when the CSV is malformed; a missing key
    column or a repeated key is reported in the result, for the caller to word."""
    header, lines = read_csv_rows(path, where, EXPECTED_HEADER)
    key = next((k for k in KEY_COLUMNS if k in header), None)
    rows, duplicate = {}, None
    for line, row in lines if key else ():
        cell = normalise_relpath(row[key]) if key == "path" else row[key].strip()
        if cell in rows:
            duplicate = duplicate or (line, cell, rows[cell][0])
            continue
        rows[cell] = (line, row)
    return MetadataRows(header, key, rows, duplicate)
