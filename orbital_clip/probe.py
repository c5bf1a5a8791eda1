"""Linear probe: class-weighted logistic regression (scikit-learn) on the frozen, L2-normalised
image features of any model the project loads, its inverse regularisation C chosen on the
validation split by a sweep of a log grid (as CLIP_benchmark and the CLIP paper do). The result
is our checkpoint of the frozen model with the head stored beside it (model_loading.PROBE_KEY),
so `inference.py --checkpoint` evaluates it exactly as a fine-tuned checkpoint.

    $ python linear_probe.py --train-dir dataset_root/train --val-dir dataset_root/val \\
          --model-name ViT-B-32-256 --pretrained datacomp_s34b_b86k --out-dir probe_runs/vit
    $ python linear_probe.py --train-dir splits/manifest.csv --val-dir splits/manifest.csv \\
          --checkpoint runs/clip/clip_model_epoch_best.pt --out-dir probe_runs/finetuned_tower
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from orbital_clip import checkpoint as ckpt
from orbital_clip import cli
from orbital_clip import cohort as cohort_io
from orbital_clip import fewshot
from orbital_clip.probe_fit import C_GRID, head_logits, sweep_c
from orbital_clip import models as model_lib
from orbital_clip import outputs
from orbital_clip import prompts as prompt_sets
from orbital_clip.embedding_cache import cache_model_key
from orbital_clip.metrics import fit_temperature, operating_point, softmax
from orbital_clip.model_loading import (PROBE_KEY, build_model,
                                        requested_model_name, resolve_checkpoint, resolve_model_name)

LOG = logging.getLogger("linear_probe")
DEFAULT_TARGET_SENSITIVITY = 0.9  # as clip_train.py: the rare-class threshold tuned on validation
PROBE_NAME = "linear_probe.pt"
OUTPUTS = (
    outputs.OutputFile(PROBE_NAME, "the frozen model with the probe's head: inference.py --checkpoint"),
    outputs.OutputFile("c_sweep.csv", "validation metrics per C; the selected row marked"),
    outputs.OutputFile("fewshot.csv", "--few-shot: test metrics per k and draw, zero-shot as k 0"),
    outputs.OutputFile("fewshot.png", "--few-shot: the metric against k, spread over draws"),
    outputs.OutputFile("fewshot.pdf", "--few-shot: the same figure, vector"),
    outputs.OutputFile("args.json", "the run record"),
)


def validation_calibration(val_logits, val_y, target_sensitivity):
    """(operating point metrics, temperature) of the probe on validation, as clip_train.py fits
    them for its checkpoints (rare class = class 0)."""
    probs = softmax(val_logits)
    return operating_point(val_y, probs[:, 0], target_sensitivity), fit_temperature(val_logits, val_y)


# ----------------------------------------------------------------------------------------------
# The frozen model and its features (model_loading builds it; scoring's cache encodes it)


@dataclasses.dataclass
class FrozenModel:
    """The model whose image features the probe reads, and what its checkpoint must record."""
    model: torch.nn.Module
    preprocess: object  # evaluation transform
    tokenizer: object
    model_name: str
    pretrained: str | None  # tag, file, hf-hub:/local-dir: model or our checkpoint; None: random
    model_config: dict | None  # rebuilds the architecture offline
    weights_id: str  # checkpoint SHA-256, tag:<tag> or random:<seed>: part of the cache key
    cache_key: str
    logit_scale_mode: str = "exp"  # the zero-shot reference's scale (models.logit_scale)
    checkpoint: object = None  # model_loading.Checkpoint of --checkpoint/--pretrained; None: random


def load_frozen_model(args):
    """The FrozenModel of --checkpoint, or of --model-name with --pretrained (a tag, a weights
    file, hf-hub:/local-dir:, or none: random initialisation seeded by --seed)."""
    requested = requested_model_name(args)
    spec, flag = (args.checkpoint, "--checkpoint") if args.checkpoint else (args.pretrained, "--pretrained")
    if spec in (None, "none"):
        if not requested:
            raise ValueError("--model-name (or --model-config) is required with --pretrained none")
        torch.manual_seed(args.seed)  # random weights, the same for the same --seed
        model, _train_tf, preprocess, tokenizer = model_lib.build_model(requested, None, args.device)
        name, checkpoint, pretrained, weights_id = requested, None, None, f"random:{args.seed}"
    else:
        checkpoint = resolve_checkpoint(spec, flag)
        name = resolve_model_name(requested, checkpoint, role=flag)
        model, preprocess, tokenizer = build_model(name, checkpoint, args.device, flag)
        weights_id = checkpoint.sha256 or f"tag:{checkpoint.spec}"
        pretrained = str(Path(spec).resolve()) if Path(spec).is_file() else spec
        if checkpoint.kind == "ours":  # its own origin, so inference rebuilds the same transform
            pretrained = checkpoint.record.pretrained
    mode = (checkpoint.record.logit_scale_mode if checkpoint is not None and checkpoint.kind == "ours"
            else None) or "exp"
    return FrozenModel(model.eval(), preprocess, tokenizer, name, pretrained,
                       architecture_config(args, name, checkpoint), weights_id,
                       cache_model_key(weights_id, name, preprocess, args.precision), mode, checkpoint)


def probe_classes(args, checkpoint):
    """The probe's classes and prompts (their order is the head's): --prompts, else those
    --checkpoint stores, else the published set, by inference's own rule (scoring.load_classes)."""
    from orbital_clip.scoring import load_classes  # the one rule of which prompts a model has
    if checkpoint is not None:
        return load_classes(args.prompts, checkpoint)[0]  # its errors name --prompts or the file
    try:
        return prompt_sets.load_prompt_set(args.prompts)
    except prompt_sets.PromptSetError as err:
        raise ValueError(f"--prompts {err}") from None


