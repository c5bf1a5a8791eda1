"""Signs that a training run went wrong, read from its per-epoch history: a run can end with
exit 0 and a 'best' checkpoint that learned nothing (issue 26). Pure functions; the loop writes
their verdict to metrics.csv, the log, the last line and MODEL_CARD.md."""

import math

from orbital_clip.metrics.calibration import TEMPERATURE_LOG_BOUND  # the search range of fit_temperature

COLLAPSE_EPOCHS = 3  # the last epochs a sign must hold over (fewer when the run is shorter)
CHANCE_LOSS_MARGIN = 0.02  # |train loss - chance| within 2% of chance counts as "at chance"
# (name, what it means, likely cause and the flag to try), in the order they are reported
SIGNS = {
    "loss_at_chance": "mean train loss within 2% of ln(batch size), the contrastive loss of "
                      "features that tell images apart no better than chance: the learning rate "
                      "is too low to move the model (try a larger --lr, e.g. 1e-5) or so high that "
                      "the features collapsed (try a smaller --lr and --recipe recommended's warmup)",
    "one_predicted_class": "every validation image predicted as one class: the imbalance won "
                           "(try --balanced-sampling or --loss label-aware, both in --recipe recommended)",
    "temperature_at_bound": "the fitted temperature is at the edge of its search range "
                            "(e^-4 or e^4): the validation logits carry no usable confidence "
                            "(try --logit-scale-mode exp, and the remedies above)",
    "non_finite_steps": "a training step gave a non-finite loss or gradient and was skipped (no "
                        "update; the count per epoch is metrics.csv's nonfinite_steps): a learning "
                        "rate too high for the logit scale or the precision (try a smaller --lr, "
                        "a --warmup, or --precision fp32), or images holding NaN/inf pixels",
}
# A step whose loss or gradients are not finite is skipped; this many in a row (or every step of
# an epoch, for shorter epochs) stops the run: the weights no longer move, and more steps waste time.
NONFINITE_STOP_STEPS = 5


def chance_loss(n_train, batch_size):
    """Mean contrastive loss of an epoch at chance: ln(b) per image in a batch of b, averaged
    over the epoch's images (full batches, then the last, smaller one)."""
    full, rest = divmod(n_train, batch_size)
    total = full * batch_size * math.log(batch_size) + (rest * math.log(rest) if rest > 1 else 0.0)
    return total / max(n_train, 1)


def collapse_signs(history, chance):
    """Names of the SIGNS the last COLLAPSE_EPOCHS rows of `history` (dicts with train_loss,
    predicted_classes, temperature) all show; [] for a healthy run."""
    last = history[-COLLAPSE_EPOCHS:]
    if not last:
        return []
    signs = []
    if all(abs(r["train_loss"] - chance) <= CHANCE_LOSS_MARGIN * chance for r in last):
        signs.append("loss_at_chance")
    if all(r.get("predicted_classes") == 1 for r in last):
        signs.append("one_predicted_class")
    # a fit within 1e-3 (in log T) of either end of fit_temperature's search range is at its bound
    if all(abs(math.log(r["temperature"])) >= TEMPERATURE_LOG_BOUND - 1e-3 for r in last):
        signs.append("temperature_at_bound")
    return signs


def describe_signs(signs):
    """'collapse: <name> (<meaning, cause, flag>); ...', or '' without signs."""
    return "" if not signs else "collapse: " + "; ".join(f"{s} ({SIGNS[s]})" for s in signs)


def nonfinite_signs(history):
    """['non_finite_steps'] once any epoch of `history` (dicts with nonfinite_steps) skipped a step,
    from that epoch on (so the last row, the last line and the card keep saying so); else []."""
    return ["non_finite_steps"] if any(r.get("nonfinite_steps") for r in history) else []


def nonfinite_stop_cause(precision):
    """The likely cause of a run stopped by non-finite steps and the flags to try; --precision fp32
    only when the run was not already in fp32."""
    flags = "a smaller --lr or a --warmup" + ("" if precision == "fp32" else ", or --precision fp32")
    return (f"a learning rate too high for the logit scale or the precision ({flags}), or images "
            "holding NaN/inf pixels")


def should_stop_nonfinite(in_a_row, steps_run, nonfinite_in_epoch, epoch_over):
    """Whether skipped non-finite steps stop the run: NONFINITE_STOP_STEPS in a row, or an epoch
    that is over without a single finite step."""
    if in_a_row >= NONFINITE_STOP_STEPS:
        return True
    return epoch_over and steps_run > 0 and nonfinite_in_epoch == steps_run
