"""Draw a small SYNTHETIC three-class cohort of cartoon "external eye photographs".

Not clinical data: each image is a drawn eye on a skin-toned background. The classes differ in
ways a tiny model can learn in minutes on a CPU, loosely echoing what clinicians look for:
  orbital disease      swollen, reddish-purple lids and a protruding eye (more sclera shown)
  healthy eyes         a normal almond eye, white sclera
  non-orbital disease  a red conjunctiva and a clouded cornea, lids normal

    $ python demo/make_demo_cohort.py --out demo_run/dataset_root --seed 0
    $ python demo/make_demo_cohort.py --out demo_run/external --seed 1 --counts 12 30 20
"""

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASS_FOLDERS = ("orbital disease", "healthy eyes", "non-orbital disease")
DEFAULT_COUNTS = (24, 72, 48)  # imbalanced on purpose: the rare class is index 0
IMAGE_SIZE_PX = (160, 120)


def draw_eye(class_index, rng, size_px=IMAGE_SIZE_PX):
    """One synthetic eye photograph (PIL RGB) of the given class."""
    width, height = size_px
    skin = tuple(int(rng.uniform(lo, hi)) for lo, hi in ((150, 235), (105, 190), (80, 160)))
    image = Image.new("RGB", size_px, skin)
    draw = ImageDraw.Draw(image)
    cx = width / 2 + rng.uniform(-12, 12)
    cy = height / 2 + rng.uniform(-8, 8)
    eye_w = rng.uniform(46, 60)
    eye_h = rng.uniform(16, 22)
    if class_index == 0:  # orbital: swollen violaceous lids, proptosis
        swell = rng.uniform(1.5, 1.9)
        lid = (int(rng.uniform(150, 200)), int(rng.uniform(60, 95)), int(rng.uniform(110, 150)))
        draw.ellipse([cx - eye_w * 1.2, cy - eye_h * swell * 1.6, cx + eye_w * 1.2,
                      cy + eye_h * swell * 1.6], fill=lid)
        eye_h *= rng.uniform(1.35, 1.6)
    sclera = (245, 245, 240)
    if class_index == 2:  # non-orbital: injected conjunctiva
        sclera = (int(rng.uniform(215, 240)), int(rng.uniform(90, 130)), int(rng.uniform(90, 120)))
    draw.ellipse([cx - eye_w, cy - eye_h, cx + eye_w, cy + eye_h], fill=sclera, outline=(60, 40, 30))
    iris_r = eye_h * rng.uniform(0.8, 0.95) if class_index != 0 else eye_h * 0.6
    iris = tuple(int(rng.uniform(lo, hi)) for lo, hi in ((40, 120), (30, 100), (20, 90)))
    ix = cx + rng.uniform(-6, 6)
    draw.ellipse([ix - iris_r, cy - iris_r, ix + iris_r, cy + iris_r], fill=iris)
    pupil = (200, 200, 205) if class_index == 2 else (10, 10, 10)  # clouded cornea
    pupil_r = iris_r * rng.uniform(0.35, 0.5)
    draw.ellipse([ix - pupil_r, cy - pupil_r, ix + pupil_r, cy + pupil_r], fill=pupil)
    brow_y = cy - eye_h - rng.uniform(14, 22)
    draw.line([cx - eye_w, brow_y, cx + eye_w, brow_y - rng.uniform(-4, 4)], fill=(70, 50, 35), width=4)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image.rotate(rng.uniform(-8, 8), fillcolor=skin)


def write_cohort(out_dir, counts=DEFAULT_COUNTS, seed=0, quality=90):
    """Write out_dir/<class>/<class-slug>_NNN.jpg; returns the number of images written."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    written = 0
    for class_index, (folder, count) in enumerate(zip(CLASS_FOLDERS, counts)):
        class_dir = out_dir / folder
        class_dir.mkdir(parents=True, exist_ok=True)
        slug = folder.replace(" ", "_").replace("-", "_")
        for i in range(count):
            draw_eye(class_index, rng).save(class_dir / f"{slug}_{seed}_{i:03d}.jpg", quality=quality)
            written += 1
    return written


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create; one sub-folder per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed (different seeds, different patients)")
    parser.add_argument("--counts", type=int, nargs=3, default=list(DEFAULT_COUNTS),
                        metavar=("ORBITAL", "HEALTHY", "NON_ORBITAL"), help="images per class")
    args = parser.parse_args(argv)
    if any(c < 0 for c in args.counts):
        parser.error("--counts must be non-negative")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"--out {args.out}: folder exists and is not empty")
    return args


def main(argv=None):
    args = parse_args(argv)
    count = write_cohort(args.out, args.counts, args.seed)
    print(f"wrote {count} synthetic images to {args.out} (per class: "
          + ", ".join(f"{f}={c}" for f, c in zip(CLASS_FOLDERS, args.counts)) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
