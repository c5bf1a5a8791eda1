"""Few-shot curves (linear_probe.py --few-shot): the linear probe trained on k images per class
(k = 1, 2, 4, 8, 16, all), repeated seeded draws, C chosen on the full validation split for each
draw, scored on --test-dir; zero-shot CLIP (the same frozen model and the prompts) is the k = 0
reference line. A class with fewer than k training images contributes all it has (its k is
capped, and fewshot.csv says so per row). Fine-tuning at equal budget is not run here.

    $ python linear_probe.py --train-dir dataset_root/train --val-dir dataset_root/val \\
          --model-name ViT-B-32-256 --pretrained datacomp_s34b_b86k --out-dir probe_runs/vit \\
          --few-shot 1 2 4 8 16 all --draws 5 --test-dir external_cohort
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from orbital_clip import models as model_lib
from orbital_clip import outputs
from orbital_clip import zero_shot
from orbital_clip.metrics import selection_metrics, softmax
from orbital_clip.probe_fit import head_logits, sweep_c

LOG = logging.getLogger("linear_probe")
FEW_SHOT_KS = ("1", "2", "4", "8", "16", "all")
DEFAULT_DRAWS = 5
CURVE_METRICS = ("balanced_accuracy", "macro_auroc")


def parse_k(text):
    """A --few-shot value: a positive integer or 'all'."""
    if text == "all":
        return text
    value = int(text)
    if value < 1:
        raise ValueError(f"k must be >= 1 or 'all', got {text}")
    return str(value)


def draw_few_shot(labels, k, n_classes, rng):
    """(indices, k per class): k images per class drawn without replacement (all of a class
    with fewer than k; every image for k 'all'), in ascending index order."""
    labels = np.asarray(labels)
    chosen, per_class = [], []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        take = len(members) if k == "all" else min(int(k), len(members))
        chosen.append(members if take == len(members) else rng.choice(members, take, replace=False))
        per_class.append(take)
    return np.sort(np.concatenate(chosen)), per_class


def curve_rows(train, val, test, n_classes, ks, draws, grid, seed):
    """One row per (k, draw): test metrics of a probe fitted on that draw (C swept on `val`)."""
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = train, val, test
    rows = []
    for k in ks:
        for draw in range(1 if k == "all" else draws):  # 'all' has one possible draw
            rng = np.random.default_rng([seed, draw])
            index, per_class = draw_few_shot(train_y, k, n_classes, rng)
            fit = sweep_c(train_x[index], train_y[index], val_x, val_y, n_classes, grid, seed)
            scores = selection_metrics(test_y, softmax(head_logits(test_x, fit.weight, fit.bias)))
            rows.append({"method": "linear probe", "k": k, "draw": draw,
                         "k_per_class": " ".join(map(str, per_class)),
                         "capped": k != "all" and min(per_class) < int(k),
                         "n_train": int(len(index)), "c": fit.c,
                         **{f"test_{m}": scores[m] for m in CURVE_METRICS}})
    return rows


def zero_shot_row(frozen, classes, test_x, test_y, device):
    """The zero-shot reference (k = 0): the frozen model's prompts on the same test features."""
    with torch.inference_mode():
        classifier = zero_shot.build_zero_shot_classifier(
            frozen.model, frozen.tokenizer, [list(c.eval) for c in classes], device)
        logits = zero_shot.zero_shot_logits(torch.from_numpy(test_x), classifier.float().cpu(),
                                            model_lib.logit_scale(frozen.model, frozen.logit_scale_mode).float().cpu())
    scores = selection_metrics(test_y, softmax(logits.double().numpy()))
    return {"method": "zero-shot", "k": "0", "draw": 0, "k_per_class": "", "capped": False,
            "n_train": 0, "c": float("nan"), **{f"test_{m}": scores[m] for m in CURVE_METRICS}}


def plot_curves(table, folders, counts, save):
    """fewshot.png: each metric against k (log2 axis), mean over draws with the min-max band and
    every draw as a dot; zero-shot as a dashed line; capped classes named in the title."""
    from orbital_clip.report.figures import figure_style, panel_grid, save_figure
    probe = table[table["method"] == "linear probe"]
    ks = list(dict.fromkeys(probe["k"]))
    x_of = {k: (i if k == "all" else np.log2(int(k))) for i, k in enumerate(ks)}
    x_all = max((x_of[k] for k in ks if k != "all"), default=0) + 1
    x_of["all"] = x_all
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(CURVE_METRICS))
        for ax, metric in zip(axes, CURVE_METRICS):
            column = f"test_{metric}"
            grouped = probe.groupby("k", sort=False)[column]
            xs = [x_of[k] for k in grouped.mean().index]
            ax.fill_between(xs, grouped.min(), grouped.max(), alpha=0.2, label="min–max over draws")
            ax.plot(xs, grouped.mean(), marker="o", label="linear probe (mean)")
            ax.scatter([x_of[k] for k in probe["k"]], probe[column], s=6, color="k", alpha=0.5)
            zero = table.loc[table["method"] == "zero-shot", column]
            if len(zero):
                ax.axhline(float(zero.iloc[0]), ls="--", color="gray", label="zero-shot")
            ax.set_xticks(xs, list(grouped.mean().index))
            ax.set_xlabel("training images per class (k)")
            ax.set_ylabel("test " + metric.replace("_", " ").replace("auroc", "AUROC"))
            ax.legend(loc="lower right")
        capped = [f"{f} (n={n})" for f, n in zip(folders, counts) if any(
            k != "all" and int(k) > n for k in ks)]
        if capped:
            fig.suptitle("k capped at what exists for " + ", ".join(capped))
        save_figure(plt, fig, save, "fewshot")


def write_curves(out_dir, args, frozen, classes, train, val, test):
    """fewshot.csv and fewshot.png (and .pdf) into out_dir; returns the table."""
    from orbital_clip.evaluation import figure_saver
    rows = [zero_shot_row(frozen, classes, *test, args.device)]
    rows += curve_rows(train, val, test, len(classes), args.few_shot, args.draws, args.c_grid, args.seed)
    table = pd.DataFrame(rows)
    outputs.atomic_write_csv(Path(out_dir) / "fewshot.csv", table)
    counts = np.bincount(train[1], minlength=len(classes)).tolist()
    plot_curves(table, [c.folder for c in classes], counts, figure_saver(out_dir))
    capped = list(dict.fromkeys(row["k"] for row in rows if row["capped"]))
    if capped:
        LOG.info("few-shot k %s: capped at what the training split holds per class (%s)",
                 " ".join(capped), " ".join(map(str, counts)))
    return table
