"""Iterative and online DPO, and `preftune synth`: generate -> score -> pair -> train.

Iterative (`preftune iterate`): rounds of sampling from the current policy on the training
prompts, scoring with a reward source, pairing, and an ordinary `train()` run on those pairs
(any loss in the registry). After each round the adapter is merged into `round-N/policy/` (an
HF model directory) that the next round starts from; the reference stays the starting model,
or with `online.refresh_reference` becomes the previous round's policy. Each round writes
pairs.jsonl, counts.json, train/ (a full run directory) and eval.json (held-out reward of
fresh samples, and KL to the starting model). A round whose eval.json exists is kept, so a
stopped run continues where it was; the judge's disk cache makes re-scoring free.

Online (`preftune online`): every optimizer step samples `online.prompts_per_step` prompts,
scores, pairs and takes one loss step on those fresh pairs, through the same `loss_forward`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from ..data import render
from ..data.records import PreferenceRecord
from ..data.sources import messages, read_rows, split_path, write_jsonl
from ..errors import ConfigError, DataError
from ..rundir import RunLock
from ..safeio import read_capped
from .pairs import build_pairs

__all__ = ["load_prompts", "generate_and_pair", "run_iterative", "run_online", "run_synth"]


def load_prompts(path: str) -> list:
    """A .txt file (one prompt per non-empty line) or any data file with a `prompt` column of
    strings or chat-message lists."""
    file, part = split_path(path)
    if file.suffix == ".txt":  # bounded, regular files only (a FIFO or a device is one line)
        try:
            text = read_capped(file).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(str(file), 1, "encoding", f"not UTF-8 (byte {err.start})") from None
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for line, row in read_rows(file):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if isinstance(prompt, list):  # chat messages: rendered with the model's template
                prompts.append(messages(row, "prompt", (str(file), line)))
                continue
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(str(file), line, "prompt", "missing, or not a non-empty string or message list")
            prompts.append(prompt)
    prompts = prompts[part]
    if not prompts:
        raise DataError(str(file), 1, "file", "no prompts")
    return prompts


def generate_and_pair(model, tokenizer, prompts: list[str], reward, o, *, seed: int) -> tuple[list[dict], dict]:
    """Sample `o.samples_per_prompt` completions per prompt, score them, pair them (counts summed)."""
    from ..evaluate import decode_completions, sample_completions

    n = o.samples_per_prompt
    ids = [render.prompt_ids(tokenizer, p) for p in prompts]  # the same rendering training will use
    samples = sample_completions(model, tokenizer, ids, n=n, max_new_tokens=o.max_new_tokens, seed=seed,
                                 temperature=o.temperature, top_p=o.top_p, top_k=o.top_k)
    texts = decode_completions(tokenizer, samples)
    scores = reward.score([render.plain_text(p) for p in prompts for _ in range(n)], texts)
    rationales = getattr(reward, "last_rationales", None) or None
    pairs, totals = [], {"pairs": 0, "ties": 0, "failed": 0, "below_margin": 0}
    for k, prompt in enumerate(prompts):
        sl = slice(k * n, (k + 1) * n)
        got, counts = build_pairs(prompt, texts[sl], scores[sl], mode=o.pairing, min_margin=o.min_margin,
                                  rationales=rationales[sl] if rationales else None)
        for row in got:  # a conversational prompt makes a conversational pair (assistant turns)
            row["chosen"], row["rejected"] = (render.completion_for(prompt, row[k]) for k in ("chosen", "rejected"))
        pairs += got
        totals = {key: totals[key] + counts[key] for key in totals}
    finite = [s for s in scores if math.isfinite(s)]
    totals.update(samples=len(texts), reward_mean=sum(finite) / len(finite) if finite else math.nan)
    return pairs, totals


@torch.no_grad()
def _round_eval(policy, start_model, tokenizer, prompts: list[str], reward, o, seed: int) -> dict:
    """Mean reward of fresh policy samples on held-out prompts and KL(policy || starting model)."""
    from ..evaluate import decode_completions, kl_estimate, sample_completions
    from ..models import FrozenCopyReference

    ids = [render.prompt_ids(tokenizer, p) for p in prompts]
    samples = sample_completions(policy, tokenizer, ids, n=o.eval_samples, max_new_tokens=o.max_new_tokens, seed=seed)
    scores = reward.score([render.plain_text(p) for p in prompts for _ in range(o.eval_samples)],
                          decode_completions(tokenizer, samples))
    finite = [s for s in scores if math.isfinite(s)]
    kl = kl_estimate(policy, FrozenCopyReference(start_model), samples, pad_id=tokenizer.pad_token_id)
    return {"reward": sum(finite) / len(finite) if finite else math.nan, "reward_scored": len(finite),
            "reward_failed": len(scores) - len(finite), "kl_to_start": kl["kl"], "kl_stderr": kl["kl_stderr"]}


def _reward(o):
    from .rewards import build_reward

    spec = ({"ensemble": o.reward_ensemble, "disagreement_penalty": o.disagreement_penalty}
            if o.reward_ensemble else o.reward)
    judge = {"timeout_s": o.judge_timeout_s, "retries": o.judge_retries, "backoff_s": o.judge_backoff_s}
    return build_reward(spec, length_penalty=o.length_penalty, judge=judge)


def _merge(run_dir: Path, base_dir: str, dest: Path) -> None:
    """The round's policy as a plain HF model directory (adapter merged), written atomically."""
    from ..evaluate import load_run_policy
    from ..models import load_model, load_tokenizer

    model = load_run_policy(run_dir, load_model(base_dir))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def run_iterative(cfg) -> list[dict]:
    from ..models import load_model, load_tokenizer, resolve_model_dir
    from ..train import train

    o, root = cfg.online, Path(cfg.run.output_dir)
    if not o.prompts_path:
        raise ConfigError("defaults", "online.prompts_path", "is required")
    prompts = load_prompts(o.prompts_path)
    eval_prompts = load_prompts(o.eval_prompts_path) if o.eval_prompts_path else None
    reward = _reward(o)
    start_dir = resolve_model_dir(cfg.model.name_or_path)
    tokenizer, start = load_tokenizer(start_dir), load_model(start_dir).eval()
    root.mkdir(parents=True, exist_ok=True)
    rounds, policy_dir, reference_dir = [], start_dir, start_dir
    loaded_dir, loaded = start_dir, start  # the last policy loaded: evaluated, then sampled next round
    if eval_prompts:
        before = root / "round-0-eval.json"
        if not before.is_file():
            before.write_text(json.dumps(_round_eval(start, start, tokenizer, eval_prompts, reward, o, cfg.train.seed)))
        rounds.append({"round": 0, **json.loads(before.read_text())})
        print(f"round 0 (start): held-out reward {rounds[-1]['reward']:.3f}", flush=True)
    for r in range(1, o.rounds + 1):
        rd = root / f"round-{r}"
        done = rd / "eval.json"
        if done.is_file():  # finished before: keep it, continue from its policy
            rounds.append(json.loads(done.read_text()))
            print(f"round {r}: done before, kept", flush=True)
        else:
            rd.mkdir(parents=True, exist_ok=True)
            if loaded_dir != policy_dir:
                loaded_dir, loaded = policy_dir, load_model(policy_dir).eval()
            t0 = time.perf_counter()
            pairs, counts = generate_and_pair(loaded, tokenizer, prompts, reward, o, seed=cfg.train.seed + 1000 * r)
            write_jsonl(rd / "pairs.jsonl", pairs)
            (rd / "counts.json").write_text(json.dumps(counts, indent=2))
            row = {"round": r, **counts, "generate_score_s": round(time.perf_counter() - t0, 1)}
            if pairs:
                rc = copy.deepcopy(cfg)
                rc.model.name_or_path = policy_dir
                rc.model.reference_name_or_path = "" if reference_dir == policy_dir else reference_dir
                rc.data.train_path, rc.data.format, rc.data.eval_path = str(rd / "pairs.jsonl"), "standard", ""
                rc.run.output_dir, rc.run.overwrite = str(rd / "train"), True
                result = train(rc)
                row.update(steps=result.steps, final_loss=(result.summary.get("final") or {}).get("loss"),
                           health=sorted(result.summary.get("health") or {}))
                _merge(rd / "train", policy_dir, rd / "policy")
            else:
                print(f"round {r}: no pairs ({counts}); the policy is unchanged", flush=True)
                row.update(steps=0)
            new_dir = str(rd / "policy") if pairs else policy_dir
            if eval_prompts:
                if loaded_dir != new_dir:
                    loaded_dir, loaded = new_dir, load_model(new_dir).eval()
                row.update(_round_eval(loaded, start, tokenizer, eval_prompts, reward, o, cfg.train.seed))
            row.update(policy=new_dir, reference=reference_dir)
            done.write_text(json.dumps(row, indent=2))
            rounds.append(row)
        last = rounds[-1]
        policy_dir = last["policy"]
        if o.refresh_reference:
            reference_dir = policy_dir
        if "reward" in last:
            print(f"round {r}: {last['pairs']} pairs, held-out reward {last['reward']:.3f}, KL to start "
                  f"{last['kl_to_start']:.2f} nats", flush=True)
    (root / "rounds.json").write_text(json.dumps(rounds, indent=2) + "\n")
    return rounds


