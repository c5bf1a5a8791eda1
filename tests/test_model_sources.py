"""Any open_clip backbone, offline: hf-hub:/local-dir: models, recorded architectures, optional
packages, and which training shortcuts stay exact for which towers (issue 16)."""

import json
import shutil
import socket
import sys
from types import SimpleNamespace

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from orbital_clip.train import loop as train_loop
from orbital_clip.train import losses as train_losses
from orbital_clip.train import options as train_options
from orbital_clip.train import shortcuts as train_shortcuts
from orbital_clip import images as image_io
from orbital_clip import model_loading
from orbital_clip import models
from orbital_clip import scoring as inference
from orbital_clip import prompts
from conftest import TINY_CONFIG, TINY_MODEL

TINY = json.loads(TINY_CONFIG.read_text())
HALF_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def splits(make_cohort):
    return make_cohort("train", (6, 12, 9), seed=0), make_cohort("val", (3, 6, 4), seed=1)


def write_model_folder(folder, model_cfg=TINY, preprocess_cfg=None, seed=7):
    """An open_clip hf-hub-style folder: open_clip_config.json + open_clip_model.safetensors of a
    seeded random model; returns its weights."""
    folder.mkdir(parents=True)
    config = {"model_cfg": model_cfg, **({"preprocess_cfg": preprocess_cfg} if preprocess_cfg else {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    name = models.register_model_config_dict(f"folder_arch_{seed}", model_cfg)
    weights = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    save_file(weights, str(folder / "open_clip_model.safetensors"))
    return weights


def train_argv(train_dir, val_dir, save_dir, *extra):
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir", str(save_dir),
            "--lr", "1e-3", "--batch-size", "16", "--epochs", "1", "--workers", "0",
            "--no-progress", *extra]


def run_inference(test_dir, checkpoint, output_dir, *extra):
    return inference.main(["--test-dir", str(test_dir), "--checkpoint", str(checkpoint),
                           "--output-dir", str(output_dir), "--bootstrap", "0", "--no-figures",
                           "--workers", "0", "--no-progress", *extra])


def prob_columns(output_dir):
    frame = pd.read_csv(output_dir / "predictions.csv")
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()


def normalize_of(transform):
    return next(t for t in transform.transforms if type(t).__name__ == "Normalize")


# -- pure functions ------------------------------------------------------------------------------

def test_model_source_and_config_alias():
    assert models.model_source("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224") == "hf-hub"
    assert models.model_source("local-dir:/models/biomedclip") == "local-dir"
    assert models.model_source("ViT-B-32-256") is None
    assert models.config_alias("tiny_clip") == "tiny_clip"
    a, b = models.config_alias("local-dir:/a/b"), models.config_alias("local-dir:/a_b")
    assert a != b and "/" not in a and ":" not in a  # a file stem, one per source


EXACT = {"image": {"dropout": [], "batch_norm": []}, "text": {"dropout": [], "batch_norm": []}}


def inexact(image_dropout=(), image_bn=(), text_dropout=(), text_bn=()):
    return {"image": {"dropout": list(image_dropout), "batch_norm": list(image_bn)},
            "text": {"dropout": list(text_dropout), "batch_norm": list(text_bn)}}


def test_inexact_modules_per_tower():
    torch.manual_seed(0)
    model = models.create_model(TINY_MODEL, None)[0]
    assert train_shortcuts.inexact_modules(model) == EXACT
    model.visual.extra = torch.nn.Dropout(0.0)  # p = 0 draws nothing
    model.transformer.extra = torch.nn.Dropout(0.1)
    assert train_shortcuts.inexact_modules(model) == inexact(text_dropout=["transformer.extra (Dropout p=0.1)"])
    cfg = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": 0.5}}
    name = models.register_model_config_dict("tiny_patch_dropout", cfg)
    assert train_shortcuts.inexact_modules(models.create_model(name, None)[0]) == inexact(
        image_dropout=["visual.patch_dropout (PatchDropout p=0.5)"])


def test_resnet_batch_norm_is_inexact_until_the_tower_is_locked():
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
           "text_cfg": TINY["text_cfg"]}
    model = models.create_model(models.register_model_config_dict("tiny_rn", cfg), None)[0]
    found = train_shortcuts.inexact_modules(model)
    assert found["text"] == EXACT["text"] and found["image"]["dropout"] == []
    assert found["image"]["batch_norm"][0] == "visual.bn1 (BatchNorm2d)"
    model.lock_image_tower()  # parameters frozen, but batch norm still normalises per batch
    assert train_shortcuts.inexact_modules(model)["image"]["batch_norm"][0] == "visual.bn1 (BatchNorm2d)"
    model.lock_image_tower(freeze_bn_stats=True)  # FrozenBatchNorm2d: exact again
    assert train_shortcuts.inexact_modules(model) == EXACT


def test_shortcut_plan_known_answers():
    assert train_shortcuts.shortcut_plan(EXACT, 4, True) == (True, [])
    hf_text = inexact(text_dropout=["text.transformer.embeddings.dropout (Dropout p=0.1)", "x (Dropout p=0.1)"])
    dedup, notes = train_shortcuts.shortcut_plan(hf_text, 1, True)
    assert dedup is False and len(notes) == 1
    assert notes[0].startswith("caption deduplication off") and "and 1 more" in notes[0]
    assert train_shortcuts.shortcut_plan(hf_text, 1, False) == (False, [])  # already off: nothing to say
    resnet = inexact(image_bn=["visual.bn1 (BatchNorm2d)"])
    dedup, notes = train_shortcuts.shortcut_plan(resnet, 2, True)
    assert dedup is True and len(notes) == 1 and "batch norm (visual.bn1" in notes[0]
    assert train_shortcuts.shortcut_plan(resnet, 1, True) == (True, [])
    dedup, notes = train_shortcuts.shortcut_plan(hf_text, 2, True)
    assert dedup is False and len(notes) == 2 and "replays the random draws" in notes[1]


def test_missing_optional_package_is_named(monkeypatch):
    hf_cfg = {**TINY, "text_cfg": {"hf_model_name": "bert-base-uncased",
                                   "hf_tokenizer_name": "bert-base-uncased", "context_length": 32}}
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(models.MissingPackageError, match="optional package transformers.*"
                                                         "requirements-hf.txt"):
        models.check_optional_packages("hf-hub:org/repo", hf_cfg)
    models.check_optional_packages("tiny_clip", TINY)  # needs nothing optional


# -- local-dir: train, evaluate, and evaluate again without the folder ------------------------------

@pytest.mark.slow
def test_local_dir_trains_evaluates_and_its_checkpoint_needs_no_folder(splits, tmp_path, no_network):
    train_dir, val_dir = splits
    folder = tmp_path / "models" / "tiny"
    weights = write_model_folder(folder, preprocess_cfg=HALF_PREPROCESS)
    spec = f"local-dir:{folder}"
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--model-name", spec,
                                      "--lock-image", "--accum-steps", "2")) == 0
    best = torch.load(save_dir / train_checkpoints.BEST_NAME, weights_only=True)
    assert best["model_name"] == spec and best["pretrained"] == spec
    assert best["model_config"] == TINY
    assert best["preprocess_cfg"]["mean"] == HALF_PREPROCESS["mean"]
    # training started from the folder's weights: the locked image tower still holds them
    visual = [k for k in weights if k.startswith("visual.")]
    assert visual and all(torch.equal(best["state_dict"][k], weights[k]) for k in visual)
    assert not torch.equal(best["state_dict"]["text_projection"], weights["text_projection"])

    # --pretrained FILE with a local-dir architecture: training starts from that file's weights
    again = tmp_path / "again"
    assert train_cli.main(train_argv(train_dir, val_dir, again, "--model-name", spec, "--pretrained",
                                      str(save_dir / train_checkpoints.BEST_NAME), "--lock-image", "--lock-text")) == 0
    final = torch.load(again / train_checkpoints.FINAL_NAME, weights_only=True)
    assert final["pretrained"] == str(save_dir / train_checkpoints.BEST_NAME)
    assert torch.equal(final["state_dict"]["text_projection"], best["state_dict"]["text_projection"])

    assert run_inference(val_dir, save_dir / train_checkpoints.BEST_NAME, tmp_path / "with_folder") == 0
    shutil.rmtree(folder)
    checkpoint = model_loading.resolve_checkpoint(str(save_dir / train_checkpoints.BEST_NAME))
    _model, transform, _tok = model_loading.build_model(spec, checkpoint, torch.device("cpu"))
    assert list(normalize_of(transform).mean) == HALF_PREPROCESS["mean"]  # the folder's, recorded
    assert run_inference(val_dir, save_dir / train_checkpoints.BEST_NAME, tmp_path / "no_folder") == 0
    np.testing.assert_allclose(prob_columns(tmp_path / "no_folder"), prob_columns(tmp_path / "with_folder"),
                               rtol=0, atol=1e-6)
    metrics = json.loads((tmp_path / "no_folder" / "metrics.json").read_text())
    assert metrics["n"] == 13


