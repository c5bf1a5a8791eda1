"""One home per rule (issue 24): the package builds open_clip models in one place and writes
checkpoint files in one place; a second call site is a second error path that will drift."""
import ast
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from orbital_clip import answers, cnn, metadata, models, prompts, scoring_args
from orbital_clip.ask import runner as ask_runner
from orbital_clip.ask import steps as ask_steps
from orbital_clip.metrics import calibration
from orbital_clip.split import cli as split_cli
from orbital_clip.train import health, losses
from conftest import write_cohorts, write_csv

PACKAGE = Path(__file__).resolve().parent.parent / "orbital_clip"
EXPECTED_TORCH_SAVE = {}


def call_sites(pattern):
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        count = len(re.findall(pattern, path.read_text(encoding="utf-8")))
        if count:
            found[path.relative_to(PACKAGE).as_posix()] = count
    return found


def test_one_open_clip_model_builder():
    assert call_sites(r"open_clip\.create_model(?:_and_transforms)?\(") == {"models.py": 1}


def test_checkpoints_are_written_only_in_checkpoint_py():
    sites = call_sites(r"torch\.save\(")
    assert sites.pop("checkpoint.py") == 1
    assert sites == EXPECTED_TORCH_SAVE


# -- second copies found in the review of issue 24 (item 3): each rule has one home, every user
# calls it; a grep where a copy would be a line of code, and the value where it can be checked


def test_figures_are_saved_only_through_report_save_figure(tmp_path):
    # one dpi: no savefig or dpi= outside report.figures.save_figure and the atomic writer it calls
    assert call_sites(r"\.savefig\(") == {"outputs.py": 1}
    assert call_sites(r"\bdpi\s*=") == {}
    from PIL import Image
    from orbital_clip.report.figures import FIGURE_DPI
    from orbital_clip.train import card, ssa
    history = [dict(epoch=e, train_loss=1.0 / e, val_loss=1.0, accuracy=0.5, balanced_accuracy=0.5,
                    macro_f1=0.5, macro_auroc=0.5, rare_sensitivity=0.5, is_best=e == 2)
               for e in (1, 2)]
    card.write_history(tmp_path, history, "accuracy")
    frame = pd.DataFrame({"stage": [1, 1], "factor": ["lr", "lr"], "value": ["1e-6", "1e-5"],
                          "value_of_metric": [0.4, 0.6], "metric": ["accuracy"] * 2,
                          "best": [False, True]})
    ssa.plot_sensitivity(frame, tmp_path / "sensitivity.png")
    for name, width_in in (("training_curves.png", 10), ("sensitivity.png", 4)):
        image = Image.open(tmp_path / name)
        assert image.info["dpi"] == pytest.approx((FIGURE_DPI, FIGURE_DPI), abs=0.01)
        assert image.size[0] == pytest.approx(width_in * FIGURE_DPI, rel=0.01)  # no bbox cropping
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.csv", "sensitivity.png", "train_log.jsonl", "training_curves.png"]  # png only


def test_the_logit_scale_rule_has_one_home():
    assert call_sites(r"scale\.exp\(\)") == {"models.py": 1}
    assert call_sites(r"==\s*[\"']published-log[\"']") == {"models.py": 1}
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    wrapped = torch.nn.Module()
    wrapped.module = model  # as DistributedDataParallel holds it
    assert models.logit_scale(model, "exp").item() == pytest.approx(20.0)
    assert models.logit_scale(model, "published-log").item() == pytest.approx(math.log(20.0))
    assert losses.loss_scale(wrapped, "exp").item() == pytest.approx(20.0)


@pytest.mark.parametrize("pattern, message", [
    ("(P", "--group-regex '(P': not a valid regular expression (missing ), unterminated subpattern "
           "at position 0)"),
    ("P\\d+", "--group-regex 'P\\\\d+': needs a capture group, e.g. '^(P\\d+)_'")])
