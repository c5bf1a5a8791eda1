"""Score answer files (a chat model's or a clinician's diagnoses) on a cohort, without a model:
the statistics of inference.py, and with --compare the later steps of the same reader.

    $ python score_answers.py --test-dir subtypes --predictions image=step1.csv \\
          --compare image+symptoms=step2.csv --label-map label_map.json
"""

import sys

from orbital_clip.answers import main

if __name__ == "__main__":
    sys.exit(main())
