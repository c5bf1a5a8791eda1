"""Supervised image-classifier baselines (torchvision CNNs and ViT) for the comparison with CLIP.

Trains a standard classifier with cross-entropy on the same cohort, through the same image loader
(EXIF, 16-bit, DICOM, draft JPEG decoding) and the same inputs (class folders or manifest.csv) as
clip_train.py; keeps the epoch with the best validation balanced accuracy; predicts --test-dir
with it and writes SAVE_DIR/predictions.csv in inference.py's schema (path relative to the test
folder, true_label, pred_label, prob_<folder> per class, prediction, status), ready for a paired
comparison.

    $ python -m baselines.train_cnn --arch resnet50 --weights imagenet \\
          --train-dir dataset_root/train --val-dir dataset_root/val --test-dir external_cohort \\
          --out-dir baselines_runs/resnet50 --class-weights
    $ python -m baselines.train_cnn --arch densenet121 --weights ~/weights/densenet121-a639ec97.pth \\
          --train-dir splits/manifest.csv --val-dir splits/manifest.csv --test-dir splits/manifest.csv \\
          --out-dir baselines_runs/densenet121 --balanced-sampling
    $ python -m baselines.train_cnn --arch resnet18 --weights none --image-size 64 --epochs 2 \\
          --train-dir demo_run/dataset_root/train --val-dir demo_run/dataset_root/val \\
          --test-dir demo_run/external_cohort --out-dir demo_run/cnn_resnet18
"""

import argparse
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from orbital_clip import checkpoint as ckpt
from orbital_clip import checkpoint
from orbital_clip import cli
from orbital_clip import cohort
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import metrics
from orbital_clip.metrics import is_improvement
from orbital_clip import prompts as prompt_sets
from orbital_clip import cnn_card
from orbital_clip import report
from orbital_clip.train.sampling import EpochWorkerSeed
from orbital_clip.train.state import changed_training_args, describe_changes, resume_argv

LOG = logging.getLogger("train_cnn")
# torchvision architecture -> the module holding its ImageNet classification head (replaced by a
# head with one output per class).
HEAD_MODULES = {"resnet50": "fc", "densenet121": "classifier", "efficientnet_b0": "classifier.1",
                "vit_b_16": "heads.head", "resnet18": "fc"}
ARCHS = tuple(HEAD_MODULES)
BEST_NAME = "cnn_model_best.pt"
LAST_NAME = "cnn_model_last.pt"  # resumable: weights, optimizer, scheduler, RNG, history
PREDICTIONS_NAME = "predictions.csv"
CURVES_STEM = cnn_card.CURVES_STEM
CARD_NAME = cnn_card.CARD_NAME
PREDICT_RECORD_NAME = "args_predict.json"  # --epochs 0: its own record, the training's args.json kept
OUTPUT_NAMES = (BEST_NAME, LAST_NAME, PREDICTIONS_NAME, "metrics.csv", "args.json",
                PREDICT_RECORD_NAME, f"{CURVES_STEM}.png", CARD_NAME)
EXIT_INTERRUPTED = outputs.EXIT_INTERRUPTED  # 128 + SIGINT, as clip_train.py
# Arguments a --resume may change: where and how it runs, and what it predicts after training.
# Everything else (the cosine over --epochs x steps included) changes the run it continues.
RESUME_FREE_ARGS = {"save_dir", "resume", "overwrite", "workers", "device", "precision",
                    "no_progress", "test_dir"}
CHECKPOINT_FORMAT = "orbital-clip-cnn/1"  # not open_clip weights: inference.py does not load it
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation every torchvision ImageNet model expects
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_PATCH_PX = 16
VIT_PRETRAINED_SIZE_PX = 224  # its position embeddings are learnt for a 14 x 14 patch grid
MIN_IMAGE_SIZE_PX = 32
# Old torchvision DenseNet checkpoints (also the ImageNet file itself) name layers 'norm.1';
# torchvision renames them on load in its own builder, so a --weights file needs the same.
DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass
class Cohorts:
    """The three labelled image lists ((path, class index) pairs) and the class folders."""

    folders: list
    train: list
    val: list
    test: list
    test_root: Path  # predictions.csv paths are relative to it (as inference.py writes them)


@dataclass
class WeightsInfo:
    """Where the starting weights came from, recorded in args.json and the checkpoint."""

    spec: str  # 'imagenet', 'none' or the file given
    source: str  # e.g. 'ResNet50_Weights.IMAGENET1K_V2', 'random init (seed 2024)', a path
    head: str  # 'new' (randomly initialised for our classes) or 'loaded'