@pytest.mark.slow
def test_local_dir_zero_shot_equals_its_weights_as_a_state_dict(splits, tmp_path, no_network):
    _train_dir, val_dir = splits
    folder = tmp_path / "tiny"
    write_model_folder(folder)  # default preprocessing, as --model-name tiny_clip uses
    spec = f"local-dir:{folder}"
    assert run_inference(val_dir, spec, tmp_path / "zero_shot") == 0
    assert run_inference(val_dir, folder / "open_clip_model.safetensors", tmp_path / "state_dict",
                         "--model-name", TINY_MODEL) == 0
    np.testing.assert_allclose(prob_columns(tmp_path / "zero_shot"), prob_columns(tmp_path / "state_dict"),
                               rtol=0, atol=1e-6)
    report = (tmp_path / "zero_shot" / "report.md").read_text()
    assert "local-dir model" in report
    assert image_io.file_sha256(folder / "open_clip_model.safetensors") in report
    # the same folder as --baseline of itself: zero difference in every paired metric
    assert run_inference(val_dir, spec, tmp_path / "vs_self", "--baseline", spec) == 0
    comparison = pd.read_csv(tmp_path / "vs_self" / "comparison.csv")
    assert (comparison["difference"].dropna().abs() < 1e-12).all() and len(comparison.dropna(subset=["difference"]))


