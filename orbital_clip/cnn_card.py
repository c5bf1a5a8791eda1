"""What a train_cnn run shows a reader: its training curves and its model card (split from cnn.py,
which trains and predicts)."""

from pathlib import Path

import numpy as np

from orbital_clip import outputs

CURVES_STEM = "training_curves"  # .png, written through report.figures.save_figure
CARD_NAME = "MODEL_CARD.md"


def write_training_curves(save_dir, history):
    """training_curves.png: train and validation loss, validation accuracy and balanced accuracy
    per epoch, the best epoch marked; in the project's figure style (report.figures)."""
    import matplotlib
    import matplotlib.ticker
    from orbital_clip.report.figures import PANEL_HEIGHT_IN, PANEL_WIDTH_IN, figure_style, save_figure
    epochs = [row["epoch"] for row in history]
    with figure_style() as plt:
        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(2 * PANEL_WIDTH_IN, PANEL_HEIGHT_IN))
        ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
        ax_loss.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
        ax_loss.legend()
        for key, label in (("val_accuracy", "accuracy"), ("val_balanced_accuracy", "balanced accuracy")):
            ax_val.plot(epochs, [r[key] for r in history], marker=".", label=label)
        best = [r["epoch"] for r in history if r["is_best"]]
        if best:
            ax_val.axvline(best[-1], color="grey", linestyle="--", label="best (balanced accuracy)")
        ax_val.set(xlabel="epoch", ylabel="validation", ylim=(-0.02, 1.02), title="Validation")
        ax_val.legend(loc="lower right")
        for ax in (ax_loss, ax_val):  # whole epochs only
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        save_figure(plt, fig, lambda f, name, **kw: outputs.atomic_save_figure(f, Path(save_dir) / name, **kw),
                    CURVES_STEM, formats=("png",))


def model_card(args, cohorts, record, best_epoch, history):
    """MODEL_CARD.md of a finished run: the model and its starting weights, the data per class and
    split, the recipe, the best epoch's validation metrics, and what the model is for."""
    best = next((r for r in history if r["epoch"] == best_epoch), {})
    counts = {name: np.bincount([label for _p, label in items], minlength=len(cohorts.folders))
              for name, items in (("train", cohorts.train), ("val", cohorts.val), ("test", cohorts.test))}
    rows = "\n".join(f"| {folder} | {counts['train'][k]} | {counts['val'][k]} | {counts['test'][k]} |"
                     for k, folder in enumerate(cohorts.folders))
    weights = record["run"]["weights"]
    metrics_line = ", ".join(f"{key[4:].replace('_', ' ')} {best[key]:.3f}" for key in
                             ("val_accuracy", "val_balanced_accuracy", "val_loss") if key in best)
    return f"""# Model card: {args.arch} baseline (baselines/train_cnn.py)

A supervised image classifier trained for the comparison with CLIP; not a diagnostic device.

## Model
- architecture: torchvision `{args.arch}`, a new head of {len(cohorts.folders)} outputs (one per class folder)
- starting weights: {weights['source']} (head: {weights['head']})
- input: {args.image_size} px, ImageNet normalisation; training augmentation: open_clip's random
  resized crop{' and horizontal flips (--flip)' if args.flip else ' (no flips, as the CLIP run)'}

## Data (images per class)
| class | train | val | test |
| --- | --- | --- | --- |
{rows}

## Training
- {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} (cosine to 0), weight decay {args.weight_decay:g}
- imbalance: {'class-weighted cross-entropy' if args.class_weights else 'balanced sampling' if args.balanced_sampling else 'none'}
- best epoch (validation balanced accuracy, a tie keeps the earlier): {best_epoch}: {metrics_line}

## Intended use and limits
Research comparison on the cohort it was trained on; validation numbers choose the epoch and are
optimistic; the test predictions in predictions.csv are the estimate to report, with inference.py's
statistics. Not validated for clinical use.
"""
