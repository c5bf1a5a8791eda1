"""Time inference's evaluation after the embeddings (metrics, bootstrap, tables, figures as PNG
and PDF, report.md) on a synthetic cohort: the wall-clock check that tests must not make.

    $ python benchmarks/evaluation_speed.py                     # 5,000 images, 2,000 resamples
    $ python benchmarks/evaluation_speed.py --images 20000 --max-seconds 30
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from orbital_clip import evaluation
from orbital_clip import model_loading
from orbital_clip import scoring as inference
from orbital_clip import prompts

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]


def synthetic_evaluation(n, root, seed=0):
    """(setup, bundle, args, scores) of n synthetic images (5% rare) under `root`: everything
    `inference.write_evaluation` needs, without a model or image files."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice(3, n, p=[0.05, 0.6, 0.35])
    logits = 2 * rng.normal(size=(n, 3)) + 3 * np.eye(3)[y_true]
    cohort = evaluation.Cohort([(Path(root) / FOLDERS[c] / f"img_{i:05d}.jpg", int(c))
                               for i, c in enumerate(y_true)], True, Path(root))
    bundle = inference.ModelBundle(
        checkpoint=model_loading.Checkpoint("ours", "synthetic.pt", {"state_dict": {}}, "0" * 64), model_name="tiny_clip",
        model=None, preprocess=None, tokenizer=None, classes=prompts.load_prompt_set(None),
        folders=FOLDERS, prompt_source="published", logit_scale_mode="exp",
        operating={"class": FOLDERS[0], "rare_index": 0, "threshold": 0.2, "source": "validation"},
        temperature=1.5, temperature_source="validation", weights_id="0" * 64, cache_key="")
    setup = inference.Setup(cohort, bundle, baseline=None, wise=None, anonymize=None)
    args = inference.parse_args(["--test-dir", str(root), "--checkpoint", "x.pt"])
    args.device, args.precision = torch.device("cpu"), "fp32"
    return setup, bundle, args, inference.Scores(logits, ["ok"] * n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="synthetic images (default 5000)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples (default 2000)")
    parser.add_argument("--max-seconds", type=float, default=10.0,
                        help="exit 1 when slower (default 10 s: about 6 s on 2 CPU cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import matplotlib.pyplot  # noqa: F401 - the import is a one-off, not evaluation
    with tempfile.TemporaryDirectory() as root:
        setup, bundle, run_args, scores = synthetic_evaluation(args.images, root)
        run_args.bootstrap = args.bootstrap
        start = time.perf_counter()
        inference.write_evaluation(Path(root) / "out", run_args, setup, bundle, scores)
        seconds = time.perf_counter() - start
    print(f"full evaluation of {args.images} images, {args.bootstrap} resamples: {seconds:.1f} s "
          f"(limit {args.max_seconds:g} s)")
    return 0 if seconds <= args.max_seconds else 1


if __name__ == "__main__":
    sys.exit(main())
