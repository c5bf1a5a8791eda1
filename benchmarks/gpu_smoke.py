"""GPU smoke test of clip_train.py's option combinations that only a GPU exercises: bf16
autocast, --compile, --accum-steps, and torchrun (NCCL) over every GPU present. Each case is a
real clip_train.py run (a fresh process) on a synthetic cohort with random weights; one Markdown
table of exit status, seconds, training loss, samples/s and validation accuracy is printed.

    $ python benchmarks/gpu_smoke.py                          # all cases, ViT-B-32-256, random init
    $ python benchmarks/gpu_smoke.py --cases bf16 compile --json smoke.json
    $ python benchmarks/gpu_smoke.py --model-config demo/tiny_clip.json --images 60 --epochs 1

Without a CUDA GPU it says so and exits 0 (nothing to check). Expected on one H100/H200 with the
defaults: every case exits 0; bf16 and fp32 training losses within ~2% of each other after one
epoch; 'accum' equals 'bf16' up to bf16 noise; 'torchrun' with N GPUs the same loss curve.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name -> (extra clip_train.py flags, run under torchrun over every GPU?)
    "fp32": (["--precision", "fp32"], False),
    "bf16": (["--precision", "bf16"], False),
    "compile": (["--precision", "bf16", "--compile"], False),
    "accum": (["--precision", "bf16", "--accum-steps", "4"], False),
    "bf16+accum+ckpt": (["--precision", "bf16", "--accum-steps", "2", "--grad-checkpointing",
                         "--recipe", "recommended", "--wise-ft-alphas", "0,0.5,1"], False),
    "torchrun": (["--precision", "bf16", "--accum-steps", "2"], True),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES),
                        help="which cases to run (default: all)")
    parser.add_argument("--model-name", default="ViT-B-32-256", help="open_clip architecture (random init)")
    parser.add_argument("--model-config", default=None, help="a custom architecture JSON instead")
    parser.add_argument("--images", type=int, default=400, help="synthetic training images (>= 8)")
    parser.add_argument("--batch-size", type=int, default=200, help="global batch (published 200)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per case (>= 1)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds allowed per case")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.images < 8 or args.epochs < 1 or args.batch_size < 2:
        parser.error("--images must be >= 8, --epochs >= 1 and --batch-size >= 2")
    return args


def case_command(name, args, cohort, save_dir, n_gpus):
    """The command line of one case (torchrun with one process per GPU where the case asks)."""
    flags, distributed = CASES[name]
    script = [str(REPO_ROOT / "clip_train.py"), "--train-dir", str(cohort / "train"),
              "--val-dir", str(cohort / "val"), "--save-dir", str(save_dir), "--pretrained", "none",
              "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", "1e-5",
              "--no-progress", *flags]
    script += ["--model-config", args.model_config] if args.model_config else ["--model-name", args.model_name]
    if distributed:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={n_gpus}", *script]
    return [sys.executable, *script]


def run_case(name, args, cohort, work, n_gpus):
    """One row of the table: exit status, seconds and the last epoch's numbers."""
    save_dir = work / name
    start = time.perf_counter()
    try:
        result = subprocess.run(case_command(name, args, cohort, save_dir, n_gpus), capture_output=True,
                                text=True, timeout=args.timeout, cwd=work)
        code, tail = result.returncode, result.stderr.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", [f"over {args.timeout:g} s"]
    row = {"case": name, "processes": n_gpus if CASES[name][1] else 1, "exit": code,
           "seconds": round(time.perf_counter() - start, 1), "train_loss": None,
           "samples_per_s": None, "val_accuracy": None, "note": "" if code == 0 else tail[0][:120]}
    metrics = save_dir / "metrics.csv"
    if code == 0 and metrics.is_file():
        import pandas as pd
        last = pd.read_csv(metrics).iloc[-1]
        row.update(train_loss=round(float(last["train_loss"]), 4),
                   samples_per_s=round(float(last["samples_per_s"]), 1),
                   val_accuracy=round(float(last["accuracy"]), 4))
    return row


def markdown_table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if row[k] is None else str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("skipped: benchmarks/gpu_smoke.py needs a CUDA GPU (none here); nothing was run")
        return 0
    from demo import make_demo_cohort
    n_gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        work = Path(tmp)
        n_val = max(6, args.images // 4)
        make_demo_cohort.write_cohort(work / "cohort" / "train", split_counts(args.images), seed=0)
        make_demo_cohort.write_cohort(work / "cohort" / "val", split_counts(n_val), seed=1)
        rows = [run_case(name, args, work / "cohort", work, n_gpus) for name in args.cases]
    print(f"GPUs: {n_gpus} x {torch.cuda.get_device_name(0)}; {args.images} images, batch "
          f"{args.batch_size}, {args.epochs} epoch(s)\n")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0 if all(row["exit"] == 0 for row in rows) else 1


def split_counts(n_images):
    """Imbalanced per-class counts (about 1 : 2 : 1.5) summing to n_images."""
    rare, healthy = max(2, n_images * 2 // 9), max(2, n_images * 4 // 9)
    return (rare, healthy, max(2, n_images - rare - healthy))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    sys.exit(main())