class WeightsError(ValueError):
    """--weights cannot be used; the message names the flag, the file and the fix."""


# ----------------------------------------------------------------------------------------------
# Pure functions


def selection_score(y_true, y_pred):
    """Validation balanced accuracy (the mean recall over the classes present), the metric that
    picks the best epoch, computed by metrics.py as for every other report of it."""
    if len(y_true) == 0:
        return float("nan")
    n_classes = int(max(np.max(y_true), np.max(y_pred))) + 1  # absent classes do not count
    cm = metrics.confusion_matrices(y_true, y_pred, n_classes)
    return float(metrics.metrics_from_confusion(cm[None])["balanced_accuracy"][0])


def class_weight_vector(labels, n_classes):
    """Cross-entropy weights n / (C * count_c) (scikit-learn's 'balanced'): every class carries
    the same total weight. Every class must have at least one training image."""
    from sklearn.utils.class_weight import compute_class_weight
    return compute_class_weight("balanced", classes=np.arange(n_classes), y=np.asarray(labels))


def sample_weights(labels):
    """Per-image sampling weights proportional to 1 / count of its class: every class is drawn
    equally often (with replacement)."""
    from sklearn.utils.class_weight import compute_sample_weight
    return compute_sample_weight("balanced", np.asarray(labels))


def remap_densenet_keys(state_dict):
    """DenseNet 'denselayerN.norm.1.weight' -> 'denselayerN.norm1.weight' (see DENSENET_OLD_KEY)."""
    out = {}
    for key, value in state_dict.items():
        match = DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def predictions_frame(cohorts, probs, statuses):
    """predictions.csv in inference.py's schema: one row per test image in input order; failed
    rows keep their row with empty pred_label and probabilities and a 'failed: ...' status.

    Args:
        probs: (N, C) float array in class-folder order, NaN rows where the image failed.
    """
    import pandas as pd
    folders = cohorts.folders
    ok = np.isfinite(probs).all(axis=1)
    columns = {
        "path": [report.relative_path(path, cohorts.test_root) for path, _label in cohorts.test],
        "true_label": [folders[label] for _path, label in cohorts.test],
        "pred_label": [folders[int(np.argmax(row))] if good else "" for row, good in zip(probs, ok)],
    }
    for k, folder in enumerate(folders):
        columns[f"prob_{folder}"] = probs[:, k]
    columns["prediction"] = list(columns["pred_label"])  # the decision: argmax (no threshold here)
    columns["status"] = list(statuses)
    return pd.DataFrame(columns)


# ----------------------------------------------------------------------------------------------
# Model and weights


def imagenet_weights(arch):
    """torchvision's recommended ImageNet weights enum of `arch` (e.g. ResNet50_Weights.IMAGENET1K_V2)."""
    from torchvision.models import get_model_weights
    return get_model_weights(arch).DEFAULT


