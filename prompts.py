"""The classes and clinical prompt sets that clip_train.py and inference.py share.

Folder names are the labels; index 0 is the rare, clinically critical class (`orbital disease`).
The published sets (training prompts v4, one evaluation prompt per class) are
`orbital_clip.prompts.PAPER_PROMPT_SET`. To use your own classes or prompts, write a JSON file
of the same schema and pass it with `--prompts`; this script prints the published set as a
starting point:

    $ python prompts.py > my_prompts.json
    $ python clip_train.py ... --prompts my_prompts.json
"""

import json
import sys

from orbital_clip.prompts import (PAPER_PROMPT_SET, ClassPrompts, PromptSetError, class_folders,  # noqa: F401
                                  load_prompt_set, parse_prompt_set, prompt_set_to_dict)


def main(argv=None):
    """Print the published prompt set as JSON (the schema `--prompts` reads)."""
    print(json.dumps(PAPER_PROMPT_SET, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
