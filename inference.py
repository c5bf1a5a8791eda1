"""Evaluate an OpenCLIP model on a folder-per-class test cohort, with 95% confidence intervals.

Each class is one embedding: the mean of the normalised text embeddings of its evaluation prompts
(a prompt ensemble). An image's class probabilities are the softmax of its scaled cosine
similarities to those embeddings. Labels are the class folder names, matched by name (never by
sort order); a test folder without class folders is predicted but not scored. An unreadable image
keeps its row in predictions.csv with a `failed: <reason>` status and is left out of the metrics.

--checkpoint takes a checkpoint written by clip_train.py (architecture, classes and prompts come
from it), a plain open_clip state_dict as the published code saved it (--model-name required), or
an open_clip pretrained tag for the zero-shot baseline (--model-name required):

    $ python inference.py --test-dir external_cohort \\
          --checkpoint clip_model_checkpoints/clip_model_epoch_best.pt
    $ python inference.py --test-dir external_cohort --checkpoint published_model.pt \\
          --model-name ViT-B-32-256 --output-dir published_results
    $ python inference.py --test-dir external_cohort --checkpoint datacomp_s34b_b86k \\
          --model-name ViT-B-32-256 --output-dir zero_shot_baseline

Writes into --output-dir: predictions.csv, metrics.json, classification_report.txt,
confusion_matrix.csv and .png, roc_curves.png, args.json and report.md.
"""

import argparse
import logging
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import torch

import common
import prompts as prompt_sets

LOG = logging.getLogger("inference")
DEFAULT_OUTPUT_DIR = "inference_results"
DEFAULT_BATCH_SIZE = 64
DEFAULT_BOOTSTRAP = 2000  # percentile-bootstrap resamples; ~2000 keeps 95% interval ends stable
DEFAULT_SEED = 2024
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_CHUNK = 256  # replicates evaluated together: memory ~ CHUNK x N numbers per class
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
OVERALL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                 "macro_f1": "macro F1", "macro_auroc": "macro AUROC (one-vs-rest)"}
OUTPUT_NAMES = ("predictions.csv", "metrics.json", "classification_report.txt",
                "confusion_matrix.csv", "confusion_matrix.png", "roc_curves.png", "report.md",
                "args.json")


# ----------------------------------------------------------------------------------------------
# Metrics (pure: arrays in, numbers out)


def proportion(k, n):
    """k / n as a float, or None when n is 0 (undefined, not zero)."""
    return float(k) / n if n else None


def wilson_interval(k, n, confidence=CONFIDENCE_LEVEL):
    """Wilson score interval for a binomial proportion.

    Parameters
    ----------
    k : int
        Successes (for example true positives).
    n : int
        Trials (for example all condition-positive images).
    confidence : float
        Confidence level of the interval.

    Returns
    -------
    [low, high] as floats, or None when n is 0.
    """
    if n == 0:
        return None
    from scipy.stats import binomtest
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def one_vs_rest_counts(cm, k):
    """Class k against the rest in a confusion matrix.

    Parameters
    ----------
    cm : (C, C) array
        Counts; rows are true classes, columns predicted classes.
    k : int
        Class index.

    Returns
    -------
    (tp, fp, fn, tn) as ints.
    """
    cm = np.asarray(cm)
    tp = int(cm[k, k])
    fn = int(cm[k, :].sum()) - tp
    fp = int(cm[:, k].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    return tp, fp, fn, tn


def confusion_matrices(y_true, y_pred, n_classes, resamples=None):
    """Confusion counts (rows true, columns predicted) of one labelling or of many resamples.

    Parameters
    ----------
    y_true, y_pred : (N,) int arrays
        Class indices.
    n_classes : int
        C.
    resamples : (B, N) int array, optional
        Row indices of B bootstrap resamples.

    Returns
    -------
    (C, C) int array, or (B, C, C) with `resamples`.
    """
    codes = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    cells = n_classes * n_classes
    if resamples is None:
        return np.bincount(codes, minlength=cells).reshape(n_classes, n_classes)
    offsets = np.arange(len(resamples))[:, None] * cells  # one block of cells per resample
    counts = np.bincount((codes[resamples] + offsets).ravel(), minlength=len(resamples) * cells)
    return counts.reshape(len(resamples), n_classes, n_classes)


def metrics_from_confusion(cms):
    """Accuracy, balanced accuracy and macro F1 of a stack of confusion matrices.

    The definitions are scikit-learn's (balanced accuracy averages recall over the classes present
    in y_true; macro F1 scores a class with no true and no predicted image as 0). Written out
    because the bootstrap needs thousands of them and this is one vectorised pass.

    Parameters
    ----------
    cms : (B, C, C) array
        Counts; rows true, columns predicted.

    Returns
    -------
    dict name -> (B,) float array, NaN where undefined (an empty matrix).
    """
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)  # (B, C)
    support, predicted = cms.sum(axis=2), cms.sum(axis=1)  # (B, C) each
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = tp.sum(axis=1) / cms.sum(axis=(1, 2))
        recall = np.where(present, tp / support, 0.0)
        balanced = recall.sum(axis=1) / present.sum(axis=1)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": f1.mean(axis=1)}


