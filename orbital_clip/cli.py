"""What every script's command line shares: the shared flags (one name, help and default each),
old spellings that warn, list flags, --config files, help texts with defaults, logging, workers."""

import argparse
import json
import logging
import os
import sys
import shlex
from pathlib import Path

import numpy as np

def seed_worker(worker_id):
    """DataLoader worker_init_fn: derive numpy/random seeds from torch's per-worker seed."""
    import random
    import torch  # here, not at the top: score_answers.py parses its flags without torch
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
    import torch  # here, not at the top: score_answers.py parses its flags without torch
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
        if (not action.help or action.help == argparse.SUPPRESS or action.dest == "help"
                or "(default:" in action.help or "(required)" in action.help):
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


# ----------------------------------------------------------------------------------------------
# The flags every script shares: one name, one help, one default each (where the meaning is the
# same), added by each parser through these functions.

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = ("bf16: autocast, fp32 master weights; auto: bf16 where the hardware multiplies "
                  "bf16 natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), else fp32; fp32 "
                  "for exact, reproducible numbers; fp16 needs CUDA")
WORKERS_HELP = ("DataLoader worker processes (default: cores - 1, at most 8, on a GPU; 0 on the "
                "CPU, where workers only take cores from the model)")
DEFAULT_SEED = 2024


def warn_deprecated(old, new):
    """The one-line deprecation warning of an old spelling, on stderr."""
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class DeprecatedSpelling(argparse.Action):
    """An old spelling of a flag (hidden from --help): warns, then stores into the new flag's
    dest as the new flag would (`new` is its action, whose type and nargs it copied)."""

    def __init__(self, option_strings, dest, new=None, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string, self.new.option_strings[0])
        self.new(parser, namespace, values, self.new.option_strings[0])


