"""The epoch loop: one training step (with exact gradient accumulation), one epoch, zero-shot
validation, and what rank 0 does at the end of each epoch."""

import contextlib
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from orbital_clip import checkpoint
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import zero_shot
from orbital_clip import prompts as prompt_sets
from orbital_clip.metrics import fit_temperature, is_improvement, mean_nll, operating_point, selection_metrics
from orbital_clip.train.card import write_history
from orbital_clip.train.checkpoints import BEST_NAME, BEST_SAFETENSORS_NAME, checkpoint_metadata, save_last
from orbital_clip.train.distributed import global_sums
from orbital_clip.train.health import (chance_loss, collapse_signs, describe_signs, nonfinite_signs,
                                       should_stop_nonfinite)
from orbital_clip.train.losses import LOGIT_SCALE_MAX, loss_scale, unwrap
from orbital_clip.train.sampling import EpochWorkerSeed
from orbital_clip.train.schedule import lr_at_step
from orbital_clip.train.state import gather_rng_snapshots

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


def encode_captions(model, tokenizer, captions, device, dedup=True):
    """Normalised text features (B, D) for a list of captions; with `dedup` each distinct caption
    goes through the text tower once and is gathered back (exact only for a text tower without
    dropout or batch norm: training switches it off for others, see `shortcut_plan`)."""
    if not dedup:
        return model.encode_text(tokenizer(captions).to(device), normalize=True)
    uniques, inverse = prompt_sets.unique_captions(captions)
    features = model.encode_text(tokenizer(uniques).to(device), normalize=True)  # (U, D)
    return features[torch.as_tensor(inverse, device=device)]


def batch_features(model, images, captions, ctx):
    """Normalised (image, text) features of one (micro-)batch, in fp32 for the loss.

    Goes through model.forward (so DistributedDataParallel sees the step); the text tower runs on
    the distinct captions only and their features are gathered back (exact: see encode_captions,
    whose `dedup` parameter the tests and the benchmark use to compare with the naive pass)."""
    args = ctx["args"]
    if ctx.get("text_dedup", True):
        uniques, inverse = prompt_sets.unique_captions(captions)
    else:  # a text tower with dropout: every caption draws its own mask, as without dedup
        uniques, inverse = captions, list(range(len(captions)))
    out = model(images.to(args.device, non_blocking=True), ctx["tokenizer"](uniques).to(args.device))
    image_features, text_features = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    text_features = text_features[torch.as_tensor(inverse, device=text_features.device)]
    return image_features.float(), text_features.float()


def accumulate_gradients(model, images, labels, captions, ctx, valid=None):
    """Backward the contrastive loss of the whole batch; returns the (detached) loss.

    `valid` (B,) marks the rows whose image was read; the others stay in the batch (every rank
    keeps the same tensor sizes) and are masked out of the loss. With --accum-steps N the batch
    runs as N micro-batches, the contrastive way (as open_clip's --accum-freq): features of all
    micro-batches are first computed without gradients; then each micro-batch is re-run with
    gradients and its features swapped into the cached full batch, so every pass backpropagates
    the full-batch loss through that micro-batch only. The sum of the passes is the full-batch
    gradient. Each gradient pass replays the RNG states of its cached pass, so a tower with
    dropout draws the same masks twice and the cached features are the ones the gradient flows
    through. The loss itself runs in fp32, outside autocast.
    """
    args, scaler = ctx["args"], ctx["scaler"]
    labels = labels.to(args.device)
    valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.to(args.device)
    chunks = torch.arange(len(labels)).chunk(args.accum_steps)
    chunk_captions = [[captions[i] for i in chunk.tolist()] for chunk in chunks]
    if len(chunks) == 1:
        with models.autocast_context(args.device, args.precision):
            image, text = batch_features(model, images, captions, ctx)
        loss = ctx["loss_fn"](image, text, loss_scale(model, args.logit_scale_mode), labels, valid)
        if torch.isfinite(loss):
            scaler.scale(loss).backward()
        return loss.detach()
    cached, rng_before = [], []
    with torch.no_grad(), models.autocast_context(args.device, args.precision):
        for chunk, caps in zip(chunks, chunk_captions):
            rng_before.append(rng_states(args.device))
            cached.append(batch_features(model, images[chunk], caps, ctx))
    last = len(chunks) - 1
    for j, (chunk, caps) in enumerate(zip(chunks, chunk_captions)):
        # Under DDP only the last pass all-reduces (no_sync before it): the gradients of the
        # earlier passes accumulate locally and are averaged once, with the last pass's.
        sync = contextlib.nullcontext() if j == last or not hasattr(model, "no_sync") else model.no_sync()
        set_rng_states(args.device, rng_before[j])  # same dropout draws as the cached pass of chunk j
        with sync:
            with models.autocast_context(args.device, args.precision):
                image_j, text_j = batch_features(model, images[chunk], caps, ctx)
            image = torch.cat([image_j if k == j else f[0] for k, f in enumerate(cached)])
            text = torch.cat([text_j if k == j else f[1] for k, f in enumerate(cached)])
            scale = loss_scale(model, args.logit_scale_mode)
            # The logit scale's gradient is counted once, in the last pass: the one DDP syncs,
            # which must give every trainable parameter a gradient or its bucket never completes.
            loss = ctx["loss_fn"](image, text, scale if j == last else scale.detach(), labels, valid)
            if not torch.isfinite(loss):
                return loss.detach()
            scaler.scale(loss).backward()
    return loss.detach()


