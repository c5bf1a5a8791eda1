"""When the two speed-ups of a training step (caption deduplication, gradient accumulation) are
exact: modules whose training-mode output depends on more than one input make them inexact."""

import logging

import torch

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


def dropout_rate(module):
    """Drop probability of a module that drops at random in training mode (0.0 for any other):
    torch's Dropout family and MultiheadAttention, open_clip's PatchDropout (`prob`) and timm's
    DropPath/DropBlock (`drop_prob`)."""
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return float(module.p)
    if isinstance(module, torch.nn.MultiheadAttention):
        return float(module.dropout)
    if "Drop" in type(module).__name__:
        for attr in ("prob", "drop_prob", "p"):
            value = getattr(module, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return 0.0


def inexact_modules(model):
    """{tower: {'dropout': [...], 'batch_norm': [...]}} for the 'image' and 'text' towers: the
    modules whose training-mode output for one input depends on more than that input, as
    'name (Type p=...)': dropout with p > 0 (a random draw per call) and batch norm (statistics of
    the whole batch; open_clip's FrozenBatchNorm2d is exact). Names outside `visual.` belong to
    the text tower (CLIP's transformer, CustomTextCLIP's text)."""
    towers = {tower: {"dropout": [], "batch_norm": []} for tower in ("image", "text")}
    for name, module in model.named_modules():
        tower = towers["image" if name == "visual" or name.startswith("visual.") else "text"]
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            tower["batch_norm"].append(f"{name} ({type(module).__name__})")
        elif dropout_rate(module) > 0:
            tower["dropout"].append(f"{name} ({type(module).__name__} p={dropout_rate(module):g})")
    return towers


def shortcut_plan(inexact, accum_steps, text_dedup):
    """(text_dedup, notes): whether caption deduplication stays on, and what the log says.

    Deduplication (each distinct caption through the text tower once) equals encoding every
    caption only when the text tower is deterministic per caption: dropout would give duplicates
    their own draws, batch norm their own statistics, so it is switched off. Accumulation replays
    each micro-batch's random draws (exact for dropout) but batch norm normalises over
    micro-batches: both are said in the log, since neither equals an --accum-steps 1 run.
    """
    notes = []
    text = inexact["text"]["dropout"] + inexact["text"]["batch_norm"]
    if text_dedup and text:
        text_dedup = False
        notes.append("caption deduplication off: the text tower has dropout or batch norm "
                     f"({_first(text)}), so every caption is encoded")
    dropout = inexact["image"]["dropout"] + inexact["text"]["dropout"]
    batch_norm = inexact["image"]["batch_norm"] + inexact["text"]["batch_norm"]
    if accum_steps > 1 and dropout:
        notes.append(f"--accum-steps {accum_steps}: dropout ({_first(dropout)}): each micro-batch's "
                     "gradient pass replays the random draws of its cached pass, so the gradient is "
                     "exact for the features used, but the draws differ from an --accum-steps 1 run")
    if accum_steps > 1 and batch_norm:
        notes.append(f"--accum-steps {accum_steps}: batch norm ({_first(batch_norm)}) normalises "
                     "over micro-batches, not the whole batch, so training differs from --accum-steps 1")
    return text_dedup, notes


def _first(names):
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def configure_exact_shortcuts(model, accum_steps):
    """Whether caption deduplication stays on (off for a text tower with dropout or batch norm),
    logging what accumulation does with such towers (see `shortcut_plan`); call after locking
    (frozen batch norm)."""
    dedup, notes = shortcut_plan(inexact_modules(model), accum_steps, True)
    for note in notes:
        LOG.warning("%s", note)
    return dedup
