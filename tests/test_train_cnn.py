"""baselines/train_cnn.py: known answers of its pure functions, --weights loading, and tiny end-to-
end runs (resnet18, 32 px, random init, a few images) checked value by value against the saved
checkpoint; the offline --weights imagenet refusal; a table of refused inputs."""

import json
import shutil
import subprocess
import sys
import urllib.error
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from orbital_clip import checkpoint as ckpt
from orbital_clip import cohort as cohort_io
from orbital_clip import images
from orbital_clip import metrics
from demo import make_demo_cohort
from orbital_clip import cnn as train_cnn
from conftest import REPO_ROOT, tree_state, write_cohorts
from conftest import write_model_checkpoint

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]  # prompts.py's order
TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--lr", "1e-3", "--workers", "0", "--no-progress"]


def cohort_argv(train, val, test, save_dir, *extra):
    return ["--train-dir", str(train), "--val-dir", str(val), "--test-dir", str(test),
            "--out-dir", str(save_dir), *TINY, *extra]


def model_probs(checkpoint_path, items, image_size_px=32):
    """Softmax probabilities of a saved checkpoint on `items`, computed here independently of
    train_cnn's predict(): the model rebuilt from the checkpoint's own metadata, the images read as
    every script reads them (JPEG draft decoding down to the input size)."""
    from torchvision.models import get_model
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = get_model(checkpoint["arch"], weights=None, num_classes=len(checkpoint["class_folders"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    _train_tf, eval_tf = train_cnn.make_transforms(image_size_px)
    with torch.no_grad():
        batch = torch.stack([eval_tf(images.read_image(path, image_size_px)) for path, _label in items])
        return torch.softmax(model(batch), dim=1).double().numpy()


# -- pure functions -------------------------------------------------------------------------------


def test_selection_score_is_the_mean_per_class_recall():
    y_true = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 1, 2, 2, 2])
    # recalls: class 0 1/2, class 1 3/4, class 2 2/2 -> mean 0.75 (plain accuracy would be 6/8 too,
    # so a second case where they differ)
    assert train_cnn.selection_score(y_true, y_pred) == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    y_true, y_pred = np.array([0, 1, 1, 1, 1]), np.array([1, 1, 1, 1, 1])
    assert train_cnn.selection_score(y_true, y_pred) == pytest.approx(0.5)  # accuracy is 0.8
    assert np.isnan(train_cnn.selection_score(np.array([]), np.array([])))


def test_class_weights_and_sampling_weights_known_answers():
    labels = [0] * 6 + [1] * 12 + [2] * 9
    # n / (C * count): 27 / 18, 27 / 36, 27 / 27
    np.testing.assert_allclose(train_cnn.class_weight_vector(labels, 3), [1.5, 0.75, 1.0])
    weights = train_cnn.sample_weights(labels)
    totals = [weights[np.asarray(labels) == k].sum() for k in range(3)]
    np.testing.assert_allclose(totals, [totals[0]] * 3)  # every class equally likely per draw


def test_balanced_sampling_draws_every_class_equally_often(tmp_path):
    items = [(tmp_path / f"{i}.jpg", label) for i, label in enumerate([0] * 2 + [1] * 8 + [2] * 20)]
    args = Namespace(image_size=32, balanced_sampling=True, batch_size=4, workers=0, device=torch.device("cpu"), seed=0)
    loader = train_cnn.make_loader(items, None, args, train=True, generator=torch.Generator().manual_seed(0))
    draws = [items[i][1] for _ in range(200) for i in loader.sampler]  # 200 epochs of 30 draws
    shares = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.03)  # plain shuffling: 0.07 / 0.27 / 0.67
    args.balanced_sampling = False
    assert train_cnn.make_loader(items, None, args, train=True).sampler.__class__.__name__ == "RandomSampler"


def test_is_improvement_strictly_better_and_nan_never_wins():
    assert metrics.is_improvement(0.5, None)
    assert metrics.is_improvement(0.6, 0.5)
    assert not metrics.is_improvement(0.5, 0.5)  # a tie keeps the earlier epoch
    assert not metrics.is_improvement(float("nan"), None)


