"""The shared image loader, checkpoints and zero-shot classifier (common.py), and prompts.py."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import prompts


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
    a = np.asarray(common.read_image(tmp_path / "upright.png"))
    b = np.asarray(common.read_image(tmp_path / "rotated.png"))
    assert a.shape == b.shape == (32, 48, 3)
    assert np.array_equal(a, b)


def test_16bit_grey_is_rescaled_not_clipped(tmp_path):
    grey8 = gradient()[..., 0]
    grey16 = grey8.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    a = np.asarray(common.read_image(tmp_path / "g16.png")).astype(int)
    b = np.asarray(common.read_image(tmp_path / "g8.png")).astype(int)
    assert a.shape == b.shape == (32, 48, 3)
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    image = Image.fromarray(gradient()).convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    if mode == "P":
        image.info["transparency"] = 0
    image.save(tmp_path / f"x{suffix}", **({"transparency": 0} if mode == "P" else {}))
    out = common.read_image(tmp_path / f"x{suffix}")
    assert out.mode == "RGB" and out.size == (48, 32)


def test_transparent_pixels_composite_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(common.read_image(tmp_path / "t.png")).min() == 255


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty file"),
    ("noise.jpg", bytes(range(256)) * 8, "not an image"),
    (".DS_Store", b"\x00\x00\x00\x01Bud1", "metadata"),
    ("._photo.jpg", b"\x00\x05\x16\x07", "metadata"),
])
def test_bad_files_are_rejected_with_a_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(common.ImageReadError, match=reason):
        common.read_image(tmp_path / name)


def test_truncated_jpeg_is_rejected_not_filled(tmp_path):
    Image.fromarray(gradient(256, 256)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.ImageReadError, match="truncated"):
        common.read_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_rejected(tmp_path, monkeypatch):
    Image.fromarray(gradient(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(common.ImageReadError, match="decompression bomb"):
        common.read_image(tmp_path / "big.png")


def test_jpeg_draft_mode_keeps_at_least_the_requested_side(tmp_path):
    Image.fromarray(gradient(1200, 800)).save(tmp_path / "cam.jpg", quality=90)
    small = common.read_image(tmp_path / "cam.jpg", min_side_px=256)
    assert min(small.size) >= 256 and small.size[0] < 1200
    assert common.read_image(tmp_path / "cam.jpg").size == (1200, 800)


def test_dicom_samples_read_as_rgb():
    from pydicom.data import get_testdata_file
    for name, side in (("CT_small.dcm", 128), ("MR_small.dcm", 64)):
        image = common.read_image(get_testdata_file(name))
        array = np.asarray(image)
        assert image.mode == "RGB" and array.shape == (side, side, 3)
        assert array.min() == 0 and array.max() == 255  # full range after windowing/rescale


# -- checkpoints ---------------------------------------------------------------------------------

def test_clean_state_dict_strips_wrappers():
    weights = {"module._orig_mod.visual.proj": torch.ones(2), "logit_scale": torch.zeros(())}
    assert sorted(common.clean_state_dict(weights)) == ["logit_scale", "visual.proj"]


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "bad.pt")
    with pytest.raises(common.CheckpointError, match="bad.pt"):
        common.load_checkpoint_file(tmp_path / "bad.pt")


def test_checkpoint_round_trip_and_atomic_permissions(tmp_path):
    model, *_ = common.create_model("tiny_clip", None)
    common.save_checkpoint(tmp_path / "ck.pt", model, {"epoch": 3, "class_folders": ["a", "b"]})
    loaded = common.load_checkpoint_file(tmp_path / "ck.pt")
    assert loaded["epoch"] == 3 and loaded["format"] == common.CHECKPOINT_FORMAT
    assert torch.equal(loaded["state_dict"]["logit_scale"], model.state_dict()["logit_scale"])
    assert (tmp_path / "ck.pt").stat().st_mode & 0o044  # readable by others, like any file
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left


def test_zero_shot_classifier_averages_normalised_prompts():
    class FakeModel:
        def encode_text(self, tokens):
            return tokens.float()

    prompt_lists = [["a", "b"], ["c"]]
    table = {"a": [3.0, 0.0], "b": [0.0, 2.0], "c": [0.0, -5.0]}
    tokenizer = lambda texts: torch.tensor([table[t] for t in texts])  # noqa: E731
    classifier = common.build_zero_shot_classifier(FakeModel(), tokenizer, prompt_lists, "cpu")
    expected0 = torch.tensor([1.0, 1.0]) / np.sqrt(2)
    assert torch.allclose(classifier[:, 0], expected0)
    assert torch.allclose(classifier[:, 1], torch.tensor([0.0, -1.0]))


# -- prompts -------------------------------------------------------------------------------------

def test_published_prompt_set_shape():
    classes = prompts.load_prompt_set()
    assert prompts.class_folders(classes) == ["orbital disease", "healthy eyes", "non-orbital disease"]
    assert [len(c.train) for c in classes] == [6, 3, 4]
    assert [c.eval for c in classes] == [("orbital disease",), ("no eye disease",), ("non-orbital disease",)]


def test_published_prompts_match_the_shared_file():
    from conftest import REPO_ROOT
    shared = REPO_ROOT.parent / "shared" / "paper_prompts.json"
    if not shared.is_file():
        pytest.skip("../shared/paper_prompts.json is not beside this checkout")
    expected = prompts.parse_prompt_set(json.loads(shared.read_text()))
    assert prompts.load_prompt_set() == expected


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
    model, *_ = common.create_model("tiny_clip", None)
    common.save_safetensors(tmp_path / "w.safetensors", model,
                            {"model_name": "tiny_clip", "class_folders": ["a", "b"], "epoch": 2})
    loaded = common.load_checkpoint_file(tmp_path / "w.safetensors")
    assert loaded["model_name"] == "tiny_clip" and loaded["class_folders"] == ["a", "b"] and loaded["epoch"] == 2
    assert torch.equal(loaded["state_dict"]["logit_scale"], model.state_dict()["logit_scale"])


def test_wise_ft_interpolation_known_answer_and_end_points():
    base = {"w": torch.tensor([0.0, 2.0]), "step": torch.tensor(3)}
    tuned = {"w": torch.tensor([4.0, 6.0]), "step": torch.tensor(7)}
    assert torch.equal(common.interpolate_state_dicts(base, tuned, 0.25)["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(common.interpolate_state_dicts(base, tuned, 0.0)["w"], base["w"])
    assert torch.equal(common.interpolate_state_dicts(base, tuned, 1.0)["w"], tuned["w"])
    assert common.interpolate_state_dicts(base, tuned, 0.5)["step"].item() == 7
    with pytest.raises(common.CheckpointError, match="shape"):
        common.interpolate_state_dicts({"w": torch.zeros(3), "step": base["step"]}, tuned, 0.5)
