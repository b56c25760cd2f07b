"""A verifiable-reward task that runs offline: short integer arithmetic with exact answers.

`arithmetic_problems` generates prompts such as "What is 23 + 48? Reply with the number only."
(as one user message, so chat models see their own template) with their answers; the train and held-out splits are disjoint by construction (a problem's
split is a pure function of its operands and operator, so no problem is ever in both, whatever
the counts and seeds). `arithmetic_reward` is the verifier: it recomputes the answer from the
prompt text itself and gives 1.0 when the last integer in the completion equals it (the final
answer, as GSM8K-style graders read it: "9 + 3 = 12" and "The answer is 12." both answer 12), else 0.0;
a prompt that is not one of these problems scores NaN (the reward cannot verify it), which the
sources count as a failed score.
"""

from __future__ import annotations

import math
import random
import re

__all__ = ["arithmetic_problems", "arithmetic_reward", "arithmetic_answer", "TEMPLATE"]

TEMPLATE = "What is {a} {op} {b}? Reply with the number only."
_PROBLEM = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?")
_INTEGER = re.compile(r"-?\d[\d,]*")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _heldout(a: int, op: str, b: int) -> bool:
    """One problem in five is held out, chosen by its content alone."""
    return (a * 31 + b * 17 + "+-*".index(op)) % 5 == 0


def arithmetic_problems(n: int, *, split: str, seed: int = 0, ops: str = "+-", low: int = 2,
                        high: int = 30) -> list[dict]:
    """`n` distinct problems of the `split` ("train" or "heldout"), operands in [low, high]
    (subtraction never goes below zero), as {"prompt": [one user message], "answer"} rows in a
    seeded order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    pool = [(a, op, b) for op in ops for a in range(low, high + 1) for b in range(low, high + 1)
            if (op != "-" or a >= b) and _heldout(a, op, b) == (split == "heldout")]
    if n > len(pool):
        raise ValueError(f"only {len(pool)} distinct {split} problems with ops {ops!r} in [{low}, {high}]")
    chosen = random.Random(f"arithmetic/{split}/{seed}").sample(pool, n)
    return [{"prompt": [{"role": "user", "content": TEMPLATE.format(a=a, op=op, b=b)}], "answer": str(_OPS[op](a, b))}
            for a, op, b in chosen]


def arithmetic_answer(prompt: str) -> int | None:
    """The exact answer of the problem in `prompt`, or None when it holds none."""
    m = _PROBLEM.search(prompt)
    return _OPS[m.group(2)](int(m.group(1)), int(m.group(3))) if m else None


def arithmetic_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion's last integer is the problem's answer, 0.0 when it is another
    number or none, NaN when the prompt is not a problem this verifier knows."""
    out = []
    for prompt, completion in zip(prompts, completions):
        answer = arithmetic_answer(prompt)
        if answer is None:
            out.append(math.nan)
            continue
        found = _INTEGER.findall(completion)
        out.append(float(bool(found) and found[-1].rstrip(",").replace(",", "") == str(answer)))
    return out
