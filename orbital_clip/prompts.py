"""Class registry and clinical prompt sets shared by training and inference.

Folder names are the labels. Class order is fixed and index 0 is the rare, clinically critical
class (`orbital disease`). Each class carries training prompts (one is sampled at random per image
per step) and evaluation prompts (their normalised text embeddings are averaged into one class
embedding: a prompt ensemble).

A JSON file with the same schema replaces the published sets (and may define other classes):

    {"classes": [{"folder": "orbital disease", "train": ["..."], "eval": ["..."]}, ...]}

    $ python clip_train.py ... --prompts my_prompts.json
    $ python inference.py  ... --prompts my_prompts.json
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# Published protocol: training prompts "v4" and the single evaluation prompt per class used for
# zero-shot validation (Communications Medicine, 2026). Order matters: index 0 is the rare class.
PAPER_PROMPT_SET = {
    "source": "published Orbital-CLIP protocol (training prompts v4; zero-shot evaluation prompts)",
    "classes": [
        {
            "folder": "orbital disease",
            "train": [
                "This medical image shows a single eye exhibiting clear signs of orbital disease, "
                "such as inflammation, asymmetry, or unusual bulging.",
                "In this image, the visible eye displays characteristics of orbital disease, "
                "including puffiness, discoloration, or abnormal protrusion.",
                "The single eye in this diagnostic image is marked by signs of orbital disease, "
                "noticeable through abnormalities like swelling or structural changes around the "
                "socket.",
                "This is an image of an individual with orbital disease in the eye region.",
                "This image shows an eye diagnosed with an orbital disorder.",
                "orbital eye disease",
            ],
            "eval": ["orbital disease"],
        },
        {
            "folder": "healthy eyes",
            "train": [
                "no eye disease",
                "free from eye disease",
                "This is an image showing healthy eye.",
            ],
            "eval": ["no eye disease"],
        },
        {
            "folder": "non-orbital disease",
            "train": [
                "This image depicts a single eye from an individual suffering from a non-orbital "
                "disease, showing symptoms unrelated to the eye or orbital area.",
                "The single eye in this photograph belongs to a person affected by a non-orbital "
                "disease, with evident health issues that do not involve the eye region.",
                "In this diagnostic image, the depicted symptoms are of a non-orbital disease, "
                "impacting areas of the body other than the orbital region, with the single eye "
                "shown being unrelated.",
                "non-orbital eye disease",
            ],
            "eval": ["non-orbital disease"],
        },
    ],
}


@dataclass(frozen=True)
class ClassPrompts:
    """One class: its folder name (the label) and its training and evaluation prompts."""

    folder: str
    train: tuple
    eval: tuple


class PromptSetError(ValueError):
    """A prompt file that does not follow the schema; the message names the file and the fault."""


def parse_prompt_set(data, source="prompt set"):
    """Validate a prompt-set dict and return a list of ClassPrompts in file order."""
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise PromptSetError(f"{source}: expected an object with a 'classes' list")
    classes, seen = [], set()
    for i, entry in enumerate(data["classes"]):
        where = f"{source}: classes[{i}]"
        if not isinstance(entry, dict):
            raise PromptSetError(f"{where}: expected an object with folder, train, eval")
        folder = entry.get("folder")
        if not isinstance(folder, str) or not folder.strip() or "/" in folder:
            raise PromptSetError(f"{where}: 'folder' must be a non-empty folder name")
        if folder in seen:
            raise PromptSetError(f"{where}: folder {folder!r} is listed twice")
        seen.add(folder)
        lists = {}
        for key in ("train", "eval"):
            value = entry.get(key)
            if not isinstance(value, list) or not value or not all(
                isinstance(p, str) and p.strip() for p in value
            ):
                raise PromptSetError(f"{where} ({folder}): '{key}' must be a non-empty list of strings")
            lists[key] = tuple(value)
        classes.append(ClassPrompts(folder, lists["train"], lists["eval"]))
    if len(classes) < 2:
        raise PromptSetError(f"{source}: at least two classes are needed, found {len(classes)}")
    return classes


def read_json_file(path, error, what):
    """The parsed JSON of the file at `path`, or `error` (an exception class) naming the file:
    'no such <what>', or why it is not readable JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not a readable JSON file ({err})") from None


