"""One command-line convention across the five entry points: the same names for the shared flags
(read from each `--help`), old spellings that still work with a warning, one list syntax, and
`--config FILE` / `--recipe NAME` recipe files."""

import json
import re
import shlex
from pathlib import Path

import pytest

from orbital_clip import answers, cli, cnn, prompts, scoring, scoring_args
from orbital_clip.split import cli as split_cli
from orbital_clip.train import cli as train_cli
from orbital_clip.train import options as train_options
from orbital_clip.train.options import warmup_spec
from conftest import write_cohorts, write_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO_ROOT / "orbital_clip" / "configs"  # the one copy, shipped as package data
ENTRY_POINTS = {"data_preprocess": split_cli.main, "clip_train": train_cli.main,
                "inference": scoring.main, "score_answers": answers.main,
                "train_cnn": cnn.main}
# The flags each entry point shares (score_answers has no model, so no device, workers, prompts)
SHARED = {
    "data_preprocess": {"--out-dir", "--seed", "--overwrite", "--prompts"},
    "clip_train": {"--out-dir", "--seed", "--overwrite", "--prompts", "--device", "--precision",
                   "--workers", "--model-name", "--model-config", "--pretrained"},
    "inference": {"--out-dir", "--seed", "--overwrite", "--prompts", "--device", "--precision",
                  "--workers", "--model-name", "--model-config"},
    "score_answers": {"--out-dir", "--seed", "--overwrite"},
    "train_cnn": {"--out-dir", "--seed", "--overwrite", "--prompts", "--device", "--precision",
                  "--workers"},
}
OLD_SPELLINGS = ("--save-dir", "--output-dir", "--wise-ft-alpha")
# The built-in recipes as they were written in schedule.py before they became files
PAPER = {"loss": "clip", "balanced_sampling": False, "warmup": 0, "schedule": "const",
         "select_metric": "accuracy", "patience": 0, "lr": 1e-8, "weight_decay": 1e-8}
RECOMMENDED = {"loss": "label-aware", "balanced_sampling": True, "warmup": "5%",
               "schedule": "cosine", "select_metric": "balanced_accuracy", "patience": 10,
               "lr": 1e-5, "weight_decay": 0.1}


