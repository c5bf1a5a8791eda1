"""Reading every image kind (Pillow formats, 16-bit, DICOM) into 8-bit RGB, with one reason per
failure; file digests and the same-image check between two lists of files."""

import csv
import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
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
# Pillow's own bomb limit (~179 MP) is a warning until 2x; we refuse at the limit itself.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 178_956_970


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
            message = short_text(str(err)) or type(err).__name__
            if "truncated" in message.lower() or isinstance(err, EOFError):
                raise ImageReadError(f"truncated image ({message})") from None
            raise ImageReadError(f"corrupt image ({type(err).__name__}: {message})") from None


def short_text(text, limit=160):
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
