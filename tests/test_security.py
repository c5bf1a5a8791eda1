"""Security: a checkpoint whose unpickling would run code is refused by every entry point that
reads weights (inference --checkpoint, --baseline, --wise-ft-base; clip_train --pretrained,
--resume PATH, --resume auto): exit status 2, one error line naming the flag and the file, the
payload never runs, and nothing is written."""

import pathlib
import pickle

import pytest
import torch

from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from orbital_clip import checkpoint
from orbital_clip import models
from orbital_clip import scoring as inference
from orbital_clip import prompts
from conftest import TINY_CONFIG, TINY_MODEL, tree_state, write_cohorts
from conftest import write_model_checkpoint

WRITERS = ("torch.save", "torch.save legacy", "pickle.dump")


class TouchOnUnpickle:
    """Unpickling it calls pathlib.Path.touch(marker): a harmless stand-in for running any code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def write_malicious_checkpoint(path, marker, writer, weights):
    """A file that looks like our checkpoint (real weights, metadata, a last checkpoint's keys)
    with the payload in its metadata."""
    payload = {"format": checkpoint.CHECKPOINT_FORMAT, "state_dict": weights, "model_name": TINY_MODEL,
               "epoch": 1, "optimizer": {}, "metrics": {"note": TouchOnUnpickle(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    elif writer == "torch.save legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


def run_main(module, argv):
    """main's return value, or the code of the SystemExit argparse raises."""
    try:
        return module.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Cohorts and a real (safe) tiny checkpoint, written once for the module."""
    root = tmp_path_factory.mktemp("security_inputs")
    write_cohorts(root, train=(4, 4, 4), val=(2, 2, 2), test=(1, 1, 1))
    torch.manual_seed(0)
    model, *_ = models.create_model(TINY_MODEL, None)
    write_model_checkpoint(root / "good.pt", model, {
        "model_name": TINY_MODEL, "model_config": models.register_model_config(TINY_CONFIG)[1],
        "pretrained": None, "class_folders": prompts.class_folders(prompts.load_prompt_set(None)),
        "prompts": prompts.prompt_set_to_dict(prompts.load_prompt_set(None)), "epoch": 1})
    return {"root": root, "weights": checkpoint.clean_state_dict(model.state_dict())}


@pytest.fixture(params=WRITERS)
def malicious(request, shared, tmp_path):
    """(path of a malicious checkpoint, marker its unpickling would create). The same writer is
    first shown to be live: an unrestricted torch.load of a twin file creates the twin's marker."""
    probe, probe_marker = tmp_path / "probe.pt", tmp_path / "probe_marker"
    write_malicious_checkpoint(probe, probe_marker, request.param, shared["weights"])
    try:
        torch.load(probe, map_location="cpu", weights_only=False)  # the unsafe load we never do
    except RuntimeError:
        pass  # a raw pickle is no torch file, but torch unpickles it before it finds out
    assert probe_marker.is_file(), "the payload is not live: the test would pass vacuously"
    probe.unlink()
    probe_marker.unlink()
    path, marker = tmp_path / "malicious.pt", tmp_path / "PAYLOAD_RAN"
    write_malicious_checkpoint(path, marker, request.param, shared["weights"])
    return path, marker


def inference_argv(shared, out, *extra):
    root = shared["root"]
    return ["--test-dir", str(root / "test"), "--output-dir", str(out), "--workers", "0",
            "--bootstrap", "0", "--no-progress", "--no-figures", *extra]


def train_argv(shared, save_dir, *extra):
    root = shared["root"]
    return ["--train-dir", str(root / "train"), "--val-dir", str(root / "val"), "--save-dir",
            str(save_dir), "--model-config", str(TINY_CONFIG), "--lr", "1e-3", "--batch-size", "4",
            "--epochs", "1", "--workers", "0", "--no-progress", *extra]


# (entry point, flag named in the error, argv builder(shared, malicious path, output folder))
ENTRY_POINTS = {
    "inference --checkpoint": (inference, "--checkpoint", lambda s, evil, out: inference_argv(
        s, out, "--checkpoint", str(evil), "--model-name", TINY_MODEL)),
    "inference --baseline": (inference, "--baseline", lambda s, evil, out: inference_argv(
        s, out, "--checkpoint", str(s["root"] / "good.pt"), "--baseline", str(evil))),
    "inference --wise-ft-base": (inference, "--wise-ft-base", lambda s, evil, out: inference_argv(
        s, out, "--checkpoint", str(s["root"] / "good.pt"), "--wise-ft-alpha", "0.5",
        "--wise-ft-base", str(evil))),
    "clip_train --pretrained": (train_cli, "--pretrained", lambda s, evil, out: train_argv(
        s, out, "--pretrained", str(evil))),
    "clip_train --resume PATH": (train_cli, "--resume", lambda s, evil, out: train_argv(
        s, out, "--resume", str(evil))),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_malicious_checkpoint_is_refused_and_never_runs(entry, malicious, shared, tmp_path, capsys,
                                                        monkeypatch):
    module, flag, build_argv = ENTRY_POINTS[entry]
    path, marker = malicious
    monkeypatch.chdir(tmp_path)  # a relative default output would land in the snapshot
    out = tmp_path / "out"
    before = tree_state(tmp_path, shared["root"])
    capsys.readouterr()
    assert run_main(module, build_argv(shared, path, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert flag in line and str(path) in line and "refused" in line
    assert not marker.exists(), "the payload ran"
    assert not out.exists()
    assert tree_state(tmp_path, shared["root"]) == before


def test_resume_auto_refuses_a_malicious_last_checkpoint(malicious, shared, tmp_path, capsys):
    path, marker = malicious
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    last = save_dir / train_checkpoints.LAST_NAME  # planted where --resume auto looks
    path.rename(last)
    (save_dir / "args.json").write_text("{}")  # what the earlier run wrote stays as it was
    before = tree_state(tmp_path, shared["root"])
    capsys.readouterr()
    assert run_main(train_cli, train_argv(shared, save_dir, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--resume" in line and str(last) in line and "refused" in line
    assert not marker.exists(), "the payload ran"
    assert tree_state(tmp_path, shared["root"]) == before
