"""`preftune advise FILE`: which method to run, from the data's shape and size and the memory budget.

Rules, in order (each recommendation says which fired and why):
  unpaired data (prompt, completion, label)     -> kto (no pairs to compare)
  no room for a reference model                 -> simpo or orpo (reference-free)
  fewer than ~1,000 pairs                       -> ipo (a bounded target: DPO's margin grows without
                                                   limit on small, separable data and overfits)
  otherwise                                     -> sigmoid (DPO)
plus warnings for length bias, duplicates and truncation.

Then numbers, from the method's recipe (preftune.core.recipes: lr, beta, batch, LoRA rank and targets,
how confident the recipe is, the figures it reached and the budget it states, or a line saying it
states none), epochs from the data size (`epochs_for`), and the expected peak memory
(`peak_memory_gb`) for the data's token lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..core.chunking import block_tokens
from ..core.losses import LOSSES
from ..core.recipes import load_recipe

__all__ = ["Advice", "advise", "memory_estimate_gb", "peak_memory_gb", "rl_memory_gb", "epochs_for", "pair_tokens",
           "SMALL_DATA_PAIRS", "MIN_STEPS", "MAX_EPOCHS"]

SMALL_DATA_PAIRS = 1000
LENGTH_BIAS = 0.6  # chosen longer in more than this fraction of pairs
# Epochs: enough passes for about MIN_STEPS optimizer steps (the measured runs behind the recipes
# gained from 40-100 steps), never more than MAX_EPOCHS (the drift checks fired within one epoch
# of 612 TruthfulQA pairs at lr 5e-4: repeating small data overfits first).
MIN_STEPS, MAX_EPOCHS = 50, 3
# Peak memory: weights (memory_estimate_gb), activations per token of a micro-batch per decoder
# layer per unit of layer_width (residual + MLP + attention q/k/v widths), the LM head's block
# (HEAD_BUFFERS float32 copies of positions x vocabulary, the block capped at 2**26 logits) and the
# process's fixed cost. Fitted, minimising the largest relative error, to fourteen benchmarks/scaling
# points on jemalloc (the command's allocator when installed; glibc's defaults peak up to 1.6x
# higher, PREFTUNE_MALLOC=fast up to 1.3x, see utils/allocator.py), LoRA q/v, batch 4, packed rows
# with block attention, chunked head: SmolLM2-135M (30 x 576, MLP 1536, q/k/v 960, 49k vocabulary)
# without checkpointing at 256, 1024 and 2048 tokens per pair (2.32, 5.86, 10.57 GiB), with it at
# 1024, 2048, 4096 and 8192 (1.68, 1.99, 2.94, 5.01), Gemma 3 270M (18 x 640, MLP 2048, q/k/v 1536,
# 262k vocabulary, blocks of 256) without at 512, 1024, 2048 (4.41, 6.71, 11.59) and with at 512,
# 1024, 2048, 4096 (2.32, 2.42, 2.75, 3.89): every point within 10% (worst -9.8%, Gemma at 4096
# with checkpointing). The constants are a fit, not a census of tensors (the fixed costs come out
# as zero because the fit trades them against the head); two models were measured: treat it as +-30%.
ACT_BYTES = {False: 14.5, True: 1.25}
RUNTIME_GB = {False: 0.0, True: 0.0}
HEAD_BUFFERS = 4.25


@dataclass
class Advice:
    loss: str
    reasons: list[str]
    overrides: list[str]
    warnings: list[str] = field(default_factory=list)
    recipe: str = ""  # the recipe the numbers come from (`-c recipe:NAME`)
    settings: dict = field(default_factory=dict)  # the numbers, by name
    memory: dict = field(default_factory=dict)  # expected peak memory (GB) and its parts
    confidence: str = ""
    evidence: list = field(default_factory=list)
    budget: dict = field(default_factory=dict)  # the recipe's `recipe.budget` (benchmarks/quality/protocol.py)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        lines = [f"recommended: loss.name={self.loss}"] + [f"  because {r}" for r in self.reasons]
        s = self.settings
        if s:
            lora = f"LoRA r{s['lora_r']} on {','.join(map(str, s['lora_target_modules']))}" if s["lora"] else \
                "full fine-tuning"
            lines.append(f"  settings: lr {s['lr']:g}, beta {s['beta']:g}, {s['epochs']} epoch(s) = {s['steps']} "
                         f"steps of {s['batch_size']}, {lora}")
        if self.memory:
            m = self.memory
            lines.append(f"  expected peak memory: ~{m['peak_gb']:.1f} GB (weights, optimizer and runtime {m['fixed_gb']:.1f}, "
                         f"activations {m['activations_gb']:.1f} for {m['batch_size']} x ~{m['tokens_per_item']} tokens, "
                         f"LM head {m.get('head_gb', 0.0):.1f}); "
                         f"with model.gradient_checkpointing=true ~{m['peak_gb_checkpointing']:.1f} GB (+-30%)")
        if self.recipe or self.overrides:
            head = [f"preftune train -c recipe:{self.recipe}"] if self.recipe else []
            lines.append("  start from: " + " ".join([*head, *self.overrides]))
        if self.confidence:
            lines.append(f"  confidence: {self.confidence}")
        if self.recipe:
            lines += _recipe_lines(self.evidence, self.budget)
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _recipe_lines(evidence: list, budget: dict) -> list[str]:
    """What the recipe's metadata states, and no more: one line per measured run (or one saying
    there is none), then its budget in protocol.py's keys (or one line saying it states none)."""
    lines = [f"    measured: {_evidence_line(e)}" for e in evidence] or ["  evidence: the recipe states none"]
    if not budget:
        return [*lines, "  budget: the recipe states none"]
    # `preftune train -c recipe:NAME` does not apply it (metadata); the quality benchmark's --full-train does
    stated = "; ".join(f"{k}: {_plain(v)}" for k, v in budget.items())
    return [*lines, f"  stated budget (benchmarks.quality --full-train applies it, preftune train does not): {stated}"]


