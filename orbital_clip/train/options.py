"""clip_train.py's command line: the flags, their defaults and the checks of their combinations."""

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from orbital_clip import cli
from orbital_clip import models
from orbital_clip.train.checkpoints import LAST_NAME
from orbital_clip.train.schedule import RECIPE_NAMES, read_recipe, resolve_recipe


# --help opens with this: what the command does and real command lines
DESCRIPTION = """Fine-tune an OpenCLIP model on a folder-per-class cohort with clinical prompts.

Each training image is paired with a caption drawn at random, every step, from its class's
training prompts; the image and text towers are trained with a contrastive loss. After every
epoch the model classifies the validation set zero-shot (the class embedding is the mean of its
evaluation prompts) and the best epoch is kept. The defaults reproduce the published protocol.

    $ python clip_train.py --train-dir "dataset_root/train" --val-dir "dataset_root/val" \\
          --out-dir "clip_model_checkpoints" --model-name "ViT-B-32-256" --batch-size 200 \\
          --epochs 100 --lr 1e-8
    $ python clip_train.py --train-dir dataset_root/manifest.csv --val-dir dataset_root/manifest.csv \\
          --out-dir runs/demo --model-config demo/tiny_clip.json --pretrained none --lr 1e-3
    $ python clip_train.py ... --out-dir runs/demo --resume auto
"""
DEFAULT_PRETRAINED = "datacomp_s34b_b86k"  # the only tag of ViT-B-32-256
SELECT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "rare_sensitivity",
                  "val_loss")
SSA_BOOLEAN_WORDS = {"true": "true", "false": "false", "on": "true", "off": "false", "yes": "true",
                     "no": "false", "1": "true", "0": "false"}
SSA_FORBIDDEN = {"--train-dir", "--val-dir", "--out-dir", "--save-dir", "--config", "--ssa",
                 "--ssa-keep-all", "--resume",
                 "--select-metric", "--overwrite", "--help"}


def mixing_weight(text):
    """One WiSE-FT mixing weight in [0, 1] (an element of --wise-ft-alphas)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0 0.5 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"mixing weights must lie in [0, 1], got {text!r}")
    return value


def warmup_spec(text):
    """argparse type for --warmup: '200' (-> 200) or '5%' (kept as the text)."""
    try:
        value = float(text[:-1]) if text.endswith("%") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected steps (200) or a percentage (5%), got {text!r}") from None
    if value < 0 or (text.endswith("%") and value > 100):
        raise argparse.ArgumentTypeError(f"must be 0..total steps or 0%..100%, got {text!r}")
    # Steps as an int, the type the recipes record: `--warmup 0` repeated on resume is no change
    return text if text.endswith("%") else int(value)


class ArgumentsRefused(Exception):
    """The flags were refused (argparse printed the usage and the message): raised instead of
    exiting by `parse_args(..., exit_on_error=False)`, so an SSA trial's refusal ends the trial."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class RefusingParser(argparse.ArgumentParser):
    """An ArgumentParser that prints as argparse does, then raises ArgumentsRefused instead of
    calling sys.exit."""

    def exit(self, status=0, message=None):
        if message:
            self._print_message(message, sys.stderr)
        raise ArgumentsRefused(status, message)


def parse_args(argv=None, exit_on_error=True):
    """Parsed and checked arguments; a refusal exits with status 2 (or, with exit_on_error=False,
    raises ArgumentsRefused after the same message)."""
    parser = build_parser(argparse.ArgumentParser if exit_on_error else RefusingParser)
    apply_config_flag(parser, argv)
    args = parser.parse_args(argv)
    cli.refuse_conflicting_spellings(parser, argv if argv is not None else sys.argv[1:])
    validate_args(parser, args)
    return args


