"""Which split (and fold) each image goes to: stratified by class with largest-remainder rounding,
patients (units) never divided. Pure functions first, then their application to the records."""

import math
import random
from collections import Counter, defaultdict
from fractions import Fraction

from orbital_clip.split.duplicates import find_duplicates
from orbital_clip.split.grouping import assign_group_labels, report_mixed_groups
from orbital_clip.split.records import LOG, SplitError

# Ratios are used as exact fractions (0.2 -> 1/5), so 10 x 0.2 is 2 and not 2.0000000000000004.
RATIO_MAX_DENOMINATOR = 1_000_000


def _exact_ratio(ratio):
    return Fraction(ratio).limit_denominator(RATIO_MAX_DENOMINATOR)


def allocate_split_counts(n, val_ratio, test_ratio=0.0):
    """(n_train, n_val, n_test) for a class of n images, by largest remainder.

    The quotas n*ratio are floored and the images left over go to the largest fractional
    remainders (ties: train, then val, then test). Then minimums: a class with >= 1 image keeps a
    training image, one with >= 2 images gets a validation image (when val_ratio > 0), one with
    >= 3 a test image (when test_ratio > 0); each is taken from the split with the most images to
    spare above its own minimum (train on ties), so the last training image is never taken.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    val, test = _exact_ratio(val_ratio), _exact_ratio(test_ratio)
    quotas = [n * (1 - val - test), n * val, n * test]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    minimum = [int(n >= 1), int(val > 0 and n >= 2), int(test > 0 and n >= 3)]
    for i in range(3):
        if counts[i] < minimum[i]:  # sum(minimum) <= n, so a donor with images to spare exists
            donor = max(range(3), key=lambda j: (counts[j] - minimum[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return tuple(counts)


def assign_units_to_splits(unit_sizes, quotas, rng):
    """Greedy group-level allocation for one class: {unit key: split index}.

    Args:
        unit_sizes: {unit key: number of images}; a unit (a patient, say) is never divided.
        quotas: (train, val, test) image counts to aim for, from `allocate_split_counts`.
        rng: a `random.Random`; the only source of randomness.
    Units are shuffled, then placed largest first (a big unit placed last would overshoot a small
    split; equal sizes keep the shuffled order), each into the split furthest below its quota.
    With units of one image this reproduces the quotas exactly.
    """
    keys = sorted(unit_sizes)
    rng.shuffle(keys)
    keys.sort(key=lambda k: -unit_sizes[k])
    open_splits = [i for i, quota in enumerate(quotas) if quota > 0] or [0]
    filled = [0] * len(quotas)

    def priority(i):
        deficit = quotas[i] - filled[i]
        # Ties: while there is room, serve the small splits first; once all are full, overflow
        # into train, where one unit more matters least.
        return deficit, (i if deficit > 0 else -i)

    assignment = {}
    for key in keys:
        split = max(open_splits, key=priority)
        assignment[key] = split
        filled[split] += unit_sizes[key]
    _ensure_minimum_units(assignment, unit_sizes, quotas)
    return assignment


def _ensure_minimum_units(assignment, unit_sizes, quotas):
    """Group-level minimums, as in `allocate_split_counts` but counted in units (in place)."""
    n_units = len(assignment)
    minimum = [int(n_units >= 1), int(quotas[1] > 0 and n_units >= 2),
               int(quotas[2] > 0 and n_units >= 3)]

    def members(split):
        return [key for key, value in assignment.items() if value == split]

    for split in range(3):
        if len(members(split)) < minimum[split]:
            donor = max(range(3), key=lambda s: (len(members(s)) - minimum[s], -s))
            smallest = min(members(donor), key=lambda k: (unit_sizes[k], k))
            assignment[smallest] = split


def majority_label(labels):
    """The most frequent class index (ties: the lowest index, i.e. the rarer-by-design class)."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def stratified_group_split(labels, units, val_ratio, test_ratio, seed):
    """Split index (0 train, 1 val, 2 test) for each image, stratified by class.

    Args:
        labels: class index per image.
        units: key per image; images sharing a key always land in the same split. A unit
            spanning classes is kept whole and allocated with its majority class.
        seed: int; each class draws from its own generator, so adding images to one class does
            not reshuffle the others.
    """
    members = defaultdict(list)
    for index, key in enumerate(units):
        members[key].append(index)
    unit_label = {key: majority_label([labels[i] for i in idx]) for key, idx in members.items()}
    unit_split = {}
    for label in sorted(set(unit_label.values())):
        sizes = {key: len(members[key]) for key in members if unit_label[key] == label}
        quotas = allocate_split_counts(sum(sizes.values()), val_ratio, test_ratio)
        rng = random.Random(f"{seed}/{label}")
        unit_split.update(assign_units_to_splits(sizes, quotas, rng))
    return [unit_split[key] for key in units]