def test_remap_densenet_keys():
    mapped = train_cnn.remap_densenet_keys({
        "features.denseblock1.denselayer1.norm.1.weight": 1, "features.denseblock1.denselayer12.conv.2.weight": 2,
        "features.norm0.weight": 3, "classifier.weight": 4})
    assert mapped == {"features.denseblock1.denselayer1.norm1.weight": 1,
                      "features.denseblock1.denselayer12.conv2.weight": 2,
                      "features.norm0.weight": 3, "classifier.weight": 4}


def test_predictions_frame_schema_and_values(tmp_path):
    root = tmp_path / "external"
    items = [(root / "healthy eyes" / "a.jpg", 1), (root / "orbital disease" / "sub" / "b.png", 0),
             (root / "non-orbital disease" / "c.jpg", 2)]
    cohorts = train_cnn.Cohorts(FOLDERS, [], [], items, root)
    probs = np.array([[0.2, 0.5, 0.3], [np.nan] * 3, [0.1, 0.1, 0.8]])
    frame = train_cnn.predictions_frame(cohorts, probs, ["ok", "failed: truncated image", "ok"])
    assert list(frame.columns) == ["path", "true_label", "pred_label", "prob_orbital disease",
                                   "prob_healthy eyes", "prob_non-orbital disease", "prediction", "status"]
    assert frame["prediction"].tolist() == frame["pred_label"].tolist()  # argmax: the only rule here
    assert frame["path"].tolist() == ["healthy eyes/a.jpg", "orbital disease/sub/b.png", "non-orbital disease/c.jpg"]
    assert frame["true_label"].tolist() == ["healthy eyes", "orbital disease", "non-orbital disease"]
    assert frame["pred_label"].tolist() == ["healthy eyes", "", "non-orbital disease"]
    assert frame["prob_healthy eyes"].iloc[0] == 0.5 and np.isnan(frame["prob_healthy eyes"].iloc[1])


# -- weights --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_like_file(tmp_path_factory):
    """A resnet18 state_dict with torchvision's 1000-way head, as an ImageNet download has."""
    from torchvision.models import get_model
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet-like.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), path)
    return path


@pytest.mark.slow
def test_weights_file_loads_the_body_and_keeps_a_new_head(imagenet_like_file, tmp_path):
    source = torch.load(imagenet_like_file, weights_only=True)
    model, info = train_cnn.build_model("resnet18", str(imagenet_like_file), FOLDERS, 32, seed=0)
    state = model.state_dict()
    assert info.head == "new" and info.source == str(imagenet_like_file)
    assert state["fc.weight"].shape == (3, 512)
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(state[key], source[key]), key
    fresh, _ = train_cnn.build_model("resnet18", "none", FOLDERS, 32, seed=0)
    assert torch.equal(state["fc.weight"], fresh.state_dict()["fc.weight"])  # the seeded new head
    assert not torch.equal(state["conv1.weight"], fresh.state_dict()["conv1.weight"])
    # A checkpoint of ours for the same classes keeps its head too; for other classes (or in
    # another order) of the same count, or as a plain state_dict, it gets a new head.
    ours = tmp_path / "ours.pt"
    write_model_checkpoint(ours, model, {"format": train_cnn.CHECKPOINT_FORMAT, "arch": "resnet18",
                                         "class_folders": FOLDERS})
    again, info = train_cnn.build_model("resnet18", str(ours), FOLDERS, 32, seed=5)
    assert info.head == "loaded"
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    plain_file = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain_file)
    for path, folders in ((ours, FOLDERS[::-1]), (plain_file, FOLDERS)):
        other, info = train_cnn.build_model("resnet18", str(path), folders, 32, seed=5)
        assert info.head == "new"
        assert not torch.equal(other.state_dict()["fc.weight"], state["fc.weight"])
        assert torch.equal(other.state_dict()["conv1.weight"], state["conv1.weight"])


@pytest.mark.parametrize("arch", train_cnn.ARCHS)
@pytest.mark.slow
def test_every_architecture_gets_a_head_with_one_output_per_class(arch):
    model, info = train_cnn.build_model(arch, "none", FOLDERS[:2], 32, seed=0)
    head = model.get_submodule(train_cnn.HEAD_MODULES[arch])
    assert isinstance(head, torch.nn.Linear) and head.out_features == 2
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert info.head == "new"


