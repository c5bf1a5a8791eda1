"""What every script's command line shares: help texts with defaults, logging, DataLoader workers."""

import logging
import os

import numpy as np
import torch

def seed_worker(worker_id):
    """DataLoader worker_init_fn: derive numpy/random seeds from torch's per-worker seed."""
    import random
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_workers(device=None, local_world_size=1):
    """DataLoader workers for `device` ("cuda", "cpu", a torch.device; None = cuda when available)
    per process, with `local_world_size` processes on this node (torchrun's LOCAL_WORLD_SIZE).

    On a GPU the model is fast and decoding decides throughput: the node's cores shared among
    its processes, one worker per core beyond each main process, at most 8. On the CPU the
    model's own threads already use every core, and a worker only takes cores from it (plus fork
    and IPC cost): 0. Measured on 2 cores with
    pre-resized photographs (benchmarks/RESULTS.md): training end-to-end/model-only 0.97 with 0
    workers against 0.81 with 1.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(1, local_world_size) - 1))


def show_defaults(parser, unset=None):
    """Append ' (default: X)' to the help of every option that does not state it yet: X is the
    value ('off'/'on' for switches), or `unset[dest]` (else 'none') where the default is None
    because it is resolved later; required options get ' (required)'. argparse's own
    ArgumentDefaultsHelpFormatter would print 'None' for those and repeat stated defaults."""
    unset = unset or {}
    for action in parser._actions:
        if not action.help or action.dest == "help" or "(default:" in action.help:
            continue
        if action.required:
            action.help += " (required)"
            continue
        if "(default " in action.help and action.dest not in unset:  # stated in words already
            action.help = action.help.replace("(default ", "(default: ", 1)
            continue
        value = action.default
        if action.dest in unset:
            text = unset[action.dest]
        elif isinstance(value, bool):
            text = "on" if value else "off"
        elif value is None or value == []:
            text = "none"
        else:
            text = str(value)
        action.help += f" (default: {text.replace('%', '%%')})"  # help strings are %-formatted
    return parser


def configure_logging(level=logging.INFO):
    """Our loggers at `level`; open_clip's chatty root-logger INFO lines only as warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", force=True)
    for name in ("clip_train", "inference", "data_preprocess"):
        logging.getLogger(name).setLevel(level)
