"""preftune vs TRL's DPOTrainer on identical work, alternating runs in one invocation.

    .venv/bin/python -m benchmarks.speed_vs_trl [--steps 8] [--batch 4] [--repeats 3]

Same data (HH-RLHF harmless train pairs, file order, only pairs that fit `--max-length` so
neither tool truncates), same model (the default SmolLM2-135M-Instruct, fp32), same LoRA
(r 16, alpha 32, q/v, dropout 0, identical initial adapter weights), beta 0.1, AdamW lr 5e-4,
linear schedule without warmup, batch 4, max grad norm 1. TRL runs at its defaults otherwise
(gradient checkpointing on), except bf16=False so that both compute in fp32 and the losses can
be compared; preftune runs at its defaults (packed rows with prefix sharing, live reference).
Every run is a fresh process (peak RSS is that process's ru_maxrss). Prints and saves
(results.json beside this file): pairs/s, real tokens/s, peak RSS, the per-pair ratio (median,
min, max), per-step loss agreement, and achieved FLOP/s as a fraction of a measured fp32 matmul
peak. TRL is a benchmark dependency only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import importable, module_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HH_TRAIN = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "train.jsonl.gz"
LR, BETA, SEED, LORA = 5e-4, 0.1, 42, dict(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(name: str = "smollm2-135m-instruct"):
    from accelerate.utils import set_seed

    from preftune.models.loading import apply_lora, load_model, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(name)
    set_seed(SEED)
    model = apply_lora(load_model(model_dir), **LORA)
    return model, load_tokenizer(model_dir), model_dir


# ---- workers (each in its own process) ------------------------------------------------------

def worker_trl(data: Path, steps: int, batch: int, max_length: int, gradient_checkpointing: bool = True,
               model_name: str = "smollm2-135m-instruct") -> dict:
    """TRL's DPOTrainer at its defaults (gradient checkpointing on) except fp32; benchmarks/scaling
    also runs it with checkpointing off and on another packaged model (`model_name`)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class FileOrderDPOTrainer(DPOTrainer):  # same order as preftune's train.shuffle=false
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    rows = [json.loads(x) for x in data.read_text().splitlines()]
    model, tokenizer, _ = _model(model_name)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, learning_rate=LR, beta=BETA,
                     max_steps=steps, lr_scheduler_type="linear", warmup_steps=0, max_length=max_length,
                     bf16=False, logging_steps=1, save_strategy="no", report_to=[], seed=SEED, use_cpu=True,
                     max_grad_norm=1.0, weight_decay=0.0, dataloader_num_workers=0, disable_tqdm=True,
                     gradient_checkpointing=gradient_checkpointing)
    trainer = FileOrderDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return {"elapsed_s": elapsed, "losses": [h["loss"] for h in logs],
            "logps_chosen": [h.get("logps/chosen") for h in logs], "peak_rss_mb": _peak_rss_mb()}


def worker_preftune(data: Path, steps: int, batch: int, max_length: int) -> dict:
    from preftune.config import load_config
    from preftune.training.train import train

    out = tempfile.mkdtemp()
    cfg = load_config(None, [f"data.train_path={data}", "data.format=standard", f"data.max_length={max_length}",
                             f"data.max_prompt_length={max_length - 1}", f"train.batch_size={batch}",
                             f"train.lr={LR}", f"loss.beta={BETA}", f"train.max_steps={steps}", "train.shuffle=false",
                             "train.scheduler=linear", "train.warmup_ratio=0", f"train.seed={SEED}",
                             f"model.lora_r={LORA['r']}", f"model.lora_alpha={LORA['alpha']}",
                             "diagnostics.probe_every=0", f"run.output_dir={out}"])
    result = train(cfg)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"elapsed_s": result.summary["elapsed_s"], "losses": [r["loss"] for r in rows],
            "logps_chosen": [r["logps/chosen"] for r in rows], "peak_rss_mb": _peak_rss_mb()}


# ---- driver -----------------------------------------------------------------------------

