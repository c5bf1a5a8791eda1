"""Fine-tune an OpenCLIP model on a folder-per-class cohort with clinical prompts.

Each training image is paired with a caption drawn at random, every step, from its class's
training prompts; the image and text towers are trained with a contrastive loss. After every
epoch the model classifies the validation set zero-shot (the class embedding is the mean of its
evaluation prompts) and the best epoch is kept. The defaults reproduce the published protocol.

    $ python clip_train.py --train-dir "dataset_root/train" --val-dir "dataset_root/val" \\
          --save-dir "clip_model_checkpoints" --model-name "ViT-B-32-256" --batch-size 200 \\
          --epochs 100 --lr 1e-8
    $ python clip_train.py --train-dir dataset_root/manifest.csv --val-dir dataset_root/manifest.csv \\
          --save-dir runs/demo --model-config demo/tiny_clip.json --pretrained none --lr 1e-3
    $ python clip_train.py ... --save-dir runs/demo --resume auto
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from orbital_clip import common
from orbital_clip import prompts as prompt_sets
from orbital_clip.metrics import fit_temperature, is_improvement, mean_nll, operating_point, selection_metrics, wilson_interval

LOG = logging.getLogger("clip_train")
BEST_NAME = "clip_model_epoch_best.pt"  # published file names
BEST_SAFETENSORS_NAME = "clip_model_epoch_best.safetensors"  # the same weights, no pickle
FINAL_NAME = "clip_model_final.pt"
LAST_NAME = "clip_model_last.pt"  # resumable: weights + optimizer + RNG + history
DEFAULT_PRETRAINED = "datacomp_s34b_b86k"  # the only tag of ViT-B-32-256
SELECT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "rare_sensitivity",
                  "val_loss")
SSA_BOOLEAN_WORDS = {"true": "true", "false": "false", "on": "true", "off": "false", "yes": "true",
                     "no": "false", "1": "true", "0": "false"}
SSA_FORBIDDEN = {"--train-dir", "--val-dir", "--save-dir", "--ssa", "--ssa-keep-all", "--resume",
                 "--select-metric", "--overwrite", "--help"}
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature at 100
# Arguments a resume may change without --resume-with-changes: where and how fast it runs, how
# long (a finished run resumed with more --epochs trains on), and what happens after training.
# Everything else (lr, batch size, recipe, loss, data, seed, ...) changes the run it continues.
RESUME_FREE_ARGS = {"save_dir", "resume", "resume_with_changes", "overwrite", "epochs", "workers",
                    "device", "precision", "no_progress", "dist_timeout", "compile",
                    "grad_checkpointing", "accum_steps", "wise_ft_alphas", "ssa", "ssa_keep_all",
                    "world_size", "rank", "local_rank"}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
# `--recipe recommended`: what works better than the published protocol on small, imbalanced
# cohorts. Each entry applies only where the flag was not given explicitly.
RECIPES = {
    "paper": {"loss": "clip", "balanced_sampling": False, "warmup": 0, "schedule": "const",
              "select_metric": "accuracy", "patience": 0, "lr": 1e-8, "weight_decay": 1e-8},
    "recommended": {"loss": "label-aware", "balanced_sampling": True, "warmup": "5%",
                    "schedule": "cosine", "select_metric": "balanced_accuracy", "patience": 10,
                    "lr": 1e-5, "weight_decay": 0.1},
}


# ----------------------------------------------------------------------------------------------
# Pure functions


def lr_at_step(step, base_lr, warmup_steps, total_steps, schedule):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then const or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "const":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


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


def unwrap(model):
    """The open_clip model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def loss_scale(model, mode):
    """Scale fed to the loss and softmax: exp(logit_scale) (correct), or the raw log value the
    published code used (`--logit-scale-mode published-log`, for exact reproduction only)."""
    logit_scale = unwrap(model).logit_scale
    return logit_scale if mode == "published-log" else logit_scale.exp()


