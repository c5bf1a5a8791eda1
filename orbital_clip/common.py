"""What the three scripts must agree on: image reading, cohort listing, checkpoints, device and
precision, model creation and the zero-shot classifier. Nothing else belongs here.
"""

import contextlib
import copy
import csv
import hashlib
import importlib
import io
import dataclasses
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
DICOM_EXTENSIONS = {".dcm", ".dicom"}
SIDECAR_EXTENSIONS = {".txt", ".json", ".xml"}
# Notes and tables beside the images: never read as images, never counted (the sidecars above are
# also copied with their image by data_preprocess.py; a .csv is not).
NOT_IMAGE_EXTENSIONS = SIDECAR_EXTENSIONS | {".csv"}
UNSUPPORTED_FORMAT = "unsupported format"  # the reason of a file no reader recognises, e.g. .heic
UNRECOGNISED = "not an image (unrecognised content)"  # ... with a listed extension (.jpg) or none
JUNK_NAMES = {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", ".localized", "icon\r"}
SPLIT_NAMES = ("train", "val", "test")
# Pillow's own bomb limit (~179 MP) is a warning until 2x; we refuse at the limit itself.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 178_956_970
CHECKPOINT_FORMAT = "orbital-clip/1"
# Model names open_clip reads from elsewhere: a Hugging Face Hub repository or a local folder.
MODEL_SCHEMAS = ("hf-hub", "local-dir")


class ImageReadError(Exception):
    """An image that cannot be used; str(err) is the reason written to rejected/predictions."""


# ----------------------------------------------------------------------------------------------
# Image reading


def is_os_metadata_file(path):
    """OS metadata files that are never images (.DS_Store, Thumbs.db, AppleDouble ._*)."""
    name = Path(path).name
    return name.lower() in JUNK_NAMES or name.startswith("._")


def is_junk_file(path):
    """A file no script lists or counts: OS metadata and hidden files (a name starting with .)."""
    return is_os_metadata_file(path) or Path(path).name.startswith(".")


def is_candidate_image(path):
    """A file every script lists as an image: anything but junk and notes (.txt, .json, .xml,
    .csv), whatever its extension. It is read by its content (a .jfif is a JPEG, a .webp is read
    by Pillow); one that no reader recognises fails with `unsupported format (.heic)` and is
    reported (a failed row, rejected.csv, a warning), never silently dropped."""
    return not is_junk_file(path) and Path(path).suffix.lower() not in NOT_IMAGE_EXTENSIONS


def has_listed_extension(path):
    """A known image or DICOM extension, or none at all."""
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS or suffix == ""


def unsupported_format_files(paths):
    """The files among `paths` that `read_image` rejects as an unsupported format: an extension
    outside the listed ones and content that neither Pillow nor pydicom recognises (each such
    file is read once; files with a listed extension are not opened)."""
    found = []
    for path in paths:
        if has_listed_extension(path):
            continue
        try:
            read_image(path)
        except ImageReadError as err:
            if str(err).startswith(UNSUPPORTED_FORMAT):
                found.append(path)
    return found


def read_image(path, min_side_px=None):
    """Read any supported image as an 8-bit RGB PIL image, or raise ImageReadError(reason).

    Every failure is an ImageReadError whose str() is a short reason (never another exception
    type, never a partly filled image). Pillow formats: EXIF orientation applied; 16-bit and
    float greyscale min-max rescaled (not clipped); transparency composited on white; CMYK,
    palette and grey converted. With `min_side_px`, JPEGs are decoded in draft mode at the
    smallest DCT scale whose shorter side is still >= min_side_px (several times faster on camera
    photographs; the model resizes afterwards anyway). DICOM: see `_read_dicom`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageReadError(f"cannot open file ({err.strerror or type(err).__name__})") from None
    if size == 0:
        raise ImageReadError("empty file (0 bytes)")
    if is_os_metadata_file(path):
        raise ImageReadError("operating-system metadata file, not an image")
    try:
        if path.suffix.lower() in DICOM_EXTENSIONS or _looks_like_dicom(path):
            return _read_dicom(path)
        return _read_pillow(path, min_side_px)
    except ImageReadError as err:
        if str(err) == UNRECOGNISED and not has_listed_extension(path):  # e.g. a phone .heic
            raise ImageReadError(f"{UNSUPPORTED_FORMAT} ({path.suffix.lower()})") from None
        raise
    except OSError as err:
        raise ImageReadError(f"cannot read file ({err.strerror or type(err).__name__})") from None
    except MemoryError:
        raise ImageReadError("image too large to decode in memory") from None


def _looks_like_dicom(path):
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_pillow(path, min_side_px):
    # Pillow keeps these as globals; make sure no other code relaxed them for us.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_pixel_count(image.width, image.height)
                if min_side_px and image.format == "JPEG":
                    scale = min(image.width, image.height) / float(min_side_px)
                    if scale >= 2:
                        image.draft("RGB", (image.width / scale, image.height / scale))
                image.load()
                return _to_rgb(_apply_exif_orientation(image))
        except ImageReadError:
            raise
        except UnidentifiedImageError:
            raise ImageReadError(UNRECOGNISED) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(f"decompression bomb: {err}") from None
        except MemoryError:
            raise ImageReadError("image too large to decode in memory") from None
        except Exception as err:  # noqa: BLE001 - damaged files raise many types inside Pillow
            message = _short(str(err)) or type(err).__name__
            if "truncated" in message.lower() or isinstance(err, EOFError):
                raise ImageReadError(f"truncated image ({message})") from None
            raise ImageReadError(f"corrupt image ({type(err).__name__}: {message})") from None


def _short(text, limit=160):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_pixel_count(width, height, frames=1):
    if width * height * frames > MAX_IMAGE_PIXELS:
        raise ImageReadError(f"decompression bomb: {width}x{height} pixels"
                             + (f" x {frames} frames" if frames > 1 else "")
                             + f" exceeds the {MAX_IMAGE_PIXELS} pixel limit")


def _apply_exif_orientation(image):
    """EXIF orientation applied; a damaged EXIF block leaves the image as stored (as viewers do)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises many types on bad tags
        return image


def _to_rgb(image):
    """Any Pillow mode to 8-bit RGB, rescaling wide ranges instead of clipping them."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim != 2:
            raise ImageReadError(f"unsupported image mode {image.mode}")
        return Image.fromarray(_rescale_to_uint8(array)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite on a fixed white background so transparent pixels have a defined colour.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # LAB, HSV and other modes Pillow cannot convert directly
        raise ImageReadError(f"unsupported image mode {image.mode}") from None


def _rescale_to_uint8(array, low=None, high=None):
    """Linear map of [low, high] (default: the finite min and max) onto 0..255, clipped; a
    constant image maps to 0. NaN and infinities take the nearest finite extreme."""
    array = np.asarray(array, dtype=np.float64)
    finite = np.isfinite(array)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    low = float(array[finite].min()) if low is None else float(low)
    high = float(array[finite].max()) if high is None else float(high)
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    array = np.nan_to_num(array, nan=low, posinf=high, neginf=low)
    scaled = (np.clip(array, low, high) - low) * (255.0 / (high - low))
    return np.round(scaled).astype(np.uint8)


# DICOM. Privacy: a DICOM header holds names, IDs and dates, and pydicom's own warnings and
# exception messages can quote header values. Reasons built here therefore name only exception
# types, pydicom's decoder/package names and the transfer syntax; pydicom's value validation and
# its logger are silenced (see _quiet_pydicom).
DICOM_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                     "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
DICOM_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read_dicom(path):
    """A DICOM file to RGB, or ImageReadError with a reason free of header values.

    Monochrome: modality LUT (rescale slope/intercept or LUT), then the first VOI LUT or window
    (its output range mapped onto 0..255; without one, the min-max of the modality values), and
    MONOCHROME1 inverted so that bright means dense everywhere. Multi-frame files: only the middle
    frame (index NumberOfFrames // 2) is decoded and used. Compressed transfer syntaxes decode when
    pydicom has a plugin for them installed (Pillow covers baseline JPEG and JPEG 2000); otherwise
    the reason names the syntax and the packages that would decode it.
    """
    pydicom = _quiet_pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
        try:
            dataset = pydicom.dcmread(str(path))
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for damaged files
            raise ImageReadError(f"not a readable DICOM file ({type(err).__name__})") from None
        try:
            if not any(keyword in dataset for keyword in DICOM_PIXEL_KEYWORDS):
                raise ImageReadError("DICOM file has no pixel data")
            pixels = _decode_dicom_frame(dataset)
            return _dicom_pixels_to_rgb(pixels, dataset)
        except ImageReadError:
            raise
        except MemoryError:
            raise ImageReadError("DICOM image too large to decode in memory") from None
        except Exception as err:  # noqa: BLE001 - damaged headers fail in many places
            raise ImageReadError(f"cannot convert DICOM pixel data to an image "
                                 f"({type(err).__name__})") from None


def _quiet_pydicom():
    """Import pydicom with value validation off and its logger silenced (messages can quote
    patient names, IDs and dates); returns the module."""
    try:
        import pydicom
        import pydicom.config
    except ImportError as err:  # pragma: no cover - pydicom is in requirements.txt
        raise ImageReadError(f"DICOM support needs pydicom ({type(err).__name__})") from None
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    return pydicom


def _dicom_syntax_name(dataset):
    """The transfer syntax's registered name, or a generic phrase (never free header text)."""
    from pydicom.uid import UID_dictionary
    uid = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "(none given)"
    if uid in UID_dictionary:
        return UID_dictionary[uid][0]
    return f"UID {uid}" if getattr(uid, "is_valid", False) else "(unrecognised UID)"


def _decode_dicom_frame(dataset):
    """The pixel array of the one frame we use: (rows, cols) or (rows, cols, samples)."""
    from pydicom.pixels import get_decoder, pixel_array
    if dataset.get("Rows") is None or dataset.get("Columns") is None:
        raise ImageReadError("DICOM pixel data without Rows/Columns")
    rows, cols = int(dataset.Rows), int(dataset.Columns)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    _check_pixel_count(cols, rows)
    syntax = _dicom_syntax_name(dataset)
    uid = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        raise ImageReadError("DICOM file does not state its transfer syntax (no file meta "
                             "information), so its pixel data cannot be decoded")
    decoder = None
    if "PixelData" in dataset:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise ImageReadError(f"cannot decode DICOM pixel data: transfer syntax {syntax} is "
                                 "not supported by pydicom") from None
        if not decoder.is_available:
            raise ImageReadError(
                f"cannot decode DICOM pixel data: no decoder for transfer syntax {syntax} is "
                f"installed; install one of: {'; '.join(decoder.missing_dependencies)}")
    try:
        pixels = pixel_array(dataset, index=frames // 2 if frames > 1 else None)
    except Exception as err:  # noqa: BLE001 - decoders raise many types on damaged data
        others = decoder.missing_dependencies if decoder is not None else []
        hint = f"; other decoders: {'; '.join(others)}" if others else ""
        raise ImageReadError(f"cannot decode DICOM pixel data (transfer syntax {syntax}: "
                             f"{type(err).__name__}; truncated or corrupt data, or a variant the "
                             f"installed decoder does not handle{hint})") from None
    return np.asarray(pixels)


def _dicom_pixels_to_rgb(pixels, dataset):
    """One decoded frame to an RGB image (pydicom has already turned YBR into RGB)."""
    from pydicom.pixels import apply_color_lut
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2") and pixels.ndim == 2:
        grey = _dicom_grey(pixels, dataset)
        if photometric == "MONOCHROME1":  # stored inverted: low values are bright
            grey = 255 - grey
        return Image.fromarray(grey).convert("RGB")
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        rgb = np.asarray(apply_color_lut(pixels, dataset))
        top = 255 if rgb.dtype == np.uint8 else 65535
        return Image.fromarray(_rescale_to_uint8(rgb, 0, top), mode="RGB")
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and photometric in DICOM_PHOTOMETRIC:
        if pixels.dtype != np.uint8:
            bits = int(dataset.get("BitsStored", 8) or 8)
            pixels = _rescale_to_uint8(pixels, 0, 2 ** min(max(bits, 1), 32) - 1)
        return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    shown = photometric if photometric in DICOM_PHOTOMETRIC else "(unrecognised value)"
    raise ImageReadError(f"unsupported DICOM image: photometric interpretation {shown} with "
                         f"pixel array of {pixels.ndim} dimension(s)")


def _dicom_grey(pixels, dataset):
    """Modality LUT, then VOI LUT/window, as uint8 (see `_read_dicom`)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    has_window = None not in (dataset.get("WindowCenter"), dataset.get("WindowWidth"))
    if not (has_window or dataset.get("VOILUTSequence")):
        return _rescale_to_uint8(values)
    try:
        with np.errstate(all="ignore"):
            shown = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
            # The VOI's output range: what the extremes of any input map to.
            extremes = apply_voi_lut(np.array([-1e30, 1e30]), dataset)
            low, high = np.asarray(extremes, dtype=np.float64)
    except Exception:  # noqa: BLE001 - an unusable window (width < 1, bad LUT): min-max instead
        return _rescale_to_uint8(values)
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return _rescale_to_uint8(shown)
    return _rescale_to_uint8(shown, low, high)


def file_sha256(path, chunk_bytes=1 << 20):
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(spec):
    """{resolved path: SHA-256} of a manifest.csv's sha256 column ({} for a folder or a
    manifest without the column): digests data_preprocess.py already computed."""
    spec = Path(spec)
    if not (spec.is_file() and spec.suffix.lower() == ".csv"):
        return {}
    with open(spec, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {(spec.parent / row["path"]).resolve(): row["sha256"]
            for row in rows if row.get("path") and row.get("sha256")}


def overlapping_images(paths_a, paths_b, known_sha256=None):
    """(a, b) pairs of paths_a x paths_b that are the same image: the same file (resolved path,
    so symlinks count) or the same bytes (SHA-256; a copy or hard link in another split folder).

    Only files whose byte size occurs on both sides are hashed, so two disjoint cohorts cost
    a stat per file. `known_sha256` ({resolved path: digest}, e.g. `manifest_sha256`) is used
    instead of reading those files. Unreadable files are skipped (the loaders report them).
    """
    known = dict(known_sha256 or {})

    def digest(path):
        if path not in known:
            known[path] = file_sha256(path)
        return known[path]

    def size(path):
        try:
            return path.stat().st_size
        except OSError:
            return None

    b_by_path = {}
    for path in paths_b:
        b_by_path.setdefault(Path(path).resolve(), path)
    b_by_size = {}
    for resolved in b_by_path:
        b_by_size.setdefault(size(resolved), []).append(resolved)
    b_by_size.pop(None, None)
    pairs = []
    for path in paths_a:
        resolved = Path(path).resolve()
        if resolved in b_by_path:
            pairs.append((path, b_by_path[resolved]))
            continue
        candidates = b_by_size.get(size(resolved), [])
        try:
            match = next((b for b in candidates if digest(b) == digest(resolved)), None)
        except OSError:
            continue
        if match is not None:
            pairs.append((path, b_by_path[match]))
    return pairs


# ----------------------------------------------------------------------------------------------
# Cohorts: a folder per class, or a manifest.csv written by data_preprocess.py


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
        items: list of (path, class_index), every candidate file (`is_candidate_image`: any
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
            if path.is_file() and not hidden and is_candidate_image(path):
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


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) items -> (image tensor, label, index, ok). A failed read yields a zero
    image and ok=False, so batches never shift rows; `failures` maps index -> reason in the
    main process only when workers=0, so callers re-check failed rows (see `read_failures`)."""

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
            tensor = self.transform(read_image(path, self.min_side_px))
            return tensor, label, index, True
        except ImageReadError:
            return torch.zeros(self.image_shape), label, index, False


def read_failures(items, indices):
    """Reason for each failed index (re-reads only the failures, so it works with workers)."""
    reasons = {}
    for index in indices:
        try:
            read_image(items[index][0])
            reasons[index] = "unreadable image"
        except ImageReadError as err:
            reasons[index] = str(err)
    return reasons


def seed_worker(worker_id):
    """DataLoader worker_init_fn: derive numpy/random seeds from torch's per-worker seed."""
    import random
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_workers(device=None, local_world_size=1):
    """DataLoader workers for `device` ("cuda", "cpu", a torch.device; None = cuda when available)
    per process, with `local_world_size` processes on this node (torchrun's LOCAL_WORLD_SIZE).

    On a GPU the model is fast and decoding decides throughput: the node's cores shared among
    its processes, one worker per core beyond each main process, at most 8. On the CPU the
    model's own threads already use every core, and a worker only takes cores from it (plus fork
    and IPC cost): 0. Measured on 2 cores with
    pre-resized photographs (benchmarks/RESULTS.md): training end-to-end/model-only 0.97 with 0
    workers against 0.81 with 1.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(1, local_world_size) - 1))


# ----------------------------------------------------------------------------------------------
# Device, precision, model


def show_defaults(parser, unset=None):
    """Append ' (default: X)' to the help of every option that does not state it yet: X is the
    value ('off'/'on' for switches), or `unset[dest]` (else 'none') where the default is None
    because it is resolved later; required options get ' (required)'. argparse's own
    ArgumentDefaultsHelpFormatter would print 'None' for those and repeat stated defaults."""
    unset = unset or {}
    for action in parser._actions:
        if not action.help or action.dest == "help" or "(default:" in action.help:
            continue
        if action.required:
            action.help += " (required)"
            continue
        if "(default " in action.help and action.dest not in unset:  # stated in words already
            action.help = action.help.replace("(default ", "(default: ", 1)
            continue
        value = action.default
        if action.dest in unset:
            text = unset[action.dest]
        elif isinstance(value, bool):
            text = "on" if value else "off"
        elif value is None or value == []:
            text = "none"
        else:
            text = str(value)
        action.help += f" (default: {text.replace('%', '%%')})"  # help strings are %-formatted
    return parser


def configure_logging(level=logging.INFO):
    """Our loggers at `level`; open_clip's chatty root-logger INFO lines only as warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", force=True)
    for name in ("clip_train", "inference", "data_preprocess"):
        logging.getLogger(name).setLevel(level)


def resolve_device(name=None):
    """torch.device from a flag value; default cuda when available, else cpu."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def cpu_native_bf16():
    """The instruction set with which this CPU multiplies bf16 natively ("AMX", "AVX512-BF16"),
    or None, by torch's own checks. One small function so that tests can patch the hardware."""
    cpu = torch.cpu  # private checks, the ones torch's own CPU kernels dispatch on (torch 2.x)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve_precision(precision, device):
    """(precision, why): `auto` is bf16 where the device multiplies bf16 natively (CUDA with bf16
    support; a CPU with AMX or AVX512-BF16), else fp32; any other value is kept as given."""
    if precision != "auto":
        return precision, f"--precision {precision}"
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bf16", "CUDA with native bf16") if native else ("fp32", "CUDA without native bf16")
    if device.type == "cpu":
        isa = cpu_native_bf16()
        return ("bf16", f"CPU with {isa}") if isa else ("fp32", "CPU without AMX or AVX512-BF16")
    return "fp32", f"{device.type}: no native bf16 check"


def autocast_context(device, precision):
    """One autocast context per (device, precision); a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def register_model_config(config_path):
    """Register a custom open_clip architecture JSON under its file stem; returns (name, dict)."""
    config_path = Path(config_path)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not a readable model config ({err})") from None
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config:
            raise ValueError(f"{config_path}: model config lacks '{key}'")
    register_model_config_dict(config_path.stem, config)
    return config_path.stem, config


def register_model_config_dict(name, config):
    """Register an architecture dict (e.g. from a checkpoint) with open_clip; returns the name it
    is registered under: `name` itself, or `config_alias(name)` for an hf-hub:/local-dir: name."""
    import open_clip
    alias = config_alias(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{alias}.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        open_clip.add_model_config(path)
    return alias


def model_source(model_name):
    """'hf-hub', 'local-dir' or None: where open_clip reads the architecture `model_name` from."""
    for schema in MODEL_SCHEMAS:
        if str(model_name).startswith(f"{schema}:"):
            return schema
    return None


def config_alias(model_name):
    """A name open_clip can register an architecture under (it becomes a file stem): `model_name`
    itself, or for hf-hub:/local-dir: names a readable stem plus a hash of the full name."""
    if model_source(model_name) is None:
        return model_name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_.")[-60:]
    return f"{stem}-{hashlib.sha256(model_name.encode('utf-8')).hexdigest()[:8]}"


def close_model_names(name, names, n=3):
    """Up to n of `names` closest to `name` ('ViT-B/32' -> ['ViT-B-32', ...]): the paper and the
    OpenAI package write '/' where open_clip writes '-'; difflib's ratio ranks the rest."""
    import difflib
    wanted = name.replace("/", "-")
    by_case = {candidate.lower(): candidate for candidate in names}
    exact = [by_case[wanted.lower()]] if wanted.lower() in by_case else []
    close = difflib.get_close_matches(wanted, names, n=n, cutoff=0.75)
    return list(dict.fromkeys(exact + close))[:n]


def read_model_config(model_name):
    """The architecture dict of `model_name`: built-in or registered, a local-dir's
    open_clip_config.json, or an hf-hub repository's (from the Hugging Face cache, else
    downloaded). ValueError naming the model and the fix when there is none."""
    import open_clip
    source = model_source(model_name)
    if source is None:
        if model_name not in open_clip.list_models():
            close = close_model_names(model_name, open_clip.list_models())
            hint = f"; did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
            raise ValueError(f"unknown model {model_name!r}: not an open_clip architecture{hint} "
                             "(see open_clip.list_models(), use hf-hub:ORG/REPO or local-dir:PATH, "
                             "or pass --model-config)")
        return open_clip.get_model_config(model_name)
    if source == "local-dir":
        folder = Path(model_name[len("local-dir:"):])
        if not folder.is_dir():
            raise ValueError(f"{model_name}: no such folder")
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ValueError(f"{model_name}: the folder has no open_clip_config.json (a folder "
                             "downloaded from an open_clip hf-hub repository has one)")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{model_name}: {config_file.name} is not readable JSON ({err})") from None
    else:
        try:  # open_clip's own reader: the same file and cache lookup as its create_model
            config = open_clip.factory._get_hf_config(model_name[len("hf-hub:"):])
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types offline
            detail = _short(str(err).splitlines()[0] if str(err).strip() else type(err).__name__)
            raise ValueError(f"{model_name}: open_clip_config.json is neither in the Hugging Face "
                             f"cache nor downloadable ({detail}); download the repository once on "
                             "a connected machine (README: Offline use) or use local-dir:PATH") from None
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ValueError(f"{model_name}: open_clip_config.json lacks a model_cfg with embed_dim, "
                         "vision_cfg and text_cfg")
    return model_cfg


def local_dir_weights(model_name):
    """The weights file open_clip loads for a local-dir: model (its own pick, so a hash of it is a
    hash of what is loaded); a ValueError naming the folder when there is none."""
    import open_clip
    folder = Path(model_name[len("local-dir:"):])
    weights = open_clip.factory._find_checkpoint_in_dir(folder)
    if weights is None:
        raise ValueError(f"{model_name}: the folder holds no weights file (open_clip_model.safetensors, "
                         "open_clip_pytorch_model.bin, ...); copy the repository's weights file "
                         "beside open_clip_config.json")
    return Path(weights)


def check_optional_packages(model_name, model_config):
    """MissingPackageError naming the package when the architecture needs one that is not
    installed: transformers for a Hugging Face text tower (hf_model_name), timm for a timm image
    tower (timm_model_name)."""
    text_cfg, vision_cfg = model_config.get("text_cfg") or {}, model_config.get("vision_cfg") or {}
    needs = []
    if "hf_model_name" in text_cfg:
        needs.append(("transformers", f"its text tower is the Hugging Face model {text_cfg['hf_model_name']}"))
    if "timm_model_name" in vision_cfg:
        needs.append(("timm", f"its image tower is the timm model {vision_cfg['timm_model_name']}"))
    for package, why in needs:
        try:
            importlib.import_module(package)
        except ImportError:
            raise MissingPackageError(f"{model_name}: {why}, which needs the optional package "
                                      f"{package}; install it with: pip install -r "
                                      "requirements-hf.txt") from None


class MissingPackageError(ValueError):
    """An architecture needs an optional package that is not installed; names the package."""


def create_model(model_name, pretrained=None, device="cpu", model_config=None, preprocess_cfg=None):
    """open_clip model, train/val transforms and tokenizer.

    `model_name`: an open_clip architecture, or `hf-hub:ORG/REPO` / `local-dir:PATH` (architecture
    and weights from a Hub repository, or its copy in the Hugging Face cache, or from a folder).
    `pretrained`: an open_clip tag, a local weights file (ours or a plain state_dict), for a
    hub/folder model `model_name` itself (its own weights), or None (random initialisation).
    `model_config` and `preprocess_cfg` (recorded in our checkpoints) rebuild the architecture and
    its image preprocessing from those dicts alone: neither the hub nor the folder is read.
    """
    import open_clip
    source = model_source(model_name)
    config = model_config if model_config is not None else read_model_config(model_name)
    check_optional_packages(model_name, config)
    weights_file = pretrained if pretrained and Path(pretrained).is_file() else None
    own_weights = source is not None and pretrained == model_name
    if source is not None and pretrained and not (weights_file or own_weights):
        raise ValueError(f"{model_name} brings its own weights: pretrained takes none, a local "
                         f"weights file or {model_name}, not {pretrained!r}")
    if own_weights and model_config is not None:
        raise ValueError(f"{model_name}: its own weights are read from the source, not rebuilt "
                         "from a recorded config")
    arch = register_model_config_dict(model_name, model_config) if model_config is not None else model_name
    tag = None if (weights_file or source is not None) else pretrained
    # pretrained_text=False: a Hugging Face text tower is never filled from the Hub behind our back
    # (random init means random, and our own weights are loaded next).
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=tag, load_weights=own_weights or source is None, device=device,
        pretrained_text=False, **preprocess_overrides(preprocess_cfg))
    if weights_file:
        model.load_state_dict(load_state_dict_file(weights_file))
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess_train, preprocess_val, tokenizer


def pretrained_hub_files(model_name, tag):
    """(Hub repository, [weights file names, preferred first]) open_clip downloads for an
    open_clip pretrained tag, or None when the tag is fetched from a URL or is unknown."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    repo = (cfg.get("hf_hub") or "").strip("/")
    if not repo:
        return None
    weights = cfg.get("hf_weights_filename") or "open_clip_pytorch_model.bin"
    safe = [weights[:-4] + ".safetensors"] if weights.endswith((".bin", ".pth")) else []
    if weights == "open_clip_pytorch_model.bin":
        safe = ["open_clip_model.safetensors"]  # open_clip's own safetensors name for it
    return repo, safe + [weights]


def hub_unreachable(timeout_s=3.0):
    """Why the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE set, or no connection to its
    host within timeout_s), or None. Behind a proxy (HTTPS_PROXY) the direct probe says
    nothing, so the Hub counts as reachable."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as err:
        return f"no connection to {host} ({err.__class__.__name__})"
    return None


