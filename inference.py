"""Evaluate an OpenCLIP model on an external cohort, with the statistics a journal asks for
(STARD 2015, TRIPOD+AI 2024, CLAIM 2024).

Each class is one embedding: the mean of the normalised text embeddings of its evaluation prompts
(a prompt ensemble). An image's class probabilities are the softmax of its scaled cosine
similarities to those embeddings. Labels are the class folder names, matched by name (never by
sort order); a test folder without class folders is predicted but not scored. An unreadable image
keeps its row in predictions.csv with a `failed: <reason>` status, is left out of the metrics and
counted in the flow table and in the intention-to-diagnose line of the report.

--checkpoint takes a checkpoint written by clip_train.py (architecture, classes, prompts, the
validation operating threshold and temperature come from it), a plain open_clip state_dict as the
published code saved it (--model-name required), or an open_clip pretrained tag for the zero-shot
baseline (--model-name required). --test-dir takes class folders, images without class folders,
or a manifest.csv of data_preprocess.py (rows of --split, default test; its `group` column makes
the bootstrap resample patients, not images):

    $ python inference.py --test-dir external_cohort \\
          --checkpoint clip_model_checkpoints/clip_model_epoch_best.pt
    $ python inference.py --test-dir splits/manifest.csv --checkpoint best.pt \\
          --baseline datacomp_s34b_b86k --output-dir results_vs_zero_shot --cache-dir emb_cache
    $ python inference.py --test-dir external_cohort --checkpoint best.pt \\
          --compare resnet50=runs/resnet50/predictions.csv --metadata meta.csv --subgroups site
    $ python inference.py --test-dir external_cohort --checkpoint best.pt \\
          --wise-ft-alpha 0 0.25 0.5 0.75 1 --output-dir wise_ft --anonymize-paths
    $ python inference.py --test-dir subtypes --predictions image=step1.csv \\
          --compare image+symptoms=step2.csv --label-map label_map.json   # answers, no model

Writes into --output-dir: predictions.csv, metrics.json, per_class_metrics.csv,
classification_report.txt, confusion_matrix.csv, roc_curves, pr_curves, calibration,
prob_histograms and confusion_matrix figures (.png and .pdf), report.md (one page that maps each
output to the checklist item it serves, with a failure analysis whose thumbnails go to
failure_analysis/), args.json; with --baseline or --compare NAME=FILE (other
models' or readers' predictions) also comparison.csv and comparison.png (and with --baseline
baseline_predictions.csv); with --subgroups site,sex (--metadata FILE.csv) subgroups.csv and
subgroups.png; with --wise-ft-alpha one wise_ft_alpha_<a>/ folder of all of these per
alpha and wise_ft_summary.csv. With --predictions FILE (answers, no model) the same files that need
no model (ROC and calibration only with prob_ columns); its --compare files are later steps of the
same reader: sequential.csv, sequential_changes.csv, sequential.png and a step<k>_<name>/ folder
per step.
"""

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import re
import secrets
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from sklearn.metrics import classification_report
from tqdm import tqdm

import common
import prompts as prompt_sets
from metrics import (CONFIDENCE_LEVEL, DEFAULT_BOOTSTRAP, DEFAULT_ECE_BINS, DEFAULT_SEED, ComparedModel,
                     compare_predictions, compute_metrics, finite_or_none, format_p, intention_to_diagnose,
                     interval_levels, label_probs, operating_point_metrics, rule_predictions,
                     sequential_analysis, softmax, subgroup_analysis, without_probability_metrics)
from report import (FIGURE_NAMES, comparison_frame, confusion_frame, flow_counts, format_value,
                    most_confident_errors, per_class_frame, plot_comparison, plot_confusion_matrices,
                    plot_sequential, plot_subgroups, predictions_frame, relative_path, render_report,
                    resample_notes, sequential_changes_frame, sequential_frame, subgroups_frame,
                    write_figures)

LOG = logging.getLogger("inference")
DEFAULT_OUTPUT_DIR = "inference_results"
DEFAULT_BATCH_SIZE = 64
DEFAULT_SPLIT = "test"  # manifest rows evaluated when --test-dir is a manifest.csv
CACHE_VERSION = 1  # bump when what a cached embedding means changes
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
DEFAULT_FAILURE_EXAMPLES = 3  # most confident errors per true class in report.md's failure analysis
FAILURE_DIR = "failure_analysis"  # their thumbnails
THUMBNAIL_PX = 160  # longer side of a thumbnail
OUTPUT_NAMES = ("predictions.csv", "baseline_predictions.csv", "metrics.json",
                "per_class_metrics.csv", "comparison.csv", "classification_report.txt",
                "confusion_matrix.csv", "report.md", "args.json", "wise_ft_summary.csv",
                "sequential.csv", "sequential_changes.csv", "subgroups.csv",
                *(f"{name}.{ext}" for name in (*FIGURE_NAMES, "comparison", "sequential", "subgroups")
                  for ext in ("png", "pdf")))



# ----------------------------------------------------------------------------------------------
# Records passed between the stages


@dataclasses.dataclass
class Checkpoint:
    """A resolved --checkpoint or --baseline."""
    kind: str  # 'ours' (clip_train.py), 'state_dict' (plain open_clip weights) or 'tag'
    spec: str  # the path or pretrained tag as given
    data: dict | None  # the loaded file; None for a tag
    sha256: str | None  # of the file; None for a tag


@dataclasses.dataclass
class Cohort:
    """The evaluated images."""
    items: list  # [(path, class index)], -1 where unlabelled
    labelled: bool  # False: no class folders, predicted but not scored
    root: Path  # paths in predictions.csv are relative to it
    split: str | None = None  # manifest split evaluated
    groups: list | None = None  # patient of each image (bootstrap unit), None: each image its own
    group_source: str | None = None


@dataclasses.dataclass
class ModelBundle:
    """Everything needed to score one model and to describe it in the outputs."""
    checkpoint: Checkpoint
    model_name: str
    model: torch.nn.Module
    preprocess: object  # evaluation transform
    tokenizer: object
    classes: list  # prompts.ClassPrompts, index order = class index
    folders: list
    prompt_source: str
    logit_scale_mode: str  # 'exp' or 'published-log'
    operating: dict  # rare-class operating point: class, rare_index, threshold, source, ...
    temperature: float | None  # fitted on validation by clip_train.py
    temperature_source: str
    weights_id: str  # checkpoint SHA-256 or tag:<tag>
    cache_key: str  # of the embedding cache
    wise_ft_alpha: float | None = None
    wise_ft_base: str | None = None


@dataclasses.dataclass
class WiseFT:
    """The two weight sets WiSE-FT interpolates."""
    base: dict  # state_dict
    tuned: dict
    label: str  # how the base is named in the report
    identity: str  # SHA-256 or tag:<tag>, part of the cache key


@dataclasses.dataclass
class Scores:
    """One model's output on the cohort."""
    logits: np.ndarray  # (N, C) float64, NaN rows where unreadable
    statuses: list  # 'ok' or 'failed: <reason>' per image


@dataclasses.dataclass
class Setup:
    """What `prepare` loads before any output is written."""
    cohort: Cohort
    model: ModelBundle
    baseline: ModelBundle | None
    wise: WiseFT | None
    anonymize: object  # text -> pseudonym, or None
    argv: list = dataclasses.field(default_factory=list)  # the command line, for args.json
    compare: dict = dataclasses.field(default_factory=dict)  # --compare name -> ExternalPredictions
    subgroups: dict | None = None  # --subgroups attribute -> level per cohort image
    overlap: dict | None = None  # test images also in the checkpoint's train/val (training_overlap)

# ----------------------------------------------------------------------------------------------
# Privacy


