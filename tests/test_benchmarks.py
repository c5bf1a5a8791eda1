"""The benchmark harness runs end to end (tiny model, tiny sizes) and reports every key."""

import json
import sys

from conftest import REPO_ROOT, TINY_CONFIG

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import run as harness  # noqa: E402

KEYS = ("train_e2e_over_model", "infer_e2e_over_model", "text_dedup_speedup",
        "decode_full_images_per_s", "decode_draft_images_per_s", "decode_pre_resized_images_per_s",
        "train_model_samples_per_s", "train_compute_efficiency", "matmul_peak_flops", "peak_memory_bytes")


def test_harness_reports_all_measures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert harness.main(["--model-config", str(TINY_CONFIG), "--batch-size", "2", "--infer-batch-size", "2",
                         "--images", "2", "--repeats", "5", "--caption-batch", "24", "--workers", "0",
                         "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in KEYS:
        assert results[key] > 0, key
    assert 3 <= results["text_unique_captions"] <= 13 and results["text_captions"] == 24  # 13 prompts in all
    # Draft decoding of a 3000x2000 JPEG to >= 64 px is several times faster than a full decode.
    assert results["decode_draft_images_per_s"] > 2 * results["decode_full_images_per_s"]
    assert "| train_e2e_over_model |" in capsys.readouterr().out


def test_resized_copies_keep_the_short_side(tmp_path):
    paths = harness.make_camera_jpegs(tmp_path / "cam", 1, size_px=(600, 400))
    resized = harness.make_resized_copies(paths, tmp_path / "small", 64)
    from PIL import Image
    with Image.open(resized[0]) as image:
        assert image.size == (96, 64)


def test_gpu_smoke_parses_its_arguments_and_skips_cleanly_without_a_gpu(tmp_path, capsys):
    import gpu_smoke
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
