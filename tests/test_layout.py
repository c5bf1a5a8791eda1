"""The package's shape (issue 24): no module grows past the size a reader can hold, the README's
layout names every module, and no file edits the import path."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "orbital_clip"
MAX_LINES = 800


def package_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_no_module_is_over_the_size_limit():
    sizes = {p.relative_to(REPO_ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in package_modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_readme_layout_names_every_module():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    named = set(re.findall(r"`([\w/.]+)`", layout))
    missing = []
    for path in package_modules():
        rel = path.relative_to(PACKAGE)
        # a module is named by its own file name (`models.py`), its path, or its sub-package (`train/`)
        candidates = {f"orbital_clip/{rel.as_posix()}", rel.name, f"orbital_clip/{rel.parts[0]}/"}
        if not candidates & named:
            missing.append(rel.as_posix())
    assert missing == []


def test_no_import_path_edits():
    offenders = [p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.rglob("*.py")
                 if ".venv" not in p.parts and "sys.path.insert" in p.read_text(encoding="utf-8")
                 and p.name != "test_layout.py"]
    assert offenders == []


# What a non-editable install needs from the clone: the build files and the packaged sources
# (copied, so that the build's build/ and *.egg-info land in tmp_path, not in the working tree).
INSTALL_SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "LICENSE", "setup.cfg",
                   "orbital_clip", "baselines", "clip_train.py", "data_preprocess.py", "inference.py",
                   "score_answers.py", "ask_models.py", "prompts.py")


@pytest.mark.slow
def test_a_non_editable_install_runs_from_outside_the_clone(tmp_path):
    """`pip install .` (here: a wheel unpacked with --target) carries the recipes: clip_train.py
    --help and `--recipe recommended` work with no clone on the import path (issue 24)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in INSTALL_SOURCES:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        copy(REPO_ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                 if (REPO_ROOT / name).is_dir() else {}))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "--target", str(site), str(source)],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    shutil.rmtree(source)  # nothing of the clone left to fall back on
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "train").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    shown = subprocess.run([sys.executable, str(site / "clip_train.py"), "--help"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "1e-08 with --recipe paper, 1e-05 with recommended" in " ".join(shown.stdout.split())
    resolve = ("import json, orbital_clip\n"
               "from orbital_clip.train.options import parse_args\n"
               "args = parse_args(['--train-dir', 'train', '--val-dir', 'train', '--out-dir', 'o',"
               " '--recipe', 'recommended', '--pretrained', 'none'])\n"
               "print(json.dumps([orbital_clip.__file__, args.loss, args.lr, args.schedule]))")
    done = subprocess.run([sys.executable, "-c", resolve], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    where, loss, lr, schedule = json.loads(done.stdout.splitlines()[-1])
    assert Path(where).is_relative_to(site)
    assert (loss, lr, schedule) == ("label-aware", 1e-5, "cosine")