def _select_pairs(n: int, max_length: int) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """The first n HH pairs (file order) whose prompt + longer completion + EOS fits max_length."""
    from preftune.data import load_records
    from preftune.data.tokenize import tokenize_records

    _, tokenizer, _ = _model()
    records = load_records(str(HH_TRAIN), allow_empty_completions=True)
    toks, _ = tokenize_records(records, tokenizer, max_length=10**6, max_prompt_length=10**6 - 1)
    rows, lengths = [], []
    for rec, t in zip(records, toks):
        if len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= max_length and rec.chosen.strip() \
                and rec.rejected.strip():
            rows.append({"prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected})
            lengths.append((len(t.prompt_ids), len(t.chosen_ids), len(t.rejected_ids)))
        if len(rows) == n:
            break
    return rows, lengths


def _given_pairs(path: str) -> tuple[list[dict], list[tuple[int, int, int]]]:
    from preftune.data import load_records
    from preftune.data.tokenize import tokenize_records

    _, tokenizer, _ = _model()
    records = load_records(path)
    toks, _ = tokenize_records(records, tokenizer, max_length=10**6, max_prompt_length=10**6 - 1)
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]
    return rows, [(len(t.prompt_ids), len(t.chosen_ids), len(t.rejected_ids)) for t in toks]


def _matmul_peak_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def _useful_gflop_per_pair(lengths, model_dir: str) -> float:
    """Minimum work per pair: policy forward + backward (activation gradients: about one more
    forward, LoRA weights are tiny) + reference forward, each over prompt + chosen + rejected
    once (no padding, prompt once), LM head only at completion tokens, causal attention."""
    from transformers import AutoConfig

    from preftune.models.loading import count_parameters

    c = AutoConfig.from_pretrained(model_dir)
    n_linear = count_parameters(model_dir) - c.vocab_size * c.hidden_size  # without the (tied) embedding
    total = 0.0
    for p, ch, r in lengths:
        t = p + ch + r
        attn = 2 * 2 * c.num_hidden_layers * c.hidden_size * (p * p / 2 + (ch + r) * p + (ch * ch + r * r) / 2)
        head = 2 * c.hidden_size * c.vocab_size * (ch + r)
        total += 3 * (2 * n_linear * t + attn + head)
    return total / len(lengths) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed_vs_trl", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["trl", "preftune"])
    ap.add_argument("--data")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--pairs", help="a prompt/chosen/rejected JSONL to use instead of the first HH pairs that fit "
                    "(e.g. long synthetic pairs from benchmarks.scaling's make_pairs)")
    a = ap.parse_args()
    if a.worker:
        fn = worker_trl if a.worker == "trl" else worker_preftune
        print("RESULT " + json.dumps(fn(Path(a.data), a.steps, a.batch, a.max_length)))
        return 0
    if not HH_TRAIN.is_file():
        print(f"benchmark needs {HH_TRAIN}", file=sys.stderr)
        return 2
    rows, lengths = _given_pairs(a.pairs) if a.pairs else _select_pairs(a.steps * a.batch, a.max_length)
    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real_tokens = sum(2 * p + c + r for p, c, r in lengths)  # prompt+chosen and prompt+rejected, as DPO reads them
    runs = {"trl": [], "preftune": []}
    env = importable({**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    for i in range(a.repeats):
        for tool in ("trl", "preftune"):  # alternate, so drift in machine load hits both
            cmd = module_command("benchmarks.speed_vs_trl", "--worker", tool, "--data", str(data), "--steps",
                                 str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(line[7:])
            r["pairs_per_s"] = len(rows) / r["elapsed_s"]
            r["tokens_per_s"] = real_tokens / r["elapsed_s"]
            runs[tool].append(r)
            print(f"run {i + 1} {tool:8s} {r['elapsed_s']:7.1f} s  {r['pairs_per_s']:.3f} pairs/s  "
                  f"{r['tokens_per_s']:7.1f} tokens/s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    ratios = [p["pairs_per_s"] / t["pairs_per_s"] for p, t in zip(runs["preftune"], runs["trl"])]
    loss_diff = max(abs(x - y) for x, y in zip(runs["preftune"][0]["losses"], runs["trl"][0]["losses"]))
    logp_diff = max(abs(x - y) for x, y in zip(runs["preftune"][0]["logps_chosen"], runs["trl"][0]["logps_chosen"])
                    if y is not None)
    peak = _matmul_peak_gflops()
    from preftune.models.loading import resolve_model_dir

    per_pair = _useful_gflop_per_pair(lengths, resolve_model_dir("smollm2-135m-instruct"))
    med = {tool: statistics.median(r["pairs_per_s"] for r in rs) for tool, rs in runs.items()}
    summary = {
        "setup": {"pairs": len(rows), "steps": a.steps, "batch": a.batch, "max_length": a.max_length,
                  "repeats": a.repeats, "real_tokens": real_tokens, "cpu_threads": __import__("torch").get_num_threads()},
        "runs": runs,
        "ratio_pairs_per_s": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                              "all": ratios},
        "median_pairs_per_s": med,
        "peak_rss_mb": {tool: max(r["peak_rss_mb"] for r in rs) for tool, rs in runs.items()},
        "loss_max_abs_diff": loss_diff, "logps_chosen_max_abs_diff": logp_diff,
        "losses": {"preftune": runs["preftune"][0]["losses"], "trl": runs["trl"][0]["losses"]},
        "matmul_peak_gflops": peak, "useful_gflop_per_pair": per_pair,
        "roofline_pairs_per_s": peak / per_pair,
        "fraction_of_roofline": {tool: v * per_pair / peak for tool, v in med.items()},
    }
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\npairs/s median: preftune {med['preftune']:.3f}, TRL {med['trl']:.3f}; ratio preftune/TRL "
          f"median {summary['ratio_pairs_per_s']['median']:.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"peak RSS: preftune {summary['peak_rss_mb']['preftune']:.0f} MB, TRL {summary['peak_rss_mb']['trl']:.0f} MB")
    print(f"per-step loss max |diff| over {a.steps} steps: {loss_diff:.2e}; logps/chosen max |diff| {logp_diff:.2e}")
    print(f"fp32 matmul peak {peak:.0f} GFLOP/s; useful work {per_pair:.1f} GFLOP/pair; roofline "
          f"{summary['roofline_pairs_per_s']:.2f} pairs/s; achieved: preftune "
          f"{summary['fraction_of_roofline']['preftune']:.0%}, TRL {summary['fraction_of_roofline']['trl']:.0%}")
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
