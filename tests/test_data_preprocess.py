"""data_preprocess.py: split counts, group-aware splitting, manifests, modes, refusals, CLI."""

import errno
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orbital_clip import cohort as cohort_io
from orbital_clip import images
from orbital_clip.split import allocate, cli, materialise, scan
from orbital_clip.split import duplicates as split_duplicates
from orbital_clip.split.records import ARGS_NAME, JOURNAL_NAME, MOVE_LOG_NAME
from demo import make_demo_cohort

SCRIPT = Path(__file__).resolve().parent.parent / "data_preprocess.py"
FOLDERS = list(make_demo_cohort.CLASS_FOLDERS)


def tree_snapshot(root):
    """{relative path: sha256 (or 'link -> target')} of every file under root."""
    snapshot = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            snapshot[rel] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            snapshot[rel] = images.file_sha256(path)
    return snapshot


def run(*argv):
    return cli.main([*map(str, argv), "--no-progress"])


def read_manifest(out_dir):
    return pd.read_csv(Path(out_dir) / "manifest.csv", dtype=str, keep_default_na=False)


def write_named_images(root, names_by_class, seed=0):
    """Real JPEGs with chosen names: {class index: [file names]}."""
    rng = random.Random(seed)
    for index, names in names_by_class.items():
        folder = Path(root) / FOLDERS[index]
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            make_demo_cohort.draw_eye(index, rng, (48, 36)).save(folder / name)
    return Path(root)


# -- pure functions: known answers ------------------------------------------------------------

@pytest.mark.parametrize("n, val, test, expected", [
    (0, 0.2, 0.0, (0, 0, 0)),
    (1, 0.2, 0.0, (1, 0, 0)),      # a lone image trains
    (2, 0.2, 0.0, (1, 1, 0)),      # quota 0.4 -> 0, raised to 1 by the minimum rule
    (4, 0.2, 0.0, (3, 1, 0)),      # 3.2 / 0.8: the leftover image goes to the larger remainder
    (10, 0.2, 0.0, (8, 2, 0)),     # exact: 10 x 0.2 is 2, not 2.0000000000000004
    (24, 0.2, 0.0, (19, 5, 0)),    # 19.2 / 4.8
    (72, 0.2, 0.0, (58, 14, 0)),   # 57.6 / 14.4
    (5, 0.5, 0.0, (3, 2, 0)),      # tie 2.5 / 2.5 -> train
    (7, 0.2, 0.1, (5, 1, 1)),      # 4.9 / 1.4 / 0.7 -> floors 4,1,0; leftovers to train, test
    (3, 0.2, 0.1, (1, 1, 1)),      # 2.1 / 0.6 / 0.3 -> 2,1,0, then one test image from train
    (12, 0.2, 0.2, (7, 3, 2)),     # 7.2 / 2.4 / 2.4 -> tie val/test -> val
    (2, 0.2, 0.5, (1, 1, 0)),      # 0.6 / 0.4 / 1.0 -> 1,0,1; val's minimum beats test's share
    (3, 0.5, 0.4, (1, 1, 1)),      # 0.3 / 1.5 / 1.2 -> 0,2,1; train keeps an image
    (10, 0.0, 0.0, (10, 0, 0)),
])
def test_allocate_split_counts_known_answers(n, val, test, expected):
    assert allocate.allocate_split_counts(n, val, test) == expected


@pytest.mark.parametrize("val, test", [(0.2, 0.0), (0.1, 0.1), (0.15, 0.15), (0.3, 0.2), (0.05, 0.0)])
def test_allocate_split_counts_properties(val, test):
    for n in range(0, 80):
        counts = allocate.allocate_split_counts(n, val, test)
        quotas = (n * (1 - val - test), n * val, n * test)
        assert sum(counts) == n and min(counts) >= 0
        assert counts[0] >= min(n, 1)
        assert counts[1] >= (1 if n >= 2 else 0)
        assert counts[2] >= (1 if n >= 3 and test > 0 else 0)
        if test == 0:
            assert counts[2] == 0
        if all(q >= 1 or r == 0 for q, r in zip(quotas, (1, val, test))):  # no minimum binds
            assert all(abs(c - q) < 1 + 1e-9 for c, q in zip(counts, quotas)), (n, counts, quotas)


def test_units_of_one_image_fill_the_quotas_exactly():
    sizes = {f"u{i:02d}": 1 for i in range(17)}
    quotas = allocate.allocate_split_counts(17, 0.2, 0.1)
    assignment = allocate.assign_units_to_splits(sizes, quotas, random.Random(0))
    assert [list(assignment.values()).count(s) for s in range(3)] == list(quotas)


def test_group_allocation_known_answers():
    # quotas (3, 1, 0): the first 2-image group trains, the second must validate
    assignment = allocate.assign_units_to_splits({"a": 2, "b": 2}, (3, 1, 0), random.Random(1))
    assert sorted(assignment.values()) == [0, 1]
    # two groups of five, quotas (8, 2, 0): val would stay empty; the minimum rule moves one
    assignment = allocate.assign_units_to_splits({"a": 5, "b": 5}, (8, 2, 0), random.Random(1))
    assert sorted(assignment.values()) == [0, 1]
    # a single group always trains
    assert allocate.assign_units_to_splits({"a": 4}, (3, 1, 0), random.Random(1)) == {"a": 0}


