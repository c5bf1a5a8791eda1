"""metrics.json's numbers and their intervals: the vectorised (image or group) percentile
bootstrap, weighted AUROC/AUPRC with ties, and `compute_metrics`, which every scoring path calls.
"""

import logging
import math

import numpy as np

from orbital_clip.metrics.calibration import (CALIBRATION_METRICS, DEFAULT_ECE_BINS,
                                              brier_per_image, calibration_bins, log_loss_per_image)
from orbital_clip.metrics.classification import (CLASS_AVERAGED, CONFIDENCE_LEVEL,
                                                 DEFAULT_BOOTSTRAP, DEFAULT_SEED, OVERALL_METRICS,
                                                 confusion_matrices, metrics_from_confusion,
                                                 per_class_metrics)

LOG = logging.getLogger(__name__)
BOOTSTRAP_CHUNK = 256  # replicates evaluated together: memory ~ CHUNK x N numbers per array


# ----------------------------------------------------------------------------------------------
# Every metric as a weighted sum (pure). The bootstrap draws each resample as a vector of weights
# (how often each image is drawn), so a replicate is a matrix product and a cumulative sum over a
# ranking sorted once: thousands of replicates of 5,000 images take about a second. The point
# estimates use the same code with unit weights, so an interval always belongs to its estimate;
# the tests check every one against scikit-learn.


def tie_blocks(scores):
    """(order, starts): the ascending sort of `scores` and where each run of equal scores begins
    in it (ties are one threshold, as in scikit-learn's curves)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ranked)) + 1]) if len(ranked) else np.zeros(0, int)
    return order, starts


def weighted_auroc_auprc(weights, order, starts, positive):
    """One-vs-rest AUROC (Mann-Whitney, ties count one half) and average precision (AUPRC, the
    step-wise sum over thresholds of recall gain x precision, as scikit-learn's
    average_precision_score) of each row of weights.

    Parameters
    ----------
    weights : (B, N) float array
        How often each image counts in each replicate (ones for the point estimate).
    order, starts : arrays from `tie_blocks(scores)`.
    positive : (N,) bool array
        Images of the class.

    Returns
    -------
    (auroc, auprc), each (B,), NaN where a replicate has no positive or no negative image.
    """
    ranked = weights[:, order]  # (B, N), ascending score
    hit = positive[order].astype(np.float64)
    pos = np.add.reduceat(ranked * hit, starts, axis=1)  # (B, J) positive weight per tie block
    neg = np.add.reduceat(ranked * (1.0 - hit), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        tp_at = n_pos[:, None] - (np.cumsum(pos, axis=1) - pos)  # positives scored >= the block
        fp_at = n_neg[:, None] - neg_below
        precision = np.where(pos > 0, tp_at / np.maximum(tp_at + fp_at, 1e-300), 0.0)
        auprc = (pos * precision).sum(axis=1) / n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    return np.where(defined, auroc, np.nan), np.where(defined, auprc, np.nan)


def prepare_scores(y_true, probs, n_bins=DEFAULT_ECE_BINS, probs_cal=None):
    """The per-image quantities whose weighted sums give every metric of one model.

    Returns
    -------
    dict: columns (N, K) float array (confusion cell one-hots, Brier and log-loss terms, ECE bin
    sums, each also for `probs_cal`), slices name -> columns slice, ranking (per class the
    `tie_blocks` of its probability), positive (N, C) bool, n_classes.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    blocks = {"cm": np.eye(n_classes * n_classes)[y_true * n_classes + probs.argmax(axis=1)]}
    for suffix, p in (("", probs), ("_cal", probs_cal)):
        if p is None:
            continue
        confidence = p.max(axis=1)
        in_bin = np.eye(n_bins)[calibration_bins(confidence, n_bins)]  # (N, bins)
        blocks["brier" + suffix] = brier_per_image(y_true, p)[:, None]
        blocks["log_loss" + suffix] = log_loss_per_image(y_true, p)[:, None]
        blocks["ece_gap" + suffix] = in_bin * (confidence - (p.argmax(axis=1) == y_true))[:, None]
    slices, start = {}, 0
    for name, block in blocks.items():
        slices[name] = slice(start, start + block.shape[1])
        start += block.shape[1]
    return {"columns": np.hstack(list(blocks.values())), "slices": slices,
            "ranking": [tie_blocks(probs[:, k]) for k in range(n_classes)],
            "positive": y_true[:, None] == np.arange(n_classes), "n_classes": n_classes}