def rng_states(device):
    """The torch RNG states a forward pass on `device` draws from (CPU, and the CUDA device's)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def set_rng_states(device, states):
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def step_is_finite(loss, optimizer, ctx):
    """Whether a step's loss and gradients are all finite, decided over every process (each then
    skips or takes the step alike). Under fp16 the GradScaler already skips a step whose scaled
    gradients overflowed (and lowers its scale): routine loss scaling, not checked here."""
    finite = bool(torch.isfinite(loss))
    if finite and not ctx["scaler"].is_enabled():
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    (bad,) = global_sums([int(not finite)], ctx["args"])
    return bad == 0


def skip_nonfinite_step(loss, state, counts, ctx):
    """Count a skipped non-finite step and say so; FloatingPointError when the run must stop
    (health.should_stop_nonfinite). `counts`: the epoch's {'run', 'nonfinite', 'in_a_row'}."""
    counts["nonfinite"] += 1
    counts["in_a_row"] += 1
    args = ctx["args"]
    # the decision is global (step_is_finite): under torchrun this process's loss may be finite
    what = ("loss or gradients on at least one process" if getattr(args, "world_size", 1) > 1
            else "loss" if not torch.isfinite(loss) else "gradients")
    if getattr(args, "rank", 0) == 0:  # one line for the run, not one per process
        LOG.warning("epoch %d, step %d: non-finite training %s; step skipped (no update)",
                    state["epoch"] + 1, state["step"], what)
    ctx["optimizer"].zero_grad(set_to_none=True)
    if should_stop_nonfinite(counts["in_a_row"], counts["run"], counts["nonfinite"], epoch_over=False):
        raise FloatingPointError(f"non-finite training {what} ({loss.item()}) in {counts['in_a_row']} "
                                 f"steps in a row at epoch {state['epoch'] + 1}, step {state['step']}")


def train_one_epoch(model, loader, state, ctx):
    """One pass over the training loader; returns (mean loss, images trained on, skipped
    images, steps skipped as non-finite), the counts over all processes."""
    args, optimizer = ctx["args"], ctx["optimizer"]
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(state["epoch"])  # distributed samplers reshuffle per epoch
    if isinstance(loader.worker_init_fn, EpochWorkerSeed):
        loader.worker_init_fn.epoch = state["epoch"]
    model.train()
    total_loss, seen, skipped = 0.0, 0, 0
    # steps run, skipped as non-finite; the run of skips in a row carries over from the last epoch
    counts = {"run": 0, "nonfinite": 0, "in_a_row": state.get("nonfinite_in_a_row", 0)}
    start = time.perf_counter()
    # disable=None: a bar only on a terminal; a log file gets no \r fragments, one line per epoch
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{args.epochs}", leave=False,
               disable=None if ctx["progress"] else True)
    for images, labels, _indices, ok in bar:
        # Rows whose image failed stay in the batch (fixed sizes on every rank) and are masked
        # out of the loss; whether a step runs is decided on the global count of readable rows.
        n_ok, n_rows = global_sums([int(ok.sum()), len(ok)], args)
        skipped += n_rows - n_ok
        if n_ok < 2:  # a contrastive batch needs at least one negative: skipped on every rank
            continue
        lr = lr_at_step(state["step"], args.lr, ctx["warmup_steps"], ctx["total_steps"], args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        captions = prompt_sets.sample_train_captions(labels.tolist(), ctx["classes"], ctx["caption_rng"])
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, images, labels, captions, ctx, valid=ok)
        counts["run"] += 1
        if not step_is_finite(loss, optimizer, ctx):
            skip_nonfinite_step(loss, state, counts, ctx)
            state["step"] += 1  # the schedule moves on, as after a step the GradScaler skips
            continue
        counts["in_a_row"] = 0
        ctx["scaler"].step(optimizer)
        ctx["scaler"].update()
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        state["step"] += 1
        total_loss += loss.item() * n_ok
        seen += n_ok
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - start):.1f}")
    state["nonfinite_in_a_row"] = counts["in_a_row"]
    if should_stop_nonfinite(counts["in_a_row"], counts["run"], counts["nonfinite"], epoch_over=True):
        raise FloatingPointError(f"non-finite training loss or gradients in every step of epoch "
                                 f"{state['epoch'] + 1} ({counts['run']} steps)")
    return total_loss / max(seen, 1), seen, skipped, counts["nonfinite"]


