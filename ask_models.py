"""Ask a multimodal chat model (any OpenAI-compatible endpoint) about every image of a cohort at
each step of a step file, collect the answers as answer files and score them step by step.

    $ python ask_models.py --test-dir demo_run/subtypes --metadata meta.csv --output-dir runs/ask --dry-run

The command line and the machinery live in orbital_clip/ask/; `--help` lists every flag; see
docs/second-step-runner.md.
"""

import sys

from orbital_clip.ask.cli import main

if __name__ == "__main__":
    sys.exit(main())
