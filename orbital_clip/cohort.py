"""Cohorts: a folder per class or a manifest.csv written by data_preprocess.py; patient groups,
did-you-mean for misspelt folders, and the dataset that reads a cohort's images."""

import csv
from pathlib import Path, PurePosixPath

from orbital_clip import images

SPLIT_NAMES = ("train", "val", "test")


class CohortError(ValueError):
    """A cohort folder or manifest that cannot be used; the message names the path."""


def edit_distance(a, b):
    """Edits (insert, delete, substitute, swap two neighbours) that turn a into b.

    Optimal string alignment, written here because difflib's similarity ratio is not an edit
    count, and "one typo away" is what a did-you-mean needs; names are short, so O(len^2) is fine.
    """
    previous2, previous = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def did_you_mean(name, choices):
    """The choice that `name` probably meant: equal ignoring case, or one edit away from it
    (case ignored); the closest such choice (first on ties), or None."""
    lowered = name.casefold()
    scored = [(edit_distance(lowered, choice.casefold()), index, choice)
              for index, choice in enumerate(choices)]
    close = [entry for entry in scored if entry[0] <= 1]
    return min(close)[2] if close else None


def did_you_mean_clause(names, choices):
    """" (did you mean 'x'?)" for those of `names` close to a choice (else "")."""
    hints = [(name, did_you_mean(name, choices)) for name in names]
    hints = [(name, guess) for name, guess in hints if guess is not None and guess != name]
    if not hints:
        return ""
    if len(names) == 1:
        return f" (did you mean {hints[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{guess!r} for {name!r}" for name, guess in hints) + "?)"


def list_class_folder_images(root, folders):
    """Files under root/<folder>/ for each known class folder, in sorted order.

    Returns:
        items: list of (path, class_index), every candidate file (`images.is_candidate_image`: any
            extension; unreadable ones included, so callers can account for them; files in
            hidden folders left out);
        unknown: names of sub-folders of root that are not classes (split folders excluded).
    """
    root = Path(root)
    if not root.is_dir():
        raise CohortError(f"{root}: no such folder")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in present if name not in folders and name not in SPLIT_NAMES]
    items = []
    for index, folder in enumerate(folders):
        class_dir = root / folder
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            if path.is_file() and not hidden and images.is_candidate_image(path):
                items.append((path, index))
    return items, unknown


def regex_group(relative_path, pattern):
    """(group, where matched) for a --group-regex: the first capture group of the compiled
    `pattern` searched in the path relative to the data root ('orbital disease/Patient 001/
    IMG_0002.JPG'), where="path"; else in the file name alone, where="file name" (so a regex
    anchored for file names, '^(P\\d+)_', keeps working); (None, None) when neither matches."""
    name = relative_path.rsplit("/", 1)[-1]
    for where, text in (("path", relative_path), ("file name", name)):
        match = pattern.search(text)
        if match and match.group(1):
            return match.group(1), where
    return None, None


STEM_GROUPS_REASON = ("its group column holds file stems (written by an older data_preprocess.py "
                      "without a grouping flag), not patients; for a patient-level bootstrap "
                      "rewrite the manifest with a grouping flag or pass --group-regex")


def manifest_patient_groups(rows):
    """(group per row, None) when a manifest's `group` column names patient groups, else
    (None, reason): no column or all empty; no group holding two rows (each image is its own
    group: data_preprocess.py without a grouping flag writes the image's path there); or every
    group the file stem of its source, which data_preprocess.py wrote without a grouping flag
    before it wrote paths: camera names (IMG_0001.JPG) repeat in every patient folder, so
    those stems would join unrelated patients into fake groups."""
    groups = [(row.get("group") or "").strip() for row in rows]
    if not any(groups):
        return None, "its group column is missing or empty"
    stems = [PurePosixPath((row.get("source") or "").replace("\\", "/")).stem for row in rows]
    if all(row.get("source") for row in rows) and groups == stems:
        return None, STEM_GROUPS_REASON
    if len(set(groups)) == len(groups):
        return None, "each image is its own group"
    return groups, None


