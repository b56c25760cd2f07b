"""Iterative DPO and `preftune synth`: generate -> score -> pair -> train, in rounds.

Iterative (`preftune iterate`): rounds of sampling from the current policy on the training
prompts, scoring with a reward source, pairing, and an ordinary `train()` run on those pairs
(any loss in the registry). After each round the adapter is merged into `round-N/policy/` (an
HF model directory) that the next round starts from; the reference stays the starting model,
or with `online.refresh_reference` becomes the previous round's policy. Each round writes
pairs.jsonl, counts.json, train/ (a full run directory) and eval.json (held-out reward of
fresh samples, and KL to the starting model). A round whose eval.json exists is kept, so a
stopped run continues where it was; the judge's disk cache makes re-scoring free.

Online (`preftune online`) is a batch source of the same train() loop: online/source.py.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from ...data import render
from ...data.sources import write_jsonl
from ...models.generate import load_run_policy, sample_texts
from ...models.loading import FrozenCopyReference, load_model, load_tokenizer, resolve_model_dir
from ...training.evaluate import kl_estimate
from ...training.train import train
from ...utils.errors import ConfigError
from ...utils.safeio import atomic_path, atomic_write, read_json
from .rollouts import generate_and_pair, load_prompts, reward_from_config

__all__ = ["run_iterative", "run_synth"]


@torch.no_grad()
def _round_eval(policy, start_model, tokenizer, prompts: list[str], reward, o, seed: int) -> dict:
    """Mean reward of fresh policy samples on held-out prompts and KL(policy || starting model)."""
    samples, texts = sample_texts(policy, tokenizer, prompts, n=o.eval_samples, max_new_tokens=o.max_new_tokens,
                                  seed=seed)
    scores = reward.score([render.plain_text(p) for p in prompts for _ in range(o.eval_samples)], texts)
    finite = [s for s in scores if math.isfinite(s)]
    kl = kl_estimate(policy, FrozenCopyReference(start_model), samples, pad_id=tokenizer.pad_token_id)
    return {"reward": sum(finite) / len(finite) if finite else math.nan, "reward_scored": len(finite),
            "reward_failed": len(scores) - len(finite), "kl_to_start": kl["kl"], "kl_stderr": kl["kl_stderr"]}


def _merge(run_dir: Path, base_dir: str, dest: Path) -> None:
    """The round's policy as a plain HF model directory (adapter merged), written atomically."""
    model = load_run_policy(run_dir, load_model(base_dir))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_path(dest, directory=True, replace_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(base_dir).save_pretrained(tmp)


def _prompts(o, prompts: list | None, eval_prompts: list | None) -> tuple[list, list | None]:
    """The given prompt lists, else `online.prompts_path` (required) and `online.eval_prompts_path`."""
    if prompts is None:
        if not o.prompts_path:
            raise ConfigError("defaults", "online.prompts_path", "is required")
        prompts = load_prompts(o.prompts_path)
    if eval_prompts is None and o.eval_prompts_path:
        eval_prompts = load_prompts(o.eval_prompts_path)
    return prompts, eval_prompts


def _start_eval(root: Path, start, tokenizer, eval_prompts, reward, o, seed: int) -> dict:
    """Round 0: the starting model's held-out reward (kept on disk, like every round)."""
    before = root / "round-0-eval.json"
    if not before.is_file():
        atomic_write(before, json.dumps(_round_eval(start, start, tokenizer, eval_prompts, reward, o, seed)))
    row = {"round": 0, **read_json(before)}
    print(f"round 0 (start): held-out reward {row['reward']:.3f}", flush=True)
    return row


def _train_round(cfg, rd: Path, policy_dir: str, reference_dir: str, fmt: str) -> dict:
    """An ordinary train() run on the round's pairs, from the round's policy, against its reference.
    `fmt`: the pairs file's format, "standard" (text prompts) or "conversational" (message prompts)."""
    rc = copy.deepcopy(cfg)
    rc.model.name_or_path = policy_dir
    rc.model.reference_name_or_path = "" if reference_dir == policy_dir else reference_dir
    rc.data.train_path, rc.data.format, rc.data.eval_path = str(rd / "pairs.jsonl"), fmt, ""
    rc.run.output_dir, rc.run.overwrite = str(rd / "train"), True
    result = train(rc)
    return {"steps": result.steps, "final_loss": (result.summary.get("final") or {}).get("loss"),
            "health": sorted(result.summary.get("health") or {}), "run": str(rd / "train")}


def run_iterative(cfg, *, prompts: list | None = None, eval_prompts: list | None = None,
                  merge_last: bool = True) -> list[dict]:
    """Rounds of sample -> score -> pair -> `train()`. Prompts come from `online.prompts_path`
    (and `online.eval_prompts_path`) unless given; `merge_last=False` leaves the last round's
    policy as its run directory's adapter (nothing follows that would start from it)."""
    o, root = cfg.online, Path(cfg.run.output_dir)
    prompts, eval_prompts = _prompts(o, prompts, eval_prompts)
    reward = reward_from_config(o)
    start_dir = resolve_model_dir(cfg.model.name_or_path)
    tokenizer, start = load_tokenizer(start_dir), load_model(start_dir).eval()
    root.mkdir(parents=True, exist_ok=True)
    rounds, policy_dir, reference_dir = [], start_dir, start_dir
    loaded_dir, loaded = start_dir, start  # the last policy loaded: evaluated, then sampled next round
    if eval_prompts:
        rounds.append(_start_eval(root, start, tokenizer, eval_prompts, reward, o, cfg.train.seed))
    for r in range(1, o.rounds + 1):
        rd = root / f"round-{r}"
        done = rd / "eval.json"
        if done.is_file():  # finished before: keep it, continue from its policy
            rounds.append(read_json(done))
            print(f"round {r}: done before, kept", flush=True)
        else:
            rd.mkdir(parents=True, exist_ok=True)
            if loaded_dir != policy_dir:
                loaded_dir, loaded = policy_dir, load_model(policy_dir).eval()
            t0 = time.perf_counter()
            pairs, counts = generate_and_pair(loaded, tokenizer, prompts, reward, o, seed=cfg.train.seed + 1000 * r)
            write_jsonl(rd / "pairs.jsonl", pairs)
            atomic_write(rd / "counts.json", json.dumps(counts, indent=2))
            row = {"round": r, **counts, "generate_score_s": round(time.perf_counter() - t0, 1)}
            merged = False
            if pairs:
                # message prompts make conversational pairs (rollouts.generate_and_pair)
                fmt = "conversational" if any(isinstance(p, list) for p in prompts) else "standard"
                row.update(_train_round(cfg, rd, policy_dir, reference_dir, fmt))
                merged = merge_last or r < o.rounds
                if merged:
                    _merge(rd / "train", policy_dir, rd / "policy")
            else:
                print(f"round {r}: no pairs ({counts}); the policy is unchanged", flush=True)
                row.update(steps=0)
            new_dir = str(rd / "policy") if merged else policy_dir
            if eval_prompts:
                if pairs and not merged:  # the last round's adapter, on the weights it trained from
                    loaded_dir, loaded = str(rd / "train"), load_run_policy(rd / "train", load_model(policy_dir)).eval()
                elif loaded_dir != new_dir:
                    loaded_dir, loaded = new_dir, load_model(new_dir).eval()
                row.update(_round_eval(loaded, start, tokenizer, eval_prompts, reward, o, cfg.train.seed))
            row.update(policy=new_dir, reference=reference_dir)
            atomic_write(done, json.dumps(row, indent=2))
            rounds.append(row)
        last = rounds[-1]
        policy_dir = last["policy"]
        if o.refresh_reference:
            reference_dir = policy_dir
        if "reward" in last:
            print(f"round {r}: {last['pairs']} pairs, held-out reward {last['reward']:.3f}, KL to start "
                  f"{last['kl_to_start']:.2f} nats", flush=True)
    atomic_write(root / "rounds.json", json.dumps(rounds, indent=2) + "\n")
    return rounds


def run_synth(cfg, out: str) -> dict:
    """Pairs with scores (and a judge's rationales) from `online.prompts_path`, written to `out`."""
    o = cfg.online
    prompts = load_prompts(o.prompts_path)
    reward = reward_from_config(o)
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    pairs, counts = generate_and_pair(model, tokenizer, prompts, reward, o, seed=cfg.train.seed)
    dest = write_jsonl(out, pairs)
    stats = getattr(getattr(reward, "client", None), "stats", None)
    return {**counts, "out": str(dest), **({"judge": dict(stats)} if stats else {})}