def make_anonymizer(salt):
    """text -> hex SHA-256 of salt + text: the same file gets the same pseudonym within a run (or
    across runs sharing --anonymize-salt), and the salt is never written anywhere."""
    prefix = salt.encode("utf-8") + b"\x00"
    return lambda text: hashlib.sha256(prefix + str(text).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Loading: checkpoint, model, prompts, images


def checkpoint_kind(data):
    """'ours' (state_dict + metadata), 'state_dict' (plain weights), or None."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        ours = str(data.get("format", "")).startswith("orbital-clip/") or "model_name" in data
        return "ours" if ours else "state_dict"
    if isinstance(data, dict) and data and all(torch.is_tensor(v) for v in data.values()):
        return "state_dict"
    return None


def resolve_checkpoint(spec, flag="--checkpoint"):
    """The Checkpoint of a checkpoint file or an open_clip pretrained tag; an hf-hub:ORG/REPO or
    local-dir:PATH model counts as a tag (zero-shot weights named, not a file), with the SHA-256 of
    a local-dir's weights file."""
    if common.model_source(spec):
        return resolve_source_model(spec, flag)
    path = Path(spec)
    if path.is_file():
        try:
            data = common.load_checkpoint_file(path)
        except common.CheckpointError as err:  # e.g. refused: it would unpickle arbitrary objects
            raise common.CheckpointError(f"{flag} {err}") from None
        kind = checkpoint_kind(data)
        if kind is None:
            raise common.CheckpointError(f"{flag} {path}: holds no model state_dict (expected a "
                                         "checkpoint of clip_train.py or a plain open_clip state_dict)")
        return Checkpoint(kind, str(path), data, common.file_sha256(path))
    if path.exists():
        raise common.CheckpointError(f"{flag} {path}: is a folder, not a checkpoint file")
    if looks_like_file(spec):
        raise common.CheckpointError(f"{flag} {path}: no such checkpoint file")
    return Checkpoint("tag", str(spec), None, None)


def resolve_source_model(spec, flag):
    """The checkpoint record of an hf-hub:/local-dir: model (a local-dir is checked here)."""
    sha256 = None
    if common.model_source(spec) == "local-dir":
        try:
            common.read_model_config(spec)
            sha256 = common.file_sha256(common.local_dir_weights(spec))
        except ValueError as err:
            raise common.CheckpointError(f"{flag} {err}") from None
    return Checkpoint("tag", str(spec), None, sha256)


def looks_like_file(spec):
    """A weights spec meant as a file (a weights suffix or a folder part), not a pretrained tag."""
    path = Path(spec)
    return path.suffix.lower() in WEIGHT_SUFFIXES or len(path.parts) > 1


def requested_model_name(args):
    """--model-name, or the --model-config stem (registered with open_clip on the way)."""
    config_name = None
    if args.model_config:
        config_name, _config = common.register_model_config(args.model_config)
        if args.model_name and args.model_name != config_name:
            raise ValueError(f"--model-name {args.model_name} differs from the --model-config "
                             f"architecture {config_name}")
    return args.model_name or config_name


def resolve_model_name(requested, checkpoint, flag="--model-name", role="--checkpoint"):
    """The architecture: the checkpoint's own, else `requested` (the value of `flag`)."""
    if common.model_source(checkpoint.spec) and checkpoint.kind == "tag":  # hf-hub:/local-dir:
        if requested and requested != checkpoint.spec:
            raise ValueError(f"{flag} {requested}: {role} {checkpoint.spec} brings its own "
                             f"architecture; leave {flag} out")
        return checkpoint.spec
    if checkpoint.kind != "ours":
        if not requested:
            what = "a pretrained tag" if checkpoint.kind == "tag" else "a plain state_dict"
            raise ValueError(f"{flag} is required: {role} {checkpoint.spec} is {what} "
                             "without architecture metadata (e.g. --model-name ViT-B-32-256)")
        return requested
    data = checkpoint.data
    name = data.get("model_name")
    if not isinstance(name, str) or not name:
        raise common.CheckpointError(f"{checkpoint.spec}: metadata lacks the model_name")
    if requested and requested != name:
        raise ValueError(f"{flag} {requested} differs from the architecture {name} stored in "
                         f"{checkpoint.spec}; leave {flag} out to use the checkpoint's")
    if isinstance(data.get("model_config"), dict):
        common.register_model_config_dict(name, data["model_config"])
    return name


def load_weights(model, model_name, checkpoint):
    """Load a file checkpoint's state_dict into the model, with a clear error when it does not fit."""
    data = checkpoint.data
    common.load_weights_into(model, data["state_dict"] if "state_dict" in data else data,
                             checkpoint.spec, model_name)


def eval_transform(model, model_name, pretrained, default):
    """The evaluation transform the weights were trained with: the pretrained tag's mean, std and
    resizing when the checkpoint names a tag (as clip_train.py used), else `default`."""
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if isinstance(pretrained, str) else {}
    base = getattr(model.visual, "preprocess_cfg", None)
    if not tag_cfg or base is None:
        return default
    return image_transform_v2(PreprocessCfg(**merge_preprocess_dict(base, tag_cfg)), is_train=False)


def build_model(model_name, checkpoint, device, flag="--checkpoint"):
    """(model in eval mode, evaluation transform, tokenizer) for a checkpoint file or a tag."""
    spec = checkpoint.spec
    if checkpoint.kind == "tag":
        if model_name in open_clip.list_models():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if spec not in tags:
                raise common.CheckpointError(f"{flag} {spec}: not a file, nor a pretrained tag of "
                                             f"{model_name} (its tags: {', '.join(tags) or 'none'})")
        try:
            model, _train_tf, preprocess, tokenizer = common.create_model(model_name, spec, device)
        except common.MissingPackageError as err:
            raise common.CheckpointError(f"{flag} {err}") from None
        except (RuntimeError, OSError, ValueError) as err:
            raise common.CheckpointError(f"{flag} {spec}: could not load the pretrained weights "
                                         f"of {model_name} ({str(err).strip().splitlines()[0][:300]}); "
                                         "offline, pass a local weights file") from None
        return model.eval(), preprocess, tokenizer
    # Our checkpoints rebuild from their recorded architecture and preprocessing: an hf-hub: or
    # local-dir: model needs neither the Hub nor the folder any more.
    data = checkpoint.data if checkpoint.kind == "ours" else {}
    config = data.get("model_config") if isinstance(data.get("model_config"), dict) else None
    preprocess_cfg = data.get("preprocess_cfg") if isinstance(data.get("preprocess_cfg"), dict) else None
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; weights follow
    try:
        model, _train_tf, preprocess, tokenizer = common.create_model(
            model_name, None, device, model_config=config, preprocess_cfg=preprocess_cfg)
    except ValueError as err:  # e.g. a missing optional package, a local-dir that is gone
        raise common.CheckpointError(f"{flag} {err}") from None
    finally:
        logging.disable(logging.NOTSET)
    load_weights(model, model_name, checkpoint)
    pretrained = checkpoint.data.get("pretrained") if checkpoint.kind == "ours" else None
    return model.eval(), eval_transform(model, model_name, pretrained, preprocess), tokenizer


def load_classes(prompts_path, checkpoint):
    """(classes, source): --prompts, else the checkpoint's stored prompt set, else the published one."""
    data = checkpoint.data if checkpoint.kind == "ours" else {}
    stored = data.get("class_folders")
    if prompts_path:
        try:
            classes = prompt_sets.load_prompt_set(prompts_path)
        except prompt_sets.PromptSetError as err:
            raise prompt_sets.PromptSetError(f"--prompts {err}") from None
        source = f"--prompts {prompts_path}"
        if stored and list(stored) != prompt_sets.class_folders(classes):
            LOG.warning("--prompts classes %s differ from the checkpoint's %s",
                        prompt_sets.class_folders(classes), list(stored))
        return classes, source
    if data.get("prompts"):
        where = f"{checkpoint.spec} (stored prompts)"
        return prompt_sets.parse_prompt_set(data["prompts"], where), f"stored in {checkpoint.spec}"
    classes = prompt_sets.load_prompt_set(None)
    if stored and list(stored) != prompt_sets.class_folders(classes):
        raise common.CheckpointError(f"{checkpoint.spec}: trained on classes {list(stored)} but "
                                     "stores no prompts; pass them with --prompts")
    return classes, "published prompt set"


def collect_items(test_dir, folders, output_dir):
    """(items, labelled): class-folder images with their class index, or, when no class folder
    exists, every image under test_dir with label -1 (predicted, not scored)."""
    test_dir, output_dir = Path(test_dir), Path(output_dir).resolve()
    items, unknown = common.list_class_folder_images(test_dir, folders)
    unknown = [name for name in unknown if (test_dir / name).resolve() != output_dir]
    known = [folder for folder in folders if (test_dir / folder).is_dir()]
    if known:
        if unknown:
            raise common.CohortError(
                f"--test-dir {test_dir}: folder(s) {', '.join(repr(u) for u in unknown)} are not classes of "
                f"this model {folders}; move them out, or pass --prompts defining them")
        if not items:
            raise common.CohortError(f"--test-dir {test_dir}: no images in the class folders {known}")
        return items, True
    items = [(path, -1) for path in sorted(test_dir.rglob("*"))
             if path.is_file() and common.is_candidate_image(path)
             and output_dir not in path.resolve().parents
             and not any(part.startswith(".") for part in path.relative_to(test_dir).parts)]
    if not items:
        raise common.CohortError(f"--test-dir {test_dir}: no images found (and no class folders {folders})")
    if unknown:
        LOG.warning("--test-dir %s: none of the class folders %s, only %s: every image is predicted, "
                    "not scored (rename the folders to score them, or pass --prompts defining them)",
                    test_dir, folders, unknown)
    return items, False




def training_overlap(checkpoint, cohort, test_spec):
    """Test images that are also training or validation images of the checkpoint (same file
    or same bytes), from the folders or manifest its metadata records: {"train": n, "val": n,
    "unchecked": [splits whose images could not be listed], "independent_test_set": False when
    any overlap, None when nothing or not everything could be checked, else True}; None for a
    plain state_dict or a tag (no record of where it was trained)."""
    data = checkpoint.data if checkpoint.kind == "ours" else None
    if not isinstance(data, dict):
        return None
    recorded, args = data.get("data") or {}, data.get("args") or {}
    folders = data.get("class_folders") or []
    test_paths = [path for path, _label in cohort.items]
    result = {"train": 0, "val": 0, "unchecked": []}
    for split in ("train", "val"):
        spec = recorded.get(f"{split}_dir") or args.get(f"{split}_dir")
        try:
            items = common.load_labelled_items(spec, folders, split, recorded.get("fold", args.get("fold")))
        except (TypeError, ValueError, OSError):  # not recorded, moved, or unreadable
            result["unchecked"].append(split)
            continue
        known = {**common.manifest_sha256(test_spec), **common.manifest_sha256(spec)}
        result[split] = len(common.overlapping_images(test_paths, [p for p, _ in items], known))
    overlapping = result["train"] + result["val"] > 0
    result["independent_test_set"] = False if overlapping else (None if result["unchecked"] else True)
    if overlapping:
        LOG.warning("--test-dir %s is not an independent test set: %d of its %d images are training "
                    "and %d validation images of --checkpoint %s", test_spec, result["train"],
                    len(test_paths), result["val"], checkpoint.spec)
    return result


def stored_calibration(checkpoint, folders, threshold=None):
    """(operating point dict, temperature or None, temperature source) for one evaluated model.

    The threshold and the temperature were fitted on the VALIDATION split by clip_train.py and
    are never re-fitted here; `threshold` (--threshold) overrides the stored one (source 'user').
    """
    data = checkpoint.data if checkpoint.kind == "ours" else {}
    stored = data.get("operating_point") if isinstance(data.get("operating_point"), dict) else {}
    rare = stored.get("class") if stored.get("class") in folders else folders[0]
    operating = {"class": rare, "rare_index": folders.index(rare)}
    value = stored.get("threshold")
    if stored.get("class") not in (None, rare):  # a threshold of a class not evaluated here
        value = None
    if threshold is not None:
        operating.update(threshold=float(threshold), source="user (--threshold)")
    elif isinstance(value, (int, float)) and math.isfinite(value):
        operating.update(threshold=float(value), source="validation",
                         target_sensitivity=stored.get("target_sensitivity"),
                         val_sensitivity=finite_or_none(stored.get("val_sensitivity", float("nan"))),
                         val_specificity=finite_or_none(stored.get("val_specificity", float("nan"))))
    else:
        operating.update(threshold=None, source="the checkpoint stores no validation threshold")
    temperature = data.get("temperature")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        return operating, None, "the checkpoint stores no validation temperature"
    return operating, float(temperature), "validation (clip_train.py)"


def calibration_mismatch(checkpoint, classes, logit_scale_mode):
    """How the evaluated softmax differs from the one the checkpoint's validation threshold and
    temperature were fitted under (a list of phrases; empty when it is the same): another logit
    scale mode (--logit-scale-mode), another class set or other evaluation prompts (--prompts).
    Each changes every probability, so the stored threshold and temperature no longer apply."""
    data = checkpoint.data if checkpoint.kind == "ours" else {}
    changed = []
    stored_mode = data.get("logit_scale_mode") or "exp"
    if logit_scale_mode != stored_mode:
        changed.append(f"logit scale {stored_mode!r} (evaluated: {logit_scale_mode!r})")
    folders = prompt_sets.class_folders(classes)
    stored_folders = data.get("class_folders")
    if stored_folders and list(stored_folders) != folders:
        changed.append(f"classes {list(stored_folders)} (evaluated: {folders})")
    elif isinstance(data.get("prompts"), dict):
        try:
            stored = prompt_sets.parse_prompt_set(data["prompts"], checkpoint.spec)
        except prompt_sets.PromptSetError:
            stored = None
        if stored is not None and {c.folder: list(c.eval) for c in stored} != {
                c.folder: list(c.eval) for c in classes}:
            changed.append("other evaluation prompts (evaluated: --prompts)")
    return changed


def read_manifest_groups(manifest):
    """({resolved path: group}, sorted splits) of a manifest.csv; every group is '' when the
    column does not name patients (then the bootstrap resamples images)."""
    manifest = Path(manifest)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    patient_groups, reason = common.manifest_patient_groups(rows)
    if patient_groups is None:
        log = LOG.warning if reason == common.STEM_GROUPS_REASON else LOG.info
        log("%s: %s; the bootstrap resamples images", manifest, reason)
        patient_groups = [""] * len(rows)
    groups = {str((manifest.parent / row.get("path", "")).resolve()): group
              for row, group in zip(rows, patient_groups)}
    return groups, sorted({row.get("split", "") for row in rows})


def regex_groups(items, root, pattern):
    """Group of each image: the first capture group of `pattern` searched in its file name
    (as data_preprocess.py --group-regex); a file that does not match is its own group."""
    compiled = re.compile(pattern)
    groups = []
    for path, _label in items:
        match = compiled.search(Path(path).name)
        groups.append(match.group(1) if match and match.group(1) else f"image:{relative_path(path, root)}")
    return groups


def collect_cohort(args, folders):
    """The evaluated images (--test-dir, --split, --group-regex) as a Cohort."""
    spec = Path(args.test_dir)
    if spec.is_file() and spec.suffix.lower() != ".csv":  # a single image: predicted, not scored
        cohort = Cohort([(spec, -1)], False, spec.parent)
    elif spec.is_file():
        split = args.split or DEFAULT_SPLIT
        manifest_groups, splits = read_manifest_groups(spec)
        if split not in splits:
            # No silent fallback to another split: evaluating val or train rows must be asked for.
            raise common.CohortError(f"--test-dir {spec}: no rows of split {split!r} (its splits: "
                                     f"{', '.join(splits) or 'none'}); pass --split to choose one")
        items = common.load_labelled_items(spec, folders, split)
        cohort = Cohort(items, True, spec.parent, split)
        groups = [manifest_groups.get(str(Path(p).resolve()), "") for p, _ in items]
        named = any(groups)
        cohort.groups = [g or f"image:{relative_path(p, spec.parent)}"
                            for g, (p, _) in zip(groups, items)] if named else None
        cohort.group_source = "manifest group column" if named else None
    else:
        items, labelled = collect_items(spec, folders, args.output_dir)
        cohort = Cohort(items, labelled, spec)
    if args.group_regex:
        cohort.groups = regex_groups(cohort.items, cohort.root, args.group_regex)
        cohort.group_source = f"--group-regex {args.group_regex}"
    return cohort


# ----------------------------------------------------------------------------------------------
# Other models' and readers' answers (--compare NAME=FILE)


@dataclasses.dataclass
class ExternalPredictions:
    """Another model's (or reader's) answers on the cohort, in the cohort's image order."""
    source: str  # the file read
    paths: list  # cohort paths (relative, forward slashes), the order of `cohort_paths`
    pred_index: np.ndarray  # (N,) int class index in `folders`, -1 for a failed row
    probs: np.ndarray | None  # (N, C) float in `folders` order, NaN rows where failed; None: no prob_ columns
    statuses: list  # 'ok', or 'failed: <reason>' (the file's own, or 'failed: unmapped answer ...')
    answer_column: str  # 'pred_label' or 'answer'


def normalise_answer(text):
    """An answer or synonym compared case- and whitespace-insensitively ('  Orbital  Disease ');
    prompts.normalise_answer is the one rule (shared with --label-map)."""
    return prompt_sets.normalise_answer(str(text))


def normalise_relative_path(text):
    """A path cell as predictions.csv writes it: forward slashes, no leading './', no padding."""
    text = str(text).strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def answer_lookup(folders, label_map, where):
    """{normalised answer: class index}: each folder name, plus its synonyms from `label_map`
    (prompts.parse_label_map: the one home of the answer-to-folder rule)."""
    lookup = prompt_sets.parse_label_map(label_map or {}, list(folders), where)
    return {answer: folders.index(folder) for answer, folder in lookup.items()}


def read_csv_rows(path, where):
    """(header, [(line number, {column: cell})]) of a CSV file; ValueError when malformed."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise ValueError(f"{where}: row 1: empty file (expected a header with path and pred_label)")
            header = [cell.strip() for cell in header]
            if len(set(header)) != len(header):
                raise ValueError(f"{where}: row 1: a column name appears twice")
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # a blank line, e.g. a trailing newline
                if len(cells) != len(header):
                    raise ValueError(f"{where}: row {reader.line_num}: {len(cells)} fields, the "
                                     f"header has {len(header)} (a malformed CSV)")
                rows.append((reader.line_num, dict(zip(header, cells))))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{where}: not a readable UTF-8 CSV ({err})") from None
    if not rows:
        raise ValueError(f"{where}: row 2: no data rows")
    return header, rows


def external_prob_columns(header, folders, where):
    """The prob_<folder> columns in `folders` order, or None when the file has none; refused
    when only some classes have one or a prob_ column names another class (prob_cal_* of our own
    predictions.csv are ignored)."""
    named = [c for c in header if c.startswith("prob_") and not c.startswith("prob_cal_")]
    if not named:
        return None
    unknown = [c for c in named if c[len("prob_"):] not in folders]
    if unknown:
        raise ValueError(f"{where}: row 1: column {unknown[0]!r} is not a class of {folders}")
    missing = [f"prob_{f}" for f in folders if f"prob_{f}" not in header]
    if missing:
        raise ValueError(f"{where}: row 1: has prob_ columns but lacks {missing[0]!r} (give one "
                         "per class, or none)")
    return [f"prob_{f}" for f in folders]


def parse_probabilities(cells, where):
    """(C,) floats of one ok row, each finite and in [0, 1]."""
    try:
        values = np.array([float(cell) for cell in cells], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: probabilities {cells} are not all numbers") from None
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"{where}: probabilities {cells} must be numbers in [0, 1]")
    return values


def read_external_predictions(path, cohort_paths, folders, flag="--compare", label_map=None,
                              true_labels=None):
    """Read another model's or reader's answers and match them to the cohort by path.

    Signature: read_external_predictions(path, cohort_paths, folders, flag="--compare",
    label_map=None, true_labels=None) -> ExternalPredictions.

    Parameters
    ----------
    path : str or Path
        A CSV with columns `path` (as in our predictions.csv: relative to the cohort root, forward
        slashes; backslashes and a leading './' are tolerated) and `pred_label` (or `answer`);
        optional `prob_<folder>` for every class (all or none), optional `status` (a row whose
        status starts with 'failed' is a failed row: no prediction, no probabilities), optional
        `true_label` (checked against `true_labels` when both exist). Other columns are ignored.
    cohort_paths : list of str
        The cohort's images in evaluation order, written like predictions.csv's path column.
    folders : list of str
        Class folder names; class index = position.
    flag : str
        Named in every error message ('--compare NAME=', '--baseline', ...).
    label_map : dict folder -> list of str, optional
        Synonyms of each class (case- and whitespace-insensitive; the folder name always counts).
        Without it an answer must be a folder name (case- and whitespace-insensitive) or the file
        is refused; with it an empty, unmapped or refused answer becomes a failed row with status
        "failed: unmapped answer '<answer>'".
    true_labels : list of str, optional
        The cohort's true folder per image, checked against a `true_label` column.

    Returns
    -------
    ExternalPredictions (pred_index -1 and NaN probabilities on failed rows).

    Raises
    ------
    ValueError, one line naming `flag`, the file and the first offending row (row 1 = header):
    a malformed or empty file, no path or pred_label/answer column, a duplicate, extra or missing
    image, an unknown label (without `label_map`), a probability that is not a number in [0, 1],
    a true_label that differs from the cohort's.
    """
    where = f"{flag} {path}"
    lookup = answer_lookup(list(folders), label_map, where)
    header, rows = read_csv_rows(path, where)
    answer_column = next((c for c in ("pred_label", "answer") if c in header), None)
    if "path" not in header or answer_column is None:
        raise ValueError(f"{where}: row 1: needs a 'path' and a 'pred_label' (or 'answer') column, "
                         f"has {header}")
    prob_columns = external_prob_columns(header, list(folders), where)
    position = {p: i for i, p in enumerate(cohort_paths)}
    n = len(cohort_paths)
    pred_index = np.full(n, -1, dtype=np.int64)
    probs = None if prob_columns is None else np.full((n, len(folders)), np.nan)
    statuses, seen = [None] * n, {}
    for line, row in rows:
        here = f"{where}: row {line}"
        image = normalise_relative_path(row["path"])
        if image not in position:
            raise ValueError(f"{here}: image {image!r} is not in the cohort (an extra image, or "
                             "a path not relative to the test folder)")
        if image in seen:
            raise ValueError(f"{here}: image {image!r} already on row {seen[image]}")
        seen[image], i = line, position[image]
        if true_labels is not None and "true_label" in row and row["true_label"].strip() \
                and normalise_answer(row["true_label"]) != normalise_answer(true_labels[i]):
            raise ValueError(f"{here}: true_label {row['true_label']!r} of {image!r} differs from "
                             f"the cohort's {true_labels[i]!r} (predictions of another cohort?)")
        status = row.get("status", "ok").strip() or "ok"
        if status.lower().startswith("failed"):
            statuses[i] = status
            continue
        answer = row[answer_column]
        index = lookup.get(normalise_answer(answer))
        if index is None and label_map is None:
            raise ValueError(f"{here}: {answer_column} {answer!r} is not a class of {list(folders)} "
                             "(pass a label map of synonyms to count it as a failed answer)")
        if index is None:
            statuses[i] = f"failed: unmapped answer {answer.strip()!r}"
            continue
        pred_index[i], statuses[i] = index, "ok"
        if prob_columns is not None:
            probs[i] = parse_probabilities([row[c].strip() for c in prob_columns], here)
    missing = [p for p in cohort_paths if p not in seen]
    if missing:
        raise ValueError(f"{where}: no row for image {missing[0]!r} ({len(missing)} cohort "
                         "images missing); give one row per image")
    return ExternalPredictions(str(path), list(cohort_paths), pred_index, probs, statuses, answer_column)


# ----------------------------------------------------------------------------------------------
# Subgroups and sites (--metadata, --subgroups, --age-bins)

MANIFEST_OWN_COLUMNS = {"path", "source", "label", "split", "group", "sha256", "fold", "resized_px",
                        "sha256_written"}  # not patient attributes
MISSING_LEVEL = "missing"  # the level of an image whose attribute cell is empty or absent
MAX_NUMERIC_LEVELS = 10  # a numeric attribute with more distinct values needs --age-bins


def parse_bins(text):
    """--age-bins '0,40,60,120' -> [0.0, 40.0, 60.0, 120.0] (increasing), or ValueError."""
    edges = [float(part) for part in text.split(",") if part.strip()]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError("needs at least two increasing numbers, e.g. 0,40,60,120")
    return edges


def bin_label(value, edges):
    """'[40, 60)' for 45 with edges 0,40,60,120 (the last bin closed), or None outside them."""
    for i, (low, high) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        if low <= value < high or (last and value == high):
            return f"[{low:g}, {high:g}{']' if last else ')'}"
    return None


def as_number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def attribute_levels(name, values, edges, paths, where):
    """Each image's level of one attribute: empty -> 'missing'; numeric values binned by
    --age-bins (refused outside the bins, or unbinned with more than MAX_NUMERIC_LEVELS values)."""
    given = [v.strip() for v in values if v.strip()]
    numeric = bool(given) and all(as_number(v) is not None for v in given)
    if not numeric or edges is None:
        if numeric and len(set(given)) > MAX_NUMERIC_LEVELS:
            raise ValueError(f"--subgroups {name}: {where} holds {len(set(given))} numeric values; "
                             "pass --age-bins EDGES (e.g. 0,40,60,120) to group them")
        return [v.strip() or MISSING_LEVEL for v in values]
    levels = []
    for value, path in zip(values, paths):
        if not value.strip():
            levels.append(MISSING_LEVEL)
            continue
        label = bin_label(as_number(value), edges)
        if label is None:
            raise ValueError(f"--age-bins: {name} {value} of {path!r} in {where} lies outside the "
                             f"bins {edges[0]:g}-{edges[-1]:g}; widen them")
        levels.append(label)
    return levels


def metadata_table(args, cohort):
    """(where, {column: [value per cohort image]}) from --metadata (keyed by path or by file
    name) or, for a manifest --test-dir, the manifest's own extra columns."""
    paths = [relative_path(path, cohort.root) for path, _label in cohort.items]
    if args.metadata:
        where = f"--metadata {args.metadata}"
        header, rows = read_csv_rows(args.metadata, where)
        key = "path" if "path" in header else "file" if "file" in header else None
        if key is None:
            raise ValueError(f"{where}: row 1: needs a 'path' column (as in predictions.csv) or a "
                             f"'file' column of file names, has {header}")
        names = [Path(p).name for p in paths]
        if key == "file" and len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{where}: file name {twice!r} occurs twice in the cohort; give a "
                             "'path' column instead")
        lookup, seen = {}, {}
        for line, row in rows:
            cell = normalise_relative_path(row[key]) if key == "path" else row[key].strip()
            if cell in seen:
                raise ValueError(f"{where}: row {line}: {key} {cell!r} already on row {seen[cell]}")
            seen[cell], lookup[cell] = line, row
        matched = [lookup.get(p if key == "path" else Path(p).name, {}) for p in paths]
        columns = [c for c in header if c not in ("path", "file")]
    else:
        where = f"--test-dir {args.test_dir}"
        header, rows = read_csv_rows(args.test_dir, where)
        lookup = {str((Path(args.test_dir).parent / row.get("path", "")).resolve()): row for _l, row in rows}
        matched = [lookup.get(str(Path(path).resolve()), {}) for path, _label in cohort.items]
        columns = [c for c in header if c not in MANIFEST_OWN_COLUMNS]
    if not any(matched):
        raise ValueError(f"{where}: none of its rows names an image of the cohort (paths are relative "
                         "to the test folder, as in predictions.csv)")
    return where, {c: [row.get(c, "") for row in matched] for c in columns}


