"""What a run leaves for people to read: the per-epoch history (CSV, JSON lines, training
curves), MODEL_CARD.md and the closing summary line."""

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from orbital_clip import cli
from orbital_clip import outputs
from orbital_clip import prompts as prompt_sets
from orbital_clip.metrics import wilson_interval
from orbital_clip.report.figures import legend_below, save_figure
from orbital_clip.train.checkpoints import BEST_NAME
from orbital_clip.train.health import describe_signs


def figure_saver(folder):
    """save(fig, file_name, **savefig_kwargs) for report.save_figure: atomic files in `folder`."""
    return lambda fig, name, **kwargs: outputs.atomic_save_figure(fig, Path(folder) / name, **kwargs)


def write_history(save_dir, history, select_metric):
    """metrics.csv and train_log.jsonl (one row / JSON line per epoch, rewritten whole from the
    history so they always agree with the last checkpoint) and training_curves.png."""
    matplotlib.use("Agg")  # files only, no display
    frame = pd.DataFrame(history)
    outputs.atomic_write_csv(Path(save_dir) / "metrics.csv", frame)
    outputs.atomic_write_text(Path(save_dir) / "train_log.jsonl",
                             "".join(json.dumps(row) + "\n" for row in history))
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 5.2))
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o", label="train (contrastive)")
    ax_loss.plot(frame["epoch"], frame["val_loss"], marker="o", label="validation (zero-shot CE)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    legend_below(ax_loss)  # below the axes: a legend inside covers some epoch's values
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "rare_sensitivity"):
        ax_metric.plot(frame["epoch"], frame[name], marker=".", label=name.replace("_", " "))
    best = frame[frame["is_best"]]
    if len(best):
        ax_metric.axvline(best["epoch"].iloc[-1], color="grey", linestyle="--",
                          label=f"best ({select_metric})")
    ax_metric.set(xlabel="epoch", ylabel="validation", ylim=(-0.02, 1.02), title="Validation")
    legend_below(ax_metric, fontsize=8)
    save_figure(plt, fig, figure_saver(save_dir), "training_curves", formats=("png",))


def done_summary(state, args):
    """The last line's numbers: the best epoch's --select-metric and the rare-class threshold
    stored with it (validation sensitivity and specificity), rounded for reading."""
    return "; ".join([best_summary(state, args), *run_warnings(state)])


def run_warnings(state):
    """What went wrong, in words: the collapse signs of the last epoch, and a best epoch whose
    rare-class validation sensitivity (argmax) is 0. [] for a healthy run."""
    history = state["history"]
    warnings = []
    if history and history[-1].get("collapse"):
        warnings.append("WARNING " + describe_signs(history[-1]["collapse"].split()))
    row = next((r for r in history if r["epoch"] == state["best_epoch"]), {})
    if row.get("rare_sensitivity") == 0:
        warnings.append(f"WARNING the best epoch ({state['best_epoch']}) finds no rare-class "
                        "validation image (sensitivity 0.000 by argmax); try --select-metric "
                        "balanced_accuracy or rare_sensitivity, or --recipe recommended")
    return warnings


def best_summary(state, args):
    """The best epoch's --select-metric and its stored rare-class threshold, rounded for reading."""
    if state["best_epoch"] is None:
        return "no epoch improved on the start"
    row = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), {})
    text = f"best {args.select_metric} {state['best_value']:.3f} at epoch {state['best_epoch']}"
    threshold = row.get("operating_threshold")
    if threshold is None or not math.isfinite(threshold):
        return text + f"; no rare-class threshold stored in {BEST_NAME}"
    return (text + f"; {BEST_NAME} stores the rare-class threshold {threshold:.3f} (validation "
            f"sensitivity {row['operating_val_sensitivity']:.2f}, specificity "
            f"{row['operating_val_specificity']:.2f})")


def proportion_with_ci(value, n):
    """'0.750 (95% CI 0.409-0.929, n = 8)': a validation proportion with its Wilson interval
    (k recovered from the rate and its denominator), or 'n/a'."""
    if value is None or not math.isfinite(value) or not n:
        return "n/a"
    low, high = wilson_interval(round(value * n), n)
    return f"{value:.3f} (95% CI {low:.3f}-{high:.3f}, n = {n})"


def model_card(args, classes, train_items, val_items, state):
    """MODEL_CARD.md: data, classes, prompts, recipe, the best epoch's validation metrics with
    CIs, the stored threshold, intended use and limits (Mitchell et al. 2019, shortened)."""
    folders = prompt_sets.class_folders(classes)
    count = lambda items, k: sum(label == k for _path, label in items)  # noqa: E731
    row = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), None) or {}
    n_val, n_rare = row.get("val_images", len(val_items)), count(val_items, 0)
    number = lambda key: "n/a" if row.get(key) is None else f"{row[key]:.3f}"  # noqa: E731
    lines = ["# Model card", "",
             f"Fine-tuned `{args.model_name}` (from `{args.pretrained}`) by clip_train.py; weights in "
             f"`{BEST_NAME}` (epoch {state['best_epoch']} of {state['epoch']}), the command in args.json.", "",
             "## Data", "", f"- training: `{args.train_dir}`; validation: `{args.val_dir}`",
             "", "| class | training images | validation images |", "| --- | ---: | ---: |"]
    lines += [f"| {f} | {count(train_items, k)} | {count(val_items, k)} |" for k, f in enumerate(folders)]
    lines += ["", "## Classes and prompts", "", f"Rare, clinically critical class: **{folders[0]}**.", ""]
    lines += [f"- {c.folder}: training {list(c.train)}; evaluation {list(c.eval)}" for c in classes]
    lines += ["", "## Recipe", "", f"{cli.config_source(args)}: lr {args.lr:g}, weight decay {args.weight_decay:g}, "
              f"batch {args.batch_size}, {args.epochs} epochs, loss {args.loss}, schedule {args.schedule} "
              f"(warmup {args.warmup}), balanced sampling {'on' if args.balanced_sampling else 'off'}, "
              f"best epoch by validation {args.select_metric}, seed {args.seed}, precision {args.precision}.",
              "", "## Validation (best epoch)", "",
              f"- accuracy {proportion_with_ci(row.get('accuracy'), n_val)}",
              f"- {folders[0]} sensitivity (argmax) {proportion_with_ci(row.get('rare_sensitivity'), n_rare)}",
              f"- balanced accuracy {number('balanced_accuracy')}, macro F1 {number('macro_f1')}, "
              f"macro AUROC {number('macro_auroc')} (no interval: the bootstrap ones come from inference.py)",
              f"- stored operating threshold: p({folders[0]}) >= {number('operating_threshold')}, chosen for "
              f"sensitivity >= {args.target_sensitivity:g}: sensitivity "
              f"{proportion_with_ci(row.get('operating_val_sensitivity'), n_rare)}, specificity "
              f"{proportion_with_ci(row.get('operating_val_specificity'), n_val - n_rare)}",
              "", "## Warnings", "", *([f"- {w}" for w in run_warnings(state)] or ["- none"]),
              "", "## Intended use and limits", "",
              "- Research use: triage support studies of the classes above on images like the training "
              "ones; not a medical device, not for diagnosis without a clinician.",
              "- Validated only on the validation images above, which tuned the epoch and the threshold: "
              "report performance from an external cohort (inference.py), never from these numbers.",
              "- Small validation sets give wide intervals; other cameras, centres and populations may "
              "shift both the probabilities and the threshold's sensitivity."]
    return "\n".join(lines) + "\n"