def weighted_metrics(weights, prepared):
    """Every metric of one model under each row of weights (see `prepare_scores`).

    Returns
    -------
    dict: each name of OVERALL_METRICS (and brier_cal, log_loss_cal, ece_cal when prepared with
    calibrated probabilities) -> (B,); f1, auroc, auprc -> (B, C). NaN where undefined.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    sums = weights @ prepared["columns"]  # (B, K)
    total = weights.sum(axis=1)
    n_classes, slices = prepared["n_classes"], prepared["slices"]
    out = metrics_from_confusion(sums[:, slices["cm"]].reshape(-1, n_classes, n_classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        for suffix in ("", "_cal"):
            if "brier" + suffix in slices:
                out["brier" + suffix] = sums[:, slices["brier" + suffix]][:, 0] / total
                out["log_loss" + suffix] = sums[:, slices["log_loss" + suffix]][:, 0] / total
                out["ece" + suffix] = np.abs(sums[:, slices["ece_gap" + suffix]]).sum(axis=1) / total
    curves = [weighted_auroc_auprc(weights, order, starts, prepared["positive"][:, k])
              for k, (order, starts) in enumerate(prepared["ranking"])]
    out["auroc"] = np.stack([auroc for auroc, _ in curves], axis=1)  # (B, C)
    out["auprc"] = np.stack([auprc for _, auprc in curves], axis=1)
    out["macro_auroc"] = out["auroc"].mean(axis=1)  # NaN when a class is missing
    out["macro_auprc"] = out["auprc"].mean(axis=1)
    return out


def group_indices(groups, n):
    """(N,) int index of each image's group (0..G-1), or each image its own group when None."""
    if groups is None:
        return np.arange(n)
    _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return index.reshape(-1)