def cohort_subgroups(args, cohort):
    """{attribute: [level per cohort image]} of --subgroups, or None without it (ValueError: exit 2)."""
    if not args.subgroups:
        return None
    if not args.metadata and not Path(args.test_dir).is_file():
        raise ValueError("--subgroups needs --metadata FILE.csv (or a manifest.csv --test-dir with "
                         "the columns)")
    if not cohort.labelled:
        raise ValueError(f"--subgroups: {args.test_dir} has no class folders; there is nothing to score")
    where, table = metadata_table(args, cohort)
    edges = parse_bins(args.age_bins) if args.age_bins else None
    paths = [relative_path(path, cohort.root) for path, _label in cohort.items]
    attributes = {}
    for name in [n.strip() for n in args.subgroups.split(",") if n.strip()]:
        if name not in table:
            raise ValueError(f"--subgroups {name}: no such column in {where} (its columns: "
                             f"{', '.join(table) or 'none'})")
        attributes[name] = attribute_levels(name, table[name], edges, paths, where)
        missing = attributes[name].count(MISSING_LEVEL)
        if missing:
            LOG.warning("--subgroups %s: %d of %d images have no value (level '%s')", name, missing,
                        len(paths), MISSING_LEVEL)
    return attributes


# ----------------------------------------------------------------------------------------------
# Embedding cache: re-analysis (other prompts, thresholds, bootstrap sizes) without re-encoding