def test_local_dir_custom_preprocessing_reaches_both_transforms(tmp_path):
    folder = tmp_path / "tiny"
    write_model_folder(folder, preprocess_cfg=HALF_PREPROCESS)
    _model, train_tf, val_tf, _tok = models.create_model(f"local-dir:{folder}", f"local-dir:{folder}")
    assert list(normalize_of(train_tf).mean) == [0.5] * 3 and list(normalize_of(val_tf).std) == [0.25] * 3


# -- hf-hub: offline from the Hugging Face cache ------------------------------------------------------

def write_hf_cache(cache, repo_id, source_folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source_folder, repo / "snapshots" / commit)


@pytest.mark.slow
def test_hf_hub_model_loads_offline_from_the_cache(splits, tmp_path, monkeypatch, no_network, capsys):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    weights = write_model_folder(tmp_path / "download", preprocess_cfg=HALF_PREPROCESS)
    write_hf_cache(tmp_path / "hf_cache", "orbital/tiny-clip", tmp_path / "download")
    spec = "hf-hub:orbital/tiny-clip"
    model, _train_tf, val_tf, _tok = models.create_model(spec, spec)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert list(normalize_of(val_tf).mean) == [0.5] * 3
    train_dir, val_dir = splits
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "run", "--model-name", spec)) == 0
    assert run_inference(val_dir, tmp_path / "run" / train_checkpoints.BEST_NAME, tmp_path / "eval") == 0
    # a repository that is not in the cache: one line naming the flag and the fix, nothing written
    capsys.readouterr()
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "absent",
                                      "--model-name", "hf-hub:orbital/absent")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --model-name hf-hub:orbital/absent: open_clip_config.json is "
                          "neither in the Hugging Face cache") and "Offline use" in err
    assert not (tmp_path / "absent").exists()


# -- refusals ---------------------------------------------------------------------------------------

