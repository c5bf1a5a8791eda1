"""Clinic-style cohorts (issue 18): patient folders with camera names repeated in every folder,
grouping by folder, by a regex on the path, by a labels CSV; the flat-folder + labels-CSV layout;
misspelt and extra class folders; --help defaults; and how inference reads the manifest's groups."""

import argparse
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from orbital_clip import checkpoint as ckpt
from orbital_clip import cohort
from orbital_clip import images
from orbital_clip import models
from orbital_clip.split import cli, grouping as split_grouping
from orbital_clip import scoring as inference
from demo import make_demo_cohort
from orbital_clip import prompts
from conftest import TINY_CONFIG, TINY_MODEL, tree_state, write_labels_csv_cohort
from conftest import write_model_checkpoint

FOLDERS = list(make_demo_cohort.CLASS_FOLDERS)
LABELS_FLAGS = ("--path-col", "filename", "--label-col", "diagnosis")


def run(*argv):
    return cli.main([*map(str, argv), "--no-progress", "--workers", "1"])


def read_manifest(out_dir):
    return pd.read_csv(Path(out_dir) / "manifest.csv", dtype=str, keep_default_na=False)


def summary_of(out_dir):
    return pd.read_csv(Path(out_dir) / "split_summary.csv").set_index("class")


def error_line(stderr):
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return line


def assert_patients_whole(manifest):
    """Every group sits in exactly one split (and one fold)."""
    assert manifest.groupby("group").split.nunique().max() == 1
    if "fold" in manifest.columns:
        assert manifest.groupby("group").fold.nunique().max() == 1


# -- pure helpers: known answers --------------------------------------------------------------

@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "abc", 0), ("", "abc", 3), ("kitten", "sitting", 3),
    ("orbtial", "orbital", 1),  # two neighbours swapped: one edit
    ("healthy eye", "healthy eyes", 1), ("ab", "ba", 1), ("abc", "ca", 3),
])
def test_edit_distance_known_answers(a, b, distance):
    assert cohort.edit_distance(a, b) == distance == cohort.edit_distance(b, a)


@pytest.mark.parametrize("name, expected", [
    ("Orbital Disease", "orbital disease"),  # case only
    ("orbital diseas", "orbital disease"),  # one deletion
    ("Healthy Eye", "healthy eyes"),  # case and one edit
    ("non orbital disease", "non-orbital disease"),  # one substitution
    ("orbital diasese", None),  # two edits
    ("glaucoma", None),
    ("healthy eyes", "healthy eyes"),
])
def test_did_you_mean(name, expected):
    assert cohort.did_you_mean(name, FOLDERS) == expected


def test_did_you_mean_clause():
    assert cohort.did_you_mean_clause(["Orbital disease"], FOLDERS) == " (did you mean 'orbital disease'?)"
    assert cohort.did_you_mean_clause(["glaucoma"], FOLDERS) == ""
    assert cohort.did_you_mean_clause(["glaucoma", "healthy eye"], FOLDERS) == (
        " (did you mean 'healthy eyes' for 'healthy eye'?)")


def test_folder_group_known_answers():
    assert split_grouping.folder_group("orbital disease/Patient 001/IMG_0002.JPG") == "Patient 001"
    assert split_grouping.folder_group("orbital disease/Patient 001/left/IMG_0002.JPG") == "Patient 001"
    assert split_grouping.folder_group("orbital disease/IMG_0002.JPG") is None


