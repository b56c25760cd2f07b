"""bf16 autocast on this CPU: log-prob error against fp32 and the speed of one training step.

    .venv/bin/python -m benchmarks.speed_vs_trl.bf16_check

Same HH pairs as `python -m benchmarks.speed_vs_trl` (the first 32 that fit 256 tokens), default model + LoRA r16 q/v,
packed rows with prefix sharing. Error: |logp_bf16 - logp_fp32| per sequence and per token.
Speed: median of 5 timed forward+backward passes over 4 pairs (policy) plus the no-grad
reference pass, each mode, after one warm-up.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from .__main__ import _model, _select_pairs  # the speed benchmark's pairs and model


def main():
    argparse.ArgumentParser(prog="python -m benchmarks.speed_vs_trl.bf16_check",
                            description=__doc__.split("\n")[0]).parse_args()  # no options; --help says what it does
    import torch

    from preftune.core.logprobs import autocast, completion_logps, fp32_lm_head
    from preftune.data import load_records
    from preftune.data.collate import collate_packed_pairs
    from preftune.data.tokenize import tokenize_records

    rows, _ = _select_pairs(32, 256)
    model, tokenizer, _ = _model()
    fp32_lm_head(model)
    path = Path("/tmp/bf16_pairs.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = tokenize_records(load_records(str(path)), tokenizer, max_length=256, max_prompt_length=255)
    errs, per_tok = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), 4):
            batch = collate_packed_pairs(pairs[i: i + 4])
            exact, counts = completion_logps(model, batch)
            with autocast("cpu", True):
                approx, _ = completion_logps(model, batch)
            errs += (approx - exact).abs().tolist()
            per_tok += ((approx - exact).abs() / counts).tolist()
    model.train()
    times = {}
    batch = collate_packed_pairs(pairs[:4])
    for mode in (False, True, False, True):
        runs = []
        for _ in range(6):
            start = time.perf_counter()
            with autocast("cpu", mode):
                logps, _ = completion_logps(model, batch)
                with torch.no_grad(), model.disable_adapter():
                    completion_logps(model, batch)
            logps.sum().backward()
            runs.append(time.perf_counter() - start)
        times.setdefault("bf16" if mode else "fp32", []).extend(runs[1:])
    out = {"pairs": len(pairs), "seq_abs_err_mean": statistics.mean(errs), "seq_abs_err_max": max(errs),
           "token_abs_err_mean": statistics.mean(per_tok), "token_abs_err_max": max(per_tok),
           "step_s_fp32": statistics.median(times["fp32"]), "step_s_bf16": statistics.median(times["bf16"])}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
