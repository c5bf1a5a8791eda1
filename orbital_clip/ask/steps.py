"""The step definition file and prompt rendering: each step's template filled from an image's
metadata row, then the instruction listing the answer options.

A step file is JSON: `classes` (answer options = class folders, index 0 first), optional
`label_map` {class: [synonym, ...]}, optional `system`, `instruction` (with `{options}`), optional
`not_stated` {"columns": [...], "text": "not stated"} and `steps` [{"name", "template"}], where
every `{placeholder}` of a template is a metadata column.
"""

import dataclasses
import json
import string
from pathlib import Path

from orbital_clip import metadata
from orbital_clip import prompts as prompt_sets

PAPER_STEPS = Path(__file__).with_name("paper_steps.json")  # shipped: the paper's three steps


class StepFileError(ValueError):
    """A step file or metadata file that cannot be used; str() names the file and the fix."""


@dataclasses.dataclass
class Step:
    name: str
    template: str
    columns: list  # the metadata columns its template names, in order of appearance


@dataclasses.dataclass
class StepSet:
    source: str
    classes: list
    label_map: dict
    system: str
    instruction: str
    not_stated_columns: list
    not_stated_text: str
    steps: list  # Step, in step order
    # label_map parsed: {answer: class}, and a declared outcome ('not orbital') mapped to itself:
    # it is an answer, not an unmapped one
    lookup: dict = dataclasses.field(default_factory=dict)


def template_columns(template, where):
    """The placeholders of a template, each a plain column name ('{age}'; no '{0}', no '{a.b}')."""
    try:
        fields = [field for _text, field, _spec, _conv in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as err:
        raise StepFileError(f"{where}: template {template!r}: {err}") from None
    for field in fields:
        if not field or not field.replace("_", "a").replace(" ", "a").isalnum():
            raise StepFileError(f"{where}: template placeholder {{{field}}} must name a metadata column")
    return list(dict.fromkeys(fields))


def parse_steps(data, source):
    """A StepSet from the parsed JSON of a step file (StepFileError naming what is wrong)."""
    if not isinstance(data, dict):
        raise StepFileError(f"{source}: expected a JSON object with classes, instruction and steps")
    for key in ("classes", "instruction", "steps"):
        if key not in data:
            raise StepFileError(f"{source}: missing key {key!r}")
    classes = data["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        raise StepFileError(f"{source}: 'classes' must be a list of two or more class folder names")
    try:  # parsed once here; the answer CSVs map through it (answer_rows)
        lookup = prompt_sets.parse_label_map(data.get("label_map") or {}, classes, source)
        lookup.update(prompt_sets.parse_outcomes(data.get("label_map") or {}, classes, source))
    except ValueError as err:
        raise StepFileError(str(err)) from None
    if "{options}" not in data["instruction"]:
        raise StepFileError(f"{source}: 'instruction' must contain {{options}} (the answer options)")
    not_stated = data.get("not_stated") or {}
    steps, names = [], set()
    for i, raw in enumerate(data["steps"] if isinstance(data["steps"], list) else []):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("template"), str):
            raise StepFileError(f"{source}: steps[{i}] needs a 'name' and a 'template' (strings)")
        if raw["name"] in names or not raw["name"].strip():
            raise StepFileError(f"{source}: steps[{i}]: step name {raw['name']!r} is empty or used twice")
        names.add(raw["name"])
        steps.append(Step(raw["name"], raw["template"], template_columns(raw["template"], f"{source}: steps[{i}]")))
    if not steps:
        raise StepFileError(f"{source}: 'steps' must be a non-empty list")
    return StepSet(str(source), list(classes), data.get("label_map") or {}, data.get("system") or "",
                   data["instruction"], list(not_stated.get("columns") or []),
                   not_stated.get("text", "not stated"), steps, lookup)


def load_steps(path):
    """Read and check a step file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StepFileError(f"--steps {path}: cannot read JSON ({err})") from None
    return parse_steps(data, f"--steps {path}")


def needed_columns(step_set):
    """Every metadata column some step names, in first-use order."""
    return list(dict.fromkeys(c for step in step_set.steps for c in step.columns))


def read_metadata(path):
    """{relative path: {column: cell}} of a metadata CSV with a `path` column (as predictions.csv),
    read by metadata.read_metadata, the one --metadata reader (paths normalised by its rule)."""
    where = f"--metadata {path}"
    try:
        table = metadata.read_metadata(path, where)
    except OSError as err:
        raise StepFileError(f"{where}: cannot read CSV ({err})") from None
    except ValueError as err:
        raise StepFileError(str(err)) from None
    if table.key != "path":
        raise StepFileError(f"{where}: needs a header with a 'path' column and one row per image")
    if table.duplicate:
        line, key, _first = table.duplicate
        raise StepFileError(f"{where}: row {line}: image {key!r} appears twice")
    return {key: {column: cell for column, cell in row.items() if column != "path"}
            for key, (_line, row) in table.rows.items()}


def render_prompt(step_set, step, image, row):
    """The user text of one image at one step: the template filled from `row`, then the
    instruction. A missing or empty cell is an error naming the image and column, unless the
    step file declares that column 'not stated'."""
    values = {}
    for column in step.columns:
        cell = (row or {}).get(column)
        cell = "" if cell is None else str(cell).strip()
        if not cell and column in step_set.not_stated_columns:
            cell = step_set.not_stated_text
        elif not cell:
            raise StepFileError(f"image {image!r}: step {step.name!r} needs metadata column {column!r}, "
                                "which is missing or empty; fill it in --metadata, or declare the column "
                                f"under 'not_stated' in {step_set.source.removeprefix('--steps ')}")
        values[column] = cell
    options = ", ".join(step_set.classes)
    return f"{step.template.format(**values)}\n{step_set.instruction.format(options=options)}"
