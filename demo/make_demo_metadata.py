"""Write a SYNTHETIC per-image metadata file (site, sex, age) for a demo cohort, so that
inference.py --subgroups can be tried: two sites, each image drawn at random (seeded).

    $ python demo/make_demo_metadata.py --cohort demo_run/external_cohort --out demo_run/external_metadata.csv
"""

import argparse
import csv
import random
import sys
from pathlib import Path

SITES = ("site A", "site B")
SUFFIXES = {".jpg", ".jpeg", ".png"}


def metadata_rows(cohort, seed):
    """One row per image under `cohort`: path (relative, forward slashes, as in predictions.csv),
    site, sex, age in years; sorted by path, the same rows for the same seed."""
    rng = random.Random(seed)
    paths = sorted(p for p in Path(cohort).rglob("*") if p.suffix.lower() in SUFFIXES)
    return [{"path": p.relative_to(cohort).as_posix(), "site": rng.choice(SITES),
             "sex": rng.choice(("F", "M")), "age": rng.randint(18, 90)} for p in paths]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", required=True, help="class-folder cohort (demo/make_demo_cohort.py)")
    parser.add_argument("--out", required=True, help="CSV to write (path, site, sex, age)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    rows = metadata_rows(Path(args.cohort), args.seed)
    if not rows:
        print(f"error: --cohort {args.cohort}: no images found", file=sys.stderr)
        return 2
    with open(args.out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "site", "sex", "age"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