def test_group_images_never_joins_images_by_their_stem():
    paths = [(f"{c}/Patient {p}/IMG_0001.JPG",) * 2 for c, p in (("a", 1), ("a", 2), ("b", 3))]
    paths += [("a/IMG_0001.JPG",) * 2]  # loose in its class folder: no patient folder
    groups, grouping = split_grouping.group_images(paths, None, None)
    assert groups == [source for source, _ in paths]  # 4 images, 4 groups; the stem is shared
    assert (grouping.rule, grouping.n_groups, grouping.grouped_by) == (None, 4, {})
    lookup = lambda source, dest: (split_grouping.folder_group(dest), "patient folder")  # noqa: E731
    groups, grouping = split_grouping.group_images(paths, "--group-from-folder", lookup)
    assert groups == ["Patient 1", "Patient 2", "Patient 3", "a/IMG_0001.JPG"]
    assert grouping.grouped_by == {"patient folder": 3} and grouping.ungrouped == ["a/IMG_0001.JPG"]
    assert grouping.n_groups == 4
    line = split_grouping.grouping_summary(grouping, 4)
    assert "grouped 3 of 4 images (3 by their patient folder) into 3 group(s)" in line
    assert "1 image(s) are their own group" in line


def manifest_rows(sources, groups):
    return [{"path": f"test/{s}", "source": s, "label": s.split("/")[0], "split": "test",
             "group": g} for s, g in zip(sources, groups)]


def test_manifest_patient_groups_tells_patients_from_images_and_stems():
    sources = ["a/Patient 1/IMG_0001.JPG", "a/Patient 1/IMG_0002.JPG", "b/Patient 2/IMG_0001.JPG"]
    patients = ["Patient 1", "Patient 1", "Patient 2"]
    assert cohort.manifest_patient_groups(manifest_rows(sources, patients)) == (patients, None)
    groups, reason = cohort.manifest_patient_groups(manifest_rows(sources, sources))
    assert groups is None and reason == "each image is its own group"
    # an older manifest: the stem IMG_0001 is shared by two patients, yet it names no patient
    stems = ["IMG_0001", "IMG_0002", "IMG_0001"]
    assert cohort.manifest_patient_groups(manifest_rows(sources, stems)) == (None, cohort.STEM_GROUPS_REASON)
    assert cohort.manifest_patient_groups(manifest_rows(sources, ["", "", ""]))[0] is None
    no_column = [{k: v for k, v in row.items() if k != "group"} for row in manifest_rows(sources, stems)]
    assert cohort.manifest_patient_groups(no_column)[0] is None


# -- patient-folder cohort: grouping ------------------------------------------------------------

def test_patient_cohort_fixture_repeats_camera_names(patient_cohort):
    names = [Path(s).name for s in patient_cohort.patient_of]
    assert len(names) == 24 and names.count("IMG_0001.JPG") == 12  # once per patient
    assert len({Path(s).stem for s in patient_cohort.patient_of}) == 3  # the old code's 3 "groups"
    assert [len(patient_cohort.patients(f)) for f in FOLDERS] == [3, 5, 4]


def test_without_a_grouping_flag_each_image_is_its_own_group(patient_cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--data-root", patient_cohort.root, "--out-dir", out) == 0
    manifest = read_manifest(out)
    assert manifest.group.tolist() == manifest.source.tolist()  # 24 groups, not 3 stems
    assert summary_of(out).loc["groups", "total"] == 24
    printed = capsys.readouterr().out
    assert "each of the 24 images is its own group" in printed
    assert "(e.g. 'orbital disease/Patient 001'): if they are patients, pass --group-from-folder" in printed
    args_json = json.loads((out / "split_args.json").read_text())
    assert args_json["run"]["grouping"] == {"rule": None, "grouped_by": {}, "ungrouped": 24, "groups": 24}


def test_folder_and_path_regex_grouping_find_the_patients(patient_cohort, tmp_path, capsys):
    root = patient_cohort.root
    assert run("--data-root", root, "--out-dir", tmp_path / "folder", "--group-from-folder",
               "--test-ratio", "0.2") == 0
    by_folder = capsys.readouterr().out
    assert run("--data-root", root, "--out-dir", tmp_path / "regex", "--group-regex", r"(Patient \d+)",
               "--test-ratio", "0.2") == 0
    by_regex = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "folder")
    assert dict(zip(manifest.source, manifest.group)) == patient_cohort.patient_of
    assert_patients_whole(manifest)
    assert summary_of(tmp_path / "folder").loc["groups"].tolist() == [
        manifest[manifest.split == s].group.nunique() for s in ("train", "val", "test")] + [12]
    # the two rules name the same patients, so the same seed gives the same bytes
    assert (tmp_path / "folder" / "manifest.csv").read_bytes() == (tmp_path / "regex" / "manifest.csv").read_bytes()
    assert "--group-from-folder grouped 24 of 24 images (24 by their patient folder) into 12 group(s)" in by_folder
    assert r"--group-regex '(Patient \d+)' grouped 24 of 24 images (24 by their path) into 12 group(s)" in by_regex
    for label in FOLDERS:  # every class still validates and tests
        assert {"train", "val", "test"} <= set(manifest[manifest.label == label].split)


