"""The cost curve of one training step against pair length: block attention (default), the dense
(T, T) mask it replaced, block attention with gradient checkpointing, block attention with the
dense LM head (`dense-head`: train.logprob_chunk_tokens=0), and QLoRA (the base in 4-bit NF4
through bitsandbytes, `model.load_in_4bit`) with and without gradient checkpointing, and the
peer: TRL's DPOTrainer (benchmarks/speed_vs_trl's worker) with checkpointing on (its default,
`trl+gc`) and off (`trl`), on the same pairs in the same invocation.

    .venv/bin/python -m benchmarks.scaling [--model gemma3-270m] [--lengths 256,1024,2048,4096]
        [--modes block,trl,...] [--steps 2] [--batch 4] [--timeout 10800]

Pairs are synthetic and built from the shared HH-RLHF harmless text (absent: the benchmark says
so and stops): a prompt of half the length (with the BOS a tokenizer adds) and two completions
of a quarter each (with their EOS), cut to token counts with the model's tokenizer, so `tokens
per pair` = prompt + chosen + rejected = length. Every point is `preftune.training.train` in a
fresh process (`--model`, default SmolLM2-135M-Instruct; gemma3-270m once `preftune models fetch
gemma3-270m` ran; fp32, LoRA r16 q/v, batch 4, packed rows with prefix sharing, live reference,
lr 5e-4, file order); peak RSS is that process's ru_maxrss (it includes the model and libraries:
2.1 GB for SmolLM2, 3.0 GB for Gemma at 128 tokens). preftune's workers run on the allocator the
`preftune` command picks (jemalloc when installed, see preftune.utils.allocator; each point
records it), TRL's on glibc's defaults, as each tool runs for its users. The dense route is today's route for models without SDPA
attention (the block attention switched off). TRL gets the same model, identical initial LoRA
weights (seed 42), lr 5e-4 without warmup, file order, fp32 and `max_length` = length + 8
(nothing truncated). Every point that should reproduce the block point's losses (TRL, +gc,
dense-head, dense; not QLoRA) records the largest per-step loss difference from it, absolute and
relative, and `losses_agree` (every step within 1e-5 relative); a TRL point also records preftune's
pairs/s over its own (block's, and block+gc's when it ran), all when block ran first in the same
invocation. SmolLM2 writes results.json and cost.png beside this file, another model
results-MODEL.json and cost-MODEL.png. A worker past `--timeout` is an error point.

    .venv/bin/python -m benchmarks.scaling --model gemma3-270m --chunk-sweep 0,128,256,512,1024,2048 --lengths 1024

runs preftune (block, or each of --modes) at the first length once per train.logprob_chunk_tokens
value (0: the dense head), each run's losses against the first's: chunks.json/.png (chunks-MODEL.*).
benchmarks/logprob_chunk.py times the head alone; this times whole steps.

    .venv/bin/python -m benchmarks.scaling --flops [--lengths 256,2048] [--modes block,trl+gc,trl]

counts the floating-point operations of one training step of each tool on the same pairs
(torch.utils.flop_counter: matmuls and attention, as executed — causal attention counts the
keys it visits; elementwise work is not counted) and writes flops.json (flops-MODEL.json): the
work ratio TRL / preftune bounds the speed ratio a tool can reach on equally efficient kernels,
and achieved GFLOP/s says how efficiently each ran. preftune's step count is its 2-step run's
minus its 1-step run's, so loading and the layout check fall out (`gflop_setup` is what they did).

Issue 37's grid on Gemma 3 270M (and the same without --model for SmolLM2; block first, so every
other point is compared with it; PYTHONPATH=src HF_HUB_OFFLINE=1):

    .venv/bin/python -m benchmarks.scaling --model gemma3-270m --lengths 512,1024,2048,4096 \
        --modes block,block+gc,trl,trl+gc --steps 2 --batch 4
    .venv/bin/python -m benchmarks.scaling --model gemma3-270m --lengths 512,1024 --modes block,dense-head
    .venv/bin/python -m benchmarks.scaling --model gemma3-270m --chunk-sweep 0,128,256,512,1024,2048 --lengths 1024

Time per Gemma point (2 steps, batch 4, with preftune's layout check), planned from FLOPs: a
step is 6*N*T for the body (N = 100M non-embedding weights, T tokens forwarded: TRL forwards the
prompt twice; 8*N*T with checkpointing), attention as executed (Gemma's sliding layers take a
mask, so their segments count every key), and the LM head at completion tokens (2*640*262144
FLOPs a token and pass: 4 passes in preftune, about 9 in TRL). That model gives 667 and 1247
GFLOP/step at 128 tokens, where --flops counted 668 (preftune) and 1242 (TRL), and is within 5%
of SmolLM2's counts at 256 and 2048. Minutes at 65 GFLOP/s (what SmolLM2's points achieved on
this 2-core VM when idle at 256-2048 tokens; Gemma's 128-token smoke runs, niced on a quiet
machine, reached 125 (preftune) and 70 (TRL), head-heavy work that runs faster) and, in
brackets, at 15 GFLOP/s (what they got while another session's benchmark held the cores):

    tokens   block      block+gc   trl        trl+gc     dense-head
    512      1.9 (8)    2.1 (9)    2.6 (11)   3.0 (13)   1.7 (7)
    1024     4.1 (18)   4.6 (20)   5.8 (25)   6.6 (29)   3.7 (16)
    2048     9.1 (39)   10 (45)    13 (57)    15 (65)    8.4 (36)
    4096     22 (96)    26 (111)   32 (139)   37 (161)   21 (90)

so the four-mode grid is about 3.3 h on an idle machine (14 h contended), plus ~0.5 min of
loading per point. Memory, scaled from SmolLM2's points (about 2 MB of activations per token
without checkpointing): block at 4096 and trl at 2048-4096 likely exceed this VM's 23 GB (a
killed worker is an error point), and the dense head holds (completion tokens x 262144) fp32
logits several times over: run it at 512-1024 only.

On Gemma the dense head's losses miss the 1e-5 bar (5.9e-5 relative at step 2, 128 tokens) while
the chunked head and TRL agree within 4e-7: F.cross_entropy's fp32 log-softmax over 262144 logits
was 7.7e-4 nats off an fp64 forward on a 32-token completion there, the chunked head's logsumexp
4.5e-5. The dense head is there for time and memory, not as a loss reference.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import importable, module_command
from benchmarks.speed_vs_trl.__main__ import BETA, LR
from preftune.models.zoo import ZOO
from preftune.utils.allocator import JEMALLOC_PATHS, NO_PURGE, jemalloc_path, preload_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HH_TRAIN = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "train.jsonl.gz"
DEFAULT_MODEL = "smollm2-135m-instruct"
MODES = ("block", "dense", "block+gc", "dense-head", "qlora", "qlora+gc", "trl", "trl+gc")
LOSS_RTOL = 1e-5  # the bar for "the same losses": per step, relative


def output(name: str, model: str) -> Path:
    """Where a result file of `model` goes: `name` beside this file for the default model (its
    results stay where they were), `stem-MODEL.suffix` for another (results-gemma3-270m.json)."""
    if model == DEFAULT_MODEL:
        return HERE / name
    stem, _, suffix = name.rpartition(".")
    return HERE / f"{stem}-{model}.{suffix}"


def _command() -> str:
    """This invocation as a reader would rerun it (sys.argv[0] is __main__.py's full path under -m)."""
    return " ".join(["python -m benchmarks.scaling", *sys.argv[1:]])


def _texts() -> list[str]:
    with gzip.open(HH_TRAIN, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [r["chosen"] + r["rejected"] for r in rows]


def _tokenizer(model: str):
    from preftune.models.loading import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(model))


def word_marks(tok, ids: list[int]) -> tuple[list[bool], list[bool]]:
    """For each token of `ids`: does it start a word (the tokenizer's space mark, then letters only),
    and is it whitespace only. The space mark is read from the tokenizer: 'Ġ' for GPT-2 byte-level
    BPE (SmolLM2), '▁' for SentencePiece-style vocabularies (Gemma)."""
    mark = tok.convert_ids_to_tokens(tok(" a", add_special_tokens=False)["input_ids"])[0][0]
    pieces = tok.convert_ids_to_tokens(ids)
    blank_ids = {i for i in set(ids) if tok.decode([i]).strip() == ""}  # space, newline, tab runs
    word = [len(p) > 1 and p[0] == mark and p[1:].isalpha() for p in pieces]
    return word, [i in blank_ids for i in ids]


def make_pairs(path: Path, length: int, n: int, tok=None) -> None:
    """n pairs of `length` tokens as preftune and TRL read them: the prompt length/2 with the BOS
    the tokenizer adds (Gemma; SmolLM2 adds none), chosen and rejected length/4 with their EOS, cut
    from HH text. Every piece starts at a word (a token that is the space mark and letters) and ends
    before one, and no piece ends in whitespace: then the decoded text re-tokenizes to the same
    tokens and nothing merges across the prompt/completion boundary, so every tool sees the same
    tokens (TRL tokenizes prompt + completion together and moves a boundary where tokens merge).
    tests/test_scaling_benchmark.py holds this for a byte-level BPE and a SentencePiece vocabulary."""
    from preftune.data.render import special_prefix

    tok = tok or _tokenizer(DEFAULT_MODEL)
    stream = [t for text in _texts()[: 400] for t in tok(text, add_special_tokens=False)["input_ids"]]
    word, blank = word_marks(tok, stream)

    def clean(i: int, size: int) -> int:
        for _ in range(len(stream)):
            if word[i] and word[i + size] and not blank[i + size - 1]:
                return i
            i = (i + 1) % (len(stream) - length)
        raise ValueError(f"no {size}-token span of the HH text starts and ends at a word for this tokenizer")

    rows, at = [], 0
    bos = len(special_prefix(tok))
    for _ in range(n):
        parts = []
        for size in (length // 2 - bos, length // 4 - 1, length // 4 - 1):  # -1: the EOS each completion gets
            at = clean(at, size)
            parts.append(tok.decode(stream[at: at + size]))
            at = (at + size) % (len(stream) - length)
        rows.append({"prompt": parts[0], "chosen": parts[1], "rejected": parts[2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def overrides(data: str, out: str, mode: str, steps: int, batch: int, length: int, model: str = DEFAULT_MODEL,
              chunk: int | None = None) -> list[str]:
    """The config of a preftune point. `chunk`: train.logprob_chunk_tokens (None: its default,
    1024); the dense-head mode is block attention with the dense LM head (0). lr and beta are
    TRL's worker's (speed_vs_trl's LR, BETA), not the DPO recipe's, which a search may change."""
    chunk = 0 if mode == "dense-head" else chunk
    return [f"model.name_or_path={model}", f"data.train_path={data}", f"run.output_dir={out}", f"train.max_steps={steps}",
            f"train.batch_size={batch}", f"train.lr={LR}", f"loss.beta={BETA}", "train.shuffle=false",
            f"data.max_length={length + 8}", f"data.max_prompt_length={length // 2 + 4}",
            "diagnostics.probe_every=0", "train.warmup_ratio=0", "train.seed=42",
            f"model.gradient_checkpointing={str(mode.endswith('+gc')).lower()}",
            f"model.load_in_4bit={str(mode.startswith('qlora')).lower()}",
            f"train.reference_cache={str(mode.endswith('+cache')).lower()}",
            *([] if chunk is None else [f"train.logprob_chunk_tokens={chunk}"])]


def worker(data: str, out: str, mode: str, steps: int, batch: int, length: int, model: str = DEFAULT_MODEL,
           chunk: int | None = None) -> None:
    import preftune.models.loading
    from preftune.config import load_config
    from preftune.core.chunking import block_tokens
    from preftune.data.prepare import prepare_pairs
    from preftune.models.loading import load_tokenizer, model_shape, resolve_model_dir
    from preftune.training.train import train

    if mode == "dense":
        preftune.models.loading.use_block_attention = lambda model: False
    cfg = load_config(None, overrides(data, out, mode, steps, batch, length, model, chunk))
    result = train(cfg)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    s = result.summary
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    pairs, _ = prepare_pairs(data, cfg, load_tokenizer(model_dir))
    tokens = sum(len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in pairs) / len(pairs)
    print("RESULT " + json.dumps({"pairs_per_s": s["pairs_per_s"], "elapsed_s": s["elapsed_s"],
                                  "peak_rss_mb": s["peak_rss_mb"], "losses": [r["loss"] for r in rows],
                                  "attention": s["layout"].get("checked", {}).get("attention"),
                                  "layout": s["layout"].get("layout"), "prefix_sharing": s["layout"].get("prefix_sharing"),
                                  "logprob_chunk_tokens": cfg.train.logprob_chunk_tokens,
                                  "logprob_block_tokens": block_tokens(cfg.train.logprob_chunk_tokens,
                                                                       (model_shape(model_dir) or {}).get("vocab", 0)),
                                  "allocator": s.get("allocator"),
                                  "tokens_per_pair": round(tokens, 1),
                                  "gradient_checkpointing": s["gradient_checkpointing"]}))


def eval_worker(data: str, out: str, mode: str, length: int) -> None:
    """Held-out evaluation of the same pairs, timed around `evaluate_pairs` only (models loaded
    first), in the order a user runs them: the base model "before" (policy == reference, one
    forward per batch; like `preftune eval` without --run it leaves its log-probs in the reference
    cache), the trained run with a live adapters-off reference (policy + reference forwards), and
    the trained run reading the reference log-probs from that cache (what `preftune eval --run`
    does after a "before" eval: one forward per batch)."""
    import time

    from preftune.config import load_config
    from preftune.core.losses import build_loss
    from preftune.core.step import SameAsPolicy, loss_kwargs
    from preftune.data.batches import exact_layout
    from preftune.data.prepare import pair_collator, prepare_pairs
    from preftune.data.refcache import path_for, read, store
    from preftune.models.generate import run_models
    from preftune.models.loading import load_model, load_tokenizer, resolve_model_dir, weights_sha256
    from preftune.training.checkpoint import file_digest, tokenizer_sha256
    from preftune.training.evaluate import evaluate_pairs

    cfg = load_config(Path(out) / "config.yaml", ["eval.batch_size=4"])
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    tok, spec = load_tokenizer(model_dir), build_loss(cfg.loss.name)
    pairs, _ = prepare_pairs(data, cfg, tok)
    policy, reference = run_models(cfg, out, load_model(model_dir))
    base = load_model(model_dir).eval()
    ref_sha = json.loads((Path(out) / "reference.json").read_text())["weights_sha256"]
    cache = path_for(reference_sha256=ref_sha, tokenizer_sha256=tokenizer_sha256(tok),
                     data_sha256=file_digest(data), data_config=cfg.data)
    kwargs = {"loss_kwargs": loss_kwargs(cfg, spec), "batch_size": 4, "pad_id": tok.pad_token_id}

    def timed(name, model, ref, values=None, sink=None):
        checked, layout = exact_layout(cfg, spec.kind, model, pairs[:4], tok.pad_token_id, model_dir)
        start = time.perf_counter()
        evaluate_pairs(model, ref, spec, pairs, collate=pair_collator(checked, tok, values), policy_logps=sink,
                       **kwargs)
        if sink is not None:
            store(cache, sink)
        got[f"{name}_pairs_per_s"] = round(len(pairs) / (time.perf_counter() - start), 3)
        got[f"{name}_layout"] = layout["layout"]

    got = {"base_is_the_recorded_reference": weights_sha256(base) == ref_sha}  # else the cache key would differ
    timed("eval_before", base, SameAsPolicy(), sink={})
    timed("eval_run", policy.eval(), reference)
    values = read(cache, pairs)
    got["cache_covers_the_pairs"] = values is not None
    timed("eval_run_cached_reference", policy, reference, values=values)
    print("RESULT " + json.dumps(got))


def trl_worker(data: str, mode: str, steps: int, batch: int, length: int, model: str = DEFAULT_MODEL) -> None:
    """TRL's DPOTrainer on the same pairs (speed_vs_trl's worker: same model, same initial adapter)."""
    from benchmarks.speed_vs_trl.__main__ import worker_trl

    got = worker_trl(Path(data), steps, batch, length + 8, gradient_checkpointing=mode == "trl+gc", model_name=model)
    n = steps * batch
    print("RESULT " + json.dumps({"pairs_per_s": round(n / got["elapsed_s"], 4), "elapsed_s": round(got["elapsed_s"], 2),
                                  "peak_rss_mb": round(got["peak_rss_mb"], 1), "losses": got["losses"],
                                  "gradient_checkpointing": mode == "trl+gc"}))


def _cpu_attention_flops():
    """FLOP formulas for the CPU SDPA kernels, which torch's counter leaves out: the standard
    attention count (GQA aware), times the share of keys a causal query visits."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def share(q_shape, k_shape, causal: bool) -> float:
        sq, sk = q_shape[-2], k_shape[-2]
        if not causal:
            return 1.0
        return sum(min(sk, sk - sq + i + 1) for i in range(sq)) / (sq * sk)  # top-left causal, as SDPA

    def forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
        return int(sdpa_flop_count(query, key, value) * share(query, key, is_causal))

    def backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
                 out_shape=None, **kwargs):
        return int(sdpa_backward_flop_count(grad_out, query, key, value) * share(query, key, is_causal))

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def flops_worker(data: str, out: str, mode: str, steps: int, batch: int, length: int, model: str = DEFAULT_MODEL,
                 chunk: int | None = None) -> None:
    """FLOPs of a whole `steps`-step run of one tool (the driver subtracts two runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        if mode.startswith("trl"):
            trl_worker(data, mode, steps, batch, length, model)
        else:
            worker(data, out, mode, steps, batch, length, model, chunk)
    print("FLOPS " + json.dumps({"flops": counter.get_total_flops()}))


def count_step_flops(data: Path, mode: str, batch: int, length: int, model: str = DEFAULT_MODEL) -> dict:
    """One step's FLOPs: the 2-step run minus the 1-step run. TRL's runs do no model work outside
    their steps (at 256 tokens its 2-step count is exactly twice its 1-step count, setup 0.0), so a
    TRL point is its 1-step run: at 2048 tokens its 2-step run under the counter outgrew memory."""
    got = {}
    for steps in ((1,) if mode.startswith("trl") else (1, 2)):
        got[steps] = run_point(data, mode, steps, batch, length, model=model, flops=True, timeout=7200)
        if "error" in got[steps]:
            return got[steps]
    one = got[1]["flops"]
    step = got[2]["flops"] - one if 2 in got else one
    return {"gflop_per_step": round(step / 1e9, 1), "gflop_per_pair": round(step / batch / 1e9, 2),
            "gflop_setup": round((one - step) / 1e9, 1) if 2 in got else None,
            "losses": got[max(got)].get("losses")}


def flops(a) -> None:
    """--flops: one step's work for each mode at each length (flops.json beside this file, or
    flops-MODEL.json; a ratio is taken against the block point of this invocation, else the saved one)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in [int(x) for x in a.lengths.split(",")]:
            data = Path(tmp) / f"pairs-{length}.jsonl"
            make_pairs(data, length, 2 * a.batch, tok=_tokenizer(a.model))
            for mode in a.modes.split(","):
                row = {"length": length, "mode": mode, "model": a.model,
                       **count_step_flops(data, mode, a.batch, length, a.model)}
                dest = output("flops.json", a.model)  # rows join (or replace the same point in) the saved ones as they finish
                saved = json.loads(dest.read_text())["results"] if dest.is_file() else []
                # counts do not vary from run to run: the block point may come from an earlier invocation
                ours = next((r for r in [*rows, *saved] if r["length"] == length and r["mode"] == "block"
                             and "gflop_per_step" in r), None)
                if ours is not None and mode != "block" and "gflop_per_step" in row:
                    row["work_over_preftune"] = round(row["gflop_per_step"] / ours["gflop_per_step"], 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
                saved = with_point(saved, {**row, "command": _command()})
                dest.write_text(json.dumps({"model": a.model, "batch": a.batch, "results": saved}, indent=1) + "\n")


def loss_agreement(losses: list[float], reference: list[float]) -> dict:
    """The largest per-step difference between two runs' losses, absolute and relative to
    `reference`, and whether every step agrees within LOSS_RTOL (runs of different lengths never do)."""
    steps = list(zip(losses, reference))
    rel = max((abs(a - b) / abs(b) for a, b in steps if b), default=None)
    return {"loss_max_abs_diff": max((abs(a - b) for a, b in steps), default=None), "loss_max_rel_diff": rel,
            "losses_agree": len(losses) == len(reference) and rel is not None and rel <= LOSS_RTOL}


def versus_block(point: dict, results: list[dict]) -> dict:
    """For a point that computes the block point's losses by another route (TRL, checkpointing, the
    dense head, the dense mask; not QLoRA, whose base differs): its loss agreement with the block
    point of the same length in the same invocation, or with the block+gc point where block did not
    run (Gemma at 4096 tokens fits only with checkpointing; block+gc's losses are block's bit for
    bit wherever both ran): `losses_vs` names which. A TRL point also records preftune's pairs/s
    over its own: block's (`preftune_over_trl`) and block+gc's (`preftune_gc_over_trl`)."""
    def ours(mode):
        return next((r for r in results if r["length"] == point["length"] and r["mode"] == mode
                     and r.get("command") == point.get("command") and "pairs_per_s" in r), None)

    if "losses" not in point or point["mode"] == "block" or point["mode"].startswith("qlora"):
        return {}
    block, gc = ours("block"), ours("block+gc")
    ref = block if block is not None or point["mode"] == "block+gc" else gc  # block+gc only against block
    if ref is None:
        return {}
    got = {**loss_agreement(point["losses"], ref["losses"]), "losses_vs": ref["mode"]}
    if point["mode"].startswith("trl"):
        if block is not None:
            got["preftune_over_trl"] = round(block["pairs_per_s"] / point["pairs_per_s"], 2)
        if gc is not None:
            got["preftune_gc_over_trl"] = round(gc["pairs_per_s"] / point["pairs_per_s"], 2)
    return got


def with_point(results: list[dict], point: dict) -> list[dict]:
    """`results` with `point` added, replacing the saved point of the same length and mode."""
    kept = [r for r in results if (r["length"], r["mode"]) != (point["length"], point["mode"])]
    return sorted([*kept, point], key=lambda r: (r["length"], MODES.index(r["mode"])))


def run_point(data: Path, mode: str, steps: int, batch: int, length: int, *, model: str = DEFAULT_MODEL,
              chunk: int | None = None, flops: bool = False, timeout: int = 3600, allocator: str | None = None) -> dict:
    """One worker in a fresh process: its RESULT line, and with `flops` its FLOPS line merged in. A
    worker still running after `timeout` seconds is killed and its point is an error, not the end
    of the invocation (a Gemma point at 4096 tokens can take hours on 2 busy cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = importable({**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if allocator is not None:  # --allocators: this variant's environment, whatever the default is
            env = {**{k: v for k, v in env.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_CONF")},
                   **ALLOCATORS[allocator]}
        elif not mode.startswith("trl"):  # the allocator the `preftune` command runs on (jemalloc when installed)
            env = preload_env(env) or env
        cmd = module_command("benchmarks.scaling", "--worker", mode, "--data", str(data), "--out", f"{tmp}/run",
                             "--steps", str(steps), "--batch", str(batch), "--lengths", str(length),
                             "--model", model, *(["--chunk-tokens", str(chunk)] if chunk is not None else []),
                             *(["--flops"] if flops else []))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s (--timeout)", "rc": None}
    lines = {x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines()
             if x.startswith(("RESULT ", "FLOPS "))}
    if "RESULT" not in lines or (flops and "FLOPS" not in lines):
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:300], "rc": proc.returncode}
    return {**lines["RESULT"], **lines.get("FLOPS", {})}


def eval_speed(a) -> None:
    """For each length: train 2 steps (block attention), then evaluate the same pairs with the base
    model ("before", which leaves its log-probs in the reference cache), with the trained run and a
    live reference, and with the trained run reading that cache; pairs/s of each (eval.json beside
    this file, or eval-MODEL.json)."""
    env = importable({**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in [int(x) for x in a.lengths.split(",")]:
            data = Path(tmp) / f"pairs-{length}.jsonl"
            make_pairs(data, length, 32, tok=_tokenizer(a.model))  # training takes the first steps * batch, eval all 32
            trained = run_point_keep(data, Path(tmp) / f"run-{length}", a.steps, a.batch, length,
                                     mode="block+cache" if a.reference_cache else "block", model=a.model)
            cmd = module_command("benchmarks.scaling", "--worker", "eval", "--data", str(data), "--out",
                                 str(Path(tmp) / f"run-{length}"), "--lengths", str(length))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            got = json.loads(line[len("RESULT "):]) if line else {"error": proc.stderr.strip()[-300:]}
            row = {"length": length, "eval_pairs": 32, "train_pairs_per_s": trained.get("pairs_per_s"), **got}
            print(json.dumps(row), flush=True)
            rows.append(row)
    name = "eval_cached.json" if a.reference_cache else "eval.json"
    output(name, a.model).write_text(json.dumps({"command": _command(), "model": a.model, "results": rows}, indent=1)
                                     + "\n")


def run_point_keep(data: Path, out: Path, steps: int, batch: int, length: int, mode: str = "block",
                   model: str = DEFAULT_MODEL) -> dict:
    env = importable({**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    cmd = module_command("benchmarks.scaling", "--worker", mode, "--data", str(data), "--out", str(out),
                         "--steps", str(steps), "--batch", str(batch), "--lengths", str(length), "--model", model)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[len("RESULT "):]) if line else {"error": proc.stderr.strip()[-300:]}


def plot(results: list[dict], dest: Path, model: str = DEFAULT_MODEL) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        pts = [r for r in results if r["mode"] == mode and "peak_rss_mb" in r]
        if not pts:  # a mode this file has no point of stays out of the legend
            continue
        xs = [r["length"] for r in pts]
        a.plot(xs, [r["peak_rss_mb"] / 1024 for r in pts], "o-", label=mode)
        b.plot(xs, [1 / r["pairs_per_s"] for r in pts], "o-", label=mode)
    a.set(xlabel="tokens per pair", ylabel="peak RSS (GB)", title="memory", xscale="log", yscale="log")
    b.set(xlabel="tokens per pair", ylabel="seconds per pair", title="time", xscale="log", yscale="log")
    a.legend()
    fig.suptitle(f"one training step, batch 4, LoRA: {model}")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def plot_beside(results: list[dict], earlier: list[dict], dest: Path, label: str, model: str = DEFAULT_MODEL) -> None:
    """Peak RSS against tokens per pair, this file's points that record their allocator (this
    round's: solid) beside an earlier round's (dashed, `label`), for each mode with such points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.get("allocator")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, mode in enumerate(m for m in MODES if any(r["mode"] == m and "peak_rss_mb" in r for r in results)):
        for rows, style, when in ((results, "o-", "now"), (earlier, "s--", label)):
            pts = sorted((r["length"], r["peak_rss_mb"] / 1024) for r in rows if r["mode"] == mode and "peak_rss_mb" in r)
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{mode} ({when})")
    ax.set(xlabel="tokens per pair", ylabel="peak RSS (GB)", xscale="log", yscale="log",
           title=f"one training step, batch 4, LoRA: {model}")
    lengths = sorted({r["length"] for r in (*results, *earlier) if "peak_rss_mb" in r})
    ax.set_xticks(lengths, [str(n) for n in lengths])  # the measured lengths, not log-scale minor labels
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


# --allocators: the environment of each variant (utils/allocator.py says which one preftune picks)
ALLOCATORS = {"glibc": {"PREFTUNE_MALLOC": "system"}, "release": {"PREFTUNE_MALLOC": "release"},  # 4 MiB
              "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
              "jemalloc": {"LD_PRELOAD": jemalloc_path() or JEMALLOC_PATHS[0]},
              "jemalloc-fast": {"LD_PRELOAD": jemalloc_path() or JEMALLOC_PATHS[0], "MALLOC_CONF": NO_PURGE},
              "tcmalloc": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}}


def allocators(a) -> None:
    """--allocators glibc,jemalloc,...: the block worker (or --modes' first) at each length under each
    C allocator: peak RSS and training time (allocators.json, or allocators-MODEL.json)."""
    rows, mode = [], (a.modes or "block").split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        for length in [int(x) for x in a.lengths.split(",")]:
            data = Path(tmp) / f"pairs-{length}.jsonl"
            make_pairs(data, length, 2 * a.batch, tok=_tokenizer(a.model))
            for name in a.allocators.split(","):
                got = run_point(data, mode, a.steps, a.batch, length, model=a.model, timeout=a.timeout, allocator=name)
                row = {"length": length, "mode": mode, "allocator": name, **ALLOCATORS[name], **got}
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
                rows.append(row)
    output("allocators.json", a.model).write_text(json.dumps({"command": _command(), "model": a.model,
                                                              "results": rows}, indent=1) + "\n")


def chunk_sweep(a) -> None:
    """--chunk-sweep: preftune at one length (the first of --lengths), once per value of
    train.logprob_chunk_tokens (0: the dense head) and mode (--modes, default block): pairs/s, peak
    RSS, and each run's losses against the first run's (chunks.json/.png, or chunks-MODEL.*)."""
    length, rows = int(a.lengths.split(",")[0]), []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"pairs-{length}.jsonl"
        make_pairs(data, length, a.steps * a.batch, tok=_tokenizer(a.model))
        for mode in (a.modes or "block").split(","):
            for chunk in [int(x) for x in a.chunk_sweep.split(",")]:
                row = {"length": length, "mode": mode, "chunk": chunk,
                       **run_point(data, mode, a.steps, a.batch, length, model=a.model, chunk=chunk,
                                   timeout=a.timeout)}
                if rows and "losses" in row and "losses" in rows[0]:
                    row.update(loss_agreement(row["losses"], rows[0]["losses"]))
                print(json.dumps(row), flush=True)
                rows.append(row)
                output("chunks.json", a.model).write_text(json.dumps(
                    {"command": _command(), "model": a.model, "steps": a.steps, "batch": a.batch, "results": rows},
                    indent=1) + "\n")
                plot_chunks(rows, output("chunks.png", a.model), a.model)


def plot_chunks(rows: list[dict], dest: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = [r for r in rows if r["mode"] == mode and "pairs_per_s" in r]
        xs = [r["chunk"] for r in pts]
        a.plot(xs, [r["peak_rss_mb"] / 1024 for r in pts], "o-", label=mode)
        b.plot(xs, [1 / r["pairs_per_s"] for r in pts], "o-", label=mode)
    for ax, y in ((a, "peak RSS (GB)"), (b, "seconds per pair")):
        ax.set(xlabel="train.logprob_chunk_tokens (0 = dense head)", ylabel=y, xscale="symlog")
    a.legend()
    fig.suptitle(f"LM head chunk size at {rows[0]['length']} tokens per pair: {model}")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024,2048,4096")
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=list(ZOO),
                    help="every tool trains this packaged model; another than the default writes results-MODEL.json")
    ap.add_argument("--modes", help=f"comma-separated, of {','.join(MODES)} (default: all; --chunk-sweep: block)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--worker")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--eval-speed", action="store_true", help="train pairs/s vs eval pairs/s on the same pairs")
    ap.add_argument("--reference-cache", action="store_true",
                    help="with --eval-speed: train with train.reference_cache=true; eval also from the cache "
                         "(writes eval_cached.json)")
    ap.add_argument("--flops", action="store_true", help="count one step's FLOPs per tool (flops.json)")
    ap.add_argument("--plot-beside", metavar="EARLIER.json", help="plot results.json's peak RSS beside an earlier "
                    "round's file (cost-vs-NAME.png) and stop")
    ap.add_argument("--allocators", metavar="NAME,...", help=f"peak RSS and time under each C allocator, of "
                    f"{','.join(ALLOCATORS)} (allocators.json)")
    ap.add_argument("--chunk-sweep", metavar="N,N,...",
                    help="preftune at the first of --lengths once per train.logprob_chunk_tokens value (0: dense head)")
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds before a point's worker is killed "
                    "and recorded as an error (default 3 h)")
    ap.add_argument("--chunk-tokens", type=int, help=argparse.SUPPRESS)  # a worker's train.logprob_chunk_tokens
    a = ap.parse_args()
    if a.worker is None and a.modes and (bad := set(a.modes.split(",")) - set(MODES)):
        ap.error(f"unknown modes {sorted(bad)}; known: {', '.join(MODES)}")
    if a.worker and a.flops:
        return flops_worker(a.data, a.out, a.worker, a.steps, a.batch, int(a.lengths), a.model, a.chunk_tokens)
    if not a.worker and not HH_TRAIN.is_file():
        sys.exit(f"{HH_TRAIN}: the shared HH data is absent; nothing to measure")
    if a.chunk_sweep:
        return chunk_sweep(a)
    if a.allocators:
        return allocators(a)
    if a.plot_beside:
        earlier = Path(a.plot_beside)
        results = json.loads(output("results.json", a.model).read_text())["results"]
        return plot_beside(results, json.loads(earlier.read_text())["results"],
                           output(f"cost-vs-{earlier.stem.removeprefix('results-')}.png", a.model), earlier.stem, a.model)
    a.modes = a.modes or ",".join(MODES)
    if a.flops:
        return flops(a)
    if a.worker == "eval":
        return eval_worker(a.data, a.out, a.worker, int(a.lengths))
    if a.worker in ("trl", "trl+gc"):
        return trl_worker(a.data, a.worker, a.steps, a.batch, int(a.lengths), a.model)
    if a.worker:
        return worker(a.data, a.out, a.worker, a.steps, a.batch, int(a.lengths), a.model, a.chunk_tokens)
    if a.eval_speed:
        return eval_speed(a)
    dest = output("results.json", a.model)
    # points are added to (or replace the same point in) the results file as they finish
    saved = json.loads(dest.read_text()) if dest.is_file() else {"steps": a.steps, "batch": a.batch, "results": []}
    saved["model"] = a.model
    with tempfile.TemporaryDirectory() as tmp:
        for length in [int(x) for x in a.lengths.split(",")]:
            data = Path(tmp) / f"pairs-{length}.jsonl"
            make_pairs(data, length, a.steps * a.batch, tok=_tokenizer(a.model))
            for mode in a.modes.split(","):
                point = {"length": length, "mode": mode, "model": a.model,
                         **run_point(data, mode, a.steps, a.batch, length, model=a.model, timeout=a.timeout),
                         "command": _command()}
                point.update(versus_block(point, saved["results"]))
                print(json.dumps(point), flush=True)
                saved["results"] = with_point(saved["results"], point)
                dest.write_text(json.dumps(saved, indent=1) + "\n")
                plot(saved["results"], output("cost.png", a.model), a.model)


if __name__ == "__main__":
    main()
