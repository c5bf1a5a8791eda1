"""clip_train.py's main: parse the flags, then one training run or an SSA sweep of runs."""

import logging
import os
import sys

import matplotlib

from orbital_clip import cli
from orbital_clip.train.options import build_parser, parse_args
from orbital_clip.train.runner import TrainingRefused, train_run
from orbital_clip.train.ssa import sweep


def main(argv=None):
    """clip_train.py: returns the exit status (2 for a refused run, nothing written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # args.json and the SSA trials spell the current names (--out-dir, not --save-dir)
    argv = cli.canonical_argv(build_parser(), argv)
    is_main = os.environ.get("RANK", "0") in ("", "0")
    cli.configure_logging(logging.INFO if is_main else logging.WARNING)
    # The figure backend loaded now, not at the end of epoch 1: a Ctrl-C landing while its C
    # extension loads surfaces as an ImportError with a traceback, not as an interrupt.
    matplotlib.use("Agg")
    if args.ssa:
        return sweep(argv, args)
    try:
        return train_run(args, argv)
    except TrainingRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