def architecture_config(args, name, checkpoint):
    """The architecture dict a checkpoint records so inference rebuilds it offline: ours' own,
    --model-config's, an hf-hub:/local-dir: model's; None for a model open_clip knows by name."""
    if checkpoint is not None and checkpoint.kind == "ours" and checkpoint.record.model_config:
        return checkpoint.record.model_config
    if args.model_config:
        return model_lib.register_model_config(args.model_config)[1]
    return model_lib.read_model_config(name) if model_lib.model_source(name) else None


def split_features(frozen, items, args, flag):
    """(features (N, D), labels (N,)) of the readable images of one split (through scoring's
    embedding cache with --cache-dir); unreadable ones are left out and counted in the log."""
    from orbital_clip.scoring import image_features  # the one encoder and cache of inference.py
    features, ok, reasons = image_features(frozen.model, frozen.preprocess, items, args, frozen.cache_key)
    if not ok.any():
        raise ValueError(f"{flag}: none of the {len(items)} images could be read")
    if not ok.all():
        LOG.warning("%s: %d unreadable images left out (e.g. %s)", flag, int((~ok).sum()),
                    next(iter(reasons.values())))
    labels = np.array([label for _path, label in items])
    return features[ok], labels[ok]


def load_split_items(args, folders):
    """[(path, label)] of --train-dir and --val-dir (class folders or a manifest's split)."""
    items = []
    for flag, spec, split in (("--train-dir", args.train_dir, "train"), ("--val-dir", args.val_dir, "val")):
        try:
            items.append(cohort_io.load_labelled_items(spec, folders, split))
        except cohort_io.CohortError as err:
            raise ValueError(f"{flag} {err}") from None
    return items


def test_split_items(args, folders):
    """[(path, label)] of --test-dir (class folders or a manifest's 'test' rows)."""
    try:
        return cohort_io.load_labelled_items(args.test_dir, folders, "test")
    except cohort_io.CohortError as err:
        raise ValueError(f"--test-dir {err}") from None


