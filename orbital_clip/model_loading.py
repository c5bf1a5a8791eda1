"""What inference.py scores: a --checkpoint or --baseline resolved to a Checkpoint (a file of
clip_train.py, a plain open_clip state_dict, a pretrained tag, an hf-hub:/local-dir: model), its
architecture, the model built from it with its evaluation transform, and the WiSE-FT base weights.

Models are built by models.build_model and checkpoint files read by checkpoint.py; this module
only decides which of them a command line names.
"""

import dataclasses
import logging
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from orbital_clip import checkpoint as ckpt
from orbital_clip import images
from orbital_clip import models as model_lib

LOG = logging.getLogger("inference")  # the scoring command's logger (scoring.py)
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}


@dataclasses.dataclass
class Checkpoint:
    """A resolved --checkpoint or --baseline."""
    kind: str  # 'ours' (clip_train.py), 'state_dict' (plain open_clip weights) or 'tag'
    spec: str  # the path or pretrained tag as given
    data: dict | None  # the loaded file; None for a tag
    sha256: str | None  # of the file; None for a tag
    record: ckpt.CheckpointRecord | None = None  # the file as a record (from `data` when not given)

    def __post_init__(self):
        if self.record is None and self.data is not None and self.kind != "tag":
            self.record = ckpt.record_from_dict(self.data, self.spec)


def checkpoint_kind(data):
    """'ours' (state_dict + metadata), 'state_dict' (plain weights), or None."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        ours = str(data.get("format", "")).startswith("orbital-clip/") or "model_name" in data
        return "ours" if ours else "state_dict"
    if isinstance(data, dict) and data and all(torch.is_tensor(v) for v in data.values()):
        return "state_dict"
    return None


def resolve_checkpoint(spec, flag="--checkpoint"):
    """The Checkpoint of a checkpoint file or an open_clip pretrained tag; an hf-hub:ORG/REPO or
    local-dir:PATH model counts as a tag (zero-shot weights named, not a file), with the SHA-256 of
    a local-dir's weights file."""
    if model_lib.model_source(spec):
        return resolve_source_model(spec, flag)
    path = Path(spec)
    if path.is_file():
        try:
            data = ckpt.load_checkpoint_file(path)
        except ckpt.CheckpointError as err:  # e.g. refused: it would unpickle arbitrary objects
            raise ckpt.CheckpointError(f"{flag} {err}") from None
        kind = checkpoint_kind(data)
        if kind is None:
            raise ckpt.CheckpointError(f"{flag} {path}: holds no model state_dict (expected a "
                                         "checkpoint of clip_train.py or a plain open_clip state_dict)")
        return Checkpoint(kind, str(path), data, images.file_sha256(path))
    if path.exists():
        raise ckpt.CheckpointError(f"{flag} {path}: is a folder, not a checkpoint file")
    if looks_like_file(spec):
        raise ckpt.CheckpointError(f"{flag} {path}: no such checkpoint file")
    return Checkpoint("tag", str(spec), None, None)


def resolve_source_model(spec, flag):
    """The checkpoint record of an hf-hub:/local-dir: model (a local-dir is checked here)."""
    sha256 = None
    if model_lib.model_source(spec) == "local-dir":
        try:
            model_lib.read_model_config(spec)
            sha256 = images.file_sha256(model_lib.local_dir_weights(spec))
        except ValueError as err:
            raise ckpt.CheckpointError(f"{flag} {err}") from None
    return Checkpoint("tag", str(spec), None, sha256)


def checked_start_source(spec, recorded_sha256):
    """The SHA-256 of a recorded WiSE-FT base (a weights file or a local-dir: folder), refused
    (ValueError) when it differs from the digest recorded at training; a checkpoint of an older
    version without the digest is warned about and used."""
    try:
        sha256 = model_lib.source_sha256(spec)
    except ValueError as err:  # a local-dir: folder without its config or weights
        raise ValueError(f"--wise-ft-alpha: {err}; pass --wise-ft-base PATH") from None
    if recorded_sha256 is None:
        LOG.warning("--wise-ft-alpha: the checkpoint records no SHA-256 of its starting weights %s "
                    "(written by an older version); they are used as they are now", spec)
    refusal = model_lib.source_mismatch(spec, sha256, recorded_sha256,
                                        "pass --wise-ft-base PATH with the original weights")
    if refusal:
        raise ValueError(f"--wise-ft-alpha: {refusal}")
    return sha256


def looks_like_file(spec):
    """A weights spec meant as a file (a weights suffix or a folder part), not a pretrained tag."""
    path = Path(spec)
    return path.suffix.lower() in WEIGHT_SUFFIXES or len(path.parts) > 1