def help_text(name, capsys):
    with pytest.raises(SystemExit) as done:
        ENTRY_POINTS[name](["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_flags(text):
    """The option names --help lists."""
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_shows_the_shared_flags_and_no_old_spelling(name, capsys):
    text = help_text(name, capsys)
    flags = help_flags(text)
    assert SHARED[name] <= flags, SHARED[name] - flags
    assert not flags & set(OLD_SPELLINGS), flags & set(OLD_SPELLINGS)
    assert "SUPPRESS" not in text
    if name == "data_preprocess":  # its threads have their own name; --workers is processes
        assert "--threads" in flags and "--workers" not in flags


def shared_actions(parser):
    return {flag: action for action in parser._actions for flag in action.option_strings
            if not isinstance(action, cli.DeprecatedSpelling)}


def parsers():
    return {"data_preprocess": split_cli.build_parser(), "clip_train": train_options.build_parser(),
            "inference": scoring_args.build_parser("inference"),
            "score_answers": scoring_args.build_parser("answers", model=False),
            "train_cnn": None}


def test_shared_flags_have_one_default_and_type_everywhere():
    by_script = {name: shared_actions(p) for name, p in parsers().items() if p is not None}
    for flag, expected in (("--device", None), ("--precision", "auto"), ("--workers", None),
                           ("--seed", 2024), ("--overwrite", False), ("--prompts", None)):
        seen = {name: actions[flag] for name, actions in by_script.items() if flag in actions}
        assert len(seen) >= 2, flag
        assert {a.default for a in seen.values()} == {expected}, flag
        assert len({(a.type, a.nargs, tuple(a.choices or ())) for a in seen.values()}) == 1, flag
    devices = {a["--device"].help for a in by_script.values() if "--device" in a}
    assert len(devices) == 1
    workers = {a["--workers"].help for a in by_script.values() if "--workers" in a}
    assert len(workers) == 1 and "DataLoader worker processes" in workers.pop()


def parse_train(tmp_path, *extra):
    (tmp_path / "train").mkdir(exist_ok=True)
    (tmp_path / "val").mkdir(exist_ok=True)
    return train_options.parse_args(["--train-dir", str(tmp_path / "train"), "--val-dir",
                                     str(tmp_path / "val"), *extra])


@pytest.mark.parametrize("parse, argv, dest, value, new", [
    ("train", ["--save-dir", "{out}"], "save_dir", "{out}", "--out-dir"),
    ("inference", ["--output-dir", "{out}"], "output_dir", "{out}", "--out-dir"),
    ("inference", ["--save-dir", "{out}"], "output_dir", "{out}", "--out-dir"),
    ("answers", ["--output-dir", "{out}"], "output_dir", "{out}", "--out-dir"),
    ("split", ["--output-dir", "{out}"], "out_dir", "{out}", "--out-dir"),
    ("split", ["--workers", "3"], "threads", 3, "--threads"),
    ("cnn", ["--save-dir", "{out}"], "save_dir", "{out}", "--out-dir"),
    ("inference", ["--wise-ft-alpha", "0", "0.5"], "wise_ft_alpha", [0.0, 0.5], "--wise-ft-alphas"),
])
def test_old_spelling_works_and_warns_once(parse, argv, dest, value, new, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [token.replace("{out}", out) for token in argv]
    value = value.replace("{out}", out) if isinstance(value, str) else value
    args = parse_with(parse, argv, tmp_path)
    assert getattr(args, dest) == value
    warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(warnings) == 1 and argv[0] in warnings[0] and f"use {new}" in warnings[0]


def parse_with(kind, argv, tmp_path):
    """Parse `argv` plus the required flags of `kind`'s parser (parsing only, no checks)."""
    if kind == "train":
        return parse_train(tmp_path, *argv)
    if kind == "split":
        return split_cli.build_parser().parse_args(["--data-root", str(tmp_path), *argv])
    if kind == "cnn":
        (tmp_path / "d").mkdir(exist_ok=True)
        return cnn.parse_args(["--train-dir", str(tmp_path / "d"), "--val-dir", str(tmp_path / "d"),
                               "--test-dir", str(tmp_path / "d"), "--weights", "none", *argv])
    parser = scoring_args.build_parser("x", model=kind == "inference")
    answer_file = [] if kind == "inference" else ["--predictions", "a.csv"]
    return parser.parse_args(["--test-dir", str(tmp_path), *answer_file, *argv])


def test_new_spelling_gives_the_same_args_without_a_warning(tmp_path, capsys):
    new = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"))
    assert capsys.readouterr().err == ""
    old = parse_train(tmp_path, "--save-dir", str(tmp_path / "o"))
    assert "--save-dir is deprecated; use --out-dir" in capsys.readouterr().err
    assert vars(new) == vars(old)


def test_args_json_argv_spells_the_new_name():
    parser = train_options.build_parser()
    assert cli.canonical_argv(parser, ["--save-dir", "a", "--lr", "1", "--save-dir=b"]) == [
        "--out-dir", "a", "--lr", "1", "--out-dir=b"]
    # the SSA sweep strips the output folder from the argv it repeats, so it must see --out-dir
    from orbital_clip.train.ssa import strip_ssa_flags
    assert strip_ssa_flags(cli.canonical_argv(parser, ["--save-dir", "a", "--lr", "1"])) == ["--lr", "1"]


@pytest.mark.parametrize("kind, flag, spaced, commas, dest, expected", [
    ("train", "--wise-ft-alphas", ["0", "0.5", "1"], "0,0.5,1", "wise_ft_alphas", [0.0, 0.5, 1.0]),
    ("inference", "--subgroups", ["site", "sex"], "site,sex", "subgroups", "site,sex"),
    ("inference", "--age-bins", ["0", "40", "120"], "0,40,120", "age_bins", "0,40,120"),
    ("answers", "--classes", ["b", "a"], "b,a", "classes", "b,a"),
])
def test_list_flags_take_spaces_and_still_commas_with_a_warning(kind, flag, spaced, commas, dest,
                                                                 expected, tmp_path, capsys):
    extra = ["--out-dir", str(tmp_path / "o")] if kind == "train" else []
    assert getattr(parse_with(kind, [*extra, flag, *spaced], tmp_path), dest) == expected
    assert "deprecated" not in capsys.readouterr().err
    assert getattr(parse_with(kind, [*extra, flag, commas], tmp_path), dest) == expected
    err = capsys.readouterr().err
    assert f"{flag} A,B (commas) is deprecated; use {flag} {' '.join(spaced)}" in err


def test_wise_ft_alphas_out_of_range_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--wise-ft-alphas", "0", "1.5")
    assert "--wise-ft-alphas" in capsys.readouterr().err


def test_recipe_files_are_the_built_in_recipes():
    assert json.loads((RECIPE_DIR / "paper.json").read_text()) == PAPER
    assert json.loads((RECIPE_DIR / "recommended.json").read_text()) == RECOMMENDED


@pytest.mark.parametrize("recipe, expected", [("paper", PAPER), ("recommended", RECOMMENDED)])
def test_recipe_flag_and_config_file_give_the_recipe(recipe, expected, tmp_path):
    by_flag = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--recipe", recipe)
    assert {key: getattr(by_flag, key) for key in expected} == expected
    by_file = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"),
                          "--config", str(RECIPE_DIR / f"{recipe}.json"))
    # a config value goes through its flag's own parser, as `--warmup 0` would ('0', the same spec)
    expected = {**expected, "warmup": warmup_spec(str(expected["warmup"]))}
    assert {key: getattr(by_file, key) for key in expected} == expected


def write(path, text):
    path.write_text(text)
    return path


def test_config_sets_defaults_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "run.json", json.dumps(
        {"lr": 3e-6, "batch-size": 16, "recipe": "recommended", "wise_ft_alphas": [0, 0.5]}))
    args = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--config", str(config))
    assert (args.lr, args.batch_size, args.recipe, args.wise_ft_alphas) == (3e-6, 16, "recommended",
                                                                            [0, 0.5])
    assert args.schedule == "cosine"  # the recipe fills what neither the file nor the line set
    args = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--batch-size", "8",
                       "--config", str(config), "--recipe", "paper")
    assert (args.lr, args.batch_size, args.recipe, args.schedule) == (3e-6, 8, "paper", "const")


