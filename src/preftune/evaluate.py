"""Held-out evaluation: preference accuracy, margins, and KL(policy || reference) on samples.

`preftune eval` evaluates a trained run (policy = run's model, reference = its base) or, with
no run, the base model itself ("before": policy == reference, so implicit-reward accuracy is
undefined and only raw log-prob accuracy is meaningful).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .data import collate_pairs
from .data.collate import collate_sequences
from .devices import place
from .logprobs import completion_logps

__all__ = ["evaluate_pairs", "sample_completions", "kl_estimate", "run_eval", "load_run_policy", "probe",
           "reference_sample_length", "sample_metrics", "decode_completions", "run_models"]


def _shard(n: int) -> tuple[list[int], int]:
    """This process's contiguous share of n items, padded with item 0 to the same length on every
    process (so each runs the same number of forwards: DDP/FSDP collectives line up), and how
    many of them are real."""
    from accelerate import PartialState

    state = PartialState()
    per = math.ceil(n / state.num_processes)
    idx = list(range(state.process_index * per, min((state.process_index + 1) * per, n)))
    return idx + [0] * (per - len(idx)), len(idx)


def _gather(rows: list) -> list:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    return gather_object(rows) if PartialState().num_processes > 1 else rows


_EVAL_KEYS = ("accuracy/implicit_reward", "accuracy/logp", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "loss", "logps/chosen", "logps/rejected", "tokens/chosen")


@torch.no_grad()
def evaluate_pairs(model, reference, spec, pairs, *, loss_kwargs: dict, batch_size: int, pad_id: int,
                   collate=None) -> dict:
    """Accuracy by implicit reward (margin > 0) and by raw completion logp, over held-out pairs.

    Rewards are the loss's own (beta * log-ratio for DPO-style losses, beta * average logp for
    SimPO/ORPO). An unpaired loss (KTO) has DPO's implicit reward beta * log-ratio, so its pairs
    are scored with the sigmoid spec; its "loss" is then DPO's and is not reported.
    Under several processes each scores its own share; per-pair values are gathered and summed
    with math.fsum, so the result is the same number for any process count (no pair twice).
    """
    from .losses import LOSSES
    from .train import loss_forward

    collate = collate or (lambda chunk: collate_pairs(chunk, pad_id))
    scorer = spec if spec.paired else LOSSES["sigmoid"]
    kwargs = {k: loss_kwargs[k] for k in scorer.params}
    idx, real = _shard(len(pairs))
    mine = [pairs[i] for i in idx]
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, len(mine), batch_size):
        losses, parts = loss_forward(model, reference, scorer, collate(mine[i: i + batch_size]), kwargs)
        margins = parts["chosen_rewards"] - parts["rejected_rewards"]
        columns = (margins > 0, parts["policy_chosen"] > parts["policy_rejected"], margins, parts["chosen_rewards"],
                   parts["rejected_rewards"], losses, parts["policy_chosen"], parts["policy_rejected"],
                   parts["chosen_lengths"])
        rows += [tuple(v) for v in zip(*(c.float().tolist() for c in columns))]
    model.train(was_training)
    rows = _gather(rows[:real])
    n = len(rows)
    sums = {key: math.fsum(r[k] for r in rows) for k, key in enumerate(_EVAL_KEYS)}
    result = {"pairs": n, **{k: v / n for k, v in sums.items() if k != "tokens/chosen"}}
    # per-token perplexity of the chosen completions under the policy
    result["perplexity/chosen"] = math.exp(-sums["logps/chosen"] / max(sums["tokens/chosen"], 1))
    if not spec.paired:
        del result["loss"]
    return result


def decode_completions(tokenizer, samples) -> list[str]:
    """The text of each sampled completion, without its EOS."""
    eos = tokenizer.eos_token_id
    return [tokenizer.decode([t for t in c if t != eos]) for _, c in samples]


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int, seed: int,
                       temperature: float = 1.0, batch_size: int = 64, top_p: float = 1.0,
                       top_k: int = 0) -> list[tuple[list[int], list[int]]]:
    """`n` samples per prompt. Defaults are pure sampling (no top-k/top-p), as KL estimates need.

    Returns (prompt_ids, completion_ids) with completions cut after the first EOS (kept).
    """
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream (dropout, shuffling) is untouched
        torch.manual_seed(seed)
        results = _sample(model, tokenizer, prompts, n, max_new_tokens, temperature, batch_size, top_p, top_k)
    model.train(was_training)
    return results


def _sample(model, tokenizer, prompts, n, max_new_tokens, temperature, batch_size, top_p=1.0, top_k=0):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    jobs = [p for p in prompts for _ in range(n)]
    results = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i: i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        ids, mask = place((ids, mask), model)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos)
        for prompt, row in zip(chunk, out[:, width:].tolist()):
            completion = row[: row.index(eos) + 1] if eos in row else row
            results.append((prompt, completion))
    return results


@torch.no_grad()
def kl_estimate(model, reference, samples, *, pad_id: int, batch_size: int = 16) -> dict:
    """Monte-Carlo KL(policy || reference): mean over policy samples of sum_t log pi/pi_ref
    (unbiased, so a single estimate can come out slightly negative near zero)."""
    was_training = model.training
    model.eval()  # no dropout: deterministic, and no draws from the training RNG
    diffs = []
    for i in range(0, len(samples), batch_size):
        chunk = [s for s in samples[i: i + batch_size] if s[1]]
        if not chunk:
            continue
        batch = collate_sequences([p for p, _ in chunk], [c for _, c in chunk], pad_id)
        policy, _ = completion_logps(model, batch)
        with reference.context():
            ref, _ = completion_logps(reference.forward_model(model), batch)
        diffs.append(policy - ref)
    model.train(was_training)
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    n = d.numel()
    return {"kl": d.mean().item() if n else 0.0,
            "kl_stderr": (d.std().item() / math.sqrt(n)) if n > 1 else 0.0, "kl_samples": n}


def _mean_length(samples) -> float:
    return sum(len(c) for _, c in samples) / max(len(samples), 1)


def probe(model, reference, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, seed: int,
          eval_pairs=None, spec=None, loss_kwargs=None, batch_size: int = 8,
          reference_length: float | None = None) -> dict:
    """What the in-training probe logs: one sample per prompt from the policy, its mean length,
    KL(policy || reference) on those samples (when there is a reference) and, with eval pairs,
    held-out implicit-reward accuracy and margin. `reference_length` (mean length of the
    reference's samples, measured once at the start) is repeated in every probe row."""
    pad = tokenizer.pad_token_id
    samples = sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, seed=seed)
    row = {"probe/sample_length": _mean_length(samples)}
    if reference_length is not None:
        row["probe/reference_length"] = reference_length
    if reference is not None:
        kl = kl_estimate(model, reference, samples, pad_id=pad)
        row.update({"probe/kl": kl["kl"], "probe/kl_stderr": kl["kl_stderr"]})
    if eval_pairs:
        ev = evaluate_pairs(model, reference, spec, eval_pairs, loss_kwargs=loss_kwargs, batch_size=batch_size,
                            pad_id=pad)
        row.update({"probe/eval_accuracy": ev["accuracy/implicit_reward"], "probe/eval_margin": ev["rewards/margins"]})
    return row