def test_group_regex_refusal_is_the_same_in_split_and_inference(pattern, message, tmp_path, capsys):
    assert call_sites(r"re\.error") == {"patients.py": 1}  # the validity check, once
    (tmp_path / "a").mkdir()
    refusals = []
    for parse in (lambda: split_cli.parse_args(["--data-root", str(tmp_path), "--group-regex", pattern]),
                  lambda: scoring_args.parse_args(["--test-dir", str(tmp_path), "--checkpoint", "x",
                                                   "--group-regex", pattern], "inference")):
        with pytest.raises(SystemExit) as done:
            parse()
        assert done.value.code == 2
        refusals.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert refusals[0] == refusals[1]
    assert refusals[0].endswith(message)


@pytest.mark.parametrize("isa, expected", [(None, "fp32"), ("AMX", "bf16")])
def test_train_cnn_precision_auto_is_models_resolve_precision(isa, expected, monkeypatch, tmp_path):
    assert call_sites(r"precision\s*==\s*[\"']auto[\"']") == {}
    monkeypatch.setattr(models, "cpu_native_bf16", lambda: isa)
    write_cohorts(tmp_path, train=(1, 1, 1))
    data = str(tmp_path / "train")
    args = cnn.parse_args(["--train-dir", data, "--val-dir", data, "--test-dir", data, "--out-dir",
                           str(tmp_path / "out"), "--arch", "resnet18", "--weights", "none",
                           "--image-size", "32", "--device", "cpu"])
    cnn.prepare(args)
    assert args.precision == expected == models.resolve_precision("auto", torch.device("cpu"))[0]


def counting(monkeypatch, module, name):
    """Count the calls of module.name (still called through)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_the_label_map_is_parsed_once_per_run(monkeypatch, tmp_path):
    for label in ("a", "b"):
        for i in range(2):
            (tmp_path / "cohort" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / "cohort" / label / f"{i}.png").write_bytes(b"not read")
    rows = [[f"{label}/{i}.png", {"a": "Alpha", "b": "beta."}[label]] for label in "ab" for i in range(2)]
    files = [write_csv(tmp_path / f"step{k}.csv", ["path", "answer"], rows) for k in (1, 2)]
    (tmp_path / "map.json").write_text(json.dumps({"a": ["alpha"], "b": ["BETA"]}))
    calls = counting(monkeypatch, prompts, "parse_label_map")
    argv = ["--test-dir", str(tmp_path / "cohort"), "--predictions", f"one={files[0]}", "--compare",
            f"two={files[1]}", "--label-map", str(tmp_path / "map.json"), "--out-dir",
            str(tmp_path / "out"), "--bootstrap", "0", "--no-figures"]
    assert answers.main(argv) == 0
    assert len(calls) == 1  # not once more for each answer file
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0  # the synonyms were mapped
    # the ask pipeline: parsed with the step file, and the answer CSVs map through that parse
    calls.clear()
    step_set = ask_steps.load_steps(ask_steps.PAPER_STEPS)
    item = types.SimpleNamespace(key="k", step="image", path="x.png")
    rows = ask_runner.answer_rows(step_set, [item], {"k": {"answer": " graves  ORBITOPATHY.",
                                                           "status": "ok"}})
    assert rows["image"][0]["mapped_label"] == "thyroid eye disease"
    assert len(calls) == 1


def test_ask_reads_metadata_with_the_one_reader_and_path_rule(tmp_path):
    assert not [p for p in (PACKAGE / "ask").glob("*.py") if "csv.DictReader" in p.read_text()]
    meta = write_csv(tmp_path / "meta.csv", ["path", "age"],
                     [[".\\a\\1.png", "40"], ["b//2.png ", "51"], ["./c/3.png", "60"]])
    table = ask_steps.read_metadata(meta)
    assert table == {metadata.normalise_relpath(p): {"age": age}
                     for p, age in ((".\\a\\1.png", "40"), ("b//2.png ", "51"), ("./c/3.png", "60"))}
    assert list(table) == ["a/1.png", "b/2.png", "c/3.png"]
    write_csv(tmp_path / "twice.csv", ["path", "age"], [["a/1.png", "1"], ["./a/1.png", "2"]])
    with pytest.raises(ask_steps.StepFileError, match=r"row 3: image 'a/1.png' appears twice"):
        ask_steps.read_metadata(tmp_path / "twice.csv")


def test_the_collapse_temperature_bound_is_the_calibration_search_range():
    assert call_sites(r"(?m)^TEMPERATURE_LOG_BOUND\s*=") == {"metrics/calibration.py": 1}
    bound = calibration.TEMPERATURE_LOG_BOUND
    assert health.TEMPERATURE_LOG_BOUND is bound
    # perfectly separated validation logits: the NLL keeps falling as T shrinks, the fit ends at
    # the low end of the range, and health reads that as a sign
    logits = np.array([[0.01, 0.0], [0.0, 0.01]] * 5)  # separated, but far too flat a softmax
    fitted = calibration.fit_temperature(logits, np.array([0, 1] * 5))
    assert math.log(fitted) == pytest.approx(-bound, abs=1e-3)
    row = {"train_loss": 0.0, "predicted_classes": 2}
    assert health.collapse_signs([{**row, "temperature": fitted}] * 3, 1.0) == ["temperature_at_bound"]
    inside = math.exp(bound - 0.5)
    assert health.collapse_signs([{**row, "temperature": inside}] * 3, 1.0) == []


# -- imports point one way (item 4): no cycle among module-level imports, and no function-level
# import of a project module where a module-level one would close a cycle (that hides the cycle)


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node, known):
    """The project modules an import statement loads (with the packages above them)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                   for alias in node.names]
    found = set()
    for target in targets:
        parts = target.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found


