"""Split a folder-per-class cohort into train/val (and test), stratified by class and patient.

    $ python data_preprocess.py --data-root dataset_root

The command line lives in orbital_clip/split/cli.py, the machinery beside it; `--help` lists
every flag.
"""

import sys

from orbital_clip.split.cli import main

if __name__ == "__main__":
    sys.exit(main())