def run_synth(cfg, out: str) -> dict:
    """Pairs with scores (and a judge's rationales) from `online.prompts_path`, written to `out`."""
    from ..models import load_model, load_tokenizer, resolve_model_dir

    o = cfg.online
    prompts = load_prompts(o.prompts_path)
    reward = _reward(o)
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    pairs, counts = generate_and_pair(model, tokenizer, prompts, reward, o, seed=cfg.train.seed)
    dest = write_jsonl(out, pairs)
    stats = getattr(getattr(reward, "client", None), "stats", None)
    return {**counts, "out": str(dest), **({"judge": dict(stats)} if stats else {})}


def run_online(cfg) -> dict:
    """Online DPO: each optimizer step learns from pairs sampled from the policy of that step."""
    from ..losses import build_loss
    from ..train import check_output_dir

    o, t, run_dir = cfg.online, cfg.train, Path(cfg.run.output_dir)
    spec = build_loss(cfg.loss.name, cfg.loss.mix)
    if not spec.paired:
        raise ConfigError("defaults", "loss.name", f"online mode builds pairs; {spec.name!r} is unpaired")
    if not t.max_steps:
        raise ConfigError("defaults", "train.max_steps", "online mode needs a number of steps (> 0)")
    check_output_dir(run_dir, cfg.run.overwrite)
    prompts, reward = load_prompts(o.prompts_path), _reward(o)
    lock = RunLock(run_dir, overwrite=cfg.run.overwrite, resume=False)  # one writer, as in train()
    try:
        return _online_loop(cfg, spec, prompts, reward, lock)
    except BaseException:
        lock.release(ok=False)
        raise
    finally:
        lock.release()


