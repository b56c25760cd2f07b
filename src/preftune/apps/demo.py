"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1) on our prompts.

One round of iterative DPO (online/iterate.py, the same path as `preftune iterate`): sample
continuations of movie-review openings from the default model, score them with VADER (a
lexicon sentiment scorer), pair best-vs-worst per prompt, train DPO with LoRA; then on
held-out prompts compare fresh samples of the reference and the trained policy: mean reward
with a paired bootstrap 95% interval, KL(policy || reference), and held-out pair accuracy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..config import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OnlineConfig,
    RunConfig,
    TrainConfig,
)
from ..core.losses import build_loss
from ..core.stats import bootstrap_ci
from ..core.step import loss_kwargs
from ..data.pairs import build_pairs
from ..data.prepare import prepare_pairs
from ..data.sources import write_jsonl
from ..models.generate import load_run_policy, sample_texts
from ..models.loading import AdaptersOffReference, load_model, load_tokenizer, resolve_model_dir
from ..models.rewards import build_reward
from ..runs.online.iterate import run_iterative
from ..training.evaluate import evaluate_pairs, kl_estimate
from ..utils.errors import ConfigError
from ..utils.safeio import atomic_write

__all__ = ["demo_prompts", "bootstrap_ci", "run_demo"]

# Our own prompt fragments: every opener crossed with every film gives 120 prompts.
_OPENERS = [
    "I watched {} last night and", "My review of {}: the acting was", "After seeing {}, I have to say that",
    "The soundtrack of {} was", "Going into {}, I expected", "The ending of {} left me",
    "My friends dragged me to {}, and honestly", "Compared to the book, {} is",
    "The dialogue in {} felt", "Two hours into {}, I",
]
_FILMS = [
    "the new space opera", "this low-budget horror film", "the director's latest thriller",
    "the animated family movie", "this three-hour historical epic", "the romantic comedy",
    "the documentary about deep-sea divers", "the sequel to last summer's heist movie",
    "this black-and-white silent film", "the musical adaptation", "the courtroom drama", "the zombie comedy",
]


def demo_prompts() -> tuple[list[str], list[str]]:
    """(train, held-out): every fifth prompt is held out, so held-out prompts are unseen combinations."""
    prompts = [o.format(f) for f in _FILMS for o in _OPENERS]
    return [p for i, p in enumerate(prompts) if i % 5], [p for i, p in enumerate(prompts) if i % 5 == 0]


def _settings(quick: bool) -> dict:
    if quick:  # a smoke test of every step, not a measurement
        return dict(n_train=8, n_eval=4, samples=2, eval_samples=2, tokens=12, epochs=1)
    return dict(n_train=96, n_eval=24, samples=4, eval_samples=6, tokens=32, epochs=3)


DEMO_LR = 5e-4  # tuned on SmolLM2-135M (KL 3.7 nats); other models may need less (README)