class LabelAwareClipLoss(open_clip.ClipLoss):
    """Symmetric contrastive loss in which every same-class image-caption pair of the batch is a
    positive with equal target weight (UniCL/FLAIR-style targets). With all-distinct labels the
    targets are the identity and it equals open_clip's ClipLoss. Single-process: under torchrun
    MaskedContrastiveLoss gathers the global batch first."""

    def forward(self, image_features, text_features, logit_scale, labels):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        targets = (labels[:, None] == labels[None, :]).float()  # (B, B)
        targets = targets / targets.sum(dim=1, keepdim=True)
        loss_image = -(targets * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
        loss_text = -(targets * F.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
        return (loss_image + loss_text) / 2


def gather_labels(labels, world_size):
    """A non-differentiable per-rank tensor of the global batch (rank order) under DDP."""
    if world_size <= 1:
        return labels
    gathered = [torch.zeros_like(labels) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, labels)
    return torch.cat(gathered)


class MaskedContrastiveLoss:
    """loss(image, text, scale, labels, valid=None): the contrastive loss of the global batch's
    valid rows. Every rank gathers the fixed-size features of all ranks (with gradient, as
    open_clip's gather_with_grad) and the validity masks, drops the rows whose image could not
    be read, and computes the same global loss; DDP's gradient average then gives exactly the
    gradient of that loss. Rows are dropped after the gather, so every rank all-gathers tensors
    of the same size whatever fails to load."""

    def __init__(self, kind, rank=0, world_size=1):
        self.kind, self.rank, self.world_size = kind, rank, world_size
        self.loss = LabelAwareClipLoss() if kind == "label-aware" else open_clip.ClipLoss()

    def __call__(self, image, text, scale, labels=None, valid=None):
        if labels is None:  # the plain CLIP loss needs none (label-aware does)
            labels = torch.zeros(len(image), dtype=torch.long, device=image.device)
        valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.to(labels.device)
        if self.world_size > 1:
            image, text = open_clip.loss.gather_features(image, text, gather_with_grad=True,
                                                         rank=self.rank, world_size=self.world_size)
            labels = gather_labels(labels, self.world_size)
            valid = gather_labels(valid, self.world_size)
        image, text, labels = image[valid], text[valid], labels[valid]
        if self.kind == "label-aware":
            return self.loss(image, text, scale, labels)
        return self.loss(image, text, scale)


def make_loss(kind, rank=0, world_size=1):
    """loss_fn(image_features, text_features, scale, labels, valid=None) for `--loss clip|label-aware`."""
    return MaskedContrastiveLoss(kind, rank, world_size)


def class_balanced_weights(labels, n_classes):
    """Per-sample weights 1 / (count of its class): every class is drawn equally often."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    return torch.as_tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)


def resolve_recipe(args):
    """Fill every flag the user left unset (None) from the chosen recipe: explicit flags win."""
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def warmup_steps(spec, total_steps):
    """`--warmup` as steps: an integer, or a percentage of all steps ('5%')."""
    spec = str(spec)
    if spec.endswith("%"):
        return int(round(float(spec[:-1]) / 100.0 * total_steps))
    return int(spec)


def changed_training_args(stored, current):
    """[(flag, stored value, current value)] of the training arguments that differ between a
    checkpoint's recorded args and this run's (both plain dicts); keys missing on either side
    (flags of another version) and RESUME_FREE_ARGS are not compared."""
    return [(f"--{key.replace('_', '-')}", stored[key], current[key])
            for key in sorted(set(stored) & set(current) - RESUME_FREE_ARGS)
            if stored[key] != current[key]]


def resume_argv(argv):
    """argv of the command that continues this run: --overwrite and any --resume dropped,
    `--resume auto` added (the last checkpoint in --save-dir)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--resume":
            skip = True
        elif token != "--overwrite" and not token.startswith("--resume="):
            kept.append(token)
    return kept + ["--resume", "auto"]


def resume_command(argv, environ, script="clip_train.py"):
    """(command, note): the shell command that continues this run (`resume_argv`), launched as this
    one was: `python SCRIPT ...`, or under torchrun `torchrun --nproc_per_node=N [--nnodes=M]
    SCRIPT ...`; `note` says what the user must add on several nodes (the rendezvous flags of the
    original launch), '' otherwise."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return shlex.join(["python", script, *resume_argv(argv)]), ""
    local = int(environ.get("LOCAL_WORLD_SIZE", world))
    nodes = int(environ.get("GROUP_WORLD_SIZE", max(world // max(local, 1), 1)))  # torchrun sets it
    launcher = ["torchrun", f"--nproc_per_node={local}", *([f"--nnodes={nodes}"] if nodes > 1 else [])]
    note = ""
    if nodes > 1:
        note = " (plus your rendezvous flags"
        note += ("; the nodes ran different numbers of processes: give each its own --nproc_per_node)"
                 if local * nodes != world else ")")
    return shlex.join([*launcher, script, *resume_argv(argv)]), note


def alpha_list(text):
    """argparse type: comma-separated WiSE-FT mixing weights in [0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5,1, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"mixing weights must lie in [0, 1], got {text!r}")
    return values


def warmup_spec(text):
    """argparse type for --warmup: '200' or '5%'."""
    try:
        value = float(text[:-1]) if text.endswith("%") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected steps (200) or a percentage (5%), got {text!r}") from None
    if value < 0 or (text.endswith("%") and value > 100):
        raise argparse.ArgumentTypeError(f"must be 0..total steps or 0%..100%, got {text!r}")
    return text


# ----------------------------------------------------------------------------------------------
# Training and validation


class DistributedBalancedSampler(torch.utils.data.Sampler):
    """Class-balanced draws (with replacement) for one rank of a torchrun job: every rank draws
    the same global sequence from (seed, epoch) and takes every world_size-th index."""

    def __init__(self, weights, num_samples, rank, world_size, seed):
        self.weights, self.rank, self.world_size, self.seed = weights, rank, world_size, seed
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True,
                                  generator=generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self):
        return self.per_rank


def train_sampler(items, args, generator, n_classes):
    """None (plain shuffling by the loader), or the class-balanced / distributed sampler."""
    labels = [label for _path, label in items]
    if args.world_size > 1:
        if args.balanced_sampling:
            return DistributedBalancedSampler(class_balanced_weights(labels, n_classes), len(items),
                                              args.rank, args.world_size, args.seed)
        return torch.utils.data.distributed.DistributedSampler(
            items, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    if args.balanced_sampling:
        return torch.utils.data.WeightedRandomSampler(class_balanced_weights(labels, n_classes),
                                                      len(items), replacement=True, generator=generator)
    return None


def init_distributed(args):
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; start NCCL (GPU) or gloo (CPU) when > 1 process."""
    args.rank = int(os.environ.get("RANK", "0"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size <= 1:
        return
    if args.batch_size % args.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch and must be divisible "
                         f"by the {args.world_size} processes")
    if args.device.type == "cuda":
        args.device = torch.device("cuda", args.local_rank)
        torch.cuda.set_device(args.device)
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=args.dist_timeout))


class EpochWorkerSeed:
    """DataLoader worker_init_fn: seeds torch, numpy and random in each worker from (seed, rank,
    epoch, worker id), so a resumed epoch draws the same augmentations as a straight run (the
    workers restart every epoch; train_one_epoch sets `epoch` before they start)."""

    def __init__(self, seed, rank=0):
        self.seed, self.rank, self.epoch = seed, rank, 0

    def __call__(self, worker_id):
        seed = int(np.random.SeedSequence([self.seed, self.rank, self.epoch, worker_id]).generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


def make_loader(items, transform, image_size_px, args, shuffle, generator=None, n_classes=None):
    """DataLoader over an ImageListDataset; when shuffling, the sampler draws from `generator`
    (its own: saved and restored on resume) and workers are seeded by EpochWorkerSeed. Class-
    balanced draws with --balanced-sampling (with replacement, one epoch = len(items) draws)."""
    dataset = common.ImageListDataset(items, transform, min_side_px=image_size_px,
                                      image_shape=(3, image_size_px, image_size_px))
    if not shuffle:
        return torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
            pin_memory=args.device.type == "cuda", worker_init_fn=common.seed_worker,
            persistent_workers=args.workers > 0)
    sampler = train_sampler(items, args, generator, n_classes)
    if sampler is None:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    # The loader's own generator only picks the workers' base seed, which EpochWorkerSeed
    # replaces: a throwaway one, so it never draws from the sampler's generator (it would
    # after a resume, when the workers start afresh, and change the permutation).
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // args.world_size, sampler=sampler,
        num_workers=args.workers, pin_memory=args.device.type == "cuda", drop_last=False,
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=EpochWorkerSeed(args.seed, args.rank), persistent_workers=False)


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
        with common.autocast_context(args.device, args.precision):
            image, text = batch_features(model, images, captions, ctx)
        loss = ctx["loss_fn"](image, text, loss_scale(model, args.logit_scale_mode), labels, valid)
        if torch.isfinite(loss):
            scaler.scale(loss).backward()
        return loss.detach()
    cached, rng_before = [], []
    with torch.no_grad(), common.autocast_context(args.device, args.precision):
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
            with common.autocast_context(args.device, args.precision):
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


def configure_exact_shortcuts(model, accum_steps):
    """Whether caption deduplication stays on (off for a text tower with dropout or batch norm),
    logging what accumulation does with such towers (see `shortcut_plan`); call after locking
    (frozen batch norm)."""
    dedup, notes = shortcut_plan(inexact_modules(model), accum_steps, True)
    for note in notes:
        LOG.warning("%s", note)
    return dedup


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


def global_sums(values, args):
    """Sums of ints over the torchrun processes (the values themselves in one process)."""
    if args.world_size <= 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.int64, device=args.device)  # NCCL needs a GPU tensor
    torch.distributed.all_reduce(total)
    return total.tolist()


def train_one_epoch(model, loader, state, ctx):
    """One pass over the training loader; returns (mean loss, images trained on, skipped
    images), the counts over all processes."""
    args, optimizer = ctx["args"], ctx["optimizer"]
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(state["epoch"])  # distributed samplers reshuffle per epoch
    if isinstance(loader.worker_init_fn, EpochWorkerSeed):
        loader.worker_init_fn.epoch = state["epoch"]
    model.train()
    total_loss, seen, skipped = 0.0, 0, 0
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
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at epoch "
                                     f"{state['epoch'] + 1}, step {state['step']}")
        ctx["scaler"].step(optimizer)
        ctx["scaler"].update()
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        state["step"] += 1
        total_loss += loss.item() * n_ok
        seen += n_ok
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - start):.1f}")
    return total_loss / max(seen, 1), seen, skipped


@torch.no_grad()
def validate(model, loader, ctx):
    """Zero-shot classification of the validation set with the evaluation-prompt ensemble."""
    args = ctx["args"]
    model.eval()
    classifier = common.build_zero_shot_classifier(
        model, ctx["tokenizer"], [c.eval for c in ctx["classes"]], args.device)
    features, ok = common.encode_image_batches(model, loader, args.device, args.precision)
    labels = torch.as_tensor([label for _path, label in loader.dataset.items])[ok]
    scale = loss_scale(model, args.logit_scale_mode).float().cpu()
    logits = common.zero_shot_logits(features[ok], classifier.float().cpu(), scale)
    probs = logits.softmax(dim=1).numpy()
    y_true, logits = labels.numpy(), logits.numpy()
    metrics = selection_metrics(y_true, probs)  # the statistics live in metrics.py, as inference's
    metrics["val_loss"] = mean_nll(logits, y_true)
    metrics["val_images"] = int(ok.sum())
    metrics.update(operating_point(y_true, probs[:, 0], args.target_sensitivity))
    metrics["temperature"] = fit_temperature(logits, y_true)
    return metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints and outputs


def checkpoint_metadata(model, ctx, state, metrics):
    """Plain-data description of the run stored in every checkpoint."""
    args = ctx["args"]
    return {
        "model_name": args.model_name,
        "model_config": ctx["model_config"],
        "pretrained": None if args.pretrained == "none" else str(args.pretrained),
        # The file's identity: inference's WiSE-FT refuses a different file found at that path.
        "pretrained_sha256": ctx.get("pretrained_sha256"),
        "class_folders": prompt_sets.class_folders(ctx["classes"]),
        "prompts": prompt_sets.prompt_set_to_dict(ctx["classes"]),
        "preprocess": {"image_size": ctx["image_size_px"]},
        "preprocess_cfg": ctx.get("preprocess_cfg"),  # open_clip's mean/std/resize: rebuilt offline
        "logit_scale_mode": args.logit_scale_mode,
        "epoch": state["epoch"],
        "metrics": common.plain(metrics),
        "select_metric": args.select_metric,
        # Tuned on validation only; inference never re-tunes them on the external cohort.
        "operating_point": {"class": ctx["classes"][0].folder,
                            "target_sensitivity": args.target_sensitivity,
                            "threshold": metrics.get("operating_threshold"),
                            "val_sensitivity": metrics.get("operating_val_sensitivity"),
                            "val_specificity": metrics.get("operating_val_specificity")},
        "temperature": metrics.get("temperature"),
        "args": ctx["args_dict"],
        # Where the model was trained and validated, as absolute paths: inference flags a test
        # cohort that overlaps them ("not an independent test set") from any working folder.
        "data": {"train_dir": str(Path(args.train_dir).resolve()),
                 "val_dir": str(Path(args.val_dir).resolve()), "fold": args.fold},
    }


def rng_snapshot(ctx):
    """This process's RNG states as tensors and primitives (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    snapshot = {
        "torch": torch.get_rng_state(),
        "python": common.plain(random.getstate()),
        "caption_rng": common.plain(ctx["caption_rng"].getstate()),
        "loader_generator": ctx["generator"].get_state(),
        "numpy_keys": torch.as_tensor(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda"] = torch.cuda.get_rng_state_all()
    return snapshot


def gather_rng_snapshots(ctx):
    """Every process's RNG snapshot, in rank order (rank 0 saves them all: each rank draws its
    own captions and augmentations, and a resume restores each its own)."""
    snapshot = rng_snapshot(ctx)
    world_size = ctx["args"].world_size
    if world_size <= 1:
        return [snapshot]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, snapshot)
    return [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in s.items()} for s in gathered]


def restore_rng(snapshots, ctx):
    """Restore this rank's snapshot (a single dict: a checkpoint of an older version)."""
    args = ctx["args"]
    snapshots = snapshots if isinstance(snapshots, list) else [snapshots]
    if len(snapshots) != args.world_size:
        LOG.warning("resume: the checkpoint was written by %d process(es), this run has %d; "
                    "captions and augmentations will differ from a straight run",
                    len(snapshots), args.world_size)
    snapshot = snapshots[args.rank % len(snapshots)]
    torch.set_rng_state(snapshot["torch"])
    ctx["generator"].set_state(snapshot["loader_generator"])
    version, internal, gauss = snapshot["caption_rng"]
    ctx["caption_rng"].setstate((version, tuple(internal), gauss))
    if isinstance(snapshot["python"][0], int) and len(snapshot["python"]) == 3:
        version, internal, gauss = snapshot["python"]
        random.setstate((version, tuple(internal), gauss))
    keys = snapshot["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, snapshot["numpy_pos"], 0, 0.0))
    if "cuda" in snapshot and torch.cuda.is_available():
        states = snapshot["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_last(model, ctx, state, metrics):
    """Resumable checkpoint: weights, optimizer, scaler, RNG states, history, best so far."""
    meta = checkpoint_metadata(model, ctx, state, metrics)
    meta.update({
        "optimizer": ctx["optimizer"].state_dict(),
        "scaler": ctx["scaler"].state_dict(),
        "rng": ctx["rng_snapshots"],
        "step": state["step"],
        "best_value": state["best_value"],
        "best_epoch": state["best_epoch"],
        "history": common.plain(state["history"]),
        "stopped": bool(state["stopped"]),  # early-stopped: a resume trains no further
        "finished": False,  # set by mark_finished once the final checkpoint is written
    })
    common.save_checkpoint(Path(ctx["args"].save_dir) / LAST_NAME, model, meta)


def mark_finished(path):
    """Record in the last checkpoint that the run is over (final checkpoint, WiSE-FT written):
    `--resume auto` then changes nothing."""
    checkpoint = common.load_checkpoint_file(path)
    checkpoint["finished"] = True
    common.atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def write_history(save_dir, history, select_metric):
    """metrics.csv and train_log.jsonl (one row / JSON line per epoch, rewritten whole from the
    history so they always agree with the last checkpoint) and training_curves.png."""
    matplotlib.use("Agg")  # files only, no display
    frame = pd.DataFrame(history)
    common.atomic_write_csv(Path(save_dir) / "metrics.csv", frame)
    common.atomic_write_text(Path(save_dir) / "train_log.jsonl",
                             "".join(json.dumps(row) + "\n" for row in history))
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o", label="train (contrastive)")
    ax_loss.plot(frame["epoch"], frame["val_loss"], marker="o", label="validation (zero-shot CE)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "rare_sensitivity"):
        ax_metric.plot(frame["epoch"], frame[name], marker=".", label=name.replace("_", " "))
    best = frame[frame["is_best"]]
    if len(best):
        ax_metric.axvline(best["epoch"].iloc[-1], color="grey", linestyle="--",
                          label=f"best ({select_metric})")
    ax_metric.set(xlabel="epoch", ylabel="validation", ylim=(-0.02, 1.02), title="Validation")
    ax_metric.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    common.atomic_save_figure(fig, Path(save_dir) / "training_curves.png", dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def recipe_default(dest):
    """'X with --recipe paper, Y with recommended': the --help default of a recipe flag."""
    paper, recommended = (RECIPES[name][dest] for name in ("paper", "recommended"))
    words = {True: "on", False: "off"}
    if isinstance(paper, bool):
        paper, recommended = words[paper], words[recommended]
    return f"{paper} with --recipe paper, {recommended} with recommended"


def build_parser():
    """The command line; `--help` shows every default as '(default: X)'."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", required=True,
                      help="folder with one sub-folder per class, or a manifest.csv (rows of split 'train')")
    data.add_argument("--val-dir", required=True,
                      help="folder with one sub-folder per class, or a manifest.csv (rows of split 'val')")
    data.add_argument("--save-dir", required=True, help="where checkpoints, metrics and figures go")
    data.add_argument("--prompts", default=None,
                      help="JSON prompt set replacing the published one (schema in prompts.py)")
    model = parser.add_argument_group("model")
    model.add_argument("--model-name", default=None,
                       help="open_clip architecture, "
                          "or hf-hub:ORG/REPO or local-dir:PATH (architecture and weights from a Hub "
                          "repository or a downloaded folder; HF text towers need requirements-hf.txt)")
    model.add_argument("--model-config", default=None,
                       help="JSON of a custom open_clip architecture; registered under the file's stem")
    model.add_argument("--pretrained", default=None,
                       help="open_clip tag, local weights file, or 'none' for random init "
                            f"(default: {DEFAULT_PRETRAINED} for ViT-B-32-256; the repository's or "
                            "folder's own weights for hf-hub:/local-dir:; none otherwise)")
    optim = parser.add_argument_group("optimisation (defaults = published protocol)")
    optim.add_argument("--batch-size", type=int, default=200,
                       help="images per step (published 200); contrastive loss needs >= 2")
    optim.add_argument("--epochs", type=int, default=100, help="passes over the training set (published 100)")
    optim.add_argument("--recipe", choices=tuple(RECIPES), default="paper",
                       help="'paper' (default) reproduces the published protocol; 'recommended' "
                            "sets label-aware loss, balanced sampling, lr 1e-5, 5%% warmup + cosine, "
                            "weight decay 0.1, selection by balanced accuracy, patience 10. "
                            "Flags given explicitly override the recipe")
    optim.add_argument("--lr", type=float, default=None,
                       help="AdamW learning rate (paper 1e-8, which barely moves pretrained "
                            "weights; recommended 1e-5; above ~1e-4 full fine-tuning forgets)")
    optim.add_argument("--weight-decay", type=float, default=None,
                       help="AdamW decay on weight matrices (paper 1e-8; recommended 0.1, CLIP's usual)")
    optim.add_argument("--warmup", type=warmup_spec, default=None,
                       help="linear warmup, in steps (200) or %% of all steps (5%%) (paper 0)")
    optim.add_argument("--schedule", choices=("const", "cosine"), default=None,
                       help="learning-rate schedule after warmup (paper const; recommended cosine)")
    optim.add_argument("--loss", choices=("clip", "label-aware"), default=None,
                       help="'clip' (paper): open_clip's ClipLoss, same-class captions count as "
                            "negatives; 'label-aware': every same-class pair is a positive")
    optim.add_argument("--balanced-sampling", action=argparse.BooleanOptionalAction, default=None,
                       help="draw every class equally often (paper: plain shuffling)")
    optim.add_argument("--select-metric", choices=SELECT_METRICS, default=None,
                       help="validation metric that picks the best epoch (paper: accuracy; "
                            "balanced_accuracy is fairer with a rare class)")
    optim.add_argument("--target-sensitivity", type=float, default=0.9,
                       help="rare-class sensitivity the stored operating threshold must reach on "
                            "validation (0 < x <= 1)")
    optim.add_argument("--patience", type=int, default=None,
                       help="stop after this many epochs without a better --select-metric "
                            "(0 = never; paper 0, recommended 10)")
    optim.add_argument("--logit-scale-mode", choices=("exp", "published-log"), default="exp",
                       help="'exp' feeds exp(logit_scale) (~14..100) to the loss as CLIP intends; "
                            "'published-log' reproduces the published code's use of the raw log value")
    optim.add_argument("--lock-image", type=int, nargs="?", const=0, default=None, metavar="N",
                       help="freeze the image tower, leaving its last N layer groups trainable "
                            "(default N=0: fully frozen, LiT-style; guards against forgetting)")
    optim.add_argument("--lock-text", type=int, nargs="?", const=0, default=None, metavar="N",
                       help="freeze the text tower, leaving its last N groups trainable (default 0; "
                            "1 = projection, 2 = + last block and final norm, ...)")
    optim.add_argument("--accum-steps", type=int, default=1,
                       help="split each --batch-size batch into N micro-batches with the exact "
                            "full-batch contrastive gradient (less memory, ~1/N more compute)")
    optim.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute activations in backward: much less memory, ~30%% slower")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=2024, help="seed for weights, batches and captions")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="bf16: autocast, fp32 master weights; auto: bf16 where the hardware multiplies "
                          "bf16 natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), else fp32; "
                          "fp32 for exact, reproducible numbers")
    run.add_argument("--workers", type=int, default=None,
                     help="DataLoader worker processes (default: cores - 1, at most 8, on a GPU; 0 on the CPU, "
                          "where workers only take cores from the model)")
    run.add_argument("--resume", default=None,
                     help=f"'auto' (SAVE_DIR/{LAST_NAME} if present) or a checkpoint path")
    run.add_argument("--resume-with-changes", action="store_true",
                     help="let --resume continue with training flags (lr, batch size, recipe, ...) "
                          "that differ from the run's; without it such a resume is refused")
    run.add_argument("--overwrite", action="store_true", help="allow a non-empty --save-dir (a new run)")
    optim.add_argument("--wise-ft-alphas", type=alpha_list, default=None, metavar="A,B,...",
                       help="after training, evaluate WiSE-FT weights (1-a)*start + a*best on "
                            "validation for each a (e.g. 0,0.25,0.5,0.75,1) and record the best a in "
                            "the best checkpoint (its weights stay the fine-tuned ones)")
    run.add_argument("--dist-timeout", type=float, default=30.0,
                     help="torchrun: minutes a process waits for the others before the job fails "
                          "with an error instead of hanging")
    run.add_argument("--fold", type=int, default=None,
                     help="with a manifest.csv written by data_preprocess.py --folds K: validate on "
                          "fold k, train on the other folds")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the image and text towers (GPU: faster after a minute or "
                          "two of compiling; rarely worth it on CPU)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    ssa = parser.add_argument_group("sequential sensitivity analysis (SSA)")
    ssa.add_argument("--ssa", action="append", default=[], metavar="FLAG=V1,V2,...",
                     help="a factor to sweep, e.g. --ssa lr=1e-8,1e-6,1e-4 --ssa batch-size=64,200; "
                          "factors run one after another, each at the best values found so far")
    ssa.add_argument("--ssa-keep-all", action="store_true",
                     help="keep every trial's checkpoints (default: only the winner's)")
    return common.show_defaults(parser, {
        **{dest: recipe_default(dest) for dest in RECIPES["paper"]},
        "model_name": "ViT-B-32-256, or the --model-config stem", "prompts": "the published set",
        "lock_image": "none, the tower trains", "lock_text": "none, the tower trains",
        "wise_ft_alphas": "none, no WiSE-FT"})


def validate_args(parser, args):
    """Flag combinations and values, checked before any work; parser.error exits with status 2."""
    resolve_recipe(args)
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (a contrastive batch needs a negative)")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error("--lr must be a positive number")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error("--weight-decay must be a number >= 0")
    if args.accum_steps < 1 or args.accum_steps > args.batch_size // 2:
        parser.error("--accum-steps must be between 1 and --batch-size / 2 (micro-batches of >= 2)")
    for flag in ("lock_image", "lock_text"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} N must be >= 0")
    try:
        args.ssa = [parse_ssa_factor(spec, parser) for spec in args.ssa]
    except ValueError as err:
        parser.error(f"--ssa: {err}")
    if args.ssa and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        parser.error("--ssa runs its trials one after another in one process and cannot run under "
                     "torchrun; run the sweep with python (one GPU), or start one torchrun job per value")
    if args.fold is not None and (args.fold < 0 or not str(args.train_dir).endswith(".csv")):
        parser.error("--fold k needs k >= 0 and --train-dir/--val-dir pointing at a manifest.csv "
                     "written with data_preprocess.py --folds K")
    if not args.dist_timeout > 0:  # also nan
        parser.error("--dist-timeout must be > 0 minutes")
    if not 0 < args.target_sensitivity <= 1:
        parser.error("--target-sensitivity must be in (0, 1]")
    if args.patience < 0:
        parser.error("--patience must be >= 0 (0 turns early stopping off)")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    for flag in ("train_dir", "val_dir"):
        if not Path(getattr(args, flag)).exists():
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such folder or file")
    if args.model_config and not Path(args.model_config).is_file():
        parser.error(f"--model-config {args.model_config}: no such file")
    if args.prompts and not Path(args.prompts).is_file():
        parser.error(f"--prompts {args.prompts}: no such file")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such checkpoint")
    if args.resume_with_changes and not args.resume:
        parser.error("--resume-with-changes needs --resume")
    save_dir = Path(args.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        parser.error(f"--save-dir {save_dir}: exists and is not a folder")
    other_rank = os.environ.get("RANK", "0") not in ("", "0")  # rank 0 may already be writing
    if (save_dir.is_dir() and any(save_dir.iterdir()) and not (args.resume or args.overwrite)
            and not other_rank):
        parser.error(f"--save-dir {save_dir}: folder is not empty; pass --resume auto to continue "
                     "that run or --overwrite to start a new one there")
    if args.model_name is None:
        args.model_name = Path(args.model_config).stem if args.model_config else "ViT-B-32-256"
    if common.model_source(args.model_name):
        validate_source_model(parser, args)
    if args.pretrained is None:
        args.pretrained = DEFAULT_PRETRAINED if (args.model_name == "ViT-B-32-256"
                                                 and not args.model_config) else "none"
    if Path(args.pretrained).is_file():  # recorded absolute: inference may run from another folder
        args.pretrained = str(Path(args.pretrained).resolve())
    if args.workers is None:
        args.workers = common.default_workers(args.device, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def validate_source_model(parser, args):
    """--model-name hf-hub:ORG/REPO or local-dir:PATH: the architecture comes from there (no
    --model-config) and --pretrained defaults to its own weights (none or a weights file also
    work; an open_clip tag does not). A local-dir is checked here; the Hub when the model is built."""
    if args.model_config:
        parser.error(f"--model-config: --model-name {args.model_name} brings its own architecture; "
                     "pass one of the two")
    if args.pretrained is None:
        args.pretrained = args.model_name  # the repository's / folder's own weights
    if common.model_source(args.model_name) == "local-dir":
        try:
            common.read_model_config(args.model_name)
            if args.pretrained == args.model_name:  # open_clip would start from random weights
                common.local_dir_weights(args.model_name)
        except ValueError as err:
            parser.error(f"--model-name {err}")
    if args.pretrained not in ("none", args.model_name) and not Path(args.pretrained).is_file():
        parser.error(f"--pretrained {args.pretrained}: --model-name {args.model_name} brings its own "
                     "weights; leave --pretrained out, or pass none or a local weights file")


# ----------------------------------------------------------------------------------------------
# Sequential sensitivity analysis


def parse_ssa_factor(spec, parser):
    """'lr=1e-8,1e-6' -> ('lr', ['1e-8', '1e-6']), checked against the parser's flags."""
    name, sep, values = spec.partition("=")
    name = name.strip().lstrip("-")
    flag = f"--{name}"
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not values:
        raise ValueError(f"{spec!r}: expected FLAG=V1,V2,... (e.g. lr=1e-8,1e-6)")
    if flag not in parser._option_string_actions or flag in SSA_FORBIDDEN:
        raise ValueError(f"{spec!r}: {flag} is not a training flag that SSA can sweep")
    action = parser._option_string_actions[flag]
    if action.nargs == 0:  # an on/off flag: swept as true/false
        words = [SSA_BOOLEAN_WORDS.get(v.lower()) for v in values]
        if None in words:
            raise ValueError(f"{spec!r}: {flag} is an on/off flag; sweep it as {name}=true,false")
        kind = "negatable" if isinstance(action, argparse.BooleanOptionalAction) else "switch"
        return SsaFactor(name, words, kind)
    for value in values:
        if action.type is not None:
            try:
                action.type(value)
            except (ValueError, argparse.ArgumentTypeError):
                raise ValueError(f"{spec!r}: {value!r} is not a valid {flag} value") from None
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{spec!r}: {flag} takes one of {list(action.choices)}")
    return SsaFactor(name, values, "value")


@dataclasses.dataclass
class SsaFactor:
    """One --ssa factor: the flag (without --), its values as strings, and how a value becomes
    arguments: 'value' (--flag V), 'negatable' (--flag / --no-flag), 'switch' (--flag or absent)."""
    name: str
    values: list
    kind: str = "value"


def ssa_trial_argv(base_argv, settings):
    """A trial's argv: base_argv with each (factor, value) of `settings` applied (later wins)."""
    argv = list(base_argv)
    for factor, value in settings:
        if factor.kind == "value":
            argv += [f"--{factor.name}", value]
        elif value == "true":
            argv.append(f"--{factor.name}")
        elif factor.kind == "negatable":
            argv.append(f"--no-{factor.name}")
        else:  # a store_true flag set to false: absent
            argv = [token for token in argv if token != f"--{factor.name}"]
    return argv


def strip_ssa_flags(argv):
    """argv without --ssa/--ssa-keep-all and without --save-dir (each trial gets its own)."""
    kept, skip = [], 0
    for i, token in enumerate(argv):
        if skip:
            skip -= 1
            continue
        name = token.split("=", 1)[0]
        if name in ("--ssa", "--save-dir"):
            skip = 0 if "=" in token else 1
            continue
        if name == "--ssa-keep-all":
            continue
        kept.append(token)
    return kept


def trial_best(save_dir, metric):
    """Best validation value of a finished trial, from its metrics.csv."""
    values = pd.read_csv(Path(save_dir) / "metrics.csv")[metric]
    return float(values.min() if metric == "val_loss" else values.max())


class SsaUsageError(Exception):
    """An SSA trial exited with status 2 (bad arguments)."""


def remove_new_paths(root, keep):
    """Delete what lies under `root` and is not in `keep` (the paths there before a sweep
    started), deepest first; what the user had stays."""
    for path in sorted(Path(root).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()
    if Path(root).is_dir() and Path(root) not in keep and not any(Path(root).iterdir()):
        Path(root).rmdir()


def run_trial(argv):
    """(exit status, reason) of one SSA trial run in this process. A trial that fails for another
    reason than its arguments (CUDA out of memory at a large batch, a non-finite loss) is
    recorded and the sweep goes on."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # the trial's parser refused a value
        return exit_.code, "refused its arguments"
    except Exception as err:  # noqa: BLE001 -- any failure of one trial must not end the sweep
        LOG.warning("SSA trial failed: %s: %s", type(err).__name__, str(err).splitlines()[0][:300])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory trial leaves cached blocks behind
        return 1, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return code, "" if code == 0 else f"exit status {code} (message above)"


def run_ssa(argv, args):
    """Sweep each --ssa factor in turn, keeping the best value before moving to the next one."""
    ssa_dir = Path(args.save_dir) / "ssa"
    base_argv = strip_ssa_flags(argv)
    best, rows, winner_dir = {}, [], None  # best: factor name -> (factor, value)
    for stage, factor in enumerate(args.ssa, start=1):
        name = factor.name
        LOG.info("== SSA stage %d: %s over %s (fixed: %s) ==", stage, name, factor.values,
                 {k: v for k, (_f, v) in best.items()} or "defaults")
        stage_results = []
        for value in factor.values:
            trial_dir = ssa_dir / "trials" / f"stage{stage}_{name}={value}"
            fixed = [setting for k, setting in best.items() if k != name]
            trial = ssa_trial_argv(base_argv, fixed + [(factor, value)])
            start = time.perf_counter()
            code, reason = run_trial(trial + ["--save-dir", str(trial_dir), "--overwrite"])
            if code == 2:
                raise SsaUsageError(f"SSA stage {stage}, --{name} {value}: the trial refused its "
                                    "arguments (message above); nothing kept")
            metric = trial_best(trial_dir, args.select_metric) if code == 0 else float("nan")
            stage_results.append((metric, value, trial_dir))
            rows.append({"stage": stage, "factor": name, "value": value, "metric": args.select_metric,
                         "value_of_metric": metric, "best": False, "exit_code": code, "reason": reason,
                         "seconds": round(time.perf_counter() - start, 2)})
        finite = [r for r in stage_results if not math.isnan(r[0])]
        if not finite:
            raise FloatingPointError(f"SSA stage {stage} ({name}): every trial failed")
        pick = min if args.select_metric == "val_loss" else max
        metric, value, winner_dir = pick(finite, key=lambda r: r[0])  # ties: the first value listed
        best[name] = (factor, value)
        for row in rows:
            if row["stage"] == stage and row["value"] == value:
                row["best"] = True
        common.atomic_write_csv(ssa_dir / "summary.csv", pd.DataFrame(rows))
    plot_sensitivity(pd.DataFrame(rows), ssa_dir / "sensitivity.png")
    best_values = {k: v for k, (_f, v) in best.items()}
    common.atomic_write_json(ssa_dir / "best_args.json", {"best_values": best_values,
                                                          "argv": ssa_trial_argv(base_argv, list(best.values()))})
    for name in (BEST_NAME, BEST_SAFETENSORS_NAME, FINAL_NAME, LAST_NAME, "metrics.csv",
                 "training_curves.png", "args.json"):
        if (winner_dir / name).exists():
            shutil.copy2(winner_dir / name, Path(args.save_dir) / name)
    if not args.ssa_keep_all:
        for pattern in ("*.pt", "*.safetensors"):
            for checkpoint in (ssa_dir / "trials").rglob(pattern):
                checkpoint.unlink()
    LOG.info("== SSA done: %s; winner's checkpoints copied to %s ==", best_values, args.save_dir)
    return 0


def plot_sensitivity(frame, path):
    """Metric vs. value, one panel per factor (log axis for learning rates)."""
    matplotlib.use("Agg")  # files only, no display
    factors = list(dict.fromkeys(frame["factor"]))
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        part = frame[frame["factor"] == factor]
        try:
            x = part["value"].astype(float)
            numeric = True
        except ValueError:
            x, numeric = part["value"], False
        ax.plot(x, part["value_of_metric"], marker="o")
        best = part[part["best"]]
        ax.plot(x[best.index], best["value_of_metric"], marker="*", markersize=14, linestyle="", label="kept")
        if numeric and factor in ("lr", "weight-decay") and (x > 0).all():
            ax.set_xscale("log")
        ax.set(title=f"stage {int(part['stage'].iloc[0])}: {factor}", xlabel=factor,
               ylabel=f"best validation {part['metric'].iloc[0]}")
        ax.legend()
    fig.tight_layout()
    common.atomic_save_figure(fig, path, dpi=150)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main


def setup_model(args):
    """Register a custom config, build the model; returns (model, train tf, val tf, tokenizer, config).

    The config is recorded in every checkpoint for --model-config and for hf-hub:/local-dir:
    models, so inference rebuilds the architecture with neither the file, the Hub nor the folder."""
    model_config = None
    if args.model_config:
        name, model_config = common.register_model_config(args.model_config)
        if name != args.model_name:
            raise ValueError(f"--model-name {args.model_name} differs from the --model-config "
                             f"architecture {name}")
    try:
        config = common.read_model_config(args.model_name) if model_config is None else model_config
        common.check_optional_packages(args.model_name, config)
    except ValueError as err:
        raise ValueError(f"--model-name {err}") from None
    if common.model_source(args.model_name):
        model_config = config
    pretrained = None if args.pretrained == "none" else args.pretrained
    if pretrained and Path(pretrained).is_file():
        weights = pretrained_weights(pretrained, args.model_name)
        model, train_tf, val_tf, tokenizer = common.create_model(args.model_name, None, args.device)
        try:
            common.load_weights_into(model, weights, pretrained, args.model_name)
        except common.CheckpointError as err:
            raise ValueError(f"--pretrained {err}") from None
        return model, train_tf, val_tf, tokenizer, model_config
    if pretrained and not common.model_source(args.model_name):  # an open_clip tag
        problem = common.offline_weights_problem(args.model_name, pretrained)
        if problem:
            raise ValueError(f"--pretrained {pretrained}: {problem}")
    try:
        model, train_tf, val_tf, tokenizer = common.create_model(args.model_name, pretrained, args.device)
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
    if not args.model_config and not common.model_source(args.model_name):
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
        checkpoint = common.load_checkpoint_file(path)
        recorded = checkpoint.get("model_name") if isinstance(checkpoint, dict) else None
        if isinstance(recorded, str) and recorded != model_name:
            raise common.CheckpointError(f"{path}: holds architecture {recorded}, not --model-name "
                                         f"{model_name}; pass --model-name {recorded}")
        return common.checkpoint_state_dict(checkpoint, path)
    except common.CheckpointError as err:
        raise ValueError(f"--pretrained {err}") from None


def prepare_save_dir(args):
    """Create --save-dir; with --overwrite (and no resume) clear our own outputs from a prior run."""
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in save_dir.glob(".*.tmp"):  # temp files of writes a killed run never finished
        stale.unlink()
    if args.overwrite and not args.resume:
        for name in (BEST_NAME, BEST_SAFETENSORS_NAME, FINAL_NAME, LAST_NAME, "metrics.csv",
                     "training_curves.png", "args.json", "train_log.jsonl", "MODEL_CARD.md"):
            (save_dir / name).unlink(missing_ok=True)
    return save_dir


def resume_path(args):
    if not args.resume:
        return None
    if args.resume == "auto":
        path = Path(args.save_dir) / LAST_NAME
        return path if path.is_file() else None
    return Path(args.resume)


def end_of_epoch(model, ctx, state, val_loader, train_stats):
    """Rank 0: validate, keep best and last, write the history; returns (metrics, stop?)."""
    args, save_dir = ctx["args"], Path(ctx["args"].save_dir)
    train_loss, seen, skipped, seconds_train = train_stats
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
        meta = checkpoint_metadata(model, ctx, state, metrics)
        common.save_checkpoint(save_dir / BEST_NAME, model, meta)
        common.save_safetensors(save_dir / BEST_SAFETENSORS_NAME, model, {
            k: meta[k] for k in ("model_name", "model_config", "preprocess_cfg", "pretrained",
                                 "class_folders", "prompts", "epoch", "logit_scale_mode")})
    row = {"epoch": state["epoch"], "train_loss": train_loss, **metrics,
           "lr": ctx["optimizer"].param_groups[0]["lr"],
           "logit_scale": float(model.logit_scale.detach().exp()), "skipped_images": skipped,
           "seconds": seconds_train, "samples_per_s": seen / seconds_train,
           "is_best": best}
    state["history"].append(common.plain(row))
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
        train_loss, seen, skipped = train_one_epoch(train_model, train_loader, state, ctx)
        state["epoch"] += 1
        stop = False
        ctx["rng_snapshots"] = gather_rng_snapshots(ctx)  # every rank's, saved by rank 0
        if args.rank == 0:
            train_stats = (train_loss, seen, skipped, time.perf_counter() - epoch_start)
            metrics, stop = end_of_epoch(model, ctx, state, val_loader, train_stats)
        if args.world_size > 1:
            decision = [stop]
            torch.distributed.broadcast_object_list(decision, src=0)
            stop = decision[0]
        state["stopped"] = stop
    return metrics


def choose_wise_ft_alpha(model, ctx, val_loader, base_state):
    """WiSE-FT on validation: evaluate (1 - a) * start + a * best weights for each --wise-ft-alphas
    value, record the grid and the chosen alpha in the best checkpoint (its weights unchanged)."""
    args, save_dir = ctx["args"], Path(ctx["args"].save_dir)
    best = common.load_checkpoint_file(save_dir / BEST_NAME)
    rows = []
    for alpha in args.wise_ft_alphas:
        model.load_state_dict(common.interpolate_state_dicts(base_state, best["state_dict"], alpha))
        rows.append({"alpha": alpha, **validate(model, val_loader, ctx)})  # every metric
    values = [row[args.select_metric] for row in rows]
    finite = [(v, i) for i, v in enumerate(values) if not math.isnan(v)]
    pick = min if args.select_metric == "val_loss" else max
    chosen = rows[pick(finite)[1]]["alpha"] if finite else 1.0
    # The weights stored stay the fine-tuned ones (alpha 1), and so do the top-level threshold
    # and temperature; those validated at each alpha (the chosen one first) sit beside them, for
    # inference --wise-ft-alpha.
    calibration = {str(row["alpha"]): {"threshold": row["operating_threshold"],
                                       "val_sensitivity": row["operating_val_sensitivity"],
                                       "val_specificity": row["operating_val_specificity"],
                                       "temperature": row["temperature"]} for row in rows}
    best["wise_ft"] = {"base": "pretrained" if args.pretrained != "none" else "initial weights (seeded)",
                       "alphas": list(args.wise_ft_alphas), "metric": args.select_metric,
                       "values": values, "chosen_alpha": chosen,
                       "chosen_calibration": calibration[str(chosen)] if str(chosen) in calibration else None,
                       "calibration": calibration}
    best["wise_ft"] = common.plain(best["wise_ft"])
    common.atomic_write(save_dir / BEST_NAME, lambda handle: torch.save(best, handle))
    common.atomic_write_csv(save_dir / "wise_ft_validation.csv", pd.DataFrame(rows))
    model.load_state_dict(best["state_dict"])
    LOG.info("WiSE-FT on validation: %s by alpha %s -> chosen alpha %s", args.select_metric,
             list(args.wise_ft_alphas), chosen)
    return chosen


def drop_unsupported(items, flag, spec):
    """The items without the files no reader recognises (a phone .heic), with a warning giving
    their count: listed by the rule every script shares (common.is_candidate_image), left out
    here so they are neither trained on nor skipped anew every epoch."""
    unsupported = set(common.unsupported_format_files([path for path, _label in items]))
    if not unsupported:
        return items
    example = sorted(unsupported)[0]
    LOG.warning("%s %s: %d file(s) in a format neither Pillow nor pydicom reads are left out, "
                "e.g. %s (%s %s); convert them to JPEG or PNG to use them", flag, spec,
                len(unsupported), example, common.UNSUPPORTED_FORMAT, example.suffix.lower())
    kept = [item for item in items if item[0] not in unsupported]
    if not kept:
        raise common.CohortError(f"{spec}: no image in a readable format (e.g. {example})")
    return kept


def prepare_run(args):
    """Device, precision, torchrun process group, prompts and the two cohorts."""
    args.device = common.resolve_device(args.device)
    args.precision, why = common.resolve_precision(args.precision, args.device)
    LOG.info("precision %s (%s)", args.precision, why)
    if args.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what stays in fp32
    common.autocast_context(args.device, args.precision)
    init_distributed(args)
    classes = prompt_sets.load_prompt_set(args.prompts)
    folders = prompt_sets.class_folders(classes)
    fold = {} if args.fold is None else {"fold": args.fold}
    items = []
    for flag, spec, split in (("--train-dir", args.train_dir, "train"), ("--val-dir", args.val_dir, "val")):
        try:
            items.append(drop_unsupported(common.load_labelled_items(spec, folders, split, **fold),
                                          flag, spec))
        except common.CohortError as err:
            raise common.CohortError(f"{flag} {err}") from None
    train_items, val_items = items
    check_steps_can_run(len(train_items), args)
    check_disjoint_splits(train_items, val_items, args)
    check_selection_metric_defined([label for _path, label in val_items], folders, args)
    return classes, train_items, val_items


def check_disjoint_splits(train_items, val_items, args):
    """Refuse (ValueError naming --val-dir) validation images that are also training images:
    the same file, or a copy of it (equal SHA-256), e.g. the data root given as --train-dir
    beside its own val/ folder. Selection and the stored threshold would be tuned on images
    the model trained on."""
    known = {**common.manifest_sha256(args.train_dir), **common.manifest_sha256(args.val_dir)}
    pairs = common.overlapping_images([p for p, _ in val_items], [p for p, _ in train_items], known)
    if pairs:
        val_path, train_path = pairs[0]
        raise ValueError(f"--val-dir {args.val_dir}: {len(pairs)} of its {len(val_items)} images are "
                         f"also training images of --train-dir {args.train_dir} (e.g. {val_path} = "
                         f"{train_path}); pass the train/ and val/ folders (or the manifest.csv) "
                         "that data_preprocess.py wrote")


def check_selection_metric_defined(val_labels, folders, args):
    """Refuse (ValueError naming the fold/folder and the metric) a --select-metric that the
    validation images cannot define: macro AUROC needs a positive and a negative image of every
    class, rare-class sensitivity a rare-class image. Without the check every epoch scores NaN,
    no checkpoint is ever 'best' and the run ends with exit 0 and no best checkpoint."""
    present = set(val_labels)
    if args.select_metric == "rare_sensitivity":
        missing = [folders[0]] if 0 not in present else []
    elif args.select_metric == "macro_auroc":
        missing = [f for k, f in enumerate(folders) if k not in present]
    else:
        return
    if missing:
        where = (f"--fold {args.fold} (validation rows of {args.val_dir})" if args.fold is not None
                 else f"--val-dir {args.val_dir}")
        raise ValueError(f"{where} has no image of {', '.join(repr(m) for m in missing)}, so "
                         f"--select-metric {args.select_metric} is undefined; choose another fold "
                         "split (data_preprocess.py --folds with fewer folds) or --select-metric "
                         "balanced_accuracy")


def check_steps_can_run(n_train, args):
    """Refuse (ValueError naming the flag) a configuration in which no training step, or no
    step as asked, could run: decided before anything is written."""
    if n_train < 2:
        raise ValueError(f"--train-dir {args.train_dir}: {n_train} training image(s); a "
                         "contrastive step needs at least 2")
    per_process = args.batch_size // args.world_size
    if per_process < args.accum_steps:
        raise ValueError(f"--batch-size {args.batch_size} gives each of the {args.world_size} processes "
                         f"{per_process} image(s), fewer than --accum-steps {args.accum_steps} "
                         "micro-batches; raise --batch-size or lower --accum-steps")


def build_context(args, model, tokenizer, classes, model_config, n_train):
    """Everything the epoch loop needs besides the model and the loaders."""
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    args_dict = common.plain({k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()})
    pretrained_file = args.pretrained != "none" and Path(args.pretrained).is_file()
    return {
        "args": args, "args_dict": args_dict,
        "pretrained_sha256": common.file_sha256(args.pretrained) if pretrained_file else None, "classes": classes, "tokenizer": tokenizer,
        "model_config": model_config, "image_size_px": common.model_image_size(model),
        "preprocess_cfg": common.model_preprocess_cfg(model),
        "generator": torch.Generator().manual_seed(args.seed),
        "caption_rng": prompt_sets.new_rng(args.seed + args.rank), "progress": not args.no_progress and args.rank == 0,
        # fused AdamW: one kernel for all parameters on CUDA
        "optimizer": torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                       fused=args.device.type == "cuda"),
        "scaler": torch.amp.GradScaler(args.device.type, enabled=args.precision == "fp16"),
        "loss_fn": make_loss(args.loss, args.rank, args.world_size),
        "warmup_steps": warmup_steps(args.warmup, steps_per_epoch * args.epochs),
        "total_steps": steps_per_epoch * args.epochs, "steps_per_epoch": steps_per_epoch,
    }


def wrap_for_training(model, args):
    """torch.compile the towers (opt-in) and wrap in DistributedDataParallel under torchrun."""
    if args.compile:
        # In place (nn.Module.compile): the parameters keep their names (no `_orig_mod.`), so
        # the WiSE-FT weights and checkpoints load into the same modules. CustomTextCLIP models
        # (SigLIP, Hugging Face text towers) hold their text tower in `.text`, CLIP in `.transformer`.
        model.visual.compile()
        (model.text if hasattr(model, "text") else model.transformer).compile()
    if args.world_size <= 1:
        return model
    device_ids = [args.device.index] if args.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    is_main = os.environ.get("RANK", "0") in ("", "0")
    common.configure_logging(logging.INFO if is_main else logging.WARNING)
    # The figure backend loaded now, not at the end of epoch 1: a Ctrl-C landing while its C
    # extension loads surfaces as an ImportError with a traceback, not as an interrupt.
    matplotlib.use("Agg")
    if args.ssa:
        base_argv = strip_ssa_flags(argv)
        for factor in args.ssa:  # every trial's arguments checked before anything is written
            for value in factor.values:
                parse_args(ssa_trial_argv(base_argv, [(factor, value)]) + [
                    "--save-dir", str(Path(args.save_dir) / "ssa" / "trials" / "check"), "--overwrite"])
        try:  # the cohorts and prompts once, before anything is written (exit 2 as a plain run)
            prepare_run(args)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        save_dir = Path(args.save_dir)
        created = not save_dir.exists()
        had = set(save_dir.rglob("*")) if not created else set()  # never removed on a refusal
        save_dir.mkdir(parents=True, exist_ok=True)
        try:
            return run_ssa(argv, args)
        except FloatingPointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except SsaUsageError as err:  # a trial refused its arguments: the same for every trial
            print(err, file=sys.stderr)
            remove_new_paths(save_dir / "ssa", had)
            if created:
                shutil.rmtree(save_dir, ignore_errors=True)
            return 2
    try:
        classes, train_items, val_items = prepare_run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return train(args, classes, train_items, val_items, argv)
    except KeyboardInterrupt:  # before training started (model loading, setup): nothing to resume
        print("\ninterrupted before the first epoch ended; nothing to resume, run the command again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except common.OutputWriteError as err:
        print(f"error: {err}; the previous files there are intact", file=sys.stderr)
        return 1
    finally:
        if args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args, classes, train_items, val_items, argv):
    """Seed, build, (resume,) train and save; returns the exit status (argv goes to args.json)."""
    LOG.info("== setup: %d process(es) ==", args.world_size)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    # Everything that can refuse the run (weights, architecture, the resume checkpoint) is loaded
    # before anything is written: a refused run leaves --save-dir as it was.
    try:
        model, train_tf, val_tf, tokenizer, model_config = setup_model(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.world_size > 1:
        # The same init on every rank (above), then a stream of its own for the augmentations and
        # dropout masks that run in this process (--workers 0): seed + rank, as open_clip does.
        torch.manual_seed(args.seed + args.rank)
        random.seed(args.seed + args.rank)
        np.random.seed(args.seed + args.rank)
    configure_trainable(model, args)
    text_dedup = configure_exact_shortcuts(model, args.accum_steps)
    ctx = build_context(args, model, tokenizer, classes, model_config, len(train_items))
    ctx["text_dedup"] = text_dedup
    state = {"epoch": 0, "step": 0, "best_value": None, "best_epoch": None, "history": [],
             "stopped": False, "finished": False, "metrics": {}}
    # WiSE-FT interpolates from the weights training started from (pretrained, or the seeded
    # init): taken before a resume loads the trained ones.
    base_state = None
    if args.wise_ft_alphas:
        base_state = {k: v.detach().clone() for k, v in common.clean_state_dict(model.state_dict()).items()}
    if (path := resume_path(args)) is not None:
        try:
            changes = resume_from(path, model, ctx, state)
        except (ValueError, KeyError, RuntimeError) as err:
            detail = str(err) if isinstance(err, common.CheckpointError) else f"{path}: {err}"
            print(f"error: --resume {detail.splitlines()[0]}", file=sys.stderr)
            return 2
        if changes and not args.resume_with_changes:
            print(f"error: --resume {path}: this command changes {describe_changes(changes)} of the "
                  "run it continues; resume with the run's flags, or pass --resume-with-changes if "
                  "the change is meant", file=sys.stderr)
            return 2
        if changes:
            LOG.warning("--resume-with-changes: continuing %s with %s", path, describe_changes(changes))
        if state["finished"] and (state["stopped"] or state["epoch"] >= args.epochs):
            LOG.info("--resume: %s is a finished run (%s at epoch %d); nothing to do, no file "
                     "changed", path, "stopped early" if state["stopped"] else "completed",
                     state["epoch"])
            return 0
        LOG.info("resumed from %s at epoch %d", path, state["epoch"])  # only once it is accepted
    save_dir = prepare_save_dir(args) if args.rank == 0 else Path(args.save_dir)
    for key, value in ctx["args_dict"].items():  # all in args.json; in the log with debug logging
        LOG.debug("  %s = %s", key, value)
    if args.rank == 0:
        common.atomic_write_json(save_dir / "args.json", common.run_record(
            "clip_train.py", argv, args, {"train_images": len(train_items), "val_images": len(val_items)}))
    size = ctx["image_size_px"]
    train_loader = make_loader(train_items, train_tf, size, args, shuffle=True,
                               generator=ctx["generator"], n_classes=len(classes))
    val_loader = make_loader(val_items, val_tf, size, args, shuffle=False)
    train_model = wrap_for_training(model, args)
    LOG.info("== training: %d train / %d val images, classes %s, %d steps/epoch, %s (%s) ==",
             len(train_items), len(val_items), prompt_sets.class_folders(classes),
             ctx["steps_per_epoch"], args.device, args.precision)
    try:
        metrics = run_training(args, ctx, model, train_model, train_loader, val_loader, state)
    except KeyboardInterrupt:
        return report_interrupt(args, argv, state, save_dir)
    except FloatingPointError as err:
        print(f"error: {err}; stopped, checkpoints in {save_dir} are left as they were. Try a lower "
              "--lr or --precision fp32.", file=sys.stderr)
        return 1
    if args.rank == 0:
        common.save_checkpoint(save_dir / FINAL_NAME, model, checkpoint_metadata(model, ctx, state, metrics))
        if base_state is not None and (save_dir / BEST_NAME).exists():
            choose_wise_ft_alpha(model, ctx, val_loader, base_state)
        mark_finished(save_dir / LAST_NAME)
        common.atomic_write_text(save_dir / "MODEL_CARD.md",
                                 model_card(args, classes, train_items, val_items, state))
    LOG.info("== done: %s; checkpoints and curves in %s ==", done_summary(state, args), save_dir)
    return 0


def done_summary(state, args):
    """The last line's numbers: the best epoch's --select-metric and the rare-class threshold
    stored with it (validation sensitivity and specificity), rounded for reading."""
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
    lines += ["", "## Recipe", "", f"--recipe {args.recipe}: lr {args.lr:g}, weight decay {args.weight_decay:g}, "
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
              "", "## Intended use and limits", "",
              "- Research use: triage support studies of the classes above on images like the training "
              "ones; not a medical device, not for diagnosis without a clinician.",
              "- Validated only on the validation images above, which tuned the epoch and the threshold: "
              "report performance from an external cohort (inference.py), never from these numbers.",
              "- Small validation sets give wide intervals; other cameras, centres and populations may "
              "shift both the probabilities and the threshold's sensitivity."]
    return "\n".join(lines) + "\n"


def describe_changes(changes):
    """'--lr (0.001 -> 0.0001), --batch-size (16 -> 8)'."""
    return ", ".join(f"{flag} ({old} -> {new})" for flag, old, new in changes)


def report_interrupt(args, argv, state, save_dir):
    """Ctrl-C during training: the last checkpoint (written atomically at the end of each epoch)
    is intact; say where training stopped and the exact command that continues it."""
    if args.rank != 0:
        return EXIT_INTERRUPTED
    if state.get("saved_epoch") is not None and (save_dir / LAST_NAME).is_file():
        # the entry-point script beside this package, as reached from the working folder
        here = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "clip_train.py"))
        script = min(os.path.relpath(here), here, key=len)
        command, note = resume_command(argv, os.environ, script)
        print(f"\ninterrupted; {save_dir / LAST_NAME} holds epoch {state['saved_epoch']}/{args.epochs}. "
              f"Continue with{note}:\n  {command}", file=sys.stderr)
    else:
        print(f"\ninterrupted during epoch 1/{args.epochs}, before any checkpoint was written; "
              "start again with --overwrite", file=sys.stderr)
    return EXIT_INTERRUPTED


def resume_from(path, model, ctx, state):
    """Load weights, optimizer, scaler, RNG and history from a last checkpoint; returns the
    training arguments this run changes (changed_training_args, [] for an older checkpoint)."""
    checkpoint = common.load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint:
        raise ValueError("not a resumable checkpoint (no optimizer state); "
                         f"resume from {LAST_NAME}")
    if checkpoint.get("model_name") != ctx["args"].model_name:
        raise ValueError(f"checkpoint architecture {checkpoint.get('model_name')} differs from "
                         f"--model-name {ctx['args'].model_name}")
    model.load_state_dict(checkpoint["state_dict"])
    ctx["optimizer"].load_state_dict(checkpoint["optimizer"])
    ctx["scaler"].load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["rng"], ctx)
    state.update(epoch=checkpoint["epoch"], step=checkpoint["step"], best_value=checkpoint["best_value"],
                 best_epoch=checkpoint["best_epoch"], history=list(checkpoint["history"]),
                 stopped=bool(checkpoint.get("stopped", False)),
                 finished=bool(checkpoint.get("finished", False)),
                 metrics=dict(checkpoint.get("metrics") or {}), saved_epoch=checkpoint["epoch"])
    stored, current = dict(checkpoint.get("args") or {}), dict(ctx["args_dict"])
    for flag in ("train_dir", "val_dir"):  # the same data from another working folder is no change
        recorded = (checkpoint.get("data") or {}).get(flag)
        if recorded and flag in current:
            stored[flag], current[flag] = recorded, str(Path(current[flag]).resolve())
    return changed_training_args(stored, current)


if __name__ == "__main__":
    sys.exit(main())
