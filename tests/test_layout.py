"""The package's shape (issue 24): no module grows past the size a reader can hold, the README's
layout names every module, and no file edits the import path."""
import re
from pathlib import Path

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