def rank_auroc(scores, positive):
    """Binary AUROC of each row by the Mann-Whitney rank formula (ties count one half).

    Equal to sklearn's roc_auc_score, but vectorised over bootstrap replicates (one rankdata call
    instead of thousands of roc_auc_score calls).

    Parameters
    ----------
    scores : (B, N) float array
    positive : (B, N) bool array

    Returns
    -------
    (B,) float array, NaN where a row has no positive or no negative.
    """
    from scipy.stats import rankdata
    scores = np.atleast_2d(scores)
    positive = np.atleast_2d(positive).astype(bool)
    ranks = rankdata(scores, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def class_auroc(y_true, probs, k):
    """One-vs-rest AUROC of class k (scikit-learn), or None when class k is absent or alone."""
    from sklearn.metrics import roc_auc_score
    positive = np.asarray(y_true) == k
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(probs)[:, k]))


def overall_point_metrics(y_true, y_pred, probs):
    """accuracy, balanced_accuracy, macro_f1 (scikit-learn) and macro_auroc (the mean of the
    one-vs-rest AUROCs; None unless every class is present) of a non-empty labelling."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    labels = list(range(probs.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" is expected
        values = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                       zero_division=0)),
        }
    aurocs = [class_auroc(y_true, probs, k) for k in labels]
    values["macro_auroc"] = None if None in aurocs else float(np.mean(aurocs))
    return values


def bootstrap_replicates(y_true, probs, n_bootstrap, seed, chunk=BOOTSTRAP_CHUNK):
    """The overall metrics and per-class AUROCs on resamples of the images (with replacement).

    Parameters
    ----------
    y_true : (N,) int array
    probs : (N, C) float array
    n_bootstrap : int
        Number of resamples B.
    seed : int
        Seed of the resampling (the same seed gives the same replicates).

    Returns
    -------
    dict: each name in OVERALL_METRICS -> (B,) array, and "auroc" -> (B, C) array; NaN where a
    resample leaves the metric undefined (for example the rare class drawn zero times).
    """
    rng = np.random.default_rng(seed)
    n, n_classes = probs.shape
    y_pred = probs.argmax(axis=1)
    parts = {name: [] for name in (*OVERALL_METRICS, "auroc")}
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_bootstrap - start), n))  # (b, N)
        cms = confusion_matrices(y_true, y_pred, n_classes, idx)
        for name, values in metrics_from_confusion(cms).items():
            parts[name].append(values)
        auroc = np.stack([rank_auroc(probs[idx, k], y_true[idx] == k) for k in range(n_classes)],
                         axis=1)  # (b, C)
        parts["auroc"].append(auroc)
        parts["macro_auroc"].append(auroc.mean(axis=1))  # NaN when a class is missing
    return {name: np.concatenate(values) for name, values in parts.items()}


def percentile_interval(values, confidence=CONFIDENCE_LEVEL):
    """[low, high] percentile interval of the finite bootstrap values, or None if none are."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def per_class_metrics(cm, k, confidence=CONFIDENCE_LEVEL):
    """support and sensitivity, specificity, PPV, NPV of class k, each with its Wilson interval."""
    tp, fp, fn, tn = one_vs_rest_counts(cm, k)
    stats = {"support": tp + fn}
    for name, hits, total in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                              ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        stats[name] = proportion(hits, total)
        stats[f"{name}_ci"] = wilson_interval(hits, total, confidence)
    return stats