def offline_weights_problem(model_name, tag):
    """A one-line reason (naming the Hub repository and file, and the --pretrained PATH form)
    when the weights of an open_clip tag are neither cached nor downloadable, else None:
    decided in seconds, instead of open_clip's minute of download retries."""
    files = pretrained_hub_files(model_name, tag)
    if files is None:
        return None
    import huggingface_hub
    repo, names = files
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, name), str) for name in names):
        return None
    reason = hub_unreachable()
    if reason is None:
        return None
    return (f"the {model_name} weights of tag {tag} are not in the Hugging Face cache and the Hub "
            f"cannot be reached ({reason}); download {names[-1]} (or {names[0]}) from "
            f"https://huggingface.co/{repo} on a connected machine and pass --pretrained PATH/TO/"
            f"{names[-1]}, or copy that machine's Hugging Face cache here")


def preprocess_overrides(preprocess_cfg):
    """create_model_and_transforms keywords restoring a recorded model.visual.preprocess_cfg."""
    if not preprocess_cfg:
        return {}
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}
    return {keys[k]: tuple(v) if isinstance(v, list) else v
            for k, v in preprocess_cfg.items() if k in keys and v is not None}


def model_preprocess_cfg(model):
    """The model's open_clip image preprocessing (size, mean, std, interpolation, resize mode) as
    plain data for a checkpoint."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def model_image_size(model):
    """Input side in pixels of the model's image tower."""
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely; the message names the file."""


def clean_state_dict(state_dict):
    """Strip DDP `module.` prefixes and torch.compile `_orig_mod.` segments (a compiled tower
    puts it mid-key); tensors detached to CPU."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        key = key.replace("_orig_mod.", "")
        clean[key] = value.detach().cpu() if torch.is_tensor(value) else value
    return clean