def probe_record(frozen, fit, classes, val_logits, val_y, args, argv):
    """The CheckpointRecord of the frozen model with the probe's head, validated as clip_train.py
    validates its checkpoints (operating threshold and temperature on the validation split)."""
    point, temperature = validation_calibration(val_logits, val_y, args.target_sensitivity)
    chosen = next(row for row in fit.sweep if row["selected"])
    return ckpt.CheckpointRecord(
        state_dict=frozen.model.state_dict(), model_name=frozen.model_name,
        model_config=frozen.model_config, pretrained=frozen.pretrained,
        preprocess={"image_size": model_lib.model_image_size(frozen.model)},
        preprocess_cfg=model_lib.model_preprocess_cfg(frozen.model),
        class_folders=prompt_sets.class_folders(classes),
        prompts=prompt_sets.prompt_set_to_dict(classes), logit_scale_mode="exp",
        operating_point={"class": classes[0].folder, "target_sensitivity": args.target_sensitivity,
                         "threshold": point["operating_threshold"],
                         "val_sensitivity": point["operating_val_sensitivity"],
                         "val_specificity": point["operating_val_specificity"]},
        temperature=temperature, metrics=outputs.plain(chosen), select_metric="balanced_accuracy",
        args=outputs.run_record("linear_probe.py", argv, args)["args"], argv=list(argv),
        data={"train_dir": str(Path(args.train_dir).resolve()),
              "val_dir": str(Path(args.val_dir).resolve()), "fold": None},
        extra={PROBE_KEY: {"weight": torch.from_numpy(fit.weight), "bias": torch.from_numpy(fit.bias),
                           "c": fit.c, "c_grid": [row["c"] for row in fit.sweep],
                           "class_weight": "balanced", "features": "L2-normalised image embedding",
                           "library": "sklearn.linear_model.LogisticRegression (lbfgs)"}})


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser(description=__doc__):
    """linear_probe.py's command line; `--help` shows every default."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", required=True,
                      help="folder with one sub-folder per class, or a manifest.csv (rows of split 'train')")
    data.add_argument("--val-dir", required=True,
                      help="folder with one sub-folder per class, or a manifest.csv (rows of split "
                           "'val'): C is chosen here, never on the test cohort")
    cli.add_out_dir(data, required=True, help="where linear_probe.pt, c_sweep.csv and args.json go")
    cli.add_prompts(data, help="JSON prompt set: its classes (and their order) are the probe's, "
                               "its prompts score the few-shot zero-shot row (default: those "
                               "--checkpoint stores, else the published set)")
    data.add_argument("--config", default=None, metavar="FILE",
                      help="JSON (or .yaml) of flag defaults; flags on the command line override it")
    model = parser.add_argument_group("the frozen model")
    cli.add_model_flags(model, name_help="open_clip architecture, or hf-hub:ORG/REPO or local-dir:PATH "
                                         "(not needed with --checkpoint)",
                        pretrained_help="open_clip tag, weights file, hf-hub:/local-dir: model's own "
                                        "weights, or none (random init, seeded by --seed)")
    model.add_argument("--checkpoint", default=None,
                       help="a checkpoint of clip_train.py: probe its (fine-tuned) image tower")
    probe = parser.add_argument_group("the probe")
    probe.add_argument("--c-grid", action=cli.SpaceList, item=float, default=list(C_GRID), metavar="C",
                       help="inverse L2 strengths swept on validation (default: 1e-4 to 1e6, every "
                            "half decade); a selected C at an end of the grid says: widen it")
    probe.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                       help="rare-class sensitivity the validation operating threshold keeps, in "
                            "(0, 1] (default 0.9, as clip_train.py)")
    cli.add_seed(probe)
    curves = parser.add_argument_group("few-shot curves")
    curves.add_argument("--few-shot", action=cli.SpaceList, item=fewshot.parse_k, default=None,
                        metavar="K", help="also fit the probe on K images per class (e.g. 1 2 4 8 16 "
                                          "all; a class with fewer gives all it has) and score each "
                                          "on --test-dir: fewshot.csv/.png with zero-shot as k 0")
    curves.add_argument("--draws", type=int, default=fewshot.DEFAULT_DRAWS,
                        help="seeded draws per k (default 5; 'all' has one)")
    curves.add_argument("--test-dir", default=None,
                        help="with --few-shot: the cohort the curves are scored on (class folders, "
                             "or a manifest.csv's 'test' rows)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    cli.add_workers(run)
    cli.add_device(run)
    cli.add_precision(run)
    run.add_argument("--cache-dir", default=None,
                     help="image-embedding cache shared with inference.py --cache-dir: features "
                          "are computed once per model and cohort")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_overwrite(run)
    return cli.show_defaults(parser)


def parse_args(argv=None):
    """Checked arguments; a refused value exits 2 naming its flag, before anything is loaded."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        cli.apply_config(parser, known.config)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Every refused value or combination, named by its flag."""
    if args.checkpoint and args.pretrained:
        parser.error("--checkpoint and --pretrained: give one (the checkpoint brings its weights)")
    if not args.checkpoint and args.pretrained is None:
        parser.error("give --checkpoint PATH, or --model-name with --pretrained TAG|FILE|none")
    for flag, value in (("--train-dir", args.train_dir), ("--val-dir", args.val_dir)):
        if not Path(value).exists():
            parser.error(f"{flag} {value}: no such folder or manifest")
    for flag, value in (("--model-config", args.model_config), ("--prompts", args.prompts)):
        if value and not Path(value).is_file():
            parser.error(f"{flag} {value}: no such file")
    if not args.c_grid or any(not (c > 0 and np.isfinite(c)) for c in args.c_grid):
        parser.error(f"--c-grid: every C must be a positive number, got {args.c_grid}")
    if not 0.0 < args.target_sensitivity <= 1.0:
        parser.error(f"--target-sensitivity must be in (0, 1], got {args.target_sensitivity}")
    if args.few_shot and not args.test_dir:
        parser.error("--few-shot needs --test-dir (the cohort the curves are scored on)")
    if args.test_dir and not args.few_shot:
        parser.error("--test-dir is read by --few-shot only; score the probe with inference.py")
    if args.test_dir and not Path(args.test_dir).exists():
        parser.error(f"--test-dir {args.test_dir}: no such folder or manifest")
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is None:
        args.workers = cli.default_workers(args.device)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")


