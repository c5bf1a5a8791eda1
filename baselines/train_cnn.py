"""Supervised image-classifier baselines (torchvision CNNs and ViT) for the comparison with CLIP.

    $ python -m baselines.train_cnn --arch resnet50 --weights imagenet --train-dir dataset_root/train ...

The command line and the machinery live in orbital_clip/cnn.py; `--help` lists every flag.
"""

import sys

try:
    from orbital_clip.cnn import main
except ModuleNotFoundError as error:  # run as a file path, from outside the clone's folder
    if error.name != "orbital_clip":
        raise
    sys.exit("error: run this baseline from the clone's folder as `python -m baselines.train_cnn ...` "
             "(or `pip install -e .` once)")

if __name__ == "__main__":
    sys.exit(main())