def load_prompt_set(path=None):
    """The published prompt set, or the one in the JSON file at `path`."""
    if path is None:
        return parse_prompt_set(PAPER_PROMPT_SET, "published prompt set")
    return parse_prompt_set(read_json_file(path, PromptSetError, "prompt file"), str(path))


def prompt_set_to_dict(classes):
    """Plain-data form (for checkpoints and args.json); `parse_prompt_set` reads it back."""
    return {"classes": [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(c).items()}
                        for c in classes]}


def class_folders(classes):
    """Folder names in class-index order."""
    return [c.folder for c in classes]


def sample_train_captions(labels, classes, rng):
    """One training prompt drawn at random for each label.

    Args:
        labels: class indices, one per image in the batch.
        classes: list of ClassPrompts.
        rng: a `random.Random`, so the draw is reproducible from the seed.
    """
    return [rng.choice(classes[int(y)].train) for y in labels]


def unique_captions(captions):
    """Distinct captions in first-seen order and, per caption, its index in that list."""
    index, uniques = {}, []
    for caption in captions:
        if caption not in index:
            index[caption] = len(uniques)
            uniques.append(caption)
    return uniques, [index[c] for c in captions]


def new_rng(seed):
    """A private random generator (the global `random` state is left alone)."""
    return random.Random(seed)


# ----------------------------------------------------------------------------------------------
# Free-text answers (a chat model's, a reader's) to class folders: inference.py --label-map


class LabelMapError(ValueError):
    """A label map that does not fit the classes; the message names the file and the fault."""


def normalise_answer(text):
    """The form answers are matched in: case-folded, whitespace runs as one space, stripped, and a
    trailing full stop dropped ('Thyroid  Eye Disease.' -> 'thyroid eye disease'); '' for a
    missing answer (None or NaN from an empty CSV cell)."""
    if not isinstance(text, str):
        return ""
    return " ".join(text.casefold().split()).rstrip(".").strip()


def parse_label_map(data, folders, source="label map"):
    """{normalised answer: folder} from `{folder: [synonym, ...]}`; every folder also answers to
    its own name. A key that is not a class, a synonym of two classes or a non-string is refused:
    a guessed mapping would silently move answers between classes. The OUTCOMES_KEY entry
    (answers outside the classes) is checked by `parse_outcomes` and left out of the lookup."""
    if not isinstance(data, dict):
        raise LabelMapError(f"{source}: expected an object {{folder: [synonym, ...]}}")
    lookup = {normalise_answer(folder): folder for folder in folders}
    if OUTCOMES_KEY in data and OUTCOMES_KEY not in folders:
        parse_outcomes(data, folders, source)
    for folder, synonyms in data.items():
        if folder == OUTCOMES_KEY and folder not in folders:
            continue
        if folder not in folders:
            raise LabelMapError(f"{source}: label map names {folder!r}, not a class of {list(folders)}")
        synonyms = [synonyms] if isinstance(synonyms, str) else synonyms
        if not isinstance(synonyms, list) or not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise LabelMapError(f"{source}: {folder!r} must map to a list of non-empty strings")
        for synonym in synonyms:
            key = normalise_answer(synonym)
            if not key:  # '...' would make every empty answer this class
                raise LabelMapError(f"{source}: {folder!r}: synonym {synonym!r} is empty once "
                                    "case, spaces and punctuation are dropped")
            if lookup.get(key, folder) != folder:
                raise LabelMapError(f"{source}: label map answer {synonym!r} names two classes "
                                    f"({lookup[key]!r} and {folder!r})")
            lookup[key] = folder
    return lookup


# A label map's declared answers outside the classes ("none of these", "not orbital"): an
# outcome a reader can give, counted as a miss of the true class, never as a class
OUTCOMES_KEY = "outcomes"