def test_stratified_group_split_keeps_groups_whole_and_is_deterministic():
    rng = random.Random(3)
    labels, units = [], []
    for patient in range(40):
        label = 0 if patient < 8 else 1 + patient % 2
        for _ in range(rng.randint(1, 4)):
            labels.append(label)
            units.append(f"P{patient:03d}")
    splits = allocate.stratified_group_split(labels, units, 0.2, 0.1, seed=7)
    assert splits == allocate.stratified_group_split(labels, units, 0.2, 0.1, seed=7)
    assert splits != allocate.stratified_group_split(labels, units, 0.2, 0.1, seed=8)
    for unit in set(units):
        assert len({s for s, u in zip(splits, units) if u == unit}) == 1
    for label in range(3):
        assert {s for s, y in zip(splits, labels) if y == label} == {0, 1, 2}


def test_mixed_class_group_follows_its_majority():
    labels = [0, 0, 1, 1, 1, 1, 1, 1]
    units = ["mix", "mix", "mix", "b", "c", "d", "e", "f"]
    splits = allocate.stratified_group_split(labels, units, 0.2, 0.0, seed=0)
    assert len(set(splits[:3])) == 1  # the group straddling classes 0 and 1 stays whole
    assert allocate.majority_label([0, 1, 1]) == 1 and allocate.majority_label([2, 0]) == 0


def test_regex_group_searches_the_path_then_the_file_name():
    anchored = re.compile(r"^(P\d+)_")  # written for file names: still works on a nested path
    assert cohort_io.regex_group("healthy eyes/P001_left.jpg", anchored) == ("P001", "file name")
    assert cohort_io.regex_group("healthy eyes/left_P001.jpg", anchored) == (None, None)
    patient = re.compile(r"(Patient \d+)")  # only the path holds the patient
    assert cohort_io.regex_group("orbital disease/Patient 001/IMG_0002.JPG", patient) == ("Patient 001", "path")
    digits = re.compile(r"(\d+)")  # the path wins: the patient number, not the camera counter
    assert cohort_io.regex_group("orbital disease/Patient 007/IMG_0002.JPG", digits) == ("007", "path")
    assert cohort_io.regex_group("x/a.jpg", re.compile(r"(z*)")) == (None, None)  # empty capture


# -- parse_args ------------------------------------------------------------------------------

def test_parse_args_defaults(tmp_path):
    args = cli.parse_args(["--data-root", str(tmp_path)])
    assert (args.out_dir, args.val_ratio, args.test_ratio, args.seed, args.mode) == (None, 0.2, 0.0, 2024, "copy")
    assert not args.overwrite and not args.dry_run


@pytest.mark.parametrize("extra, message", [
    (["--val-ratio", "1.5"], "--val-ratio"),
    (["--val-ratio", "-0.1"], "--val-ratio"),
    (["--test-ratio", "1"], "--test-ratio"),
    (["--val-ratio", "0.5", "--test-ratio", "0.5"], "--test-ratio"),
    (["--group-regex", "(P.+)_", "--groups", "g.csv"], "not allowed with"),
    (["--group-regex", r"^P\d+_"], "capture group"),
    (["--group-regex", "(P"], "not a valid regular expression"),
    (["--groups", "missing.csv"], "--groups"),
    (["--mode", "rename"], "--mode"),
])
def test_parse_args_rejects(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--data-root", str(tmp_path), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_rejects_missing_data_root(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--data-root", str(tmp_path / "nope")])
    assert exc.value.code == 2 and "--data-root" in capsys.readouterr().err


# -- end to end ------------------------------------------------------------------------------

def test_split_counts_manifest_and_hashes(make_cohort, tmp_path):
    root = make_cohort("cohort", (6, 12, 9))
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out) == 0
    manifest = read_manifest(out)
    assert list(manifest.columns) == ["path", "source", "label", "split", "group", "sha256"]
    counts = manifest.groupby(["label", "split"]).size().to_dict()
    expected = {("orbital disease", "train"): 5, ("orbital disease", "val"): 1,
                ("healthy eyes", "train"): 10, ("healthy eyes", "val"): 2,
                ("non-orbital disease", "train"): 7, ("non-orbital disease", "val"): 2}
    assert counts == expected
    for row in manifest.itertuples():
        assert row.path == f"{row.split}/{row.source}" and row.source.startswith(row.label + "/")
        assert images.file_sha256(out / row.path) == row.sha256 == images.file_sha256(root / row.source)
        assert row.group == row.source  # no grouping flag: each image is its own group
    for split in ("train", "val"):  # the folders hold exactly the manifest's files
        on_disk = sorted(p.relative_to(out).as_posix() for p in (out / split).rglob("*") if p.is_file())
        assert on_disk == sorted(manifest.loc[manifest.split == split, "path"])
    summary = pd.read_csv(out / "split_summary.csv")
    assert summary.set_index("class").loc["total images"].tolist() == [22, 5, 27]
    assert summary.set_index("class").loc["orbital disease"].tolist() == [5, 1, 6]
    assert (out / "rejected.csv").read_text() == "path,reason\n"
    assert not (out / "test").exists()


