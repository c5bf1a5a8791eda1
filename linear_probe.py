"""Linear probe on frozen image features: class-weighted logistic regression, C chosen on validation.

    $ python linear_probe.py --train-dir dataset_root/train --val-dir dataset_root/val \\
          --model-name ViT-B-32-256 --pretrained datacomp_s34b_b86k --out-dir probe_runs/vit
    $ python inference.py --test-dir external_cohort --checkpoint probe_runs/vit/linear_probe.pt

The command line and the machinery live in orbital_clip/probe.py; `--help` lists every flag.
"""

import sys

from orbital_clip.probe import main

if __name__ == "__main__":
    sys.exit(main())
