"""Time and peak memory of the LM head's log-probs, dense against chunked (core/lmhead.py), at
SmolLM2-135M's head: its tied embedding (49152 x 576, read from the cached model directory) over
one batch of completion tokens, forward + backward with gradients to the hidden states and to the
head weight (full fine-tuning; under LoRA the weight's gradient is skipped). Only the head: the
transformer body is the same under both routes. Each setting runs in its own process, so its peak
is its own: ru_maxrss minus the RSS before the first step.

    python -m benchmarks.logprob_chunk --tokens 1024 --chunks 0 64 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _weights() -> Path:
    found = sorted((Path.home() / ".cache" / "preftune" / "models").glob("SmolLM2-135M-Instruct*/model.safetensors"))
    if not found:
        raise SystemExit("no cached SmolLM2-135M-Instruct directory: run `preftune train` once to build it")
    return found[0]


def one(chunk: int, tokens: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from preftune.core.lmhead import chunked_token_logps

    torch.manual_seed(0)
    with safe_open(str(_weights()), "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight").float().requires_grad_()    # (V, H)
    hidden = torch.randn(1, tokens, weight.size(1), requires_grad=True)              # (1, M, H)
    targets = torch.randint(0, weight.size(0), (1, tokens))
    mask = torch.ones(1, tokens, dtype=torch.bool)
    rss0 = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if chunk:
            token, _, _ = chunked_token_logps(hidden[mask], weight, None, targets[mask], chunk=chunk)
        else:  # the dense route as logprobs._kept_token_logps runs it
            logits = F.linear(hidden, weight)[mask].float()
            token = -F.cross_entropy(logits, targets[mask], reduction="none")
        token.sum().backward()
        times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
        del token
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"chunk": chunk, "tokens": tokens, "seconds": times, "median_s": statistics.median(times),
            "peak_extra_mb": round(peak / 2**20, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="completion tokens in the batch")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 256, 512, 1024], help="0 = dense")
    ap.add_argument("--repeats", type=int, default=3, help="forward+backward steps per setting (median)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one setting
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.tokens, args.repeats)))
        return
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, "-m", "benchmarks.logprob_chunk", "--one", str(chunk), "--tokens",
                              str(args.tokens), "--repeats", str(args.repeats)], capture_output=True, text=True,
                             check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
