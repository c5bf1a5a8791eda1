"""The checkpoint: one versioned, typed record, written and read only here.

A checkpoint file is a dict that torch.load(weights_only=True) reads and stock open_clip loads
as `pretrained=PATH`: `state_dict` plus plain-data metadata (see CheckpointRecord).
"""

import dataclasses
import json
from pathlib import Path

import torch

from orbital_clip import outputs

CHECKPOINT_FORMAT = "orbital-clip/1"
# Bumped when a key changes meaning; a file without the key was written before it existed (0).
FORMAT_VERSION = 1
RESUME_KEYS = ("optimizer", "scaler", "rng", "step", "best_value", "best_epoch", "history",
               "stopped", "finished")


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
    """torch.load with weights_only=True: a file that needs arbitrary unpickling is refused, and
    so is one of a newer format_version (every reader of a checkpoint file comes through here)."""
    checkpoint = _load_checkpoint_file(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        check_format_version(checkpoint.get("format_version", 0), path,
                             ours=str(checkpoint.get("format", "")).startswith("orbital-clip/"))
    return checkpoint


def _load_checkpoint_file(path):
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


@dataclasses.dataclass
class TrainingState:
    """What a resume needs beyond the weights (the last checkpoint of clip_train.py only)."""
    optimizer: dict
    scaler: dict
    rng: list  # one RNG snapshot per process, in rank order
    step: int
    best_value: float
    best_epoch: int | None
    history: list  # one plain dict per epoch
    stopped: bool = False  # early-stopped: a resume trains no further
    finished: bool = False  # final checkpoint and WiSE-FT written: --resume auto changes nothing


@dataclasses.dataclass
class CheckpointRecord:
    """What our checkpoints hold. Metadata fields are plain data; None means "not recorded" and
    is not written (readers of the file see the key absent, as in files of older versions)."""
    state_dict: dict
    format: str | None = CHECKPOINT_FORMAT  # None: a plain state_dict, no metadata at all
    format_version: int = FORMAT_VERSION
    # the architecture and its weights
    model_name: str | None = None
    model_config: dict | None = None  # a custom or hf-hub:/local-dir: architecture, rebuilt offline
    pretrained: str | None = None  # open_clip tag, weights file, or hf-hub:/local-dir: model
    pretrained_sha256: str | None = None  # of a pretrained file: WiSE-FT refuses another file
    preprocess: dict | None = None
    preprocess_cfg: dict | None = None  # open_clip's mean/std/resize of the image tower
    # classes and how they are scored
    class_folders: list | None = None
    prompts: dict | None = None
    logit_scale_mode: str | None = None
    operating_point: dict | None = None  # tuned on validation only
    temperature: float | None = None
    wise_ft: dict | None = None
    # the run
    epoch: int | None = None
    metrics: dict | None = None
    select_metric: str | None = None
    args: dict | None = None
    argv: list | None = None
    data: dict | None = None  # train/val folders as absolute paths (overlap check at inference)
    # baselines/train_cnn.py
    arch: str | None = None
    image_size_px: int | None = None
    normalize: dict | None = None
    weights: dict | None = None
    resume: TrainingState | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # keys this version does not know

    @property
    def is_ours(self):
        """Written by clip_train.py (metadata), not a plain open_clip state_dict."""
        return str(self.format or "").startswith("orbital-clip/") or self.model_name is not None


# Fields read back only when of these types: a damaged or foreign value counts as not recorded.
FIELD_TYPES = {"model_config": dict, "pretrained": str, "pretrained_sha256": str,
               "preprocess": dict, "preprocess_cfg": dict, "class_folders": (list, tuple),
               "prompts": dict, "logit_scale_mode": str, "operating_point": dict, "wise_ft": dict,
               "metrics": dict, "args": dict, "data": dict, "arch": str, "normalize": dict}
METADATA_FIELDS = [f.name for f in dataclasses.fields(CheckpointRecord)
                   if f.name not in ("state_dict", "format", "format_version", "resume", "extra")]


def record_from_dict(data, path):
    """The CheckpointRecord of a loaded checkpoint dict (ours, any version) or a plain
    state_dict; CheckpointError naming `path` when it holds neither."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        known = {"state_dict", "format", "format_version", *METADATA_FIELDS, *RESUME_KEYS}
        fields = {name: data.get(name) for name in METADATA_FIELDS}
        for name, types in FIELD_TYPES.items():
            if not isinstance(fields[name], types):
                fields[name] = None
        resume = None
        if "optimizer" in data:
            resume = TrainingState(**{key: data.get(key) for key in RESUME_KEYS})
            resume.stopped, resume.finished = bool(resume.stopped), bool(resume.finished)
        return CheckpointRecord(
            state_dict=data["state_dict"], format=data.get("format"),
            format_version=data.get("format_version", 0), resume=resume,
            extra={k: v for k, v in data.items() if k not in known}, **fields)
    if isinstance(data, dict) and data and all(torch.is_tensor(v) for v in data.values()):
        return CheckpointRecord(state_dict=data, format=None, format_version=0)
    raise CheckpointError(f"{path}: holds no model state_dict")


def check_format_version(version, path, ours=True):
    """Refuse a checkpoint written by a newer Orbital-CLIP: its keys may mean what this code does
    not know, and reading them as ours would score with the wrong rule. Older files (version 0:
    before the key existed, or a plain state_dict) are read as they are."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        if not ours:  # another writer's own metadata key (a safetensors header), not our version
            return
        raise CheckpointError(f"{path}: format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                              f"code's ({FORMAT_VERSION}); upgrade Orbital-CLIP to read it")


def record_to_dict(record):
    """The file's dict: format, format_version, clean state_dict, then the recorded metadata."""
    payload = {"format": record.format, "format_version": record.format_version,
               "state_dict": clean_state_dict(record.state_dict)}
    payload.update({name: getattr(record, name) for name in METADATA_FIELDS
                    if getattr(record, name) is not None})
    if record.resume is not None:
        payload.update(dataclasses.asdict(record.resume))
    payload.update(record.extra)
    return payload


def read_checkpoint(path):
    """The CheckpointRecord in a file (ours of any version, a plain state_dict, safetensors),
    read without unpickling objects."""
    return record_from_dict(load_checkpoint_file(path), path)


def write_checkpoint(path, record):
    """Write a CheckpointRecord atomically (the one writer of checkpoint files)."""
    _save(path, record_to_dict(record))


def _save(path, payload):
    outputs.atomic_write(path, lambda handle: torch.save(payload, handle))


def save_safetensors(path, model, metadata):
    """The weights alone as .safetensors (no pickle at all), with string metadata; open_clip
    loads it as `pretrained=path`."""
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    header = {k: json.dumps(v) for k, v in metadata.items()}
    data = save(tensors, metadata=header)
    outputs.atomic_write(path, lambda handle: handle.write(data))
