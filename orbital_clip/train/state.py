"""Resuming a run: the RNG states of every process, what a last checkpoint restores, which
flags a resume may change, and the command that continues an interrupted run."""

import logging
import random
import shlex
from pathlib import Path

import numpy as np
import torch

from orbital_clip import checkpoint as ckpt
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip.train.checkpoints import LAST_NAME

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


# Arguments a resume may change without --resume-with-changes: where and how fast it runs, how
# long (a finished run resumed with more --epochs trains on), and what happens after training.
# Everything else (lr, batch size, recipe, loss, data, seed, ...) changes the run it continues.
RESUME_FREE_ARGS = {"save_dir", "resume", "resume_with_changes", "overwrite", "epochs", "workers",
                    "device", "precision", "no_progress", "dist_timeout", "compile",
                    "grad_checkpointing", "accum_steps", "wise_ft_alphas", "ssa", "ssa_keep_all",
                    "world_size", "rank", "local_rank"}
# Training flags that --resume-with-changes cannot apply to the run it continues: refused by name
# before anything is written (each with why and what to do), never accepted then ignored.
# Flags not listed here take effect: --lr (every step sets it), --weight-decay (re-applied to the
# restored optimiser groups, see `apply_changes`), --batch-size (the schedule continues from the
# fraction of training done), and the rest of the recorded args.
REFUSED_CHANGES = {
    "--select-metric": "the best checkpoint holds the best epoch under the old metric and the "
                       "other epochs' weights are gone; train a new run with --overwrite",
    "--lock-image": "the restored optimiser holds the parameter groups of the old lock; train a "
                    "new run with --overwrite (or --pretrained PATH to the last checkpoint)",
    "--lock-text": "the restored optimiser holds the parameter groups of the old lock; train a "
                   "new run with --overwrite (or --pretrained PATH to the last checkpoint)",
}


def refused_changes(changes, stopped):
    """The message refusing `changes` ([(flag, old, new)]) that a resume cannot apply, or None;
    `stopped`: the run stopped early, so a changed --patience would be ignored."""
    for flag, old, new in changes:
        if flag in REFUSED_CHANGES:
            return f"{flag} ({old} -> {new}) cannot change on resume: {REFUSED_CHANGES[flag]}"
        if flag == "--patience" and stopped:
            return (f"--patience ({old} -> {new}) cannot change on resume: the run already stopped "
                    "early, a resume trains no further; train a new run with --overwrite")
    return None


def apply_changes(changes, ctx, state):
    """Make the accepted changes take effect on the restored optimiser and step counter."""
    flags = {flag for flag, _old, _new in changes}
    if "--weight-decay" in flags:  # load_state_dict restored the old groups' decay
        ctx["optimizer"].param_groups[0]["weight_decay"] = ctx["args"].weight_decay
    if "--batch-size" in flags:  # continue the schedule from the fraction of training done
        state["step"] = state["epoch"] * ctx["steps_per_epoch"]


def new_state():
    """The state of a run that has not trained yet: what end_of_epoch updates, the last checkpoint
    records and resume_from restores (`saved_epoch` is added once a last checkpoint exists)."""
    return {"epoch": 0, "step": 0, "best_value": None, "best_epoch": None, "history": [],
            "stopped": False, "finished": False, "metrics": {}, "nonfinite_in_a_row": 0}


