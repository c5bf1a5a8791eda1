"""The patient rules shared by the split (data_preprocess.py) and the evaluation (inference.py,
score_answers.py): --group-regex (which images a regex names a patient for), --group-from-folder
(the patient folder under the class folder), and the refusal when a flag groups no image."""

import logging
import re
from pathlib import PurePosixPath

from orbital_clip import cohort

LOG = logging.getLogger("inference")  # used by the evaluation's folder grouping, logged as such

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


def folder_patient(relative_path):
    """--group-from-folder: the patient folder of an image, the first folder below its class
    folder ('orbital disease/Patient 001/IMG_0002.JPG' -> 'Patient 001'), or None for a file
    directly in it. `relative_path`: relative to the data root (the class folder comes first)."""
    parts = PurePosixPath(relative_path).parts
    return parts[1] if len(parts) > 2 else None


def class_relative_path(path, class_folder):
    """A manifest image's path from its class folder on ('test/TED/P1/x.png' -> 'TED/P1/x.png'),
    the form `folder_patient` reads; its file name alone when no folder of the path is named like
    its class (then no patient folder: the split folder must never pass for the class)."""
    parts = PurePosixPath(path).parts
    folders = parts[:-1]
    start = len(folders) - 1 - folders[::-1].index(class_folder) if class_folder in folders else len(folders)
    return PurePosixPath(*parts[start:]).as_posix()


def patient_folder_example(relative_paths):
    """'class/sub-folder' of the first image below a sub-folder of its class folder (a layout
    that suggests patient folders), or None when every image sits in its class folder."""
    return next((PurePosixPath(p).parent.as_posix() for p in relative_paths if folder_patient(p)), None)


def folder_groups(texts, paths, anonymized=False):
    """Each image's patient by --group-from-folder for the evaluation: `folder_patient` of its
    path relative to the data root (`texts`: relative to --test-dir, or a manifest's `source`);
    an image directly in its class folder is its own group ('image:' + its entry of `paths`).
    Refused (CohortError) when no image sits in a patient folder."""
    found = [folder_patient(text) for text in texts]
    if not any(found):
        raise cohort.CohortError(none_grouped_message(
            "--group-from-folder", len(texts), None if anonymized else texts[0],
            "a bootstrap of images", root="--test-dir"))
    n_found = sum(group is not None for group in found)
    LOG.info("--group-from-folder grouped %d of %d images into %d patient folder(s)%s", n_found,
             len(texts), len({g for g in found if g}),
             "" if n_found == len(texts) else "; each of the others is its own group")
    return [group if group is not None else f"image:{path}" for group, path in zip(found, paths)]