def apply_config_flag(parser, argv):
    """--config FILE: its values become the parser's defaults, so flags given on the command line
    win (and the recipe fills only what neither set)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        cli.apply_config(parser, known.config)


def recipe_default(dest):
    """'X with --recipe paper, Y with recommended': the --help default of a recipe flag."""
    paper, recommended = (read_recipe(name)[dest] for name in ("paper", "recommended"))
    words = {True: "on", False: "off"}
    if isinstance(paper, bool):
        paper, recommended = words[paper], words[recommended]
    return f"{paper} with --recipe paper, {recommended} with recommended"


def build_parser(parser_class=argparse.ArgumentParser):
    """The command line; `--help` shows every default as '(default: X)'."""
    parser = parser_class(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", required=True,
                      help="folder with one sub-folder per class, or a manifest.csv (rows of split 'train')")
    data.add_argument("--val-dir", required=True,
                      help="folder with one sub-folder per class, or a manifest.csv (rows of split 'val')")
    cli.add_out_dir(data, dest="save_dir", old=("--save-dir",), required=True,
                    help="where checkpoints, metrics and figures go")
    cli.add_prompts(data)
    data.add_argument("--config", default=None, metavar="FILE",
                      help="JSON (or .yaml) of flag defaults, e.g. orbital_clip/configs/recommended.json: keys are "
                           "flag names (lr, batch-size, ...); flags on the command line override it")
    cli.add_model_flags(
        parser.add_argument_group("model"),
        name_help="open_clip architecture, or hf-hub:ORG/REPO or local-dir:PATH (architecture and "
                  "weights from a Hub repository or a downloaded folder; HF text towers need "
                  "requirements-hf.txt)",
        pretrained_help="open_clip tag, local weights file, or 'none' for random init "
                        f"(default: {DEFAULT_PRETRAINED} for ViT-B-32-256; the repository's or "
                        "folder's own weights for hf-hub:/local-dir:; none otherwise)")
    optim = parser.add_argument_group("optimisation (defaults = published protocol)")
    optim.add_argument("--batch-size", type=int, default=200,
                       help="images per step (published 200); contrastive loss needs >= 2")
    optim.add_argument("--epochs", type=int, default=100, help="passes over the training set (published 100)")
    optim.add_argument("--recipe", choices=RECIPE_NAMES, default="paper",
                       help="orbital_clip/configs/NAME.json: 'paper' (default) reproduces the published "
                            "protocol; 'recommended' sets label-aware loss, balanced sampling, lr 1e-5, 5%% warmup + cosine, "
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
    cli.add_seed(run)
    cli.add_device(run)
    cli.add_precision(run)
    cli.add_workers(run)
    run.add_argument("--resume", default=None,
                     help=f"'auto' (OUT_DIR/{LAST_NAME} if present) or a checkpoint path")
    run.add_argument("--resume-with-changes", action="store_true",
                     help="let --resume continue with training flags (lr, batch size, recipe, ...) "
                          "that differ from the run's; without it such a resume is refused")
    cli.add_overwrite(run)
    optim.add_argument("--wise-ft-alphas", action=cli.SpaceList, item=mixing_weight, default=None,
                       metavar="A",
                       help="after training, evaluate WiSE-FT weights (1-a)*start + a*best on "
                            "validation for each a (e.g. 0 0.25 0.5 0.75 1) and record the best a in "
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
    return cli.show_defaults(parser, {
        **{dest: recipe_default(dest) for dest in read_recipe("paper")},
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
        parser.error(f"--out-dir {save_dir}: exists and is not a folder")
    other_rank = os.environ.get("RANK", "0") not in ("", "0")  # rank 0 may already be writing
    if (save_dir.is_dir() and any(save_dir.iterdir()) and not (args.resume or args.overwrite)
            and not other_rank):
        parser.error(f"--out-dir {save_dir}: folder is not empty; pass --resume auto to continue "
                     "that run or --overwrite to start a new one there")
    if args.model_name is None:
        args.model_name = Path(args.model_config).stem if args.model_config else "ViT-B-32-256"
    if models.model_source(args.model_name):
        validate_source_model(parser, args)
    if args.pretrained is None:
        args.pretrained = DEFAULT_PRETRAINED if (args.model_name == "ViT-B-32-256"
                                                 and not args.model_config) else "none"
    if Path(args.pretrained).is_file():  # recorded absolute: inference may run from another folder
        args.pretrained = str(Path(args.pretrained).resolve())
    if args.workers is None:
        args.workers = cli.default_workers(args.device, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def validate_source_model(parser, args):
    """--model-name hf-hub:ORG/REPO or local-dir:PATH: the architecture comes from there (no
    --model-config) and --pretrained defaults to its own weights (none or a weights file also
    work; an open_clip tag does not). A local-dir is checked here; the Hub when the model is built."""
    if args.model_config:
        parser.error(f"--model-config: --model-name {args.model_name} brings its own architecture; "
                     "pass one of the two")
    # Recorded absolutely (with its SHA-256, runner.build_context): a resume or WiSE-FT from
    # another working folder finds this folder, or refuses one whose files changed.
    args.model_name = models.absolute_source(args.model_name)
    if args.pretrained is None:
        args.pretrained = args.model_name  # the repository's / folder's own weights
    args.pretrained = models.absolute_source(args.pretrained)
    if models.model_source(args.model_name) == "local-dir":
        try:
            models.read_model_config(args.model_name)
            if args.pretrained == args.model_name:  # open_clip would start from random weights
                models.local_dir_weights(args.model_name)
        except ValueError as err:
            parser.error(f"--model-name {err}")
    if args.pretrained not in ("none", args.model_name) and not Path(args.pretrained).is_file():
        parser.error(f"--pretrained {args.pretrained}: --model-name {args.model_name} brings its own "
                     "weights; leave --pretrained out, or pass none or a local weights file")


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
