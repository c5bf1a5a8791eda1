"""open_clip models: device and precision, architecture sources (names, hf-hub:, local-dir:,
files), optional packages, offline checks, and the one function that builds a model."""

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from orbital_clip import checkpoint, images

# Model names open_clip reads from elsewhere: a Hugging Face Hub repository or a local folder.
MODEL_SCHEMAS = ("hf-hub", "local-dir")


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


def logit_scale(model, mode):
    """The softmax scale of a CLIP model's logits, the one rule of training's loss, its
    validation and inference: exp(logit_scale) (correct CLIP), or the raw log value the
    published code used (`--logit-scale-mode published-log`, for exact reproduction only).
    `model` may be wrapped in DistributedDataParallel."""
    scale = getattr(model, "module", model).logit_scale
    return scale if mode == "published-log" else scale.exp()


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
            detail = images.short_text(str(err).splitlines()[0] if str(err).strip() else type(err).__name__)
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
        model.load_state_dict(checkpoint.load_state_dict_file(weights_file))
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess_train, preprocess_val, tokenizer


def build_model(model_name, pretrained=None, device="cpu", *, model_config=None,
                preprocess_cfg=None, flag="--checkpoint", load_error=None, weights_follow=False):
    """`create_model` with the one error path of the scripts that load a model to use it: a
    CheckpointError naming `flag` for a missing optional package, an unknown architecture (with
    its did-you-mean) or a folder that is gone; with `load_error` (detail -> message), weights
    that cannot be loaded (an unknown tag, offline) are reported by it, else they propagate.
    `weights_follow`: our weights are loaded next, so open_clip's "initialized randomly" warning
    would mislead and is silenced."""
    if weights_follow:
        logging.disable(logging.WARNING)
    try:
        return create_model(model_name, pretrained, device, model_config=model_config,
                            preprocess_cfg=preprocess_cfg)
    except MissingPackageError as err:
        raise checkpoint.CheckpointError(f"{flag} {err}") from None
    except (RuntimeError, OSError, ValueError) as err:
        if load_error is None and not isinstance(err, ValueError):
            raise
        if load_error is None:
            raise checkpoint.CheckpointError(f"{flag} {err}") from None
        text = str(err).strip()
        raise checkpoint.CheckpointError(load_error(text.splitlines()[0] if text else type(err).__name__)) from None
    finally:
        if weights_follow:
            logging.disable(logging.NOTSET)


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


def absolute_source(spec):
    """A model source spelled absolutely: a `local-dir:PATH` folder or a weights file as its
    resolved path, so that the same folder reached from another working folder is the same source
    (and a relative spelling cannot silently name another one there); tags, hf-hub: names, 'none'
    and None are returned as given."""
    if not isinstance(spec, str):
        return spec
    if model_source(spec) == "local-dir":
        return "local-dir:" + str(Path(spec[len("local-dir:"):]).expanduser().resolve())
    if Path(spec).is_file():
        return str(Path(spec).resolve())
    return spec


def source_files(spec):
    """[(name, path)] of the files whose bytes make a model source, sorted by name: a weights file
    alone; for a local-dir: folder its open_clip_config.json and the weights file open_clip loads
    (by their path relative to the folder); [] for tags, hf-hub: names and 'none'. ValueError
    naming the folder when it has no config or weights."""
    if spec in (None, "none"):
        return []
    if model_source(spec) == "local-dir":
        folder = Path(spec[len("local-dir:"):])
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ValueError(f"{spec}: the folder has no open_clip_config.json")
        files = [config_file, local_dir_weights(spec)]
        return sorted((str(Path(p).resolve().relative_to(folder.resolve())), Path(p)) for p in files)
    if isinstance(spec, str) and Path(spec).is_file():
        return [(Path(spec).name, Path(spec))]
    return []


def source_sha256(spec):
    """SHA-256 of a model source's content, or None for a tag, an hf-hub: name or 'none'. A weights
    file: the file's own digest (what `images.file_sha256` gives). A local-dir: folder: the digest of
    one 'relative-path<TAB>file-sha256' line per file of `source_files`, in their sorted order, so
    that renaming or editing the config or the weights changes it and moving the folder does not."""
    files = source_files(spec)
    if not files:
        return None
    if model_source(spec) != "local-dir":
        return images.file_sha256(files[0][1])
    lines = "".join(f"{name}\t{images.file_sha256(path)}\n" for name, path in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def source_mismatch(spec, current, recorded, fix):
    """The one-line refusal of a model source whose content no longer matches the SHA-256 recorded
    when training started (naming the source, both digests and `fix`), or None when they match or
    nothing was recorded (a checkpoint of an older version: the caller warns)."""
    if recorded is None or current is None or current == recorded:
        return None
    what = "folder" if model_source(spec) == "local-dir" else "file"
    return (f"{spec} is not the {what} training started from: its content has SHA-256 {current[:16]}..., "
            f"the checkpoint recorded {recorded[:16]}...; {fix}")
