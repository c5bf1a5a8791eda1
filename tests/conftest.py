"""Shared fixtures: CPU only, a tiny registered model (no downloads), small real image files."""

import csv
import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # force CPU, even on a GPU machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

from orbital_clip import checkpoint as ckpt
from orbital_clip import models
from demo import make_demo_cohort
from orbital_clip import prompts

TINY_CONFIG = REPO_ROOT / "demo" / "tiny_clip.json"
TINY_MODEL = TINY_CONFIG.stem
models.register_model_config(TINY_CONFIG)


def tree_state(*roots):
    """{path: (is_dir, size, mtime_ns)} of every file, link and folder under `roots` (the roots
    included): equal before and after a refused run shows it created, changed and deleted nothing."""
    state = {}
    for root in map(Path, roots):
        for path in [root, *root.rglob("*")] if root.exists() else []:
            info = path.lstat()
            state[str(path)] = (path.is_dir() and not path.is_symlink(), info.st_size, info.st_mtime_ns)
    return state


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """`--precision auto` resolves to fp32 in every test, whatever CPU runs the suite: the tests
    that compare numbers exactly stay exact on AMX/AVX512-BF16 machines too. Tests of bf16 pass
    `--precision bf16`, or patch `models.cpu_native_bf16` back to a native answer."""
    monkeypatch.setattr(models, "cpu_native_bf16", lambda: None)


@pytest.fixture
def tiny_config():
    """Path of the tiny open_clip architecture JSON (registered as 'tiny_clip')."""
    return TINY_CONFIG


@pytest.fixture
def make_cohort(tmp_path):
    """Factory: write a synthetic class-folder cohort and return its root."""

    def _make(name="cohort", counts=(6, 12, 9), seed=0):
        root = tmp_path / name
        make_demo_cohort.write_cohort(root, counts, seed)
        return root

    return _make


@pytest.fixture
def cohort(make_cohort):
    """A small imbalanced synthetic cohort: 6 / 12 / 9 images."""
    return make_cohort()


@dataclass
class PatientCohort:
    """A clinic-style cohort written by `write_patient_cohort`: what a test may assert against."""

    root: Path
    patient_of: dict = field(default_factory=dict)  # {source relative to root: patient folder}
    class_of: dict = field(default_factory=dict)  # {source relative to root: class folder}

    def patients(self, folder=None):
        """Patient folder names (of one class folder, or all)."""
        return sorted({p for s, p in self.patient_of.items()
                       if folder is None or self.class_of[s] == folder})


def write_csv(path, header, rows):
    """A UTF-8 CSV file of `header` and `rows` (an answer file, metadata, labels); returns path."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_cohorts(root, **counts):
    """Synthetic class-folder cohorts root/<name>, seeded 0, 1, 2, ... in the order given:
    write_cohorts(root, train=(4, 4, 4), val=(2, 2, 2), test=(1, 1, 1)). Returns root."""
    for seed, (name, per_class) in enumerate(counts.items()):
        make_demo_cohort.write_cohort(Path(root) / name, per_class, seed)
    return root


def write_patient_cohort(root, patients_per_class=(3, 5, 4), images_per_patient=(2, 3, 1), seed=0):
    """Write root/<class>/Patient NNN/IMG_000k.JPG, the way clinics lay cohorts out: patients are
    numbered across the cohort (Patient 001, 002, ...), and camera names restart in every patient
    folder, so IMG_0001.JPG exists once per patient. Patient p (0-based, cohort-wide) has
    images_per_patient[p % len(images_per_patient)] images. Returns a PatientCohort."""
    rng = random.Random(seed)
    cohort, patient = PatientCohort(Path(root)), 0
    for class_index, n_patients in enumerate(patients_per_class):
        folder = make_demo_cohort.CLASS_FOLDERS[class_index]
        for _ in range(n_patients):
            name = f"Patient {patient + 1:03d}"
            (cohort.root / folder / name).mkdir(parents=True)
            for k in range(images_per_patient[patient % len(images_per_patient)]):
                source = f"{folder}/{name}/IMG_{k + 1:04d}.JPG"
                make_demo_cohort.draw_eye(class_index, rng).save(cohort.root / source, quality=90)
                cohort.patient_of[source], cohort.class_of[source] = name, folder
            patient += 1
    return cohort


def write_labels_csv_cohort(cohort, flat_root, csv_name="labels.csv"):
    """The same images as a flat folder plus a labels CSV (filename, diagnosis, patient_id), the
    other common layout: flat_root/IMG_NNNN.JPG numbered across the cohort, as a camera would.
    Returns ({file name: source in `cohort`}, path of the CSV)."""
    flat_root = Path(flat_root)
    flat_root.mkdir(parents=True)
    origin, rows = {}, []
    for number, source in enumerate(sorted(cohort.patient_of), 1):
        name = f"IMG_{number:04d}.JPG"
        (flat_root / name).write_bytes((cohort.root / source).read_bytes())
        origin[name] = source
        rows.append({"filename": name, "diagnosis": cohort.class_of[source],
                     "patient_id": cohort.patient_of[source].replace("Patient ", "P")})
    with open(flat_root / csv_name, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filename", "diagnosis", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return origin, flat_root / csv_name


@pytest.fixture
def make_patient_cohort(tmp_path):
    """Factory: write a clinic-style patient-folder cohort under tmp_path (see
    `write_patient_cohort`) and return its PatientCohort."""

    def _make(name="clinic", patients_per_class=(3, 5, 4), images_per_patient=(2, 3, 1), seed=0):
        return write_patient_cohort(tmp_path / name, patients_per_class, images_per_patient, seed)

    return _make


@pytest.fixture
def patient_cohort(make_patient_cohort):
    """12 patients (3 / 5 / 4 per class), 1-3 images each (24 images), IMG_0001.JPG in every
    patient folder."""
    return make_patient_cohort()


def train_argv(train_dir, val_dir, save_dir, *extra):
    """clip_train.py arguments of a 2-epoch tiny-model run (the training tests' base command)."""
    return ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--out-dir", str(save_dir),
            "--model-config", str(TINY_CONFIG), "--lr", "1e-3", "--batch-size", "16",
            "--epochs", "2", "--workers", "0", "--no-progress", *extra]