def cache_model_key(weights_id, model_name, preprocess, precision, extra=None):
    """Hex key of what an image embedding depends on besides the image: the weights (checkpoint
    SHA-256, pretrained tag, WiSE-FT mix), architecture, preprocessing and precision."""
    description = json.dumps({"version": CACHE_VERSION, "weights": weights_id, "model": model_name,
                              "preprocess": repr(preprocess), "precision": precision,
                              "extra": extra}, sort_keys=True)
    return hashlib.sha256(description.encode("utf-8")).hexdigest()


def image_cache_key(path):
    """Hex key of one image file: its resolved path, size and modification time (a changed or
    replaced file gets a new key; no file name is stored in the cache)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    text = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_cache(path):
    """{image key: (embedding (D,) float32, reason or '')} from a cache file ({} if none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, features, reasons = data["keys"], data["features"], data["reasons"]
    except (OSError, ValueError, KeyError) as err:
        LOG.warning("embedding cache %s unreadable (%s); re-encoding", path, err)
        return {}
    return {str(k): (features[i], str(reasons[i])) for i, k in enumerate(keys)}


def write_cache(path, entries):
    """Write {key: (embedding, reason)} atomically as .npz (no pickled objects)."""
    keys = sorted(entries)
    features = np.stack([entries[k][0] for k in keys]).astype(np.float32)
    reasons = np.array([entries[k][1] for k in keys], dtype=str)
    common.atomic_write(path, lambda handle: np.savez(handle, keys=np.array(keys, dtype=str),
                                                      features=features, reasons=reasons))


# ----------------------------------------------------------------------------------------------
# Prediction


def encode_items(model, preprocess, items, args):
    """(features (N, D) float32 normalised, ok (N,) bool, {index: reason}) by encoding images."""
    image_size_px = common.model_image_size(model)
    dataset = common.ImageListDataset(items, preprocess, min_side_px=image_size_px,
                                      image_shape=(3, image_size_px, image_size_px))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=args.device.type == "cuda", worker_init_fn=common.seed_worker)
    progress = lambda batches: tqdm(batches, desc="encoding images", unit="batch",  # noqa: E731
                                    disable=args.no_progress or None)  # None: only on a terminal
    with torch.inference_mode():
        features, ok = common.encode_image_batches(model, loader, args.device, args.precision, progress)
    ok = ok.numpy()
    return features.numpy(), ok, common.read_failures(items, np.flatnonzero(~ok).tolist())


def image_features(model, preprocess, items, args, cache_key):
    """Like `encode_items`, but with --cache-dir only the images missing from the cache (new,
    changed, or never seen with these weights and preprocessing) are read and encoded."""
    if not args.cache_dir:
        return encode_items(model, preprocess, items, args)
    path = Path(args.cache_dir) / f"embeddings_{cache_key[:32]}.npz"
    cached = read_cache(path)
    keys = [image_cache_key(item_path) for item_path, _label in items]
    todo = [i for i, key in enumerate(keys) if key is None or key not in cached]
    LOG.info("embedding cache %s: %d of %d images cached", path, len(items) - len(todo), len(items))
    fresh = {}
    if todo:
        features, ok, reasons = encode_items(model, preprocess, [items[i] for i in todo], args)
        for j, i in enumerate(todo):
            fresh[i] = (features[j], "" if ok[j] else reasons[j])
            if keys[i] is not None:
                cached[keys[i]] = fresh[i]
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        write_cache(path, cached)
    rows = [fresh[i] if i in fresh else cached[keys[i]] for i in range(len(items))]
    features = np.stack([row[0] for row in rows]).astype(np.float32)
    ok = np.array([row[1] == "" for row in rows])
    return features, ok, {i: row[1] for i, row in enumerate(rows) if row[1]}


def score_model(bundle, cohort, args):
    """The Scores of one model on the cohort: logits (N, C), NaN rows where unreadable."""
    model, items = bundle.model, cohort.items
    features, ok, reasons = image_features(model, bundle.preprocess, items, args, bundle.cache_key)
    with torch.inference_mode():
        # The classifier in fp32 whatever --precision: a few prompts, so exactness costs nothing.
        classifier = common.build_zero_shot_classifier(
            model, bundle.tokenizer, [list(c.eval) for c in bundle.classes], args.device)
        # The published code scaled by the raw log temperature; reproduce it only when asked.
        published = bundle.logit_scale_mode == "published-log"
        scale = model.logit_scale if published else model.logit_scale.exp()
        logits = common.zero_shot_logits(torch.from_numpy(features), classifier.float().cpu(),
                                         scale.float().cpu())
    logits = logits.double().numpy()  # (N, C)
    logits[~ok] = np.nan
    statuses = ["ok" if good else f"failed: {reasons[i]}" for i, good in enumerate(ok)]
    return Scores(logits, statuses)


def build_bundle(checkpoint, model_name, classes, prompt_source, args, threshold=None,
                 flag="--checkpoint"):
    """Everything needed to score one model: weights loaded, transform, tokenizer, classes,
    logit scale mode, stored operating point and temperature, and its cache key."""
    model, preprocess, tokenizer = build_model(model_name, checkpoint, args.device, flag)
    folders = prompt_sets.class_folders(classes)
    stored_mode = (checkpoint.data or {}).get("logit_scale_mode") if checkpoint.kind == "ours" else None
    mode = args.logit_scale_mode or stored_mode or "exp"
    operating, temperature, temperature_source = stored_calibration(checkpoint, folders, threshold)
    changed = calibration_mismatch(checkpoint, classes, mode)
    if changed and (temperature is not None or operating.get("source") == "validation"):
        note = "dropped: fitted on validation under " + "; ".join(changed)
        LOG.warning("%s %s: the stored validation threshold and temperature are not applied (%s)%s",
                    flag, checkpoint.spec, note,
                    "; --threshold is applied" if threshold is not None else "")
        temperature, temperature_source = None, note
        if threshold is None:
            operating = dict(operating, threshold=None, source=note)
    weights_id = checkpoint.sha256 or f"tag:{checkpoint.spec}"
    return ModelBundle(
        checkpoint=checkpoint, model_name=model_name, model=model, preprocess=preprocess,
        tokenizer=tokenizer, classes=classes, folders=folders, prompt_source=prompt_source,
        logit_scale_mode=mode, operating=operating,
        temperature=temperature, temperature_source=temperature_source, weights_id=weights_id,
        cache_key=cache_model_key(weights_id, model_name, preprocess, args.precision))


def prepare_baseline(args, model_name, folders):
    """The --baseline model, scored on the same images; its classes must be the same folders."""
    checkpoint = resolve_checkpoint(args.baseline, flag="--baseline")
    own_arch = checkpoint.kind == "ours" or common.model_source(checkpoint.spec)
    requested = args.baseline_model_name or (None if own_arch else model_name)
    name = resolve_model_name(requested, checkpoint, "--baseline-model-name", "--baseline")
    classes, source = load_classes(args.prompts, checkpoint)
    if set(prompt_sets.class_folders(classes)) != set(folders):
        raise ValueError(f"--baseline {args.baseline}: classes {prompt_sets.class_folders(classes)} "
                         f"differ from the model's {folders}; pass a --prompts file for both")
    return build_bundle(checkpoint, name, classes, source, args, flag="--baseline")


def wise_ft_base_weights(args, bundle):
    """(state_dict, label, identity) of the WiSE-FT base: --wise-ft-base, else the checkpoint's
    recorded `pretrained` (a local weights file or an open_clip tag)."""
    checkpoint = bundle.checkpoint
    if checkpoint.kind == "tag":
        raise ValueError(f"--wise-ft-alpha: --checkpoint {checkpoint.spec} is a pretrained tag; "
                         "WiSE-FT needs fine-tuned weights (a checkpoint file)")
    if args.wise_ft_base:
        path = Path(args.wise_ft_base)
        try:
            weights = common.load_state_dict_file(path)
        except common.CheckpointError as err:
            raise common.CheckpointError(f"--wise-ft-base {err}") from None
        return weights, f"`{path}`", common.file_sha256(path)
    pretrained = checkpoint.data.get("pretrained") if checkpoint.kind == "ours" else None
    if not pretrained:
        raise ValueError(f"--wise-ft-alpha: {checkpoint.spec} records no pretrained weights "
                         "(trained from scratch, or a plain state_dict); pass --wise-ft-base PATH")
    recorded_sha256 = checkpoint.data.get("pretrained_sha256")
    if Path(pretrained).is_file() and Path(pretrained).is_absolute():
        sha256 = common.file_sha256(pretrained)
        if recorded_sha256 and sha256 != recorded_sha256:
            raise ValueError(f"--wise-ft-alpha: {pretrained} is not the file training started from "
                             f"(SHA-256 {sha256[:12]}..., recorded {recorded_sha256[:12]}...); pass "
                             "--wise-ft-base PATH with the original weights")
        return common.load_state_dict_file(pretrained), f"`{pretrained}`", sha256
    if Path(pretrained).is_file():  # a relative path recorded before paths were made absolute
        raise ValueError(f"--wise-ft-alpha: the checkpoint records the pretrained weights as the "
                         f"relative path {pretrained}, which may be another file from this folder; "
                         "pass --wise-ft-base PATH")
    if common.model_source(pretrained):  # the hf-hub:/local-dir: model training started from
        try:
            base_model, *_ = common.create_model(pretrained, pretrained)
        except (RuntimeError, OSError, ValueError) as err:
            raise common.CheckpointError(f"--wise-ft-alpha: could not load the pretrained weights "
                                         f"{pretrained} ({str(err).strip().splitlines()[0][:200]}); "
                                         "offline, pass --wise-ft-base PATH") from None
        return common.clean_state_dict(base_model.state_dict()), f"`{pretrained}`", f"tag:{pretrained}"
    if Path(pretrained).suffix.lower() in WEIGHT_SUFFIXES or len(Path(pretrained).parts) > 1:
        raise ValueError(f"--wise-ft-alpha: the recorded pretrained weights {pretrained} are not "
                         "on this machine; pass --wise-ft-base PATH")
    try:
        base_model, *_ = common.create_model(bundle.model_name, pretrained)
    except (RuntimeError, OSError, ValueError) as err:
        raise common.CheckpointError(f"--wise-ft-alpha: could not load the pretrained weights "
                                     f"{pretrained} ({str(err).strip().splitlines()[0][:200]}); "
                                     "offline, pass --wise-ft-base PATH") from None
    weights = common.clean_state_dict(base_model.state_dict())
    return weights, f"pretrained tag {pretrained}", f"tag:{pretrained}"


def prepare_wise_ft(args, bundle):
    """The WiseFT weight pair, checked to fit each other."""
    base, label, identity = wise_ft_base_weights(args, bundle)
    tuned = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    base = {k: v for k, v in base.items() if k in tuned} if set(tuned) <= set(base) else base
    if base.keys() != tuned.keys():
        example = sorted(set(base) ^ set(tuned))[0]
        raise common.CheckpointError(f"--wise-ft-base {label}: weights do not fit architecture "
                                     f"{bundle.model_name} (e.g. key {example!r})")
    for key, value in tuned.items():
        if base[key].shape != value.shape:
            raise common.CheckpointError(f"--wise-ft-base {label}: {key} has shape "
                                         f"{tuple(base[key].shape)}, the model {tuple(value.shape)}")
    return WiseFT(base, tuned, label, identity)


