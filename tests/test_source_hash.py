"""Model sources recorded absolutely with a content hash (issue 26, item 5): a local-dir: folder or
a weights file is recorded by its absolute path and SHA-256; resume and WiSE-FT refuse one whose
files changed, accept the absolute spelling of the same folder, and warn on an older checkpoint
that has no digest."""

import hashlib
import json
import shutil
from types import SimpleNamespace

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from orbital_clip import checkpoint as ckpt
from orbital_clip import images
from orbital_clip import model_loading
from orbital_clip import models
from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from conftest import TINY_CONFIG

TINY = json.loads(TINY_CONFIG.read_text())


def write_folder(folder, seed=7):
    """An open_clip local-dir folder (open_clip_config.json + safetensors weights of a seeded model)."""
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    torch.manual_seed(seed)
    name = models.register_model_config_dict(f"hash_arch_{seed}", TINY)
    weights = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    save_file(weights, str(folder / "open_clip_model.safetensors"))


def source_argv(train_dir, val_dir, save_dir, spec, *extra):
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--out-dir", str(save_dir),
            "--model-name", spec, "--lr", "1e-3", "--batch-size", "16", "--epochs", "1",
            "--workers", "0", "--no-progress", *extra]


def test_folder_digest_is_the_digest_of_its_sorted_file_lines(tmp_path):
    folder = tmp_path / "m"
    write_folder(folder)
    lines = "".join(f"{name}\t{images.file_sha256(folder / name)}\n"
                    for name in ("open_clip_config.json", "open_clip_model.safetensors"))
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert models.source_sha256(f"local-dir:{folder}") == expected
    shutil.move(folder, tmp_path / "moved")  # where the folder lies is no part of its content
    assert models.source_sha256(f"local-dir:{tmp_path / 'moved'}") == expected
    (tmp_path / "moved" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}, indent=1))
    assert models.source_sha256(f"local-dir:{tmp_path / 'moved'}") != expected  # config edited
    weights_file = tmp_path / "moved" / "open_clip_model.safetensors"
    assert models.source_sha256(str(weights_file)) == images.file_sha256(weights_file)
    assert models.source_sha256("none") is None and models.source_sha256("laion2b_s34b_b79k") is None


@pytest.mark.slow
def test_a_relative_local_dir_is_recorded_absolutely_and_a_changed_folder_is_refused(
        splits, tmp_path, monkeypatch, capsys):
    train_dir, val_dir = splits
    folder = tmp_path / "work" / "models" / "tiny"
    write_folder(folder)
    monkeypatch.chdir(tmp_path / "work")
    save_dir = tmp_path / "run"
    assert train_cli.main(source_argv(train_dir, val_dir, save_dir, "local-dir:models/tiny",
                                      "--wise-ft-alphas", "0", "1")) == 0
    last = ckpt.read_checkpoint(save_dir / train_checkpoints.LAST_NAME)
    absolute = f"local-dir:{folder.resolve()}"
    assert last.model_name == absolute and last.pretrained == absolute
    assert last.pretrained_sha256 == models.source_sha256(absolute)

    # the absolute spelling of the same folder resumes (one more epoch), from another folder too
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(source_argv(train_dir, val_dir, save_dir, absolute, "--wise-ft-alphas", "0", "1",
                                      "--epochs", "2", "--resume", "auto")) == 0
    assert ckpt.read_checkpoint(save_dir / train_checkpoints.LAST_NAME).epoch == 2

    # the folder's weights replaced by another model's: resume and WiSE-FT refuse it by name
    recorded = last.pretrained_sha256
    shutil.rmtree(folder)
    write_folder(folder, seed=8)
    now = models.source_sha256(absolute)
    before = {p.name: p.read_bytes() for p in save_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_cli.main(source_argv(train_dir, val_dir, save_dir, absolute, "--wise-ft-alphas", "0", "1",
                                      "--epochs", "3", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert absolute in err and recorded[:16] in err and now[:16] in err and "--overwrite" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in save_dir.iterdir() if p.is_file()} == before
    checkpoint = model_loading.resolve_checkpoint(str(save_dir / train_checkpoints.BEST_NAME))
    bundle = SimpleNamespace(checkpoint=checkpoint, model_name=absolute)
    with pytest.raises(ValueError, match="--wise-ft-alpha: .*not the folder training started from") as caught:
        model_loading.wise_ft_base_weights(SimpleNamespace(wise_ft_base=None), bundle)
    assert recorded[:16] in str(caught.value) and "--wise-ft-base PATH" in str(caught.value)

    # a checkpoint of an older version (no digest) still resumes, with a warning
    record = ckpt.read_checkpoint(save_dir / train_checkpoints.LAST_NAME)
    record.pretrained_sha256 = None
    ckpt.write_checkpoint(save_dir / train_checkpoints.LAST_NAME, record)
    assert train_cli.main(source_argv(train_dir, val_dir, save_dir, absolute, "--wise-ft-alphas", "0", "1",
                                      "--epochs", "3", "--resume", "auto")) == 0
    assert "records no SHA-256 of its starting weights" in capsys.readouterr().err


def test_wise_ft_refuses_a_relative_local_dir_recorded_by_an_older_version(tmp_path, monkeypatch):
    write_folder(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    checkpoint = model_loading.Checkpoint("ours", "best.pt", {"pretrained": "local-dir:models/tiny",
                                                              "state_dict": {}}, "0" * 64)
    bundle = SimpleNamespace(checkpoint=checkpoint, model_name="x")
    with pytest.raises(ValueError, match="relative path local-dir:models/tiny.*--wise-ft-base PATH"):
        model_loading.wise_ft_base_weights(SimpleNamespace(wise_ft_base=None), bundle)


@pytest.mark.slow
def test_a_moved_local_dir_resumes_by_its_digest_and_records_the_new_path(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    write_folder(tmp_path / "a" / "tiny")
    save_dir = tmp_path / "run"
    old = f"local-dir:{(tmp_path / 'a' / 'tiny').resolve()}"
    assert train_cli.main(source_argv(train_dir, val_dir, save_dir, old)) == 0
    (tmp_path / "b").mkdir()
    shutil.move(tmp_path / "a" / "tiny", tmp_path / "b" / "tiny")
    new = f"local-dir:{(tmp_path / 'b' / 'tiny').resolve()}"
    capsys.readouterr()
    assert train_cli.main(source_argv(train_dir, val_dir, save_dir, new,
                                      "--epochs", "2", "--resume", "auto")) == 0
    moved = [line for line in capsys.readouterr().err.splitlines() if "moved from" in line]
    assert len(moved) == 1 and old[len("local-dir:"):] in moved[0] and new[len("local-dir:"):] in moved[0]
    last = ckpt.read_checkpoint(save_dir / train_checkpoints.LAST_NAME)
    assert last.epoch == 2 and last.model_name == new and last.pretrained == new
    assert last.pretrained_sha256 == models.source_sha256(new)
