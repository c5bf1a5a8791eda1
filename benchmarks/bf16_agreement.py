"""Does bf16 inference change the results? The same external demo cohort evaluated by inference.py
in fp32 and in bf16: the share of images with the same predicted class, the largest probability
difference, and every metric's difference against the half-width of its fp32 95% CI.

Models: the tiny demo model trained as demo/run_demo.sh trains it (in fp32, so both precisions
evaluate the same weights), and ViT-B-32-256 with random weights (the real architecture; its
predictions mean nothing clinically, but they show what bf16 does to a full-size tower).

    $ python benchmarks/bf16_agreement.py --out /tmp/bf16_agreement            # ~10 min, 2 cores
    $ python benchmarks/bf16_agreement.py --out /tmp/agree --checkpoint demo_run/clip_model_checkpoints/clip_model_epoch_best.pt --no-vit
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from orbital_clip.train import cli as train_cli
from orbital_clip import checkpoint as ckpt
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import split as data_preprocess
from orbital_clip import scoring as inference
from demo import make_demo_cohort

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "demo" / "tiny_clip.json"
DEMO_COUNTS, EXTERNAL_COUNTS = (40, 120, 80), (20, 60, 40)  # as demo/run_demo.sh


def metric_differences(fp32, bf16):
    """[(metric, fp32 value, bf16 value, |difference|, fp32 CI half-width)] of every metric of
    metrics.json that has a `<name>_ci`, overall and per class."""
    rows = []

    def walk(a, b, prefix):
        for key, value in a.items():
            if isinstance(value, dict):
                walk(value, b[key], f"{prefix}{key}.")
            elif f"{key}_ci" in a and isinstance(value, (int, float)) and a[f"{key}_ci"] is not None:
                low, high = a[f"{key}_ci"]
                if value is None or b[key] is None or not np.isfinite([value, b[key], low, high]).all():
                    continue
                rows.append((prefix + key, value, b[key], abs(value - b[key]), (high - low) / 2))

    walk(fp32, bf16, "")
    return rows


def compare_runs(fp32_dir, bf16_dir):
    """Agreement and metric differences of two inference.py output folders of the same cohort."""
    a, b = (pd.read_csv(Path(d) / "predictions.csv") for d in (fp32_dir, bf16_dir))
    assert list(a["path"]) == list(b["path"])
    probs = [c for c in a.columns if c.startswith("prob_")]
    rows = metric_differences(*(json.loads((Path(d) / "metrics.json").read_text()) for d in (fp32_dir, bf16_dir)))
    worst = max(rows, key=lambda r: r[3] / r[4] if r[4] > 0 else 0.0)
    return {"images": len(a), "prediction_agreement": float((a["pred_label"] == b["pred_label"]).mean()),
            "max_probability_difference": float(np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max()),
            "metrics_compared": len(rows),
            "max_difference_over_ci_half_width": max(r[3] / r[4] for r in rows if r[4] > 0),
            "worst_metric": {"name": worst[0], "fp32": worst[1], "bf16": worst[2], "ci_half_width": worst[4]},
            "metrics": {r[0]: {"fp32": r[1], "bf16": r[2], "abs_difference": r[3], "ci_half_width": r[4]}
                        for r in rows}}


def train_tiny(out):
    """Split the demo cohort and train the demo's tiny model (the demo's own commands, fp32)."""
    root = out / "dataset_root"
    make_demo_cohort.write_cohort(root, DEMO_COUNTS, 0)
    assert data_preprocess.main(["--data-root", str(root)]) == 0
    save = out / "tiny_checkpoints"
    assert train_cli.main(["--train-dir", str(root / "train"), "--val-dir", str(root / "val"),
                            "--save-dir", str(save), "--model-config", str(TINY_CONFIG), "--pretrained",
                            "none", "--batch-size", "32", "--epochs", "20", "--lr", "1e-3",
                            "--weight-decay", "0.1", "--select-metric", "balanced_accuracy",
                            "--precision", "fp32", "--no-progress", "--overwrite"]) == 0
    return save / "clip_model_epoch_best.pt"


def random_vit(out, name="ViT-B-32-256"):
    """A plain state_dict of `name` with seeded random weights (what inference.py --checkpoint reads)."""
    torch.manual_seed(0)
    model, *_ = models.create_model(name, None)
    path = out / f"{name}_random.pt"
    torch.save(ckpt.clean_state_dict(model.state_dict()), path)
    return path


def evaluate_both(checkpoint, external, out, extra):
    dirs = {}
    for precision in ("fp32", "bf16"):
        dirs[precision] = out / precision
        assert inference.main(["--test-dir", str(external), "--checkpoint", str(checkpoint), "--output-dir",
                               str(dirs[precision]), "--precision", precision, "--no-progress", "--no-figures",
                               "--overwrite", *extra]) == 0
    return compare_runs(dirs["fp32"], dirs["bf16"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (cohorts, checkpoints, evaluations)")
    parser.add_argument("--checkpoint", default=None, help="a trained tiny demo checkpoint (default: train one)")
    parser.add_argument("--vit", action=argparse.BooleanOptionalAction, default=True,
                        help="also ViT-B-32-256 with random weights (default on)")
    return parser.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    external = out / "external_cohort"
    make_demo_cohort.write_cohort(external, EXTERNAL_COUNTS, 1)
    checkpoint = Path(opts.checkpoint) if opts.checkpoint else train_tiny(out)
    logging.getLogger("inference").setLevel(logging.WARNING)
    results = {"tiny (demo, trained)": evaluate_both(checkpoint, external, out / "tiny", [])}
    if opts.vit:
        results["ViT-B-32-256 (random weights)"] = evaluate_both(
            random_vit(out), external, out / "vit", ["--model-name", "ViT-B-32-256"])
    lines = ["| model | images | same prediction | max prob. difference | metrics | max |diff| / CI half-width (worst metric) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        worst = r["worst_metric"]
        lines.append(f"| {name} | {r['images']} | {r['prediction_agreement']:.4f} | "
                     f"{r['max_probability_difference']:.4f} | {r['metrics_compared']} | "
                     f"{r['max_difference_over_ci_half_width']:.3f} ({worst['name']}: {worst['fp32']:.4f} vs "
                     f"{worst['bf16']:.4f}, half-width {worst['ci_half_width']:.4f}) |")
    print("\n".join(lines))
    outputs.atomic_write_json(out / "bf16_agreement.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