def test_source_model_refusals(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    folder = tmp_path / "tiny"
    write_model_folder(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(folder / "open_clip_config.json", config_only)
    cases = [
        (["--model-name", f"local-dir:{config_only}"], "--model-name local-dir:", "no weights file"),
        (["--model-name", f"local-dir:{tmp_path / 'missing'}"], "--model-name local-dir:", "no such folder"),
        (["--model-name", f"local-dir:{empty}"], "--model-name local-dir:", "no open_clip_config.json"),
        (["--model-name", f"local-dir:{folder}", "--model-config", str(TINY_CONFIG)], "--model-config", "one of the two"),
        (["--model-name", f"local-dir:{folder}", "--pretrained", "datacomp_s34b_b86k"], "--pretrained", "own weights"),
    ]
    for extra, flag, message in cases:
        with pytest.raises(SystemExit) as exit_:
            train_options.parse_args(train_argv(train_dir, val_dir, tmp_path / "run", *extra))
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: {flag}" in err and message in err, err
    assert not (tmp_path / "run").exists()
    assert run_inference(val_dir, f"local-dir:{empty}", tmp_path / "out") == 2
    assert "error: --checkpoint local-dir:" in capsys.readouterr().err
    assert run_inference(val_dir, f"local-dir:{config_only}", tmp_path / "out") == 2
    assert "no weights file" in capsys.readouterr().err
    # --pretrained none: the folder's architecture from random weights, no weights file needed
    args = train_options.parse_args(train_argv(train_dir, val_dir, tmp_path / "run", "--model-name",
                                            f"local-dir:{config_only}", "--pretrained", "none"))
    assert args.pretrained == "none"
    assert run_inference(val_dir, f"local-dir:{folder}", tmp_path / "out", "--model-name", "ViT-B-32") == 2
    assert "leave --model-name out" in capsys.readouterr().err


def test_missing_transformers_refuses_train_and_inference(splits, tmp_path, monkeypatch, capsys):
    train_dir, val_dir = splits
    folder = tmp_path / "biomed_like"
    folder.mkdir()
    hf_cfg = {**TINY, "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                   "context_length": 256}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": hf_cfg}))
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "run", "--model-name", f"local-dir:{folder}")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --model-name local-dir:{folder}: its text tower is the Hugging Face model")
    assert "optional package transformers" in err and "pip install -r requirements-hf.txt" in err
    assert not (tmp_path / "run").exists()
    assert run_inference(val_dir, f"local-dir:{folder}", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --checkpoint local-dir:") and "optional package transformers" in err
    assert not (tmp_path / "out").exists()


# -- CustomTextCLIP: dedup, accumulation, compile -----------------------------------------------------

TINY_CUSTOM = {**TINY, "custom_text": True}


@pytest.fixture
def custom_text_config(tmp_path):
    path = tmp_path / "tiny_custom_text.json"
    path.write_text(json.dumps(TINY_CUSTOM))
    models.register_model_config(path)
    return path


def accumulated_grads(model, tokenizer, images, labels, captions, accum_steps, dedup):
    args = SimpleNamespace(device=torch.device("cpu"), precision="fp32", accum_steps=accum_steps,
                           logit_scale_mode="exp")
    ctx = {"args": args, "scaler": torch.amp.GradScaler("cpu", enabled=False), "text_dedup": dedup,
           "tokenizer": tokenizer, "loss_fn": train_losses.make_loss("clip")}
    model.zero_grad()
    loss = train_loop.accumulate_gradients(model, images, labels, captions, ctx)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_custom_text_clip_dedup_and_accumulation_are_exact(custom_text_config):
    torch.manual_seed(0)
    model, *_, tokenizer = models.create_model("tiny_custom_text", None)
    assert type(model).__name__ == "CustomTextCLIP"
    assert train_shortcuts.inexact_modules(model) == EXACT
    images = torch.randn(8, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 1])
    captions = prompts.sample_train_captions(labels.tolist(), prompts.load_prompt_set(), prompts.new_rng(0))
    assert len(set(captions)) < len(captions)  # duplicates, so dedup does something
    reference_loss, reference = accumulated_grads(model, tokenizer, images, labels, captions, 1, dedup=False)
    assert "logit_scale" in reference and any(k.startswith("text.") for k in reference)
    for accum_steps, dedup in ((1, True), (4, False), (4, True)):
        loss, grads = accumulated_grads(model, tokenizer, images, labels, captions, accum_steps, dedup)
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        for name in reference:
            assert torch.allclose(grads[name], reference[name], atol=1e-5, rtol=1e-4), (accum_steps, dedup, name)


