"""The benchmark harness runs end to end (tiny model, tiny sizes) and reports every key."""

import json

import pytest

from conftest import TINY_CONFIG

from benchmarks import run as harness



def test_resized_copies_keep_the_short_side(tmp_path):
    paths = harness.make_camera_jpegs(tmp_path / "cam", 1, size_px=(600, 400))
    resized = harness.make_resized_copies(paths, tmp_path / "small", 64)
    from PIL import Image
    with Image.open(resized[0]) as image:
        assert image.size == (96, 64)


def test_gpu_smoke_parses_its_arguments_and_skips_cleanly_without_a_gpu(tmp_path, capsys):
    from benchmarks import gpu_smoke
    assert gpu_smoke.main(["--cases", "bf16", "torchrun", "--images", "40"]) == 0
    assert "skipped" in capsys.readouterr().out
    args = gpu_smoke.parse_args(["--cases", "torchrun", "compile", "--model-config", str(TINY_CONFIG)])
    command = gpu_smoke.case_command("torchrun", args, tmp_path, tmp_path / "out", n_gpus=4)
    assert "--nproc_per_node=4" in command and command[command.index("--accum-steps") + 1] == "2"
    compiled = gpu_smoke.case_command("compile", args, tmp_path, tmp_path / "out", n_gpus=4)
    assert "--compile" in compiled and "torch.distributed.run" not in compiled
    assert sum(gpu_smoke.split_counts(400)) == 400
    try:
        gpu_smoke.parse_args(["--images", "3"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("--images 3 was accepted")
    rows = [{"case": "bf16", "exit": 0, "train_loss": 1.5}]
    assert gpu_smoke.markdown_table(rows).splitlines()[2] == "| bf16 | 0 | 1.5 |"


def test_interleaved_best_takes_each_paths_fastest_timed_call(monkeypatch):
    calls = []
    clock = iter([0.0, 3.0,  # warm-up round: the start of each call, never counted
                  10.0, 12.0, 20.0, 20.5,  # round 1: a 2 s, b 0.5 s
                  30.0, 31.0, 40.0, 41.0])  # round 2: a 1 s, b 1 s
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    best = harness.interleaved_best({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert calls == ["a", "b"] * 3  # interleaved: a, b, a, b, ...
    assert best == {"a": 1.0, "b": 0.5}


def test_agreement_counts_keep_the_demo_proportions():
    opts = harness.parse_args(["--agreement-images", "240"])
    assert opts.agreement_counts == (40, 120, 80)
    assert harness.parse_args(["--agreement-images", "3"]).agreement_counts == (1, 2, 1)


@pytest.mark.slow
def test_bf16_only_measures_precision_and_nothing_else(tmp_path):
    out = tmp_path / "bf16.json"
    assert harness.main(["--model-config", str(TINY_CONFIG), "--batch-size", "2", "--infer-batch-size", "2",
                         "--repeats", "5", "--agreement-images", "3", "--bf16-only", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["train_bf16_speedup"] > 0 and results["infer_bf16_speedup"] > 0
    assert results["bf16_agreement_images"] == 4  # (1, 2, 1): the demo proportions, one image at least
    assert "train_e2e_over_model" not in results and "decode_full_images_per_s" not in results


def test_agreement_metric_differences_walk_every_metric_with_a_ci():
    from benchmarks import bf16_agreement
    fp32 = {"n": 10, "accuracy": 0.8, "accuracy_ci": [0.6, 1.0], "ece": 0.1, "ece_ci": [0.0, 0.2],
            "macro_auroc": None, "macro_auroc_ci": None,
            "per_class": {"orbital disease": {"support": 3, "sensitivity": 0.5, "sensitivity_ci": [0.25, 0.75]}}}
    bf16 = {"n": 10, "accuracy": 0.7, "accuracy_ci": [0.5, 0.9], "ece": 0.1, "ece_ci": [0.0, 0.2],
            "macro_auroc": None, "macro_auroc_ci": None,
            "per_class": {"orbital disease": {"support": 3, "sensitivity": 0.55, "sensitivity_ci": [0.3, 0.8]}}}
    rows = {r[0]: r[1:] for r in bf16_agreement.metric_differences(fp32, bf16)}
    assert set(rows) == {"accuracy", "ece", "per_class.orbital disease.sensitivity"}  # no CI, no row
    assert rows["accuracy"] == pytest.approx((0.8, 0.7, 0.1, 0.2))  # |diff| 0.1, half-width of fp32's CI
    assert rows["per_class.orbital disease.sensitivity"] == pytest.approx((0.5, 0.55, 0.05, 0.25))