def test_loose_images_are_their_own_group_and_each_way_is_counted(patient_cohort, tmp_path, capsys):
    root = patient_cohort.root
    (root / "healthy eyes" / "P077_left.jpg").write_bytes(make_jpeg(1, seed=7))
    (root / "healthy eyes" / "IMG_0001.JPG").write_bytes(make_jpeg(1, seed=8))  # loose, repeated name
    assert run("--data-root", root, "--out-dir", tmp_path / "folder", "--group-from-folder", "--folds", "3") == 0
    printed, logged = capsys.readouterr()
    manifest = read_manifest(tmp_path / "folder")
    groups = dict(zip(manifest.source, manifest.group))
    assert groups["healthy eyes/IMG_0001.JPG"] == "healthy eyes/IMG_0001.JPG"  # its path, not a stem
    assert groups["healthy eyes/P077_left.jpg"] == "healthy eyes/P077_left.jpg"
    assert sum(g == "Patient 001" for g in groups.values()) == 2
    assert_patients_whole(manifest)
    assert ("--group-from-folder grouped 24 of 26 images (24 by their patient folder) into 12 group(s); "
            "2 image(s) are their own group") in printed
    assert "2 of 26 images are not grouped by --group-from-folder" in logged
    # a regex written for file names groups by the file name where the path does not match
    assert run("--data-root", root, "--out-dir", tmp_path / "mixed", "--group-regex",
               r"^(P\d+)_|(Patient \d+)/") == 0  # only the first capture group counts
    printed = capsys.readouterr().out
    assert "grouped 1 of 26 images (1 by their file name) into 1 group(s); 25 image(s)" in printed


