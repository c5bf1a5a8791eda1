"""One prepared GPU check (<= 5 minutes): ViT-B-32-256 at the published batch of 200 in bf16,
random weights. Training samples/s on preloaded tensors and end to end from camera JPEGs (full
decode, draft decode, pre-resized), inference images/s, peak GPU memory, compute efficiency.

    $ python benchmarks/gpu.py                       # prints a Markdown table
    $ python benchmarks/gpu.py --json gpu.json       # and writes the numbers

Targets on an H100: model-only training >= 5,000 samples/s, end to end >= 0.9 of it with
pre-resized images, batch 200 in bf16 within 16 GiB.
"""

import sys

import torch

from benchmarks import run as harness

GPU_DEFAULTS = ["--device", "cuda", "--precision", "bf16", "--batch-size", "200",
                "--infer-batch-size", "500", "--images", "48", "--repeats", "8",
                "--caption-batch", "200", "--workers", "12"]


def main(argv=None):
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA GPU; use benchmarks/run.py --quick on a CPU",
              file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    return harness.main(GPU_DEFAULTS + argv)  # later flags override the defaults


if __name__ == "__main__":
    sys.exit(main())