def imagenet_cache_path(weights):
    """Where torch looks for a torchvision weights file before downloading it."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def replace_head(model, arch, n_classes):
    """Swap the ImageNet head for a freshly initialised Linear with `n_classes` outputs."""
    parent_name, _, child_name = HEAD_MODULES[arch].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child_name)
    setattr(parent, child_name, torch.nn.Linear(old.in_features, n_classes))
    return model


def load_imagenet(arch):
    """The architecture with ImageNet weights from torch's cache (downloaded when online);
    WeightsError naming the file and where to put it when they cannot be had."""
    from torchvision.models import get_model
    weights = imagenet_weights(arch)
    cached = imagenet_cache_path(weights)
    try:
        return get_model(arch, weights=weights, progress=False), str(weights)
    except Exception as err:  # noqa: BLE001 - offline, a proxy or a damaged cache fail in many ways
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        where = "is damaged" if cached.is_file() else "is not in torch's cache"
        raise WeightsError(
            f"--weights imagenet: the {arch} ImageNet weights file {where} and could not be "
            f"downloaded ({reason}); download {weights.url} to {cached} (or set TORCH_HOME), pass "
            "--weights PATH to a local copy, or --weights none for random initialisation") from None


def load_weights_file(model, arch, path, folders):
    """Load a --weights file (a torchvision/ImageNet state_dict or a checkpoint of this script)
    into `model`, whose head already has one output per class of `folders`. The file's head is
    kept only from a checkpoint of ours recording the same class folders in the same order (a
    head of the right size but unknown classes would be silently wrong); otherwise the new head
    stays. Returns 'loaded' or 'new'."""
    try:
        record = ckpt.read_checkpoint(path)
        if record.arch is not None and record.arch != arch:
            raise ckpt.CheckpointError(f"{path}: holds architecture {record.arch}, not --arch "
                                       f"{arch}; pass --arch {record.arch}")
        state_dict = ckpt.checkpoint_state_dict(record.state_dict, path)
        if arch == "densenet121":
            state_dict = remap_densenet_keys(state_dict)
        own = model.state_dict()
        head_keys = [k for k in own if k.startswith(HEAD_MODULES[arch] + ".")]
        head_fits = record.class_folders == list(folders) and all(
            k in state_dict and state_dict[k].shape == own[k].shape for k in head_keys)
        if not head_fits:  # ImageNet's 1000-way head, or other classes: keep the new head
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_MODULES[arch] + ".")}
            state_dict.update({k: own[k] for k in head_keys})
        checkpoint.load_weights_into(model, state_dict, path, arch, arch_flag="--arch")
    except ckpt.CheckpointError as err:
        raise WeightsError(f"--weights {err}") from None
    return "loaded" if head_fits else "new"


def build_model(arch, weights_spec, folders, image_size_px, seed):
    """(model, WeightsInfo): `arch` with a head of one output per class folder, starting from
    ImageNet weights, a file, or a seeded random initialisation."""
    from torchvision.models import get_model
    torch.manual_seed(seed)  # the new head (and everything with --weights none) is seeded
    if weights_spec == "imagenet":
        model, source = load_imagenet(arch)
        return replace_head(model, arch, len(folders)), WeightsInfo(weights_spec, source, "new")
    # torchvision builds a ViT for one input size; other sizes only without pretrained weights.
    extra = {"image_size": image_size_px} if arch == "vit_b_16" else {}
    model = replace_head(get_model(arch, weights=None, **extra), arch, len(folders))
    if weights_spec == "none":
        return model, WeightsInfo("none", f"random init (seed {seed})", "new")
    head = load_weights_file(model, arch, weights_spec, folders)
    return model, WeightsInfo(weights_spec, str(weights_spec), head)


def make_transforms(image_size_px, flip=False):
    """(train, eval) transforms. Training: the CLIP path's augmentation, open_clip's training
    transform (a random resized crop of 90-100% of the area, bicubic), so the comparison differs
    in the model only; `flip` adds a horizontal flip (--flip; left and right eyes carry the same
    labels, but the CLIP run does not flip). Evaluation: the shorter side resized to the input
    size and centre-cropped, as open_clip's validation transform does."""
    from open_clip.transform import AugmentationCfg
    from torchvision import transforms as T
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size_px, scale=AugmentationCfg().scale,
                                           interpolation=T.InterpolationMode.BICUBIC),
                       *([T.RandomHorizontalFlip()] if flip else []), *normalize])
    evaluate = T.Compose([T.Resize(image_size_px), T.CenterCrop(image_size_px), *normalize])
    return train, evaluate


# ----------------------------------------------------------------------------------------------
# Training and prediction


def make_loader(items, transform, args, train, generator=None):
    """DataLoader over cohort.ImageListDataset; class-balanced draws with --balanced-sampling.

    As clip_train.py's (train.sampling), so that --resume is exact: the training sampler draws
    from `generator` (saved with the RNG states), workers are seeded from (seed, epoch, worker) and
    restart every epoch, and each loader picks its workers' base seed from a throwaway generator
    of its own, never from the global one that the epoch's augmentations follow."""
    size = args.image_size
    dataset = cohort.ImageListDataset(items, transform, min_side_px=size, image_shape=(3, size, size))
    sampler = None
    if train and args.balanced_sampling:
        weights = torch.as_tensor(sample_weights([label for _path, label in items]), dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(items), replacement=True,
                                                         generator=generator)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    # A training batch of one image cannot be batch-normalised (one value per channel on a 1x1
    # map at small input sizes), so a last batch that would hold one is dropped; its image is
    # drawn again in another epoch's shuffle. Evaluation keeps every image.
    drop_last = train and len(items) > 1 and len(items) % args.batch_size == 1
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=args.workers, pin_memory=args.device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=EpochWorkerSeed(args.seed) if train else cli.seed_worker, persistent_workers=False)