def make_jpeg(class_index, seed):
    import io
    import random
    buffer = io.BytesIO()
    make_demo_cohort.draw_eye(class_index, random.Random(seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_groups_csv(path, rows):
    path.write_text("path,group\n" + "".join(f"{p},{g}\n" for p, g in rows))
    return path


@pytest.mark.parametrize("flags, needle", [
    (["--group-regex", r"^(P\d+)_"], "--group-regex '^(P\\d+)_': grouped none of the 24 images"),
    (["--group-regex", r"(Q\d+)"], "--group-regex '(Q\\d+)': grouped none"),
    (["--groups", "{groups_csv}"], "--groups {groups_csv}: grouped none of the 24 images"),
])
def test_a_grouping_flag_that_groups_nothing_is_refused(patient_cohort, tmp_path, capsys, flags, needle):
    groups_csv = write_groups_csv(tmp_path / "groups.csv", [("IMG_0001.JPG", "P1")])  # not relative to the root
    flags = [f.format(groups_csv=groups_csv) for f in flags]
    before = tree_state(tmp_path)
    assert run("--data-root", patient_cohort.root, "--out-dir", tmp_path / "out", *flags) == 2
    line = error_line(capsys.readouterr().err)
    assert needle.format(groups_csv=groups_csv) in line and "leave it out" in line
    assert tree_state(tmp_path) == before


def test_group_from_folder_on_flat_class_folders_is_refused(make_cohort, tmp_path, capsys):
    root = make_cohort("flat", (3, 3, 3))
    before = tree_state(tmp_path)
    assert run("--data-root", root, "--out-dir", tmp_path / "out", "--group-from-folder", "--dry-run") == 2
    line = error_line(capsys.readouterr().err)
    assert "--group-from-folder: grouped none of the 9 images (none sits in a sub-folder" in line
    assert tree_state(tmp_path) == before


# -- class folders: did you mean, --exclude-folders ----------------------------------------------

@pytest.mark.parametrize("wrong, right", [("Orbital Disease", "orbital disease"),
                                          ("healthy eye", "healthy eyes")])
def test_a_misspelt_class_folder_gets_a_suggestion(patient_cohort, tmp_path, capsys, wrong, right):
    root = patient_cohort.root
    (root / right).rename(root / wrong)
    before = tree_state(tmp_path)
    assert run("--data-root", root, "--out-dir", tmp_path / "out") == 2
    line = error_line(capsys.readouterr().err)
    assert f"folder(s) '{wrong}' are not classes (did you mean '{right}'?)" in line
    assert "--exclude-folders" in line
    assert tree_state(tmp_path) == before
    # clip_train and inference list class folders through common, with the same suggestion
    with pytest.raises(cohort.CohortError, match=re.escape(f"(did you mean '{right}'?)")):
        cohort.load_labelled_items(root, FOLDERS, "train")


def test_exclude_folders_leaves_a_folder_out(patient_cohort, tmp_path, capsys):
    root = patient_cohort.root
    shutil.copytree(root / "healthy eyes" / "Patient 004", root / "unknown" / "Patient 099")
    before = tree_state(root)
    assert run("--data-root", root, "--out-dir", tmp_path / "refused") == 2
    assert "'unknown' are not classes" in error_line(capsys.readouterr().err)
    assert run("--data-root", root, "--out-dir", tmp_path / "out", "--exclude-folders", "unknown",
               "unknwn", "--group-from-folder") == 0
    logged = capsys.readouterr().err
    assert "--exclude-folders: left out" in logged and "(2 files)" in logged
    assert "--exclude-folders 'unknwn': no such folder" in logged and "(did you mean 'unknown'?)" in logged
    manifest = read_manifest(tmp_path / "out")
    assert len(manifest) == 24 and not manifest.source.str.startswith("unknown").any()
    assert manifest.group.nunique() == 12
    assert tree_state(root) == before  # copied, never moved
    assert run("--data-root", root, "--out-dir", tmp_path / "class", "--exclude-folders", "unknown",
               "healthy eyes") == 2
    assert "--exclude-folders 'healthy eyes': is a class folder" in error_line(capsys.readouterr().err)


# -- flat folder + labels CSV ----------------------------------------------------------------

def test_labels_csv_layout_splits_by_patient(patient_cohort, tmp_path, capsys):
    origin, labels = write_labels_csv_cohort(patient_cohort, tmp_path / "photos")
    out = tmp_path / "out"
    assert run("--data-root", tmp_path / "photos", "--out-dir", out, "--labels", labels, *LABELS_FLAGS,
               "--group-col", "patient_id", "--test-ratio", "0.2") == 0
    assert "--group-col patient_id grouped 24 of 24 images (24 by their CSV row) into 12 group(s)" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert len(manifest) == 24 and set(manifest.source) == set(origin)
    for row in manifest.itertuples():
        truth = origin[row.source]
        assert row.label == patient_cohort.class_of[truth]
        assert row.group == patient_cohort.patient_of[truth].replace("Patient ", "P")
        assert row.path == f"{row.split}/{row.label}/{row.source}"
        assert images.file_sha256(out / row.path) == row.sha256 == images.file_sha256(patient_cohort.root / truth)
    assert_patients_whole(manifest)
    # the same images as class folders, grouped by folder: the same per-class split sizes
    assert run("--data-root", patient_cohort.root, "--out-dir", tmp_path / "folders", "--group-from-folder",
               "--test-ratio", "0.2") == 0
    folders = read_manifest(tmp_path / "folders")
    assert (manifest.groupby(["label", "split"]).size().to_dict()
            == folders.groupby(["label", "split"]).size().to_dict())
    # the manifest feeds training: the rows of a split come back with their classes
    items = cohort.load_labelled_items(out / "manifest.csv", FOLDERS, "train")
    assert sorted((p.name, FOLDERS[y]) for p, y in items) == sorted(
        (r.source, r.label) for r in manifest[manifest.split == "train"].itertuples())


def test_labels_csv_with_folds_move_and_rollback(patient_cohort, tmp_path):
    origin, labels = write_labels_csv_cohort(patient_cohort, tmp_path / "photos")
    shutil.move(labels, tmp_path / "labels.csv")
    (tmp_path / "photos" / "IMG_0001.txt").write_text("note")  # a sidecar travels with its image
    before = {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()}
    out = tmp_path / "out"
    assert run("--data-root", tmp_path / "photos", "--out-dir", out, "--labels", tmp_path / "labels.csv",
               *LABELS_FLAGS, "--group-col", "patient_id", "--folds", "3", "--mode", "move") == 0
    assert list((tmp_path / "photos").iterdir()) == []
    manifest = read_manifest(out)
    assert_patients_whole(manifest)
    assert set(manifest.fold) == {"0", "1", "2"}
    first = manifest[manifest.source == "IMG_0001.JPG"].iloc[0]
    assert (out / first.path).with_suffix(".txt").read_text() == "note"
    assert run("--data-root", tmp_path / "photos", "--out-dir", out, "--rollback") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()} == before


def test_labels_csv_nested_paths_group_from_folder(patient_cohort, tmp_path):
    """--labels paths may keep patient folders; --group-from-folder then reads them."""
    rows = [f"{source.split('/', 1)[1]},{patient_cohort.class_of[source]}"
            for source in sorted(patient_cohort.patient_of)]
    flat = tmp_path / "export"
    for source in patient_cohort.patient_of:
        target = flat / source.split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(patient_cohort.root / source, target)
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert run("--data-root", flat, "--out-dir", out, "--labels", tmp_path / "labels.csv",
               "--group-from-folder") == 0
    manifest = read_manifest(out)
    assert manifest.group.nunique() == 12 and manifest.source.str.startswith("Patient ").all()
    assert all(row.group == row.source.split("/")[0] for row in manifest.itertuples())
    assert_patients_whole(manifest)


def labels_csv_cases():
    header = "filename,diagnosis\n"
    return [
        pytest.param(header + "IMG_0001.JPG,Orbital Disease\nIMG_0002.JPG,glaucoma\n",
                     ["label(s) 'Orbital Disease' (line 2), 'glaucoma' (line 3) are not classes",
                      "(did you mean 'orbital disease' for 'Orbital Disease'?)"], id="unknown labels"),
        pytest.param(header + "IMG_0001.JPG,healthy eyes\nIMG_0099.JPG,healthy eyes\nIMG_0098.JPG,healthy eyes\n",
                     ["2 listed file(s) do not exist under --data-root", "'IMG_0099.JPG'"], id="missing files"),
        pytest.param(header + "IMG_0001.JPG,\n", ["line 2 has an empty 'diagnosis' cell"], id="empty label"),
        pytest.param(header + "IMG_0001.JPG,healthy eyes\n./IMG_0001.JPG,orbital disease\n",
                     ["'./IMG_0001.JPG' is listed twice with different labels", "line 3"], id="two labels"),
        pytest.param(header + "../outside.jpg,healthy eyes\n", ["'../outside.jpg' is outside --data-root"],
                     id="outside the root"),
        pytest.param("file,diagnosis\nIMG_0001.JPG,healthy eyes\n",
                     ["--path-col 'filename': no such column", "['file', 'diagnosis']"], id="no such column"),
        pytest.param("", ["not a readable CSV"], id="empty file"),
    ]


@pytest.mark.parametrize("text, needles", labels_csv_cases())
def test_labels_csv_refusals(patient_cohort, tmp_path, capsys, text, needles):
    write_labels_csv_cohort(patient_cohort, tmp_path / "photos")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    (tmp_path / "bad.csv").write_text(text)
    before = tree_state(tmp_path)
    assert run("--data-root", tmp_path / "photos", "--out-dir", tmp_path / "out",
               "--labels", tmp_path / "bad.csv", *LABELS_FLAGS) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --labels {tmp_path / 'bad.csv'}") or "--path-col" in line
    for needle in needles:
        assert needle in line, line
    assert tree_state(tmp_path) == before


def test_labels_csv_leaves_unlisted_images_out_with_a_warning(patient_cohort, tmp_path, capsys):
    _, labels = write_labels_csv_cohort(patient_cohort, tmp_path / "photos")
    (tmp_path / "photos" / "IMG_9999.JPG").write_bytes(make_jpeg(0, seed=3))
    assert run("--data-root", tmp_path / "photos", "--out-dir", tmp_path / "out", "--labels", labels,
               *LABELS_FLAGS) == 0
    assert "does not list 1 image file(s) under --data-root, e.g. IMG_9999.JPG" in capsys.readouterr().err
    manifest = read_manifest(tmp_path / "out")
    assert len(manifest) == 24 and "IMG_9999.JPG" not in set(manifest.source)
    assert manifest.group.tolist() == manifest.source.tolist()  # no --group-col: images


@pytest.mark.parametrize("extra, message", [
    (["--path-col", "f"], "--path-col names a column of --labels CSV; pass --labels too"),
    (["--group-col", "p"], "--group-col names a column"),
    (["--labels", "missing.csv"], "--labels missing.csv: no such file"),
    (["--labels", "{csv}", "--exclude-folders", "x"], "--exclude-folders applies to class folders"),
    (["--group-from-folder", "--group-regex", "(P)"], "not allowed with"),
    (["--labels", "{csv}", "--group-col", "p", "--groups", "{csv}"], "not allowed with"),
])
def test_parse_args_rejects_layout_combinations(tmp_path, capsys, extra, message):
    (tmp_path / "l.csv").write_text("path,label\n")
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--data-root", str(tmp_path), *[e.format(csv=tmp_path / "l.csv") for e in extra]])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_parse_args_labels_column_defaults(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\n")
    args = cli.parse_args(["--data-root", str(tmp_path), "--labels", str(tmp_path / "l.csv")])
    assert (args.path_col, args.label_col, args.group_col) == ("path", "label", None)
    assert cli.parse_args(["--data-root", str(tmp_path)]).path_col is None