def test_test_split_and_every_class_validates(make_cohort, tmp_path):
    root = make_cohort("cohort", (2, 12, 3))
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--test-ratio", "0.2") == 0
    manifest = read_manifest(out)
    counts = manifest.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert counts.loc["orbital disease"].tolist() == [0, 1, 1]          # test, train, val
    assert counts.loc["healthy eyes"].tolist() == [2, 7, 3]
    assert counts.loc["non-orbital disease"].tolist() == [1, 1, 1]
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(FOLDERS)


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_source_tree_unchanged(make_cohort, tmp_path, mode):
    root = make_cohort("cohort", (3, 5, 4))
    (root / "healthy eyes" / "healthy_eyes_0_000.txt").write_text("note")
    before = tree_snapshot(root)
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--mode", mode) == 0
    assert tree_snapshot(root) == before
    manifest = read_manifest(out)
    assert len(manifest) == 12
    for row in manifest.itertuples():
        target, source = out / row.path, root / row.source
        assert images.file_sha256(target) == row.sha256
        if mode == "hardlink":
            assert os.path.samefile(target, source) and not target.is_symlink()
        elif mode == "symlink":
            assert target.is_symlink() and Path(os.readlink(target)).is_absolute()
            assert Path(os.readlink(target)) == source.resolve()
        else:
            assert not target.is_symlink() and not os.path.samefile(target, source)


def test_move_mode_moves_every_file_exactly_once(make_cohort, tmp_path):
    root = make_cohort("cohort", (3, 5, 4))
    before = sorted(tree_snapshot(root).values())
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--mode", "move") == 0
    assert all(p.is_dir() for p in root.rglob("*"))  # class folders kept, emptied
    assert sorted(p.name for p in root.iterdir()) == sorted(FOLDERS)
    moved = {k: v for k, v in tree_snapshot(out).items() if k.split("/")[0] in ("train", "val")}
    assert sorted(moved.values()) == before
    assert sorted(moved) == sorted(read_manifest(out)["path"])


def test_same_seed_same_bytes_other_seed_other_split(make_cohort, tmp_path):
    root = make_cohort("cohort", (6, 12, 9))
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run("--data-root", root, "--out-dir", tmp_path / name, "--seed", seed) == 0
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    record = json.loads((tmp_path / "a" / ARGS_NAME).read_text())
    assert record["script"] == "data_preprocess.py" and record["args"]["seed"] == 5
    assert record["argv"] == ["--data-root", str(root), "--out-dir", str(tmp_path / "a"), "--seed", "5",
                              "--no-progress"]
    assert record["run"]["classes"] == FOLDERS and record["run"]["images"] == 27
    a, c = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "c")
    assert set(zip(a.source, a.split)) != set(zip(c.source, c.split))
    assert a.groupby("label").split.value_counts().equals(c.groupby("label").split.value_counts())


def test_out_defaults_to_data_root_refuses_then_overwrites(make_cohort, capsys):
    root = make_cohort("cohort", (4, 6, 5))
    assert run("--data-root", root) == 0
    first = (root / "manifest.csv").read_bytes()
    (root / "val" / "healthy eyes" / "stale.jpg").write_bytes(b"left over")
    snapshot = tree_snapshot(root)
    capsys.readouterr()
    assert run("--data-root", root) == 2  # no --overwrite: refused, nothing changed
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {root / 'train'} ")
    assert "--overwrite" in errors[0] and "Traceback" not in err
    assert tree_snapshot(root) == snapshot
    assert run("--data-root", root, "--overwrite") == 0  # train/val are not read as classes
    assert (root / "manifest.csv").read_bytes() == first
    assert not (root / "val" / "healthy eyes" / "stale.jpg").exists()
    assert len(list((root / "healthy eyes").iterdir())) == 6  # class folders untouched