def train_one_epoch(model, loader, optimizer, scheduler, criterion, args, scaler):
    """One pass; unreadable images are left out of the loss. Returns (mean loss, images, skipped)."""
    from tqdm import tqdm
    model.train()
    total, seen, skipped = 0.0, 0, 0
    # disable=None: a bar only on a terminal; a log file gets no \r fragments (as clip_train.py)
    for images, labels, _indices, ok in tqdm(loader, desc="training", unit="batch", leave=False,
                                              disable=True if args.no_progress else None):
        ok = ok.bool()
        skipped += int((~ok).sum())
        if not ok.any():
            continue
        images, labels = images[ok].to(args.device), labels[ok].to(args.device)
        with models.autocast_context(args.device, args.precision):
            loss = criterion(model(images).float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(labels)
        seen += len(labels)
    return total / max(seen, 1), seen, skipped


@torch.no_grad()
def predict(model, loader, args):
    """Class probabilities (N, C) float64 in dataset order, NaN rows for unreadable images."""
    model.eval()
    probs = None
    for images, _labels, indices, ok in loader:
        with models.autocast_context(args.device, args.precision):
            batch = F.softmax(model(images.to(args.device)).float(), dim=1).double().cpu()
        if probs is None:
            probs = torch.full((len(loader.dataset), batch.shape[1]), float("nan"), dtype=torch.float64)
        probs[indices[ok.bool()]] = batch[ok.bool()]
    return probs.numpy()


def validation_metrics(probs, items, class_weights):
    """val_loss (the training criterion), val_accuracy, val_balanced_accuracy, val_n_failed."""
    y_true = np.array([label for _path, label in items])
    ok = np.isfinite(probs).all(axis=1)
    y_true, scored = y_true[ok], probs[ok]
    y_pred = scored.argmax(axis=1)
    log_p = torch.log(torch.from_numpy(scored).clamp_min(1e-12))
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float64)
    loss = F.nll_loss(log_p, torch.from_numpy(y_true), weight=weight).item() if ok.any() else float("nan")
    return {"val_loss": loss,
            "val_accuracy": float((y_pred == y_true).mean()) if ok.any() else float("nan"),
            "val_balanced_accuracy": selection_score(y_true, y_pred),
            "val_n_failed": int((~ok).sum())}


# ----------------------------------------------------------------------------------------------
# Command line


def weights_spec(text):
    """argparse type for --weights: 'imagenet', 'none' or a path."""
    return text.lower() if text.lower() in ("imagenet", "none") else text


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_conflicting_spellings(parser, argv if argv is not None else sys.argv[1:])
    check_args(parser, args)
    return args