def reference_sample_length(model, reference, tokenizer, prompts, *, max_new_tokens: int, seed: int) -> float:
    """Mean length of samples from the reference (the policy with adapters off or the frozen
    copy); without a reference, from the model as it is now (step 0 of a fresh run)."""
    if reference is None:
        return _mean_length(sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens,
                                               seed=seed))
    with reference.context():
        ref_model = reference.forward_model(model)
        return _mean_length(sample_completions(ref_model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens,
                                               seed=seed))


def run_models(cfg, run_dir: str | Path, base_model) -> tuple:
    """A trained run's policy and the reference it was trained against: a frozen copy of
    `model.reference_name_or_path` when the run had one (iterative rounds), else the policy with
    adapters off (LoRA) or a frozen copy of the starting weights `base_model` (full fine-tuning)."""
    from .models import AdaptersOffReference, FrozenCopyReference, load_model, resolve_model_dir

    m = cfg.model
    policy = load_run_policy(Path(run_dir), base_model, allow_pickle_weights=m.allow_pickle_weights)
    if m.reference_name_or_path:
        ref = load_model(resolve_model_dir(m.reference_name_or_path, allow_pickle_weights=m.allow_pickle_weights),
                         dtype=m.dtype, allow_pickle_weights=m.allow_pickle_weights)
        return policy, FrozenCopyReference(ref.eval().requires_grad_(False))
    if (Path(run_dir) / "model" / "adapter_config.json").is_file():
        return policy, AdaptersOffReference(policy)
    return policy, FrozenCopyReference(base_model.eval())


