"""Patients: the grouping flags (--group-from-folder, --group-regex, --groups, --group-col), the
refusal of a flag that groups no image, and the group of each image."""

import re
from collections import Counter, defaultdict

import pandas as pd

from orbital_clip.metadata import normalise_relpath
from orbital_clip.patients import folder_patient as folder_group  # the rule inference uses too
from orbital_clip.patients import none_grouped_message, regex_patients
from orbital_clip.split.records import LOG, Grouping, SplitError


def group_images(paths, rule, lookup):
    """Group every image; images the rule does not group are their own group, named by their
    path (never by their file stem: camera names such as IMG_0001.JPG repeat in every patient
    folder, and their stems would join unrelated patients).

    Args:
        paths: (source, dest) of each image (see ImageRecord).
        rule: the grouping flag as the user wrote it ("--group-from-folder"), or None.
        lookup: (source, dest) -> (group or None, how it matched); unused without a rule.
    Returns:
        (group per image, Grouping).
    """
    found = [lookup(*p) for p in paths] if rule else [(None, None)] * len(paths)
    groups = [group or source for (source, _), (group, _) in zip(paths, found)]
    grouped_by = Counter(how for group, how in found if group)
    ungrouped = [source for (source, _), (group, _) in zip(paths, found) if not group]
    return groups, Grouping(rule, dict(sorted(grouped_by.items())), ungrouped, len(set(groups)))


def grouping_summary(grouping, n_images, subfolder_example=None):
    """One line saying how the images were grouped into patients (printed with the table)."""
    if grouping.rule is None:
        line = (f"patient groups: none (no grouping flag); each of the {n_images} images is its "
                "own group, so one patient's images can land in different splits")
        if subfolder_example:
            line += (f"; the class folders hold sub-folders (e.g. {subfolder_example!r}): if they "
                     "are patients, pass --group-from-folder")
        return line
    n_grouped = n_images - len(grouping.ungrouped)
    ways = ", ".join(f"{count} by their {how}" for how, count in grouping.grouped_by.items())
    line = (f"patient groups: {grouping.rule} grouped {n_grouped} of {n_images} images "
            f"({ways}) into {grouping.n_groups - len(grouping.ungrouped)} group(s)")
    if grouping.ungrouped:
        line += (f"; {len(grouping.ungrouped)} image(s) are their own group (not matched), e.g. "
                 f"{grouping.ungrouped[0]!r}")
    return line


def read_group_csv(path):
    """{source path relative to the data root: group} from a path,group CSV."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise SplitError(f"--groups {path}: not a readable CSV ({err})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = {"path", "group"} - set(frame.columns)
    if missing:
        raise SplitError(f"--groups {path}: missing column(s) {', '.join(sorted(missing))} "
                         "(expected: path,group with paths relative to --data-root)")
    mapping = {}
    for rel, group in zip(frame["path"], frame["group"]):
        key = normalise_relpath(rel)
        if mapping.get(key, group.strip()) != group.strip():
            raise SplitError(f"--groups {path}: {rel} is listed twice with different groups")
        mapping[key] = group.strip()
    return mapping


def grouping_rule(args, label_groups=None):
    """(the grouping flag as written, lookup (source, dest) -> (group or None, how it
    matched)), or (None, None) without a grouping flag. label_groups: {source: group} from
    --labels with --group-col."""
    if args.group_from_folder:
        return "--group-from-folder", lambda source, dest: (folder_group(dest), "patient folder")
    if args.group_regex is not None:
        pattern = re.compile(args.group_regex)
        return (f"--group-regex '{args.group_regex}'",
                lambda source, dest: regex_patients([source], pattern)[0])
    if args.groups is not None:
        mapping = read_group_csv(args.groups)
        return f"--groups {args.groups}", lambda source, dest: (mapping.get(source) or None,
                                                                "CSV row")
    if args.group_col is not None:
        return (f"--group-col {args.group_col}",
                lambda source, dest: (label_groups.get(source) or None, "CSV row"))
    return None, None


def no_group_message(rule, example, n_images):
    """The refusal for a grouping flag that groups none of the images."""
    return none_grouped_message(rule, n_images, example, "an image-level split")


def check_grouping(paths, rule, lookup, groups_csv=None):
    """Before any image is read: refuse a grouping flag that groups none of the scanned images
    (paths: their (source, dest)); warn about --groups entries naming no scanned image."""
    if rule is None:
        return
    _, grouping = group_images(paths, rule, lookup)
    if not grouping.grouped_by:
        raise SplitError(no_group_message(rule, paths[0][0], len(paths)))
    if groups_csv is not None:
        unused = set(read_group_csv(groups_csv)) - {source for source, _ in paths}
        if unused:
            LOG.warning("--groups: %d listed path(s) are not image files here, e.g. %s",
                        len(unused), sorted(unused)[0])


def assign_group_labels(records, rule, lookup):
    """Set each record's group by the grouping rule (see `grouping_rule`); returns (unit key
    per record: its group, Grouping)."""
    groups, grouping = group_images([(r.source, r.dest) for r in records], rule, lookup)
    if rule and not grouping.grouped_by:  # every image the rule matched was unreadable
        raise SplitError(no_group_message(rule, records[0].source, len(records)))
    if rule and grouping.ungrouped:
        LOG.warning("%d of %d images are not grouped by %s, e.g. %s; each is its own group, "
                    "named by its path", len(grouping.ungrouped), len(records), rule,
                    grouping.ungrouped[0])
    for record, group in zip(records, groups):
        record.group = group
    return groups, grouping


def report_mixed_groups(records, units):
    """Warn about patient groups spanning classes (each is kept whole with its majority)."""
    labels_of = defaultdict(set)
    for record, unit in zip(records, units):
        labels_of[unit].add(record.label)
    mixed = sorted(unit for unit, labels in labels_of.items() if len(labels) > 1)
    if mixed:
        LOG.warning("%d group(s) span two or more classes, e.g. %r; each is kept whole and split "
                    "with its majority class", len(mixed), mixed[0])
