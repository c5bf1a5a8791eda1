"""Shared fixtures: CPU only, a tiny registered model (no downloads), small real image files."""

import os
import sys
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # force CPU, even on a GPU machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "demo"))

import common  # noqa: E402
import make_demo_cohort  # noqa: E402

TINY_CONFIG = REPO_ROOT / "demo" / "tiny_clip.json"
TINY_MODEL = TINY_CONFIG.stem
common.register_model_config(TINY_CONFIG)


def tree_state(*roots):
    """{path: (is_dir, size, mtime_ns)} of every file, link and folder under `roots` (the roots
    included): equal before and after a refused run shows it created, changed and deleted nothing."""
    state = {}
    for root in map(Path, roots):
        for path in [root, *root.rglob("*")] if root.exists() else []:
            info = path.lstat()
            state[str(path)] = (path.is_dir() and not path.is_symlink(), info.st_size, info.st_mtime_ns)
    return state


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """`--precision auto` resolves to fp32 in every test, whatever CPU runs the suite: the tests
    that compare numbers exactly stay exact on AMX/AVX512-BF16 machines too. Tests of bf16 pass
    `--precision bf16`, or patch `common.cpu_native_bf16` back to a native answer."""
    monkeypatch.setattr(common, "cpu_native_bf16", lambda: None)


@pytest.fixture
def tiny_config():
    """Path of the tiny open_clip architecture JSON (registered as 'tiny_clip')."""
    return TINY_CONFIG


@pytest.fixture
def make_cohort(tmp_path):
    """Factory: write a synthetic class-folder cohort and return its root."""

    def _make(name="cohort", counts=(6, 12, 9), seed=0):
        root = tmp_path / name
        make_demo_cohort.write_cohort(root, counts, seed)
        return root

    return _make


@pytest.fixture
def cohort(make_cohort):
    """A small imbalanced synthetic cohort: 6 / 12 / 9 images."""
    return make_cohort()
