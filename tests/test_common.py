"""The shared image loader, checkpoints and zero-shot classifier (images, checkpoint, zero_shot), and prompts."""

import argparse
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orbital_clip import checkpoint
from orbital_clip import cohort
from orbital_clip import images
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import zero_shot
from orbital_clip import prompts
from conftest import write_model_checkpoint


def gradient(width=48, height=32):
    """A deterministic RGB test picture with structure in both axes."""
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


# -- loader --------------------------------------------------------------------------------------

def test_exif_rotated_image_reads_like_its_upright_twin(tmp_path):
    upright = Image.fromarray(gradient())
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways (counter-clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    stored.save(tmp_path / "rotated.png", exif=exif.tobytes())
    a = np.asarray(images.read_image(tmp_path / "upright.png"))
    b = np.asarray(images.read_image(tmp_path / "rotated.png"))
    assert a.shape == b.shape == (32, 48, 3)
    assert np.array_equal(a, b)


def test_16bit_grey_is_rescaled_not_clipped(tmp_path):
    grey8 = gradient()[..., 0]
    grey16 = grey8.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    a = np.asarray(images.read_image(tmp_path / "g16.png")).astype(int)
    b = np.asarray(images.read_image(tmp_path / "g8.png")).astype(int)
    assert a.shape == b.shape == (32, 48, 3)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    image = Image.fromarray(gradient()).convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    if mode == "P":
        image.info["transparency"] = 0
    image.save(tmp_path / f"x{suffix}", **({"transparency": 0} if mode == "P" else {}))
    out = images.read_image(tmp_path / f"x{suffix}")
    assert out.mode == "RGB" and out.size == (48, 32)


def test_transparent_pixels_composite_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(images.read_image(tmp_path / "t.png")).min() == 255


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty file"),
    ("noise.jpg", bytes(range(256)) * 8, "not an image"),
    (".DS_Store", b"\x00\x00\x00\x01Bud1", "metadata"),
    ("._photo.jpg", b"\x00\x05\x16\x07", "metadata"),
])
def test_bad_files_are_rejected_with_a_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(images.ImageReadError, match=reason):
        images.read_image(tmp_path / name)