def wise_ft_bundle(bundle, wise, alpha, args):
    """The bundle with its model set to (1 - alpha) * base + alpha * fine-tuned weights. The
    validation threshold and temperature belong to the fine-tuned weights: kept at alpha 1 only."""
    bundle.model.load_state_dict(common.interpolate_state_dicts(wise.base, wise.tuned, alpha))
    variant = dataclasses.replace(
        bundle, wise_ft_alpha=alpha, wise_ft_base=wise.label,
        cache_key=cache_model_key(bundle.weights_id, bundle.model_name, bundle.preprocess,
                                  args.precision, {"wise_ft_alpha": alpha, "base": wise.identity}))
    fitted = stored_wise_ft_calibration(bundle, alpha, args)
    if alpha != 1.0 and fitted:
        note = f"validation at WiSE-FT alpha {alpha:g} (clip_train.py --wise-ft-alphas)"
        temperature = fitted.get("temperature")
        ok = isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        variant.temperature = float(temperature) if ok else None
        variant.temperature_source = note
        threshold = fitted.get("threshold")
        if args.threshold is None and isinstance(threshold, (int, float)) and math.isfinite(threshold):
            variant.operating = dict(bundle.operating, threshold=float(threshold), source=note,
                                     val_sensitivity=finite_or_none(fitted.get("val_sensitivity", float("nan"))),
                                     val_specificity=finite_or_none(fitted.get("val_specificity", float("nan"))))
    elif alpha != 1.0:
        note = "fitted on validation for the fine-tuned weights (alpha 1) only"
        variant.temperature, variant.temperature_source = None, note
        if args.threshold is None:
            variant.operating = dict(bundle.operating, threshold=None, source=note)
    return variant


def stored_wise_ft_calibration(bundle, alpha, args):
    """Threshold and temperature clip_train.py validated at this WiSE-FT alpha, when the base is
    the one it used (the recorded pretrained weights, no --wise-ft-base); else None."""
    checkpoint = bundle.checkpoint
    if checkpoint.kind != "ours" or args.wise_ft_base:
        return None
    stored = (checkpoint.data or {}).get("wise_ft")
    if not isinstance(stored, dict) or stored.get("base") != "pretrained":
        return None
    fitted = (stored.get("calibration") or {}).get(str(float(alpha)))
    return fitted if isinstance(fitted, dict) else None


# ----------------------------------------------------------------------------------------------
# Outputs