def test_refuses_an_existing_manifest_alone(make_cohort, tmp_path):
    root = make_cohort("cohort", (3, 3, 3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("mine\n")
    (out / "train").mkdir()  # an empty split folder alone would not be refused
    assert run("--data-root", root, "--out-dir", out) == 2
    assert (out / "manifest.csv").read_text() == "mine\n" and not any((out / "train").iterdir())


def test_overwrite_refuses_to_delete_moved_images(make_cohort):
    root = make_cohort("cohort", (3, 3, 3))
    assert run("--data-root", root, "--mode", "move") == 0
    write_named_images(root, {1: ["new.jpg"]})
    snapshot = tree_snapshot(root)
    assert run("--data-root", root, "--overwrite") == 2
    assert tree_snapshot(root) == snapshot


def test_dry_run_writes_nothing(make_cohort, tmp_path, capsys):
    root = make_cohort("cohort", (6, 12, 9))
    before = tree_snapshot(tmp_path)
    assert run("--data-root", root, "--dry-run") == 0
    assert run("--data-root", root, "--out-dir", tmp_path / "out", "--dry-run", "--mode", "move") == 0
    assert tree_snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    out = capsys.readouterr().out
    assert "orbital disease" in out and "dry run: would move 27 files" in out


def test_bad_files_are_rejected_and_junk_ignored(make_cohort, tmp_path):
    root = make_cohort("cohort", (3, 4, 3))
    healthy = root / "healthy eyes"
    (healthy / "corrupt.jpg").write_bytes(random.Random(0).randbytes(300))
    (healthy / "empty.png").write_bytes(b"")
    (healthy / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (healthy / "notes.pdf").write_bytes(b"%PDF-1.4")
    (healthy / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (healthy / "table.csv").write_text("a,b\n")  # notes: neither listed nor rejected
    Image.new("RGB", (40, 30), (200, 10, 10)).save(healthy / "scan.jfif", format="JPEG")
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out) == 0
    rejected = pd.read_csv(out / "rejected.csv")
    assert rejected.path.tolist() == ["healthy eyes/corrupt.jpg", "healthy eyes/empty.png",
                                      "healthy eyes/notes.pdf", "healthy eyes/phone.heic"]
    assert "not an image" in rejected.reason[0] and "empty file" in rejected.reason[1]
    assert rejected.reason[2:].tolist() == ["unsupported format (.pdf)", "unsupported format (.heic)"]
    manifest = read_manifest(out)
    assert len(manifest) == 11 and "healthy eyes/scan.jfif" in manifest.source.tolist()
    assert not manifest.source.str.contains("corrupt|empty|DS_Store|notes|phone|table").any()
    copied = [p.name for p in out.rglob("*") if p.is_file()]
    assert "scan.jfif" in copied
    assert not {"corrupt.jpg", "empty.png", ".DS_Store", "notes.pdf", "phone.heic", "table.csv"} & set(copied)


def test_sidecars_travel_with_their_image(make_cohort, tmp_path):
    root = make_cohort("cohort", (3, 4, 3))
    for folder in FOLDERS:  # one sidecar per image
        for image in (root / folder).glob("*.jpg"):
            image.with_suffix(".txt").write_text(image.name)
    (root / "healthy eyes" / "healthy_eyes_0_001.json").write_text("{}")
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out) == 0
    manifest = read_manifest(out)
    assert len(manifest) == 10 and (out / "rejected.csv").read_text() == "path,reason\n"
    for row in manifest.itertuples():
        sidecar = (out / row.path).with_suffix(".txt")
        assert sidecar.read_text() == Path(row.path).name
    json_row = manifest[manifest.source == "healthy eyes/healthy_eyes_0_001.jpg"].iloc[0]
    assert (out / json_row.path).with_suffix(".json").is_file()
    assert len([p for p in out.rglob("*.txt")]) == 10


def test_group_regex_keeps_patients_together(tmp_path):
    names = {0: [f"P{p:03d}_{eye}.jpg" for p in range(0, 4) for eye in ("left", "right")],
             1: [f"P{p:03d}_{eye}.jpg" for p in range(10, 20) for eye in ("left", "right")],
             2: [f"P{p:03d}_{eye}.jpg" for p in range(30, 36) for eye in ("left", "right")]
             + ["unnamed.jpg"]}
    root = write_named_images(tmp_path / "cohort", names)
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--group-regex", r"^(P\d+)_") == 0
    manifest = read_manifest(out)
    assert manifest.groupby("group").split.nunique().max() == 1
    assert set(manifest.group) == ({f"P{p:03d}" for p in [*range(4), *range(10, 20), *range(30, 36)]}
                                   | {"non-orbital disease/unnamed.jpg"})  # unmatched: its path
    for label in FOLDERS:
        assert (manifest[manifest.label == label].split == "val").any()
    summary = pd.read_csv(out / "split_summary.csv").set_index("class")
    assert summary.loc["groups", "total"] == 21
    assert summary.loc["groups", "val"] == manifest[manifest.split == "val"].group.nunique()


def test_groups_csv_with_a_group_spanning_classes(tmp_path):
    names = {0: ["a1.jpg", "a2.jpg", "mix1.jpg"], 1: [f"h{i}.jpg" for i in range(8)] + ["mix2.jpg"]}
    root = write_named_images(tmp_path / "cohort", names)
    rows = ["path,group", "orbital disease/mix1.jpg,PX", "healthy eyes/mix2.jpg,PX",
            "orbital disease/a1.jpg,PA", "./orbital disease/a2.jpg,PA"]
    rows += [f"healthy eyes/h{i}.jpg,H{i // 2}" for i in range(8)]
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--groups", tmp_path / "groups.csv") == 0
    manifest = read_manifest(out)
    assert manifest.groupby("group").split.nunique().max() == 1
    assert set(manifest.group) == {"PX", "PA", "H0", "H1", "H2", "H3"}


def test_duplicate_files_stay_in_one_split(make_cohort, tmp_path):
    root = make_cohort("cohort", (3, 10, 3))
    original = root / "healthy eyes" / "healthy_eyes_0_000.jpg"
    for i in range(3):
        (root / "healthy eyes" / f"copy_{i}.jpg").write_bytes(original.read_bytes())
    out = tmp_path / "out"
    for seed in range(4):
        assert run("--data-root", root, "--out-dir", out / str(seed), "--seed", seed) == 0
        manifest = read_manifest(out / str(seed))
        assert manifest.groupby("sha256").split.nunique().max() == 1


def test_unknown_class_folder_is_refused(make_cohort, capsys):
    root = make_cohort("cohort", (3, 3, 3))
    (root / "glaucoma").mkdir()
    assert run("--data-root", root) == 2
    err = capsys.readouterr().err
    assert "error: --data-root" in err and "'glaucoma'" in err and "Traceback" not in err
    assert sorted(p.name for p in root.iterdir()) == sorted(FOLDERS + ["glaucoma"])


def test_missing_and_empty_classes_warn_no_images_fails(tmp_path, capsys):
    root = write_named_images(tmp_path / "cohort", {0: ["a.jpg", "b.jpg"], 1: ["c.jpg", "d.jpg"]})
    (root / "healthy eyes" / "ignored.txt").write_text("x")
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out) == 0  # non-orbital disease is missing
    assert "non-orbital disease is missing" in capsys.readouterr().err  # logged, not fatal
    assert len(read_manifest(out)) == 4
    empty = tmp_path / "empty"
    for folder in FOLDERS:
        (empty / folder).mkdir(parents=True)
    assert run("--data-root", empty) == 2
    assert "no image files" in capsys.readouterr().err
    assert sorted(p.name for p in empty.iterdir()) == sorted(FOLDERS)


def test_layouts_that_would_rescan_or_delete_inputs_are_refused(make_cohort, tmp_path):
    root = make_cohort("cohort", (2, 2, 2))
    inside_class = root / "healthy eyes" / "split"  # its files would be read as images next time
    assert run("--data-root", root, "--out-dir", inside_class) == 2
    assert not inside_class.exists()
    nested = make_cohort("out/train/cohort2", (2, 2, 2))  # --overwrite would delete the data
    before = tree_snapshot(tmp_path)
    assert run("--data-root", nested, "--out-dir", tmp_path / "out", "--overwrite") == 2
    assert tree_snapshot(tmp_path) == before


def test_all_unreadable_is_an_error(tmp_path, capsys):
    folder = tmp_path / "cohort" / "healthy eyes"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    assert run("--data-root", tmp_path / "cohort") == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cohort").iterdir()) == ["healthy eyes"]


def test_hardlink_failure_is_a_clear_error(make_cohort, tmp_path, monkeypatch, capsys):
    root = make_cohort("cohort", (2, 2, 2))

    def no_link(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    assert run("--data-root", root, "--out-dir", tmp_path / "out", "--mode", "hardlink") == 1
    err = capsys.readouterr().err
    assert "--mode hardlink" in err and "--mode copy" in err and "Traceback" not in err


def test_custom_prompt_classes(tmp_path):
    root = write_named_images(tmp_path / "cohort", {0: ["a.jpg", "b.jpg"], 1: ["c.jpg", "d.jpg", "e.jpg"]})
    prompts_json = tmp_path / "two.json"
    prompts_json.write_text('{"classes": ['
                            '{"folder": "orbital disease", "train": ["x"], "eval": ["x"]},'
                            '{"folder": "healthy eyes", "train": ["y"], "eval": ["y"]}]}')
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--prompts", prompts_json) == 0
    assert sorted(p.name for p in (out / "val").iterdir()) == ["healthy eyes", "orbital disease"]


# -- command line -------------------------------------------------------------------------------

def test_help_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:  # the process boundary is covered by the real run
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--data-root" in out and "$ python data_preprocess.py" in out


@pytest.mark.slow
def test_real_run_subprocess(make_cohort, tmp_path):
    make_cohort("cohort", (3, 5, 4))
    result = subprocess.run([sys.executable, str(SCRIPT), "--data-root", "cohort", "--out-dir", "splits",
                             "--seed", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "total images" in result.stdout and "Traceback" not in result.stderr
    manifest = read_manifest(tmp_path / "splits")
    assert len(manifest) == 12 and set(manifest.split) == {"train", "val"}


def test_bad_value_in_process_exits_2_naming_the_flag(make_cohort, capsys):
    cohort = make_cohort("cohort", (3, 5, 4))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--data-root", str(cohort), "--val-ratio", "1.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--val-ratio" in err and "Traceback" not in err


# -- leakage audit ------------------------------------------------------------------------------

def test_hamming_and_near_duplicate_pairs_known_answers():
    base = bytes(8)
    three_bits = bytes([0b0000_0111]) + bytes(7)
    ten_bits = bytes([0xFF, 0b11]) + bytes(6)
    fine_same, fine_far = bytes(32), bytes([0xFF]) * 4 + bytes(28)  # 0 and 32 bits apart
    matrix = split_duplicates.hash_matrix([base, three_bits, ten_bits])
    assert split_duplicates.hamming_distances(matrix, matrix).tolist() == [[0, 3, 10], [3, 0, 7], [10, 7, 0]]
    coarse = [base, three_bits, ten_bits, base]
    fine = [fine_same, fine_same, fine_same, fine_far]
    # image 3 matches 0 on 64 bits, but its 256-bit hash is 32 bits away: over 4 * 4 + 8 = 24
    assert split_duplicates.near_duplicate_pairs(coarse, fine, 4) == [(0, 1, 3)]
    # at 7 bits the confirmation allows 4 * 7 + 8 = 36
    assert split_duplicates.near_duplicate_pairs(coarse, fine, 7) == [(0, 1, 3), (0, 3, 0), (1, 2, 7), (1, 3, 3)]
    assert split_duplicates.near_duplicate_pairs(coarse, fine, 0) == []
    pairs = split_duplicates.find_duplicates(["h1", "h2", "h1", "h3"], coarse, fine, 4)
    assert pairs == [(2, 0, "exact", 0), (1, 0, "near", 3)]
    assert allocate.merge_linked_units(["a", "b", "c", "d"], [(2, 0), (1, 0)]) == ["a", "a", "a", "d"]


def test_near_duplicate_search_is_vectorised_and_blockwise(monkeypatch):
    rng = np.random.default_rng(0)
    coarse = [rng.bytes(8) for _ in range(300)]
    fine = [bytes(32)] * 300
    coarse[250] = coarse[7]  # a planted pair across blocks
    monkeypatch.setattr(split_duplicates, "HAMMING_BLOCK_ELEMENTS", 64 * 300)  # 64 rows per block
    assert (7, 250, 0) in split_duplicates.near_duplicate_pairs(coarse, fine, 2)
    brute = [(i, j, d) for i in range(300) for j in range(i + 1, 300)
             if (d := bin(int.from_bytes(coarse[i], "big") ^ int.from_bytes(coarse[j], "big")).count("1")) <= 12]
    assert split_duplicates.near_duplicate_pairs(coarse, fine, 12) == brute


def plant_duplicates(root):
    """Four planted pairs in a demo cohort: exact/near, same/conflicting label."""
    from PIL import ImageEnhance
    orbital, healthy, other = (root / f for f in FOLDERS)
    (healthy / "zz_copy.jpg").write_bytes((healthy / "healthy_eyes_0_000.jpg").read_bytes())
    (other / "zz_dup.jpg").write_bytes((orbital / "orbital_disease_0_000.jpg").read_bytes())
    Image.open(orbital / "orbital_disease_0_001.jpg").save(orbital / "zz_reenc.jpg", quality=40)
    brighter = ImageEnhance.Brightness(Image.open(other / "non_orbital_disease_0_002.jpg")).enhance(1.1)
    brighter.save(healthy / "zz_bright.jpg", quality=90)


def test_planted_duplicates_are_reported_and_kept_together(make_cohort, tmp_path, capsys):
    root = make_cohort("cohort", (4, 10, 6))
    plant_duplicates(root)
    for seed in (1, 2):
        out = tmp_path / f"out{seed}"
        assert run("--data-root", root, "--out-dir", out, "--seed", seed) == 0
        duplicates = pd.read_csv(out / "duplicates.csv", keep_default_na=False)
        assert list(duplicates.columns) == ["path", "duplicate_of", "kind", "distance", "same_label"]
        rows = [tuple(r) for r in duplicates.itertuples(index=False)]
        assert rows == [
            ("healthy eyes/zz_copy.jpg", "healthy eyes/healthy_eyes_0_000.jpg", "exact", 0, True),
            ("non-orbital disease/zz_dup.jpg", "orbital disease/orbital_disease_0_000.jpg", "exact", 0, False),
            ("non-orbital disease/non_orbital_disease_0_002.jpg", "healthy eyes/zz_bright.jpg", "near",
             rows[2][3], False),
            ("orbital disease/zz_reenc.jpg", "orbital disease/orbital_disease_0_001.jpg", "near", rows[3][3], True),
        ]
        assert 0 <= rows[2][3] <= 4 and 0 <= rows[3][3] <= 4
        split_of = dict(zip(read_manifest(out).source, read_manifest(out).split))
        for path, duplicate_of, *_ in rows:
            assert split_of[path] == split_of[duplicate_of]
    captured = capsys.readouterr()  # main() configures logging to stderr
    warnings = [line for line in captured.err.splitlines() if "CONFLICTING LABELS" in line]
    assert len(warnings) == 4  # two pairs, two runs
    assert "'orbital disease/orbital_disease_0_000.jpg' (orbital disease) and " \
           "'non-orbital disease/zz_dup.jpg' (non-orbital disease) are exact duplicates" in warnings[0]
    assert "'healthy eyes/zz_bright.jpg'" in warnings[1] and "near duplicates" in warnings[1]
    out = captured.out
    assert "leakage audit: 2 exact duplicate(s), 2 near-duplicate pair(s) (pHash distance <= 4), " \
           "2 with CONFLICTING labels" in out
    assert run("--data-root", root, "--out-dir", tmp_path / "exact", "--near-dup-distance", "0") == 0
    assert pd.read_csv(tmp_path / "exact" / "duplicates.csv").kind.tolist() == ["exact", "exact"]


@pytest.mark.slow
def test_demo_cohort_has_no_false_near_duplicates(make_cohort, tmp_path):
    root = make_cohort("cohort", (24, 60, 40))  # standardised cartoon eyes: a hard case for pHash
    assert run("--data-root", root, "--out-dir", tmp_path / "out", "--dry-run") == 0
    records, _ = scan.validate_cohort(root, cohort_io.list_class_folder_images(root, FOLDERS)[0],
                                    FOLDERS, 2, True)
    pairs = split_duplicates.find_duplicates([r.sha256 for r in records], [r.phash for r in records],
                               [r.phash_fine for r in records], split_duplicates.NEAR_DUP_DISTANCE)
    assert pairs == []


# -- cross-validation folds ---------------------------------------------------------------------

def test_assign_folds_known_answers():
    labels = [0] * 5 + [1] * 7
    folds = allocate.assign_folds(labels, [f"u{i}" for i in range(12)], 3, seed=0)
    per_class = [sorted(Counter(f for f, y in zip(folds, labels) if y == c).values()) for c in (0, 1)]
    assert per_class == [[1, 2, 2], [2, 2, 3]]
    assert sorted(Counter(folds).values()) == [4, 4, 4]  # ties go to the emptier fold overall
    assert folds == allocate.assign_folds(labels, [f"u{i}" for i in range(12)], 3, seed=0)
    units = ["a", "a", "a", "b", "c", "c", "d"]  # groups are never divided
    folds = allocate.assign_folds([0] * 7, units, 2, seed=1)
    assert all(len({f for f, u in zip(folds, units) if u == key}) == 1 for key in set(units))
    assert sorted(Counter(folds).values()) == [3, 4]  # a (3) | b, c, d (1 + 2 + 1)


def test_folds_manifest_and_fold_views(tmp_path, capsys):
    names = {0: [f"P{p:02d}_{e}.jpg" for p in range(6) for e in "LR"],
             1: [f"P{p:02d}_{e}.jpg" for p in range(10, 25) for e in "LR"],
             2: [f"P{p:02d}_{e}.jpg" for p in range(30, 40) for e in "LR"]}
    root = write_named_images(tmp_path / "cohort", names)
    out = tmp_path / "cv"
    assert run("--data-root", root, "--out-dir", out, "--folds", "3", "--test-ratio", "0.15",
               "--group-regex", r"^(P\d+)_") == 0
    manifest = read_manifest(out)
    assert list(manifest.columns) == ["path", "source", "label", "split", "group", "sha256", "fold"]
    assert set(manifest.split) == {"train", "test"} and not (out / "val").exists()
    pool, test = manifest[manifest.split == "train"], manifest[manifest.split == "test"]
    assert set(pool.fold) == {"0", "1", "2"} and set(test.fold) == {""} and len(test) > 0
    assert manifest.groupby("group").fold.nunique().max() == 1  # patients stay in one fold
    for label, rows in pool.groupby("label"):  # stratified: per-class fold sizes within one patient
        counts = rows.fold.value_counts()
        assert len(counts) == 3 and counts.max() - counts.min() <= 2
    summary = pd.read_csv(out / "split_summary.csv").set_index("class")
    assert list(summary.columns) == ["fold 0", "fold 1", "fold 2", "test", "total"]
    assert summary.loc["total images", "fold 0"] == (pool.fold == "0").sum()
    assert summary.loc["groups", "test"] == test.group.nunique()
    for k in range(3):
        train = cohort_io.load_labelled_items(out / "manifest.csv", FOLDERS, "train", fold=k)
        val = cohort_io.load_labelled_items(out / "manifest.csv", FOLDERS, "val", fold=k)
        assert len(train) + len(val) == len(pool) and not {p for p, _ in train} & {p for p, _ in val}
        assert all(p.is_file() for p, _ in val)
    assert "fold 0" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--folds", "1"], "--folds 1"),
    (["--folds", "3", "--val-ratio", "0.2"], "replaces --val-ratio"),
    (["--resize-px", "224", "--mode", "move"], "--mode copy only"),
    (["--resize-px", "224", "--mode", "symlink"], "--mode copy only"),
    (["--resize-px", "8"], "--resize-px 8"),
    (["--near-dup-distance", "-1"], "--near-dup-distance"),
    (["--rollback", "--overwrite"], "--rollback"),
])
def test_parse_args_rejects_new_combinations(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--data-root", str(tmp_path), *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_too_many_folds_is_a_clear_error(tmp_path, capsys):
    root = write_named_images(tmp_path / "cohort", {0: ["a.jpg", "b.jpg"], 1: ["c.jpg"]})
    assert run("--data-root", root, "--out-dir", tmp_path / "out", "--folds", "5") == 2
    assert "--folds 5: the training pool holds only 3 group(s)" in capsys.readouterr().err


# -- --resize-px --------------------------------------------------------------------------------

def test_resize_px_known_answers():
    assert materialise.resized_size((400, 300), 100) == (133, 100)
    assert materialise.resized_size((300, 400), 100) == (100, 133)
    assert materialise.resized_size((1000, 101), 100) == (990, 100)
    assert materialise.resized_name("a/x.JPG", True) == "a/x.JPG"
    assert materialise.resized_name("a/x.tif", False) == "a/x.png"
    assert materialise.resized_name("a/x.jpeg", False) == "a/x.png"
    assert materialise.resized_name("a/x.png", True) == "a/x.jpg"  # a JPEG stored under a .png name
    assert materialise.resized_name("a/scan", False) == "a/scan.png"


def test_resize_px_writes_small_copies_and_records_them(tmp_path):
    root = tmp_path / "cohort"
    healthy, orbital = root / "healthy eyes", root / "orbital disease"
    healthy.mkdir(parents=True)
    orbital.mkdir()
    rng = random.Random(0)
    make_demo_cohort.draw_eye(1, rng, (400, 300)).save(healthy / "big.jpg", quality=92)
    make_demo_cohort.draw_eye(1, rng, (90, 70)).save(healthy / "small.jpg")
    sideways = make_demo_cohort.draw_eye(0, rng, (300, 400))  # stored 300x400, shown 400x300
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(orbital / "rotated.jpg", exif=exif.tobytes(), quality=92)
    grey = (np.linspace(0, 65535, 320)[None, :].repeat(200, 0)).astype(np.uint16)
    Image.fromarray(grey).save(orbital / "deep.png")  # 16-bit
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--resize-px", "100", "--val-ratio", "0.3") == 0
    manifest = read_manifest(out).set_index("source")
    assert list(manifest.columns[-2:]) == ["resized_px", "sha256_written"]
    expect = {"healthy eyes/big.jpg": ("big.jpg", "100", (133, 100)),
              "healthy eyes/small.jpg": ("small.jpg", "", (90, 70)),
              "orbital disease/rotated.jpg": ("rotated.jpg", "100", (133, 100)),
              "orbital disease/deep.png": ("deep.png", "100", (160, 100))}
    for source, (name, resized, size) in expect.items():
        row = manifest.loc[source]
        written = out / row.path
        assert written.name == name and row.resized_px == resized
        assert row.sha256 == images.file_sha256(root / source)
        assert row.sha256_written == images.file_sha256(written)
        assert (row.sha256_written == row.sha256) == (resized == "")
        with Image.open(written) as image:
            assert image.size == size and not image.getexif().get(0x0112)
            assert image.format == ("PNG" if name.endswith(".png") else "JPEG")
    original = images.read_image(root / "orbital disease" / "rotated.jpg").resize((133, 100))
    copy = images.read_image(out / manifest.loc["orbital disease/rotated.jpg"].path)
    assert np.abs(np.asarray(original, dtype=int) - np.asarray(copy, dtype=int)).mean() < 4


# -- --mode move: journal, resume, rollback -----------------------------------------------------

def write_tiny_cohort(root, n_images, sidecars=3):
    """n_images distinct 12x12 PNGs spread over the classes, plus a few .txt sidecars."""
    rng = np.random.default_rng(0)
    for i in range(n_images):
        folder = Path(root) / FOLDERS[i % 3] / ("nested" if i % 7 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
        if i < sidecars:
            (folder / f"img_{i:03d}.txt").write_text(f"note {i}")
    return Path(root)


def content_multiset(*folders):
    return sorted(images.file_sha256(p) for f in folders for p in Path(f).rglob("*") if p.is_file())


# data_preprocess.main with a monkeypatched settle_move that sleeps after each file, so the test can
# kill the process mid-move (a child process: the kill must be a real SIGKILL).
SLOW_MOVE_RUN = """
import sys, time
from orbital_clip.split import cli, materialise
settle_move = materialise.settle_move
def slow_settle_move(source, target):
    moved = settle_move(source, target)
    time.sleep(0.02)
    return moved
materialise.settle_move = slow_settle_move
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_move_killed_midway_loses_nothing_resumes_and_rolls_back(tmp_path):
    import signal
    import time
    root = write_tiny_cohort(tmp_path / "cohort", 200)
    original = tree_snapshot(root)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_MOVE_RUN, "--data-root", str(root), "--out-dir",
                                str(out), "--mode", "move", "--no-progress"], cwd=SCRIPT.parent,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and process.poll() is None:
            moved = [p for s in ("train", "val") for p in (out / s).rglob("*.png")] if out.exists() else []
            if (out / JOURNAL_NAME).exists() and len(moved) >= 20:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the move finished (or failed) before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert (out / JOURNAL_NAME).exists() and not (out / "manifest.csv").exists()
    at_source = [p for p in root.rglob("*") if p.is_file()]
    assert 0 < len(at_source) < len(original)  # interrupted mid-run
    assert content_multiset(root, out / "train", out / "val") == sorted(original.values())

    assert run("--data-root", root, "--out-dir", out, "--mode", "move") == 0  # completes the run
    assert not (out / JOURNAL_NAME).exists() and (out / MOVE_LOG_NAME).exists()
    assert not [p for p in root.rglob("*") if p.is_file()]
    manifest = read_manifest(out)
    assert len(manifest) == 200 and all(images.file_sha256(out / p) == h for p, h in zip(manifest.path, manifest.sha256))
    assert content_multiset(out / "train", out / "val") == sorted(original.values())

    assert run("--data-root", root, "--out-dir", out, "--rollback") == 0  # undoes the finished run
    assert tree_snapshot(root) == original
    assert sorted(p.name for p in out.iterdir()) == []


def test_interrupted_move_rolls_back_and_refuses_other_modes(make_cohort, tmp_path, monkeypatch, capsys):
    root = make_cohort("cohort", (3, 5, 4))
    (root / "healthy eyes" / "healthy_eyes_0_000.txt").write_text("sidecar")
    original = tree_snapshot(root)
    real_settle, calls = materialise.settle_move, []

    def failing_settle(source, target):
        calls.append(source)
        if len(calls) == 6:
            raise OSError(errno.EIO, "Input/output error")
        return real_settle(source, target)

    monkeypatch.setattr(materialise, "settle_move", failing_settle)
    assert run("--data-root", root, "--mode", "move") == 1  # OUT = data root
    assert "--rollback" in capsys.readouterr().err
    monkeypatch.setattr(materialise, "settle_move", real_settle)
    assert (root / JOURNAL_NAME).exists() and len(list((root / "train").rglob("*.jpg"))) >= 1
    assert run("--data-root", root) == 2  # a copy run would mix with the half-moved tree
    assert "--rollback" in capsys.readouterr().err
    assert run("--data-root", root, "--rollback") == 0
    assert tree_snapshot(root) == original  # exactly: no split folders, journal or tables left
    assert run("--data-root", root, "--rollback") == 2  # nothing left to roll back


# -- real-cohort hygiene: DICOM privacy, odd names ------------------------------------------------

def test_dicom_header_values_never_reach_outputs_or_logs(make_cohort, tmp_path, capsys):
    import pydicom
    import pydicom.data
    sample = Path(pydicom.data.__file__).parent / "test_files" / "MR_small.dcm"
    root = make_cohort("cohort", (3, 4, 3))
    phi = {"PatientName": "Doe^Jane", "PatientID": "MRN-990011", "PatientBirthDate": "19700101"}
    for name, cut in (("scan ok.dcm", False), ("scan cut.dcm", True)):
        dataset = pydicom.dcmread(sample)
        for keyword, value in phi.items():
            setattr(dataset, keyword, value)
        if cut:
            dataset.PixelData = dataset.PixelData[:1000]
        dataset.save_as(root / "orbital disease" / name)
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(root / "healthy eyes" / "Ö eye (1).jpg")
    out = tmp_path / "out"
    assert run("--data-root", root, "--out-dir", out, "--resize-px", "32") == 0
    rejected = pd.read_csv(out / "rejected.csv")
    assert rejected.path.tolist() == ["orbital disease/scan cut.dcm"]
    assert "transfer syntax Explicit VR Little Endian" in rejected.reason[0]
    manifest = read_manifest(out).set_index("source")
    assert manifest.loc["orbital disease/scan ok.dcm", "path"].endswith("scan ok.png")  # header dropped
    assert (out / manifest.loc["healthy eyes/Ö eye (1).jpg", "path"]).is_file()
    captured = capsys.readouterr()
    texts = [captured.out, captured.err] + [p.read_text(errors="replace") for p in out.glob("*.*")]
    written = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for value in phi.values():
        assert not any(value in text for text in texts)
        assert not any(value.encode() in data for data in written)