def assign_folds(labels, units, n_folds, seed):
    """Fold index (0..n_folds-1) per image: stratified by class, units never divided.

    Per class (of a unit's majority label), units are shuffled with a per-class generator, then
    placed largest first into the fold holding the fewest images of that class (ties: the fold
    with the fewest images overall, then the lowest index). A class with at least n_folds units
    so reaches every fold, and fold sizes differ by at most one unit per class.
    """
    members = defaultdict(list)
    for index, key in enumerate(units):
        members[key].append(index)
    unit_label = {key: majority_label([labels[i] for i in idx]) for key, idx in members.items()}
    total = [0] * n_folds
    unit_fold = {}
    for label in sorted(set(unit_label.values())):
        keys = sorted(key for key in members if unit_label[key] == label)
        random.Random(f"{seed}/fold/{label}").shuffle(keys)
        keys.sort(key=lambda k: -len(members[k]))
        of_class = [0] * n_folds
        for key in keys:
            fold = min(range(n_folds), key=lambda f: (of_class[f], total[f], f))
            unit_fold[key] = fold
            of_class[fold] += len(members[key])
            total[fold] += len(members[key])
    return [unit_fold[key] for key in units]


def merge_linked_units(units, links):
    """Unit keys after joining the units of every linked (i, j) pair of image indices
    (union-find; a merged unit is named by its smallest key)."""
    parent = {key: key for key in units}

    def find(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for i, j in links:
        a, b = find(units[i]), find(units[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(key) for key in units]


def strata_labels(records, column=None):
    """The stratum of each image: its class, or with `column` (--stratify-by) class x that
    attribute, numbered so that the class stays the leading key (an empty cell is a level too)."""
    if not column:
        return [r.label for r in records]
    levels = sorted({r.attributes.get(column, "") for r in records})
    return [r.label * len(levels) + levels.index(r.attributes.get(column, "")) for r in records]


def assign_pool_folds(records, units, n_folds, seed, folders):
    """Set `fold` on the records of the training pool (split 0), in place."""
    pool = [i for i, r in enumerate(records) if r.split == 0]
    pool_units = [units[i] for i in pool]
    if len(set(pool_units)) < n_folds:
        raise SplitError(f"--folds {n_folds}: the training pool holds only "
                         f"{len(set(pool_units))} group(s) (after merging duplicates); use fewer "
                         "folds")
    folds = assign_folds([records[i].label for i in pool], pool_units, n_folds, seed)
    for i, fold in zip(pool, folds):
        records[i].fold = fold
    for label in sorted({records[i].label for i in pool}):
        reached = {records[i].fold for i in pool if records[i].label == label}
        if len(reached) < n_folds:
            LOG.warning("class %r has images in only %d of the %d folds (too few groups); "
                        "the other folds validate without it", folders[label], len(reached),
                        n_folds)


def split_records(records, args, folders, rule=(None, None)):
    """Assign group, split (and fold) to every record in place; returns (the duplicate pairs,
    Grouping). rule: (flag, lookup) from `grouping_rule`."""
    groups, grouping = assign_group_labels(records, *rule)
    report_mixed_groups(records, groups)
    pairs = find_duplicates([r.sha256 for r in records], [r.phash for r in records],
                            [r.phash_fine for r in records], args.near_dup_distance)
    units = merge_linked_units(groups, [(i, j) for j, i, _, _ in pairs])
    splits = stratified_group_split(strata_labels(records, getattr(args, "stratify_by", None)),
                                    units, args.val_ratio, args.test_ratio, args.seed)
    for record, split in zip(records, splits):
        record.split = split
    if args.folds:
        assign_pool_folds(records, units, args.folds, args.seed, folders)
    return pairs, grouping