def load_checkpoint_file(path):
    """torch.load with weights_only=True: a file that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            checkpoint = {"state_dict": load_file(str(path))}
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        for key, text in header.items():  # our metadata is JSON text; other writers' is kept as is
            try:
                checkpoint.setdefault(key, json.loads(text))
            except (TypeError, ValueError):
                checkpoint.setdefault(key, text)
        return checkpoint
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
    # torch.save writes a zip archive (PK), older versions a pickle (protocol byte 0x80); anything
    # else is no checkpoint, and torch's weights_only error for it would read as a security refusal.
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        what = "a JSON file" if head[:1] in (b"{", b"[") else "not a file torch.save wrote"
        raise CheckpointError(f"{path}: not a checkpoint ({what}); pass the .pt file clip_train.py "
                              "wrote (clip_model_epoch_best.pt), a safetensors file or an open_clip "
                              "state_dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"{path}: refused, it needs unpickling of objects other than "
                                  "tensors and plain data (possible code execution)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None


def load_weights_into(model, state_dict, source, model_name, arch_flag="--model-name"):
    """Load `state_dict` (from `source`, a path or label for messages) into `model`; a
    CheckpointError naming both when the weights do not fit the architecture `model_name`
    (`arch_flag` is the flag the message tells the user to fix)."""
    state_dict = clean_state_dict(state_dict)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(
            f"{source}: weights do not fit architecture {model_name} ({len(missing)} missing and "
            f"{len(unexpected)} unexpected keys, e.g. {example!r}); pass the {arch_flag} the "
            "weights were trained with")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:  # same keys, different shapes
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        detail = details[0][:240] if details else str(err)[:240]
        raise CheckpointError(f"{source}: weights do not fit architecture {model_name} ({detail})") from None


def load_state_dict_file(path):
    """The model weights in a checkpoint: ours ({'state_dict': ...}) or a plain state_dict."""
    return checkpoint_state_dict(load_checkpoint_file(path), path)


def checkpoint_state_dict(checkpoint, path):
    """The clean state_dict of a loaded checkpoint (ours, or a plain state_dict read from `path`)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(f"{path}: holds no model state_dict")
    return clean_state_dict(checkpoint)