def compute_metrics(y_true, probs, class_names, n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED,
                    confidence=CONFIDENCE_LEVEL):
    """Every metric of metrics.json from the labels and class probabilities of scored images.

    Parameters
    ----------
    y_true : (N,) int array
        True class indices.
    probs : (N, C) float array
        Class probabilities; the prediction is the argmax of each row.
    class_names : list of str
        The C folder names, keys of `per_class`.
    n_bootstrap : int
        Percentile-bootstrap resamples of the images for the CIs of the overall metrics and of
        the per-class AUROCs; 0 leaves those CIs None. Proportions use Wilson intervals.
    seed : int
        Seed of the bootstrap.
    confidence : float
        Level of every interval.

    Returns
    -------
    dict with n, accuracy, balanced_accuracy, macro_f1, macro_auroc, each beside its
    `<name>_ci`, confusion_matrix (rows true) and per_class[name] with support, sensitivity,
    specificity, ppv, npv and auroc (each with `_ci`). Undefined values are None.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(class_names))
    n = len(y_true)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrices(y_true, y_pred, len(class_names))
    point = overall_point_metrics(y_true, y_pred, probs) if n else dict.fromkeys(OVERALL_METRICS)
    boot = bootstrap_replicates(y_true, probs, n_bootstrap, seed) if n and n_bootstrap else None
    metrics = {"n": n}
    for name in OVERALL_METRICS:
        metrics[name] = point[name]
        defined = boot is not None and point[name] is not None
        metrics[f"{name}_ci"] = percentile_interval(boot[name], confidence) if defined else None
    metrics["per_class"] = {}
    for k, name in enumerate(class_names):
        stats = per_class_metrics(cm, k, confidence)
        stats["auroc"] = class_auroc(y_true, probs, k) if n else None
        defined = boot is not None and stats["auroc"] is not None
        stats["auroc_ci"] = percentile_interval(boot["auroc"][:, k], confidence) if defined else None
        metrics["per_class"][name] = stats
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


# ----------------------------------------------------------------------------------------------
# Tables and the report (pure: values in, text or frames out)


def predictions_frame(items, test_dir, folders, probs, statuses, labelled):
    """predictions.csv as a DataFrame: one row per image in input order, failed rows included."""
    import pandas as pd
    finite = np.isfinite(probs).all(axis=1)
    columns = {
        "path": [relative_path(path, test_dir) for path, _label in items],
        "true_label": [folders[label] if labelled else "" for _path, label in items],
        "pred_label": [folders[int(np.argmax(row))] if ok else "" for row, ok in zip(probs, finite)],
    }
    for k, folder in enumerate(folders):
        columns[f"prob_{folder}"] = probs[:, k]  # NaN (an empty cell) on failed rows
    columns["status"] = list(statuses)
    return pd.DataFrame(columns)


def relative_path(path, root):
    """path relative to root, with forward slashes (the same on every OS)."""
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def confusion_frame(cm, folders):
    """The confusion matrix as a DataFrame: rows true, columns predicted, folder names as headers."""
    import pandas as pd
    frame = pd.DataFrame(np.asarray(cm, dtype=np.int64), columns=list(folders))
    frame.insert(0, "true_label", list(folders))
    return frame


def class_counts(frame, folders, labelled):
    """Per class: images received, failed and scored (by true folder; by prediction if unlabelled)."""
    ok = frame["status"] == "ok"
    rows = []
    for folder in folders:
        if labelled:
            mine = frame["true_label"] == folder
            rows.append((folder, int(mine.sum()), int((mine & ~ok).sum()), int((mine & ok).sum())))
        else:
            rows.append((folder, int((frame["pred_label"] == folder).sum())))
    return rows


def format_value(value, ci=None, digits=3):
    """`0.833 (0.552-0.953)`, or `n/a` for an undefined value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else text


