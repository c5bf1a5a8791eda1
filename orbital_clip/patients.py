"""The --group-regex rule, shared by the split (data_preprocess.py) and the evaluation
(inference.py): which images a regex names a patient for, and the refusal when it names none."""

import re

from orbital_clip import cohort

# Why a grouping flag found no patient, by flag; {root} is how the caller names the data root.
NOTHING_GROUPED = {
    "--group-from-folder": "none sits in a sub-folder of its class folder (of --data-root with "
                           "--labels)",
    "--group-regex": "the regex matches neither the path relative to {root} nor the file name of any",
    "--groups": "the CSV lists none of them by its path relative to {root}",
    "--group-col": "the column is empty on every row",
}


def group_regex_problem(pattern):
    """Why --group-regex `pattern` cannot name patients (the refusal, naming the flag), or None:
    it must compile and have a capture group (the group is the patient)."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        return f"--group-regex {pattern!r}: not a valid regular expression ({err})"
    if compiled.groups < 1:
        return f"--group-regex {pattern!r}: needs a capture group, e.g. '^(P\\d+)_'"
    return None


def regex_patients(relative_paths, pattern):
    """(group or None, where it matched) per image for --group-regex `pattern` (a string or a
    compiled regex), by cohort.regex_group: the path relative to the data root, else the name."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    return [cohort.regex_group(text, compiled) for text in relative_paths]


def none_grouped_message(rule, n_images, example, fallback, root="--data-root"):
    """The refusal of a grouping flag that groups none of the images.

    Args:
        rule: the flag as written ("--group-regex '(P\\d+)'"); its first word picks the reason.
        example: an image's path shown as an example, or None to show none (anonymised paths).
        fallback: what leaving the flag out gives ("an image-level split").
        root: how the message names the data root.
    """
    flag = rule.split(" ", 1)[0]
    how = NOTHING_GROUPED[flag].format(root=root)
    shown = "" if example is None else f", e.g. {example!r}"
    return (f"{rule}: grouped none of the {n_images} images ({how}{shown}); fix {flag} or leave "
            f"it out for {fallback}")
