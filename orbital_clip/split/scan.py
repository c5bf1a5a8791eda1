"""Finding and reading the cohort: class folders or a --labels CSV, sidecar files, each file read
and hashed once (or rejected with its reason), and the --metadata attributes of each image."""

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

from orbital_clip import cohort
from orbital_clip import images
from orbital_clip.metadata import RESERVED_COLUMNS, normalise_relpath, read_metadata
from orbital_clip.split.duplicates import perceptual_hashes
from orbital_clip.split.records import LOG, REJECTED_NAME, SPLITS, ImageCheck, ImageRecord, SplitError

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
    items, unknown = cohort.list_class_folder_images(root, folders)
    if out_dir.resolve().parent == root.resolve():  # an --out-dir inside the data root is ours
        unknown = [name for name in unknown if name != out_dir.name]
    report_excluded_folders(root, exclude, unknown)
    unknown = [name for name in unknown if name not in exclude]
    if unknown:
        raise SplitError(f"--data-root {root}: folder(s) {', '.join(repr(u) for u in unknown)} "
                         f"are not classes{cohort.did_you_mean_clause(unknown, folders)}; expected "
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
                        cohort.did_you_mean_clause([name], unknown))


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
                             f"{cohort.did_you_mean_clause([column], list(frame.columns))}; its "
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
                         + f" are not classes{cohort.did_you_mean_clause(names, folders)}; the "
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
    unlisted = [p for p in sorted(root.rglob("*")) if p.is_file() and images.is_candidate_image(p)
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
            if not path.is_file() or images.is_candidate_image(path) or images.is_junk_file(path):
                continue
            if path.suffix.lower() in images.SIDECAR_EXTENSIONS:
                sidecars[(path.parent, path.stem)].append(path)
            else:
                others.append(path)
    return sidecars, others


def scan_flat_sidecars(paths):
    """Sidecar files beside the listed images (--labels layout), indexed by (folder, stem)."""
    sidecars = defaultdict(list)
    for folder in sorted({path.parent for path in paths}):
        for path in sorted(folder.iterdir()):
            if (path.is_file() and path.suffix.lower() in images.SIDECAR_EXTENSIONS
                    and not images.is_junk_file(path)):
                sidecars[(path.parent, path.stem)].append(path)
    return sidecars, []


def check_image(path):
    """An ImageCheck: hashes and size of a readable image, or the reason it is not one.

    The image decoded for validation (a full decode: what passes here decodes in training too)
    is the one hashed, so each file is decoded once.
    """
    try:
        image = images.read_image(path)
        phash, phash_fine = perceptual_hashes(image)
        return ImageCheck(images.file_sha256(path), phash, phash_fine, image.size)
    except images.ImageReadError as err:
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


def read_metadata_rows(path):
    """(header, key column, {key: row}) of a --metadata CSV keyed by `path` (relative to
    --data-root) or `file` (file name); SplitError naming the file and row when malformed."""
    where = f"--metadata {path}"
    try:
        table = read_metadata(path, where)
    except ValueError as err:
        raise SplitError(str(err)) from None
    header, key = table.header, table.key
    if key is None:
        raise SplitError(f"{where}: needs a 'path' column (relative to --data-root) or a 'file' "
                         f"column of file names; has {header}")
    taken = [c for c in header if c != key and c in RESERVED_COLUMNS]
    if taken:
        raise SplitError(f"{where}: column {taken[0]!r} is a manifest column; rename it")
    if table.duplicate:
        line, cell, _first = table.duplicate
        raise SplitError(f"{where}: row {line}: {key} {cell!r} appears twice")
    return header, key, {cell: row for cell, (_line, row) in table.rows.items()}


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
