"""One training run from parsed arguments: prepare the cohorts, build, (resume,) train, save.
`train_run` is what the command line and every SSA trial call."""

import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from orbital_clip import cli
from orbital_clip import checkpoint
from orbital_clip import cohort
from orbital_clip import images
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import prompts as prompt_sets
from orbital_clip.train.card import done_summary, model_card
from orbital_clip.train.checkpoints import (BEST_NAME, FINAL_NAME, LAST_NAME, checkpoint_metadata,
                                            mark_finished, prepare_save_dir)
from orbital_clip.train.distributed import init_distributed, wrap_for_training
from orbital_clip.train.health import nonfinite_stop_cause
from orbital_clip.train.losses import make_loss
from orbital_clip.train.loop import run_training
from orbital_clip.train.model_setup import configure_trainable, setup_model
from orbital_clip.train.sampling import make_loader
from orbital_clip.train.schedule import param_groups, warmup_steps
from orbital_clip.train.shortcuts import configure_exact_shortcuts
from orbital_clip.train.state import apply_changes, describe_changes, new_state, resume_command, resume_from, resume_path
from orbital_clip.train.wise_ft import choose_wise_ft_alpha

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


EXIT_INTERRUPTED = outputs.EXIT_INTERRUPTED  # 128 + SIGINT, what a shell reports for a Ctrl-C


def drop_unsupported(items, flag, spec):
    """The items without the files no reader recognises (a phone .heic), with a warning giving
    their count: listed by the rule every script shares (images.is_candidate_image), left out
    here so they are neither trained on nor skipped anew every epoch."""
    unsupported = set(images.unsupported_format_files([path for path, _label in items]))
    if not unsupported:
        return items
    example = sorted(unsupported)[0]
    LOG.warning("%s %s: %d file(s) in a format neither Pillow nor pydicom reads are left out, "
                "e.g. %s (%s %s); convert them to JPEG or PNG to use them", flag, spec,
                len(unsupported), example, images.UNSUPPORTED_FORMAT, example.suffix.lower())
    kept = [item for item in items if item[0] not in unsupported]
    if not kept:
        raise cohort.CohortError(f"{spec}: no image in a readable format (e.g. {example})")
    return kept


def prepare_run(args):
    """Device, precision, torchrun process group, prompts and the two cohorts."""
    args.device = models.resolve_device(args.device)
    args.precision, why = models.resolve_precision(args.precision, args.device)
    LOG.info("precision %s (%s)", args.precision, why)
    if args.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what stays in fp32
    models.autocast_context(args.device, args.precision)
    init_distributed(args)
    classes = prompt_sets.load_prompt_set(args.prompts)
    folders = prompt_sets.class_folders(classes)
    fold = {} if args.fold is None else {"fold": args.fold}
    items = []
    for flag, spec, split in (("--train-dir", args.train_dir, "train"), ("--val-dir", args.val_dir, "val")):
        try:
            items.append(drop_unsupported(cohort.load_labelled_items(spec, folders, split, **fold),
                                          flag, spec))
        except cohort.CohortError as err:
            raise cohort.CohortError(f"{flag} {err}") from None
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
    known = {**images.manifest_sha256(args.train_dir), **images.manifest_sha256(args.val_dir)}
    pairs = images.overlapping_images([p for p, _ in val_items], [p for p, _ in train_items], known)
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
    args_dict = outputs.plain({k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()})
    return {
        "args": args, "args_dict": args_dict,
        # a weights file's or local-dir: folder's content; None for a tag or none
        "pretrained_sha256": models.source_sha256(args.pretrained),
        "classes": classes, "tokenizer": tokenizer,
        "model_config": model_config, "image_size_px": models.model_image_size(model),
        "preprocess_cfg": models.model_preprocess_cfg(model),
        "generator": torch.Generator().manual_seed(args.seed),
        "caption_rng": prompt_sets.new_rng(args.seed + args.rank), "progress": not args.no_progress and args.rank == 0,
        # fused AdamW: one kernel for all parameters on CUDA
        "optimizer": torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                       fused=args.device.type == "cuda"),
        "scaler": torch.amp.GradScaler(args.device.type, enabled=args.precision == "fp16"),
        "loss_fn": make_loss(args.loss, args.rank, args.world_size),
        "warmup_steps": warmup_steps(args.warmup, steps_per_epoch * args.epochs),
        "total_steps": steps_per_epoch * args.epochs, "steps_per_epoch": steps_per_epoch,
        "n_train": n_train,
    }