def load_run_policy(run_dir: Path, base_model, *, is_trainable: bool = False, allow_pickle_weights: bool = False):
    """Attach a run's saved adapter to `base_model`, or load its full model dir. A pickle
    adapter (`adapter_model.bin`) needs the same opt-in as pickle model weights."""
    model_dir = Path(run_dir) / "model"
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        if not (model_dir / "adapter_model.safetensors").is_file():
            if not allow_pickle_weights or not (model_dir / "adapter_model.bin").is_file():
                from .errors import ConfigError

                raise ConfigError(str(model_dir), "adapter", "no adapter_model.safetensors" + (
                    " (only pickle adapter_model.bin; set model.allow_pickle_weights=true to load it with "
                    "weights_only=True)" if (model_dir / "adapter_model.bin").is_file() else ""))
        return PeftModel.from_pretrained(base_model, str(model_dir), is_trainable=is_trainable)
    from .models import load_model

    return load_model(str(model_dir), allow_pickle_weights=allow_pickle_weights)


def _length_stats(samples, prefix: str) -> dict:
    lengths = sorted(len(c) for _, c in samples)
    if not lengths:
        return {}
    return {f"{prefix}/mean": sum(lengths) / len(lengths), f"{prefix}/median": lengths[len(lengths) // 2],
            f"{prefix}/p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]}


def _texts(tokenizer, samples) -> tuple[list[str], list[str]]:
    return [tokenizer.decode(p) for p, _ in samples], decode_completions(tokenizer, samples)


def sample_metrics(policy, reference, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int,
                   seed: int, reward=None) -> dict:
    """Fresh samples from policy and reference on the same prompts (same seed): KL on the
    policy's samples, length statistics of both, and with a reward source their mean scores, the
    policy's win rate (policy sample k vs reference sample k of each prompt; ties count half)
    and per-prompt means."""
    pad = tokenizer.pad_token_id
    pol = sample_completions(policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed)
    with reference.context():
        ref = sample_completions(reference.forward_model(policy), tokenizer, prompts, n=n,
                                 max_new_tokens=max_new_tokens, seed=seed)
    out = {**kl_estimate(policy, reference, pol, pad_id=pad), **_length_stats(pol, "sample_length/policy"),
           **_length_stats(ref, "sample_length/reference")}
    if reward is None:
        return out
    p_text, pol_text = _texts(tokenizer, pol)
    _, ref_text = _texts(tokenizer, ref)
    ps, rs = reward.score(p_text, pol_text), reward.score(p_text, ref_text)
    pairs = [(a, b) for a, b in zip(ps, rs) if math.isfinite(a) and math.isfinite(b)]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
    if hasattr(reward, "compare"):  # a pairwise judge: ask it directly, in both orders
        verdicts = [reward.compare(p, a, b) for p, a, b in zip(p_text, pol_text, ref_text)]
        done = [v for v in verdicts if math.isfinite(v)]
        out.update({"win_rate/judge": sum(done) / max(len(done), 1), "win_rate/judge_comparisons": len(done),
                    "win_rate/judge_failed": len(verdicts) - len(done)})
    out.update({"reward/source": reward.name, "reward/policy": sum(a for a, _ in pairs) / max(len(pairs), 1),
                "reward/reference": sum(b for _, b in pairs) / max(len(pairs), 1),
                "win_rate": wins / max(len(pairs), 1), "win_rate/comparisons": len(pairs),
                "reward/failed": len(ps) - len(pairs),
                "per_prompt": [{"prompt": p_text[i * n],
                                "policy": sum(ps[i * n:(i + 1) * n]) / n, "reference": sum(rs[i * n:(i + 1) * n]) / n}
                               for i in range(len(prompts))]})
    return out


def run_eval(cfg, *, run_dir: str | None, data_path: str | list[str], reward: str | None = None) -> dict:
    """Evaluate the run's policy (or the base model when `run_dir` is None) on one held-out
    file, or on several (then the result maps each path to its own result)."""
    from .losses import build_loss
    from .models import FrozenCopyReference, load_start, load_tokenizer, resolve_model_dir
    from .train import load_data, loss_kwargs, prepare_pairs

    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    m, spec = cfg.model, build_loss(cfg.loss.name, cfg.loss.mix)
    all_records = [load_data(p, cfg.data) for p in paths]  # bad data fails here, before any weights load
    source = None
    if reward:
        from .online.rewards import build_reward

        source = build_reward(reward)
    model_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code, revision=m.revision)
    base, _ = load_start(m, model_dir)  # with the run's SFT adapter merged, as training started
    if run_dir is None:
        policy, reference = base, FrozenCopyReference(base)  # policy == reference: "before training"
    else:
        policy, reference = run_models(cfg, run_dir, base)
    policy.eval()
    results = {}
    for path, records in zip(paths, all_records):
        pairs, stats = prepare_pairs(path, cfg, tokenizer, records)
        collate, cached = None, None
        if cfg.train.reference_cache and run_dir is not None and spec.needs_reference:
            ref_sha = json.loads((Path(run_dir) / "reference.json").read_text())["weights_sha256"]
            collate, cached = _cached_reference_collate(cfg, path, pairs, policy, reference, tokenizer, ref_sha)
        result = {"run": run_dir or "(base model)", "data": path, "data_stats": stats.as_dict(),
                  **evaluate_pairs(policy, reference, spec, pairs, loss_kwargs=loss_kwargs(cfg, spec),
                                   batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id, collate=collate)}
        if cached is not None:
            result["reference_logps"] = "read from cache" if cached else "computed and cached"
        e = cfg.eval
        if e.kl_prompts:
            prompts = list({tuple(p.prompt_ids): p.prompt_ids for p in pairs}.values())[: e.kl_prompts]
            result.update(sample_metrics(policy, reference, tokenizer, prompts, n=e.kl_samples,
                                         max_new_tokens=e.max_new_tokens, seed=cfg.train.seed, reward=source))
        results[path] = result
    return results[paths[0]] if len(paths) == 1 else results


def _cached_reference_collate(cfg, path, pairs, policy, reference, tokenizer, ref_sha: str):
    """Reference logps of the eval pairs from the same on-disk cache training uses (refcache.py):
    the run's recorded reference hash, the tokenizer, the file's content and the settings."""
    from .checkpoint import file_digest, tokenizer_sha256
    from .prepare import pair_collator
    from .refcache import load_or_build, path_for

    cache = path_for(reference_sha256=ref_sha, tokenizer_sha256=tokenizer_sha256(tokenizer),
                     data_sha256=file_digest(path), data_config=cfg.data)
    values, hit = load_or_build(cache, policy, reference, pairs, batch_size=cfg.eval.batch_size,
                                collate=pair_collator(cfg, tokenizer))
    return pair_collator(cfg, tokenizer, values), hit


def write_json(result: dict, out: str | None) -> str:
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    return text