def add_old_spellings(group, new_action, *old_flags):
    """Accept `old_flags` as hidden, warning aliases of `new_action`'s flag."""
    for old in old_flags:
        group.add_argument(old, action=DeprecatedSpelling, new=new_action, dest=new_action.dest,
                           nargs=new_action.nargs, type=new_action.type, default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


class SpaceList(argparse.Action):
    """A list flag, space-separated (`nargs="+"`): `--flag A B`. The old comma form (`--flag A,B`)
    still works, with a warning. `item` converts each element (ValueError/ArgumentTypeError
    refuse it); with `join`, the list is stored joined by it (for code that reads 'A,B')."""

    def __init__(self, option_strings, dest, item=str, join=None, **kwargs):
        self.item, self.join = item, join
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        tokens = [v.strip() for token in values for v in token.split(",")]
        if any("," in token for token in values):
            spaced = " ".join(shlex.quote(v) for v in tokens if v)  # a command that runs as printed
            print(f"warning: {option_string} A,B (commas) is deprecated; use {option_string} "
                  f"{spaced}", file=sys.stderr)
        if "" in tokens:  # 'a,,b' or a trailing comma: a typo, never an empty class or value
            raise argparse.ArgumentError(self, f"{' '.join(values)!r}: an empty item")
        try:
            items = [self.item(v) for v in tokens]
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentError(self, f"{' '.join(values)!r}: {err}") from None
        if not items:
            raise argparse.ArgumentError(self, "expected at least one value")
        setattr(namespace, self.dest, self.join.join(tokens) if self.join else items)


def add_out_dir(group, dest="out_dir", old=(), **kwargs):
    """`--out-dir DIR`, the output folder of every script (`old` spellings warn and still work);
    `dest` is the name the script's code reads it by."""
    kwargs.setdefault("metavar", "DIR")
    # argparse counts a required flag as given only under its own name, so one spelling or another
    # is required after parsing, by refuse_conflicting_spellings (a mutually exclusive group would
    # also refuse the same folder given twice)
    required = kwargs.pop("required", False)
    if required:
        kwargs["help"] += " (required)"
    action = group.add_argument("--out-dir", dest=dest, **kwargs)
    action.required_in_some_spelling = required
    add_old_spellings(group, action, *old)
    return action


def add_device(group):
    return group.add_argument("--device", default=None,
                              help="cuda, cuda:1, cpu (default: cuda when available)")


def add_precision(group, help=PRECISION_HELP):
    return group.add_argument("--precision", choices=PRECISIONS, default="auto", help=help)


def add_workers(group, help=WORKERS_HELP):
    return group.add_argument("--workers", type=int, default=None, metavar="N", help=help)


def add_seed(group, help="seed of every random choice; the same seed repeats the run"):
    return group.add_argument("--seed", type=int, default=DEFAULT_SEED, help=help)


def add_table1_continuous(group):
    """--table1-continuous: how Table 1 (report.table1) summarises a numeric attribute such as age."""
    return group.add_argument("--table1-continuous", choices=("median", "mean"), default="median",
                              help="Table 1's numeric attributes (age): median [IQR], robust to the "
                                   "skewed ages of clinic cohorts, or mean (SD) (default: median)")


def add_overwrite(group, help="allow a non-empty --out-dir (a new run's files replace the old)"):
    return group.add_argument("--overwrite", action="store_true", help=help)


def add_prompts(group, help="JSON prompt set replacing the published one (schema in prompts.py)"):
    return group.add_argument("--prompts", default=None, metavar="JSON", help=help)


def add_model_flags(group, name_help, config_help="JSON of a custom open_clip architecture; "
                    "registered under the file's stem", pretrained_help=None):
    """--model-name and --model-config (and --pretrained when `pretrained_help` is given)."""
    group.add_argument("--model-name", default=None, help=name_help)
    group.add_argument("--model-config", default=None, metavar="JSON", help=config_help)
    if pretrained_help:
        group.add_argument("--pretrained", default=None, help=pretrained_help)


def expand_abbreviations(parser, argv):
    """argv with each abbreviated long flag (--save for --save-dir) written out, as `parser`
    resolves it (a unique prefix of one of its flags): the spelling checks and args.json read
    the flag that ran, not the prefix typed. An ambiguous or unknown prefix stays as typed
    (the parser itself refuses it)."""
    flags = [flag for action in parser._actions for flag in action.option_strings
             if flag.startswith("--")]
    out = []
    for token in map(str, argv):
        if token == "--":  # everything after is positional
            out.extend(argv[len(out):])
            break
        name, eq, value = token.partition("=")
        if name.startswith("--") and name not in flags:
            matches = [flag for flag in flags if flag.startswith(name)]
            name = matches[0] if len(matches) == 1 else name
        out.append(name + eq + value)
    return out


def refuse_conflicting_spellings(parser, argv):
    """parser.error when two spellings of one flag (--save-dir A --out-dir B) are given different
    values: argparse would keep the last one silently. The same value twice is fine. A flag
    required in some spelling (add_out_dir) and given in none, nor by --config, is refused too.
    An abbreviation (--save for --save-dir) counts as the flag it stands for."""
    argv = expand_abbreviations(parser, argv)
    spellings = {action: [action.option_strings[0]] for action in parser._actions
                 if getattr(action, "required_in_some_spelling", False)}  # the new flag -> spellings
    for action in parser._actions:
        if isinstance(action, DeprecatedSpelling):
            spellings.setdefault(action.new, [action.new.option_strings[0]]).extend(action.option_strings)
    for new, flags in spellings.items():
        # each spelling's values, read by a throwaway parser that keeps them apart
        reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        for i, flag in enumerate(flags):
            reader.add_argument(flag, dest=f"s{i}", action="append", nargs=new.nargs)
        given, _rest = reader.parse_known_args([str(token) for token in argv])
        values = {}
        for i, flag in enumerate(flags):
            for value in getattr(given, f"s{i}") or []:
                tokens = value if isinstance(value, list) else [value]
                values.setdefault(flag, " ".join(v for t in tokens for v in t.split(",") if v))
        if (getattr(new, "required_in_some_spelling", False) and not values
                and new.default is None):  # (--config sets it as the default)
            parser.error(f"the following arguments are required: {flags[0]}")
        if len(set(values.values())) > 1:
            shown = " and ".join(f"{flag} {value}" for flag, value in values.items())
            parser.error(f"{shown}: two spellings of one flag with different values; give "
                         f"{flags[0]} once")


def canonical_argv(parser, argv):
    """argv with every deprecated spelling replaced by its flag's canonical one (for args.json
    and for code that rewrites argv, such as the SSA sweep); no warning here."""
    old = {flag: action.new.option_strings[0] for action in parser._actions
           if isinstance(action, DeprecatedSpelling) for flag in action.option_strings}
    out = []
    for token in expand_abbreviations(parser, argv):
        name, eq, value = token.partition("=")
        out.append(old[name] + eq + value if name in old else token)
    return out


# ----------------------------------------------------------------------------------------------
# --config FILE: flag defaults from a JSON (or YAML) file; the command line overrides them


def read_config(path):
    """{dest: value} of a config file: JSON, or YAML when the name ends in .yaml/.yml."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml  # pyyaml: installed with open_clip's dependencies
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("expected a mapping of flag names to values")
    return {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}


def apply_config(parser, path, flag="--config"):
    """Set `parser`'s defaults from config file `path` (keys are flag names, with - or _);
    a key that names no flag, or a file that cannot be read, is a parser.error naming both."""
    try:
        values = read_config(path)
    except Exception as err:  # OSError, json's ValueError, yaml.YAMLError (not a ValueError)
        parser.error(f"{flag} {path}: {err}")
    actions = config_keys(parser)
    checked = {}
    for key, value in values.items():
        if key not in actions:
            parser.error(f"{flag} {path}: unknown key {key!r} (not a flag of this script)")
        action = actions[key]
        try:
            checked[action.dest] = config_value(parser, action, value)
        except argparse.ArgumentError as err:
            parser.error(f"{flag} {path}: key {key!r}: {err.message}")
        action.required = False  # given by the file: the command line no longer must
    parser.set_defaults(**checked)
    return checked


def config_record(path):
    """What a --config file set, for args.json: {file, values as written}, or None without one."""
    return None if path is None else {"file": str(path), "values": read_config(path)}


def config_source(args):
    """Where the recipe flags' defaults came from, in words (MODEL_CARD.md): the recipe alone, or
    the --config file and then the recipe for what it leaves unset."""
    if getattr(args, "config", None):
        return f"--config {args.config} (then --recipe {args.recipe} for the flags it leaves unset)"
    return f"--recipe {args.recipe}"


def config_keys(parser):
    """{key: action} of the keys a config file may use: each flag's name as typed on the command
    line (out_dir for --out-dir; - and _ alike), and its internal dest (save_dir) as well; never a
    hidden deprecated spelling."""
    keys = {}
    for action in parser._actions:
        if action.dest == "help" or isinstance(action, DeprecatedSpelling):
            continue
        keys.setdefault(action.dest, action)
        for option in action.option_strings:
            if isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-"):
                continue  # "no_x": true would read as x: true; the key is x
            keys[option.lstrip("-").replace("-", "_")] = action
    return keys


def config_value(parser, action, value):
    """`value` from a config file checked and converted as the flag itself would be on the command
    line (type, choices, list items, ranges): a config file is no way round a flag's checks."""
    if action.nargs == 0:  # store_true / BooleanOptionalAction
        if not isinstance(value, bool):
            raise argparse.ArgumentError(action, f"{value!r}: expected true or false")
        return value
    tokens = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if isinstance(action, SpaceList):
        namespace = argparse.Namespace()
        action(parser, namespace, tokens, action.option_strings[0])
        return getattr(namespace, action.dest)
    if action.type is None and action.choices is None and not isinstance(value, (list, tuple, dict)):
        return value  # a plain-text flag read later by its own parser (e.g. --warmup 0 or 5%)
    if action.nargs in (None, "?") and len(tokens) != 1:
        raise argparse.ArgumentError(action, f"{value!r}: expected one value")
    # argparse's own conversion and choices check (the private helper every parse goes through)
    return parser._get_values(action, tokens)
