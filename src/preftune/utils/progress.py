"""Progress for long loops that are not the training loop (evaluation, reference log-probs,
sampling): a live tqdm bar on a terminal; in logs (CI, pipes) one plain stderr line at most every
`interval` seconds and a last one at the end, so a long evaluation is never silent and a short
one prints nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(items: Iterable, *, total: int, desc: str, unit: str = "items", weights: Iterable[int] | None = None,
             interval: float = 10.0) -> Iterator:
    """Yield `items`, counting progress in `weights` (items per element, e.g. pairs per batch; 1
    each by default) out of `total`."""
    weights = list(weights) if weights is not None else None
    if sys.stderr.isatty():
        with tqdm(total=total, desc=desc, unit=f" {unit}", leave=False) as bar:
            for k, item in enumerate(items):
                yield item
                bar.update(weights[k] if weights else 1)
        return
    done, start = 0, time.perf_counter()
    last = start
    said = False
    for k, item in enumerate(items):
        yield item
        done += weights[k] if weights else 1
        now = time.perf_counter()
        if now - last >= interval or (said and done >= total):
            print(f"{desc}: {done}/{total} {unit} ({done / max(now - start, 1e-9):.1f}/s)", file=sys.stderr,
                  flush=True)
            last, said = now, True