def _demo_config(out: Path, s: dict, model: str, lr: float = DEMO_LR) -> Config:
    """One round of iterative DPO: sample, score with VADER, best-vs-worst pairs, train with LoRA."""
    return Config(
        model=ModelConfig(name_or_path=model, lora=True, lora_r=16, lora_alpha=32,
                          lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        data=DataConfig(format="standard", max_length=96, max_prompt_length=32),
        loss=LossConfig(name="sigmoid", beta=0.1),
        train=TrainConfig(lr=lr, batch_size=8, epochs=s["epochs"], warmup_ratio=0.1, scheduler="cosine", seed=0),
        eval=EvalConfig(),
        online=OnlineConfig(reward="sentiment", samples_per_prompt=s["samples"], max_new_tokens=s["tokens"],
                            pairing="best_worst", min_margin=0.1, rounds=1),
        run=RunConfig(output_dir=str(out), overwrite=True),
    )


def _groups(texts: list[str], n: int) -> list[list[str]]:
    return [texts[i: i + n] for i in range(0, len(texts), n)]


def _heldout_accuracy(out: Path, cfg, policy, reference, tokenizer, prompts, groups, scores) -> dict | None:
    """Implicit-reward accuracy on best-vs-worst pairs built from the reference's held-out samples."""
    held = [row for p, g, sc in zip(prompts, groups, scores)
            for row in build_pairs(p, g, sc, mode="best_worst", min_margin=cfg.online.min_margin)[0]]
    held_path = write_jsonl(out / "heldout_pairs.jsonl", held)
    if not held:
        return None
    held_pairs, _ = prepare_pairs(str(held_path), cfg, tokenizer)
    spec = build_loss(cfg.loss.name)
    return evaluate_pairs(policy, reference, spec, held_pairs, loss_kwargs=loss_kwargs(cfg, spec), batch_size=16,
                          pad_id=tokenizer.pad_token_id)


def run_demo(out: Path, *, quick: bool = False, model: str = "smollm2-135m-instruct", lr: float = DEMO_LR) -> dict:
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").is_file() and not (out / "round-1").is_dir():
            raise ConfigError(str(out), "--output-dir", "exists and is not a demo directory; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s, start = _settings(quick), time.perf_counter()
    train_prompts, eval_prompts = demo_prompts()
    train_prompts, eval_prompts = train_prompts[: s["n_train"]], eval_prompts[: s["n_eval"]]
    cfg = _demo_config(out, s, model, lr)
    reward = build_reward("sentiment")

    # 1-2. one round of iterative DPO: the same sample -> score -> pair -> train() as `preftune iterate`
    print(f"[1/4] sampling {s['samples']} continuations for {len(train_prompts)} prompts, scoring, pairing")
    print("[2/4] training DPO (LoRA) on best-vs-worst pairs")
    (round1,) = run_iterative(cfg, prompts=train_prompts, merge_last=False)
    run_dir = out / "round-1" / "train"

    # 3. fresh samples on held-out prompts: reference (adapters off) vs trained policy, same seed
    print(f"[3/4] sampling {s['eval_samples']} continuations per held-out prompt from reference and policy")
    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    policy = load_run_policy(run_dir, load_model(model_dir)).eval()
    reference = AdaptersOffReference(policy)
    n, tokens = s["eval_samples"], s["tokens"]
    with reference.context():
        _, ref_texts = sample_texts(policy, tokenizer, eval_prompts, n=n, max_new_tokens=tokens, seed=2)
    pol_samples, pol_texts = sample_texts(policy, tokenizer, eval_prompts, n=n, max_new_tokens=tokens, seed=2)
    ref_groups, pol_groups = _groups(ref_texts, n), _groups(pol_texts, n)
    ref_scores = [reward.score([p] * n, g) for p, g in zip(eval_prompts, ref_groups)]
    pol_scores = [reward.score([p] * n, g) for p, g in zip(eval_prompts, pol_groups)]
    gains = [sum(p) / len(p) - sum(r) / len(r) for p, r in zip(pol_scores, ref_scores)]  # paired by prompt
    lo, hi = bootstrap_ci(gains)

    # 4. KL on policy samples and accuracy on held-out pairs built from reference samples
    print("[4/4] KL(policy || reference) and held-out pair accuracy")
    kl = kl_estimate(policy, reference, pol_samples, pad_id=tokenizer.pad_token_id)
    acc = _heldout_accuracy(out, cfg, policy, reference, tokenizer, eval_prompts, ref_groups, ref_scores)
    ref_mean = sum(map(sum, ref_scores)) / sum(map(len, ref_scores))
    pol_mean = sum(map(sum, pol_scores)) / sum(map(len, pol_scores))
    summary = {
        "heldout_prompts": len(eval_prompts), "samples_per_prompt": n,
        "reward_reference": ref_mean, "reward_policy": pol_mean, "reward_gain": pol_mean - ref_mean,
        "reward_gain_ci95": [lo, hi], **kl, "heldout_pair_accuracy": acc and acc["accuracy/implicit_reward"],
        "train_pairs": round1["pairs"], "train_steps": round1["steps"],
        "elapsed_s": round(time.perf_counter() - start, 1),
        "per_prompt": [{"prompt": p, "reference": sum(r) / len(r), "policy": sum(q) / len(q)}
                       for p, r, q in zip(eval_prompts, ref_scores, pol_scores)],
        "examples": [{"prompt": p, "reference": r[0], "policy": q[0]}
                     for p, r, q in list(zip(eval_prompts, ref_groups, pol_groups))[:3]],
    }
    atomic_write(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    _print_table(summary)
    return summary


def _print_table(s: dict) -> None:
    acc = "n/a" if s["heldout_pair_accuracy"] is None else f"{s['heldout_pair_accuracy']:.3f}"
    print("\n  held-out prompts: {} x {} samples".format(s["heldout_prompts"], s["samples_per_prompt"]))
    print(f"  {'':28s}{'reference':>12s}{'DPO policy':>12s}")
    print(f"  {'mean sentiment reward':28s}{s['reward_reference']:>12.3f}{s['reward_policy']:>12.3f}")
    print(f"  reward gain {s['reward_gain']:+.3f}  (95% bootstrap CI {s['reward_gain_ci95'][0]:+.3f} .. "
          f"{s['reward_gain_ci95'][1]:+.3f})")
    print(f"  KL(policy || reference) {s['kl']:.2f} nats/sample (+- {s['kl_stderr']:.2f}, {s['kl_samples']} samples)")
    print(f"  held-out pair accuracy (implicit reward) {acc}")
    print(f"  {s['train_pairs']} training pairs, {s['train_steps']} steps, {s['elapsed_s']} s in all")
    for ex in s["examples"]:
        print(f"\n  prompt:    {ex['prompt']}\n  reference: {ex['reference'].strip()[:100]!r}\n"
              f"  policy:    {ex['policy'].strip()[:100]!r}")