def rng_snapshot(ctx):
    """This process's RNG states as tensors and primitives (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    snapshot = {
        "torch": torch.get_rng_state(),
        "python": outputs.plain(random.getstate()),
        "caption_rng": outputs.plain(ctx["caption_rng"].getstate()),
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


def resume_path(args):
    if not args.resume:
        return None
    if args.resume == "auto":
        path = Path(args.save_dir) / LAST_NAME
        return path if path.is_file() else None
    return Path(args.resume)


def resume_from(path, model, ctx, state):
    """Load weights, optimizer, scaler, RNG and history from a last checkpoint; returns the
    training arguments this run changes (changed_training_args, [] for an older checkpoint)."""
    record = ckpt.read_checkpoint(path)
    resume = record.resume
    if resume is None:
        raise ValueError("not a resumable checkpoint (no optimizer state); "
                         f"resume from {LAST_NAME}")
    # A checkpoint of an older version may spell a local-dir: model relatively: the same folder
    # from here is the same architecture (its content is checked by `check_start_source`).
    moved = moved_local_dir(record, ctx)
    if not moved and models.absolute_source(record.model_name) != ctx["args"].model_name:
        raise ValueError(f"checkpoint architecture {record.model_name} differs from "
                         f"--model-name {ctx['args'].model_name}")
    stored, current = dict(record.args or {}), dict(ctx["args_dict"])
    if moved:  # the same folder moved: its new path is recorded from the next checkpoint on
        for flag in ("model_name", "pretrained"):
            if models.absolute_source(stored.get(flag)) == models.absolute_source(record.model_name):
                stored[flag] = current.get(flag, stored[flag])
    for flag in ("train_dir", "val_dir"):  # the same data from another working folder is no change
        recorded = (record.data or {}).get(flag)
        if recorded and flag in current:
            stored[flag], current[flag] = recorded, str(Path(current[flag]).resolve())
    for flag in ("model_name", "pretrained"):  # nor is the same model source spelled absolutely
        if flag in stored:
            stored[flag] = models.absolute_source(stored[flag])
    changes = changed_training_args(stored, current)
    if changes and not ctx["args"].resume_with_changes:
        return changes  # refused by the caller, before anything is loaded or written
    # Before the optimiser loads: a changed lock would otherwise fail in torch's own words.
    if changes and (refusal := refused_changes(changes, resume.stopped)) is not None:
        raise ValueError(refusal)
    check_start_source(record, ctx)
    model.load_state_dict(record.state_dict)
    ctx["optimizer"].load_state_dict(resume.optimizer)
    ctx["scaler"].load_state_dict(resume.scaler)
    restore_rng(resume.rng, ctx)
    state.update(epoch=record.epoch, step=resume.step, best_value=resume.best_value,
                 best_epoch=resume.best_epoch, history=list(resume.history),
                 stopped=resume.stopped, finished=resume.finished,
                 metrics=dict(record.metrics or {}), saved_epoch=record.epoch)
    return changes


def moved_local_dir(record, ctx):
    """True when the checkpoint's local-dir: model now lies at another path with the same content
    (the recorded SHA-256 matches the folder named by --model-name): the folder was moved, which
    keeps the run (logged with both paths). False otherwise, including when no digest was recorded
    (an older version) or the content differs: then the path comparison decides, as before."""
    args, recorded = ctx["args"], record.pretrained_sha256
    if models.model_source(record.model_name) != "local-dir" or models.model_source(args.model_name) != "local-dir":
        return False
    old_path = models.absolute_source(record.model_name)
    if old_path == args.model_name or recorded is None or args.pretrained != args.model_name:
        return False
    if models.absolute_source(record.pretrained) != old_path or ctx.get("pretrained_sha256") != recorded:
        return False
    LOG.info("--resume: the model folder moved from %s to %s (same SHA-256 %s...); checkpoints "
             "from here on record the new path", old_path[len("local-dir:"):],
             args.model_name[len("local-dir:"):], recorded[:16])
    return True


def check_start_source(record, ctx):
    """Refuse (ValueError) a resume whose starting weights (a --pretrained file or a local-dir:
    folder) no longer hold what the checkpoint recorded: the WiSE-FT base, taken from them, would
    silently be another model. A checkpoint without the digest (an older version) is warned about."""
    spec, current = ctx["args"].pretrained, ctx.get("pretrained_sha256")
    if current is None:  # a tag, an hf-hub: model or none: named, not hashed
        return
    if record.pretrained_sha256 is None:
        LOG.warning("--resume: the checkpoint records no SHA-256 of its starting weights %s (written "
                    "by an older version); they are taken as they are now", spec)
        return
    refusal = models.source_mismatch(spec, current, record.pretrained_sha256,
                                     "put back the files the run started from, or train a new run "
                                     "with --overwrite")
    if refusal:
        raise ValueError(refusal)


def changed_training_args(stored, current):
    """[(flag, stored value, current value)] of the training arguments that differ between a
    checkpoint's recorded args and this run's (both plain dicts); keys missing on either side
    (flags of another version) and RESUME_FREE_ARGS are not compared."""
    return [(f"--{key.replace('_', '-')}", stored[key], current[key])
            for key in sorted(set(stored) & set(current) - RESUME_FREE_ARGS)
            if stored[key] != current[key]]


def describe_changes(changes):
    """'--lr (0.001 -> 0.0001), --batch-size (16 -> 8)'."""
    return ", ".join(f"{flag} ({old} -> {new})" for flag, old, new in changes)


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
