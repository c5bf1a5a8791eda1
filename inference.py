"""Evaluate a checkpoint (or a zero-shot model) on an external cohort, with 95% CIs.

    $ python inference.py --test-dir external_cohort --checkpoint runs/clip/clip_model_epoch_best.pt

The command line and the machinery live in orbital_clip/scoring.py; `--help` lists every flag.
"""

import sys

from orbital_clip.scoring import main

if __name__ == "__main__":
    sys.exit(main())