def test_truncated_jpeg_is_rejected_not_filled(tmp_path):
    Image.fromarray(gradient(256, 256)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageReadError, match="truncated"):
        images.read_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_rejected(tmp_path, monkeypatch):
    Image.fromarray(gradient(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(images.ImageReadError, match="decompression bomb"):
        images.read_image(tmp_path / "big.png")


def test_jpeg_draft_mode_keeps_at_least_the_requested_side(tmp_path):
    Image.fromarray(gradient(1200, 800)).save(tmp_path / "cam.jpg", quality=90)
    small = images.read_image(tmp_path / "cam.jpg", min_side_px=256)
    assert min(small.size) >= 256 and small.size[0] < 1200
    assert images.read_image(tmp_path / "cam.jpg").size == (1200, 800)


def dicom_sample(name):
    """A pydicom test file that ships inside the wheel (get_testdata_file would download others)."""
    from pydicom.data import get_testdata_file
    import pydicom.data
    bundled = Path(pydicom.data.__file__).parent / "test_files" / name
    if not bundled.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return get_testdata_file(name)


def write_dicom(path, source_name, **changes):
    """A modified copy of a bundled DICOM sample (pydicom keywords as keyword arguments)."""
    import pydicom
    dataset = pydicom.dcmread(dicom_sample(source_name))
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)
    return path


def test_16bit_and_8bit_twins_give_the_same_model_input(tmp_path):
    import open_clip
    grey8 = gradient(96, 80)[..., 0]
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # I;16
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    transform = open_clip.image_transform(64, is_train=False)  # the tiny model's eval transform
    a = transform(images.read_image(tmp_path / "g16.png"))
    b = transform(images.read_image(tmp_path / "g8.png"))
    assert a.shape == b.shape == (3, 64, 64)
    assert torch.allclose(a, b, atol=1.5 / 255 / 0.26)  # within one grey level after normalising


def test_la_and_palette_transparency_composite_on_white(tmp_path):
    la = np.zeros((6, 6, 2), dtype=np.uint8)
    la[..., 0], la[:3, :, 1] = 40, 255  # grey 40: opaque top half, transparent bottom half
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = np.asarray(images.read_image(tmp_path / "la.png"))
    assert (out[:3] == 40).all() and (out[3:] == 255).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)  # index 0 is transparent black
    palette.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(images.read_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [200, 10, 10]


def test_cmyk_and_grey_known_values(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "red.tif")  # no cyan, full M+Y
    assert np.asarray(images.read_image(tmp_path / "red.tif"))[0, 0].tolist() == [255, 0, 0]
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    assert np.asarray(images.read_image(tmp_path / "grey.png"))[0, 0].tolist() == [77, 77, 77]


def test_text_named_png_and_unicode_names(tmp_path):
    (tmp_path / "notes.png").write_text("patient notes, not a picture\n")
    with pytest.raises(images.ImageReadError, match="not an image"):
        images.read_image(tmp_path / "notes.png")
    Image.fromarray(gradient()).save(tmp_path / "Ö eye (1).jpg")
    assert images.read_image(tmp_path / "Ö eye (1).jpg").size == (48, 32)
    assert images.is_candidate_image("Ö eye (1).jpg")
    assert not any(map(images.is_candidate_image, ["Thumbs.db", ".DS_Store", "._x.jpg", "desktop.ini"]))


def test_files_with_unlisted_extensions_are_read_by_content_or_fail_as_unsupported(tmp_path):
    # One rule for every script: anything but junk and notes is an image candidate.
    assert all(map(images.is_candidate_image, ["a.jfif", "b.webp", "c.heic", "d.pdf", "e"]))
    assert not any(map(images.is_candidate_image, ["notes.txt", "meta.json", "s.xml", "t.csv",
                                                    ".hidden.jpg", "Thumbs.db"]))
    Image.fromarray(gradient()).save(tmp_path / "eye.jfif", format="JPEG")  # a JPEG, another name
    assert images.read_image(tmp_path / "eye.jfif").size == (48, 32)
    Image.fromarray(gradient()).save(tmp_path / "eye.webp", format="WEBP")
    assert images.read_image(tmp_path / "eye.webp").size == (48, 32)
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an HEIF header
    (tmp_path / "phone.HEIC").write_bytes(heic)
    with pytest.raises(images.ImageReadError) as err:
        images.read_image(tmp_path / "phone.HEIC")
    assert str(err.value) == "unsupported format (.heic)"
    (tmp_path / "notes.png").write_text("not a picture")  # a listed extension keeps its reason
    with pytest.raises(images.ImageReadError, match=r"^not an image \(unrecognised content\)$"):
        images.read_image(tmp_path / "notes.png")
    paths = [tmp_path / n for n in ("eye.jfif", "eye.webp", "phone.HEIC", "notes.png")]
    assert images.unsupported_format_files(paths) == [tmp_path / "phone.HEIC"]


def test_class_folder_listing_keeps_every_candidate_and_skips_hidden_folders(tmp_path):
    folder = tmp_path / "a"
    (folder / ".thumbnails").mkdir(parents=True)
    for name in ("x.jpg", "y.jfif", "z.heic", "notes.txt", "list.csv", ".DS_Store", ".x.jpg",
                 ".thumbnails/t.jpg"):
        (folder / name).write_bytes(b"1")
    items, _ = cohort.list_class_folder_images(tmp_path, ["a"])
    assert [p.name for p, _ in items] == ["x.jpg", "y.jfif", "z.heic"]


def test_dicom_ct_and_mr_known_answers():
    import pydicom
    ct = np.asarray(images.read_image(dicom_sample("CT_small.dcm")))
    raw = pydicom.dcmread(dicom_sample("CT_small.dcm")).pixel_array.astype(float)
    assert ct.shape == (128, 128, 3) and (ct[..., 0] == ct[..., 2]).all()
    expected = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255)  # no window: min-max
    assert np.abs(ct[..., 0] - expected).max() <= 1
    # MR_small has window centre 600 / width 1600 (LINEAR): the window, not the pixel range,
    # spans 0..255, so its darkest pixel (127) is not black.
    mr = np.asarray(images.read_image(dicom_sample("MR_small.dcm")))
    raw = pydicom.dcmread(dicom_sample("MR_small.dcm")).pixel_array.astype(float)
    expected = np.clip((raw - 599.5) / 1599 + 0.5, 0, 1) * 255
    assert mr.shape == (64, 64, 3) and np.abs(mr[..., 0] - expected).max() <= 1
    assert mr.min() == 52 and mr.max() == 255


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    mono1 = write_dicom(tmp_path / "m1.dcm", "MR_small.dcm", PhotometricInterpretation="MONOCHROME1")
    a = np.asarray(images.read_image(mono1)).astype(int)
    b = np.asarray(images.read_image(dicom_sample("MR_small.dcm"))).astype(int)
    assert np.array_equal(a, 255 - b)