@pytest.mark.slow
def test_weights_file_of_another_architecture_is_refused(imagenet_like_file, tmp_path):
    with pytest.raises(train_cnn.WeightsError, match=r"^--weights .*weights do not fit architecture "
                                                     r"efficientnet_b0.*pass the --arch"):
        train_cnn.build_model("efficientnet_b0", str(imagenet_like_file), FOLDERS, 32, seed=0)
    model, _ = train_cnn.build_model("resnet18", "none", FOLDERS, 32, seed=0)
    ours = tmp_path / "ours.pt"
    write_model_checkpoint(ours, model, {"format": train_cnn.CHECKPOINT_FORMAT, "arch": "resnet18"})
    with pytest.raises(train_cnn.WeightsError, match="holds architecture resnet18, not --arch resnet50"):
        train_cnn.build_model("resnet50", str(ours), FOLDERS, 32, seed=0)


# -- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Class folders, balanced sampling, 2 epochs; the test cohort holds one unreadable image."""
    root = tmp_path_factory.mktemp("cnn_folders")
    write_cohorts(root, train=(3, 6, 4), val=(2, 3, 3), test=(2, 3, 2))
    (root / "test" / "healthy eyes" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    argv = cohort_argv(root / "train", root / "val", root / "test", root / "run", "--epochs", "2",
                       "--balanced-sampling")
    assert train_cnn.main(argv) == 0
    return root, argv


def test_end_to_end_predictions_follow_the_best_checkpoint(folder_run):
    root, _argv = folder_run
    frame = pd.read_csv(root / "run" / "predictions.csv", keep_default_na=False)
    test_items, _ = cohort_io.list_class_folder_images(root / "test", FOLDERS)
    assert len(frame) == len(test_items) == 8
    assert frame["path"].tolist() == [p.relative_to(root / "test").as_posix() for p, _ in test_items]
    assert frame["true_label"].tolist() == [p.split("/")[0] for p in frame["path"]]
    prob_columns = [f"prob_{folder}" for folder in FOLDERS]  # registry order, not alphabetical
    assert list(frame.columns) == ["path", "true_label", "pred_label", *prob_columns, "prediction", "status"]
    broken = frame["path"] == "healthy eyes/broken.jpg"
    assert frame.loc[broken, "status"].item().startswith("failed: ")
    assert frame.loc[broken, "pred_label"].item() == "" and frame.loc[broken, prob_columns[0]].item() == ""
    ok = frame[~broken]
    assert (ok["status"] == "ok").all()
    probs = ok[prob_columns].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert ok["pred_label"].tolist() == [FOLDERS[k] for k in probs.argmax(axis=1)]
    # The probabilities are those of the saved best checkpoint, recomputed here.
    readable = [item for item in test_items if item[0].name != "broken.jpg"]
    np.testing.assert_allclose(probs, model_probs(root / "run" / train_cnn.BEST_NAME, readable), atol=1e-5)


def test_end_to_end_best_epoch_metrics_and_records(folder_run):
    root, argv = folder_run
    history = pd.read_csv(root / "run" / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2]
    best_epoch = int(history["epoch"][history["val_balanced_accuracy"].to_numpy().argmax()])
    assert history.loc[history["is_best"], "epoch"].iloc[-1] == best_epoch
    checkpoint = torch.load(root / "run" / train_cnn.BEST_NAME, weights_only=True)
    assert checkpoint["epoch"] == best_epoch
    assert checkpoint["format"] == train_cnn.CHECKPOINT_FORMAT and checkpoint["arch"] == "resnet18"
    assert checkpoint["class_folders"] == FOLDERS and checkpoint["argv"] == argv
    # The recorded validation balanced accuracy is sklearn's on the checkpoint's own predictions.
    val_items, _ = cohort_io.list_class_folder_images(root / "val", FOLDERS)
    y_true = [label for _path, label in val_items]
    y_pred = model_probs(root / "run" / train_cnn.BEST_NAME, val_items).argmax(axis=1)
    expected = balanced_accuracy_score(y_true, y_pred)
    assert checkpoint["metrics"]["val_balanced_accuracy"] == pytest.approx(expected)
    assert history.loc[history["epoch"] == best_epoch, "val_balanced_accuracy"].item() == pytest.approx(expected)
    record = json.loads((root / "run" / "args.json").read_text())
    assert record["argv"] == argv and record["args"]["balanced_sampling"] is True
    assert record["run"]["class_weights"] is None and record["run"]["images"] == {"train": 13, "val": 8, "test": 8}
    assert record["run"]["weights"] == {"spec": "none", "source": "random init (seed 2024)", "head": "new"}


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [[], ["--balanced-sampling"]])
def test_a_cohort_that_leaves_a_last_batch_of_one_trains(tmp_path, sampling):
    """9 training images at batch 8 leave one image over; batch norm on resnet18's 1x1 feature map
    at 32 px cannot normalise one value per channel, so that batch is dropped (issue 26, defect 7)."""
    write_cohorts(tmp_path, train=(2, 4, 3), val=(1, 1, 1), test=(1, 1, 1))
    argv = cohort_argv(tmp_path / "train", tmp_path / "val", tmp_path / "test", tmp_path / "run",
                       "--epochs", "1", *sampling)
    assert train_cnn.main(argv) == 0
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["epoch"].tolist() == [1]
    items, _ = cohort_io.list_class_folder_images(tmp_path / "train", FOLDERS)
    args = Namespace(image_size=32, batch_size=8, workers=0, device=torch.device("cpu"),
                     balanced_sampling=bool(sampling), seed=0)
    loader = train_cnn.make_loader(items, None, args, train=True, generator=torch.Generator())
    assert len(loader) == 1  # one batch of 8; the ninth image waits for the next epoch's shuffle


