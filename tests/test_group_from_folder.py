"""--group-from-folder in the evaluation (issue 25 item 12): a class/PATIENT/IMG cohort is
resampled by patient folder, with data_preprocess.py's rule (patients.folder_patient), and a
warning when the layout suggests patients but no grouping was given."""

import json
import re

import pandas as pd
import pytest

from orbital_clip import answers as answer_files
from orbital_clip import patients
from orbital_clip.split import grouping
from conftest import write_csv


def folder_answers(cohort, path):
    """An answer file right on every image of even-numbered patients and wrong on the others',
    so answers are correlated within patients (the case an image bootstrap understates)."""
    folders = sorted(set(cohort.class_of.values()))
    rows = []
    for source, folder in sorted(cohort.class_of.items()):
        number = int(cohort.patient_of[source].split()[-1])
        wrong = folders[(folders.index(folder) + 1) % len(folders)]
        rows.append([source, folder if number % 2 == 0 else wrong])
    return write_csv(path, ["path", "answer"], rows)


def scored(cohort, answers, out, *extra):
    assert answer_files.main(["--test-dir", str(cohort.root), "--predictions", str(answers),
                              "--out-dir", str(out), "--bootstrap", "300", "--no-figures", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_group_from_folder_resamples_patient_folders_and_no_grouping_warns(patient_cohort, tmp_path,
                                                                           capsys):
    answers = folder_answers(patient_cohort, tmp_path / "answers.csv")
    by_image = scored(patient_cohort, answers, tmp_path / "images")
    warned = [line for line in capsys.readouterr().err.splitlines() if "--group-from-folder" in line]
    assert len(warned) == 1 and re.search(r"class folders hold sub-folders \(e.g. '[a-z ]+/Patient \d+'\)", warned[0])
    by_folder = scored(patient_cohort, answers, tmp_path / "folders", "--group-from-folder")
    assert "sub-folders" not in capsys.readouterr().err
    assert (by_image["bootstrap_unit"], by_folder["bootstrap_unit"]) == ("image", "group")
    assert by_folder["n_groups"] == 12 and by_folder["group_source"] == "--group-from-folder"
    groups = pd.read_csv(tmp_path / "folders" / "predictions.csv")
    assert dict(zip(groups["path"], groups["group"])) == patient_cohort.patient_of
    # the same patients as the regex that names the folder: the same resamples, the same interval
    by_regex = scored(patient_cohort, answers, tmp_path / "regex", "--group-regex", r"(Patient \d+)")
    assert by_folder["accuracy_ci"] == by_regex["accuracy_ci"]
    width = lambda m: m["accuracy_ci"][1] - m["accuracy_ci"][0]  # noqa: E731
    assert width(by_folder) > 1.2 * width(by_image)  # images of a patient move together


def test_the_split_and_the_evaluation_share_one_folder_rule():
    assert grouping.folder_group is patients.folder_patient
    assert patients.folder_patient("orbital disease/Patient 001/IMG_0002.JPG") == "Patient 001"
    assert patients.folder_patient("orbital disease/IMG_0002.JPG") is None
    assert patients.patient_folder_example(["a/x.png", "b/P7/y.png"]) == "b/P7"


def test_group_from_folder_with_no_patient_folder_or_with_a_regex_is_refused(make_cohort, tmp_path, capsys):
    cohort = make_cohort()  # class folders with images directly in them
    images = sorted(p.relative_to(cohort).as_posix() for p in cohort.rglob("*.png"))
    answers = write_csv(tmp_path / "a.csv", ["path", "answer"], [[p, p.split("/")[0]] for p in images])
    argv = ["--test-dir", str(cohort), "--predictions", str(answers), "--out-dir", str(tmp_path / "o")]
    assert answer_files.main([*argv, "--group-from-folder"]) == 2
    assert "--group-from-folder: grouped none of the" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        answer_files.main([*argv, "--group-from-folder", "--group-regex", "(x)"])
    assert "--group-from-folder and --group-regex" in capsys.readouterr().err


@pytest.mark.slow
def test_inference_with_a_checkpoint_groups_by_patient_folder(patient_cohort, checkpoint, tmp_path):
    from orbital_clip import scoring
    out = tmp_path / "out"
    assert scoring.main(["--test-dir", str(patient_cohort.root), "--checkpoint", str(checkpoint),
                         "--out-dir", str(out), "--workers", "0", "--bootstrap", "50",
                         "--no-progress", "--no-figures", "--group-from-folder"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert (result["bootstrap_unit"], result["n_groups"]) == ("group", 12)
    predictions = pd.read_csv(out / "predictions.csv")
    assert dict(zip(predictions["path"], predictions["group"])) == patient_cohort.patient_of


def manifest_cohort(root, patient_folders):
    """A manifest without a `source` column over copies at test/<class>/[P<k>/]<file>: 2 classes
    x 2 patients x 2 images. Returns (manifest, answer file, {path: patient})."""
    rows, patient_of = [], {}
    for c in ("alpha", "beta"):
        for p in range(2):
            for i in range(2):
                path = f"test/{c}/{c}{p}/{i}.png" if patient_folders else f"test/{c}/{c}{p}_{i}.png"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(b"not read")
                rows.append([path, c, "test"])
                patient_of[path] = f"{c}{p}"
    manifest = write_csv(root / "manifest.csv", ["path", "label", "split"], rows)
    answers = write_csv(root / "answers.csv", ["path", "answer"], [[p, c] for p, c, _ in rows])
    return manifest, answers, patient_of


def test_a_manifest_without_source_reads_the_patient_folder_under_its_class_folder(tmp_path, capsys):
    flat = tmp_path / "flat"
    manifest, answers, _ = manifest_cohort(flat, patient_folders=False)
    argv = ["--test-dir", str(manifest), "--predictions", str(answers), "--bootstrap", "20", "--no-figures"]
    # the split folder 'test' is not a class folder: no patient-folder warning, and no grouping
    assert answer_files.main([*argv, "--out-dir", str(flat / "o")]) == 0
    assert "sub-folders" not in capsys.readouterr().err
    assert answer_files.main([*argv, "--out-dir", str(flat / "g"), "--group-from-folder"]) == 2
    assert "has no `source` column" in capsys.readouterr().err and not (flat / "g").exists()
    nested = tmp_path / "nested"
    manifest, answers, patient_of = manifest_cohort(nested, patient_folders=True)
    result = scored(type("C", (), {"root": manifest})(), answers, nested / "o", "--group-from-folder")
    assert (result["bootstrap_unit"], result["n_groups"]) == ("group", 4)
    groups = pd.read_csv(nested / "o" / "predictions.csv")
    assert dict(zip(groups["path"], groups["group"])) == patient_of
