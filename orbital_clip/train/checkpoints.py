"""The run folder: the checkpoint files of a run, what each records, and clearing a previous
run's outputs with --overwrite."""

from pathlib import Path

from orbital_clip import checkpoint as ckpt
from orbital_clip import outputs
from orbital_clip import prompts as prompt_sets


BEST_NAME = "clip_model_epoch_best.pt"  # published file names
BEST_SAFETENSORS_NAME = "clip_model_epoch_best.safetensors"  # the same weights, no pickle
FINAL_NAME = "clip_model_final.pt"
LAST_NAME = "clip_model_last.pt"  # resumable: weights + optimizer + RNG + history

# Everything clip_train.py writes into --out-dir, declared once: --overwrite clears the files
# marked so, SSA copies the winner's, docs/outputs.md lists them all.
OUTPUTS = (
    outputs.OutputFile(BEST_NAME, "best epoch on --select-metric", copied_by_ssa=True),
    outputs.OutputFile(BEST_SAFETENSORS_NAME, "the best weights without pickle", copied_by_ssa=True),
    outputs.OutputFile(FINAL_NAME, "weights after the last epoch", copied_by_ssa=True),
    outputs.OutputFile(LAST_NAME, "resumable state", copied_by_ssa=True),
    outputs.OutputFile("args.json", "the run record", copied_by_ssa=True),
    outputs.OutputFile("metrics.csv", "one row per epoch (card.py)", copied_by_ssa=True),
    outputs.OutputFile("train_log.jsonl", "one JSON line per epoch (card.py)"),
    outputs.OutputFile("training_curves.png", "loss and metrics per epoch (card.py)", copied_by_ssa=True),
    outputs.OutputFile("MODEL_CARD.md", "the model card (card.py)"),
    outputs.OutputFile("wise_ft_validation.csv", "--wise-ft-alphas: validation metrics per alpha (wise_ft.py)"),
    # the sweep's own record; each SSA run rewrites its tables, and trials/ may hold kept checkpoints
    outputs.OutputFile("ssa/", "--ssa: summary.csv, sensitivity.png, best_args.json, trials/ (ssa.py)",
                       cleared_by_overwrite=False),
)


def checkpoint_metadata(model, ctx, state, metrics):
    """The CheckpointRecord of the model now: weights plus the plain-data description of the run
    stored in every checkpoint."""
    args = ctx["args"]
    return ckpt.CheckpointRecord(
        state_dict=model.state_dict(),
        model_name=args.model_name,
        model_config=ctx["model_config"],
        pretrained=None if args.pretrained == "none" else str(args.pretrained),
        # The file's identity: inference's WiSE-FT refuses a different file found at that path.
        pretrained_sha256=ctx.get("pretrained_sha256"),
        class_folders=prompt_sets.class_folders(ctx["classes"]),
        prompts=prompt_sets.prompt_set_to_dict(ctx["classes"]),
        preprocess={"image_size": ctx["image_size_px"]},
        preprocess_cfg=ctx.get("preprocess_cfg"),  # open_clip's mean/std/resize: rebuilt offline
        logit_scale_mode=args.logit_scale_mode,
        epoch=state["epoch"],
        metrics=outputs.plain(metrics),
        select_metric=args.select_metric,
        # Tuned on validation only; inference never re-tunes them on the external cohort.
        operating_point={"class": ctx["classes"][0].folder,
                         "target_sensitivity": args.target_sensitivity,
                         "threshold": metrics.get("operating_threshold"),
                         "val_sensitivity": metrics.get("operating_val_sensitivity"),
                         "val_specificity": metrics.get("operating_val_specificity")},
        temperature=metrics.get("temperature"),
        args=ctx["args_dict"],
        # Where the model was trained and validated, as absolute paths: inference flags a test
        # cohort that overlaps them ("not an independent test set") from any working folder.
        data={"train_dir": str(Path(args.train_dir).resolve()),
              "val_dir": str(Path(args.val_dir).resolve()), "fold": args.fold},
    )


def save_last(model, ctx, state, metrics):
    """Resumable checkpoint: weights, optimizer, scaler, RNG states, history, best so far."""
    record = checkpoint_metadata(model, ctx, state, metrics)
    record.resume = ckpt.TrainingState(
        optimizer=ctx["optimizer"].state_dict(), scaler=ctx["scaler"].state_dict(),
        rng=ctx["rng_snapshots"], step=state["step"], best_value=state["best_value"],
        best_epoch=state["best_epoch"], history=outputs.plain(state["history"]),
        stopped=bool(state["stopped"]),  # early-stopped: a resume trains no further
        finished=False)  # set by mark_finished once the final checkpoint is written
    ckpt.write_checkpoint(Path(ctx["args"].save_dir) / LAST_NAME, record)


def mark_finished(path):
    """Record in the last checkpoint that the run is over (final checkpoint, WiSE-FT written):
    `--resume auto` then changes nothing."""
    record = ckpt.read_checkpoint(path)
    record.resume.finished = True
    ckpt.write_checkpoint(path, record)


def prepare_save_dir(args):
    """Create --save-dir; with --overwrite (and no resume) clear our own outputs from a prior run."""
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in save_dir.glob(".*.tmp"):  # temp files of writes a killed run never finished
        stale.unlink()
    if args.overwrite and not args.resume:
        for name in outputs.cleared_files(OUTPUTS):
            (save_dir / name).unlink(missing_ok=True)
    return save_dir
