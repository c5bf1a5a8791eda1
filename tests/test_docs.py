"""Every fenced command of README.md and docs/*.md is checked, and every relative link resolves.

A command on the demo's files (demo_run/, demo/) is run as written, with `python` replaced by this
interpreter, in a scratch folder that links the clone's files and holds a small demo_run/ made
by one shared fixture (a small synthetic cohort and a tiny model trained for 2 epochs). Any other
command of a script (it needs downloaded weights, a GPU or hours) is parsed by the script's own
argument parser, so a renamed or removed flag fails here. `make X` is checked with `make -n X`.
A command that is none of these carries a `# not run by tests: REASON` comment above it in the
doc, and its test skips with that reason.
"""

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md"] + sorted((REPO_ROOT / "docs").glob("*.md"))
SKIP_MARK = "# not run by tests:"
# the module whose main() each script runs (the top-level scripts are thin entry points)
# Each entry-point script is a thin module exposing main(argv): parse through it, not through the
# package's internals, so that a move inside orbital_clip/ cannot break this test.
SCRIPT_MODULES = {name: name[:-3] for name in ("data_preprocess.py", "clip_train.py", "inference.py",
                                               "score_answers.py", "prompts.py", "ask_models.py",
                                               "linear_probe.py")}
README_MAX_LINES = 250


def fenced_blocks(path):
    """(language, first line number, lines) of every fenced block of a markdown file."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        indent, start, body = len(match.group(1)), i + 1, []
        i += 1
        while not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:])
            i += 1
        blocks.append((match.group(2), start + 1, body))
        i += 1
    return blocks


def doc_commands():
    """(doc, line, command, skip reason or None) of every shell command in the docs."""
    found = []
    for path in DOCS:
        for language, first_line, body in fenced_blocks(path):
            if language not in ("sh", "bash"):
                continue
            text = "\n".join(body).replace("\\\n", " ")
            reason = None
            for offset, line in enumerate(text.splitlines()):
                line = line.strip()
                if line.startswith(SKIP_MARK):
                    reason = line[len(SKIP_MARK):].strip()
                elif line and not line.startswith("#"):
                    found.append((path.relative_to(REPO_ROOT).as_posix(), first_line + offset, line, reason))
                    reason = None
    return found


def is_demo_command(command):
    """A command on the demo's files: run for real on the fixture's demo_run/."""
    return "demo_run/" in command or command.startswith(("python demo/", "python prompts.py"))


COMMANDS = doc_commands()
DEMO_COMMANDS = list(dict.fromkeys(c[2] for c in COMMANDS if c[3] is None and is_demo_command(c[2])))


def command_id(entry):
    return f"{entry[0]}:{entry[1]}"


class Parsed(Exception):
    """Raised by the patched parser once the arguments are parsed: nothing runs."""


def script_and_argv(command):
    """(module name, argv) of a script command, or None when it names no script we know."""
    words = shlex.split(command, comments=True)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments
        words = words[1:]
    if words and words[0] == "torchrun":  # torchrun's own options come before the script
        words = words[1:]
        while words and words[0].startswith("--"):
            words = words[1:]
        words = ["python"] + words
    if len(words) < 2 or words[0] != "python":
        return None
    if words[1] == "-m":
        return words[2], words[3:]
    module = SCRIPT_MODULES.get(words[1])
    if module == "score_answers" and not (REPO_ROOT / "score_answers.py").exists():
        module = "orbital_clip.scoring"  # until score_answers.py lands: inference.py's answer mode, same flags
    return (module, words[2:]) if module else None


def parse_only(module_name, argv, monkeypatch):
    """Run main(argv) until argparse has parsed argv: an unknown flag or bad value exits 2."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = importlib.import_module(module_name).main
    with pytest.raises(Parsed):
        main(argv)


@pytest.mark.parametrize("entry", [c for c in COMMANDS if not (c[3] is None and is_demo_command(c[2]))],
                         ids=command_id)
def test_doc_command_parses(entry, monkeypatch):
    doc, line, command, reason = entry
    if reason is not None:
        pytest.skip(f"{doc}:{line} is marked not run: {reason}")
    if command.startswith("make "):
        done = subprocess.run(["make", "-n", *shlex.split(command, comments=True)[1:]], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, f"{doc}:{line}: {command}\n{done.stderr}"
        return
    target = script_and_argv(command)
    assert target is not None, (f"{doc}:{line}: `{command}` is neither a script the test knows nor marked "
                                f"'{SKIP_MARK} REASON'")
    parse_only(*target, monkeypatch)


def scratch_clone(root):
    """A folder that links every file of the clone, so commands run as written and write only here."""
    for entry in REPO_ROOT.iterdir():
        if entry.name not in (".git", ".venv", "demo_run") and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    return root


def run_python(argv, cwd):
    done = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    """A scratch clone whose demo_run/ holds what `make demo` leaves, made small and quick."""
    root = scratch_clone(tmp_path_factory.mktemp("docs_clone"))
    run_python(["demo/make_demo_cohort.py", "--out", "demo_run/dataset_root", "--seed", "0",
                "--counts", "6", "12", "9"], root)
    run_python(["demo/make_demo_cohort.py", "--out", "demo_run/external_cohort", "--seed", "1",
                "--counts", "5", "8", "6"], root)
    run_python(["data_preprocess.py", "--data-root", "demo_run/dataset_root"], root)
    run_python(["clip_train.py", "--train-dir", "demo_run/dataset_root/train", "--val-dir",
                "demo_run/dataset_root/val", "--save-dir", "demo_run/clip_model_checkpoints",
                "--model-config", "demo/tiny_clip.json", "--pretrained", "none", "--batch-size", "8",
                "--epochs", "2", "--lr", "1e-3", "--precision", "fp32"], root)
    return root


@pytest.fixture(scope="module")
def demo_results(demo_workspace):
    """Each demo command run once, in the order of the docs (later commands read earlier outputs)."""
    results = {}
    env = dict(os.environ, PYTHONPATH="")
    for command in DEMO_COMMANDS:
        line = re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)
        if not (REPO_ROOT / "score_answers.py").exists():  # until it lands: inference.py's answer mode
            line = line.replace(" score_answers.py ", " inference.py ", 1)
        done = subprocess.run(line, shell=True, cwd=demo_workspace, capture_output=True, text=True,
                              timeout=600, env=env)
        results[command] = done
    return results


@pytest.mark.parametrize("command", DEMO_COMMANDS)
def test_doc_demo_command_runs_as_written(command, demo_results, demo_workspace):
    done = demo_results[command]
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    if "--output-dir" in command or "--save-dir" in command:
        out = shlex.split(command)[shlex.split(command).index(
            "--output-dir" if "--output-dir" in command else "--save-dir") + 1]
        assert (demo_workspace / out / "args.json").is_file()


def heading_anchors(path):
    """GitHub's anchors of a markdown file's headings."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_relative_link_points_to_a_file_and_heading_that_exist(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{path.name}: " + "; ".join(broken)


def test_readme_is_a_front_page_with_the_two_commands_on_top():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    top = "\n".join(lines[:10])
    assert "make demo" in top and "make test" in top


def test_every_fenced_block_says_its_language_and_json_blocks_parse():
    import json
    for path in DOCS:
        for language, line, body in fenced_blocks(path):
            assert language in ("sh", "bash", "json", "text"), f"{path.name}:{line}: ```{language}"
            if language == "json":
                json.loads("\n".join(body))
