"""Draw a small SYNTHETIC cohort of three orbital-disease subtypes and write the shipped answer
files of a made-up multimodal language model read at three steps (the paper's second step).

Not clinical data and not a real model's answers: the images are cartoon eyes (drawn by
make_demo_cohort.py) and the answers are drawn at random, better at each step as information is
added, phrased with synonyms, odd case and a few refusals, so that scoring them exercises the
label map and the handling of unmapped answers. Two images (left and right eye) per patient.

    $ python demo/make_subtype_demo.py --out demo_run/subtypes
    $ python demo/make_subtype_demo.py --out demo_run/subtypes --answers-dir demo/subtypes
    $ python demo/make_subtype_demo.py --out demo_run/subtypes --metadata demo_run/subtypes_metadata.csv

The second line also rewrites the shipped files demo/subtypes/step{1,2,3}.csv and label_map.json
(the same seed gives the same bytes). The third also writes a metadata file of made-up age, sex,
race and symptoms per patient (both eyes alike; race left blank for some, as clinics often do),
the columns the paper's step prompts name (ask_models.py --metadata).
"""

import argparse
import csv
import json
import random
import sys
from pathlib import Path

from make_demo_cohort import draw_eye

SUBTYPES = ("thyroid eye disease", "orbital inflammation", "orbital tumour")
PATIENTS_PER_SUBTYPE = 6  # two eyes each: 12 images per subtype, 36 in all
STEPS = ("step1", "step2", "step3")  # image; + age, sex, race; + symptoms
P_CORRECT = {"thyroid eye disease": (0.55, 0.7, 0.9),  # per step; symptoms help most
             "orbital inflammation": (0.35, 0.4, 0.75),
             "orbital tumour": (0.45, 0.6, 0.65)}
P_REFUSE = 0.06  # answers that name no subtype, at each step
LABEL_MAP = {"thyroid eye disease": ["TED", "Graves orbitopathy", "thyroid-associated orbitopathy",
                                     "thyroid orbitopathy"],
             "orbital inflammation": ["idiopathic orbital inflammation", "orbital pseudotumour",
                                      "nonspecific orbital inflammation", "orbital myositis"],
             "orbital tumour": ["orbital neoplasm", "orbital tumor", "orbital mass"]}
REFUSALS = ("I cannot determine the diagnosis from this information.",
            "Unable to say; please consult an ophthalmologist.", "")
SEED = 24  # a draw with one or two unmapped answers per step
METADATA_SEED = 7  # its own stream: the images and answers are the same with or without --metadata
# Made-up presentations, typical of each subtype in textbooks; not patient data.
SYMPTOMS = {"thyroid eye disease": ("bilateral proptosis and eyelid retraction", "gritty eyes and double vision",
                                    "staring appearance, worse in the morning"),
            "orbital inflammation": ("painful swelling of one eyelid", "pain on eye movement and redness",
                                     "sudden periorbital pain and swelling"),
            "orbital tumour": ("slowly progressive painless proptosis", "painless displacement of one eye",
                               "blurred vision and a fullness behind the eye")}
RACES = ("White", "Black", "Asian", "Hispanic", "")


def cohort_paths(subtype):
    """The image paths of one subtype, relative to the cohort folder; patients are numbered
    across subtypes (P00-P05 TED, P06-P11 inflammation, ...), so `_(P\\d+)_` names a patient."""
    slug, first = subtype.replace(" ", "_"), SUBTYPES.index(subtype) * PATIENTS_PER_SUBTYPE
    return [f"{subtype}/{slug}_P{p:02d}_{eye}.jpg" for p in range(first, first + PATIENTS_PER_SUBTYPE)
            for eye in ("left", "right")]


def phrase(subtype, rng):
    """One way a chat model might name a subtype: its name or a synonym, in some case."""
    text = rng.choice((subtype, *LABEL_MAP[subtype]))
    return rng.choice((text, text.capitalize(), text.upper() if len(text) < 6 else text.title()))


def draw_answers(rng):
    """{step: [(path, answer)]} in cohort order: an image answered right at a step stays likely
    right later (one latent ease per image), as when a reader keeps a first impression."""
    answers = {step: [] for step in STEPS}
    for subtype in SUBTYPES:
        for path in cohort_paths(subtype):
            ease = rng.random()
            for step, p_correct in zip(STEPS, P_CORRECT[subtype]):
                if rng.random() < P_REFUSE:
                    answer = rng.choice(REFUSALS)
                elif ease < p_correct:
                    answer = phrase(subtype, rng)
                else:
                    answer = phrase(rng.choice([s for s in SUBTYPES if s != subtype]), rng)
                answers[step].append((path, answer))
    return answers


def write_answers(answers_dir, seed=SEED):
    """step1.csv, step2.csv, step3.csv (path, answer) and label_map.json."""
    answers_dir = Path(answers_dir)
    answers_dir.mkdir(parents=True, exist_ok=True)
    for step, rows in draw_answers(random.Random(seed)).items():
        with open(answers_dir / f"{step}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "answer"])
            writer.writerows(rows)
    (answers_dir / "label_map.json").write_text(json.dumps(LABEL_MAP, indent=2) + "\n", encoding="utf-8")


def write_images(out_dir, seed=SEED):
    """The cohort's images (orbital-disease cartoons); returns how many were written."""
    rng = random.Random(seed)
    count = 0
    for subtype in SUBTYPES:
        for path in cohort_paths(subtype):
            target = Path(out_dir) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_eye(0, rng).save(target, quality=85)
            count += 1
    return count


def write_metadata(path, seed=METADATA_SEED):
    """path, age, sex, race, symptoms for every image; one draw per patient (both eyes alike)."""
    rng = random.Random(seed)
    rows = []
    for subtype in SUBTYPES:
        paths = cohort_paths(subtype)
        for left, right in zip(paths[::2], paths[1::2]):
            patient = [rng.randint(18, 85), rng.choice(("female", "male")), rng.choice(RACES),
                       rng.choice(SYMPTOMS[subtype])]
            rows += [[left, *patient], [right, *patient]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "age", "sex", "race", "symptoms"])
        writer.writerows(rows)
    return len(rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="cohort folder to create; one sub-folder per subtype")
    parser.add_argument("--answers-dir", default=None,
                        help="also write the answer files and label map here (demo/subtypes holds "
                             "the shipped ones)")
    parser.add_argument("--metadata", default=None,
                        help="also write a metadata CSV here (age, sex, race, symptoms per image)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"--out {args.out}: folder exists and is not empty")
    return args


def main(argv=None):
    args = parse_args(argv)
    count = write_images(args.out)
    print(f"wrote {count} synthetic images of {len(SUBTYPES)} subtypes to {args.out}")
    if args.answers_dir:
        write_answers(args.answers_dir)
        print(f"wrote {', '.join(f'{s}.csv' for s in STEPS)} and label_map.json to {args.answers_dir}")
    if args.metadata:
        print(f"wrote age, sex, race and symptoms of {write_metadata(args.metadata)} images to {args.metadata}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
