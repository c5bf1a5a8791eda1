"""Fine-tune an OpenCLIP model on a folder-per-class cohort with clinical prompts.

    $ python clip_train.py --train-dir dataset_root/train --val-dir dataset_root/val --save-dir runs/clip

The command line and the machinery live in orbital_clip/train/ (main in cli.py); `--help` lists every flag.
"""

import sys

from orbital_clip.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