# -- --help ----------------------------------------------------------------------------------

def test_help_shows_every_default_and_groups_the_flags():
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:  # hidden: deprecated spellings
            continue
        assert "(default: " in action.help or "(required)" in action.help, action.option_strings
        if action.default not in (None, False, []):
            assert f"(default: {action.default}" in action.help, action.option_strings
    assert "(default: 0.2;" in parser._option_string_actions["--val-ratio"].help  # resolved later
    titles = [group.title for group in parser._action_groups]
    for title in ("data", "split", "leakage audit", "output", "running"):
        assert title in titles
    assert any(t.startswith("patient grouping") for t in titles)
    assert any(t.startswith("labels CSV layout") for t in titles)
    grouping = next(g for g in parser._action_groups if g.title.startswith("patient grouping"))
    assert {a.dest for a in grouping._group_actions} == {"group_from_folder", "group_regex", "groups", "group_col"}


# -- inference on the manifests -------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.create_model(TINY_MODEL, None)[0]
    classes = prompts.load_prompt_set(None)
    path = tmp_path / "clip_model_epoch_best.pt"
    write_model_checkpoint(path, model, {
        "model_name": TINY_MODEL, "model_config": json.loads(TINY_CONFIG.read_text()),
        "pretrained": None, "class_folders": prompts.class_folders(classes),
        "prompts": prompts.prompt_set_to_dict(classes), "preprocess": {"image_size": 64},
        "epoch": 1, "metrics": {}, "args": {}, "logit_scale_mode": "exp"})
    return path


