"""The model a run trains: architecture and starting weights from the flags, and which of
its parameters train."""

import logging
from pathlib import Path

from orbital_clip import checkpoint as ckpt
from orbital_clip import models

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


def setup_model(args):
    """Register a custom config, build the model; returns (model, train tf, val tf, tokenizer, config).

    The config is recorded in every checkpoint for --model-config and for hf-hub:/local-dir:
    models, so inference rebuilds the architecture with neither the file, the Hub nor the folder."""
    model_config = None
    if args.model_config:
        name, model_config = models.register_model_config(args.model_config)
        if name != args.model_name:
            raise ValueError(f"--model-name {args.model_name} differs from the --model-config "
                             f"architecture {name}")
    try:
        config = models.read_model_config(args.model_name) if model_config is None else model_config
        models.check_optional_packages(args.model_name, config)
    except ValueError as err:
        raise ValueError(f"--model-name {err}") from None
    if models.model_source(args.model_name):
        model_config = config
    pretrained = None if args.pretrained == "none" else args.pretrained
    if pretrained and Path(pretrained).is_file():
        weights = pretrained_weights(pretrained, args.model_name)
        model, train_tf, val_tf, tokenizer = models.create_model(args.model_name, None, args.device)
        try:
            ckpt.load_weights_into(model, weights, pretrained, args.model_name)
        except ckpt.CheckpointError as err:
            raise ValueError(f"--pretrained {err}") from None
        return model, train_tf, val_tf, tokenizer, model_config
    if pretrained and not models.model_source(args.model_name):  # an open_clip tag
        problem = models.offline_weights_problem(args.model_name, pretrained)
        if problem:
            raise ValueError(f"--pretrained {pretrained}: {problem}")
    try:
        model, train_tf, val_tf, tokenizer = models.create_model(args.model_name, pretrained, args.device)
    except (RuntimeError, OSError) as err:
        if pretrained:  # a tag or the hub/folder's own weights (a file was handled above)
            raise ValueError(f"--pretrained {pretrained}: could not load these weights for "
                             f"{args.model_name} ({str(err).splitlines()[0][:200]}); offline, pass "
                             "--pretrained none or a local weights file") from None
        raise ValueError(f"--pretrained {pretrained}: {str(err).splitlines()[0][:300]}") from None
    if pretrained is None:
        warn_random_init(model, args)
    return model, train_tf, val_tf, tokenizer, model_config


def warn_random_init(model, args):
    """--pretrained none: say when random weights will not become a useful model."""
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    if not args.model_config and not models.model_source(args.model_name):
        LOG.warning("--pretrained none: %s (%.0f M parameters) starts from random weights; CLIP "
                    "needs hundreds of millions of image-text pairs to learn from scratch, a clinical "
                    "cohort does not suffice. Pass an open_clip tag or --pretrained PATH to weights",
                    args.model_name, millions)
    if args.lr < 1e-5:
        LOG.warning("--pretrained none with --lr %g: random weights barely move below 1e-5 (the "
                    "published 1e-8 is meant for small steps away from pretrained weights)", args.lr)


def pretrained_weights(path, model_name):
    """State dict of a --pretrained weights file, loaded without unpickling objects; refused
    (ValueError naming the flag and the file) when unsafe, unreadable or of another architecture."""
    try:
        record = ckpt.read_checkpoint(path)
        recorded = record.model_name
        if isinstance(recorded, str) and recorded != model_name:
            raise ckpt.CheckpointError(f"{path}: holds architecture {recorded}, not --model-name "
                                         f"{model_name}; pass --model-name {recorded}")
        return ckpt.checkpoint_state_dict(record.state_dict, path)
    except ckpt.CheckpointError as err:
        raise ValueError(f"--pretrained {err}") from None


def configure_trainable(model, args):
    """--lock-image / --lock-text (LiT-style, last N blocks left trainable) and checkpointing."""
    if args.lock_image is not None:
        model.lock_image_tower(unlocked_groups=args.lock_image)
    if args.lock_text is not None:
        model.lock_text_tower(unlocked_layers=args.lock_text)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    LOG.info("trainable parameters: %d of %d (%.1f%%)", trainable, total, 100.0 * trainable / total)