def _plain(value) -> str:
    """A metadata value as YAML writes it: lists joined by commas, true/false in lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_plain, value))
    return str(value)


def _evidence_line(e: dict) -> str:
    """One measured run: its data, the figures phrased where their names are known, then any other
    figure the entry states under its own name (the command and grid points are left to the file)."""
    parts, shown = [str(e.get("data", "?"))], {"data", "command", "note"}
    for base, after, words in (("base_logp_accuracy", "implicit_accuracy",
                                ("base model's log-prob accuracy {} -> ", "trained implicit-reward accuracy {}")),
                               ("base_avg_logp_accuracy", "avg_logp_accuracy",
                                ("average-log-prob accuracy {} -> ", "{}"))):
        if after in e:
            parts.append((words[0].format(e[base]) if base in e else "") + words[1].format(e[after]))
            shown |= {base, after}
    if "gain" in e:
        parts.append(f"gain {e['gain']}")
    # figures without a phrase above (orpo's base_mean_logp_accuracy, gain_over_own_start, ...)
    shown |= {"gain", "chosen", "grid", "kl", "health"}
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in e.items() if k not in shown and not isinstance(v, (dict, list))]
    if isinstance(e.get("chosen"), dict):
        parts.append("chose " + ", ".join(f"{k} {v}" for k, v in e["chosen"].items()))
    elif "grid" in e:
        parts.append(f"no point of {len(e['grid'])} chosen (each raised a health flag or did not gain)")
    if "kl" in e:
        parts.append(f"KL {e['kl']} nats")
    if e.get("health"):
        parts.append("health: " + "; ".join(map(str, e["health"])))
    elif "health" in e:
        parts.append("no health flag")
    if len(parts) == 1 and e.get("note"):
        parts.append(str(e["note"]))
    return ", ".join(parts)


def epochs_for(records: int, batch_size: int) -> int:
    """Passes over `records` examples for about MIN_STEPS optimizer steps, between 1 and MAX_EPOCHS."""
    steps_per_epoch = max(1, math.ceil(records / batch_size))
    return max(1, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))


def pair_tokens(stats: dict, *, max_length: int, max_prompt_length: int) -> int:
    """Tokens one training item occupies in a packed micro-batch (90th percentiles, after the cut):
    a pair shares its prompt (prompt + chosen + rejected); an unpaired (KTO) example shares its
    prompt with its mismatched KL row (prompt + two completions)."""
    return sum(_item_parts(stats, max_length=max_length, max_prompt_length=max_prompt_length))


def _item_parts(stats: dict, *, max_length: int, max_prompt_length: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of one training item, as pair_tokens counts them."""
    prompt = min(stats.get("prompt_tokens", {}).get("p90", 0), max_prompt_length)
    room = max(0, max_length - prompt)
    if stats.get("kind") == "unpaired":
        return prompt, 2 * min(stats.get("completion_tokens", {}).get("p90", 0), room)
    return prompt, sum(min(stats.get(k, {}).get("p90", 0), room) for k in ("chosen_tokens", "rejected_tokens"))


