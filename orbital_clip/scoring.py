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
          --baseline datacomp_s34b_b86k --out-dir results_vs_zero_shot --cache-dir emb_cache
    $ python inference.py --test-dir external_cohort --checkpoint best.pt \\
          --compare resnet50=runs/resnet50/predictions.csv --metadata meta.csv --subgroups site
    $ python inference.py --test-dir external_cohort --checkpoint best.pt \\
          --wise-ft-alphas 0 0.25 0.5 0.75 1 --out-dir wise_ft --anonymize-paths
    $ python inference.py --test-dir subtypes --predictions image=step1.csv \\
          --compare image+symptoms=step2.csv --label-map label_map.json   # answers, no model

Writes into --out-dir predictions.csv, metrics.json, per_class_metrics.csv, confusion_matrix.csv,
classification_report.txt, the figures (roc_curves, pr_curves, calibration, prob_histograms,
confusion_matrix; .png and .pdf), report.md (each output mapped to the checklist item it serves,
with a failure analysis in failure_analysis/) and args.json; with --baseline or --compare also
comparison.csv/.png (and baseline_predictions.csv), with --subgroups subgroups.csv/.png, with
--wise-ft-alphas a wise_ft_alpha_<a>/ folder per alpha and wise_ft_summary.csv. --predictions
(answers, no model: answer_files.py) writes the files that need no model; its --compare files are
later steps of the same reader (sequential.csv, sequential_changes.csv, a step<k>_<name>/ folder
per step). README "Output files" lists every file.
"""

import dataclasses
import logging
import math
import secrets
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from orbital_clip import checkpoint as ckpt
from orbital_clip import cli
from orbital_clip import cohort as cohort_io
from orbital_clip import images
from orbital_clip import outputs
from orbital_clip import zero_shot
from orbital_clip import models as model_lib  # `models` is a list of compared models below
from orbital_clip import prompts as prompt_sets
from orbital_clip import scoring_args
from orbital_clip.answers import DEPRECATED_ANSWER_MODE, read_compared, run_answers
from orbital_clip.model_loading import (Checkpoint, build_model, linear_head, linear_head_logits,
                                        requested_model_name, resolve_checkpoint,
                                        resolve_model_name, wise_ft_base_weights)
from orbital_clip.embedding_cache import cache_model_key, image_cache_key, read_cache, write_cache
from orbital_clip.journal import journal_statistics, write_journal_outputs  # issue 28
from orbital_clip.evaluation import (Cohort, args_record, check_output_dir,
                        clear_previous_outputs, clear_previous_run,
                        cohort_subgroups, collect_cohort, figure_saver, make_anonymizer,
                        package_versions, score_subgroups, training_overlap, write_failure_analysis,
                        write_scored_tables, write_subgroup_outputs, written_figures,
                        write_cohort_table1, compare_by_site)
from orbital_clip.metrics import (CONFIDENCE_LEVEL, ComparedModel,
                     compare_predictions, compute_metrics, finite_or_none, intention_to_diagnose,
                     interval_levels, operating_point_metrics, rule_predictions, softmax,
                     with_class_patient_intervals)
from orbital_clip.report import (comparison_resample_notes, flow_counts, format_value, predictions_frame, rare_summary,
                    render_report, resample_notes, summary_row, unanswered_notes, write_figures)

LOG = logging.getLogger("inference")


# ----------------------------------------------------------------------------------------------
# Records passed between the stages


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
    script = "inference.py"  # the entry point that ran (args.json); not a field: always this one
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
# Loading: prompts, images (checkpoints and models: model_loading.py)


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
        raise ckpt.CheckpointError(f"{checkpoint.spec}: trained on classes {list(stored)} but "
                                     "stores no prompts; pass them with --prompts")
    return classes, "published prompt set"


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
    if linear_head(checkpoint) is not None:  # a probe's head: no prompts, no scale, rows by name
        return []
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


# ----------------------------------------------------------------------------------------------
# Prediction


def encode_items(model, preprocess, items, args):
    """(features (N, D) float32 normalised, ok (N,) bool, {index: reason}) by encoding images."""
    image_size_px = model_lib.model_image_size(model)
    dataset = cohort_io.ImageListDataset(items, preprocess, min_side_px=image_size_px,
                                      image_shape=(3, image_size_px, image_size_px))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=args.device.type == "cuda", worker_init_fn=cli.seed_worker)
    progress = lambda batches: tqdm(batches, desc="encoding images", unit="batch",  # noqa: E731
                                    disable=args.no_progress or None)  # None: only on a terminal
    with torch.inference_mode():
        features, ok = zero_shot.encode_image_batches(model, loader, args.device, args.precision, progress)
    ok = ok.numpy()
    return features.numpy(), ok, cohort_io.read_failures(items, np.flatnonzero(~ok).tolist())


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
    head = linear_head(bundle.checkpoint, bundle.folders)  # rows in our column order
    if head is not None:  # a linear probe (linear_probe.py): its head replaces the prompts
        return scores_from_logits(linear_head_logits(features, head).numpy(), ok, reasons)
    with torch.inference_mode():
        # The classifier in fp32 whatever --precision: a few prompts, so exactness costs nothing.
        classifier = zero_shot.build_zero_shot_classifier(
            model, bundle.tokenizer, [list(c.eval) for c in bundle.classes], args.device)
        scale = model_lib.logit_scale(model, bundle.logit_scale_mode)  # training's rule too
        logits = zero_shot.zero_shot_logits(torch.from_numpy(features), classifier.float().cpu(),
                                         scale.float().cpu())
    return scores_from_logits(logits.double().numpy(), ok, reasons)


def scores_from_logits(logits, ok, reasons):
    """Scores of logits (N, C): NaN rows and a `failed: <reason>` status where unreadable."""
    logits[~ok] = np.nan
    statuses = ["ok" if good else f"failed: {reasons[i]}" for i, good in enumerate(ok)]
    return Scores(logits, statuses)


def build_bundle(checkpoint, model_name, classes, prompt_source, args, threshold=None,
                 flag="--checkpoint"):
    """Everything needed to score one model: weights loaded, transform, tokenizer, classes,
    logit scale mode, stored operating point and temperature, and its cache key."""
    folders = prompt_sets.class_folders(classes)
    linear_head(checkpoint, folders)  # a probe refuses another class set before anything loads
    model, preprocess, tokenizer = build_model(model_name, checkpoint, args.device, flag)
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
    own_arch = checkpoint.kind == "ours" or model_lib.model_source(checkpoint.spec)
    requested = args.baseline_model_name or (None if own_arch else model_name)
    name = resolve_model_name(requested, checkpoint, "--baseline-model-name", "--baseline")
    classes, source = load_classes(args.prompts, checkpoint)
    if set(prompt_sets.class_folders(classes)) != set(folders):
        raise ValueError(f"--baseline {args.baseline}: classes {prompt_sets.class_folders(classes)} "
                         f"differ from the model's {folders}; pass a --prompts file for both")
    return build_bundle(checkpoint, name, classes, source, args, flag="--baseline")


def prepare_wise_ft(args, bundle):
    """The WiseFT weight pair, checked to fit each other."""
    base, label, identity = wise_ft_base_weights(args, bundle)
    tuned = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    base = {k: v for k, v in base.items() if k in tuned} if set(tuned) <= set(base) else base
    if base.keys() != tuned.keys():
        example = sorted(set(base) ^ set(tuned))[0]
        raise ckpt.CheckpointError(f"--wise-ft-base {label}: weights do not fit architecture "
                                     f"{bundle.model_name} (e.g. key {example!r})")
    for key, value in tuned.items():
        if base[key].shape != value.shape:
            raise ckpt.CheckpointError(f"--wise-ft-base {label}: {key} has shape "
                                         f"{tuple(base[key].shape)}, the model {tuple(value.shape)}")
    return WiseFT(base, tuned, label, identity)


def wise_ft_bundle(bundle, wise, alpha, args):
    """The bundle with its model set to (1 - alpha) * base + alpha * fine-tuned weights. The
    validation threshold and temperature belong to the fine-tuned weights: kept at alpha 1 only."""
    bundle.model.load_state_dict(ckpt.interpolate_state_dicts(wise.base, wise.tuned, alpha))
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


def checkpoint_label(checkpoint):
    """What --checkpoint named, in words, for the report."""
    source = model_lib.model_source(checkpoint.spec) if checkpoint.kind == "tag" else None
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
        # the rule of predictions.csv's `prediction` column, comparison.csv and subgroups.csv
        "decision_rule": declared_rule(args, operating),
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
        sources[name] = (f"--compare {external.source} (SHA-256 {images.file_sha256(external.source)[:16]}…; "
                         f"{'labels and probabilities' if external.probs is not None else 'labels only'}; "
                         f"{failed} rows without an answer)")
    return sources


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


def declared_rule(args, operating):
    """The --decision-rule in force: 'threshold' only when a threshold is known, else 'argmax'."""
    return ("threshold" if args.decision_rule == "threshold" and operating["threshold"] is not None
            else "argmax")


def decided_predictions(probs, operating, rule):
    """(N,) the class `rule` decides per image (-1 where an image was not scored): the one rule
    behind predictions.csv's `prediction`, comparison.csv's `ours` and subgroups.csv."""
    scored = np.isfinite(probs).all(axis=1)
    if rule == "threshold":
        decided = rule_predictions(np.nan_to_num(probs), operating["rare_index"], operating["threshold"])
    else:
        decided = np.nan_to_num(probs, nan=-1.0).argmax(axis=1)
    return np.where(scored, decided, -1)


def score_labelled(bundle, scores, cohort, args, baseline_scores=None, compared=(), subgroups=None):
    """(metrics, operating point, intention-to-diagnose, comparison) of a labelled cohort;
    `compared`: ComparedModels over every cohort image (see `compared_models`)."""
    folders, operating = bundle.folders, bundle.operating
    probs = softmax(scores.logits)
    scored = np.isfinite(probs).all(axis=1)
    labels = cohort.labels()
    y_true = labels[scored]
    groups = cohort.scored_groups(scored)
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
        rule = declared_rule(args, operating)
        decided = decided_predictions(probs, operating, rule)[scored]
        comparison = compare_predictions(
            y_true, ComparedModel("ours", decided, probs[scored]),
            [dataclasses.replace(model, pred=model.pred[scored],
                                 probs=None if model.probs is None else model.probs[scored])
             for model in compared], rare, groups, args.bootstrap, args.seed)
        comparison["decision_rule"] = rule
        comparison["by_site"] = compare_by_site(subgroups, scored, y_true, decided, probs[scored],
                                                compared, rare, groups, args)
        notes = comparison_resample_notes(comparison) + unanswered_notes(comparison, folders)
        if notes:  # intervals on fewer resamples than drawn, metrics n/a (see report.md)
            LOG.warning("comparison: %s (report.md says why)", "; ".join(notes))
    return metrics, op, itd, comparison


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
    outputs.atomic_write_csv(output_dir / "predictions.csv", predictions_frame(
        cohort, folders, probs, scores.statuses, probs_cal, rule, anonymize, run["decision_rule"]))
    outputs.atomic_write_json(output_dir / "args.json", args_record(args, setup, run))
    labels = [label for _path, label in cohort.items]
    flow = flow_counts(labels, scores.statuses, folders, cohort.labelled, cohort.groups)
    metrics = op = itd = comparison = subgroups = failures = None
    explained = []
    if cohort.labelled:
        compared = compared_models(setup, folders, baseline_scores)
        metrics, op, itd, comparison = score_labelled(bundle, scores, cohort, args, baseline_scores,
                                                      compared, setup.subgroups)
        n_failed = flow["rows"]["total"]["unreadable"]
        scored = np.isfinite(probs).all(axis=1)
        subgroups = score_subgroups(cohort, setup.subgroups, probs, scored, rare, args,
                                    decided_predictions(probs, bundle.operating, run["decision_rule"]),
                                    run["decision_rule"], compared)
        if args.failure_examples and scored.any():
            failures = write_failure_analysis(output_dir, cohort, scored, probs,
                                              args.failure_examples, anonymize)
        if args.explain and scored.any():  # Grad-CAM maps of errors and correct cases (explain.py)
            from orbital_clip.explain import write_explanations
            explained = write_explanations(output_dir, bundle, cohort, scored, probs, args.explain,
                                           args.device, anonymize)
        metrics = {"n": metrics.pop("n"), "n_received": len(labels), "n_failed": n_failed, **metrics,
                   "interval_levels": interval_levels(cohort.groups is not None, args.bootstrap),
                   "operating_point": op, **itd, "flow": flow, "comparison": comparison,
                   "subgroups": subgroups, "failure_analysis": failures, **run}
        metrics = with_class_patient_intervals(  # per-class sensitivity by patient: one home
            metrics, cohort.labels()[scored], np.nan_to_num(probs, nan=-1.0).argmax(axis=1)[scored],
            folders, cohort.scored_groups(scored), args.bootstrap, args.seed)
        metrics["journal"] = journal_statistics(  # issue 28: argmax per class, the declared rule compared
            labels, probs, np.where(scored, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1), compared,
            cohort.groups, rare, threshold, folders, args,
            decided_predictions(probs, bundle.operating, run["decision_rule"]))
        outputs.atomic_write_json(output_dir / "metrics.json", metrics)
        if baseline_scores is not None:
            base = setup.baseline
            order = [base.folders.index(f) for f in folders]
            outputs.atomic_write_csv(output_dir / "baseline_predictions.csv", predictions_frame(
                cohort, folders, softmax(baseline_scores.logits)[:, order],
                baseline_scores.statuses, anonymize=anonymize))
        if metrics["n"]:  # nothing to tabulate or draw when no image could be read
            y_true = np.asarray(labels)[scored]
            write_scored_tables(output_dir, y_true, probs[scored], folders, metrics, comparison,
                                args.figures)
            write_subgroup_outputs(output_dir, subgroups, args.figures)
            write_journal_outputs(output_dir, metrics["journal"], args.figures)
            if args.figures:
                write_figures(figure_saver(output_dir), y_true, probs[scored],
                              None if probs_cal is None else probs_cal[scored], folders, metrics, op, rare)
    cohort_table = write_cohort_table1(output_dir, args, cohort, folders)
    report = render_report(run, flow, metrics, folders, op, itd, comparison, subgroups, failures,
                           figures_written=written_figures(output_dir), table1=cohort_table)
    report = report.rstrip("\n") + "\n" + "\n".join(explained) + "\n" if explained else report
    outputs.atomic_write_text(output_dir / "report.md", report)
    return metrics


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
    outputs.atomic_write_csv(output_dir / "wise_ft_summary.csv", pd.DataFrame(rows))
    outputs.atomic_write_json(output_dir / "args.json", args_record(args, setup))
    return scores.statuses, results


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    """inference.py's arguments, checked (scoring_args: the flags, their defaults and checks)."""
    return scoring_args.parse_args(argv, __doc__)


def prepare(args, argv):
    """Everything checked and loaded before any output is written (errors: ValueError/OSError)."""
    args.device = model_lib.resolve_device(args.device)
    args.precision, why = model_lib.resolve_precision(args.precision, args.device)
    LOG.info("precision %s (%s)", args.precision, why)
    model_lib.autocast_context(args.device, args.precision)
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
    argv = cli.canonical_argv(scoring_args.build_parser(__doc__), argv)  # current spellings in args.json
    cli.configure_logging()
    LOG.info("== setup ==")
    for key, value in vars(args).items():
        LOG.debug("  %s = %s", key, "<hidden>" if key == "anonymize_salt" and value else value)
    if args.predictions:  # answer files: no model, no device
        print(f"warning: {DEPRECATED_ANSWER_MODE}", file=sys.stderr)
        return run_answers(args, argv, script="inference.py")
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
