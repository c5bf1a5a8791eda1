"""prompts.py: the label map of free-text answers (inference.py --label-map) and the --classes
order, as known answers of pure functions."""

import json

import pytest

from orbital_clip import prompts

SUBTYPES = ["orbital inflammation", "orbital tumour", "thyroid eye disease"]
MAP = {"thyroid eye disease": ["TED", "Graves orbitopathy", "thyroid-associated orbitopathy"],
       "orbital inflammation": ["idiopathic orbital inflammation", "orbital pseudotumour"],
       "orbital tumour": "orbital neoplasm"}


def test_answers_map_case_and_whitespace_insensitively_and_refusals_map_to_none():
    lookup = prompts.parse_label_map(MAP, SUBTYPES)
    cases = {"TED": "thyroid eye disease", "  graves   ORBITOPATHY ": "thyroid eye disease",
             "Thyroid Eye Disease.": "thyroid eye disease", "orbital tumour": "orbital tumour",
             "Orbital Neoplasm": "orbital tumour", "orbital pseudotumour": "orbital inflammation",
             "I cannot determine": None, "": None, "   ": None, "tumour": None,
             "TED or orbital tumour": None}
    for answer, folder in cases.items():
        assert prompts.map_answer(answer, lookup) == folder, answer
    assert prompts.map_answer(None, lookup) is None
    assert prompts.map_answer(float("nan"), lookup) is None  # an empty CSV cell read by pandas


def test_label_map_refusals_name_the_file_and_the_fault(tmp_path):
    with pytest.raises(prompts.LabelMapError, match="label map names 'TED eye', not a class of"):
        prompts.parse_label_map({"TED eye": ["TED"]}, SUBTYPES)
    with pytest.raises(prompts.LabelMapError,
                       match="answer 'MASS' names two classes \\('orbital tumour' and 'orbital inflammation'\\)"):
        prompts.parse_label_map({"orbital tumour": ["mass"], "orbital inflammation": ["MASS"]}, SUBTYPES)
    with pytest.raises(prompts.LabelMapError, match="answer 'Orbital Tumour' names two classes"):
        prompts.parse_label_map({"thyroid eye disease": ["Orbital Tumour"]}, SUBTYPES)
    with pytest.raises(prompts.LabelMapError, match="list of non-empty strings"):
        prompts.parse_label_map({"orbital tumour": [3]}, SUBTYPES)
    # a synonym of punctuation only would map every empty answer to that class
    with pytest.raises(prompts.LabelMapError, match="synonym '...' is empty once case, spaces"):
        prompts.parse_label_map({"thyroid eye disease": ["TED", "..."]}, SUBTYPES)
    bad = tmp_path / "map.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(prompts.LabelMapError, match=f"{bad}: not a readable JSON"):
        prompts.load_label_map(bad, SUBTYPES)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(MAP), encoding="utf-8")
    assert prompts.load_label_map(good, SUBTYPES)["ted"] == "thyroid eye disease"


def test_class_order_is_sorted_or_exactly_the_classes_flag():
    found = ["thyroid eye disease", "orbital tumour", "orbital inflammation"]
    assert prompts.order_classes(found) == SUBTYPES
    wanted = ["thyroid eye disease", "orbital inflammation", "orbital tumour"]
    assert prompts.order_classes(found, wanted) == wanted
    with pytest.raises(ValueError, match=r"missing \['orbital tumour'\]"):
        prompts.order_classes(found, wanted[:2])
    with pytest.raises(ValueError, match=r"not found \['tumor'\]"):
        prompts.order_classes(found, wanted[:2] + ["tumor"])
    with pytest.raises(ValueError, match="repeated"):
        prompts.order_classes(found, wanted + ["orbital tumour"])


@pytest.mark.parametrize("reader, error, missing", [
    (prompts.load_prompt_set, prompts.PromptSetError, "no such prompt file"),
    (prompts.read_label_map_file, prompts.LabelMapError, "no such label map file"),
])
def test_json_files_are_refused_naming_the_file(tmp_path, reader, error, missing):
    with pytest.raises(error, match=f"{tmp_path / 'absent.json'}: {missing}$"):
        reader(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(error, match=f"{broken}: not a readable JSON file"):
        reader(broken)