def test_multiframe_dicom_uses_the_middle_frame(tmp_path):
    import pydicom
    rows = np.arange(64, dtype=np.int16)
    frames = np.stack([np.tile(rows * (k + 1) * 10, (64, 1)) for k in range(3)])  # distinct ramps
    frames[1] = frames[1].T  # the middle frame is the only vertical ramp
    dataset = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    del dataset.WindowCenter, dataset.WindowWidth
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    dataset.save_as(tmp_path / "three.dcm")
    dataset.NumberOfFrames = 1
    dataset.PixelData = frames[1].tobytes()
    dataset.save_as(tmp_path / "middle.dcm")
    three = np.asarray(images.read_image(tmp_path / "three.dcm"))
    assert np.array_equal(three, np.asarray(images.read_image(tmp_path / "middle.dcm")))
    assert (three[:, 0, 0] == np.round(np.arange(64) * 255 / 63)).all() and (three[0] == 0).all()


def test_compressed_dicom_decodes_or_names_the_missing_decoder():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000, JPEGLSLossless
    for name, uid, shape, package in (("JPEG2000.dcm", JPEG2000, (1024, 256, 3), "pylibjpeg-openjpeg"),
                                      ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, (64, 64, 3),
                                       "pylibjpeg-libjpeg")):
        if get_decoder(uid).is_available:
            assert np.asarray(images.read_image(dicom_sample(name))).shape == shape
        else:
            with pytest.raises(images.ImageReadError) as err:
                images.read_image(dicom_sample(name))
            assert uid.name in str(err.value) and package in str(err.value)
            assert "no decoder" in str(err.value)