@pytest.mark.slow
def test_accumulation_replays_dropout_draws(monkeypatch):
    """With patch dropout, the accumulated gradient equals the gradient of the full-batch loss of
    the very features computed per micro-batch in one graph (same RNG stream); without the replay
    the cached negatives come from other draws and it does not."""
    cfg = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": 0.5}}
    name = models.register_model_config_dict("tiny_patch_dropout_accum", cfg)
    torch.manual_seed(0)
    model, *_, tokenizer = models.create_model(name, None)
    model.train()
    images = torch.randn(8, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 1])
    captions = prompts.sample_train_captions(labels.tolist(), prompts.load_prompt_set(), prompts.new_rng(0))
    # reference: one graph, micro-batches of 2 drawn in order from the same starting RNG state
    torch.manual_seed(123)
    model.zero_grad()
    feats = [model(images[c], tokenizer([captions[i] for i in c.tolist()]))
             for c in torch.arange(8).chunk(4)]
    image = torch.cat([f[0] for f in feats])
    text = torch.cat([f[1] for f in feats])
    train_losses.make_loss("clip")(image, text, model.logit_scale.exp(), labels).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(123)
    _loss, grads = accumulated_grads(model, tokenizer, images, labels, captions, 4, dedup=False)
    for key in reference:
        assert torch.allclose(grads[key], reference[key], atol=1e-5, rtol=1e-4), key
    monkeypatch.setattr(train_loop, "set_rng_states", lambda device, states: None)
    torch.manual_seed(123)
    _loss, unreplayed = accumulated_grads(model, tokenizer, images, labels, captions, 4, dedup=False)
    assert not torch.allclose(unreplayed["visual.conv1.weight"], reference["visual.conv1.weight"], atol=1e-5)


def test_text_dropout_switches_dedup_off_in_the_log(caplog):
    torch.manual_seed(0)
    model = models.create_model(TINY_MODEL, None)[0]
    model.transformer.extra = torch.nn.Dropout(0.1)
    with caplog.at_level("WARNING", logger="clip_train"):
        assert train_shortcuts.configure_exact_shortcuts(model, accum_steps=1) is False
    assert train_shortcuts.configure_exact_shortcuts(models.create_model(TINY_MODEL, None)[0], 1) is True
    assert "caption deduplication off" in caplog.text and "transformer.extra (Dropout p=0.1)" in caplog.text


@pytest.mark.slow
def test_custom_text_clip_trains_with_accumulation_and_evaluates(splits, tmp_path, custom_text_config):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--model-config", str(custom_text_config),
                                      "--accum-steps", "2")) == 0
    best = torch.load(save_dir / train_checkpoints.BEST_NAME, weights_only=True)
    assert best["model_config"] == TINY_CUSTOM
    assert any(k.startswith("text.") for k in best["state_dict"])
    assert run_inference(val_dir, save_dir / train_checkpoints.BEST_NAME, tmp_path / "eval") == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 13


def _has_compiler():
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++"))


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on the CPU needs a C/C++ compiler")
@pytest.mark.slow
def test_custom_text_clip_trains_with_compile(splits, tmp_path, custom_text_config):
    train_dir, val_dir = splits
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "run", "--model-config",
                                      str(custom_text_config), "--compile")) == 0
    best = torch.load(tmp_path / "run" / train_checkpoints.BEST_NAME, weights_only=True)
    assert not any("_orig_mod" in k for k in best["state_dict"])


def test_wise_ft_base_from_a_recorded_source_model_or_tag(tmp_path, monkeypatch, no_network):
    """The recorded `pretrained` of a checkpoint is the WiSE-FT base: an hf-hub:/local-dir: model
    is built from its own spec (its folder's weights, named as the spec), a tag on the
    checkpoint's architecture (named 'pretrained tag ...'); either is keyed by 'tag:<spec>'."""
    folder = tmp_path / "start"
    weights = write_model_folder(folder, seed=3)
    spec = f"local-dir:{folder}"
    checkpoint = model_loading.Checkpoint("ours", "best.pt", {"pretrained": spec, "state_dict": {}}, "0" * 64)
    bundle = SimpleNamespace(checkpoint=checkpoint, model_name=models.config_alias(spec))  # as recorded
    base, label, identity = model_loading.wise_ft_base_weights(SimpleNamespace(wise_ft_base=None), bundle)
    assert (label, identity) == (f"`{spec}`", f"tag:{spec}")
    assert base.keys() == weights.keys() and all(torch.equal(base[k], weights[k]) for k in weights)
    built = []
    real_create = models.create_model

    def create(name, pretrained, *args, **kwargs):  # a tag cannot be downloaded here: record it
        built.append((name, pretrained))
        return real_create(name, None, *args, **kwargs)
    monkeypatch.setattr(models, "create_model", create)
    tagged = model_loading.Checkpoint("ours", "best.pt", {"pretrained": "some_tag", "state_dict": {}}, "0" * 64)
    _base, label, identity = model_loading.wise_ft_base_weights(
        SimpleNamespace(wise_ft_base=None), SimpleNamespace(checkpoint=tagged, model_name=TINY_MODEL))
    assert built == [(TINY_MODEL, "some_tag")]
    assert (label, identity) == ("pretrained tag some_tag", "tag:some_tag")
