"""Writing the split folders: the destination checks, placing files (copy, hardlink, symlink,
move), --resize-px copies, and --mode move's journal with its resume and rollback."""

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from orbital_clip import images
from orbital_clip import outputs
from orbital_clip.split.manifest import write_tables
from orbital_clip.split.records import (ARGS_NAME, JOURNAL_FORMAT, JOURNAL_NAME, LOG, MOVE_LOG_NAME,
                                        OUTPUT_FILES, SPLITS, SplitError)

RESIZE_JPEG_QUALITY = 95


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
        image = images.read_image(source, min_side_px=resize_px)
    except images.ImageReadError as err:
        raise SplitError(f"{source}: became unreadable since validation ({err})") from None
    image = image.resize(resized_size(image.size, resize_px), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if target.suffix.lower() in (".jpg", ".jpeg"):
        image.save(buffer, "JPEG", quality=RESIZE_JPEG_QUALITY, subsampling=0)
    else:
        image.save(buffer, "PNG")
    data = buffer.getvalue()
    outputs.atomic_write(target, lambda handle: handle.write(data))
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
    outputs.atomic_write_text(path, "\n".join(lines) + "\n")
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
    return images.file_sha256(a) == images.file_sha256(b)


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
            outputs.atomic_write(target, lambda handle: shutil.copyfileobj(original, handle))
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