def test_dicom_reasons_and_logs_never_quote_header_values(tmp_path, caplog, capfd):
    import logging
    phi = {"PatientName": "Doe^Jane", "PatientID": "MRN-990011", "PatientBirthDate": "19700101"}
    import pydicom
    dataset = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    for keyword, value in phi.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]  # truncated pixels
    dataset.save_as(tmp_path / "cut.dcm")
    dataset = pydicom.dcmread(dicom_sample("MR_small.dcm"))
    for keyword, value in phi.items():
        setattr(dataset, keyword, value)
    dataset.WindowCenter, dataset.PatientWeight = "600.0001", "70.00001"
    dataset.save_as(tmp_path / "odd.dcm")  # then: header values where numbers belong
    data = (tmp_path / "odd.dcm").read_bytes()
    (tmp_path / "odd.dcm").write_bytes(data.replace(b"600.0001", b"Doe^Jane")
                                       .replace(b"70.00001", b"MRN99001"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(images.ImageReadError) as err:
        images.read_image(tmp_path / "cut.dcm")
    reasons = [str(err.value)]
    assert "Explicit VR Little Endian" in reasons[0]
    try:  # an unusable window falls back to the pixel range; either way no value is quoted
        assert images.read_image(tmp_path / "odd.dcm").size == (64, 64)
    except images.ImageReadError as odd:
        reasons.append(str(odd))
    captured = capfd.readouterr()
    everything = "\n".join([*reasons, caplog.text, captured.out, captured.err])
    for value in [*phi.values(), "MRN99001", "Doe", "Jane", "990011"]:
        assert value not in everything


def test_dicom_bomb_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(images.ImageReadError, match="decompression bomb: 64x64"):
        images.read_image(dicom_sample("MR_small.dcm"))


# -- cohorts and manifests -----------------------------------------------------------------------

def write_fold_manifest(path, with_fold=True):
    rows = [("train/a/1.jpg", "a", "train", "0"), ("train/a/2.jpg", "a", "train", "1"),
            ("train/b/3.jpg", "b", "train", "2"), ("train/b/4.jpg", "b", "train", "1"),
            ("test/b/5.jpg", "b", "test", "")]
    header = "path,label,split" + (",fold" if with_fold else "")
    lines = [",".join(row if with_fold else row[:3]) for row in rows]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def test_manifest_folds_train_on_the_others_validate_on_one(tmp_path):
    manifest = write_fold_manifest(tmp_path / "manifest.csv")
    folders = ["a", "b"]

    def names(split, fold):
        return [(p.name, y) for p, y in cohort.load_labelled_items(manifest, folders, split, fold=fold)]

    assert names("train", 1) == [("1.jpg", 0), ("3.jpg", 1)]
    assert names("val", 1) == [("2.jpg", 0), ("4.jpg", 1)]
    assert names("val", 0) == [("1.jpg", 0)]
    assert names("test", 2) == [("5.jpg", 1)]
    assert names("train", None) == [("1.jpg", 0), ("2.jpg", 0), ("3.jpg", 1), ("4.jpg", 1)]
    assert cohort.load_labelled_items(manifest, folders, "val", fold=1)[0][0] == tmp_path / "train/a/2.jpg"
    with pytest.raises(cohort.CohortError, match=r"manifest.csv: fold 3 is out of range; it has folds 0..2"):
        cohort.load_labelled_items(manifest, folders, "val", fold=3)
    plain = write_fold_manifest(tmp_path / "plain.csv", with_fold=False)
    with pytest.raises(cohort.CohortError, match=r"plain.csv: has no 'fold' column.*--folds"):
        cohort.load_labelled_items(plain, folders, "train", fold=0)
    with pytest.raises(cohort.CohortError, match="needs a manifest.csv"):
        cohort.load_labelled_items(tmp_path, folders, "train", fold=0)


# -- checkpoints ---------------------------------------------------------------------------------

def test_clean_state_dict_strips_wrappers():
    weights = {"module._orig_mod.visual.proj": torch.ones(2), "logit_scale": torch.zeros(())}
    assert sorted(checkpoint.clean_state_dict(weights)) == ["logit_scale", "visual.proj"]


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match="bad.pt"):
        checkpoint.load_checkpoint_file(tmp_path / "bad.pt")


def test_checkpoint_round_trip_and_atomic_permissions(tmp_path):
    model, *_ = models.create_model("tiny_clip", None)
    write_model_checkpoint(tmp_path / "ck.pt", model, {"epoch": 3, "class_folders": ["a", "b"]})
    loaded = checkpoint.load_checkpoint_file(tmp_path / "ck.pt")
    assert loaded["epoch"] == 3 and loaded["format"] == checkpoint.CHECKPOINT_FORMAT
    assert torch.equal(loaded["state_dict"]["logit_scale"], model.state_dict()["logit_scale"])
    assert (tmp_path / "ck.pt").stat().st_mode & 0o044  # readable by others, like any file
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


def test_a_checkpoint_of_a_newer_format_is_refused_and_older_ones_load(tmp_path, tiny_model):
    newer = tmp_path / "newer.pt"
    checkpoint.write_checkpoint(newer, checkpoint.CheckpointRecord(
        state_dict=tiny_model.state_dict(), model_name="tiny_clip",
        format_version=checkpoint.FORMAT_VERSION + 1))
    ours = checkpoint.FORMAT_VERSION
    for read in (checkpoint.read_checkpoint, checkpoint.load_state_dict_file):
        with pytest.raises(checkpoint.CheckpointError) as refused:
            read(newer)
        assert str(refused.value) == (f"{newer}: checkpoint format version {ours + 1} is newer than "
                                      f"this code's ({ours}); upgrade Orbital-CLIP to read it")
    # version 0: our files from before format_version existed, and plain open_clip state_dicts
    # (torch.save here plays the old writer)
    before = tmp_path / "before.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "state_dict": tiny_model.state_dict(),
                "model_name": "tiny_clip", "epoch": 2}, before)
    plain = tmp_path / "plain.pt"
    torch.save(tiny_model.state_dict(), plain)
    old, bare = checkpoint.read_checkpoint(before), checkpoint.read_checkpoint(plain)
    assert (old.format_version, old.epoch, old.is_ours) == (0, 2, True)
    assert (bare.format_version, bare.format, bare.is_ours) == (0, None, False)
    assert torch.equal(bare.state_dict["logit_scale"], tiny_model.state_dict()["logit_scale"])
    checkpoint.write_checkpoint(tmp_path / "now.pt", checkpoint.CheckpointRecord(
        state_dict=tiny_model.state_dict(), model_name="tiny_clip"))
    assert checkpoint.read_checkpoint(tmp_path / "now.pt").format_version == ours