def parse_outcomes(data, folders, source="label map"):
    """{normalised answer: outcome name} of a label map's `"outcomes": {name: [answer, ...]}`
    ({} without one); each outcome also answers to its own name. An outcome named like a class,
    or an answer that also names a class or another outcome, is refused."""
    outcomes = data.get(OUTCOMES_KEY) if isinstance(data, dict) and OUTCOMES_KEY not in folders else None
    if outcomes is None:
        return {}
    if not isinstance(outcomes, dict):
        raise LabelMapError(f"{source}: {OUTCOMES_KEY!r} must be an object {{outcome: [answer, ...]}}, "
                            'e.g. {"not orbital": ["no orbital disease", "none of these"]}')
    classes = {normalise_answer(folder): folder for folder in folders}
    for folder, synonyms in data.items():
        # a plain string is one synonym here as in parse_label_map: the scorer maps it to the class
        synonyms = [synonyms] if isinstance(synonyms, str) else synonyms
        if folder != OUTCOMES_KEY and isinstance(synonyms, list):
            classes.update({normalise_answer(s): folder for s in synonyms if isinstance(s, str)})
    lookup = {}
    for name, answers in outcomes.items():
        if not normalise_answer(name):  # '' or '.': every blank answer would become this outcome
            raise LabelMapError(f"{source}: outcome {name!r} has an empty name once case, spaces "
                                "and punctuation are dropped; name it, e.g. \"not orbital\"")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) and normalise_answer(a) for a in answers):
            raise LabelMapError(f"{source}: outcome {name!r} must map to a list of non-empty strings")
        for answer in [name, *answers]:
            key = normalise_answer(answer)
            if key in classes:
                raise LabelMapError(f"{source}: outcome {name!r}: {answer!r} names the class "
                                    f"{classes[key]!r}; an outcome is an answer outside the classes")
            if lookup.get(key, name) != name:
                raise LabelMapError(f"{source}: {answer!r} names two outcomes ({lookup[key]!r} and {name!r})")
            lookup[key] = name
    return lookup


def load_label_map(path, folders, with_outcomes=False):
    """The lookup of `parse_label_map` from a JSON file; with `with_outcomes`, the pair
    (lookup, `parse_outcomes`'s {answer: outcome}) from the one read of the file."""
    data = read_label_map_file(path)
    lookup = parse_label_map(data, folders, str(path))
    return (lookup, parse_outcomes(data, folders, str(path))) if with_outcomes else lookup


def read_label_map_file(path):
    """The JSON object of a label-map file ({folder: [synonym, ...]}), unchecked."""
    return read_json_file(path, LabelMapError, "label map file")


def map_answer(text, lookup):
    """The folder an answer names, or None (no match, an empty answer, a refusal such as
    'I cannot determine'): never the nearest class."""
    return lookup.get(normalise_answer(text)) or None


def default_class_order(found):
    """(folders, how): the project's classes in the published prompt set's order when every folder
    found is one of them (so 'orbital disease', its index 0, stays the rare class: sort order
    would make 'healthy eyes' rare), else sorted by name."""
    published = class_folders(load_prompt_set(None))
    if found and set(found) <= set(published):
        return [name for name in published if name in found], "the published prompt set's order"
    return sorted(found), "sorted by name"


def order_classes(found, requested=None):
    """Class folders in index order: `requested` (the --classes list, which must name exactly the
    folders found), else `default_class_order`.

    Raises ValueError naming the folders missing from or foreign to `requested`.
    """
    found = list(found)
    if requested is None:
        return default_class_order(found)[0]
    requested = [name.strip() for name in requested]
    missing = [name for name in found if name not in requested]
    extra = [name for name in requested if name not in found]
    if missing or extra or len(set(requested)) != len(requested):
        parts = ([f"missing {missing}"] if missing else []) + ([f"not found {extra}"] if extra else [])
        raise ValueError("--classes must list each class folder once ("
                         + ("; ".join(parts) or "a name is repeated") + f"; the folders: {sorted(found)})")
    return requested