def test_manifest_weights_file_class_weights_custom_classes_and_tie_rule(tmp_path, imagenet_like_file,
                                                                         monkeypatch):
    """Manifest input for all three splits, --weights FILE, --class-weights, a --prompts class set in
    another order; the selection score scripted (0.9, 0.9) so the best epoch is 1 (a tie does not
    replace it) and the predictions must come from epoch 1's weights, not the last ones."""
    make_demo_cohort.write_cohort(tmp_path / "data", (4, 5, 3), 0)
    rows = []
    for path in sorted((tmp_path / "data").rglob("*.jpg")):
        split = ("train", "train", "val", "test")[int(path.stem[-3:]) % 4]
        rows.append({"path": path.relative_to(tmp_path).as_posix(), "label": path.parent.name, "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    order = ["non-orbital disease", "orbital disease", "healthy eyes"]
    (tmp_path / "prompts.json").write_text(json.dumps(
        {"classes": [{"folder": f, "train": [f], "eval": [f]} for f in order]}))
    scores = iter([0.9, 0.9])
    monkeypatch.setattr(train_cnn, "selection_score", lambda y_true, y_pred: next(scores))
    manifest, run = tmp_path / "manifest.csv", tmp_path / "run"
    argv = cohort_argv(manifest, manifest, manifest, run, "--epochs", "2", "--weights", str(imagenet_like_file),
                       "--class-weights", "--prompts", str(tmp_path / "prompts.json"))
    assert train_cnn.main(argv) == 0
    history = pd.read_csv(run / "metrics.csv")
    assert history["val_balanced_accuracy"].tolist() == [0.9, 0.9]
    assert history["is_best"].tolist() == [True, False]
    checkpoint = torch.load(run / train_cnn.BEST_NAME, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["class_folders"] == order
    frame = pd.read_csv(run / "predictions.csv")
    test_rows = [r for r in rows if r["split"] == "test"]
    assert frame["path"].tolist() == [r["path"] for r in test_rows]  # relative to the manifest's folder
    assert frame["true_label"].tolist() == [r["label"] for r in test_rows]
    prob_columns = [f"prob_{folder}" for folder in order]
    assert list(frame.columns[3:6]) == prob_columns
    items = [(tmp_path / r["path"], order.index(r["label"])) for r in test_rows]
    np.testing.assert_allclose(frame[prob_columns].to_numpy(), model_probs(run / train_cnn.BEST_NAME, items),
                               atol=1e-5)
    train_labels = [order.index(r["label"]) for r in rows if r["split"] == "train"]
    counts = np.bincount(train_labels, minlength=3)
    record = json.loads((run / "args.json").read_text())
    np.testing.assert_allclose(record["run"]["class_weights"], len(train_labels) / (3 * counts))
    assert record["run"]["weights"] == {"spec": str(imagenet_like_file), "source": str(imagenet_like_file), "head": "new"}
    # A second run into the same folder needs --overwrite and then replaces every output of ours
    # (and nothing else).
    (run / "notes.txt").write_text("the user's own notes")
    monkeypatch.setattr(train_cnn, "selection_score", lambda y_true, y_pred: 0.7)
    assert train_cnn.main([*argv, "--epochs", "1", "--overwrite"]) == 0
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1]
    assert torch.load(run / train_cnn.BEST_NAME, weights_only=True)["epoch"] == 1
    assert (run / "notes.txt").read_text() == "the user's own notes"


def test_weights_imagenet_offline_refuses_naming_the_flag_and_the_file(tmp_path, monkeypatch, capsys, cohort):
    hub = tmp_path / "empty_hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # offline, even on a networked machine
    argv = cohort_argv(cohort, cohort, cohort, tmp_path / "run", "--weights", "imagenet", "--arch", "resnet50")
    before = tree_state(cohort, tmp_path / "run")  # torch's own cache folder may appear in the hub
    assert train_cnn.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    expected = hub / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert line.startswith("error: --weights imagenet: ") and str(expected) in line
    assert "download https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in line
    assert "--weights none" in line
    assert tree_state(cohort, tmp_path / "run") == before and not list(hub.rglob("*.pth"))


@pytest.mark.slow
def test_help_runs_as_a_script():
    run = subprocess.run([sys.executable, "-m", "baselines.train_cnn", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--balanced-sampling" in run.stdout and "vit_b_16" in run.stdout


# -- refused input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn_bad_inputs")
    make_demo_cohort.write_cohort(root / "cohort", (2, 2, 2), 0)
    make_demo_cohort.write_cohort(root / "no_rare", (0, 2, 2), 0)
    shutil.rmtree(root / "no_rare" / "orbital disease")
    make_demo_cohort.write_cohort(root / "unknown", (1, 1, 1), 1)
    (root / "unknown" / "cataract").mkdir()
    shutil.copy(next((root / "cohort" / "healthy eyes").iterdir()), root / "unknown" / "cataract" / "a.jpg")
    (root / "empty").mkdir()
    (root / "not_weights.pt").write_text("not a checkpoint")
    torch.save({"foo.weight": torch.zeros(2)}, root / "foreign.pt")
    # A file that only loads by unpickling an arbitrary object (here a harmless Namespace).
    torch.save({"state_dict": {"fc.weight": torch.zeros(2)}, "extra": Namespace(a=1)}, root / "pickled.pt")
    (root / "notes.txt").write_text("a file")
    (root / "used").mkdir()
    (root / "used" / "earlier.txt").write_text("an earlier run")
    return root


REFUSALS = [
    (["--arch", "vgg16"], ["--arch"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--weight-decay", "-1"], ["--weight-decay"]),
    (["--workers", "-1"], ["--workers"]),
    (["--image-size", "16"], ["--image-size"]),
    (["--class-weights", "--balanced-sampling"], ["--class-weights", "--balanced-sampling"]),
    (["--arch", "vit_b_16", "--image-size", "40"], ["--image-size", "multiple of 16"]),
    (["--arch", "vit_b_16", "--image-size", "64", "--weights", "imagenet"], ["--image-size", "224"]),
    (["--precision", "fp16"], ["--precision"]),
    (["--device", "cuda"], ["--device"]),
    (["--train-dir", "{root}/missing"], ["--train-dir", "{root}/missing"]),
    (["--val-dir", "{root}/empty"], ["--val-dir", "{root}/empty"]),
    (["--test-dir", "{root}/notes.txt"], ["--test-dir", "{root}/notes.txt", "manifest.csv"]),
    (["--test-dir", "{root}/unknown"], ["--test-dir", "{root}/unknown", "cataract"]),
    (["--train-dir", "{root}/no_rare", "--class-weights"], ["--class-weights", "orbital disease"]),
    (["--weights", "{root}/missing.pt"], ["--weights", "{root}/missing.pt"]),
    (["--weights", "{root}/not_weights.pt"], ["--weights", "{root}/not_weights.pt"]),
    (["--weights", "{root}/foreign.pt"], ["--weights", "{root}/foreign.pt", "--arch"]),
    (["--weights", "{root}/pickled.pt"], ["--weights", "{root}/pickled.pt", "refused"]),
    (["--prompts", "{root}/missing.json"], ["--prompts"]),
    (["--out-dir", "{root}/used"], ["--out-dir", "{root}/used", "--overwrite"]),
    (["--out-dir", "{root}/notes.txt"], ["--out-dir", "{root}/notes.txt"]),
]


@pytest.mark.parametrize("extra, expected", REFUSALS, ids=[" ".join(e) for e, _ in REFUSALS])
def test_refused_input_exits_2_names_the_flag_and_writes_nothing(extra, expected, bad_inputs, capsys):
    root = bad_inputs
    cohort = root / "cohort"
    argv = cohort_argv(cohort, cohort, cohort, root / "run", *[e.format(root=root) for e in extra])
    before = tree_state(root)
    try:
        code = train_cnn.main(argv)
    except SystemExit as exit_info:  # argparse
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error: " in line]
    for text in expected:
        assert text.format(root=root) in line, line
    assert tree_state(root) == before


# -- the same augmentation as the CLIP path; --resume exact; Ctrl-C as clip_train.py (issue 26) -----

def test_training_augmentation_is_open_clips_unless_flip_is_asked():
    from open_clip.transform import image_transform
    from torchvision import transforms as T
    clip_crop = next(t for t in image_transform(32, is_train=True).transforms if isinstance(t, T.RandomResizedCrop))
    for flip in (False, True):
        train_tf, _eval_tf = train_cnn.make_transforms(32, flip)
        crop = next(t for t in train_tf.transforms if isinstance(t, T.RandomResizedCrop))
        assert (crop.scale, crop.ratio, crop.interpolation) == (clip_crop.scale, clip_crop.ratio, clip_crop.interpolation)
        assert any(isinstance(t, T.RandomHorizontalFlip) for t in train_tf.transforms) == flip
    assert not train_cnn.parse_args(["--train-dir", ".", "--val-dir", ".", "--test-dir", ".", "--out-dir",
                                     "new_run", "--weights", "none"]).flip


@pytest.fixture
def large_cohorts(tmp_path):
    """train / val / test cohorts upscaled to 400x300: at --image-size 32 every crop draw counts."""
    from PIL import Image
    write_cohorts(tmp_path, train=(3, 5, 4), val=(2, 2, 2), test=(1, 1, 1))
    for path in tmp_path.rglob("*.jpg"):
        Image.open(path).convert("RGB").resize((400, 300)).save(path, quality=90)
    return tmp_path / "train", tmp_path / "val", tmp_path / "test"


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_cnn_resume_after_ctrl_c_is_bit_identical(large_cohorts, tmp_path, monkeypatch, capsys, workers):
    train, val, test = large_cohorts
    extra = ("--epochs", "3", "--workers", workers, "--flip")
    assert train_cnn.main(cohort_argv(train, val, test, tmp_path / "straight", *extra)) == 0
    real_epoch, calls = train_cnn.train_one_epoch, {"n": 0}

    def interrupted_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_cnn, "train_one_epoch", interrupted_in_epoch_2)
    split = tmp_path / "split"
    assert train_cnn.main(cohort_argv(train, val, test, split, *extra)) == train_cnn.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"interrupted during training; {split / train_cnn.LAST_NAME} holds epoch 1/3" in err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python -m baselines.train_cnn ") and command.endswith("--resume auto")
    monkeypatch.setattr(train_cnn, "train_one_epoch", real_epoch)
    assert train_cnn.main(cohort_argv(train, val, test, split, *extra, "--resume", "auto")) == 0
    for name in (train_cnn.LAST_NAME, train_cnn.BEST_NAME):
        a, b = (ckpt.read_checkpoint(root / name).state_dict for root in (tmp_path / "straight", split))
        assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) == 0.0, name
    straight, resumed = (pd.read_csv(root / "metrics.csv") for root in (tmp_path / "straight", split))
    pd.testing.assert_frame_equal(straight.drop(columns="seconds"), resumed.drop(columns="seconds"))
    assert (split / train_cnn.PREDICTIONS_NAME).read_bytes() == (tmp_path / "straight" / train_cnn.PREDICTIONS_NAME).read_bytes()


@pytest.mark.slow
def test_cnn_resume_with_another_training_flag_is_refused_by_name(tmp_path, capsys):
    write_cohorts(tmp_path, train=(3, 5, 4), val=(2, 2, 2), test=(1, 1, 1))
    data = [tmp_path / name for name in ("train", "val", "test")]
    save_dir = tmp_path / "run"
    assert train_cnn.main(cohort_argv(*data, save_dir, "--epochs", "1")) == 0
    before = tree_state(save_dir)
    capsys.readouterr()
    assert train_cnn.main(cohort_argv(*data, save_dir, "--epochs", "1", "--lr", "1e-2",
                                      "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "--lr (0.001 -> 0.01)" in err and "--overwrite" in err and "Traceback" not in err
    assert tree_state(save_dir) == before


@pytest.mark.slow
def test_a_log_that_is_not_a_terminal_gets_no_progress_bar(tmp_path, capsys):
    write_cohorts(tmp_path, train=(3, 5, 4), val=(2, 2, 2), test=(1, 1, 1))
    argv = [a for a in cohort_argv(tmp_path / "train", tmp_path / "val", tmp_path / "test", tmp_path / "run",
                                   "--epochs", "1") if a != "--no-progress"]
    assert train_cnn.main(argv) == 0
    err = capsys.readouterr().err  # captured: not a terminal, as a redirected log
    assert "\r" not in err and "batch/s" not in err and "epoch 1/1" in err


@pytest.mark.slow
def test_curves_card_and_epochs_0_with_a_checkpoint_predicts_only(tmp_path, capsys):
    write_cohorts(tmp_path, train=(3, 5, 4), val=(2, 2, 2), test=(2, 1, 2))
    data = [tmp_path / name for name in ("train", "val", "test")]
    assert train_cnn.main(cohort_argv(*data, tmp_path / "run", "--epochs", "2")) == 0
    best = tmp_path / "run" / train_cnn.BEST_NAME
    # the finished run's curves and card, with its numbers
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    chosen = history[history["is_best"]].iloc[-1]
    card = (tmp_path / "run" / train_cnn.CARD_NAME).read_text()
    assert "| orbital disease | 3 | 2 | 2 |" in card and "| healthy eyes | 5 | 2 | 1 |" in card
    assert (f"tie keeps the earlier): {chosen['epoch']}: accuracy {chosen['val_accuracy']:.3f}, "
            f"balanced accuracy {chosen['val_balanced_accuracy']:.3f}") in card
    assert "no flips, as the CLIP run" in card
    with Image.open(tmp_path / "run" / "training_curves.png") as curves:
        assert curves.size[0] > 1000  # 7 inches at the report's 300 dpi
    assert train_cnn.main(cohort_argv(*data, tmp_path / "again", "--epochs", "0", "--resume", str(best))) == 0
    assert not (tmp_path / "again" / train_cnn.CARD_NAME).exists()  # predictions only
    assert (tmp_path / "again" / train_cnn.PREDICTIONS_NAME).read_bytes() == \
        (tmp_path / "run" / train_cnn.PREDICTIONS_NAME).read_bytes()
    assert not (tmp_path / "again" / train_cnn.LAST_NAME).exists()  # nothing trained
    # predict-only in the training run's own folder: its own record, the training command kept
    trained = (tmp_path / "run" / "args.json").read_bytes()
    assert train_cnn.main(cohort_argv(*data, tmp_path / "run", "--epochs", "0", "--resume", "auto")) == 0
    assert (tmp_path / "run" / "args.json").read_bytes() == trained
    predict_record = json.loads((tmp_path / "run" / train_cnn.PREDICT_RECORD_NAME).read_text())
    assert predict_record["args"]["epochs"] == 0 and json.loads(trained)["args"]["epochs"] == 2
    capsys.readouterr()
    assert train_cnn.main(cohort_argv(*data, tmp_path / "other", "--epochs", "0", "--resume", str(best),
                                      "--image-size", "64")) == 2
    assert "--image-size the checkpoint was trained with" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
