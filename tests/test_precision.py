"""Precision: `--precision auto` resolves by the hardware (patched both ways), bf16 inference runs
a bf16 copy of the image tower on the CPU while the model keeps its fp32 weights, and bf16
training (autocast) keeps fp32 master weights; the choice is recorded in args.json, checkpoints,
metrics.json and report.md."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from orbital_clip.train import cli as train_cli
from orbital_clip import models
from orbital_clip import zero_shot
from orbital_clip import scoring as inference
from orbital_clip.models import cpu_native_bf16 as real_cpu_native_bf16  # conftest patches the module's name
from conftest import TINY_CONFIG, TINY_MODEL, write_cohorts

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("isa, expected", [("AMX", ("bf16", "CPU with AMX")),
                                           ("AVX512-BF16", ("bf16", "CPU with AVX512-BF16")),
                                           (None, ("fp32", "CPU without AMX or AVX512-BF16"))])
def test_auto_on_the_cpu_follows_the_hardware_check(monkeypatch, isa, expected):
    monkeypatch.setattr(models, "cpu_native_bf16", lambda: isa)
    assert models.resolve_precision("auto", CPU) == expected
    for explicit in ("fp32", "bf16"):  # an explicit choice is never overridden by the hardware
        assert models.resolve_precision(explicit, CPU) == (explicit, f"--precision {explicit}")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_asks_for_native_bf16(monkeypatch, native, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(models, "cpu_native_bf16", lambda: "AMX")  # the CPU does not decide for CUDA
    assert models.resolve_precision("auto", CUDA)[0] == expected
    assert asked == [False]  # emulated bf16 (pre-Ampere) is not native
    assert models.resolve_precision("fp16", CUDA) == ("fp16", "--precision fp16")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "AMX"), (True, False, "AMX"),
                                                        (False, True, "AVX512-BF16"), (False, False, None)])
def test_cpu_check_reads_torchs_own_capability_checks(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert real_cpu_native_bf16() == expected


def test_cpu_check_without_torchs_private_functions_says_no(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert real_cpu_native_bf16() is None


def test_auto_in_the_test_suite_is_fp32():
    """conftest pins auto to fp32 so exact comparisons hold on every CPU."""
    assert models.resolve_precision("auto", CPU)[0] == "fp32"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model, *_ = models.create_model(TINY_MODEL, None)
    return model.eval()


@pytest.mark.slow
def test_bf16_image_encoder_is_close_to_fp32_and_leaves_the_model_fp32(tiny_model):
    torch.manual_seed(1)
    images = torch.randn(6, 3, 64, 64)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.inference_mode():
        reference = tiny_model.encode_image(images)
        fp32 = zero_shot.image_encoder(tiny_model, CPU, "fp32")(images)
        bf16 = zero_shot.image_encoder(tiny_model, CPU, "bf16")(images)
    assert torch.equal(fp32, reference)  # fp32: today's path, bit for bit
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape
    assert not torch.equal(bf16, reference)  # really computed in bf16
    cosine = torch.nn.functional.cosine_similarity(bf16, reference, dim=1)
    assert cosine.min() > 0.99
    for key, value in tiny_model.state_dict().items():  # the model itself is untouched
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_bf16_encoder_unwraps_a_compiled_tower(tiny_model, monkeypatch):
    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            raise AssertionError("the wrapper must not be called")

    import copy
    model = copy.deepcopy(tiny_model)
    inner = model.visual
    model.visual = Wrapper(inner)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features = zero_shot.image_encoder(model, CPU, "bf16")(images)
        expected = inner.to(torch.bfloat16)(images.to(torch.bfloat16)).float()
    assert torch.equal(features, expected)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 2 epochs with auto on a (patched) AMX CPU: bf16 autocast."""
    root = tmp_path_factory.mktemp("bf16")
    write_cohorts(root, train=(8, 12, 10), val=(4, 6, 5), external=(6, 10, 8))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "cpu_native_bf16", lambda: "AMX")
        code = train_cli.main(["--train-dir", str(root / "train"), "--val-dir", str(root / "val"),
                                "--save-dir", str(root / "run"), "--model-config", str(TINY_CONFIG),
                                "--pretrained", "none", "--lr", "1e-3", "--batch-size", "10",
                                "--epochs", "2", "--workers", "0", "--no-progress"])
    assert code == 0
    return root


def test_training_with_auto_on_a_bf16_cpu_records_bf16_and_keeps_fp32_master_weights(trained):
    run = trained / "run"
    assert json.loads((run / "args.json").read_text())["args"]["precision"] == "bf16"
    last = torch.load(run / "clip_model_last.pt", weights_only=True)
    best = torch.load(run / "clip_model_epoch_best.pt", weights_only=True)
    assert last["args"]["precision"] == best["args"]["precision"] == "bf16"
    assert {v.dtype for v in best["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    moments = [s["exp_avg"] for s in last["optimizer"]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}  # AdamW's state in fp32
    assert any(m.abs().sum() > 0 for m in moments)  # it really stepped
    history = pd.read_csv(run / "metrics.csv")
    assert np.isfinite(history["train_loss"]).all() and len(history) == 2


def test_bf16_inference_agrees_with_fp32_and_records_its_precision(trained, monkeypatch):
    checkpoint = trained / "run" / "clip_model_epoch_best.pt"
    outputs = {}
    for name, isa, extra in (("fp32", "AMX", ["--precision", "fp32"]), ("auto", "AMX", []),
                             ("bf16", None, ["--precision", "bf16"])):
        monkeypatch.setattr(models, "cpu_native_bf16", lambda isa=isa: isa)
        out = trained / f"infer_{name}"
        assert inference.main(["--test-dir", str(trained / "external"), "--checkpoint", str(checkpoint),
                               "--output-dir", str(out), "--workers", "0", "--bootstrap", "50",
                               "--no-progress", "--no-figures", "--overwrite", *extra]) == 0
        outputs[name] = out
    for name, precision in (("fp32", "fp32"), ("auto", "bf16"), ("bf16", "bf16")):
        out = outputs[name]
        record = json.loads((out / "args.json").read_text())
        assert record["args"]["precision"] == record["run"]["precision"] == precision
        assert f"precision {precision}" in (out / "report.md").read_text()
    probs = {}
    for name, out in outputs.items():
        frame = pd.read_csv(out / "predictions.csv")
        probs[name] = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    assert np.array_equal(probs["auto"], probs["bf16"])  # auto on a bf16 CPU is bf16
    assert not np.array_equal(probs["fp32"], probs["bf16"])  # and bf16 really ran in bf16
    assert np.abs(probs["fp32"] - probs["bf16"]).max() < 0.02
    top2 = np.sort(probs["fp32"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # where fp32 is not a near-tie, bf16 predicts the same
    assert clear.sum() >= len(clear) // 2
    assert np.array_equal(probs["fp32"][clear].argmax(1), probs["bf16"][clear].argmax(1))