def interpolate_state_dicts(base, tuned, alpha):
    """WiSE-FT weights (1 - alpha) * base + alpha * tuned (Wortsman et al. 2022); non-float
    entries are taken from `tuned`. Both dicts must hold the same keys and shapes."""
    if base.keys() != tuned.keys():
        missing = sorted(set(base) ^ set(tuned))[:3]
        raise CheckpointError(f"WiSE-FT: base and fine-tuned weights differ in keys (e.g. {missing})")
    mixed = {}
    for key, value in tuned.items():
        if base[key].shape != value.shape:
            raise CheckpointError(f"WiSE-FT: {key} has shape {tuple(base[key].shape)} in the base "
                                  f"and {tuple(value.shape)} in the fine-tuned weights")
        if value.is_floating_point():
            mixed[key] = (1.0 - alpha) * base[key].to(value.dtype) + alpha * value
        else:
            mixed[key] = value
    return mixed


def save_checkpoint(path, model, metadata):
    """Write {'state_dict', **metadata} atomically; metadata must be plain data."""
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": clean_state_dict(model.state_dict())}
    payload.update(metadata)
    atomic_write(path, lambda handle: torch.save(payload, handle))


def save_safetensors(path, model, metadata):
    """The weights alone as .safetensors (no pickle at all), with string metadata; open_clip
    loads it as `pretrained=path`."""
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    header = {k: json.dumps(v) for k, v in metadata.items()}
    data = save(tensors, metadata=header)
    atomic_write(path, lambda handle: handle.write(data))


