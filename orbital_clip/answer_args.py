"""The answer-file part of the scoring command line (score_answers.py, and inference.py's
--compare and deprecated --predictions): the flags, their checks and the NAME=FILE specs. Below
both answers.py and scoring_args.py, which import it, so neither imports the other to get them."""

from pathlib import Path

from orbital_clip import cli


def named_file(spec):
    """(name, path) of 'NAME=FILE', or (file stem, FILE) when spec is an existing file or has no '='."""
    if "=" in spec and not Path(spec).is_file():
        name, path = spec.split("=", 1)
        return name.strip(), path
    return Path(spec).stem, spec


def parse_compare_specs(values):
    """{name: path} of --compare NAME=FILE values, or (None, bad value, why)."""
    specs = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            return None, value, "expected NAME=FILE, e.g. resnet50=runs/resnet50/predictions.csv"
        if name in specs or name == "ours" or name.startswith("baseline "):
            return None, value, f"the name {name!r} is taken; give each model its own name"
        specs[name] = path
    return specs, None, None


# Command line: the answer-file flags (of score_answers.py, and of inference.py for now) and checks


def add_answer_arguments(parser, required=False):
    """The flags of answer files scored without a model (checked by check_answer_args);
    --predictions is `required` in score_answers.py, which has no --checkpoint."""
    group = parser.add_argument_group(
        "answer files, no model (e.g. a chat model's diagnoses; see README: The paper's second step)")
    group.add_argument("--predictions", default=None, metavar="[NAME=]FILE", required=required,
                       help="score this CSV of answers instead of a --checkpoint: columns path (as "
                            "in predictions.csv, relative to --test-dir), answer or pred_label, "
                            "optional prob_<class> for every class and status; NAME names the "
                            "step (default: the file stem)")
    group.add_argument("--label-map", default=None, metavar="JSON",
                       help="with --predictions or --compare: {class folder: [synonym, ...]}, "
                            "matched case- and whitespace-insensitively; an answer it does not map "
                            "is a failed row (status 'failed: unmapped answer ...'), never guessed")
    group.add_argument("--classes", action=cli.SpaceList, join=",", default=None, metavar="FOLDER",
                       help="with --predictions: class folders in index order (default: the "
                            "published prompt set's order for the project's own classes, else "
                            "sorted by name); index 0 is the class of the intention-to-diagnose "
                            "line")


def check_compare_args(parser, args):
    """--compare values: NAME=FILE, unique names, existing files."""
    specs, bad, why = parse_compare_specs(args.compare)
    if specs is None:
        parser.error(f"--compare {bad}: {why}")
    for name, path in specs.items():
        if not Path(path).is_file():
            parser.error(f"--compare {name}={path}: no such file")


def check_answer_args(parser, args):
    """--checkpoint or --predictions, and the flags that belong to only one of them."""
    if bool(args.checkpoint) == bool(args.predictions):
        parser.error("give --checkpoint (a model to evaluate) or --predictions (a file of answers), "
                     + ("not both" if args.checkpoint else "one of them"))
    if args.label_map and not Path(args.label_map).is_file():
        parser.error(f"--label-map {args.label_map}: no such file")
    if not args.predictions:
        if args.label_map and not args.compare:
            parser.error("--label-map needs --predictions or --compare (it maps answers to classes)")
        if args.classes is not None:
            parser.error("--classes needs --predictions (a checkpoint brings its own classes)")
        return
    for flag, value in (("--model-name", args.model_name), ("--model-config", args.model_config),
                        ("--prompts", args.prompts), ("--baseline", args.baseline),
                        ("--wise-ft-alpha", args.wise_ft_alpha), ("--cache-dir", args.cache_dir),
                        ("--logit-scale-mode", args.logit_scale_mode), ("--threshold", args.threshold)):
        if value is not None:
            parser.error(f"{flag} needs a model (--checkpoint); --predictions scores answers without one")
    name, path = named_file(args.predictions)  # the --compare steps: check_compare_args
    if not name:
        parser.error(f"--predictions {args.predictions}: the step NAME before '=' is empty")
    if not Path(path).is_file():
        parser.error(f"--predictions {path}: no such file")
    specs, _bad, _why = parse_compare_specs(args.compare)
    if specs and name in specs:
        parser.error(f"--compare {name}={specs[name]}: step name {name!r} is used twice; name "
                     "each step once")
    if args.classes is not None and not all(name.strip() for name in args.classes.split(",")):
        parser.error(f"--classes {args.classes!r}: expected folder names separated by commas")