def read_manifest(manifest_path, split, folders, fold=None):
    """(path, class_index) rows of one split of a manifest.csv; paths resolved next to it.

    With `fold=k` (a manifest written with `data_preprocess.py --folds K`, where every non-test
    image has split 'train' and a fold 0..K-1): split 'train' gives the rows of the other folds,
    split 'val' the rows of fold k, split 'test' the test rows as usual.
    """
    manifest_path = Path(manifest_path)
    base = manifest_path.parent
    with open(manifest_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise CohortError(f"{manifest_path}: missing column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    if fold is not None:
        rows = _rows_of_fold(manifest_path, rows, split, fold)
    else:
        rows = [row for row in rows if row["split"] == split]
    items = []
    for row in rows:
        if row["label"] not in folders:
            raise CohortError(f"{manifest_path}: label {row['label']!r} is not one of the "
                              f"classes {folders}")
        items.append((base / row["path"], folders.index(row["label"])))
    return items


def _rows_of_fold(manifest_path, rows, split, fold):
    """Cross-validation view of manifest rows: see `read_manifest`."""
    if rows and "fold" not in rows[0]:
        raise CohortError(f"{manifest_path}: has no 'fold' column; write one with "
                          "data_preprocess.py --folds K")
    if split == "test":
        return [row for row in rows if row["split"] == "test"]
    pool = [row for row in rows if row["split"] == "train" and row.get("fold", "") != ""]
    try:
        folds = [int(row["fold"]) for row in pool]
    except ValueError:
        raise CohortError(f"{manifest_path}: the 'fold' column holds a value that is not an "
                          "integer") from None
    n_folds = max(folds) + 1 if folds else 0
    if not 0 <= fold < n_folds:
        raise CohortError(f"{manifest_path}: fold {fold} is out of range; it has "
                          + (f"folds 0..{n_folds - 1}" if n_folds else "no fold assignments"))
    keep_own = split == "val"
    return [row for row, k in zip(pool, folds) if (k == fold) == keep_own]


def load_labelled_items(spec, folders, split, fold=None):
    """Labelled images from a class-folder directory or a manifest.csv (rows of `split`; with
    `fold=k` the cross-validation rows, see `read_manifest`, which needs a manifest)."""
    spec = Path(spec)
    if spec.is_file() and spec.suffix.lower() == ".csv":
        items = read_manifest(spec, split, folders, fold)
        where = f"{spec} (split {split!r}" + (f", fold {fold})" if fold is not None else ")")
    else:
        if fold is not None:
            raise CohortError(f"{spec}: a fold needs a manifest.csv written by "
                              "data_preprocess.py --folds K, not a folder")
        items, unknown = list_class_folder_images(spec, folders)
        if unknown:
            raise CohortError(f"{spec}: folder(s) {', '.join(repr(u) for u in unknown)} are not "
                              f"classes{did_you_mean_clause(unknown, folders)}; expected {folders} "
                              "(use --prompts to define other classes)")
        where = str(spec)
    if not items:
        raise CohortError(f"{where}: no images found in the class folders {folders}")
    return items


# ----------------------------------------------------------------------------------------------
# Datasets


class ImageListDataset:
    """(path, label) items -> (image tensor, label, index, ok). A failed read yields a zero
    image and ok=False, so batches never shift rows; `failures` maps index -> reason in the
    main process only when workers=0, so callers re-check failed rows (see `read_failures`).
    A map-style dataset (__len__, __getitem__), which is all DataLoader needs: not a subclass of
    torch's Dataset, so that listing a cohort (score_answers.py) does not load torch."""

    def __init__(self, items, transform, min_side_px=None, image_shape=None):
        self.items = list(items)
        self.transform = transform
        self.min_side_px = min_side_px
        self.image_shape = image_shape

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        try:
            tensor = self.transform(images.read_image(path, self.min_side_px))
            return tensor, label, index, True
        except images.ImageReadError:
            import torch  # only where images become tensors (see the class docstring)
            return torch.zeros(self.image_shape), label, index, False


def read_failures(items, indices):
    """Reason for each failed index (re-reads only the failures, so it works with workers)."""
    reasons = {}
    for index in indices:
        try:
            images.read_image(items[index][0])
            reasons[index] = "unreadable image"
        except images.ImageReadError as err:
            reasons[index] = str(err)
    return reasons
