"""Sampling and decoding from a model, and loading a finished run's policy and reference.

Every path that samples (iterative/online sources, evaluation, probes, the demo, sft-pairs)
goes prompt -> the one rendering (data/render.py) -> `sample_completions` -> decode, here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import load_config
from ..data import render
from ..utils.errors import ConfigError
from ..utils.progress import progress
from ..utils.sharding import unsharded_root
from .loading import AdaptersOffReference, FrozenCopyReference, load_model, load_tokenizer, resolve_model_dir
from .sampler import sample

__all__ = ["sample_completions", "decode_completions", "sample_texts", "run_models", "load_run_policy", "load_policy"]


def decode_completions(tokenizer, samples) -> list[str]:
    """The text of each sampled completion, without its EOS."""
    eos = tokenizer.eos_token_id
    return [tokenizer.decode([t for t in c if t != eos]) for _, c in samples]


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[list[int]], *, n: int, max_new_tokens: int, seed: int,
                       temperature: float = 1.0, batch_size: int = 64, top_p: float = 1.0,
                       top_k: int = 0, with_logps: bool = False, engine=None) -> list:
    """`n` samples per prompt through the one sampler (sampler.py: each prompt prefilled once for
    its n samples, rows bucketed by length, each row leaving at its EOS, one random stream per
    (seed, prompt, sample)). Defaults are pure sampling (no top-k/top-p), as KL estimates need.

    Returns (prompt_ids, completion_ids) with completions cut after the first EOS (kept), prompt-major;
    `with_logps`: the sampler's `Sample`s instead, with the model's per-token log-probs.
    `engine` (a vllm_engine.VLLMEngine): sample there instead, from the weights last pushed to it
    (the caller's `engine.sync(model, step)`); `model` is not run.
    """
    if engine is not None:
        samples = engine.sample(prompts, n=n, max_new_tokens=max_new_tokens, seed=seed,
                                eos_id=tokenizer.eos_token_id, temperature=temperature, top_p=top_p, top_k=top_k)
        return samples if with_logps else [(s.prompt, s.completion) for s in samples]
    with unsharded_root(model):
        samples = sample(model, prompts, n=n, max_new_tokens=max_new_tokens, seed=seed,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, temperature=temperature,
                         top_p=top_p, top_k=top_k, max_rows=batch_size,
                         progress=lambda batches, rows: progress(batches, total=len(prompts) * n, desc="sampling",
                                                                 unit="samples", weights=rows))
    return samples if with_logps else [(s.prompt, s.completion) for s in samples]


def sample_texts(model, tokenizer, prompts: list, *, n: int, max_new_tokens: int, seed: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, engine=None) -> tuple[list, list[str]]:
    """Render each prompt (text or chat messages), sample `n` completions of each, decode them:
    (samples as (prompt_ids, completion_ids), texts), both prompt-major (n per prompt)."""
    ids = [render.prompt_ids(tokenizer, p) for p in prompts]
    samples = sample_completions(model, tokenizer, ids, n=n, max_new_tokens=max_new_tokens, seed=seed,
                                 temperature=temperature, top_p=top_p, top_k=top_k, engine=engine)
    return samples, decode_completions(tokenizer, samples)


def run_models(cfg, run_dir: str | Path, base_model) -> tuple:
    """A trained run's policy and the reference it was trained against: a frozen copy of
    `model.reference_name_or_path` when the run had one (iterative rounds), else the policy with
    adapters off (LoRA) or a frozen copy of the starting weights `base_model` (full fine-tuning)."""
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
        from peft import PeftModel  # peft loads only for adapter runs

        if not (model_dir / "adapter_model.safetensors").is_file():
            if not allow_pickle_weights or not (model_dir / "adapter_model.bin").is_file():
                raise ConfigError(str(model_dir), "adapter", "no adapter_model.safetensors" + (
                    " (only pickle adapter_model.bin; set model.allow_pickle_weights=true to load it with "
                    "weights_only=True)" if (model_dir / "adapter_model.bin").is_file() else ""))
        return PeftModel.from_pretrained(base_model, str(model_dir), is_trainable=is_trainable)
    return load_model(str(model_dir), allow_pickle_weights=allow_pickle_weights)


def load_policy(name_or_run: str, *, allow_pickle_weights: bool = False) -> tuple:
    """(model in eval mode, tokenizer) of a finished run directory (its model/: adapter or full
    model, on the base model its config.yaml names) or of anything `model.name_or_path` takes."""
    run = Path(name_or_run)
    if (run / "config.yaml").is_file() and (run / "model").is_dir():
        m = load_config(run / "config.yaml", saved_run=True).model  # the opt-in is the caller's, not the run's
        base_dir = resolve_model_dir(m.name_or_path, allow_pickle_weights=allow_pickle_weights)
        model = load_run_policy(run, load_model(base_dir, allow_pickle_weights=allow_pickle_weights),
                                allow_pickle_weights=allow_pickle_weights)
        return model.eval(), load_tokenizer(base_dir)
    model_dir = resolve_model_dir(name_or_run, allow_pickle_weights=allow_pickle_weights)
    return load_model(model_dir, allow_pickle_weights=allow_pickle_weights).eval(), load_tokenizer(model_dir)
