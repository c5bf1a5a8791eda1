"""The built-in prompt set is the published one. tests/data/paper_prompts.json is a copy of
shared/paper_prompts.json (which lives outside the clone), so this never skips in a fresh clone;
where the shared file is beside the checkout the copy must still equal it."""

import json

from orbital_clip import prompts
from conftest import REPO_ROOT

COPY = REPO_ROOT / "tests" / "data" / "paper_prompts.json"


def test_built_in_prompts_are_the_published_set():
    expected = prompts.parse_prompt_set(json.loads(COPY.read_text(encoding="utf-8")))
    assert prompts.load_prompt_set() == expected


def test_the_copy_equals_the_shared_file_where_there_is_one():
    shared = REPO_ROOT.parent / "shared" / "paper_prompts.json"
    if shared.is_file():  # beside a working checkout only; the test above needs no shared file
        assert json.loads(shared.read_text(encoding="utf-8")) == json.loads(COPY.read_text(encoding="utf-8"))
