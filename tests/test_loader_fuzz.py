"""Property-based fuzzing of images.read_image: whatever the bytes, the loader returns an RGB
image or raises ImageReadError with a reason; never another exception, never a hang."""

import atexit
import io
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from orbital_clip import images

# Hypothesis caches under ./.hypothesis by default; tests never write into the working tree.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="hypothesis-home-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
FUZZ = settings(deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
                database=None)
SUFFIXES = [".png", ".jpg", ".dcm", ".tif", ""]
_counter = itertools.count()


def _valid_files():
    """{name: bytes} of small valid files in every family the loader decodes."""
    rgb = np.linspace(0, 255, 40 * 30 * 3).reshape(30, 40, 3).astype(np.uint8)
    files = {}
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, image, options in (("rgb.png", Image.fromarray(rgb), {}),
                                 ("photo.jpg", Image.fromarray(rgb), {"exif": exif.tobytes(), "quality": 80}),
                                 ("deep.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), {}),
                                 ("cmyk.tif", Image.fromarray(rgb).convert("CMYK"), {})):
        buffer = io.BytesIO()
        image.save(buffer, format=Image.registered_extensions()[Path(name).suffix], **options)
        files[name] = buffer.getvalue()
    for name in ("MR_small.dcm", "MR_small_RLE.dcm"):
        if (PYDICOM_FILES / name).is_file():
            files[name] = (PYDICOM_FILES / name).read_bytes()
    return files


VALID = _valid_files()
NAMES = sorted(VALID)


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory(prefix="loader-fuzz-") as folder:
        yield Path(folder)


def read_bytes_as_image(folder, data, suffix):
    """Write data to a fresh file and read it; asserts the loader's contract."""
    path = folder / f"case{next(_counter)}{suffix}"
    path.write_bytes(data)
    try:
        image = images.read_image(path)
    except images.ImageReadError as err:
        assert str(err).strip(), "an ImageReadError needs a reason"
        return None
    finally:
        path.unlink()
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.width > 0 and image.height > 0
    return image


def test_valid_seed_files_read():
    for name in NAMES:
        with tempfile.TemporaryDirectory() as folder:
            assert read_bytes_as_image(Path(folder), VALID[name], Path(name).suffix) is not None


@settings(FUZZ, max_examples=40)
@given(data=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(fuzz_dir, data, suffix):
    read_bytes_as_image(fuzz_dir, data, suffix)


@settings(FUZZ, max_examples=40)
@given(name=st.sampled_from(NAMES), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_valid_files(fuzz_dir, name, fraction):
    data = VALID[name]
    cut = data[: int(len(data) * fraction)]
    image = read_bytes_as_image(fuzz_dir, cut, Path(name).suffix)
    if image is not None:  # a cut inside trailing metadata may leave every pixel intact
        assert image.size in {(40, 30), (30, 40), (64, 64)}


@settings(FUZZ, max_examples=40)
@given(name=st.sampled_from(NAMES),
       edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_headers(fuzz_dir, name, edits):
    data = bytearray(VALID[name])
    for offset, value in edits:  # header bytes: signature, chunk/segment/tag lengths, sizes
        data[offset % len(data)] = value
    read_bytes_as_image(fuzz_dir, bytes(data), Path(name).suffix)


DICOM_ATTRIBUTES = st.fixed_dictionaries({}, optional={
    "Rows": st.integers(0, 65535), "Columns": st.integers(0, 65535),  # US
    "BitsAllocated": st.sampled_from([1, 7, 8, 16, 32, 64]), "BitsStored": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2), "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.integers(-1, 300),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "HSV", ""]),
    "WindowCenter": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "WindowWidth": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "RescaleSlope": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "VOILUTFunction": st.sampled_from(["LINEAR_EXACT", "SIGMOID", "BOGUS"]),
})


@settings(FUZZ, max_examples=30)
@given(changes=DICOM_ATTRIBUTES, pixel_bytes=st.one_of(st.none(), st.integers(0, 20000)))
def test_inconsistent_dicom_attributes(fuzz_dir, changes, pixel_bytes):
    dataset = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    if pixel_bytes is not None:  # pixel data shorter or longer than the attributes promise
        dataset.PixelData = (bytes(dataset.PixelData) * 3 + bytes(pixel_bytes))[:pixel_bytes]
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    read_bytes_as_image(fuzz_dir, buffer.getvalue(), ".dcm")