def test_config_in_yaml(tmp_path):
    pytest.importorskip("yaml")
    config = write(tmp_path / "run.yaml", "lr: 2.0e-6\nbalanced-sampling: true\n")
    args = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--config", str(config))
    assert (args.lr, args.balanced_sampling) == (2e-6, True)


@pytest.mark.parametrize("text, why", [('{"learning_rate": 1}', "unknown key 'learning_rate'"),
                                       ("[1, 2]", "expected a mapping"), ("{lr: ", ""),
                                       # a value is checked as the flag would check it (review, issue 24)
                                       ('{"loss": "nonsense"}', "key 'loss': invalid choice"),
                                       ('{"precision": "fp64"}', "key 'precision': invalid choice"),
                                       ('{"epochs": 2.5}', "key 'epochs': invalid int value"),
                                       ('{"wise_ft_alphas": [0.5, 3]}', "must lie in [0, 1]"),
                                       ('{"balanced_sampling": "yes"}', "expected true or false")])
def test_bad_config_is_refused_naming_file_and_key(text, why, tmp_path, capsys):
    config = write(tmp_path / "bad.json", text)
    with pytest.raises(SystemExit) as done:
        parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--config", str(config))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {config}" in err and why in err


# args.json names the entry point that ran and spells the flags' current names, in every script
# (train and split: test_args_json_argv_spells_the_new_name and their own end-to-end tests)


def answer_cohort(tmp_path):
    """Two class folders (files that are never read: answers are scored, not images) and an
    answer file for them."""
    rows = []
    for label in ("a", "b"):
        for i in range(3):
            path = tmp_path / "cohort" / label / f"{label}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not read")
            rows.append([f"{label}/{label}{i}.png", label if i else "b"])
    write_csv(tmp_path / "answers.csv", ["path", "pred_label"], rows)
    return ["--test-dir", str(tmp_path / "cohort"), "--predictions", f"step1={tmp_path / 'answers.csv'}",
            "--bootstrap", "0", "--no-figures"]


@pytest.mark.parametrize("main, script", [(answers.main, "score_answers.py"),
                                          (scoring.main, "inference.py")])  # its deprecated mode
def test_answer_scoring_records_its_script_and_the_new_spelling(main, script, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*answer_cohort(tmp_path), "--output-dir", str(out)]) == 0
    record = json.loads((out / "args.json").read_text())
    assert record["script"] == script
    assert record["argv"][-2:] == ["--out-dir", str(out)]
    assert record["command"].startswith(f"python {script} --test-dir ")
    assert "--output-dir is deprecated; use --out-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_train_cnn_records_its_module_and_the_new_spelling(tmp_path):
    write_cohorts(tmp_path, train=(2, 2, 2), val=(1, 1, 1), test=(1, 1, 1))
    out = tmp_path / "run"
    argv = ["--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
            "--test-dir", str(tmp_path / "test"), "--save-dir", str(out), "--arch", "resnet18",
            "--weights", "none", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
            "--no-progress"]
    assert cnn.main(argv) == 0
    record = json.loads((out / "args.json").read_text())
    canonical = [token.replace("--save-dir", "--out-dir") for token in argv]
    assert record["script"] == "baselines.train_cnn" and record["argv"] == canonical
    # the file cannot be run alone (it imports the package): the command repeats `python -m`
    assert shlex.split(record["command"]) == ["python", "-m", "baselines.train_cnn", *canonical]


# --config recorded as what it is, keys as users type the flags, two spellings that disagree (item 6)