def build_parser():
    """The command line of `python -m baselines.train_cnn`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    for flag, split in (("--train-dir", "train"), ("--val-dir", "val"), ("--test-dir", "test")):
        data.add_argument(flag, required=True, help="folder with one sub-folder per class, or a "
                          f"manifest.csv of data_preprocess.py (its rows of split '{split}')")
    cli.add_out_dir(data, dest="save_dir", old=("--save-dir", "--output-dir"), required=True,
                    help="where the checkpoint, metrics.csv, args.json and predictions.csv go")
    cli.add_prompts(data, help="JSON prompt set of clip_train.py; only its class folders (and "
                               "their order) are used, so the baseline has the same classes as the CLIP run")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHS, default="resnet50",
                       help="torchvision architecture (default resnet50; resnet18 is the quick one)")
    model.add_argument("--weights", type=weights_spec, default="imagenet", metavar="imagenet|none|PATH",
                       help="starting weights: 'imagenet' (torchvision's, from torch's cache or "
                            "downloaded), 'none' (random init), or a state_dict file (an ImageNet "
                            "download, or a checkpoint of this script); the classification head is "
                            "new unless the file is a checkpoint of ours with the same classes")
    model.add_argument("--image-size", type=int, default=224,
                       help="input side in pixels (default 224, what ImageNet weights were trained "
                            f"at; >= {MIN_IMAGE_SIZE_PX}; vit_b_16 with weights needs exactly 224)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30, help="passes over the training set (default 30)")
    optim.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    optim.add_argument("--lr", type=float, default=1e-4,
                       help="AdamW peak learning rate, cosine-decayed to 0 over all steps (default "
                            "1e-4 for fine-tuning; ~1e-3 from random init)")
    optim.add_argument("--weight-decay", type=float, default=0.01,
                       help="AdamW decoupled weight decay (default 0.01; 0.01-0.05 usual)")
    optim.add_argument("--class-weights", action="store_true",
                       help="weight the cross-entropy by n / (C * count) per class (the rare class "
                            "counts as much as the others); not with --balanced-sampling")
    optim.add_argument("--balanced-sampling", action="store_true",
                       help="draw every class equally often (with replacement); not with "
                            "--class-weights, which would correct the imbalance twice")
    optim.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                       help="random horizontal flips in training (default off, as the CLIP run: the "
                            "same augmentation for both models unless you say otherwise)")
    run = parser.add_argument_group("run")
    cli.add_seed(run, help="seed for the initial weights and batches")
    cli.add_device(run)
    cli.add_precision(run)  # auto: models.resolve_precision, as clip_train.py and inference.py
    cli.add_workers(run)
    cli.add_overwrite(run)
    run.add_argument("--resume", default=None, metavar="auto|PATH",
                     help=f"continue a run from its {LAST_NAME} ('auto': the one in --out-dir, if "
                          "any); the weights are the same as a run never interrupted")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_args(parser, args):
    """Values and combinations, named by their flag (exit 2 before anything is written)."""
    # --epochs 0 with --resume: predict --test-dir with a checkpoint, no training (predict_only)
    for flag, value, low in (("--epochs", args.epochs, 0 if args.resume else 1), ("--batch-size", args.batch_size, 1),
                             ("--image-size", args.image_size, MIN_IMAGE_SIZE_PX)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    if args.class_weights and args.balanced_sampling:
        parser.error("--class-weights and --balanced-sampling both correct the class imbalance; "
                     "pass one of them")
    if args.arch == "vit_b_16":
        if args.image_size % VIT_PATCH_PX:
            parser.error(f"--image-size {args.image_size}: vit_b_16 needs a multiple of {VIT_PATCH_PX}")
        if args.weights != "none" and args.image_size != VIT_PRETRAINED_SIZE_PX:
            parser.error(f"--image-size {args.image_size}: vit_b_16 with --weights {args.weights} "
                         f"needs --image-size {VIT_PRETRAINED_SIZE_PX} (or --weights none)")
    for flag in ("--train-dir", "--val-dir", "--test-dir"):
        spec = Path(getattr(args, flag[2:].replace("-", "_")))
        if not spec.exists():
            parser.error(f"{flag} {spec}: no such folder or manifest.csv")
        if spec.is_file() and spec.suffix.lower() != ".csv":
            parser.error(f"{flag} {spec}: a file must be a manifest.csv")
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file; pass imagenet, none or a weights file")
    if args.prompts and not Path(args.prompts).is_file():
        parser.error(f"--prompts {args.prompts}: no such file")
    save_dir = Path(args.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        parser.error(f"--out-dir {save_dir}: exists and is not a folder")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not (args.overwrite or args.resume):
        parser.error(f"--out-dir {save_dir}: folder is not empty; pass --resume auto to continue "
                     "that run, --overwrite to replace its results, or choose another folder")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file; pass auto or the {LAST_NAME} of a run")


def load_cohorts(args):
    """The class folders (prompts.py's registry or --prompts) and the three labelled image lists."""
    folders = prompt_sets.class_folders(prompt_sets.load_prompt_set(args.prompts))
    lists = []
    for flag, spec, split in (("--train-dir", args.train_dir, "train"), ("--val-dir", args.val_dir, "val"),
                              ("--test-dir", args.test_dir, "test")):
        try:
            lists.append(cohort.load_labelled_items(spec, folders, split))
        except (cohort.CohortError, OSError) as err:
            raise cohort.CohortError(f"{flag} {err}") from None
    test_spec = Path(args.test_dir)
    # As inference.py: paths relative to the test folder, or to the folder of its manifest.
    test_root = test_spec.parent if test_spec.is_file() else test_spec
    cohorts = Cohorts(folders, *lists, test_root=test_root)
    counts = np.bincount([label for _path, label in cohorts.train], minlength=len(folders))
    if args.class_weights and (counts == 0).any():
        missing = [folders[k] for k in np.flatnonzero(counts == 0)]
        raise ValueError(f"--class-weights: class(es) {missing} have no training images in "
                         f"{args.train_dir}; add images or leave --class-weights off")
    return cohorts


def prepare(args):
    """Everything that can refuse the run, done before anything is written: device, classes,
    cohorts, model and weights. Returns (cohorts, model, WeightsInfo)."""
    args.device = models.resolve_device(args.device)
    args.precision, _why = models.resolve_precision(args.precision, args.device)  # clip_train's rule
    models.autocast_context(args.device, args.precision)
    if args.workers is None:
        args.workers = cli.default_workers(args.device)
    cohorts = load_cohorts(args)
    model, weights = build_model(args.arch, args.weights, cohorts.folders, args.image_size, args.seed)
    return cohorts, model.to(args.device), weights


def prepare_save_dir(args):
    """Create --out-dir; with --overwrite remove our own files of an earlier run first."""
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_NAMES if args.overwrite and not args.resume else ():
        (save_dir / name).unlink(missing_ok=True)
    return save_dir


def run_record(args, argv, cohorts, weights, class_weights):
    """args.json in the layout of the other scripts (outputs.run_record), with the classes, the
    starting weights, the class weights and the image counts under `run`."""
    import torchvision
    # run as a module (the file alone cannot import the package): args.json repeats `python -m`
    record = outputs.run_record("baselines.train_cnn", argv, args, outputs.plain({
        "class_folders": cohorts.folders, "weights": vars(weights),
        "class_weights": None if class_weights is None else class_weights.tolist(),
        "images": {"train": len(cohorts.train), "val": len(cohorts.val), "test": len(cohorts.test)}}))
    record["environment"]["torchvision"] = torchvision.__version__
    return record


def resume_path(args):
    """The last checkpoint a --resume names (None: nothing to resume, a fresh run)."""
    if not args.resume:
        return None
    path = Path(args.save_dir) / LAST_NAME if args.resume == "auto" else Path(args.resume)
    return path if path.is_file() else None


def read_resume(args, record):
    """The last checkpoint --resume continues, or None; ValueError naming --resume when it is not
    resumable or its run had other training flags (decided before anything is written)."""
    path = resume_path(args)
    if path is None:
        return None
    try:
        last = ckpt.read_checkpoint(path)
    except ckpt.CheckpointError as err:
        raise ValueError(f"--resume {err}") from None
    if last.resume is None or last.format != CHECKPOINT_FORMAT or "scheduler" not in last.extra:
        raise ValueError(f"--resume {path}: not a resumable checkpoint of this script; pass its {LAST_NAME}")
    stored = {k: v for k, v in (last.args or {}).items() if k not in RESUME_FREE_ARGS}
    changes = changed_training_args(stored, {k: v for k, v in record["args"].items() if k not in RESUME_FREE_ARGS})
    if changes:
        raise ValueError(f"--resume {path}: this command changes {describe_changes(changes)} of the "
                         "run it continues; resume with the run's flags (--workers, --device, "
                         "--precision and --test-dir may differ), or start a new run with --overwrite")
    return last


def rng_snapshot(generator):
    """The RNG states an epoch draws from: torch's (augmentations at --workers 0, dropout) and
    the training sampler's generator (CUDA's when in use)."""
    snapshot = {"torch": torch.get_rng_state(), "loader_generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda"] = torch.cuda.get_rng_state_all()
    return snapshot


def restore_rng(snapshot, generator):
    torch.set_rng_state(snapshot["torch"])
    generator.set_state(snapshot["loader_generator"])
    if "cuda" in snapshot and torch.cuda.is_available() and len(snapshot["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(snapshot["cuda"])


def checkpoint_record(model, args, cohorts, record, epoch, metrics):
    """The CheckpointRecord of the model now (the best and the last checkpoint)."""
    return ckpt.CheckpointRecord(
        state_dict=model.state_dict(), format=CHECKPOINT_FORMAT, arch=args.arch,
        class_folders=list(cohorts.folders), image_size_px=args.image_size,
        normalize=outputs.plain({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
        weights=outputs.plain(record["run"]["weights"]), epoch=epoch,
        metrics=outputs.plain(metrics), args=outputs.plain(record["args"]),
        argv=outputs.plain(record["argv"]))


def save_last(path, model, args, cohorts, record, loop, progress, metrics):
    """The resumable checkpoint of the epoch just done; the RNG states are taken after its
    validation, where a straight run's next epoch starts from."""
    optimizer, scheduler, scaler, generator = loop
    last = checkpoint_record(model, args, cohorts, record, progress["epoch"], metrics)
    last.resume = ckpt.TrainingState(
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=[rng_snapshot(generator)],
        step=int(scheduler.last_epoch), best_value=progress["best_value"], best_epoch=progress["best_epoch"],
        history=outputs.plain(progress["history"]), finished=False)
    last.extra["scheduler"] = outputs.plain(scheduler.state_dict())
    ckpt.write_checkpoint(path, last)
    progress["saved_epoch"] = progress["epoch"]


def fit(args, cohorts, model, record, save_dir, resumed=None, progress=None):
    """The epoch loop: train, validate, keep the best epoch (is_improvement: strictly better
    validation balanced accuracy, a tie keeps the earlier epoch, as clip_train.py) as BEST_NAME and
    every epoch as LAST_NAME; metrics.csv rewritten after every epoch. `resumed`: a last checkpoint
    to continue; `progress` (a dict) holds epoch, best and history as they go (main reads it after a
    Ctrl-C). Returns the best epoch."""
    import pandas as pd
    train_tf, eval_tf = make_transforms(args.image_size, args.flip)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = make_loader(cohorts.train, train_tf, args, train=True, generator=generator)
    val_loader = make_loader(cohorts.val, eval_tf, args, train=False)
    class_weights = record["run"]["class_weights"]
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32, device=args.device)
    criterion = torch.nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.precision == "fp16")
    progress = {} if progress is None else progress
    progress.update(epoch=0, best_value=None, best_epoch=None, history=[])
    if resumed is not None:
        model.load_state_dict(resumed.state_dict)
        optimizer.load_state_dict(resumed.resume.optimizer)
        scheduler.load_state_dict(resumed.extra["scheduler"])
        scaler.load_state_dict(resumed.resume.scaler)
        restore_rng(resumed.resume.rng[0], generator)
        progress.update(epoch=resumed.epoch, saved_epoch=resumed.epoch, best_value=resumed.resume.best_value,
                        best_epoch=resumed.resume.best_epoch, history=list(resumed.resume.history))
        LOG.info("resumed from %s at epoch %d", resume_path(args), resumed.epoch)
    history = progress["history"]
    for epoch in range(progress["epoch"] + 1, args.epochs + 1):
        start = time.perf_counter()
        train_loader.worker_init_fn.epoch = epoch  # workers seeded from (seed, epoch, worker id)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, seen, skipped = train_one_epoch(model, train_loader, optimizer, scheduler,
                                                    criterion, args, scaler)
        metrics = validation_metrics(predict(model, val_loader, args), cohorts.val, class_weights)
        best = is_improvement(metrics["val_balanced_accuracy"], progress["best_value"])
        if best:
            progress["best_value"], progress["best_epoch"] = metrics["val_balanced_accuracy"], epoch
            ckpt.write_checkpoint(save_dir / BEST_NAME, checkpoint_record(model, args, cohorts, record, epoch, metrics))
        history.append(outputs.plain({"epoch": epoch, "train_loss": train_loss, **metrics, "lr": lr,
                              "skipped_images": skipped, "seconds": time.perf_counter() - start,
                              "is_best": best}))
        progress["epoch"] = epoch
        save_last(save_dir / LAST_NAME, model, args, cohorts, record, (optimizer, scheduler, scaler, generator),
                  progress, metrics)
        outputs.atomic_write_csv(save_dir / "metrics.csv", pd.DataFrame(history))
        cnn_card.write_training_curves(save_dir, history)
        LOG.info("epoch %d/%d  loss %.4f  val loss %.4f  val acc %.4f  val bal.acc %.4f  %.1f s%s",
                 epoch, args.epochs, train_loss, metrics["val_loss"], metrics["val_accuracy"],
                 metrics["val_balanced_accuracy"], history[-1]["seconds"], "  * best" if best else "")
    return progress["best_epoch"]


def report_interrupt(args, argv, progress, after_training=False):
    """The Ctrl-C lines, as clip_train.py's: which epoch the last checkpoint holds and the exact
    command that continues the run (--resume auto added, --overwrite dropped). Returns 130."""
    if not progress.get("saved_epoch"):
        return outputs.print_interrupted(args.epochs)
    command = " ".join(["python -m baselines.train_cnn", shlex.join(resume_argv(argv))])
    what = "after training, while writing the predictions" if after_training else "during training"
    return outputs.print_interrupted(args.epochs, what, Path(args.save_dir) / LAST_NAME,
                                     progress["saved_epoch"], command)


def predict_only_weights(args, cohorts):
    """--epochs 0 --resume PATH|auto: the state_dict and epoch of a checkpoint of this script (best
    or last) to predict --test-dir with; ValueError naming --resume when there is none, or when it
    holds another --arch, other classes or another --image-size."""
    path = Path(args.save_dir) / LAST_NAME if args.resume == "auto" else Path(args.resume)
    try:
        record = ckpt.read_checkpoint(path)
    except ckpt.CheckpointError as err:
        raise ValueError(f"--resume {err} (--epochs 0 predicts with a checkpoint of this script)") from None
    for flag, recorded, given in (("--arch", record.arch, args.arch),
                                  ("--image-size", record.image_size_px, args.image_size),
                                  ("--prompts", record.class_folders, list(cohorts.folders))):
        if recorded != given:
            raise ValueError(f"--resume {path}: holds {flag[2:]} {recorded}, this command has {given}; "
                             f"pass the {flag} the checkpoint was trained with")
    return ckpt.checkpoint_state_dict(record.state_dict, path), record.epoch


def write_predictions(args, cohorts, model, save_dir, state_dict=None):
    """Predict --test-dir with the best checkpoint's weights (or `state_dict`); returns the
    predictions frame."""
    model.load_state_dict(state_dict if state_dict is not None
                          else checkpoint.load_state_dict_file(save_dir / BEST_NAME))
    _train_tf, eval_tf = make_transforms(args.image_size)
    probs = predict(model, make_loader(cohorts.test, eval_tf, args, train=False), args)
    failed = np.flatnonzero(~np.isfinite(probs).all(axis=1)).tolist()
    reasons = cohort.read_failures(cohorts.test, failed)
    statuses = [f"failed: {reasons[i]}" if i in reasons else "ok" for i in range(len(probs))]
    frame = predictions_frame(cohorts, probs, statuses)
    outputs.atomic_write_csv(save_dir / PREDICTIONS_NAME, frame)
    return frame


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    argv = cli.canonical_argv(build_parser(), argv)  # args.json spells the flags' current names
    cli.configure_logging()
    LOG.setLevel(logging.INFO)  # cli.configure_logging knows the three pipeline scripts only
    try:
        return train_and_predict(args, argv)
    except KeyboardInterrupt:  # before training started (loading, setup): nothing to resume
        print("\ninterrupted before the first epoch ended; nothing to resume, run the command again",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def train_and_predict(args, argv):
    """Prepare (everything that can refuse the run, before anything is written), train (or resume),
    predict --test-dir; returns the exit status."""
    try:
        cohorts, model, weights = prepare(args)
        torch.manual_seed(args.seed)
        labels = [label for _path, label in cohorts.train]
        class_weights = class_weight_vector(labels, len(cohorts.folders)) if args.class_weights else None
        record = run_record(args, argv, cohorts, weights, class_weights)
        predict_only = predict_only_weights(args, cohorts) if args.epochs == 0 else None
        resumed = read_resume(args, record) if predict_only is None else None
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in record["args"].items():
        LOG.info("  %s = %s", key, value)
    LOG.info("== %s (%s), classes %s: %d train / %d val / %d test images, %s (%s) ==", args.arch,
             weights.source, cohorts.folders, len(cohorts.train), len(cohorts.val), len(cohorts.test),
             args.device, args.precision)
    progress = {}
    try:
        save_dir = prepare_save_dir(args)
        outputs.atomic_write_json(save_dir / ("args.json" if predict_only is None else PREDICT_RECORD_NAME),
                                  record)
        try:
            best_epoch = (predict_only[1] if predict_only
                          else fit(args, cohorts, model, record, save_dir, resumed, progress))
        except KeyboardInterrupt:
            return report_interrupt(args, argv, progress)
        if best_epoch is None:
            print(f"error: no epoch had a validation balanced accuracy (none of the {len(cohorts.val)} "
                  f"--val-dir images could be read?); see {save_dir / 'metrics.csv'}", file=sys.stderr)
            return 1
        try:
            frame = write_predictions(args, cohorts, model, save_dir, predict_only and predict_only[0])
            if not predict_only:
                outputs.atomic_write_text(save_dir / CARD_NAME, cnn_card.model_card(
                    args, cohorts, record, best_epoch, progress["history"]))
        except KeyboardInterrupt:
            return report_interrupt(args, argv, progress, after_training=True)
    except outputs.OutputWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FloatingPointError as err:
        print(f"error: {err}; try a lower --lr or --precision fp32", file=sys.stderr)
        return 1
    n_ok = int((frame["status"] == "ok").sum())
    if n_ok == 0:
        print(f"error: none of the {len(frame)} --test-dir images could be read; the reasons are in "
              f"the status column of {save_dir / PREDICTIONS_NAME}", file=sys.stderr)
        return 1
    accuracy = float((frame["pred_label"] == frame["true_label"])[frame["status"] == "ok"].mean())
    LOG.info("== done: best epoch %d; test accuracy %.4f on %d of %d images; %s ==", best_epoch,
             accuracy, n_ok, len(frame), save_dir / PREDICTIONS_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
