"""How far QLoRA's 4-bit base moves the default model's log-probs, and what it saves.

    .venv/bin/python -m benchmarks.qlora [--pairs 32] [--max-length 256]

On the first N pairs of the shared HH-RLHF harmless dev split (absent: says so and stops),
tokenized as `preftune train` does (max_length 256, prompt 128), the default model
SmolLM2-135M-Instruct is scored three ways: fp32 (the reference point), and loaded with
`model.load_in_4bit=true` in NF4 and FP4 (bitsandbytes, double-quantized scales, fp32 matmuls),
exactly as `preftune train` loads it. Per format: per-token |Δ log p| (mean, p99, max), per
completion |Δ sum log p| (mean, max) and relative to the fp32 sum, the fraction of pairs whose
log-prob preference (chosen > rejected) keeps its sign, the Pearson correlation of the
per-pair margins, and the model's weight bytes (transformers' get_memory_footprint).
Writes results.json beside this file. The tolerance README and tests quote comes from here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HH_DEV = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "dev.jsonl.gz"


def _token_logps(model, batch):
    """Per-token log-probs of each row's completion tokens (a list of 1-D tensors, one per row)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    return [lp[i][mask[i]] for i in range(lp.shape[0])]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qlora", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args()
    if not HH_DEV.is_file():
        sys.exit(f"{HH_DEV}: the shared HH data is absent; nothing to measure")
    import torch

    from preftune.config import load_config
    from preftune.data import collate_pairs
    from preftune.data.prepare import prepare_pairs
    from preftune.models.loading import load_start, load_tokenizer, resolve_model_dir

    torch.set_num_threads(2)
    cfg = load_config(None, [f"data.train_path={HH_DEV}", f"data.max_records={a.pairs}",
                             f"data.max_length={a.max_length}", f"data.max_prompt_length={a.max_length // 2}"])
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    tok = load_tokenizer(model_dir)
    pairs, _ = prepare_pairs(str(HH_DEV), cfg, tok)
    scores, footprint, seconds = {}, {}, {}
    for fmt in ("fp32", "nf4", "fp4"):
        m = cfg.model
        m.load_in_4bit, m.bnb_4bit_quant_type = fmt != "fp32", "nf4" if fmt == "fp32" else fmt
        model, _ = load_start(m, model_dir)
        model.eval()
        footprint[fmt] = round(model.get_memory_footprint() / 2**20, 1)
        t0, rows = time.perf_counter(), []
        for i in range(0, len(pairs), 8):
            got = _token_logps(model, collate_pairs(pairs[i:i + 8], tok.pad_token_id))
            half = len(got) // 2  # rows: chosen of each pair, then rejected of each
            rows += [x for pair in zip(got[:half], got[half:]) for x in pair]
        seconds[fmt] = round(time.perf_counter() - t0, 2)
        scores[fmt] = rows  # chosen, rejected, chosen, rejected, ...
        del model
    base = scores["fp32"]
    out = {"command": " ".join(["python -m benchmarks.qlora", *sys.argv[1:]]), "model": cfg.model.name_or_path,
           "data": "hh-rlhf-harmless-base dev.jsonl.gz", "pairs": len(pairs), "max_length": a.max_length,
           "tokens_scored": int(sum(len(x) for x in base)),
           "fp32": {"weights_mb": footprint["fp32"], "score_s": seconds["fp32"]}}
    for fmt in ("nf4", "fp4"):
        tok_d = torch.cat([(q - b).abs() for q, b in zip(scores[fmt], base)])
        seq_b = torch.stack([b.sum() for b in base])
        seq_q = torch.stack([q.sum() for q in scores[fmt]])
        seq_d = (seq_q - seq_b).abs()
        margin_b, margin_q = seq_b[0::2] - seq_b[1::2], seq_q[0::2] - seq_q[1::2]
        corr = torch.corrcoef(torch.stack([margin_b, margin_q]))[0, 1].item()
        out[fmt] = {"weights_mb": footprint[fmt], "score_s": seconds[fmt],
                    "token_abs_diff": {"mean": round(tok_d.mean().item(), 4),
                                       "p99": round(tok_d.quantile(0.99).item(), 4), "max": round(tok_d.max().item(), 4)},
                    "completion_sum_abs_diff": {"mean": round(seq_d.mean().item(), 3), "max": round(seq_d.max().item(), 3)},
                    "completion_sum_rel_diff_mean": round((seq_d / seq_b.abs().clamp_min(1e-6)).mean().item(), 4),
                    "preference_sign_agreement": round((margin_b.sign() == margin_q.sign()).float().mean().item(), 4),
                    "margin_pearson": round(corr, 4)}
    print(json.dumps(out, indent=1))
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