def layer_width(hidden: int, intermediate: int, attention: int = 0) -> int:
    """What a decoder layer's activations per token scale with: the residual width, the MLP's
    (3 x hidden when the config does not say: SmolLM2 has 2.7x, Gemma 3 270M 3.2x) and the
    attention's query, key and value widths (model_shape's `attention`; 2 x hidden when unknown:
    SmolLM2 has 1.7x, Gemma 3 270M 2.4x)."""
    return hidden + (intermediate or 3 * hidden) + (attention or 2 * hidden)


def activations_gb(tokens: int, layers: int, hidden: int, intermediate: int, checkpointing: bool,
                   attention: int = 0) -> float:
    """The activations of `tokens` tokens of one micro-batch, ACT_BYTES per token, layer and unit
    of layer_width."""
    return tokens * layers * layer_width(hidden, intermediate, attention) * ACT_BYTES[checkpointing] / 2**30


DEFAULT_CHUNK_TOKENS = TrainConfig().logprob_chunk_tokens  # config, not core.logprobs: advise loads no torch


def head_memory_gb(vocab: int, completion_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> float:
    """The LM head's working memory: HEAD_BUFFERS float32 arrays of (positions x vocabulary) for
    the completion positions of one block of the chunked head (`chunk_tokens`,
    train.logprob_chunk_tokens, capped by core.chunking.block_tokens for wide vocabularies), or of
    all of them with the dense head (0)."""
    positions = completion_tokens if chunk_tokens == 0 else min(completion_tokens, block_tokens(chunk_tokens, vocab))
    return positions * vocab * 4 * HEAD_BUFFERS / 2**30


def peak_memory_gb(params: int, *, lora: bool, reference: bool, layers: int, hidden: int, tokens: int,
                   checkpointing: bool = False, vocab: int = 0, completion_tokens: int = 0,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, intermediate: int = 0, attention: int = 0) -> dict:
    """Expected peak training memory: weights/gradients/optimizer (memory_estimate_gb), the
    activations of `tokens` tokens in a micro-batch (layer_width(hidden, intermediate, attention) per layer),
    the LM head's block over `vocab` for its `completion_tokens` (head_memory_gb), and the
    process's fixed cost."""
    fixed = memory_estimate_gb(params, lora=lora, reference=reference) + RUNTIME_GB[checkpointing]
    acts = activations_gb(tokens, layers, hidden, intermediate, checkpointing, attention)
    head = head_memory_gb(vocab, completion_tokens, chunk_tokens)
    return {"fixed_gb": fixed, "activations_gb": acts, "head_gb": head, "peak_gb": fixed + acts + head}


def memory_estimate_gb(params: int, *, lora: bool, reference: bool) -> float:
    """fp32 training memory before activations: weights (4 B/param), and for full fine-tuning
    gradients (4) and AdamW moments (8); a frozen reference copy adds 4 more. LoRA's reference is
    the same weights with adapters off, so it costs nothing."""
    per_param = 4 if lora else 16
    if reference and not lora:
        per_param += 4
    return params * per_param / 2**30


def rl_memory_gb(params: int, *, lora: bool, critic: str, reward_params: int, layers: int, hidden: int,
                 tokens: int, checkpointing: bool = False, vocab: int = 0, completion_tokens: int = 0,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, intermediate: int = 0, attention: int = 0) -> dict:
    """Expected peak memory of the RLHF loop's four models (preftune ppo, grpo): the policy
    (memory_estimate_gb: with LoRA its reference is the same weights, adapters off; in full a
    frozen copy), the critic (`critic`: "separate" is another copy of the trunk, trained like the
    policy; "shared" a head on the policy's trunk; "none" for RLOO, REINFORCE++, GRPO), the reward
    model's fp32 weights (`reward_params`, 0 for a function or a judge), and the activations of
    one micro-batch of `tokens` padded tokens, twice with a critic (its own forward and backward,
    or its second pass over the shared trunk), the LM head's block for its `completion_tokens`
    (head_memory_gb), plus the process's fixed cost."""
    parts = {"policy_and_reference_gb": memory_estimate_gb(params, lora=lora, reference=True),
             "critic_gb": memory_estimate_gb(params, lora=lora, reference=False) if critic == "separate" else 0.0,
             "reward_model_gb": reward_params * 4 / 2**30, "runtime_gb": RUNTIME_GB[checkpointing]}
    passes = 1 if critic == "none" else 2
    parts["activations_gb"] = passes * activations_gb(tokens, layers, hidden, intermediate, checkpointing, attention)
    parts["head_gb"] = head_memory_gb(vocab, completion_tokens, chunk_tokens)  # the policy's per-token log-probs
    return {**parts, "peak_gb": sum(parts.values())}


def advise(stats: dict, *, params: int, memory_gb: float | None, lora: bool, shape: dict | None = None,
           max_length: int | None = None, max_prompt_length: int | None = None,
           chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Advice:
    """`stats` from data.inspect.inspect_records; `params` the model's parameter count; `shape`
    the model's {"layers", "hidden"[, "vocab"]} (no memory figure without it), which needs the
    run's data.max_length and data.max_prompt_length; `chunk_tokens` its train.logprob_chunk_tokens."""
    reasons, warnings, overrides = [], [], []
    n = stats["records"]
    with_ref = memory_estimate_gb(params, lora=lora, reference=True)
    without_ref = memory_estimate_gb(params, lora=lora, reference=False)
    if stats["kind"] == "unpaired":
        loss = "kto"
        reasons.append(f"the data is unpaired ({stats['desirable']} desirable / {stats['undesirable']} undesirable "
                       "examples): KTO learns from single labelled completions")
        frac = stats["desirable_fraction"]
        if not 0.4 <= frac <= 0.6:
            overrides.append("loss.kto_auto_weights=true")
            reasons.append(f"labels are imbalanced ({frac:.0%} desirable): weight the classes equally")
    elif memory_gb is not None and with_ref > memory_gb >= without_ref:
        loss = "simpo"
        reasons.append(f"a reference copy does not fit: about {with_ref:.1f} GB with it vs {memory_gb:g} GB "
                       f"available ({without_ref:.1f} GB without); SimPO and ORPO need no reference "
                       "(or use LoRA: its reference is the same weights with adapters off)")
    elif n < SMALL_DATA_PAIRS:
        loss = "ipo"
        reasons.append(f"{n} pairs is a small set (< {SMALL_DATA_PAIRS}): DPO's loss keeps pushing margins "
                       "on separable pairs and overfits; IPO regresses the margin to a fixed target")
    else:
        loss = "sigmoid"
        reasons.append(f"{n} preference pairs: standard DPO (sigmoid loss) is the well-tested default")
    if memory_gb is not None and without_ref > memory_gb:
        warnings.append(f"even without a reference, training needs about {without_ref:.1f} GB > {memory_gb:g} GB: "
                        "use LoRA (model.lora=true) or a smaller model")
    bias = stats.get("length_bias", {}).get("chosen_longer")
    if bias is not None and bias > LENGTH_BIAS:
        warnings.append(f"chosen is longer in {bias:.0%} of pairs: DPO will learn 'longer is better'; watch "
                        "length_drift, or consider simpo (length-normalised reward)")
    for key, what in (("identical_pairs", "identical chosen/rejected pairs teach nothing"),
                      ("duplicate_pairs", "duplicate pairs weigh some examples twice")):
        if stats.get(key):
            warnings.append(f"{stats[key]} {what}")
    truncated = stats.get("truncated")
    cut = truncated.get("pairs") if isinstance(truncated, dict) else truncated
    if cut and cut > 0.05 * n:
        warnings.append(f"{cut} of {n} records are truncated at the configured lengths: raise data.max_length")
    return _with_numbers(Advice(loss, reasons, overrides, warnings), stats, params=params, memory_gb=memory_gb,
                         lora=lora, shape=shape, max_length=max_length, max_prompt_length=max_prompt_length,
                         chunk_tokens=chunk_tokens)


def _with_numbers(a: Advice, stats: dict, *, params: int, memory_gb: float | None, lora: bool, shape: dict | None,
                  max_length: int | None, max_prompt_length: int | None, chunk_tokens: int) -> Advice:
    """The recipe's settings for the chosen method, epochs for the data size, the expected memory."""
    recipe = load_recipe(a.loss)
    a.recipe = recipe.name
    a.confidence = str(recipe.meta.get("confidence", "")).strip()
    if not recipe.meta.get("tuned"):
        a.confidence = a.confidence or "low: the recipe was not tuned"
    a.evidence = list(recipe.meta.get("evidence") or [])
    a.budget = dict(recipe.meta.get("budget") or {})
    batch = int(recipe.get("train.batch_size", 4))
    epochs = epochs_for(stats["records"], batch)
    lr = float(recipe.get("train.lr"))
    if not lora:  # the recipes are LoRA's; full updates move every weight: the project's 10x smaller step
        lr /= 10
        a.reasons.append(f"full fine-tuning: lr {lr:g}, 10x below the recipe's LoRA rate")
    a.settings = {"lr": lr, "beta": float(recipe.get("loss.beta", 0.1)), "epochs": epochs, "batch_size": batch,
                  "steps": epochs * max(1, math.ceil(stats["records"] / batch)), "lora": lora,
                  "lora_r": recipe.get("model.lora_r", 16),
                  "lora_target_modules": recipe.get("model.lora_target_modules", ["q_proj", "v_proj"])}
    a.overrides = [f"train.epochs={epochs}", *([f"train.lr={lr:g}", "model.lora=false"] if not lora else []),
                   *a.overrides]
    if shape:
        if max_length is None or max_prompt_length is None:
            raise ValueError("a memory figure (shape) needs max_length and max_prompt_length")
        needs_reference = LOSSES[a.loss].needs_reference
        prompt, completions = _item_parts(stats, max_length=max_length, max_prompt_length=max_prompt_length)
        tokens, head = (prompt + completions) * batch, dict(completion_tokens=completions * batch,
                                                            chunk_tokens=chunk_tokens)
        plain = peak_memory_gb(params, lora=lora, reference=needs_reference, tokens=tokens, **head, **shape)
        ckpt = peak_memory_gb(params, lora=lora, reference=needs_reference, tokens=tokens, checkpointing=True,
                              **head, **shape)
        a.memory = {**plain, "peak_gb_checkpointing": ckpt["peak_gb"], "batch_size": batch,
                    "tokens_per_item": tokens // batch}
        if memory_gb is not None and plain["peak_gb"] > memory_gb:
            fix = ("add model.gradient_checkpointing=true" if ckpt["peak_gb"] <= memory_gb else
                   "lower train.batch_size (raise train.grad_accum to keep the batch) or data.max_length")
            a.warnings.append(f"the expected peak (~{plain['peak_gb']:.1f} GB) exceeds {memory_gb:g} GB: {fix}")
    return a