def check_output_dir(output_dir, overwrite):
    """Refuse a non-empty --output-dir unless --overwrite (checked before any work is done)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"--output-dir {output_dir}: exists and is not empty; pass --overwrite to "
                         "replace its evaluation files, or choose another folder")


def clear_previous_outputs(output_dir):
    """Remove our own files of an earlier run (so no stale metrics.json outlives an unlabelled run)."""
    for name in OUTPUT_NAMES:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
    failures = Path(output_dir) / FAILURE_DIR
    for path in failures.glob("true*_*.png"):  # our thumbnails only
        path.unlink()
    if failures.is_dir() and not failures.is_symlink() and not any(failures.iterdir()):
        failures.rmdir()  # an empty folder of ours would look like a failure analysis


def write_failure_analysis(output_dir, cohort, scored, probs, n_per_class, anonymize):
    """The most confident errors per true class (report.most_confident_errors), each with a
    thumbnail in failure_analysis/ named by class index and rank (never by the file's name) and
    its path as in predictions.csv (a pseudonym with --anonymize-paths)."""
    index = np.flatnonzero(scored)  # row of each scored image in the cohort
    y_true = np.array([label for _path, label in cohort.items])[index]
    rows = most_confident_errors(y_true, probs[index], n_per_class)
    for row in rows:
        path = cohort.items[index[row.pop("index")]][0]
        rel = relative_path(path, cohort.root)
        row["file"] = anonymize(rel) if anonymize else rel
        row["thumbnail"] = f"{FAILURE_DIR}/true{row['true']}_{row['rank']}.png"
        try:
            image = common.read_image(path, THUMBNAIL_PX)
        except common.ImageReadError:  # changed on disk since it was scored
            row["thumbnail"] = None
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        (Path(output_dir) / FAILURE_DIR).mkdir(exist_ok=True)
        common.atomic_write(Path(output_dir) / row["thumbnail"],
                            lambda handle, image=image: image.save(handle, format="PNG"))
    return rows


def clear_previous_run(output_dir):
    """--overwrite: remove our files of an earlier run of either kind (plain, or WiSE-FT with its
    wise_ft_alpha_<a>/ folders), so the folder holds exactly one run's outputs afterwards; files
    we did not write are left, and a folder is removed only when nothing else is in it."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    clear_previous_outputs(output_dir)
    for folder in output_dir.glob("wise_ft_alpha_*"):
        if folder.is_dir() and not folder.is_symlink():
            clear_previous_outputs(folder)
            if not any(folder.iterdir()):
                folder.rmdir()


def package_versions():
    """The versions named in metrics.json and report.md (args.json has the whole environment)."""
    info = common.environment_info()
    return {name: info[name] for name in ("python", "torch", "open_clip", "sklearn", "numpy", "scipy")}


def checkpoint_label(checkpoint):
    """What --checkpoint named, in words, for the report."""
    source = common.model_source(checkpoint.spec) if checkpoint.kind == "tag" else None
    if source:
        return f"{source} model"
    return {"ours": "Orbital-CLIP checkpoint", "state_dict": "plain state_dict",
            "tag": "open_clip pretrained tag"}[checkpoint.kind]


def run_info(args, setup, bundle):
    """What was evaluated, recorded in metrics.json, args.json and report.md."""
    checkpoint, cohort, operating = bundle.checkpoint, setup.cohort, bundle.operating
    run = {
        "checkpoint": checkpoint.spec,
        "checkpoint_kind": checkpoint_label(checkpoint),
        "checkpoint_sha256": checkpoint.sha256,
        "model_name": bundle.model_name,
        "wise_ft_alpha": bundle.wise_ft_alpha,
        "wise_ft_base": bundle.wise_ft_base,
        "class_folders": bundle.folders,
        "rare_class": operating["class"],
        "prompts": prompt_sets.prompt_set_to_dict(bundle.classes),
        "prompt_source": bundle.prompt_source,
        "logit_scale_mode": bundle.logit_scale_mode,
        "operating_threshold": operating["threshold"],
        "operating_threshold_source": operating["source"],
        # the rule of predictions.csv's `prediction` column (argmax without a threshold)
        "decision_rule": "threshold" if args.decision_rule == "threshold"
                         and operating["threshold"] is not None else "argmax",
        "temperature": bundle.temperature,
        "temperature_source": bundle.temperature_source,
        "test_dir": "<anonymized>" if setup.anonymize else str(args.test_dir),
        "split": cohort.split,
        "independent_test_set": None if setup.overlap is None else setup.overlap["independent_test_set"],
        "test_overlap": setup.overlap,
        "group_source": cohort.group_source,
        "anonymized": bool(setup.anonymize),
        "bootstrap": args.bootstrap,
        "bootstrap_unit": "group" if cohort.groups is not None else "image",
        "seed": args.seed,
        "confidence_level": CONFIDENCE_LEVEL,
        "ece_bins": args.ece_bins,
        "ece_binning": f"{args.ece_bins} equal-width bins of the max probability, right-closed",
        "lr_ci_method": "log method (Simel 1991); 0.5 added to each cell when one is 0",
        "figures": args.figures,
        "device": str(args.device),
        "precision": args.precision,
        "versions": package_versions(),
    }
    if setup.baseline is not None:
        base = setup.baseline
        run["baseline"] = {"checkpoint": base.checkpoint.spec, "model_name": base.model_name,
                           "checkpoint_sha256": base.checkpoint.sha256}
    run["compared_models"] = compared_sources(setup)
    return run


def compared_sources(setup):
    """{comparison.csv model name: where its predictions came from} for report.md and metrics.json."""
    sources = {}
    if setup.baseline is not None:
        base = setup.baseline
        sources[f"baseline {base.checkpoint.spec}"] = (
            f"--baseline, {base.model_name}, scored here on the same images (probability columns "
            f"mapped by folder name from its class order {base.folders})")
    for name, external in setup.compare.items():
        failed = sum(status != "ok" for status in external.statuses)
        sources[name] = (f"--compare {external.source} (SHA-256 {common.file_sha256(external.source)[:16]}…; "
                         f"{'labels and probabilities' if external.probs is not None else 'labels only'}; "
                         f"{failed} rows without an answer)")
    return sources


def args_record(args, setup, run=None):
    """args.json (common.run_record): never the salt, and no test path when anonymising."""
    hidden = {"anonymize_salt": "<hidden>"}
    if setup.anonymize:
        hidden["test_dir"] = hidden["cwd"] = "<anonymized>"
    return common.run_record("inference.py", setup.argv, args, run, hidden)


def compared_models(setup, folders, baseline_scores=None):
    """ComparedModels over every cohort image: the --baseline (its probability columns mapped to
    ours by folder name, never by position) and each --compare file."""
    models = []
    if baseline_scores is not None:
        order = [setup.baseline.folders.index(folder) for folder in folders]
        base_probs = softmax(baseline_scores.logits)[:, order]  # (N, C) in our folder order
        answered = np.isfinite(base_probs).all(axis=1)
        models.append(ComparedModel(f"baseline {setup.baseline.checkpoint.spec}",
                                    np.where(answered, np.nan_to_num(base_probs).argmax(axis=1), -1),
                                    base_probs))
    for name, external in setup.compare.items():
        models.append(ComparedModel(name, external.pred_index, external.probs))
    return models


def score_labelled(bundle, scores, cohort, args, baseline_scores=None, compared=()):
    """(metrics, operating point, intention-to-diagnose, comparison) of a labelled cohort;
    `compared`: ComparedModels over every cohort image (see `compared_models`)."""
    folders, operating = bundle.folders, bundle.operating
    probs = softmax(scores.logits)
    scored = np.isfinite(probs).all(axis=1)
    labels = np.array([label for _path, label in cohort.items], dtype=np.int64)
    y_true = labels[scored]
    groups = None if cohort.groups is None else np.asarray(cohort.groups, dtype=str)[scored]
    probs_cal = softmax(scores.logits[scored], bundle.temperature) if bundle.temperature else None
    metrics = compute_metrics(y_true, probs[scored], folders, args.bootstrap, args.seed,
                              groups=groups, probs_cal=probs_cal, ece_bins=args.ece_bins)
    for note in resample_notes(metrics, folders):  # e.g. a class missing from some resamples
        LOG.warning("bootstrap: %s resamples usable (the others lacked an image of a class)", note)
    if metrics["temperature_scaled"] is not None:
        metrics["temperature_scaled"] = {"temperature": bundle.temperature,
                                         "source": bundle.temperature_source,
                                         **metrics["temperature_scaled"]}
    rare, threshold = operating["rare_index"], operating["threshold"]
    op = None
    if threshold is not None and scored.any():
        op = {key: value for key, value in operating.items() if key != "rare_index"}
        op.update(operating_point_metrics(y_true, probs[scored], rare, threshold, groups=groups,
                                          n_bootstrap=args.bootstrap, seed=args.seed))
    predicted = np.where(scored, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1)
    itd = intention_to_diagnose(labels, predicted, rare)
    if threshold is not None:  # the same line for the validation-threshold rule
        by_rule = np.where(scored, rule_predictions(np.nan_to_num(probs), rare, threshold), -1)
        itd.update(intention_to_diagnose(labels, by_rule, rare, prefix="itd_rule"))
    comparison = None
    if (baseline_scores is not None or compared) and scored.any():  # nothing to compare on otherwise
        comparison = compare_predictions(
            y_true, ComparedModel("ours", probs[scored].argmax(axis=1), probs[scored]),
            [dataclasses.replace(model, pred=model.pred[scored],
                                 probs=None if model.probs is None else model.probs[scored])
             for model in compared], rare, groups, args.bootstrap, args.seed)
    return metrics, op, itd, comparison


def score_subgroups(setup, scores, args, rare_index):
    """metrics.subgroup_analysis of --subgroups on the scored images, or None without it."""
    if not setup.subgroups:
        return None
    probs = softmax(scores.logits)
    scored = np.isfinite(probs).all(axis=1)
    labels = np.array([label for _path, label in setup.cohort.items], dtype=np.int64)
    groups = None if setup.cohort.groups is None else np.asarray(setup.cohort.groups, dtype=str)[scored]
    attributes = {name: np.asarray(levels, dtype=str)[scored] for name, levels in setup.subgroups.items()}
    return subgroup_analysis(labels[scored], probs[scored], attributes, rare_index, groups,
                             args.bootstrap, args.seed)


def write_subgroup_outputs(output_dir, subgroups, figures):
    """subgroups.csv (and subgroups.png/.pdf with `figures`)."""
    if subgroups is None:
        return
    common.atomic_write_csv(Path(output_dir) / "subgroups.csv", subgroups_frame(subgroups))
    if figures:
        plot_subgroups(subgroups, figure_saver(output_dir))


def write_scored_tables(output_dir, y_true, probs, folders, metrics, comparison, figures=False):
    """per_class_metrics.csv, classification_report.txt, confusion_matrix.csv, comparison.csv
    (and comparison.png with `figures`)."""
    common.atomic_write_csv(output_dir / "per_class_metrics.csv", per_class_frame(metrics, folders))
    report = classification_report(y_true, probs.argmax(axis=1), labels=list(range(len(folders))),
                                   target_names=folders, digits=3, zero_division=0)
    common.atomic_write_text(output_dir / "classification_report.txt", report)
    common.atomic_write_csv(output_dir / "confusion_matrix.csv",
                            confusion_frame(metrics["confusion_matrix"], folders))
    if comparison is not None:
        common.atomic_write_csv(output_dir / "comparison.csv", comparison_frame(comparison))
        if figures:
            plot_comparison(comparison, figure_saver(output_dir))


def figure_saver(output_dir):
    """save(fig, file_name, **savefig_kwargs) for report.write_figures: atomic files in output_dir."""
    def save(fig, name, **kwargs):
        common.atomic_save_figure(fig, Path(output_dir) / name, **kwargs)
    return save


def write_evaluation(output_dir, args, setup, bundle, scores, baseline_scores=None):
    """Every output file of one model into output_dir; returns metrics (None when unlabelled)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(output_dir)
    cohort, folders, anonymize = setup.cohort, bundle.folders, setup.anonymize
    probs = softmax(scores.logits)
    probs_cal = softmax(scores.logits, bundle.temperature) if bundle.temperature else None
    threshold, rare = bundle.operating["threshold"], bundle.operating["rare_index"]
    rule = rule_predictions(np.nan_to_num(probs), rare, threshold) if threshold is not None else None
    run = run_info(args, setup, bundle)
    common.atomic_write_csv(output_dir / "predictions.csv", predictions_frame(
        cohort, folders, probs, scores.statuses, probs_cal, rule, anonymize, run["decision_rule"]))
    common.atomic_write_json(output_dir / "args.json", args_record(args, setup, run))
    labels = [label for _path, label in cohort.items]
    flow = flow_counts(labels, scores.statuses, folders, cohort.labelled, cohort.groups)
    metrics = op = itd = comparison = subgroups = failures = None
    if cohort.labelled:
        compared = compared_models(setup, folders, baseline_scores)
        metrics, op, itd, comparison = score_labelled(bundle, scores, cohort, args, baseline_scores,
                                                      compared)
        n_failed = flow["rows"]["total"]["unreadable"]
        subgroups = score_subgroups(setup, scores, args, rare)
        scored = np.isfinite(probs).all(axis=1)
        if args.failure_examples and scored.any():
            failures = write_failure_analysis(output_dir, cohort, scored, probs,
                                              args.failure_examples, anonymize)
        metrics = {"n": metrics.pop("n"), "n_received": len(labels), "n_failed": n_failed, **metrics,
                   "interval_levels": interval_levels(cohort.groups is not None, args.bootstrap),
                   "operating_point": op, **itd, "flow": flow, "comparison": comparison,
                   "subgroups": subgroups, "failure_analysis": failures, **run}
        common.atomic_write_json(output_dir / "metrics.json", metrics)
        if baseline_scores is not None:
            base = setup.baseline
            order = [base.folders.index(f) for f in folders]
            common.atomic_write_csv(output_dir / "baseline_predictions.csv", predictions_frame(
                cohort, folders, softmax(baseline_scores.logits)[:, order],
                baseline_scores.statuses, anonymize=anonymize))
        if metrics["n"]:  # nothing to tabulate or draw when no image could be read
            scored = np.isfinite(probs).all(axis=1)
            y_true = np.asarray(labels)[scored]
            write_scored_tables(output_dir, y_true, probs[scored], folders, metrics, comparison,
                                args.figures)
            write_subgroup_outputs(output_dir, subgroups, args.figures)
            if args.figures:
                write_figures(figure_saver(output_dir), y_true, probs[scored],
                              None if probs_cal is None else probs_cal[scored], folders, metrics, op, rare)
    report = render_report(run, flow, metrics, folders, op, itd, comparison, subgroups, failures)
    common.atomic_write_text(output_dir / "report.md", report)
    return metrics


def rare_summary(metrics):
    """'orbital disease sensitivity 0.750 (...) specificity 0.900 (...) at p >= 0.312': the rare
    class at the stored operating point, or under argmax when there is none."""
    rare, op = metrics["rare_class"], metrics.get("operating_point")
    stats, where = ((op["rule"], f"at p >= {op['threshold']:.3f}") if op
                    else (metrics["per_class"][rare], "(argmax)"))
    return (f"{rare} sensitivity {format_value(stats['sensitivity'], stats['sensitivity_ci'])}  "
            f"specificity {format_value(stats['specificity'], stats['specificity_ci'])} {where}")


def summary_row(alpha, folder, metrics, rare_class):
    """One row of wise_ft_summary.csv."""
    row = {"alpha": alpha, "output_dir": folder, "n": None if metrics is None else metrics["n"]}
    names = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc", "log_loss", "ece")
    for name in names:
        value = None if metrics is None else metrics[name]
        ci = None if metrics is None else metrics[f"{name}_ci"]
        row.update({name: value, f"{name}_ci_low": ci[0] if ci else None,
                    f"{name}_ci_high": ci[1] if ci else None})
    for name in ("sensitivity", "specificity"):
        stats = {} if metrics is None else metrics["per_class"].get(rare_class, {})
        ci = stats.get(f"{name}_ci")
        row.update({f"rare_{name}": stats.get(name), f"rare_{name}_ci_low": ci[0] if ci else None,
                    f"rare_{name}_ci_high": ci[1] if ci else None})
    return row


def run_wise_ft(args, setup, baseline_scores):
    """One full evaluation per alpha in wise_ft_alpha_<a>/ and wise_ft_summary.csv; returns
    (statuses of the last run, list of metrics)."""
    bundle, output_dir = setup.model, Path(args.output_dir)
    rows, results, scores = [], [], None
    for alpha in args.wise_ft_alpha:
        LOG.info("== WiSE-FT alpha %g ==", alpha)
        variant = wise_ft_bundle(bundle, setup.wise, alpha, args)
        scores = score_model(variant, setup.cohort, args)
        folder = f"wise_ft_alpha_{alpha:g}"
        metrics = write_evaluation(output_dir / folder, args, setup, variant, scores, baseline_scores)
        rows.append(summary_row(alpha, folder, metrics, variant.operating["class"]))
        results.append(metrics)
    common.atomic_write_csv(output_dir / "wise_ft_summary.csv", pd.DataFrame(rows))
    common.atomic_write_json(output_dir / "args.json", args_record(args, setup))
    return scores.statuses, results


# ----------------------------------------------------------------------------------------------
# Scoring answer files without a model (--predictions [NAME=]FILE, steps with --compare)


@dataclasses.dataclass
class AnswerStep:
    """One answer file, scored as one step."""
    name: str  # the step's name (NAME= of the flag, else the file stem)
    file: str  # the answer file
    flag: str  # the flag that named the file, for messages
    answers: ExternalPredictions
    probs: np.ndarray  # (N, C): the file's probabilities, else one-hot labels; NaN rows where failed
    has_probs: bool
    sha256: str


@dataclasses.dataclass
class AnswerSetup:
    """What `prepare_answers` checks and reads before any output is written."""
    cohort: Cohort
    folders: list
    steps: list  # AnswerStep, in step order (--predictions first, then each --compare)
    anonymize: object  # text -> pseudonym, or None
    argv: list = dataclasses.field(default_factory=list)
    subgroups: dict | None = None  # --subgroups attribute -> level per cohort image


def named_file(spec):
    """(name, path) of 'NAME=FILE', or (file stem, FILE) when spec is an existing file or has no '='."""
    if "=" in spec and not Path(spec).is_file():
        name, path = spec.split("=", 1)
        return name.strip(), path
    return Path(spec).stem, spec


def cohort_class_names(test_dir, split):
    """The class folders a cohort holds: its sub-folders, or the labels of a manifest's split."""
    spec = Path(test_dir)
    if spec.is_file():
        with open(spec, newline="", encoding="utf-8") as handle:
            return sorted({row.get("label", "") for row in csv.DictReader(handle)
                           if row.get("split") == split} - {""})
    _items, found = common.list_class_folder_images(spec, [])
    return found


def step_probs(answers, n_classes, where):
    """(probs, has_probs): the file's probabilities (each ok row's most probable class must be its
    label, or the metrics would score another answer than the file gives), else one-hot labels."""
    if answers.probs is None:
        return label_probs(answers.pred_index, n_classes), False
    ok = answers.pred_index >= 0
    disagree = np.flatnonzero(ok & (np.nan_to_num(answers.probs, nan=-1.0).argmax(axis=1)
                                    != answers.pred_index))
    if disagree.size:
        raise ValueError(f"{where}: image {answers.paths[disagree[0]]!r}: its "
                         f"{answers.answer_column} is not its most probable class; give labels "
                         "that agree with the prob_ columns (or drop the prob_ columns)")
    return answers.probs, True


def read_answer_step(name, path, flag, cohort, folders, label_map):
    """One AnswerStep (the file of `flag`), matched to the cohort by path."""
    paths = [relative_path(p, cohort.root) for p, _label in cohort.items]
    true_labels = [folders[label] for _p, label in cohort.items]
    where = f"{flag} {path}"
    answers = read_external_predictions(path, paths, folders, flag, label_map, true_labels)
    probs, has_probs = step_probs(answers, len(folders), where)
    return AnswerStep(name, str(path), flag, answers, probs, has_probs, common.file_sha256(path))


def read_label_map(path, folders):
    """The --label-map file ({folder: [synonym, ...]}) checked against the classes, or None."""
    if not path:
        return None
    try:
        label_map = prompt_sets.read_label_map_file(path)
        prompt_sets.parse_label_map(label_map, folders, path)
    except prompt_sets.LabelMapError as err:
        raise ValueError(f"--label-map {err}") from None
    return label_map


def prepare_answers(args, argv):
    """Cohort, classes, label map and every answer file read and checked (ValueError/OSError)."""
    check_output_dir(args.output_dir, args.overwrite)
    split = (args.split or DEFAULT_SPLIT) if Path(args.test_dir).is_file() else None
    found = cohort_class_names(args.test_dir, split)
    if not found:
        raise ValueError(f"--test-dir {args.test_dir}: no class folders; answers are scored against "
                         "the class folders (or a manifest's labels) of the cohort")
    folders = prompt_sets.order_classes(found, args.classes.split(",") if args.classes else None)
    label_map = read_label_map(args.label_map, folders)
    cohort = collect_cohort(args, folders)
    compared, _bad, _why = parse_compare_specs(args.compare)
    specs = [(*named_file(args.predictions), "--predictions")] + [
        (name, path, f"--compare {name}=") for name, path in (compared or {}).items()]
    steps = [read_answer_step(name, path, flag, cohort, folders, label_map)
             for name, path, flag in specs]
    salt = args.anonymize_salt if args.anonymize_salt is not None else secrets.token_hex(16)
    return AnswerSetup(cohort, folders, steps, make_anonymizer(salt) if args.anonymize_paths else None,
                       argv, cohort_subgroups(args, cohort))


def answers_run_info(args, setup, step):
    """What was scored, for metrics.json, args.json and report.md (the answer-file header)."""
    cohort = setup.cohort
    return {"source": "answer file", "predictions_file": step.file,
            "predictions_sha256": step.sha256, "step": step.name,
            "steps": [s.name for s in setup.steps], "class_folders": setup.folders,
            "class_order": "--classes" if args.classes else "sorted by name",
            "rare_class": setup.folders[0], "label_map": args.label_map,
            "probabilities": step.has_probs,
            "test_dir": "<anonymized>" if setup.anonymize else str(args.test_dir),
            "split": cohort.split, "group_source": cohort.group_source,
            "anonymized": bool(setup.anonymize), "bootstrap": args.bootstrap,
            "bootstrap_unit": "group" if cohort.groups is not None else "image", "seed": args.seed,
            "confidence_level": CONFIDENCE_LEVEL, "ece_bins": args.ece_bins,
            "figures": args.figures, "versions": package_versions()}


def score_answer_step(step, setup, args):
    """(metrics, intention-to-diagnose) of one step on the rows it answered."""
    labels = np.array([label for _path, label in setup.cohort.items], dtype=np.int64)
    scored = step.answers.pred_index >= 0
    groups = None if setup.cohort.groups is None else np.asarray(setup.cohort.groups, dtype=str)[scored]
    metrics = compute_metrics(labels[scored], step.probs[scored], setup.folders, args.bootstrap,
                              args.seed, groups=groups, ece_bins=args.ece_bins)
    if not step.has_probs:
        metrics = without_probability_metrics(metrics)
    return metrics, intention_to_diagnose(labels, step.answers.pred_index, 0)


def score_answer_subgroups(setup, step, args):
    """metrics.subgroup_analysis of --subgroups on the rows a step answered, as score_subgroups
    does for a model; AUROC only where the file gives probabilities."""
    if not setup.subgroups:
        return None
    scored = step.answers.pred_index >= 0
    labels = np.array([label for _path, label in setup.cohort.items], dtype=np.int64)
    groups = None if setup.cohort.groups is None else np.asarray(setup.cohort.groups, dtype=str)[scored]
    attributes = {name: np.asarray(levels, dtype=str)[scored] for name, levels in setup.subgroups.items()}
    analysis = subgroup_analysis(labels[scored], step.probs[scored], attributes, 0, groups,
                                 args.bootstrap, args.seed)
    for row in (row for attribute in analysis for row in attribute["rows"]):
        if not step.has_probs:  # a one-hot column ranks nothing
            row.update(rare_auroc=None, rare_auroc_ci=None, macro_auroc=None, macro_auroc_ci=None)
    return analysis


def write_answer_evaluation(output_dir, args, setup, step, sequential=None):
    """Every output of one answer file that needs no model (and the sequential table, once)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(output_dir)
    cohort, folders, statuses = setup.cohort, setup.folders, step.answers.statuses
    frame = predictions_frame(cohort, folders, step.probs, statuses, anonymize=setup.anonymize)
    if not step.has_probs:  # one-hot columns would pass for probabilities
        frame = frame.drop(columns=[f"prob_{folder}" for folder in folders])
    common.atomic_write_csv(output_dir / "predictions.csv", frame)
    run = answers_run_info(args, setup, step)
    common.atomic_write_json(output_dir / "args.json", args_record(args, setup, run))
    labels = [label for _path, label in cohort.items]
    flow = flow_counts(labels, statuses, folders, True)
    metrics, itd = score_answer_step(step, setup, args)
    subgroups = score_answer_subgroups(setup, step, args) if metrics["n"] else None
    metrics = {"n": metrics.pop("n"), "n_received": len(labels),
               "n_failed": flow["rows"]["total"]["unreadable"], **metrics, "operating_point": None,
               **itd, "flow": flow, "comparison": None, "subgroups": subgroups, **run}
    if sequential is not None:
        metrics["sequential"] = sequential
        common.atomic_write_csv(output_dir / "sequential.csv", sequential_frame(sequential))
        common.atomic_write_csv(output_dir / "sequential_changes.csv", sequential_changes_frame(sequential))
    common.atomic_write_json(output_dir / "metrics.json", metrics)
    save = figure_saver(output_dir)
    if metrics["n"]:
        scored = step.answers.pred_index >= 0
        y_true, probs = np.asarray(labels)[scored], step.probs[scored]
        write_scored_tables(output_dir, y_true, probs, folders, metrics, None)
        write_subgroup_outputs(output_dir, subgroups, args.figures)
        if args.figures and step.has_probs:
            write_figures(save, y_true, probs, None, folders, metrics, None, 0)
        elif args.figures:
            plot_confusion_matrices([(f"answers: {step.name}", metrics["confusion_matrix"])], folders, save)
    if sequential is not None and args.figures:
        plot_sequential(sequential, folders, save)
    common.atomic_write_text(output_dir / "report.md",
                             render_report(run, flow, metrics, folders, None, itd, None,
                                           subgroups=subgroups, sequential=sequential))
    return metrics


def step_folder(index, name):
    """The output folder of a later step: step<k>_<name> with only safe characters."""
    return f"step{index + 1}_" + (re.sub(r"[^\w.+-]+", "_", name).strip("_") or "answers")


def run_answers(args, argv):
    """inference.py --predictions: score answer files, no model. Returns the exit code."""
    try:
        setup = prepare_answers(args, argv)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    steps, folders = setup.steps, setup.folders
    sequential = None
    if len(steps) > 1:
        labels = np.array([label for _path, label in setup.cohort.items], dtype=np.int64)
        sequential = sequential_analysis(labels, np.stack([s.answers.pred_index for s in steps]),
                                         folders, [s.name for s in steps], setup.cohort.groups,
                                         args.bootstrap, args.seed)
    output_dir, empty = Path(args.output_dir), []
    for i, step in enumerate(steps):
        LOG.info("== step %d/%d: %s (%s) ==", i + 1, len(steps), step.name, step.answers.source)
        folder = output_dir if i == 0 else output_dir / step_folder(i, step.name)
        metrics = write_answer_evaluation(folder, args, setup, step, sequential if i == 0 else None)
        if not metrics["n"]:
            empty.append(step.file)
        LOG.info("  n %d of %d (%d failed)  accuracy %s  balanced accuracy %s", metrics["n"],
                 metrics["n_received"], metrics["n_failed"],
                 format_value(metrics["accuracy"], metrics["accuracy_ci"]),
                 format_value(metrics["balanced_accuracy"], metrics["balanced_accuracy_ci"]))
    if sequential is not None:
        for row in sequential["omnibus"]:
            LOG.info("  Cochran's Q %-28s %-11s %s", row["class"], row["measure"],
                     "n/a" if row["q"] is None else f"{row['q']:.2f} (p {format_p(row['p_value'])})")
    LOG.info("== done: outputs in %s ==", output_dir)
    if empty:  # as for a checkpoint whose images are all unreadable: written, but not a success
        print(f"error: no answer of {', '.join(empty)} could be scored; the reasons are in the "
              "status column of its predictions.csv", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = common.default_workers(args.device)
    check_args(parser, args)
    return args


def build_parser():
    """The command line; `--help` shows every default as '(default: X)'."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and model")
    data.add_argument("--test-dir", required=True,
                      help="test cohort: one sub-folder per class (scored), images without class "
                           "folders (predicted only), or a manifest.csv of data_preprocess.py")
    data.add_argument("--split", default=None,
                      help=f"with a manifest.csv --test-dir: the rows evaluated (default "
                           f"{DEFAULT_SPLIT}; no fallback to another split)")
    data.add_argument("--checkpoint", default=None,
                      help="checkpoint of clip_train.py, a plain open_clip state_dict (needs "
                           "--model-name), or for the zero-shot baseline an open_clip pretrained tag "
                           "(with --model-name) or hf-hub:ORG/REPO or local-dir:PATH; or give "
                           "--predictions instead")
    data.add_argument("--model-name", default=None,
                      help="open_clip architecture, or hf-hub:ORG/REPO or local-dir:PATH; optional "
                           "with our checkpoints (stored in them), required otherwise (published: "
                           "ViT-B-32-256)")
    data.add_argument("--model-config", default=None,
                      help="JSON of a custom open_clip architecture, registered under the file's "
                           "stem (which --model-name then defaults to)")
    data.add_argument("--prompts", default=None,
                      help="JSON prompt set replacing the checkpoint's stored one (schema in prompts.py); "
                           "classes are matched to test folders by name")
    data.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                      help=f"where the outputs go (default {DEFAULT_OUTPUT_DIR}); must be new or empty "
                           "unless --overwrite")
    answers = parser.add_argument_group(
        "answer files, no model (e.g. a chat model's diagnoses; see README: The paper's second step)")
    answers.add_argument("--predictions", default=None, metavar="[NAME=]FILE",
                         help="score this CSV of answers instead of a --checkpoint: columns path (as "
                              "in predictions.csv, relative to --test-dir), answer or pred_label, "
                              "optional prob_<class> for every class and status; NAME names the "
                              "step (default: the file stem)")
    answers.add_argument("--label-map", default=None, metavar="JSON",
                         help="with --predictions or --compare: {class folder: [synonym, ...]}, "
                              "matched case- and "
                              "whitespace-insensitively; an answer it does not map is a failed row "
                              "(status 'failed: unmapped answer ...'), never guessed")
    answers.add_argument("--classes", default=None, metavar="A,B,C",
                         help="with --predictions: class folders in index order (default: sorted "
                              "by name); index 0 is the class of the intention-to-diagnose line")
    compare = parser.add_argument_group("comparison and weight interpolation")
    compare.add_argument("--baseline", default=None, metavar="TAG|PATH",
                         help="a second model scored on the same images (a pretrained tag, or "
                              "hf-hub:ORG/REPO or local-dir:PATH, for a zero-shot baseline, or "
                              "another checkpoint): paired differences with "
                              "CIs and McNemar's test in comparison.csv")
    compare.add_argument("--compare", nargs="+", default=None, metavar="NAME=FILE",
                         help="predictions of other models or readers on the same cohort (a CNN's "
                              "predictions.csv, an MLLM's or a clinician's answers): CSV with path "
                              "(as in our predictions.csv) and pred_label (or answer), optional "
                              "prob_<folder> per class and status; each becomes rows of "
                              "comparison.csv against our model (paired CIs, McNemar, DeLong); "
                              "with --predictions: later steps of the same reader, in order "
                              "(the sequential table: per class sensitivity and specificity per "
                              "step, paired changes with McNemar, Cochran's Q)")
    compare.add_argument("--baseline-model-name", default=None,
                         help="architecture of a tag or plain state_dict --baseline (default: the "
                              "model's own)")
    compare.add_argument("--wise-ft-alpha", type=float, nargs="+", default=None, metavar="A",
                         help="WiSE-FT: evaluate (1 - A) * base + A * fine-tuned weights for each A "
                              "in [0, 1], one wise_ft_alpha_<A>/ folder each (0.5 often keeps the "
                              "zero-shot robustness and most of the fine-tuning gain)")
    compare.add_argument("--wise-ft-base", default=None, metavar="PATH",
                         help="WiSE-FT base weights file (default: the checkpoint's recorded "
                              "pretrained weights)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help="images per forward pass (default 64; 256+ is fine on a GPU)")
    run.add_argument("--workers", type=int, default=None,
                     help="image-decoding worker processes (default: cores - 1, at most 8, on a GPU; "
                          "0 = in process, the default on the CPU)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="image tower precision; features and classifier stay fp32 (auto: bf16 where "
                          "the hardware multiplies bf16 natively: CUDA with bf16, a CPU with AMX or "
                          "AVX512-BF16; else fp32. fp32 for exact numbers; fp16 needs CUDA)")
    run.add_argument("--logit-scale-mode", choices=("exp", "published-log"), default=None,
                     help="softmax temperature: exp(logit_scale) (correct CLIP), or the raw log value "
                          "as the published code did (default: the checkpoint's mode, else exp)")
    run.add_argument("--cache-dir", default=None,
                     help="cache image embeddings here, keyed by weights, architecture, "
                          "preprocessing and each file's path, size and mtime: a re-run with other "
                          "prompts, thresholds or bootstrap sizes encodes no image")
    run.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                     help="draw the figures (PNG + PDF; default on; --no-figures saves a few seconds)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the evaluation files of an earlier run in --output-dir")
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--anonymize-paths", action="store_true",
                         help="write salted SHA-256 hashes instead of image paths (and group ids) in "
                              "every output; the test folder is written as <anonymized>")
    privacy.add_argument("--anonymize-salt", default=None,
                         help="salt of --anonymize-paths (default: random per run, so hashes cannot "
                              "be linked across runs); never written to any output")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                       help="percentile-bootstrap resamples for the 95%% CIs (default 2000; under "
                            "~500 the interval ends move with the seed; 0 = no bootstrap CIs)")
    stats.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default 2024)")
    stats.add_argument("--group-regex", default=None, metavar="RE",
                       help=r"resample patients, not images: the first capture group of RE in each "
                            r"file name is its group, e.g. '^(P\d+)_' (overrides a manifest's group "
                            "column; a file that does not match is its own group)")
    stats.add_argument("--threshold", type=float, default=None,
                       help="rare-class operating threshold in [0, 1] replacing the checkpoint's "
                            "validation one (source 'user'); never tune it on the test cohort")
    stats.add_argument("--metadata", default=None, metavar="CSV",
                       help="per-image attributes for --subgroups: a 'path' column as in "
                            "predictions.csv (or a 'file' column of file names) plus any columns "
                            "(site, sex, age, ...); rows of images not in the cohort are ignored")
    stats.add_argument("--subgroups", default=None, metavar="A,B",
                       help="attributes to report performance by (columns of --metadata, or of a "
                            "manifest.csv --test-dir), e.g. site,sex: subgroups.csv/.png, a "
                            "heterogeneity test per attribute, small-n warnings")
    stats.add_argument("--age-bins", default=None, metavar="EDGES",
                       help="bin edges for numeric --subgroups attributes, e.g. 0,40,60,120 "
                            "([0, 40), [40, 60), [60, 120]); a value outside them is refused")
    stats.add_argument("--failure-examples", type=int, default=DEFAULT_FAILURE_EXAMPLES, metavar="N",
                       help=f"failure analysis in report.md: the N most confident errors of each true "
                            f"class with thumbnails in {FAILURE_DIR}/ (default "
                            f"{DEFAULT_FAILURE_EXAMPLES}; 0 = none, e.g. when no image may leave the "
                            "hospital)")
    stats.add_argument("--decision-rule", choices=("argmax", "threshold"), default="argmax",
                       help="the rule whose decision fills predictions.csv's `prediction` column: "
                            "'argmax' (the most probable class, as published; default) or "
                            "'threshold' (the rare class when its probability reaches the "
                            "validation threshold or --threshold); both stay in pred_label and "
                            "pred_label_threshold")
    stats.add_argument("--ece-bins", type=int, default=DEFAULT_ECE_BINS,
                       help="equal-width bins of the expected calibration error (default 10; 10-15 "
                            "is usual, more bins need more images)")
    return common.show_defaults(parser, {"model_name": "the checkpoint's", "prompts": "the checkpoint's"})