def import_graph():
    """({module: modules it imports at load time}, [(module, target, line) of imports inside
    functions]) of the package, by reading the sources."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    known = set(files)
    at_load, deferred = {}, []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        at_load[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                # its own packages are loaded before it (their __init__ is no edge of a cycle)
                own = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}
                targets = imported_modules(node, known) - own
                if id(node) in inside:
                    deferred += [(name, t, node.lineno) for t in sorted(targets)]
                else:
                    at_load[name] |= targets
    return at_load, deferred


def reaches(graph, start, goal):
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_no_import_cycle_and_none_hidden_in_a_function():
    at_load, deferred = import_graph()
    assert "orbital_clip.scoring_args" in at_load["orbital_clip.answers"]  # the graph sees imports
    cycles = sorted((a, b) for a, targets in at_load.items() for b in targets if reaches(at_load, b, a))
    assert cycles == []
    hidden = [f"{module} line {line}: imports {target} in a function; at load it would be a cycle"
              for module, target, line in deferred if reaches(at_load, target, module)]
    assert hidden == []


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter_in_alphabetical_order():
    names = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
    done = subprocess.run([sys.executable, "-c", "import importlib, sys\n"
                           "for name in sys.argv[1:]:\n    importlib.import_module(name)", *names],
                          cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_score_answers_never_imports_torch(tmp_path):
    """score_answers.py scores CSV files: loading torch (seconds, gigabytes) buys it nothing (item 7)."""
    shown = subprocess.run([sys.executable, "-X", "importtime", str(PACKAGE.parent / "score_answers.py"),
                            "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "--predictions" in shown.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines()
                if line.startswith("import time:")]
    assert "orbital_clip.answers" in imported
    assert [name for name in imported if name.split(".")[0] in ("torch", "open_clip", "torchvision")] == []
    # and a whole run (the cohort listed, two steps scored, the report written) in a fresh interpreter
    for label in ("a", "b"):
        (tmp_path / "cohort" / label).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "cohort" / label / f"{i}.png").write_bytes(b"not read")
    rows = [[f"{label}/{i}.png", label] for label in "ab" for i in range(2)]
    files = [write_csv(tmp_path / f"step{k}.csv", ["path", "pred_label"], rows) for k in (1, 2)]
    run = ("import sys\nfrom orbital_clip import answers\n"
           f"status = answers.main(['--test-dir', 'cohort', '--predictions', 'one={files[0]}', "
           f"'--compare', 'two={files[1]}', '--out-dir', 'out', '--bootstrap', '20'])\n"
           "print(status, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))")
    done = subprocess.run([sys.executable, "-c", run], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"] == 1.0
