"""The command line of inference.py and of score_answers.py (answer files, no model): one set of
flags, defaults and checks, so an answer file scored by either command gets the same arguments.
"""

import argparse
import sys
from pathlib import Path

from orbital_clip import cli
from orbital_clip import images
from orbital_clip import patients
from orbital_clip.answer_args import add_answer_arguments, check_answer_args, check_compare_args
from orbital_clip.evaluation import DEFAULT_SPLIT, FAILURE_DIR, check_subgroup_args
from orbital_clip.metrics import DEFAULT_BOOTSTRAP, DEFAULT_ECE_BINS
from orbital_clip.metrics.intervals import CI_METHODS

DEFAULT_OUTPUT_DIR = "inference_results"
DEFAULT_BATCH_SIZE = 64
DEFAULT_FIXED_POINT = 0.9  # --fixed-specificity / --fixed-sensitivity: a common screening target
DEFAULT_FAILURE_EXAMPLES = 3  # most confident errors per true class in report.md's failure analysis
# Flags that need a model: score_answers.py has none of them (inference.py --predictions refuses
# the ones a user could mean, and ignores the others)
MODEL_FLAGS = ("--checkpoint", "--model-name", "--model-config", "--prompts", "--baseline",
               "--baseline-model-name", "--wise-ft-alphas", "--wise-ft-base", "--batch-size",
               "--workers", "--device", "--precision", "--logit-scale-mode", "--cache-dir",
               "--threshold", "--failure-examples", "--decision-rule", "--explain")


class AnswerFlags:
    """An argument group that leaves out MODEL_FLAGS, keeping their defaults on the parser."""

    def __init__(self, parser, group):
        self.parser, self.group = parser, group

    def add_argument(self, *flags, **kwargs):
        if flags[0] not in MODEL_FLAGS:
            return self.group.add_argument(*flags, **kwargs)
        dest = kwargs.get("dest", flags[0].lstrip("-").replace("-", "_"))
        self.parser.set_defaults(**{dest: kwargs.get("default")})
        return None


def parse_args(argv, description, model=True):
    """The checked arguments of inference.py (`model`) or score_answers.py (answer files only)."""
    parser = build_parser(description, model)
    args = parser.parse_args(argv)
    cli.refuse_conflicting_spellings(parser, argv if argv is not None else sys.argv[1:])
    if args.workers is None:  # answer files load no images: no workers (and no torch to ask)
        args.workers = cli.default_workers(args.device) if model else 0
    check_args(parser, args)
    return args