def test_config_keys_are_the_flag_names_users_type(tmp_path):
    (tmp_path / "train").mkdir()
    out = tmp_path / "from_file"
    for key in ("out-dir", "out_dir", "save_dir"):  # the flag as typed, either way, or its dest
        config = write(tmp_path / f"{key}.json", json.dumps({key: str(out), "no-progress": True}))
        args = train_options.parse_args(["--train-dir", str(tmp_path / "train"), "--val-dir",
                                         str(tmp_path / "train"), "--config", str(config)])
        assert (args.save_dir, args.no_progress) == (str(out), True)  # --out-dir not needed on the line
    config = write(tmp_path / "balanced.json", json.dumps({"balanced-sampling": True}))
    assert parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--config", str(config)).balanced_sampling


@pytest.mark.parametrize("parse, argv, refused", [
    ("train", ["--save-dir", "A", "--out-dir", "B"], "--out-dir B and --save-dir A"),
    ("train", ["--out-dir", "B", "--save-dir=A"], "--out-dir B and --save-dir A"),
    ("inference", ["--output-dir", "A", "--out-dir", "B"], "--out-dir B and --output-dir A"),
    ("answers", ["--out-dir", "A", "--output-dir", "B"], "--out-dir A and --output-dir B"),
    ("split", ["--output-dir", "A", "--out-dir", "B"], "--out-dir B and --output-dir A"),
    ("cnn", ["--save-dir", "A", "--output-dir", "B"], "--save-dir A and --output-dir B"),
    ("inference", ["--wise-ft-alpha", "0", "0.5", "--wise-ft-alphas", "0", "1"],
     "--wise-ft-alphas 0 1 and --wise-ft-alpha 0 0.5"),
    # an abbreviation argparse accepts is the flag it stands for (it slipped past, and won)
    ("train", ["--out-dir", "A", "--save", "B"], "--out-dir A and --save-dir B"),
    ("split", ["--threads", "2", "--work", "3"], "--threads 2 and --workers 3")])
def test_two_spellings_with_different_values_are_refused_naming_both(parse, argv, refused, tmp_path,
                                                                      capsys):
    with pytest.raises(SystemExit) as done:
        args = parse_with(parse, argv, tmp_path)
        # parse_with calls the parsers' parse_args for train and cnn; the others check here
        cli.refuse_conflicting_spellings(
            split_cli.build_parser() if parse == "split" else scoring_args.build_parser(
                "x", model=parse == "inference"), argv)
        del args
    assert done.value.code == 2
    assert f"{refused}: two spellings of one flag with different values" in capsys.readouterr().err


def test_the_same_value_under_two_spellings_is_fine(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert parse_train(tmp_path, "--save-dir", out, "--out-dir", out).save_dir == out
    data = str(tmp_path / "train")
    args = cnn.parse_args(["--train-dir", data, "--val-dir", data, "--test-dir", data, "--weights",
                           "none", "--output-dir", out, "--out-dir=" + out])
    assert args.save_dir == out
    with pytest.raises(SystemExit) as done:  # and one spelling or another stays required
        cnn.parse_args(["--train-dir", data, "--val-dir", data, "--test-dir", data])
    assert done.value.code == 2
    assert "the following arguments are required: --out-dir" in capsys.readouterr().err


def test_an_abbreviated_required_flag_counts_and_args_json_records_it_written_out(tmp_path):
    """--out for --out-dir is accepted as argparse accepts it (it was refused as missing), and
    canonical_argv writes the flag that ran: an old spelling's abbreviation becomes the new flag."""
    out = str(tmp_path / "o")
    assert parse_train(tmp_path, "--out", out).save_dir == out
    parser = train_options.build_parser()
    assert cli.canonical_argv(parser, ["--save", out, "--lr=1e-5", "--batch", "8"]) == [
        "--out-dir", out, "--lr=1e-5", "--batch-size", "8"]


def test_config_is_recorded_as_what_it_is_in_the_model_card(tmp_path):
    from orbital_clip.train import card
    config = write(tmp_path / "my.json", json.dumps({"lr": 3e-6, "batch-size": 16}))
    args = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--config", str(config))
    assert cli.config_source(args) == f"--config {config} (then --recipe paper for the flags it leaves unset)"
    assert cli.config_record(args.config) == {"file": str(config), "values": {"lr": 3e-6, "batch_size": 16}}
    plain = parse_train(tmp_path, "--out-dir", str(tmp_path / "o"), "--recipe", "recommended")
    assert cli.config_source(plain) == "--recipe recommended" and cli.config_record(plain.config) is None
    text = card.model_card(args, prompts.load_prompt_set(None), [], [],
                           {"history": [], "best_epoch": None, "epoch": 0})
    assert f"## Recipe\n\n--config {config} (then --recipe paper for the flags it leaves unset): lr 3e-06" in text