def evaluate(manifest, checkpoint, out):
    assert inference.main(["--test-dir", str(manifest), "--checkpoint", str(checkpoint), "--output-dir",
                           str(out), "--workers", "0", "--bootstrap", "200", "--no-progress",
                           "--no-figures"]) == 0
    return json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text()


@pytest.mark.slow
def test_inference_bootstraps_images_unless_the_manifest_names_patients(patient_cohort, checkpoint,
                                                                          tmp_path, capsys):
    root = patient_cohort.root
    assert run("--data-root", root, "--out-dir", tmp_path / "images", "--test-ratio", "0.4") == 0
    assert run("--data-root", root, "--out-dir", tmp_path / "patients", "--test-ratio", "0.4",
               "--group-from-folder") == 0
    manifest = tmp_path / "images" / "manifest.csv"
    metrics, report = evaluate(manifest, checkpoint, tmp_path / "eval_images")
    assert (metrics["bootstrap_unit"], metrics["n_groups"]) == ("image", metrics["n"])
    assert "percentile bootstrap of images" in report and "patient groups" not in report
    # the same rows without a group column: the same (image) bootstrap, to the last digit
    frame = read_manifest(tmp_path / "images")
    frame.drop(columns="group").to_csv(tmp_path / "images" / "nogroup.csv", index=False)
    plain, _ = evaluate(tmp_path / "images" / "nogroup.csv", checkpoint, tmp_path / "eval_plain")
    assert plain["accuracy_ci"] == metrics["accuracy_ci"] and plain["macro_f1_ci"] == metrics["macro_f1_ci"]
    # an older manifest grouped by file stem (3 fake groups): an image bootstrap and a warning
    frame.assign(group=[Path(s).stem for s in frame.source]).to_csv(tmp_path / "images" / "old.csv", index=False)
    assert frame.assign(group=[Path(s).stem for s in frame.source]).query("split == 'test'").group.nunique() <= 3
    capsys.readouterr()
    old, _ = evaluate(tmp_path / "images" / "old.csv", checkpoint, tmp_path / "eval_old")
    assert old["bootstrap_unit"] == "image" and old["accuracy_ci"] == metrics["accuracy_ci"]
    assert "old.csv: its group column holds file stems" in capsys.readouterr().err
    # grouped by patient folder: a cluster bootstrap over the test split's patients
    grouped, report = evaluate(tmp_path / "patients" / "manifest.csv", checkpoint, tmp_path / "eval_patients")
    test_rows = read_manifest(tmp_path / "patients").query("split == 'test'")
    assert (grouped["bootstrap_unit"], grouped["n_groups"]) == ("group", test_rows.group.nunique())
    assert test_rows.group.nunique() < len(test_rows)
    assert f"Bootstrap resamples {test_rows.group.nunique()} patient groups" in report