def check_answer_args(parser, args):
    """--checkpoint or --predictions, and the flags that belong to only one of them."""
    if bool(args.checkpoint) == bool(args.predictions):
        parser.error("give --checkpoint (a model to evaluate) or --predictions (a file of answers), "
                     + ("not both" if args.checkpoint else "one of them"))
    if args.label_map and not Path(args.label_map).is_file():
        parser.error(f"--label-map {args.label_map}: no such file")
    if not args.predictions:
        if args.label_map and not args.compare:
            parser.error("--label-map needs --predictions or --compare (it maps answers to classes)")
        if args.classes is not None:
            parser.error("--classes needs --predictions (a checkpoint brings its own classes)")
        return
    for flag, value in (("--model-name", args.model_name), ("--model-config", args.model_config),
                        ("--prompts", args.prompts), ("--baseline", args.baseline),
                        ("--wise-ft-alpha", args.wise_ft_alpha), ("--cache-dir", args.cache_dir),
                        ("--logit-scale-mode", args.logit_scale_mode), ("--threshold", args.threshold)):
        if value is not None:
            parser.error(f"{flag} needs a model (--checkpoint); --predictions scores answers without one")
    name, path = named_file(args.predictions)  # the --compare steps: check_compare_args
    if not name:
        parser.error(f"--predictions {args.predictions}: the step NAME before '=' is empty")
    if not Path(path).is_file():
        parser.error(f"--predictions {path}: no such file")
    specs, _bad, _why = parse_compare_specs(args.compare)
    if specs and name in specs:
        parser.error(f"--compare {name}={specs[name]}: step name {name!r} is used twice; name "
                     "each step once")
    if args.classes is not None and not all(name.strip() for name in args.classes.split(",")):
        parser.error(f"--classes {args.classes!r}: expected folder names separated by commas")