@torch.no_grad()
def validate(model, loader, ctx):
    """Zero-shot classification of the validation set with the evaluation-prompt ensemble."""
    args = ctx["args"]
    model.eval()
    classifier = zero_shot.build_zero_shot_classifier(
        model, ctx["tokenizer"], [c.eval for c in ctx["classes"]], args.device)
    features, ok = zero_shot.encode_image_batches(model, loader, args.device, args.precision)
    labels = torch.as_tensor([label for _path, label in loader.dataset.items])[ok]
    scale = loss_scale(model, args.logit_scale_mode).float().cpu()
    logits = zero_shot.zero_shot_logits(features[ok], classifier.float().cpu(), scale)
    probs = logits.softmax(dim=1).numpy()
    y_true, logits = labels.numpy(), logits.numpy()
    metrics = selection_metrics(y_true, probs)  # the statistics live in metrics.py, as inference's
    metrics["val_loss"] = mean_nll(logits, y_true)
    metrics["val_images"] = int(ok.sum())
    metrics.update(operating_point(y_true, probs[:, 0], args.target_sensitivity))
    metrics["temperature"] = fit_temperature(logits, y_true)
    metrics["predicted_classes"] = int(len(set(probs.argmax(axis=1).tolist())))  # 1: collapsed
    return metrics


def end_of_epoch(model, ctx, state, val_loader, train_stats):
    """Rank 0: validate, keep best and last, write the history; returns (metrics, stop?)."""
    args, save_dir = ctx["args"], Path(ctx["args"].save_dir)
    train_loss, seen, skipped, nonfinite, seconds_train = train_stats
    metrics = validate(model, val_loader, ctx)
    value = metrics[args.select_metric]
    best = is_improvement(value, state["best_value"], lower_is_better=args.select_metric == "val_loss")
    if state["best_epoch"] is None and not best:
        # Undefined on this epoch's validation images (e.g. unreadable ones removed a class):
        # keep this epoch as the best so far rather than end a run with no best checkpoint.
        LOG.warning("epoch %d: validation %s is undefined (%s); kept as the best checkpoint until "
                    "an epoch defines it", state["epoch"], args.select_metric, value)
        best = True
    if best:
        state["best_value"], state["best_epoch"] = value, state["epoch"]
        record = checkpoint_metadata(model, ctx, state, metrics)
        checkpoint.write_checkpoint(save_dir / BEST_NAME, record)
        checkpoint.save_safetensors(save_dir / BEST_SAFETENSORS_NAME, model, {
            k: getattr(record, k) for k in ("model_name", "model_config", "preprocess_cfg", "pretrained",
                                            "class_folders", "prompts", "epoch", "logit_scale_mode")})
    row = {"epoch": state["epoch"], "train_loss": train_loss, **metrics,
           "lr": ctx["optimizer"].param_groups[0]["lr"],
           # the scale the loss used (models.logit_scale): the raw value under published-log
           "logit_scale": float(loss_scale(model, ctx["args"].logit_scale_mode).detach()),
           "skipped_images": skipped,
           "nonfinite_steps": nonfinite,
           "seconds": seconds_train, "samples_per_s": seen / seconds_train,
           "is_best": best}
    signs = collapse_signs([*state["history"], row], chance_loss(ctx["n_train"], args.batch_size))
    signs += nonfinite_signs([*state["history"], row])
    row["collapse"] = " ".join(signs)  # empty for a healthy epoch
    state["history"].append(outputs.plain(row))
    if signs:
        LOG.warning("epoch %d: %s", state["epoch"], describe_signs(signs))
    stop = bool(args.patience) and state["epoch"] - (state["best_epoch"] or 0) >= args.patience
    state["stopped"] = stop  # recorded in the last checkpoint: a resume does not train on
    save_last(model, ctx, state, metrics)
    state["saved_epoch"] = state["epoch"]  # what a Ctrl-C from here on leaves to resume from
    write_history(save_dir, state["history"], args.select_metric)
    LOG.info("epoch %d/%d  loss %.4f  val %s %.4f  bal.acc %.4f  rare sens. %.3f  %.1f s%s",
             state["epoch"], args.epochs, train_loss, args.select_metric, value,
             metrics["balanced_accuracy"], metrics["rare_sensitivity"], seconds_train,
             "  * best" if best else "")
    if stop:
        LOG.info("early stop: no better %s for %d epochs", args.select_metric, args.patience)
    return metrics, stop


def run_training(args, ctx, model, train_model, train_loader, val_loader, state):
    """Epoch loop: train (through the DDP wrapper when distributed), then rank 0 validates and
    saves while the other ranks wait for its early-stopping decision; returns the last metrics."""
    metrics = state["metrics"]
    while state["epoch"] < args.epochs and not state["stopped"]:
        epoch_start = time.perf_counter()
        train_loss, seen, skipped, nonfinite = train_one_epoch(train_model, train_loader, state, ctx)
        state["epoch"] += 1
        stop = False
        ctx["rng_snapshots"] = gather_rng_snapshots(ctx)  # every rank's, saved by rank 0
        if args.rank == 0:
            train_stats = (train_loss, seen, skipped, nonfinite, time.perf_counter() - epoch_start)
            metrics, stop = end_of_epoch(model, ctx, state, val_loader, train_stats)
        if args.world_size > 1:
            decision = [stop]
            torch.distributed.broadcast_object_list(decision, src=0)
            stop = decision[0]
        state["stopped"] = stop
    return metrics
