"""What the examples share: the model (the packaged default unless PREFTUNE_EXAMPLE_MODEL names
another, as the tests do with a tiny one), where runs go, and a few made-up preference pairs."""

import os
from pathlib import Path

MODEL = os.environ.get("PREFTUNE_EXAMPLE_MODEL", "smollm2-135m-instruct")
OUT = Path(os.environ.get("PREFTUNE_EXAMPLE_OUT", "runs/examples"))
STEPS = int(os.environ.get("PREFTUNE_EXAMPLE_STEPS", "8"))

# our own toy pairs: a polite, helpful reply preferred over a curt one
PAIRS = [
    {"prompt": "How do I boil an egg?", "chosen": " Put it in boiling water for about nine minutes, then cool it.",
     "rejected": " Figure it out."},
    {"prompt": "What is the capital of France?", "chosen": " Paris is the capital of France.",
     "rejected": " Why would I know."},
    {"prompt": "Can you recommend a book?", "chosen": " Try 'The Hobbit'; it is a warm, easy adventure.",
     "rejected": " No."},
    {"prompt": "How can I sleep better?", "chosen": " Keep a regular bedtime and dim the lights an hour before.",
     "rejected": " Just sleep."},
] * 4
