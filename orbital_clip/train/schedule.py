"""The recipes, the learning-rate schedule and the optimizer's parameter groups."""

import json
import math
from importlib import resources


# The recipes are files shipped inside the package, orbital_clip/configs/<name>.json (`--recipe
# NAME`; `--config FILE` takes any such file): "paper" is the published protocol; "recommended"
# what works better on small, imbalanced cohorts. Each entry applies only where the flag was not
# given explicitly. Read when asked, through importlib.resources, so an installed copy (a wheel,
# a zip) finds them and importing this module reads no file.
RECIPE_NAMES = ("paper", "recommended")


def read_recipe(name):
    """{dest: value} of the built-in recipe `name` (one of RECIPE_NAMES)."""
    if name not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {name!r} (expected one of {', '.join(RECIPE_NAMES)})")
    text = resources.files("orbital_clip").joinpath("configs", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def resolve_recipe(args):
    """Fill every flag the user left unset (None) from the chosen recipe: explicit flags win."""
    for key, value in read_recipe(args.recipe).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def lr_at_step(step, base_lr, warmup_steps, total_steps, schedule):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then const or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "const":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def warmup_steps(spec, total_steps):
    """`--warmup` as steps: an integer, or a percentage of all steps ('5%')."""
    spec = str(spec)
    if spec.endswith("%"):
        return int(round(float(spec[:-1]) / 100.0 * total_steps))
    return int(spec)


def param_groups(model, weight_decay):
    """AdamW groups: decay on weight matrices only; none on biases, norms, embeddings' gains
    and the logit scale (decaying the temperature towards 1 would fight the loss)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "logit_scale" in name or "bias" in name or ".ln" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
