"""Each script declares its outputs once (issue 24): docs/outputs.md's tables name exactly the
declared files, --overwrite clears what the declaration says, and a run writes nothing outside it."""
import re
from pathlib import Path

import pytest

from orbital_clip import evaluation, outputs, probe
from orbital_clip.split import records as split_records
from orbital_clip.train import checkpoints as train_checkpoints

REPO_ROOT = Path(__file__).resolve().parent.parent
DECLARED = {"data_preprocess.py": split_records.OUTPUTS, "clip_train.py": train_checkpoints.OUTPUTS,
            "inference.py": evaluation.OUTPUTS, "linear_probe.py": probe.OUTPUTS}


def documented_outputs(markdown, script):
    """The backticked names in the first column of the table that follows the `script` heading line."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"`{script}`"))
    names, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            first_cell = line.split("|")[1]
            names += re.findall(r"`([^`]+)`", first_cell)
        elif in_table:
            break
    return names


def test_documented_outputs_parse_a_known_table():
    markdown = "`x.py` (in `--out-dir`):\n\n| file | content |\n| --- | --- |\n| `a.csv`, `b/` | `c.txt` |\n\nafter\n| `d` | e |\n"
    assert documented_outputs(markdown, "x.py") == ["a.csv", "b/"]


@pytest.mark.parametrize("script", sorted(DECLARED))
def test_docs_table_names_exactly_the_declared_outputs(script):
    documented = documented_outputs((REPO_ROOT / "docs" / "outputs.md").read_text(encoding="utf-8"), script)
    declared = [o.name for o in DECLARED[script]]
    assert len(declared) == len(set(declared))
    assert sorted(documented) == sorted(declared)


def test_every_figure_is_declared_as_png_and_pdf():
    from orbital_clip.report import FIGURE_NAMES
    names = {o.name for o in evaluation.OUTPUTS}
    assert {f"{stem}.{ext}" for stem in FIGURE_NAMES for ext in ("png", "pdf")} <= names


def test_declared_names_match_written_paths():
    wise = outputs.OutputFile("wise_ft_alpha_<alpha>/", "")
    assert wise.matches("wise_ft_alpha_0.5/metrics.json")
    assert not wise.matches("wise_ft_summary.csv")
    assert outputs.OutputFile("metrics.csv", "").matches("metrics.csv")
    assert not outputs.OutputFile("metrics.csv", "").matches("old/metrics.csv")
    assert outputs.cleared_files((wise, outputs.OutputFile("a.csv", ""))) == ("a.csv",)


def test_clip_train_overwrite_clears_every_declared_file(tmp_path):
    """A folder holding every declared file of an earlier run (one with --wise-ft-alphas, SSA...)
    keeps none of the cleared ones after --overwrite; a file we did not write stays."""
    for output in train_checkpoints.OUTPUTS:
        if output.is_plain_file:
            (tmp_path / output.name).write_text("old run")
    (tmp_path / "notes.txt").write_text("the researcher's")
    args = type("Args", (), {"save_dir": str(tmp_path), "overwrite": True, "resume": None})()
    train_checkpoints.prepare_save_dir(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_ssa_copies_what_the_declaration_marks():
    copied = set(outputs.ssa_copied_files(train_checkpoints.OUTPUTS))
    assert {train_checkpoints.BEST_NAME, train_checkpoints.BEST_SAFETENSORS_NAME, "args.json"} <= copied