LARGE_PX = (400, 300)  # against the tiny model's 64 px input: every RandomResizedCrop draw changes the crop


def write_large_splits(root):
    """The `splits` cohorts (train 6/12/9 seed 0, val 3/6/4 seed 1) under root, upscaled to
    LARGE_PX: a resume test on them sees a shifted random stream (on 160x120 images most crops
    fall back to a fixed one). Returns (train folder, val folder)."""
    from PIL import Image
    roots = write_cohorts(root, train=(6, 12, 9), val=(3, 6, 4))
    for path in Path(roots).rglob("*.jpg"):
        Image.open(path).convert("RGB").resize(LARGE_PX).save(path, quality=90)
    return Path(root) / "train", Path(root) / "val"


@pytest.fixture
def large_splits(tmp_path):
    """`splits` upscaled to LARGE_PX (write_large_splits)."""
    return write_large_splits(tmp_path)


@pytest.fixture
def splits(make_cohort):
    """A small train/val pair of class-folder cohorts (6/12/9 and 3/6/4 images)."""
    return make_cohort("train", (6, 12, 9), seed=0), make_cohort("val", (3, 6, 4), seed=1)


# -- a tiny model and our checkpoint of it (ckpt.write_checkpoint, as clip_train.py writes) -------

def tiny_metadata(**overrides):
    """Checkpoint metadata of the tiny model, as clip_train.py records it (`overrides` replace keys)."""
    classes = prompts.load_prompt_set(None)
    metadata = {
        "model_name": TINY_MODEL,
        "model_config": json.loads(TINY_CONFIG.read_text()),
        "pretrained": None,
        "class_folders": prompts.class_folders(classes),
        "prompts": prompts.prompt_set_to_dict(classes),
        "preprocess": {"image_size": 64},
        "epoch": 3,
        "metrics": {"accuracy": 0.5},
        "args": {"lr": 1e-3, "batch_size": 16},
        "logit_scale_mode": "exp",
    }
    metadata.update(overrides)
    return metadata


def write_model_checkpoint(path, model, metadata):
    """`model`'s checkpoint with `metadata` ({CheckpointRecord field: value}; other keys are kept
    as the record's extra keys), written through the one writer, ckpt.write_checkpoint."""
    fields = {f.name for f in dataclasses.fields(ckpt.CheckpointRecord)}
    record = ckpt.CheckpointRecord(
        state_dict=model.state_dict(), **{k: v for k, v in metadata.items() if k in fields},
        extra={k: v for k, v in metadata.items() if k not in fields})
    ckpt.write_checkpoint(path, record)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model, _train_tf, _val_tf, _tokenizer = models.create_model(TINY_MODEL, None)
    return model


@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    """Our checkpoint format, written by ckpt.write_checkpoint as clip_train.py does."""
    path = tmp_path / "clip_model_epoch_best.pt"
    write_model_checkpoint(path, tiny_model, tiny_metadata())
    return path


# -- markers: what `make test-fast` (pytest -m "not slow") leaves out; docs/testing.md ----------------
# A rule here rather than a decorator on each test, so a new test that uses one of these fixtures or
# lands in one of these modules is slow without anyone remembering to say so. Tests that train or
# start a script in their own body carry an explicit @pytest.mark.slow instead.
SLOW_FIXTURES = {  # fixture name: what its setup does before the test starts
    "trained": "trains a tiny CLIP (test_first_day, test_precision)",
    "folder_run": "trains the CNN baseline (test_train_cnn)",
    "run": "trains the CNN baseline with a scripted score (test_cnn_schedule)",
    "demo_workspace": "runs the demo's scripts in a scratch clone (test_docs)",
    "step_results": "starts torchrun and a plain process (test_distributed)",
}
SLOW_MODULES = {  # test module: why every test in it is slow
    "test_distributed": "each test starts torchrun (2 processes)",
    "test_crash_safety": "SIGKILLs clip_train.py subprocesses and resumes them",
}
DISTRIBUTED_MODULES = {"test_distributed"}


def pytest_collection_modifyitems(config, items):
    """Mark `slow` the tests that use a SLOW_FIXTURES fixture or live in a SLOW_MODULES module, and
    `distributed` those of DISTRIBUTED_MODULES."""
    for item in items:
        module = Path(str(item.fspath)).stem
        if module in SLOW_MODULES or SLOW_FIXTURES.keys() & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if module in DISTRIBUTED_MODULES:
            item.add_marker(pytest.mark.distributed)