class TrainingRefused(Exception):
    """A run refused before anything was written (exit status 2): its data, weights, architecture
    or resume checkpoint. The message is the error line without its 'error: ' prefix."""


def train_run(args, argv):
    """One training run from parsed arguments, the whole of it: what clip_train.py's main and every
    SSA trial call. Returns the exit status (0, 1 for a failure said on stderr, EXIT_INTERRUPTED);
    raises TrainingRefused for a run refused before anything was written (argv goes to args.json)."""
    try:
        classes, train_items, val_items = prepare_run(args)
    except (ValueError, OSError) as err:
        raise TrainingRefused(str(err)) from None
    try:
        return train(args, classes, train_items, val_items, argv)
    except KeyboardInterrupt:  # before training started (model loading, setup): nothing to resume
        print("\ninterrupted before the first epoch ended; nothing to resume, run the command again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except outputs.OutputWriteError as err:
        print(f"error: {err}; the previous files there are intact", file=sys.stderr)
        return 1
    finally:
        if args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args, classes, train_items, val_items, argv):
    """Seed, build, (resume,) train and save; returns the exit status (argv goes to args.json)."""
    LOG.info("== setup: %d process(es) ==", args.world_size)
    # Everything that can refuse the run (weights, architecture, the resume checkpoint) is loaded
    # before anything is written: a refused run leaves --save-dir as it was.
    model, (train_tf, val_tf), ctx, base_state = build_run(args, classes, len(train_items))
    state = new_state()
    if (path := resume_path(args)) is not None and not resume_run(path, model, ctx, state):
        return 0
    save_dir = prepare_save_dir(args) if args.rank == 0 else Path(args.save_dir)
    for key, value in ctx["args_dict"].items():  # all in args.json; in the log with debug logging
        LOG.debug("  %s = %s", key, value)
    if args.rank == 0:
        outputs.atomic_write_json(save_dir / "args.json", outputs.run_record(
            "clip_train.py", argv, args, {"train_images": len(train_items), "val_images": len(val_items),
                                          "config": cli.config_record(args.config)}))
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
        return report_nonfinite_stop(err, args, argv, state, save_dir)
    if args.rank == 0:
        try:
            finish_run(model, ctx, state, metrics, val_loader, base_state,
                       (classes, train_items, val_items))
        except KeyboardInterrupt:
            return report_interrupt(args, argv, state, save_dir, after_training=True)
    LOG.info("== done: %s; checkpoints and curves in %s ==", done_summary(state, args), save_dir)
    return 0


