"""One home per rule (issue 24): the package builds open_clip models in one place and writes
checkpoint files in one place; a second call site is a second error path that will drift."""
import re
from pathlib import Path

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