def build_parser(description, model=True):
    """The command line; `--help` shows every default as '(default: X)'. Without `model` (answer
    files), the flags that need a model are left out and keep their defaults, so both commands
    hand run_answers the same arguments."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group if model else (
        lambda title: AnswerFlags(parser, parser.add_argument_group(title)))
    data = group("data and model")
    data.add_argument("--test-dir", required=True,
                      help="test cohort: one sub-folder per class (scored), images without class "
                           "folders (predicted only), or a manifest.csv of data_preprocess.py")
    data.add_argument("--split", default=None,
                      help=f"with a manifest.csv --test-dir: the rows evaluated (default "
                           f"{DEFAULT_SPLIT}; no fallback to another split)")
    data.add_argument("--checkpoint", default=None,
                      help="checkpoint of clip_train.py, a plain open_clip state_dict (needs "
                           "--model-name), or for the zero-shot baseline an open_clip pretrained tag "
                           "(with --model-name) or hf-hub:ORG/REPO or local-dir:PATH; or give "
                           "--predictions instead")
    cli.add_model_flags(
        data, name_help="open_clip architecture, or hf-hub:ORG/REPO or local-dir:PATH; optional "
                        "with our checkpoints (stored in them), required otherwise (published: "
                        "ViT-B-32-256)",
        config_help="JSON of a custom open_clip architecture, registered under the file's stem "
                    "(which --model-name then defaults to)")
    cli.add_prompts(data, help="JSON prompt set replacing the checkpoint's stored one (schema in "
                               "prompts.py); classes are matched to test folders by name")
    cli.add_out_dir(data, dest="output_dir", old=("--output-dir", "--save-dir"),
                    default=DEFAULT_OUTPUT_DIR,
                    help=f"where the outputs go (default {DEFAULT_OUTPUT_DIR}); must be new or empty "
                         "unless --overwrite")
    add_answer_arguments(parser, required=not model)  # --predictions, --label-map, --classes
    compare = group("comparison and weight interpolation")
    compare.add_argument("--baseline", default=None, metavar="TAG|PATH",
                         help="a second model scored on the same images (a pretrained tag, or "
                              "hf-hub:ORG/REPO or local-dir:PATH, for a zero-shot baseline, or "
                              "another checkpoint): paired differences with "
                              "CIs and McNemar's test in comparison.csv")
    compare.add_argument("--compare", nargs="+", default=None, metavar="NAME=FILE",
                         help="predictions of other models or readers on the same cohort (a CNN's "
                              "predictions.csv, an MLLM's or a clinician's answers): CSV with path "
                              "(as in our predictions.csv) and pred_label (or answer), optional "
                              "prob_<folder> per class and status; each becomes rows of "
                              "comparison.csv against our model (paired CIs, McNemar, DeLong); "
                              "with --predictions: later steps of the same reader, in order "
                              "(the sequential table: per class sensitivity and specificity per "
                              "step, paired changes with McNemar, Cochran's Q)")
    compare.add_argument("--baseline-model-name", default=None,
                         help="architecture of a tag or plain state_dict --baseline (default: the "
                              "model's own)")
    wise = compare.add_argument("--wise-ft-alphas", action=cli.SpaceList, item=float,
                                dest="wise_ft_alpha", default=None, metavar="A",
                         help="WiSE-FT: evaluate (1 - A) * base + A * fine-tuned weights for each A "
                              "in [0, 1], one wise_ft_alpha_<A>/ folder each (0.5 often keeps the "
                              "zero-shot robustness and most of the fine-tuning gain)")
    if wise is not None:  # score_answers.py has no model, and so no WiSE-FT
        cli.add_old_spellings(compare, wise, "--wise-ft-alpha")
    compare.add_argument("--wise-ft-base", default=None, metavar="PATH",
                         help="WiSE-FT base weights file (default: the checkpoint's recorded "
                              "pretrained weights)")
    run = group("running")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help="images per forward pass (default 64; 256+ is fine on a GPU)")
    cli.add_workers(run)
    cli.add_device(run)
    cli.add_precision(run, help="image tower precision; features and classifier stay fp32 (auto: bf16 where "
                          "the hardware multiplies bf16 natively: CUDA with bf16, a CPU with AMX or "
                          "AVX512-BF16; else fp32. fp32 for exact numbers; fp16 needs CUDA)")
    run.add_argument("--logit-scale-mode", choices=("exp", "published-log"), default=None,
                     help="softmax temperature: exp(logit_scale) (correct CLIP), or the raw log value "
                          "as the published code did (default: the checkpoint's mode, else exp)")
    run.add_argument("--cache-dir", default=None,
                     help="cache image embeddings here, keyed by weights, architecture, "
                          "preprocessing and each file's path, size and mtime: a re-run with other "
                          "prompts, thresholds or bootstrap sizes encodes no image")
    run.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                     help="draw the figures (PNG + PDF; default on; --no-figures saves a few seconds)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_overwrite(run, help="replace the evaluation files of an earlier run in --out-dir")
    privacy = group("privacy")
    privacy.add_argument("--anonymize-paths", action="store_true",
                         help="write salted SHA-256 hashes instead of image paths (and group ids) in "
                              "every output; the test folder is written as <anonymized>")
    privacy.add_argument("--anonymize-salt", default=None,
                         help="salt of --anonymize-paths (default: random per run, so hashes cannot "
                              "be linked across runs); never written to any output")
    stats = group("statistics")
    stats.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                       help="percentile-bootstrap resamples for the 95%% CIs (default 2000; under "
                            "~500 the interval ends move with the seed; 0 = no bootstrap CIs)")
    cli.add_seed(stats, help="bootstrap seed (default 2024)")
    stats.add_argument("--group-regex", default=None, metavar="RE",
                       help=r"resample patients, not images: the first capture group of RE searched "
                            r"in each image's path relative to the data root (to --test-dir, or a "
                            r"manifest's source), else in its file name, is its patient, e.g. "
                            r"'(Patient \d+)' or '^(P\d+)_' (as data_preprocess.py; overrides a "
                            "manifest's group column; an image that matches neither is its own "
                            "patient; refused when it matches no image or makes one patient of all)")
    stats.add_argument("--group-from-folder", action="store_true",
                       help="resample patients, not images: each image's patient is the folder "
                            "under its class folder (class/PATIENT/IMG_0001.JPG; a manifest's "
                            "source path), as data_preprocess.py --group-from-folder; an image "
                            "directly in its class folder is its own patient")
    stats.add_argument("--threshold", type=float, default=None,
                       help="rare-class operating threshold in [0, 1] replacing the checkpoint's "
                            "validation one (source 'user'); never tune it on the test cohort")
    cli.add_table1_continuous(stats)
    stats.add_argument("--metadata", default=None, metavar="CSV",
                       help="per-image attributes for --subgroups: a 'path' column as in "
                            "predictions.csv (or a 'file' column of file names) plus any columns "
                            "(site, sex, age, ...); rows of images not in the cohort are ignored")
    stats.add_argument("--subgroups", action=cli.SpaceList, join=",", default=None, metavar="NAME",
                       help="attributes to report performance by (columns of --metadata, or of a "
                            "manifest.csv --test-dir), e.g. site sex: subgroups.csv/.png, a "
                            "heterogeneity test per attribute, small-n warnings")
    stats.add_argument("--age-bins", action=cli.SpaceList, join=",", default=None, metavar="EDGE",
                       help="bin edges for numeric --subgroups attributes, e.g. 0 40 60 120 "
                            "([0, 40), [40, 60), [60, 120]); a value outside them is refused")
    stats.add_argument("--failure-examples", type=int, default=DEFAULT_FAILURE_EXAMPLES, metavar="N",
                       help=f"failure analysis in report.md: the N most confident errors of each true "
                            f"class with thumbnails in {FAILURE_DIR}/ (default "
                            f"{DEFAULT_FAILURE_EXAMPLES}; 0 = none, e.g. when no image may leave the "
                            "hospital)")
    stats.add_argument("--explain", type=int, default=0, metavar="N",
                       help=f"Grad-CAM maps (captum) of the image tower for the predicted and the true "
                            f"class of the N most confident errors and of each class's most confident "
                            f"correct image, over the original image, in {FAILURE_DIR}/ and report.md "
                            "(default 0 = none; a few seconds per image on a CPU)")
    stats.add_argument("--decision-rule", choices=("argmax", "threshold"), default="argmax",
                       help="the rule whose decision fills predictions.csv's `prediction` column: "
                            "'argmax' (the most probable class, as published; default) or "
                            "'threshold' (the rare class when its probability reaches the "
                            "validation threshold or --threshold); both stay in pred_label and "
                            "pred_label_threshold")
    stats.add_argument("--ece-bins", type=int, default=DEFAULT_ECE_BINS,
                       help="equal-width bins of the expected calibration error (default 10; 10-15 "
                            "is usual, more bins need more images)")
    add_journal_arguments(stats)
    return cli.show_defaults(parser, {"model_name": "the checkpoint's", "prompts": "the checkpoint's"})


def add_journal_arguments(stats):
    """The flags of the statistics a journal asks for (issue 28; docs/statistics.md)."""
    stats.add_argument("--prevalence", type=float, default=None, metavar="P",
                       help="clinical prevalence of the rare class in (0, 1), e.g. 0.01: PPV and "
                            "NPV at that prevalence from the cohort's sensitivity and specificity "
                            "(Mercaldo logit intervals) in prevalence.csv; a test cohort enriched "
                            "with rare cases overstates the PPV a clinic will see")
    stats.add_argument("--ci-method", choices=CI_METHODS, default="wilson",
                       help="interval of a proportion in the journal tables (per-class, abstention, "
                            "intention to diagnose, fixed points): wilson (default; good coverage "
                            "at small n) or clopper-pearson (exact, conservative; asked for by some "
                            "journals with few events)")
    for metric, other in (("specificity", "sensitivity"), ("sensitivity", "specificity")):
        stats.add_argument(f"--fixed-{metric}", type=float, default=DEFAULT_FIXED_POINT, metavar="S",
                           help=f"report the rare class's {other} at the threshold giving {metric} "
                                f">= S, in (0, 1] (default {DEFAULT_FIXED_POINT}; choose it "
                                "clinically before looking at the test cohort)")


def check_journal_args(parser, args):
    """--prevalence in (0, 1), --fixed-specificity and --fixed-sensitivity in (0, 1]."""
    if args.prevalence is not None and not 0.0 < args.prevalence < 1.0:
        parser.error(f"--prevalence must be in (0, 1), e.g. 0.01, got {args.prevalence:g}")
    for flag, value in (("--fixed-specificity", args.fixed_specificity),
                        ("--fixed-sensitivity", args.fixed_sensitivity)):
        if not 0.0 < value <= 1.0:
            parser.error(f"{flag} must be in (0, 1], got {value:g}")


def check_args(parser, args):
    """Every rejected value or combination, named by its flag (exit 2, nothing written)."""
    check_answer_args(parser, args)
    check_journal_args(parser, args)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--bootstrap", args.bootstrap, 0), ("--ece-bins", args.ece_bins, 2),
                             ("--failure-examples", args.failure_examples, 0),
                             ("--explain", args.explain, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    test_dir = Path(args.test_dir)
    if test_dir.is_file() and test_dir.suffix.lower() != ".csv" and not images.is_candidate_image(test_dir):
        parser.error(f"--test-dir {test_dir}: a file must be a manifest.csv or an image")
    if not test_dir.exists():
        parser.error(f"--test-dir {test_dir}: no such folder or manifest")
    if args.split is not None and not test_dir.is_file():
        parser.error("--split applies to a manifest.csv --test-dir only")
    for flag, value in (("--model-config", args.model_config), ("--prompts", args.prompts),
                        ("--wise-ft-base", args.wise_ft_base)):
        if value and not Path(value).is_file():
            parser.error(f"{flag} {value}: no such file")
    if args.baseline:  # a model flag (never set for answer files): its home is the model builder,
        # imported here so that score_answers.py checks its flags without loading torch
        from orbital_clip.model_loading import looks_like_file
        from orbital_clip.models import model_source
    if (args.baseline and looks_like_file(args.baseline) and not Path(args.baseline).is_file()
            and not model_source(args.baseline)):
        parser.error(f"--baseline {args.baseline}: no such file")
    if args.baseline_model_name and not args.baseline:
        parser.error("--baseline-model-name needs --baseline")
    check_compare_args(parser, args)
    check_subgroup_args(parser, args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.wise_ft_alpha is not None:
        bad = [a for a in args.wise_ft_alpha if not 0.0 <= a <= 1.0]
        if bad:
            parser.error(f"--wise-ft-alphas values must be in [0, 1], got {bad[0]}")
        if len({f"{a:g}" for a in args.wise_ft_alpha}) != len(args.wise_ft_alpha):
            parser.error("--wise-ft-alphas: each alpha once")
    elif args.wise_ft_base:
        parser.error("--wise-ft-base needs --wise-ft-alphas")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        parser.error(f"--cache-dir {args.cache_dir}: exists and is not a folder")
    if args.anonymize_salt is not None and not args.anonymize_paths:
        parser.error("--anonymize-salt needs --anonymize-paths")
    if args.group_from_folder and args.group_regex is not None:
        parser.error("--group-from-folder and --group-regex both name patients; give one of them")
    if args.group_regex is not None and patients.group_regex_problem(args.group_regex):
        parser.error(patients.group_regex_problem(args.group_regex))