def requested_model_name(args):
    """--model-name, or the --model-config stem (registered with open_clip on the way)."""
    config_name = None
    if args.model_config:
        config_name, _config = model_lib.register_model_config(args.model_config)
        if args.model_name and args.model_name != config_name:
            raise ValueError(f"--model-name {args.model_name} differs from the --model-config "
                             f"architecture {config_name}")
    return args.model_name or config_name


def resolve_model_name(requested, checkpoint, flag="--model-name", role="--checkpoint"):
    """The architecture: the checkpoint's own, else `requested` (the value of `flag`)."""
    if model_lib.model_source(checkpoint.spec) and checkpoint.kind == "tag":  # hf-hub:/local-dir:
        if requested and requested != checkpoint.spec:
            raise ValueError(f"{flag} {requested}: {role} {checkpoint.spec} brings its own "
                             f"architecture; leave {flag} out")
        return checkpoint.spec
    if checkpoint.kind != "ours":
        if not requested:
            what = "a pretrained tag" if checkpoint.kind == "tag" else "a plain state_dict"
            raise ValueError(f"{flag} is required: {role} {checkpoint.spec} is {what} "
                             "without architecture metadata (e.g. --model-name ViT-B-32-256)")
        return requested
    name = checkpoint.record.model_name
    if not isinstance(name, str) or not name:
        raise ckpt.CheckpointError(f"{checkpoint.spec}: metadata lacks the model_name")
    if requested and requested != name:
        raise ValueError(f"{flag} {requested} differs from the architecture {name} stored in "
                         f"{checkpoint.spec}; leave {flag} out to use the checkpoint's")
    if checkpoint.record.model_config is not None:
        model_lib.register_model_config_dict(name, checkpoint.record.model_config)
    return name


def load_weights(model, model_name, checkpoint):
    """Load a file checkpoint's state_dict into the model, with a clear error when it does not fit."""
    ckpt.load_weights_into(model, checkpoint.record.state_dict, checkpoint.spec, model_name)


def eval_transform(model, model_name, pretrained, default):
    """The evaluation transform the weights were trained with: the pretrained tag's mean, std and
    resizing when the checkpoint names a tag (as clip_train.py used), else `default`."""
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if isinstance(pretrained, str) else {}
    base = getattr(model.visual, "preprocess_cfg", None)
    if not tag_cfg or base is None:
        return default
    return image_transform_v2(PreprocessCfg(**merge_preprocess_dict(base, tag_cfg)), is_train=False)


def build_model(model_name, checkpoint, device, flag="--checkpoint"):
    """(model in eval mode, evaluation transform, tokenizer) for a checkpoint file or a tag."""
    spec = checkpoint.spec
    if checkpoint.kind == "tag":
        if model_name in open_clip.list_models():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if spec not in tags:
                raise ckpt.CheckpointError(f"{flag} {spec}: not a file, nor a pretrained tag of "
                                           f"{model_name} (its tags: {', '.join(tags) or 'none'})")
        model, _train_tf, preprocess, tokenizer = model_lib.build_model(
            model_name, spec, device, flag=flag,
            load_error=lambda detail: (f"{flag} {spec}: could not load the pretrained weights of "
                                       f"{model_name} ({detail[:300]}); offline, pass a local weights file"))
        return model.eval(), preprocess, tokenizer
    # Our checkpoints rebuild from their recorded architecture and preprocessing: an hf-hub: or
    # local-dir: model needs neither the Hub nor the folder any more.
    record = checkpoint.record
    ours = checkpoint.kind == "ours"
    model, _train_tf, preprocess, tokenizer = model_lib.build_model(
        model_name, None, device, model_config=record.model_config if ours else None,
        preprocess_cfg=record.preprocess_cfg if ours else None, flag=flag, weights_follow=True)
    load_weights(model, model_name, checkpoint)
    pretrained = record.pretrained if ours else None
    return model.eval(), eval_transform(model, model_name, pretrained, preprocess), tokenizer