def _online_loop(cfg, spec, prompts, reward, lock) -> dict:
    from ..data.tokenize import tokenize_records
    from ..diagnostics import health_checks, step_metrics
    from ..models import apply_lora, build_reference, load_model, load_tokenizer, resolve_model_dir
    from ..prepare import loss_kwargs, pair_collator
    from ..train import loss_forward

    o, t, m, run_dir = cfg.online, cfg.train, cfg.model, Path(cfg.run.output_dir)
    model_dir = resolve_model_dir(m.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(t.seed)
    model = load_model(model_dir)
    if m.lora:
        model = apply_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules)
    reference = build_reference(model, lora=m.lora) if spec.needs_reference else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    collate, kwargs = pair_collator(cfg, tokenizer), loss_kwargs(cfg, spec)
    lock.started()
    from ..config import save_config

    save_config(cfg, run_dir / "config.yaml")
    order, history, skipped = random.Random(t.seed), [], 0
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        for step in range(1, t.max_steps + 1):
            batch_prompts = order.sample(prompts, min(o.prompts_per_step, len(prompts)))
            pairs, counts = generate_and_pair(model, tokenizer, batch_prompts, reward, o, seed=t.seed + step)
            if not pairs:
                skipped += 1
                continue
            records = [PreferenceRecord(p["prompt"], p["chosen"], p["rejected"], "online", i + 1)
                       for i, p in enumerate(pairs)]
            tokenized, _ = tokenize_records(records, tokenizer, max_length=cfg.data.max_length,
                                            max_prompt_length=cfg.data.max_prompt_length, drop_overlong=True,
                                            allow_degenerate=True)
            model.train()
            losses, parts = loss_forward(model, reference, spec, collate(tokenized), kwargs)
            losses.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step, **step_metrics(parts, paired=True), "grad_norm": float(grad_norm),
                   **{f"online/{k}": v for k, v in counts.items()}}
            history.append(row)
            row["health"] = health_checks(history, beta=cfg.loss.beta)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            print(f"online step {step}: {counts['pairs']} pairs, sample reward {counts['reward_mean']:.3f}, "
                  f"loss {row['loss']:.4f}", flush=True)
    model.save_pretrained(run_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(run_dir / "model")
    summary = {"steps": len(history), "skipped_steps": skipped, "final": history[-1] if history else {}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
