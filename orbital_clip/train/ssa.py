"""Sequential sensitivity analysis (--ssa): each factor swept in turn at the best values found
so far, every trial a training run of its own."""

import logging
import math
import shutil
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch

from orbital_clip import outputs
from orbital_clip.report.figures import save_figure
from orbital_clip.train.card import figure_saver
from orbital_clip.train.checkpoints import OUTPUTS
from orbital_clip.train.options import ArgumentsRefused, parse_args
from orbital_clip.train.runner import TrainingRefused, prepare_run, train_run

LOG = logging.getLogger("clip_train")  # one logger for the whole training command


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
    """argv without --ssa/--ssa-keep-all and without --out-dir (each trial gets its own)."""
    kept, skip = [], 0
    for i, token in enumerate(argv):
        if skip:
            skip -= 1
            continue
        name = token.split("=", 1)[0]
        if name in ("--ssa", "--out-dir", "--save-dir"):
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
    """(exit status, reason) of one SSA trial run in this process, through the training function
    the command line calls. A trial that fails for another reason than its arguments (CUDA out of
    memory at a large batch, a non-finite loss) is recorded and the sweep goes on."""
    try:
        args = parse_args(argv, exit_on_error=False)
    except ArgumentsRefused as refusal:  # argparse printed the usage and the message
        return refusal.status, "refused its arguments"
    try:
        code = train_run(args, argv)
    except TrainingRefused as err:  # refused before writing: its data, weights or checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 2, "exit status 2 (message above)"
    except Exception as err:  # noqa: BLE001 -- any failure of one trial must not end the sweep
        LOG.warning("SSA trial failed: %s: %s", type(err).__name__, str(err).splitlines()[0][:300])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory trial leaves cached blocks behind
        return 1, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return code, "" if code == 0 else f"exit status {code} (message above)"


def sweep(argv, args):
    """--ssa: check every trial's arguments and the cohorts before anything is written, run the
    sweep, and return its exit status (2, with the sweep's new files removed, when a trial
    refused its arguments)."""
    base_argv = strip_ssa_flags(argv)
    for factor in args.ssa:  # every trial's arguments checked before anything is written
        for value in factor.values:
            parse_args(ssa_trial_argv(base_argv, [(factor, value)]) + [
                "--out-dir", str(Path(args.save_dir) / "ssa" / "trials" / "check"), "--overwrite"])
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
            code, reason = run_trial(trial + ["--out-dir", str(trial_dir), "--overwrite"])
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
        outputs.atomic_write_csv(ssa_dir / "summary.csv", pd.DataFrame(rows))
    plot_sensitivity(pd.DataFrame(rows), ssa_dir / "sensitivity.png")
    best_values = {k: v for k, (_f, v) in best.items()}
    outputs.atomic_write_json(ssa_dir / "best_args.json", {"best_values": best_values,
                                                          "argv": ssa_trial_argv(base_argv, list(best.values()))})
    for name in outputs.ssa_copied_files(OUTPUTS):
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
    save_figure(plt, fig, figure_saver(Path(path).parent), Path(path).stem, formats=("png",))