def test_an_empty_group_column_is_refused_and_a_partial_one_counted(patient_cohort, tmp_path, capsys):
    _, labels = write_labels_csv_cohort(patient_cohort, tmp_path / "photos")
    frame = pd.read_csv(labels, dtype=str, keep_default_na=False)
    frame.assign(patient_id="").to_csv(tmp_path / "empty.csv", index=False)
    before = tree_state(tmp_path)
    assert run("--data-root", tmp_path / "photos", "--out-dir", tmp_path / "out", "--labels",
               tmp_path / "empty.csv", *LABELS_FLAGS, "--group-col", "patient_id") == 2
    assert "--group-col patient_id: grouped none of the 24 images (the column is empty on every row" in (
        error_line(capsys.readouterr().err))
    assert tree_state(tmp_path) == before
    frame.loc[:3, "patient_id"] = ""  # four rows without a patient id: each its own group
    frame.to_csv(tmp_path / "partial.csv", index=False)
    assert run("--data-root", tmp_path / "photos", "--out-dir", tmp_path / "out", "--labels",
               tmp_path / "partial.csv", *LABELS_FLAGS, "--group-col", "patient_id") == 0
    assert "grouped 20 of 24 images (20 by their CSV row)" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    loose = set(frame.filename[:4])
    assert all((row.group == row.source) == (row.source in loose) for row in manifest.itertuples())