def metrics_markdown(metrics, folders):
    """The overall and per-class metric tables of report.md."""
    lines = ["| metric | value (95% CI) |", "| --- | --- |"]
    for name in OVERALL_METRICS:
        lines.append(f"| {METRIC_LABELS[name]} | {format_value(metrics[name], metrics[name + '_ci'])} |")
    lines += ["", "| class | support | sensitivity | specificity | PPV | NPV | AUROC |",
              "| --- | ---: | --- | --- | --- | --- | --- |"]
    for folder in folders:
        stats = metrics["per_class"][folder]
        cells = [format_value(stats[name], stats[name + "_ci"]) for name in (*PROPORTIONS, "auroc")]
        lines.append(f"| {folder} | {stats['support']} | " + " | ".join(cells) + " |")
    return lines


def render_report(run, counts, metrics, folders):
    """report.md: what was evaluated, the counts, the metric tables with CIs, the figures."""
    lines = ["# Orbital-CLIP evaluation", "",
             f"- checkpoint: `{run['checkpoint']}` ({run['checkpoint_kind']})",
             f"- checkpoint SHA-256: `{run['checkpoint_sha256'] or 'n/a (pretrained tag)'}`",
             f"- model: `{run['model_name']}`, logit scale `{run['logit_scale_mode']}`",
             f"- prompts: {run['prompt_source']}; evaluation prompts per class: "
             + "; ".join(f"{c['folder']}: " + ", ".join(f'"{p}"' for p in c["eval"])
                         for c in run["prompts"]["classes"]),
             f"- test folder: `{run['test_dir']}`",
             f"- device {run['device']}, precision {run['precision']}", ""]
    if metrics is None:
        lines += ["No class folders in the test folder: the images were **predicted, not scored**.",
                  "", "| predicted class | images |", "| --- | ---: |"]
        lines += [f"| {folder} | {n} |" for folder, n in counts]
        lines += ["", f"{run['n_failed']} of {run['n_received']} images could not be read "
                  "(see `status` in predictions.csv)."]
        return "\n".join(lines) + "\n"
    lines += ["## Images", "", "| class | received | failed | scored |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {folder} | {received} | {failed} | {scored} |" for folder, received, failed, scored in counts]
    lines += [f"| **all** | {run['n_received']} | {run['n_failed']} | {metrics['n']} |", "",
              "## Metrics", "",
              f"95% CIs: percentile bootstrap over images ({run['bootstrap']} resamples, seed "
              f"{run['seed']}) for the overall metrics and AUROC; Wilson intervals for sensitivity, "
              "specificity, PPV and NPV. n/a: undefined (for example a class absent from the test set).",
              ""]
    lines += metrics_markdown(metrics, folders)
    lines += ["", "## Figures", "", "![Confusion matrix](confusion_matrix.png)", "",
              "![ROC curves](roc_curves.png)", "",
              "Also here: predictions.csv, metrics.json, classification_report.txt, confusion_matrix.csv."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures


def plot_confusion_matrix(cm, folders, path):
    """Heatmap coloured by row percentage, each cell showing its count and row percentage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_pct = np.where(support > 0, 100.0 * cm / support, np.nan)
    annot = np.array([[f"{cm[i, j]}\n{row_pct[i, j]:.1f}%" if support[i, 0] else f"{cm[i, j]}\n–"
                       for j in range(len(folders))] for i in range(len(folders))])
    side = 1.4 * len(folders) + 3.0
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    sns.heatmap(np.nan_to_num(row_pct), annot=annot, fmt="", cmap="Blues", vmin=0, vmax=100,
                xticklabels=folders, yticklabels=folders, linewidths=0.5, square=True,
                cbar_kws={"label": "% of the true class"}, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (count, row %)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    plt.setp(ax.get_yticklabels(), rotation=0)
    fig.tight_layout()
    common.atomic_save_figure(fig, path, dpi=150)
    plt.close(fig)


def plot_roc_curves(y_true, probs, folders, metrics, path):
    """One-vs-rest ROC curve per class and their macro average, AUROC (95% CI) in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    grid = np.linspace(0.0, 1.0, 201)
    fig, ax = plt.subplots(figsize=(7, 6))
    curves = []
    for k, folder in enumerate(folders):
        stats = metrics["per_class"][folder]
        if stats["auroc"] is None:
            ax.plot([], [], " ", label=f"{folder}: AUROC n/a (class absent or alone)")
            continue
        fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
        ax.plot(fpr, tpr, lw=1.8, label=f"{folder}: AUROC {format_value(stats['auroc'], stats['auroc_ci'])}")
        curves.append(np.interp(grid, fpr, tpr))
    if metrics["macro_auroc"] is not None:
        mean_tpr = np.mean(curves, axis=0)
        mean_tpr[0] = 0.0
        ax.plot(grid, mean_tpr, "k--", lw=2, label="macro average: AUROC "
                + format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title="ROC curves, one class vs the rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    common.atomic_save_figure(fig, path, dpi=150)
    plt.close(fig)


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


def resolve_checkpoint(spec):
    """{'kind', 'spec', 'data', 'sha256'} for a checkpoint file or an open_clip pretrained tag."""
    path = Path(spec)
    if path.is_file():
        data = common.load_checkpoint_file(path)
        kind = checkpoint_kind(data)
        if kind is None:
            raise common.CheckpointError(f"{path}: holds no model state_dict (expected a checkpoint "
                                         "of clip_train.py or a plain open_clip state_dict)")
        return {"kind": kind, "spec": str(path), "data": data, "sha256": common.file_sha256(path)}
    if path.exists():
        raise common.CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if path.suffix.lower() in WEIGHT_SUFFIXES or len(path.parts) > 1:
        raise common.CheckpointError(f"{path}: no such checkpoint file")
    return {"kind": "tag", "spec": str(spec), "data": None, "sha256": None}


def resolve_model_name(args, checkpoint):
    """The architecture: the checkpoint's own, else --model-name (or the --model-config stem)."""
    config_name = None
    if args.model_config:
        config_name, _config = common.register_model_config(args.model_config)
        if args.model_name and args.model_name != config_name:
            raise ValueError(f"--model-name {args.model_name} differs from the --model-config "
                             f"architecture {config_name}")
    requested = args.model_name or config_name
    if checkpoint["kind"] != "ours":
        if not requested:
            what = "a pretrained tag" if checkpoint["kind"] == "tag" else "a plain state_dict"
            raise ValueError(f"--model-name is required: --checkpoint {checkpoint['spec']} is {what} "
                             "without architecture metadata (e.g. --model-name ViT-B-32-256)")
        return requested
    data = checkpoint["data"]
    name = data.get("model_name")
    if not isinstance(name, str) or not name:
        raise common.CheckpointError(f"{checkpoint['spec']}: metadata lacks the model_name")
    if requested and requested != name:
        raise ValueError(f"--model-name {requested} differs from the architecture {name} stored in "
                         f"{checkpoint['spec']}; leave --model-name out to use the checkpoint's")
    if isinstance(data.get("model_config"), dict):
        common.register_model_config_dict(name, data["model_config"])
    return name


def load_weights(model, model_name, checkpoint):
    """Load a file checkpoint's state_dict into the model, with a clear error when it does not fit."""
    data = checkpoint["data"]
    state_dict = common.clean_state_dict(data["state_dict"] if "state_dict" in data else data)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise common.CheckpointError(
            f"{checkpoint['spec']}: weights do not fit architecture {model_name} ({len(missing)} "
            f"missing and {len(unexpected)} unexpected keys, e.g. {example!r}); pass the "
            "--model-name the weights were trained with")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:  # same keys, different shapes
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        detail = details[0][:240] if details else str(err)[:240]
        raise common.CheckpointError(f"{checkpoint['spec']}: weights do not fit architecture "
                                     f"{model_name} ({detail})") from None


def eval_transform(model, model_name, pretrained, default):
    """The evaluation transform the weights were trained with: the pretrained tag's mean, std and
    resizing when the checkpoint names a tag (as clip_train.py used), else `default`."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if isinstance(pretrained, str) else {}
    base = getattr(model.visual, "preprocess_cfg", None)
    if not tag_cfg or base is None:
        return default
    return image_transform_v2(PreprocessCfg(**merge_preprocess_dict(base, tag_cfg)), is_train=False)


def build_model(model_name, checkpoint, device):
    """(model in eval mode, evaluation transform, tokenizer) for a checkpoint file or a tag."""
    spec = checkpoint["spec"]
    if checkpoint["kind"] == "tag":
        if model_name in open_clip.list_models():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if spec not in tags:
                raise common.CheckpointError(f"--checkpoint {spec}: not a file, nor a pretrained tag of "
                                             f"{model_name} (its tags: {', '.join(tags) or 'none'})")
        try:
            model, _train_tf, preprocess, tokenizer = common.create_model(model_name, spec, device)
        except (RuntimeError, OSError) as err:
            raise common.CheckpointError(f"--checkpoint {spec}: could not load the pretrained weights "
                                         f"of {model_name} ({str(err).strip().splitlines()[0][:300]}); "
                                         "offline, pass a local weights file") from None
        return model.eval(), preprocess, tokenizer
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; weights follow
    try:
        model, _train_tf, preprocess, tokenizer = common.create_model(model_name, None, device)
    finally:
        logging.disable(logging.NOTSET)
    load_weights(model, model_name, checkpoint)
    pretrained = checkpoint["data"].get("pretrained") if checkpoint["kind"] == "ours" else None
    return model.eval(), eval_transform(model, model_name, pretrained, preprocess), tokenizer


def load_classes(prompts_path, checkpoint):
    """(classes, source): --prompts, else the checkpoint's stored prompt set, else the published one."""
    data = checkpoint["data"] if checkpoint["kind"] == "ours" else {}
    stored = data.get("class_folders")
    if prompts_path:
        classes, source = prompt_sets.load_prompt_set(prompts_path), f"--prompts {prompts_path}"
        if stored and list(stored) != prompt_sets.class_folders(classes):
            LOG.warning("--prompts classes %s differ from the checkpoint's %s",
                        prompt_sets.class_folders(classes), list(stored))
        return classes, source
    if data.get("prompts"):
        where = f"{checkpoint['spec']} (stored prompts)"
        return prompt_sets.parse_prompt_set(data["prompts"], where), f"stored in {checkpoint['spec']}"
    classes = prompt_sets.load_prompt_set(None)
    if stored and list(stored) != prompt_sets.class_folders(classes):
        raise common.CheckpointError(f"{checkpoint['spec']}: trained on classes {list(stored)} but "
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
                f"{test_dir}: folder(s) {', '.join(repr(u) for u in unknown)} are not classes of "
                f"this model {folders}; move them out, or pass --prompts defining them")
        if not items:
            raise common.CohortError(f"{test_dir}: no images in the class folders {known}")
        return items, True
    items = [(path, -1) for path in sorted(test_dir.rglob("*"))
             if path.is_file() and common.is_candidate_image(path)
             and output_dir not in path.resolve().parents
             and not any(part.startswith(".") for part in path.relative_to(test_dir).parts)]
    if not items:
        raise common.CohortError(f"{test_dir}: no images found (and no class folders {folders})")
    return items, False


# ----------------------------------------------------------------------------------------------
# Prediction and outputs


def predict(model, tokenizer, preprocess, items, classes, args, logit_scale_mode):
    """Class probabilities (N, C) float64, NaN rows where unreadable, and a status per row."""
    from tqdm import tqdm
    image_size_px = common.model_image_size(model)
    dataset = common.ImageListDataset(items, preprocess, min_side_px=image_size_px,
                                      image_shape=(3, image_size_px, image_size_px))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=args.device.type == "cuda", worker_init_fn=common.seed_worker)
    progress = lambda batches: tqdm(batches, desc="encoding images", unit="batch",  # noqa: E731
                                    disable=args.no_progress)
    with torch.inference_mode():
        with common.autocast_context(args.device, args.precision):
            classifier = common.build_zero_shot_classifier(
                model, tokenizer, [list(c.eval) for c in classes], args.device)  # (D, C)
        features, ok = common.encode_image_batches(model, loader, args.device, args.precision, progress)
        # The published code scaled by the raw log temperature; reproduce it only when asked.
        scale = model.logit_scale if logit_scale_mode == "published-log" else model.logit_scale.exp()
        logits = common.zero_shot_logits(features, classifier.float().cpu(), scale.float().cpu())
        probs = logits.softmax(dim=-1).double().numpy()  # (N, C)
    ok = ok.numpy()
    probs[~ok] = np.nan
    reasons = common.read_failures(items, np.flatnonzero(~ok).tolist())
    statuses = ["ok" if good else f"failed: {reasons[i]}" for i, good in enumerate(ok)]
    return probs, statuses


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


def write_scored_outputs(output_dir, y_true, probs, folders, metrics):
    """classification_report.txt, confusion_matrix.csv/.png and roc_curves.png."""
    from sklearn.metrics import classification_report
    y_pred = probs.argmax(axis=1)
    report = classification_report(y_true, y_pred, labels=list(range(len(folders))),
                                   target_names=folders, digits=3, zero_division=0)
    common.atomic_write_text(output_dir / "classification_report.txt", report)
    common.atomic_write_csv(output_dir / "confusion_matrix.csv",
                            confusion_frame(metrics["confusion_matrix"], folders))
    plot_confusion_matrix(metrics["confusion_matrix"], folders, output_dir / "confusion_matrix.png")
    plot_roc_curves(y_true, probs, folders, metrics, output_dir / "roc_curves.png")


def run_info(args, checkpoint, model_name, classes, prompt_source, logit_scale_mode):
    """What was evaluated, recorded in metrics.json, args.json and report.md."""
    return {
        "checkpoint": checkpoint["spec"],
        "checkpoint_kind": {"ours": "Orbital-CLIP checkpoint", "state_dict": "plain state_dict",
                            "tag": "open_clip pretrained tag"}[checkpoint["kind"]],
        "checkpoint_sha256": checkpoint["sha256"],
        "model_name": model_name,
        "class_folders": prompt_sets.class_folders(classes),
        "prompts": prompt_sets.prompt_set_to_dict(classes),
        "prompt_source": prompt_source,
        "logit_scale_mode": logit_scale_mode,
        "test_dir": str(args.test_dir),
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "confidence_level": CONFIDENCE_LEVEL,
        "device": str(args.device),
        "precision": args.precision,
    }


def write_outputs(args, run, items, probs, statuses, labelled):
    """Every output file; returns the metrics dict (None when the test folder is unlabelled)."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(output_dir)
    folders = run["class_folders"]
    frame = predictions_frame(items, args.test_dir, folders, probs, statuses, labelled)
    common.atomic_write_csv(output_dir / "predictions.csv", frame)
    args_dict = {key: str(value) if isinstance(value, (Path, torch.device)) else value
                 for key, value in vars(args).items()}
    common.atomic_write_json(output_dir / "args.json", {
        "args": args_dict, "run": run, "python": platform.python_version(),
        "torch": torch.__version__, "open_clip": open_clip.__version__})
    metrics = None
    if labelled:
        scored = np.isfinite(probs).all(axis=1)
        y_true = np.array([label for _path, label in items], dtype=np.int64)[scored]
        metrics = compute_metrics(y_true, probs[scored], folders, args.bootstrap, args.seed)
        metrics = {"n": metrics.pop("n"), "n_received": run["n_received"],
                   "n_failed": run["n_failed"], **metrics, **run}
        common.atomic_write_json(output_dir / "metrics.json", metrics)
        if metrics["n"]:  # nothing to tabulate or draw when no image could be read
            write_scored_outputs(output_dir, y_true, probs[scored], folders, metrics)
    report = render_report(run, class_counts(frame, folders, labelled), metrics, folders)
    common.atomic_write_text(output_dir / "report.md", report)
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and model")
    data.add_argument("--test-dir", required=True,
                      help="test cohort: one sub-folder per class (scored), or images without "
                           "class folders (predicted only)")
    data.add_argument("--checkpoint", required=True,
                      help="checkpoint of clip_train.py, a plain open_clip state_dict (needs "
                           "--model-name), or an open_clip pretrained tag for the zero-shot baseline")
    data.add_argument("--model-name", default=None,
                      help="open_clip architecture; optional with our checkpoints (stored in them), "
                           "required otherwise (published: ViT-B-32-256)")
    data.add_argument("--model-config", default=None,
                      help="JSON of a custom open_clip architecture, registered under the file's "
                           "stem (which --model-name then defaults to)")
    data.add_argument("--prompts", default=None,
                      help="JSON prompt set replacing the checkpoint's stored one (schema in prompts.py); "
                           "classes are matched to test folders by name")
    data.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                      help=f"where the outputs go (default {DEFAULT_OUTPUT_DIR}); must be new or empty "
                           "unless --overwrite")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help="images per forward pass (default 64; 256+ is fine on a GPU)")
    run.add_argument("--workers", type=int, default=common.default_workers(),
                     help="image-decoding worker processes (default: cores - 1, at most 8; 0 = in process)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision (auto: bf16 on CUDA, fp32 on CPU; fp16 needs CUDA)")
    run.add_argument("--logit-scale-mode", choices=("exp", "published-log"), default=None,
                     help="softmax temperature: exp(logit_scale) (correct CLIP), or the raw log value "
                          "as the published code did (default: the checkpoint's mode, else exp)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the evaluation files of an earlier run in --output-dir")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                       help="percentile-bootstrap resamples for the 95%% CIs of the overall metrics "
                            "and AUROC (default 2000; under ~500 the interval ends move with the "
                            "seed; 0 = no bootstrap CIs)")
    stats.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default 2024)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0 (0 turns the bootstrap CIs off), got {args.bootstrap}")
    if not Path(args.test_dir).is_dir():
        parser.error(f"--test-dir {args.test_dir}: no such folder")
    for flag, value in (("--model-config", args.model_config), ("--prompts", args.prompts)):
        if value and not Path(value).is_file():
            parser.error(f"{flag} {value}: no such file")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.configure_logging()
    LOG.info("== setup ==")
    for key, value in vars(args).items():
        LOG.info("  %s = %s", key, value)
    try:
        args.device = common.resolve_device(args.device)
        if args.precision == "auto":
            args.precision = "bf16" if args.device.type == "cuda" else "fp32"
        common.autocast_context(args.device, args.precision)
        check_output_dir(args.output_dir, args.overwrite)
        checkpoint = resolve_checkpoint(args.checkpoint)
        model_name = resolve_model_name(args, checkpoint)
        classes, prompt_source = load_classes(args.prompts, checkpoint)
        folders = prompt_sets.class_folders(classes)
        items, labelled = collect_items(args.test_dir, folders, args.output_dir)
        model, preprocess, tokenizer = build_model(model_name, checkpoint, args.device)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stored_mode = (checkpoint["data"] or {}).get("logit_scale_mode") if checkpoint["kind"] == "ours" else None
    logit_scale_mode = args.logit_scale_mode or stored_mode or "exp"
    if 0 < args.bootstrap < 500:
        LOG.warning("--bootstrap %d: so few resamples give unstable interval ends", args.bootstrap)
    LOG.info("== predicting %d images in %s: %s, classes %s, %s, logit scale %s, %s %s ==",
             len(items), args.test_dir, model_name, folders,
             "labelled (scored)" if labelled else "no class folders (predicted, not scored)",
             logit_scale_mode, args.device, args.precision)
    probs, statuses = predict(model, tokenizer, preprocess, items, classes, args, logit_scale_mode)
    run = run_info(args, checkpoint, model_name, classes, prompt_source, logit_scale_mode)
    run["n_received"] = len(items)
    run["n_failed"] = sum(status != "ok" for status in statuses)
    metrics = write_outputs(args, run, items, probs, statuses, labelled)
    if run["n_failed"] == len(items):
        print(f"error: none of the {len(items)} images could be read; the reasons are in the "
              f"status column of {Path(args.output_dir) / 'predictions.csv'}", file=sys.stderr)
        return 1
    if run["n_failed"]:
        LOG.warning("%d of %d images could not be read; see status in predictions.csv",
                    run["n_failed"], len(items))
    if metrics is None:
        LOG.info("== done: %d images predicted, not scored (no class folders); outputs in %s ==",
                 len(items) - run["n_failed"], args.output_dir)
    else:
        LOG.info("== done: n %d  accuracy %s  balanced accuracy %s  macro AUROC %s; outputs in %s ==",
                 metrics["n"], format_value(metrics["accuracy"], metrics["accuracy_ci"]),
                 format_value(metrics["balanced_accuracy"], metrics["balanced_accuracy_ci"]),
                 format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