def bootstrap_strata(y_true, group_index):
    """Stratum (a class index) of each group for the class-stratified bootstrap.

    A group (a patient, or one image) whose images are all of one class is stratified by that
    class. A patient with images in several classes is stratified by the rarest of them (the
    class held by the fewest groups of the cohort; ties go to the class held by the earliest
    group in the canonical group order, never to the lower class index: class order is
    presentation, and a permuted --classes must draw the same resamples). Every class that is
    some group's rarest class is then in
    every resample; a class whose every patient also has a rarer class may still be missing from
    some (those resamples are counted as unusable for the class-averaged metrics).

    Parameters
    ----------
    y_true : (N,) int array
        True class of each image.
    group_index : (N,) int array
        Group of each image, 0..G-1 (see `group_indices`).

    Returns
    -------
    (G,) int array: the stratum (class index) of each group.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    group_index = np.asarray(group_index, dtype=np.int64)
    if len(y_true) == 0:
        return np.zeros(0, dtype=np.int64)
    n_groups, n_classes = int(group_index.max()) + 1, int(y_true.max()) + 1
    holds = np.zeros((n_groups, n_classes), dtype=bool)
    holds[group_index, y_true] = True  # (G, C): the group has an image of the class
    # rarest class first; ties by which groups hold the class (earliest first), never by its
    # index. Classes held by exactly the same groups stay tied, but then either choice puts
    # those groups in one stratum: the same partition, so the same resamples.
    rarity = np.lexsort((*~holds[::-1], holds.sum(axis=0)))
    rank = np.empty(n_classes, dtype=np.int64)
    rank[rarity] = np.arange(n_classes)
    return np.where(holds, rank, n_classes).argmin(axis=1)  # column of the rarest class held


def canonical_strata(strata):
    """(G,) strata renumbered 0, 1, ... in the order of their first group: the same partition
    of the groups gets the same numbers whatever the labels (class indices) were."""
    strata = np.asarray(strata, np.int64)
    if not len(strata):
        return strata
    _, first, inverse = np.unique(strata, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def resample_weights(group_index, n_bootstrap, seed, chunk=BOOTSTRAP_CHUNK, strata=None):
    """Yield (b, N) float arrays of bootstrap weights, `chunk` replicates at a time.

    Each replicate draws groups with replacement (a cluster bootstrap: the images of a patient
    stay together); an image's weight is how often its group was drawn. One group per image is
    the ordinary bootstrap of images. With `strata` ((G,) stratum of each group) each stratum is
    resampled on its own, as many groups as it holds, so every resample keeps the cohort's
    number of groups per stratum (a stratified bootstrap); without, all G groups are one stratum.
    The same seed, groups and strata give the same replicates, whatever the chunk size, and
    whatever the strata are called: they are taken in the order of their first group (see
    `canonical_strata`), so renumbering the classes draws the same resamples.
    """
    rng = np.random.default_rng(seed)
    group_index = np.asarray(group_index, dtype=np.int64)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    strata = np.zeros(n_groups, np.int64) if strata is None else canonical_strata(strata)
    order = np.argsort(strata, kind="stable")  # groups sorted by stratum: one slot per group
    _, first, size = np.unique(strata[order], return_index=True, return_counts=True)
    slot_first = np.repeat(first, size)  # (G,) where the slot's stratum starts in `order`
    slot_size = np.repeat(size, size)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        # One uniform per slot and replicate, drawn row by row, so chunking changes nothing;
        # the slot then picks a group of its own stratum.
        pick = np.minimum((rng.random((b, n_groups)) * slot_size).astype(np.int64), slot_size - 1)
        draws = order[slot_first + pick] + np.arange(b)[:, None] * n_groups
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, group_index].astype(np.float64)


def mark_unusable(replicates, present=None):
    """Replicates (or a point estimate, B = 1) in place: one without an image of a declared class
    gives no class-averaged metric (CLASS_AVERAGED) and no F1 of that class (NaN: unusable, left
    out of the interval and counted), instead of averaging over fewer classes or scoring the
    absent class 0. Every evaluation path (metrics.json, --compare, subgroups) calls this.

    Parameters
    ----------
    replicates : dict name -> (B,) or (B, C) arrays, with "support" (B, C)
    present : (C,) bool, optional
        The classes that must be present; every declared class when None (the rule).
    """
    support = replicates["support"]
    present = np.ones(support.shape[1], bool) if present is None else np.asarray(present, bool)
    absent = (support == 0) & present[None, :]  # (B, C)
    unusable = absent.any(axis=1)
    for name in CLASS_AVERAGED:
        if name in replicates:
            replicates[name] = np.where(unusable, np.nan, replicates[name])
    if "f1" in replicates:  # the comparison's replicates carry no per-class F1
        replicates["f1"] = np.where(absent, np.nan, replicates["f1"])
    return replicates


def unscored_classes(y_true, class_names):
    """The declared classes with no scored image (their class-averaged metrics are n/a)."""
    support = np.bincount(np.asarray(y_true, np.int64), minlength=len(class_names))
    return [name for name, count in zip(class_names, support) if count == 0]


def bootstrap_replicates(prepared_list, group_index, n_bootstrap, seed, stratify=True):
    """`weighted_metrics` of each prepared model on the same resamples (paired when several),
    stratified by class (see `bootstrap_strata`) unless `stratify` is False.

    Returns
    -------
    list (one per prepared model) of dict name -> (B,) or (B, C) arrays.
    """
    positive = prepared_list[0]["positive"]  # (N, C): the true class of each image
    strata = bootstrap_strata(positive.argmax(axis=1), group_index) if stratify else None
    parts = [dict() for _ in prepared_list]
    for weights in resample_weights(group_index, n_bootstrap, seed, strata=strata):
        for store, prepared in zip(parts, prepared_list):
            for name, values in weighted_metrics(weights, prepared).items():
                store.setdefault(name, []).append(values)
    return [mark_unusable({name: np.concatenate(values) for name, values in store.items()})
            for store in parts]


def percentile_interval(values, confidence=CONFIDENCE_LEVEL):
    """[low, high] percentile interval of the finite bootstrap values, or None if none are."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def finite_or_none(value):
    """A float, or None for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Assembling metrics.json (pure: arrays in, plain dicts out)


def empty_metrics(class_names):
    """metrics.json skeleton when no image could be scored: every value None."""
    metrics = {"n": 0, "unscored_classes": list(class_names)}
    for name in OVERALL_METRICS:
        metrics[name], metrics[f"{name}_ci"], metrics[f"{name}_ci_n_resamples"] = None, None, None
    metrics["per_class"] = {name: {} for name in class_names}
    metrics["confusion_matrix"] = np.zeros((len(class_names),) * 2, dtype=int).tolist()
    return metrics


def compute_metrics(y_true, probs, class_names, n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED,
                    confidence=CONFIDENCE_LEVEL, *, groups=None, probs_cal=None,
                    ece_bins=DEFAULT_ECE_BINS):
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
        Percentile-bootstrap resamples for the CIs of the overall metrics and of the per-class
        F1, AUROC and AUPRC; 0 leaves those CIs None. Proportions use Wilson intervals, LR+/LR-
        the log method.
    seed : int
        Seed of the bootstrap.
    confidence : float
        Level of every interval.
    groups : (N,) array of str, optional
        Patient (or other cluster) of each image: the bootstrap resamples groups, not images.
        Either way the resamples are stratified by class (see `bootstrap_strata`).
    probs_cal : (N, C) float array, optional
        Temperature-scaled probabilities: adds `temperature_scaled` (Brier, log-loss, ECE).
    ece_bins : int
        Equal-width bins of the max probability for the ECE.

    Returns
    -------
    dict with n, each of OVERALL_METRICS beside its `<name>_ci` and `<name>_ci_n_resamples`
    (the usable resamples behind the interval), ece_bins, bootstrap_unit, n_groups,
    bootstrap_design, temperature_scaled, confusion_matrix (rows true) and per_class[name] (see
    `per_class_metrics`, plus f1, auroc, auprc with `_ci` and `_ci_n_resamples`, and
    auprc_baseline, the expected AUPRC of a random ranking). Undefined: None.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(class_names))
    n = len(y_true)
    metrics = empty_metrics(class_names) if n == 0 else {"n": n}
    group_index = group_indices(groups, n)
    metrics.update(ece_bins=ece_bins, bootstrap_unit="image" if groups is None else "group",
                   n_groups=int(group_index.max()) + 1 if n else 0, temperature_scaled=None,
                   bootstrap_design=bootstrap_design(y_true, group_index, class_names, n_bootstrap,
                                                     groups is not None))
    if n == 0:
        return metrics
    prepared = prepare_scores(y_true, probs, ece_bins, probs_cal)
    point = mark_unusable(weighted_metrics(np.ones((1, n)), prepared))
    metrics["unscored_classes"] = unscored_classes(y_true, class_names)
    if metrics["unscored_classes"]:  # e.g. a reader who answered no image of the class
        LOG.warning("no scored image of class(es) %s: %s are n/a (an average over the other "
                    "classes would pass for one over all)", ", ".join(metrics["unscored_classes"]),
                    ", ".join(CLASS_AVERAGED))
    boot = bootstrap_replicates([prepared], group_index, n_bootstrap, seed)[0] if n_bootstrap else None

    def estimate(store, key, name, column=None):
        """store[key], store[key_ci] and store[key_ci_n_resamples] (the finite replicates the
        interval rests on; below n_bootstrap when some resamples left it undefined)."""
        value = point[name][0] if column is None else point[name][0, column]
        value = finite_or_none(value)
        replicates = None if boot is None else (boot[name] if column is None else boot[name][:, column])
        usable = None if replicates is None or value is None else int(np.isfinite(replicates).sum())
        store[key] = value
        store[f"{key}_ci"] = percentile_interval(replicates, confidence) if usable else None
        store[f"{key}_ci_n_resamples"] = usable

    for name in OVERALL_METRICS:
        estimate(metrics, name, name)
    if probs_cal is not None:
        metrics["temperature_scaled"] = {}
        for name in CALIBRATION_METRICS:
            estimate(metrics["temperature_scaled"], name, name + "_cal")
    cm = confusion_matrices(y_true, probs.argmax(axis=1), len(class_names))
    metrics["per_class"] = {}
    for k, name in enumerate(class_names):
        stats = per_class_metrics(cm, k, confidence)
        for metric in ("f1", "auroc", "auprc"):
            estimate(stats, metric, metric, k)
        # AUPRC of a random ranking for these counts (not the prevalence, its large-n limit)
        stats["auprc_baseline"] = expected_random_average_precision(stats["support"], n)
        metrics["per_class"][name] = stats
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


def bootstrap_design(y_true, group_index, class_names, n_bootstrap, grouped):
    """How the bootstrap resamples (metrics.json's `bootstrap_design`): resamples, unit, the
    stratification rule and the units per stratum (class)."""
    unit = "patient" if grouped else "image"
    design = {"resamples": int(n_bootstrap), "unit": unit,
              "stratified_by": "true class" if not grouped else
              "the patient's class; a patient with images in several classes by the rarest of them",
              "units_per_stratum": None}
    if len(y_true):
        strata = bootstrap_strata(y_true, group_index)
        counts = np.bincount(strata, minlength=len(class_names))
        design["units_per_stratum"] = {name: int(c) for name, c in zip(class_names, counts)}
    return design


def expected_random_average_precision(n_positive, n_total):
    """Expected average precision (AUPRC as scikit-learn computes it) of a random ranking of
    n_total images of which n_positive are positive: the chance level of AUPRC for this cohort.

    Each position r (1..n) holds a positive with probability m/n, and given that, the other r-1
    images above it hold (r-1)(m-1)/(n-1) positives on average, so
    E[AP] = (1/n) sum_r (1 + (r-1)(m-1)/(n-1)) / r = (H_n + (m-1)/(n-1) (n - H_n)) / n,
    H_n the n-th harmonic number (Bestgen 2015). It tends to the prevalence m/n for large n;
    with 4 positives among 80 it is 0.098, not 0.05. None without a positive or a negative.
    """
    m, n = int(n_positive), int(n_total)
    if m == 0 or m == n:
        return None
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    return (harmonic + (m - 1) / (n - 1) * (n - harmonic)) / n


def interval_levels(grouped, n_bootstrap):
    """metrics.json's `interval_levels`: for each family of intervals, whether it is image- or
    patient-level and by which method (Wilson and the log method count images as independent;
    the bootstrap resamples patients when groups are known)."""
    unit = "patient" if grouped else "image"
    boot = (f"{unit} (percentile bootstrap of {unit}s stratified by class, {n_bootstrap} resamples)"
            if n_bootstrap else "none (--bootstrap 0)")
    levels = {"overall <metric>_ci": boot,
              "per_class f1_ci, auroc_ci, auprc_ci": boot,
              "per_class sensitivity_ci, specificity_ci, ppv_ci, npv_ci": "image (Wilson)",
              "per_class lr_pos_ci, lr_neg_ci": "image (log method)",
              "operating_point <rule>.<metric>_ci": "image (Wilson)",
              "itd_*_ci, itd_rule_*_ci": "image (Wilson)"}
    if grouped and n_bootstrap:
        levels["operating_point <rule>.sensitivity_ci_patient, specificity_ci_patient"] = boot
    return levels