def wise_ft_base_weights(args, bundle):
    """(state_dict, label, identity) of the WiSE-FT base: --wise-ft-base, else the checkpoint's
    recorded `pretrained` (a local weights file or an open_clip tag)."""
    checkpoint = bundle.checkpoint
    refuse_wise_ft_of_probe(checkpoint)  # before any advice about its base weights
    if checkpoint.kind == "tag":
        raise ValueError(f"--wise-ft-alpha: --checkpoint {checkpoint.spec} is a pretrained tag; "
                         "WiSE-FT needs fine-tuned weights (a checkpoint file)")
    if args.wise_ft_base:
        path = Path(args.wise_ft_base)
        try:
            weights = ckpt.load_state_dict_file(path)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"--wise-ft-base {err}") from None
        return weights, f"`{path}`", images.file_sha256(path)
    record = checkpoint.record if checkpoint.kind == "ours" else None
    pretrained = record.pretrained if record else None
    if not pretrained:
        raise ValueError(f"--wise-ft-alpha: {checkpoint.spec} records no pretrained weights "
                         "(trained from scratch, or a plain state_dict); pass --wise-ft-base PATH")
    source = model_lib.model_source(pretrained)  # an hf-hub:/local-dir: model brings its architecture
    local = Path(pretrained[len("local-dir:"):]) if source == "local-dir" else Path(pretrained)
    if (local.is_file() or source == "local-dir") and not local.is_absolute():
        # a relative path recorded before paths were made absolute
        raise ValueError(f"--wise-ft-alpha: the checkpoint records the pretrained weights as the "
                         f"relative path {pretrained}, which may be another model from this folder; "
                         "pass --wise-ft-base PATH")
    on_disk = local.is_file() or (source == "local-dir" and local.is_dir())
    sha256 = checked_start_source(pretrained, record.pretrained_sha256) if on_disk else None
    if local.is_file():
        return ckpt.load_state_dict_file(pretrained), f"`{pretrained}`", sha256
    if not source and looks_like_file(pretrained):
        raise ValueError(f"--wise-ft-alpha: the recorded pretrained weights {pretrained} are not "
                         "on this machine; pass --wise-ft-base PATH")
    base_model, *_ = model_lib.build_model(
        pretrained if source else bundle.model_name, pretrained, flag="--wise-ft-alpha:",
        load_error=lambda detail: (f"--wise-ft-alpha: could not load the pretrained weights "
                                   f"{pretrained} ({detail[:200]}); offline, pass --wise-ft-base PATH"))
    label = f"`{pretrained}`" if source else f"pretrained tag {pretrained}"
    return ckpt.clean_state_dict(base_model.state_dict()), label, f"tag:{pretrained}"


# ----------------------------------------------------------------------------------------------
# A linear-probe checkpoint (linear_probe.py): our checkpoint of the frozen model whose `linear_probe`
# entry holds a linear head; inference scores the image features with it instead of the prompts.

PROBE_KEY = "linear_probe"


def linear_head(checkpoint, folders=None):
    """(weight (C, D), bias (C,)) float64 tensors of a linear-probe checkpoint, else None; a
    CheckpointError naming the file when the head is damaged. With `folders` (the class order
    the caller labels its columns in, e.g. from --prompts) the rows follow that order, matched by
    class name; another class set is refused: the head scores the classes it was fitted on."""
    record = checkpoint.record if checkpoint.kind == "ours" else None
    head = record.extra.get(PROBE_KEY) if record is not None else None
    if head is None:
        return None
    weight, bias = (head.get(k) if isinstance(head, dict) else None for k in ("weight", "bias"))
    n_classes = len(record.class_folders or [])
    if not (torch.is_tensor(weight) and torch.is_tensor(bias) and weight.ndim == 2
            and bias.shape == (weight.shape[0],) and weight.shape[0] == n_classes):
        raise ckpt.CheckpointError(f"{checkpoint.spec}: its {PROBE_KEY} head is not a (classes, "
                                   f"features) weight and a (classes,) bias for {n_classes} classes")
    stored = list(record.class_folders)
    if folders is None or list(folders) == stored:
        return weight.double(), bias.double()
    if sorted(folders) != sorted(stored):
        raise ckpt.CheckpointError(f"--prompts: classes {list(folders)} differ from the classes "
                                   f"{stored} of the linear probe {checkpoint.spec}; its head scores "
                                   "those only: leave --prompts out")
    order = [stored.index(folder) for folder in folders]  # head row of each evaluated column
    return weight[order].double(), bias[order].double()


def refuse_wise_ft_of_probe(checkpoint):
    """A ValueError for WiSE-FT of a linear-probe checkpoint: its tower is the frozen starting
    model, so every alpha would interpolate a model with itself and change nothing but the labels."""
    if linear_head(checkpoint) is not None:
        raise ValueError(f"--wise-ft-alphas: {checkpoint.spec} is a linear-probe checkpoint (frozen "
                         "tower); WiSE-FT does not apply")


def linear_head_logits(features, head):
    """Logits (N, C) float64 of L2-normalised image features (N, D) under a linear head: the one
    rule the probe is fitted, validated and evaluated by (scikit-learn's decision_function)."""
    weight, bias = head
    features = torch.as_tensor(features).double()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features @ weight.T + bias