def test_zero_shot_classifier_averages_normalised_prompts():
    class FakeModel:
        def encode_text(self, tokens):
            return tokens.float()

    prompt_lists = [["a", "b"], ["c"]]
    table = {"a": [3.0, 0.0], "b": [0.0, 2.0], "c": [0.0, -5.0]}
    tokenizer = lambda texts: torch.tensor([table[t] for t in texts])  # noqa: E731
    classifier = zero_shot.build_zero_shot_classifier(FakeModel(), tokenizer, prompt_lists, "cpu")
    expected0 = torch.tensor([1.0, 1.0]) / np.sqrt(2)
    assert torch.allclose(classifier[:, 0], expected0)
    assert torch.allclose(classifier[:, 1], torch.tensor([0.0, -1.0]))


# -- prompts -------------------------------------------------------------------------------------

def test_published_prompt_set_shape():
    classes = prompts.load_prompt_set()
    assert prompts.class_folders(classes) == ["orbital disease", "healthy eyes", "non-orbital disease"]
    assert [len(c.train) for c in classes] == [6, 3, 4]
    assert [c.eval for c in classes] == [("orbital disease",), ("no eye disease",), ("non-orbital disease",)]


def test_custom_prompt_file_and_errors(tmp_path):
    good = {"classes": [{"folder": "a", "train": ["x a"], "eval": ["a"]},
                        {"folder": "b", "train": ["x b", "y b"], "eval": ["b", "bb"]}]}
    (tmp_path / "p.json").write_text(json.dumps(good))
    classes = prompts.load_prompt_set(tmp_path / "p.json")
    assert prompts.class_folders(classes) == ["a", "b"]
    assert prompts.parse_prompt_set(prompts.prompt_set_to_dict(classes)) == classes
    bad = {"classes": [{"folder": "a", "train": [], "eval": ["a"]}, good["classes"][1]]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(prompts.PromptSetError, match=r"bad.json.*'train'"):
        prompts.load_prompt_set(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(prompts.PromptSetError, match="broken.json"):
        prompts.load_prompt_set(tmp_path / "broken.json")


def test_caption_sampling_is_seeded_and_label_true():
    classes = prompts.load_prompt_set()
    labels = [0, 1, 2, 0, 0, 1]
    a = prompts.sample_train_captions(labels, classes, prompts.new_rng(7))
    b = prompts.sample_train_captions(labels, classes, prompts.new_rng(7))
    assert a == b
    assert all(caption in classes[y].train for caption, y in zip(a, labels))


def test_unique_captions_known_answer():
    assert prompts.unique_captions(["x", "y", "x", "z", "y"]) == (["x", "y", "z"], [0, 1, 0, 2, 1])


def test_safetensors_round_trip_keeps_metadata(tmp_path):
    model, *_ = models.create_model("tiny_clip", None)
    checkpoint.save_safetensors(tmp_path / "w.safetensors", model,
                            {"model_name": "tiny_clip", "class_folders": ["a", "b"], "epoch": 2})
    loaded = checkpoint.load_checkpoint_file(tmp_path / "w.safetensors")
    assert loaded["model_name"] == "tiny_clip" and loaded["class_folders"] == ["a", "b"] and loaded["epoch"] == 2
    assert torch.equal(loaded["state_dict"]["logit_scale"], model.state_dict()["logit_scale"])


def test_wise_ft_interpolation_known_answer_and_end_points():
    base = {"w": torch.tensor([0.0, 2.0]), "step": torch.tensor(3)}
    tuned = {"w": torch.tensor([4.0, 6.0]), "step": torch.tensor(7)}
    assert torch.equal(checkpoint.interpolate_state_dicts(base, tuned, 0.25)["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(checkpoint.interpolate_state_dicts(base, tuned, 0.0)["w"], base["w"])
    assert torch.equal(checkpoint.interpolate_state_dicts(base, tuned, 1.0)["w"], tuned["w"])
    assert checkpoint.interpolate_state_dicts(base, tuned, 0.5)["step"].item() == 7
    with pytest.raises(checkpoint.CheckpointError, match="shape"):
        checkpoint.interpolate_state_dicts({"w": torch.zeros(3), "step": base["step"]}, tuned, 0.5)


# -- run records (args.json) -----------------------------------------------------------------------

def test_run_record_layout_and_hidden_values_in_every_spelling():
    args = argparse.Namespace(test_dir=Path("/data/Doe_John"), salt="pepper", device=torch.device("cpu"),
                              bootstrap=50, alphas=(0.5, 1.0), none=None)
    argv = ["--test-dir", "/data/Doe_John", "--salt=pepper", "--boot", "50", "--none-given"]
    record = outputs.run_record("inference.py", argv, args, {"n": np.int64(3)},
                               hidden={"test_dir": "<anonymized>", "salt": "<hidden>", "none": "<x>"})
    assert list(record) == ["script", "cwd", "argv", "command", "args", "environment", "run"]
    assert record["cwd"] == os.getcwd()
    assert record["argv"] == ["--test-dir", "<anonymized>", "--salt=<hidden>", "--boot", "50", "--none-given"]
    assert record["args"] == {"test_dir": "<anonymized>", "salt": "<hidden>", "device": "cpu",
                              "bootstrap": 50, "alphas": [0.5, 1.0], "none": None}
    assert shlex.split(record["command"]) == ["python", "inference.py", *record["argv"]]
    assert record["environment"]["torch"] == torch.__version__ and record["run"] == {"n": 3}
    text = json.dumps(record)
    assert "pepper" not in text and "Doe_John" not in text
    # nothing hidden: argv kept token for token, and the command splits back into it
    kept = outputs.run_record("clip_train.py", ["--save-dir", "a b", "--lr", "1e-3"],
                             argparse.Namespace(save_dir="a b", lr=1e-3))
    assert kept["argv"] == ["--save-dir", "a b", "--lr", "1e-3"] and kept["run"] is None
    # hidden by the flag's position: another flag with the same value keeps it; abbreviations too
    argv = ["--anonymize-s", "2024", "--seed", "2024", "--anonymize-salt=2024", "--cwd-free"]
    record = outputs.run_record("inference.py", argv, argparse.Namespace(anonymize_salt="2024", seed=2024),
                               hidden={"anonymize_salt": "<hidden>", "cwd": "<anonymized>"})
    assert record["argv"] == ["--anonymize-s", "<hidden>", "--seed", "2024", "--anonymize-salt=<hidden>",
                              "--cwd-free"]
    assert record["args"] == {"anonymize_salt": "<hidden>", "seed": 2024} and record["cwd"] == "<anonymized>"
    assert shlex.split(kept["command"]) == ["python", "clip_train.py", "--save-dir", "a b", "--lr", "1e-3"]