def prepare(args):
    """(classes, frozen model, train and val features) with every refusal before any output."""
    args.device = model_lib.resolve_device(args.device)
    args.precision, why = model_lib.resolve_precision(args.precision, args.device)
    LOG.info("precision %s (%s)", args.precision, why)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not args.overwrite)):
        raise ValueError(f"--out-dir {out_dir}: exists and is not an empty folder; pass --overwrite "
                         "or choose another folder")
    frozen = load_frozen_model(args)
    classes = probe_classes(args, frozen.checkpoint)
    train_items, val_items = load_split_items(args, prompt_sets.class_folders(classes))
    train = split_features(frozen, train_items, args, "--train-dir")
    val = split_features(frozen, val_items, args, "--val-dir")
    missing = sorted(set(range(len(classes))) - set(train[1].tolist()))
    if missing:
        raise ValueError(f"--train-dir {args.train_dir}: no readable image of class "
                         f"{[classes[i].folder for i in missing]}; a probe needs every class")
    return classes, frozen, train, val


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cli.configure_logging()
    LOG.setLevel(logging.INFO)  # configure_logging knows the other scripts' loggers only
    LOG.info("== setup ==")
    try:
        classes, frozen, (train_x, train_y), (val_x, val_y) = prepare(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    LOG.info("== sweeping C over %d values: %d train, %d val images of %s, %d features ==",
             len(args.c_grid), len(train_y), len(val_y), frozen.model_name, train_x.shape[1])
    fit = sweep_c(train_x, train_y, val_x, val_y, len(classes), args.c_grid, args.seed)
    if fit.c in (min(args.c_grid), max(args.c_grid)) and len(args.c_grid) > 1:
        LOG.warning("selected C %g is at an end of --c-grid: widen the grid", fit.c)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in outputs.cleared_files(OUTPUTS):  # --overwrite: no fewshot.csv of an earlier run stays
        (out_dir / name).unlink(missing_ok=True)
    val_logits = head_logits(val_x, fit.weight, fit.bias)
    record = probe_record(frozen, fit, classes, val_logits, val_y, args, argv)
    ckpt.write_checkpoint(out_dir / PROBE_NAME, record)
    outputs.atomic_write_csv(out_dir / "c_sweep.csv", pd.DataFrame(fit.sweep))
    outputs.atomic_write_json(out_dir / "args.json", outputs.run_record(
        "linear_probe.py", argv, args, {"selected_c": fit.c, "model_name": frozen.model_name,
                                        "weights": frozen.weights_id, "n_train": len(train_y),
                                        "n_val": len(val_y)}))
    if args.few_shot:
        LOG.info("== few-shot curves: k %s, %d draws ==", " ".join(args.few_shot), args.draws)
        test_items = test_split_items(args, record.class_folders)
        test = split_features(frozen, test_items, args, "--test-dir")
        fewshot.write_curves(out_dir, args, frozen, classes, (train_x, train_y), (val_x, val_y), test)
    chosen = next(row for row in fit.sweep if row["selected"])
    LOG.info("== done: C %g, validation balanced accuracy %.3f, loss %.3f; evaluate with "
             "inference.py --checkpoint %s ==", fit.c, chosen["val_balanced_accuracy"],
             chosen["val_loss"], out_dir / PROBE_NAME)
    return 0