def build_run(args, classes, n_train):
    """Seed and build the model and what the loop needs; returns (model, (train transform, val
    transform), ctx, WiSE-FT base weights or None). Weights or an architecture that cannot load
    are refused (TrainingRefused)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        model, train_tf, val_tf, tokenizer, model_config = setup_model(args)
    except ValueError as err:
        raise TrainingRefused(str(err)) from None
    if args.world_size > 1:
        # The same init on every rank (above), then a stream of its own for the augmentations and
        # dropout masks that run in this process (--workers 0): seed + rank, as open_clip does.
        torch.manual_seed(args.seed + args.rank)
        random.seed(args.seed + args.rank)
        np.random.seed(args.seed + args.rank)
    configure_trainable(model, args)
    text_dedup = configure_exact_shortcuts(model, args.accum_steps)
    ctx = build_context(args, model, tokenizer, classes, model_config, n_train)
    ctx["text_dedup"] = text_dedup
    # WiSE-FT interpolates from the weights training started from (pretrained, or the seeded
    # init): taken before a resume loads the trained ones.
    base_state = None
    if args.wise_ft_alphas:
        base_state = {k: v.detach().clone() for k, v in checkpoint.clean_state_dict(model.state_dict()).items()}
    return model, (train_tf, val_tf), ctx, base_state


def resume_run(path, model, ctx, state):
    """Load the last checkpoint at `path` into model, ctx and state; False when it is a finished
    run that this command would not extend (nothing to do). Refused (TrainingRefused) when it
    cannot be loaded, or when it changes training flags without --resume-with-changes."""
    args = ctx["args"]
    try:
        changes = resume_from(path, model, ctx, state)
    except (ValueError, KeyError, RuntimeError) as err:
        detail = str(err) if isinstance(err, checkpoint.CheckpointError) else f"{path}: {err}"
        raise TrainingRefused(f"--resume {detail.splitlines()[0]}") from None
    if changes and not args.resume_with_changes:
        raise TrainingRefused(f"--resume {path}: this command changes {describe_changes(changes)} of "
                              "the run it continues; resume with the run's flags, or pass "
                              "--resume-with-changes if the change is meant")
    if changes:
        apply_changes(changes, ctx, state)
        LOG.warning("--resume-with-changes: continuing %s with %s", path, describe_changes(changes))
    if state["finished"] and (state["stopped"] or state["epoch"] >= args.epochs):
        LOG.info("--resume: %s is a finished run (%s at epoch %d); nothing to do, no file "
                 "changed", path, "stopped early" if state["stopped"] else "completed",
                 state["epoch"])
        return False
    LOG.info("resumed from %s at epoch %d", path, state["epoch"])  # only once it is accepted
    return True


def finish_run(model, ctx, state, metrics, val_loader, base_state, cohorts):
    """Rank 0 after the last epoch: the final checkpoint, WiSE-FT (with --wise-ft-alphas), the
    last checkpoint marked finished, MODEL_CARD.md; `cohorts` is (classes, train items, val items)."""
    args, save_dir = ctx["args"], Path(ctx["args"].save_dir)
    checkpoint.write_checkpoint(save_dir / FINAL_NAME, checkpoint_metadata(model, ctx, state, metrics))
    if base_state is not None and (save_dir / BEST_NAME).exists():
        choose_wise_ft_alpha(model, ctx, val_loader, base_state)
    mark_finished(save_dir / LAST_NAME)
    outputs.atomic_write_text(save_dir / "MODEL_CARD.md", model_card(args, *cohorts, state))


def entry_script():
    """The entry-point script beside this package, as reached from the working folder."""
    here = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "clip_train.py"))
    return min(os.path.relpath(here), here, key=len)


def report_nonfinite_stop(err, args, argv, state, save_dir):
    """A run stopped by non-finite steps (exit 1): the checkpoints are as they were; the likely
    cause, and the command that continues from the last checkpoint with a smaller --lr (a plain
    resume would meet the same non-finite steps)."""
    if args.rank != 0:
        return 1
    cause = nonfinite_stop_cause(args.precision)
    smaller = f"{args.lr / 10:g}"
    if state.get("saved_epoch") is not None and (save_dir / LAST_NAME).is_file():
        command, note = resume_command([*argv, "--resume-with-changes", "--lr", smaller],
                                       os.environ, entry_script())
        advice = f"continue from epoch {state['saved_epoch']} with a smaller --lr{note}:\n  {command}"
    else:
        advice = f"no checkpoint was written; start again with --overwrite and a smaller --lr (e.g. {smaller})"
    print(f"error: {err}; the run stopped, checkpoints in {save_dir} are left as they were. Likely "
          f"cause: {cause}. To {advice}", file=sys.stderr)
    return 1


def report_interrupt(args, argv, state, save_dir, after_training=False):
    """Ctrl-C during training, or in the steps after it (the final checkpoint, WiSE-FT, the model
    card): the last checkpoint (written atomically at the end of each epoch, marked finished only
    once those steps are done) is intact; say where the run stopped and the exact command that
    continues it (after the last epoch, `--resume auto` trains nothing and redoes those steps)."""
    if args.rank != 0:
        return EXIT_INTERRUPTED
    if state.get("saved_epoch") is None or not (save_dir / LAST_NAME).is_file():
        return outputs.print_interrupted(args.epochs)
    # the entry-point script beside this package, as reached from the working folder
    command, note = resume_command(argv, os.environ, entry_script())
    what = "during training"
    if after_training:
        what = f"after training, while writing {'WiSE-FT, ' if args.wise_ft_alphas else ''}the final files"
    return outputs.print_interrupted(args.epochs, what, save_dir / LAST_NAME, state["saved_epoch"],
                                     command, note)