def check_args(parser, args):
    """Every rejected value or combination, named by its flag (exit 2, nothing written)."""
    check_answer_args(parser, args)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--bootstrap", args.bootstrap, 0), ("--ece-bins", args.ece_bins, 2),
                             ("--failure-examples", args.failure_examples, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    test_dir = Path(args.test_dir)
    if test_dir.is_file() and test_dir.suffix.lower() != ".csv" and not common.is_candidate_image(test_dir):
        parser.error(f"--test-dir {test_dir}: a file must be a manifest.csv or an image")
    if not test_dir.exists():
        parser.error(f"--test-dir {test_dir}: no such folder or manifest")
    if args.split is not None and not test_dir.is_file():
        parser.error("--split applies to a manifest.csv --test-dir only")
    for flag, value in (("--model-config", args.model_config), ("--prompts", args.prompts),
                        ("--wise-ft-base", args.wise_ft_base)):
        if value and not Path(value).is_file():
            parser.error(f"{flag} {value}: no such file")
    if (args.baseline and looks_like_file(args.baseline) and not Path(args.baseline).is_file()
            and not common.model_source(args.baseline)):
        parser.error(f"--baseline {args.baseline}: no such file")
    if args.baseline_model_name and not args.baseline:
        parser.error("--baseline-model-name needs --baseline")
    check_compare_args(parser, args)
    check_subgroup_args(parser, args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.wise_ft_alpha is not None:
        bad = [a for a in args.wise_ft_alpha if not 0.0 <= a <= 1.0]
        if bad:
            parser.error(f"--wise-ft-alpha values must be in [0, 1], got {bad[0]}")
        if len({f"{a:g}" for a in args.wise_ft_alpha}) != len(args.wise_ft_alpha):
            parser.error("--wise-ft-alpha: each alpha once")
    elif args.wise_ft_base:
        parser.error("--wise-ft-base needs --wise-ft-alpha")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        parser.error(f"--cache-dir {args.cache_dir}: exists and is not a folder")
    if args.anonymize_salt is not None and not args.anonymize_paths:
        parser.error("--anonymize-salt needs --anonymize-paths")
    if args.group_regex is not None:
        try:
            groups = re.compile(args.group_regex).groups
        except re.error as err:
            parser.error(f"--group-regex {args.group_regex!r}: not a regular expression ({err})")
        if groups < 1:
            parser.error(f"--group-regex {args.group_regex!r}: needs a capture group, e.g. '^(P\\d+)_'")


def parse_compare_specs(values):
    """{name: path} of --compare NAME=FILE values, or (None, bad value, why)."""
    specs = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            return None, value, "expected NAME=FILE, e.g. resnet50=runs/resnet50/predictions.csv"
        if name in specs or name == "ours" or name.startswith("baseline "):
            return None, value, f"the name {name!r} is taken; give each model its own name"
        specs[name] = path
    return specs, None, None


def check_compare_args(parser, args):
    """--compare values: NAME=FILE, unique names, existing files."""
    specs, bad, why = parse_compare_specs(args.compare)
    if specs is None:
        parser.error(f"--compare {bad}: {why}")
    for name, path in specs.items():
        if not Path(path).is_file():
            parser.error(f"--compare {name}={path}: no such file")


def check_subgroup_args(parser, args):
    """--metadata, --subgroups and --age-bins: files exist, values parse, each needs the other."""
    if args.metadata and not Path(args.metadata).is_file():
        parser.error(f"--metadata {args.metadata}: no such file")
    if args.metadata and not args.subgroups:
        parser.error("--metadata needs --subgroups (the columns to analyse), e.g. --subgroups site")
    if args.age_bins is not None:
        if not args.subgroups:
            parser.error("--age-bins needs --subgroups")
        try:
            parse_bins(args.age_bins)
        except ValueError as err:
            parser.error(f"--age-bins {args.age_bins}: {err}")
    if args.subgroups is not None and not [n for n in args.subgroups.split(",") if n.strip()]:
        parser.error("--subgroups: name at least one column, e.g. site,sex")


def read_compared(args, cohort, folders):
    """{name: ExternalPredictions} of --compare, matched to the cohort (ValueError: exit 2)."""
    specs, _bad, _why = parse_compare_specs(args.compare)
    paths = [relative_path(path, cohort.root) for path, _label in cohort.items]
    true_labels = [folders[label] for _path, label in cohort.items]
    label_map = read_label_map(args.label_map, folders)
    return {name: read_external_predictions(path, paths, folders, f"--compare {name}=",
                                             label_map, true_labels=true_labels)
            for name, path in specs.items()}


def prepare(args, argv):
    """Everything checked and loaded before any output is written (errors: ValueError/OSError)."""
    args.device = common.resolve_device(args.device)
    args.precision, why = common.resolve_precision(args.precision, args.device)
    LOG.info("precision %s (%s)", args.precision, why)
    common.autocast_context(args.device, args.precision)
    check_output_dir(args.output_dir, args.overwrite)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model_name = resolve_model_name(requested_model_name(args), checkpoint)
    classes, prompt_source = load_classes(args.prompts, checkpoint)
    cohort = collect_cohort(args, prompt_sets.class_folders(classes))
    for flag, given in (("--baseline", args.baseline), ("--compare", args.compare)):
        if given and not cohort.labelled:
            raise ValueError(f"{flag}: {args.test_dir} has no class folders, so there is nothing "
                             "to compare on; give a labelled cohort")
    compare = read_compared(args, cohort, prompt_sets.class_folders(classes)) if args.compare else {}
    bundle = build_bundle(checkpoint, model_name, classes, prompt_source, args, args.threshold)
    if args.decision_rule == "threshold" and bundle.operating["threshold"] is None:
        raise ValueError(f"--decision-rule threshold: --checkpoint {args.checkpoint} stores no "
                         "validation threshold; pass --threshold P (0-1) or --decision-rule argmax")
    salt = args.anonymize_salt if args.anonymize_salt is not None else secrets.token_hex(16)
    subgroups = cohort_subgroups(args, cohort)
    return Setup(cohort=cohort, model=bundle, argv=argv, compare=compare, subgroups=subgroups,
                 overlap=training_overlap(checkpoint, cohort, args.test_dir),
                 baseline=prepare_baseline(args, model_name, bundle.folders) if args.baseline else None,
                 wise=prepare_wise_ft(args, bundle) if args.wise_ft_alpha else None,
                 anonymize=make_anonymizer(salt) if args.anonymize_paths else None)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.configure_logging()
    LOG.info("== setup ==")
    for key, value in vars(args).items():
        LOG.debug("  %s = %s", key, "<hidden>" if key == "anonymize_salt" and value else value)
    if args.predictions:  # answer files: no model, no device
        return run_answers(args, argv)
    try:
        setup = prepare(args, argv)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cohort, bundle = setup.cohort, setup.model
    if 0 < args.bootstrap < 500:
        LOG.warning("--bootstrap %d: so few resamples give unstable interval ends", args.bootstrap)
    LOG.info("== predicting %d images: %s, classes %s, %s, logit scale %s, %s %s ==",
             len(cohort.items), bundle.model_name, bundle.folders,
             "labelled (scored)" if cohort.labelled else "no class folders (predicted, not scored)",
             bundle.logit_scale_mode, args.device, args.precision)
    baseline_scores = score_model(setup.baseline, cohort, args) if setup.baseline else None
    clear_previous_run(args.output_dir)  # (non-empty only with --overwrite, checked at the start)
    if setup.wise is not None:
        statuses, results = run_wise_ft(args, setup, baseline_scores)
        metrics = results[-1]
    else:
        scores = score_model(bundle, cohort, args)
        statuses = scores.statuses
        metrics = write_evaluation(args.output_dir, args, setup, bundle, scores, baseline_scores)
    n_failed = sum(status != "ok" for status in statuses)
    if n_failed == len(statuses):
        print(f"error: none of the {len(statuses)} images could be read; the reasons are in the "
              "status column of predictions.csv", file=sys.stderr)
        return 1
    if n_failed:
        LOG.warning("%d of %d images could not be read; see status in predictions.csv",
                    n_failed, len(statuses))
    if metrics is None:
        LOG.info("== done: %d images predicted, not scored (no class folders); outputs in %s ==",
                 len(statuses) - n_failed, args.output_dir)
    else:
        LOG.info("== done: n %d  accuracy %s  balanced accuracy %s  macro AUROC %s  %s; outputs in %s ==",
                 metrics["n"], format_value(metrics["accuracy"], metrics["accuracy_ci"]),
                 format_value(metrics["balanced_accuracy"], metrics["balanced_accuracy_ci"]),
                 format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]),
                 rare_summary(metrics), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