# ----------------------------------------------------------------------------------------------
# Atomic outputs


class OutputWriteError(OSError):
    """An output that could not be written (read-only folder, full disk); names the path."""


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(handle) on a temp file beside `path`, then os.replace it into place: a crash
    or a failed write leaves the previous file as it was. Raises OutputWriteError naming `path`."""
    path = Path(path)
    try:
        _atomic_write(path, write_fn, mode)
    except OutputWriteError:
        raise
    except OSError as err:
        raise OutputWriteError(f"cannot write {path}: {err.strerror or err}") from None


def _atomic_write(path, write_fn, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, mode) as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path, frame):
    """A pandas DataFrame to CSV, atomically, without the index."""
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def atomic_save_figure(fig, path, **kwargs):
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), **kwargs)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


# ----------------------------------------------------------------------------------------------
# Run records: one args.json layout for the three scripts


def environment_info():
    """Package versions, platform, GPU and git commit, recorded next to every run."""
    import platform
    import subprocess

    import open_clip
    import scipy
    import sklearn
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__,
            "torch": torch.__version__, "open_clip": open_clip.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
        info["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def plain(value):
    """Records, args and metrics as JSON/weights_only-safe primitives (dataclasses and dicts as
    dicts, tuples as lists, paths and devices as text, numpy scalars as numbers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def hide_flag_values(argv, name, replacement):
    """argv with the value of the flag of argument `name` (--name-with-dashes, an abbreviation of
    it, as '--flag VALUE' or '--flag=VALUE') replaced; found by position, so another flag that
    happens to have the same value keeps its own."""
    flag = "--" + name.replace("_", "-")
    out, hide_next = [], False
    for token in argv:
        if hide_next:
            out.append(replacement)
            hide_next = False
            continue
        option, eq, _value = token.partition("=")
        # argparse accepts any unambiguous prefix of a flag ('--anonymize-s' for --anonymize-salt)
        if option.startswith("--") and len(option) > 2 and flag.startswith(option):
            if eq:
                token = option + "=" + replacement
            else:
                hide_next = True
        out.append(token)
    return out


def run_record(script, argv, args, run=None, hidden=None):
    """The args.json of every script, from which the run can be repeated:
    {script, cwd (the folder it ran in: relative paths in argv are relative to it), argv (the
    command-line arguments exactly as given), command (a shell line that repeats the run from
    cwd), args (every parsed argument, defaults included), environment, run (what the script
    adds)}.

    `hidden` maps an argument name to the text written instead of its value, in `args` and in
    `argv` (a secret salt, a path that must not be written); the name "cwd" hides the folder.
    """
    import shlex

    def primitive(value):  # numpy scalars as numbers; paths, torch.device and the rest as text
        return value.item() if isinstance(value, np.generic) else str(value)
    record_args = json.loads(json.dumps(vars(args), default=primitive))
    argv = [str(token) for token in argv]
    hidden = dict(hidden or {})
    cwd = hidden.pop("cwd", None) or os.getcwd()
    for name, replacement in hidden.items():
        if record_args.get(name) is None:
            continue
        record_args[name] = replacement
        argv = hide_flag_values(argv, name, replacement)
    return {"script": script, "cwd": cwd, "argv": argv,
            "command": shlex.join(["python", script, *argv]),
            "args": record_args, "environment": environment_info(),
            "run": json.loads(json.dumps(run, default=primitive))}


# ----------------------------------------------------------------------------------------------
# Zero-shot classifier


@torch.no_grad()
def build_zero_shot_classifier(model, tokenizer, prompt_lists, device):
    """(D, C) matrix of class embeddings: the mean of each class's normalised prompt embeddings.

    Written here rather than with open_clip's helper because classes carry prompt lists of
    different lengths, not one shared template list.
    """
    all_prompts = [p for prompts in prompt_lists for p in prompts]
    tokens = tokenizer(all_prompts).to(device)
    features = model.encode_text(tokens).float()
    features = features / features.norm(dim=-1, keepdim=True)  # (P, D)
    columns, start = [], 0
    for prompts in prompt_lists:
        mean = features[start:start + len(prompts)].mean(dim=0)
        columns.append(mean / mean.norm())
        start += len(prompts)
    return torch.stack(columns, dim=1)  # (D, C)


def zero_shot_logits(image_features, classifier, logit_scale):
    """Scaled cosine logits (N, C) from raw image features (N, D) and a (D, C) classifier."""
    image_features = image_features.float()
    image_features = image_features / image_features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return logit_scale * image_features @ classifier


def image_encoder(model, device, precision):
    """A function images (B, 3, H, W) -> raw image features (B, D) float32, for inference only.

    bf16 on the CPU runs a bf16 copy of the image tower: measured on ViT-B-32-256 (2-core CPU,
    benchmarks/RESULTS.md) 3-5x faster than fp32, while autocast under inference_mode measured
    slower than fp32. A copy, so the model itself (being trained, or reloaded for WiSE-FT) keeps
    its fp32 weights; CUDA keeps autocast.
    """
    if device.type == "cpu" and precision == "bf16":
        visual = getattr(model.visual, "_orig_mod", model.visual)  # unwrap a torch.compile wrapper
        # Cast while copying (a deepcopy memo of bf16 tensors), so no transient fp32 copy exists.
        memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in visual.parameters() if p.is_floating_point()}
        memo.update({id(b): b.detach().to(torch.bfloat16)
                     for b in visual.buffers() if b.is_floating_point()})
        visual_bf16 = copy.deepcopy(visual, memo).eval()
        # model.encode_image(x) is model.visual(x) (open_clip's CLIP and CustomTextCLIP)
        return lambda images: visual_bf16(images.to(device, torch.bfloat16)).float()

    def encode(images):
        with autocast_context(device, precision):
            return model.encode_image(images.to(device, non_blocking=True)).float()
    return encode


@torch.no_grad()
def encode_image_batches(model, loader, device, precision="fp32", progress=None):
    """Normalised image features for every row of an ImageListDataset loader.

    Returns:
        features: (N, D) float32 CPU tensor, zero rows where the image failed to read;
        ok: (N,) bool tensor, False where the image failed to read.
    Rows come back in dataset order whatever the loader's batching.
    """
    n_rows = len(loader.dataset)
    features, ok = None, torch.zeros(n_rows, dtype=torch.bool)
    encode = image_encoder(model, device, precision)
    for images, _labels, indices, good in (progress(loader) if progress else loader):
        good = good.bool()
        batch = encode(images)
        batch = batch / batch.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if features is None:
            features = torch.zeros(n_rows, batch.shape[1])
        features[indices] = torch.where(good[:, None], batch.cpu(), torch.zeros_like(batch.cpu()))
        ok[indices] = good
    return features, ok
