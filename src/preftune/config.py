"""Typed configuration: dataclasses nested by concern, YAML plus dotted overrides, strict keys.

Defaults live here and only here. `load_config` raises `ConfigError` naming the file (or the
command line) and the dotted key for unknown keys, wrong types and out-of-range values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .core.diagnostics import CHECKS, THRESHOLDS
from .core.losses import (  # the registry is the single source of loss names
    ALIASES,
    LOSSES,
    build_loss,
    range_problem,
)
from .core.recipes import PREFIX as RECIPE_PREFIX
from .core.recipes import load_recipe, recipe_name, recipe_path
from .data.pairs import JUDGE_MODES, PAIRINGS
from .data.sources import FILE_KINDS, FORMATS, UNPAIRED_FORMATS
from .utils.errors import ConfigError, DataError
from .utils.safeio import load_yaml
from .utils.version import __version__

__all__ = [
    "ModelConfig", "DataConfig", "LossConfig", "TrainConfig", "EvalConfig", "RunConfig", "SamplingConfig",
    "Config", "load_config", "opt_in_keys", "HF_ALIASES", "save_config", "config_to_dict", "fields_where", "run_name",
]


def _f(default: Any, help: str, *, resume: bool = True, tokens: bool = False, opt_in: bool = False,  # noqa: A002
       bounds: tuple | None = None):
    """A dataclass field with a one-line help (mutable defaults are copied per instance) and the
    facts the rest of the package reads from here instead of keeping its own list:
    `resume=False`: changing it does not block resuming a checkpoint (checkpoint.fingerprint);
    `tokens=True`: it changes which tokens a pair has (the reference-cache key, refcache.py);
    `opt_in=True`: a security opt-in, taken from the command line or the user's own config file,
    never from a run directory's saved config.yaml (load_config(saved_run=True));
    `bounds`: a loss setting's range (core.losses.setting), checked by _range_problems."""
    meta = {"help": help, "resume": resume, "tokens": tokens, "opt_in": opt_in, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def fields_where(section, flag: str) -> tuple[str, ...]:
    """Names of a config section's fields whose metadata `flag` is true (see `_f`)."""
    return tuple(f.name for f in dataclasses.fields(section) if f.metadata.get(flag, flag == "resume"))


@dataclass
class ModelConfig:
    name_or_path: str = _f("smollm2-135m-instruct", "local HF dir, .gguf file, hub id, or the embedded default")
    dtype: str = _f("float32", "float32 | bfloat16 (bf16 only where the hardware supports it)")
    lora: bool = _f(True, "train LoRA adapters (reference = adapters off); false = full fine-tuning")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    lora_target_modules: list = _f(["q_proj", "v_proj"], "module names that receive adapters")
    trust_remote_code: bool = _f(False, "run code shipped with a model repo (off unless you ask; never taken "
                                        "from a run directory's config.yaml)", opt_in=True)
    allow_pickle_weights: bool = _f(False, "accept .bin (pickle) weights, loaded with weights_only=True (never "
                                           "taken from a run directory's config.yaml)", opt_in=True)
    reference_name_or_path: str = _f("", "reference model, if not the starting weights (a frozen copy; iterative DPO)")
    adapter_name_or_path: str = _f("", "start from this PEFT (SFT) adapter; the reference is the SFT-adapted model")
    adapter_merge: bool = _f(True, "merge the SFT adapter and train a new LoRA on top (false: keep training "
                                   "the SFT adapter itself, against a frozen merged copy)")
    revision: str = _f("", "hub revision (branch, tag or commit) of model and tokenizer")
    attn_implementation: str = _f("", "attention kernel: eager | sdpa | flash_attention_2 | flex_attention "
                                      "(empty: transformers' default)")
    load_in_4bit: bool = _f(False, "QLoRA: the base weights load as frozen 4-bit blocks (bitsandbytes) and LoRA trains "
                                   "on top; reference = adapters off. Needs model.lora=true (README, Speed)")
    bnb_4bit_quant_type: str = _f("nf4", "QLoRA's 4-bit format: nf4 | fp4")
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer's activations in the backward pass: "
                                             "less memory, more time (README, Speed)", resume=False)


@dataclass
class DataConfig:
    train_path: str = _f("", f"training data: {FILE_KINDS}, a saved HF dataset dir (DIR or "
                             "DIR:SPLIT), or a hub dataset org/name[:config][:split] (needs the hub)")
    revision: str = _f("", "hub datasets: the branch, tag or commit to read (empty: the default branch)", resume=False)
    eval_path: str = _f("", "held-out data in the same forms (optional)", resume=False)
    format: str = _f("auto", "auto | " + " | ".join([*FORMATS, *UNPAIRED_FORMATS]), tokens=True)
    column_map: dict = _f({}, "rename source columns to prompt/chosen/rejected, e.g. {question: prompt}", tokens=True)
    max_length: int = _f(512, "max tokens of prompt + completion", tokens=True)
    max_prompt_length: int = _f(256, "prompts longer than this keep their last tokens", tokens=True)
    max_records: int = _f(0, "use only the first N records (0 = all)", tokens=True)
    drop_overlong: bool = _f(False, "drop pairs that cannot fit instead of stopping (dropped rows are counted)", tokens=True)
    allow_degenerate: bool = _f(False, "keep pairs whose chosen and rejected tokenize identically", tokens=True)
    allow_empty_completions: bool = _f(False, "keep empty completions as EOS-only (they are counted)", tokens=True)
    paired_to_unpaired: bool = _f(False, "for unpaired losses (kto): split each pair into two labelled examples")
    drop_eval_prompts: bool = _f(False, "drop training rows whose prompt appears in data.eval_path (counted)")
    layout: str = _f("packed", "packed: every pair of a micro-batch in one row, no padding | padded: 2B padded rows", resume=False)
    prefix_sharing: bool = _f(True, "packed: the prompt is processed once; chosen and rejected attend to it", resume=False)
    hh_as_chat: bool = _f(False, "hh: render Human/Assistant turns as chat messages with the model's template", tokens=True)
    streaming: bool = _f(False, "read, validate and tokenize train_path as training consumes it (memory: the shuffle "
                                "buffer, not the file); needs train.max_steps (docs/guide/training.md, Streaming)")
    shuffle_buffer: int = _f(10000, "streaming with train.shuffle: records in the seeded shuffle buffer (datasets' "
                                    "buffer_size); a local shuffle, so a sorted file stays roughly sorted")


def _loss_config():
    """LossConfig: name, beta and mix, then every registered loss's settings (its settings
    dataclass, next to its registration in core/losses), once each, in registration order, the
    help naming the losses that read it. A setting two losses declare differently is an error."""
    found, users = {}, {}
    for spec in LOSSES.values():
        for f in dataclasses.fields(spec.settings) if spec.settings is not None else ():
            if f.name in found and (found[f.name].default, dict(found[f.name].metadata)) != (f.default, dict(f.metadata)):
                raise ValueError(f"loss setting {f.name!r} is declared twice, differently ({spec.name})")
            found.setdefault(f.name, f)
            users.setdefault(f.name, []).append(spec.name)
    cls = dataclasses.make_dataclass("LossConfig", [
        ("name", str, _f("sigmoid", "loss from the registry (preftune.core.losses.LOSSES)")),
        ("beta", float, _f(0.1, "inverse temperature of the implicit reward (ORPO: lambda), > 0")),
        ("mix", list, _f([], "weighted sum of paired losses, e.g. [[sigmoid, 1.0], [sft, 0.2]] (RPO); overrides name")),
        *((name, f.type, _f(f.default, f"{'/'.join(users[name])}: {f.metadata['help']}", bounds=f.metadata["bounds"]))
          for name, f in found.items()),
    ])
    cls.__module__ = __name__
    return cls


LossConfig = _loss_config()


@dataclass
class TrainConfig:
    lr: float = _f(0.0, "peak learning rate; 0 = the default for the setup: the loss's recipe "
                        "(preftune/core/recipes/<loss>.yaml) with LoRA and a tenth of it for full fine-tuning (full updates "
                        "move every weight, so they take a 10x smaller step); 5e-5 / 5e-6 for a loss without a recipe")
    batch_size: int = _f(4, "pairs per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    epochs: int = _f(1, "passes over the training data")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run the epochs)")
    warmup_ratio: float = _f(0.1, "fraction of steps with linear warmup, in [0, 1)")
    scheduler: str = _f("cosine", "cosine | linear | constant (after warmup)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "clip the global grad norm to this (0 = no clipping)")
    seed: int = _f(42, "seed for init, shuffling and dropout")
    log_every: int = _f(1, "write metrics every N optimizer steps", resume=False)
    checkpoint_every: int = _f(0, "save a resumable checkpoint every N optimizer steps (0 = never)", resume=False)
    keep_last: int = _f(2, "checkpoints kept on disk (the newest is never deleted)", resume=False)
    autocast_bf16: bool | str = _f("auto", "bf16 autocast for the transformer body, LM head and log-softmax in "
                                           "fp32: true | false | auto (on for a CUDA device with bf16, off on CPU: "
                                           "see docs/guide/speed-and-memory.md, bf16)")
    logprob_chunk_tokens: int = _f(1024, "completion tokens per block of the chunked LM head, at most 2**26 logits "
                                         "per block (256 for a 262k vocabulary): logits are recomputed block by "
                                         "block in backward, never kept for all tokens (same numbers); 0 = the "
                                         "dense head", resume=False)
    shuffle: bool = _f(True, "reshuffle the training data every epoch (false: file order)")
    keep_best: bool = _f(False, "end at the probe with the best held-out accuracy (never one where a stop_on check "
                                "fired): its weights are kept (RUN/best/) and restored before the final save "
                                "(needs diagnostics.probe_every and data.eval_path)")
    reference_cache: bool = _f(False, "compute reference logps once, cache them on disk, never run the reference "
                                      "during training (reused across epochs and runs)", resume=False)
    report_to: list = _f([], "trackers through Accelerate: tensorboard, wandb, mlflow, ... (logs go under the run)", resume=False)
    tracker_project: str = _f("preftune", "tracker project: W&B/trackio project, MLflow experiment, ... (runs are "
                                          "named by run.name)", resume=False)


@dataclass
class EvalConfig:
    batch_size: int = _f(8, "pairs per evaluation batch")
    kl_prompts: int = _f(-1, "held-out prompts sampled for the KL(policy || reference) estimate (-1: half the "
                             "held-out prompts, 4 to 16, so a toy eval is not mostly sampling; 0: none)")
    kl_samples: int = _f(2, "samples per prompt for the KL estimate")
    max_new_tokens: int = _f(48, "tokens sampled per completion for the KL estimate")
    reuse_reference_logps: bool = _f(True, "an eval without --run stores the base model's log-probs in the reference "
                                           "cache (keyed by its weights); an eval of a run reads them from there "
                                           "when they cover the pairs (one forward per pair, not two), else runs "
                                           "its reference live and stores those for the next eval")


# the health-check thresholds are owned by their registry (diagnostics.THRESHOLDS); the probe
# settings and stop_on are the loop's
DiagnosticsConfig = dataclasses.make_dataclass("DiagnosticsConfig", [
    *((name, type(th.default), _f(th.default, th.help)) for name, th in THRESHOLDS.items()),
    ("probe_every", int, _f(25, "every N steps (and at the last) sample from the policy for KL and lengths, and "
                                "score eval pairs (0 = never)")),
    ("probe_prompts", int, _f(-1, "prompts sampled per probe (eval prompts if data.eval_path is set, else train; "
                                  "-1: 8, or for a run under 16 steps a quarter of its steps, at least 2)")),
    ("probe_eval_pairs", int, _f(64, "held-out pairs scored per probe (the first N of data.eval_path)")),
    ("stop_on", list, _f([], "health checks that end training early, e.g. [kl_drift, eval_regressing]")),
])
DiagnosticsConfig.__module__ = __name__


@dataclass
class OnlineConfig:
    prompts_path: str = _f("", "prompts to generate from: .txt (one per line) or a file with a `prompt` column")
    eval_prompts_path: str = _f("", "held-out prompts for the per-round reward and KL (optional)")
    reward: str = _f("sentiment", "reward source, KIND or KIND:ARG: one of the reward kinds "
                                  "(docs/reference/registries.md; e.g. sentiment, fn:module:func, rm:DIR)")
    reward_ensemble: list = _f([], "weighted sources instead of online.reward, e.g. [[sentiment, 1.0], [judge:URL, 0.5]]")
    disagreement_penalty: float = _f(0.0, "ensemble: subtract this times the spread of the members' z-scores "
                                          "(each member standardised over the batch)")
    length_penalty: float = _f(0.0, "subtract this times the completion's word count from every score")
    judge_mode: str = _f("score", "judge: score (one 1-10 rating per sample) | pairwise (every two samples of a "
                                  "prompt compared in both orders; position-inconsistent verdicts dropped)")
    judge_timeout_s: float = _f(60.0, "judge: seconds per HTTP request")
    judge_retries: int = _f(3, "judge: tries after the first (timeouts, HTTP 429/5xx, malformed JSON)")
    judge_backoff_s: float = _f(0.5, "judge: first backoff; doubles on every retry")
    samples_per_prompt: int = _f(4, "completions sampled per prompt")
    temperature: float = _f(1.0, "sampling temperature, > 0")
    top_p: float = _f(1.0, "nucleus sampling mass, in (0, 1]")
    top_k: int = _f(0, "sample among the k most likely tokens (0 = all)")
    max_new_tokens: int = _f(32, "tokens generated per completion")
    pairing: str = _f("best_worst", "best_worst: one pair per prompt | all_pairs: every pair with different scores")
    min_margin: float = _f(0.0, "drop pairs whose score difference is below this (ties are always dropped)")
    rounds: int = _f(3, "iterative mode: generate -> score -> pair -> train rounds")
    refresh_reference: bool = _f(False, "iterative: each round's reference is the previous round's policy")
    prompts_per_step: int = _f(8, "online mode: prompts generated and paired for each optimizer step")
    eval_samples: int = _f(4, "samples per held-out prompt for the per-round reward and KL")
    scale_rewards: bool = _f(True, "grpo: divide each group's centred rewards by the group's std (false: Dr. GRPO)")
    grpo_iterations: int = _f(1, "grpo: optimisation passes (micro-batches) over each batch of samples (mu); > 1 "
                                 "clips the ratio against the sampling policy's log-probs")


@dataclass
class PPOConfig:
    kl_coef: float = _f(0.05, "ppo/rloo/reinforce_pp: weight of the per-token KL estimate log pi_old - log pi_ref "
                              "subtracted from the reward (k1; the starting value when ppo.kl_target is set)",
                        bounds=(0.0, None, False, False))
    kl_target: float = _f(0.0, "adaptive KL controller (Ziegler et al. 2019): the KL per completion, in nats, that "
                               "kl_coef is steered to after every batch of samples; 0 = kl_coef fixed",
                          bounds=(0.0, None, False, False))
    kl_horizon: int = _f(10000, "adaptive KL: the controller's horizon, in samples", bounds=(1, None, False, False))
    gamma: float = _f(1.0, "ppo: discount over completion tokens", bounds=(0.0, 1.0, False, False))
    lam: float = _f(0.95, "ppo: GAE lambda", bounds=(0.0, 1.0, False, False))
    epochs: int = _f(4, "optimisation passes over each batch of samples", bounds=(1, None, False, False))
    mini_batches: int = _f(1, "mini-batches each pass splits a batch of samples into, one micro-batch each",
                           bounds=(1, None, False, False))
    whiten_advantages: bool = _f(True, "ppo: normalise the GAE advantages over each batch of samples")
    whiten_rewards: bool = _f(False, "scale the scores of each batch of samples to unit variance (mean kept)")
    reward_clip: float = _f(0.0, "clip each score to [-c, c] before the KL penalty; 0 = off",
                            bounds=(0.0, None, False, False))
    missing_eos_penalty: float = _f(0.0, "subtracted from the score of a completion that did not end with EOS within "
                                         "online.max_new_tokens (e.g. 1.0; 0 = scored as it is)",
                                    bounds=(0.0, None, False, False))
    shared_critic: bool = _f(False, "ppo: the value head on the policy's own trunk (one model, the policy's adapter "
                                    "also learns values) instead of a separate LoRA'd copy of the starting weights")
    critic_from_reward_model: bool = _f(True, "ppo: with online.reward=rm:DIR and a separate critic, start the critic "
                                              "from the reward model's weights and score head (as InstructGPT)")
    reinforce_baseline: bool = _f(False, "reinforce_pp: subtract each prompt's mean score first "
                                         "(REINFORCE++-baseline)")


@dataclass
class RunConfig:
    output_dir: str = _f("runs/latest", "run directory (config.yaml, metrics.jsonl, summary.json, model/)")
    overwrite: bool = _f(False, "replace an existing run directory")
    name: str = _f("", "the run's name in trackers and model cards (empty: the output directory's name)", resume=False)


@dataclass
class SamplingConfig:
    engine: str = _f("builtin", "what samples online DPO and GRPO rollouts: builtin (models/sampler.py) | vllm (a "
                                "vLLM server on loopback, LoRA runs only; docs/guide/vllm.md)")
    vllm_python: str = _f(".venv-vllm/bin/python", "vllm: the Python that runs the server (`make vllm` builds "
                                                   "it; a program to run, so never taken from a run directory's "
                                                   "config.yaml: resume takes it from the command line)",
                          resume=False, opt_in=True)
    vllm_url: str = _f("", "vllm: an already running server (http://HOST:PORT) instead of starting one", resume=False)
    sync_every: int = _f(1, "vllm: push the policy's weights to the server every N optimizer steps")
    vllm_weights: str = _f("auto", "vllm: how the policy reaches the server: lora (its adapter, served by vLLM's "
                                   "LoRA kernels) | merged (the adapter merged into a full copy, reloaded in place: "
                                   "no LoRA cost per token, one weights write per push) | auto (merged on CPU, "
                                   "lora on a GPU)")
    timeout_s: float = _f(300.0, "vllm: the longest wait for the server (start, each request), in seconds",
                          resume=False)
    overlap: bool = _f(False, "vllm, grpo and ppo: draw the next batch of samples while this one trains, one batch "
                              "of samples behind the policy (sampler/staleness_mean), corrected by loss.tis_cap "
                              "(2 when left at 0); docs/guide/vllm.md")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_implementation": ("", "eager", "sdpa", "flash_attention_2", "flex_attention"),
    "model.bnb_4bit_quant_type": ("nf4", "fp4"),
    "data.format": ("auto", *FORMATS, *UNPAIRED_FORMATS),  # owned by the format registry
    "data.layout": ("packed", "padded"),
    "online.pairing": PAIRINGS,  # owned by data/pairs.py
    "online.judge_mode": JUDGE_MODES,  # owned by data/pairs.py
    "train.scheduler": ("cosine", "linear", "constant"),
    "sampling.engine": ("builtin", "vllm"),
    "sampling.vllm_weights": ("auto", "lora", "merged"),
}


def _range_problems(cfg: Config):
    """Yield (dotted key, problem) for every out-of-range value."""
    c = cfg
    checks = [
        ("loss.beta", c.loss.beta > 0 and math.isfinite(c.loss.beta), "must be > 0"),
        ("train.lr", 0 < c.train.lr <= F32_MAX, f"must be a number in (0, {F32_MAX:.3g}] (float32: larger is inf "
                                                "in the optimizer)"),
        ("train.batch_size", c.train.batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", c.train.grad_accum >= 1, "must be >= 1"),
        ("train.epochs", c.train.epochs >= 1, "must be >= 1"),
        ("train.max_steps", c.train.max_steps >= 0, "must be >= 0"),
        ("train.warmup_ratio", 0 <= c.train.warmup_ratio < 1, "must be in [0, 1)"),
        ("train.weight_decay", c.train.weight_decay >= 0, "must be >= 0"),
        ("train.max_grad_norm", c.train.max_grad_norm >= 0, "must be >= 0"),
        ("train.log_every", c.train.log_every >= 1, "must be >= 1"),
        ("train.checkpoint_every", c.train.checkpoint_every >= 0, "must be >= 0"),
        ("train.keep_last", c.train.keep_last >= 1, "must be >= 1"),
        ("train.autocast_bf16", isinstance(c.train.autocast_bf16, bool) or c.train.autocast_bf16 == "auto",
         "must be true, false or auto"),
        ("train.logprob_chunk_tokens", c.train.logprob_chunk_tokens >= 0, "must be >= 0 (0 = the dense head)"),
        ("train.keep_best", not c.train.keep_best or c.diagnostics.probe_every > 0,
         "needs diagnostics.probe_every > 0 (the probes measure held-out accuracy)"),
        ("train.tracker_project", bool(c.train.tracker_project.strip()), "must not be empty"),
        ("model.lora_r", c.model.lora_r >= 1, "must be >= 1"),
        ("model.lora_dropout", 0 <= c.model.lora_dropout < 1, "must be in [0, 1)"),
        ("data.max_length", c.data.max_length >= 2, "must be >= 2"),
        ("data.max_prompt_length", 1 <= c.data.max_prompt_length < c.data.max_length,
         f"must be in [1, data.max_length={c.data.max_length}) so every completion keeps a token"),
        ("data.max_records", c.data.max_records >= 0, "must be >= 0"),
        ("data.shuffle_buffer", c.data.shuffle_buffer >= 1, "must be >= 1"),
        ("data.streaming", not c.data.streaming or c.train.max_steps > 0, "needs train.max_steps > 0: a stream's "
         "length is unknown until it is read (the run ends at max_steps, or after train.epochs passes)"),
        ("train.reference_cache", not (c.train.reference_cache and c.data.streaming), "cannot cache a streamed file "
         "(data.streaming=true): it computes every pair's reference logps before step 1; set one of them to false"),
        ("train.reference_cache", not (c.train.reference_cache and _reads_reference_tokens(c.loss.name, c.loss.mix)),
         "holds one sum per completion, and this loss weights the reference's tokens beyond the shorter completion "
         "of each pair (ld_dpo): set train.reference_cache=false"),
        ("data.streaming", not c.data.streaming or _streams(c.loss.name, c.loss.mix), "streams preference files "
         "(pairs, or unpaired for kto); this loss reads other data: set data.streaming=false"),
        ("eval.batch_size", c.eval.batch_size >= 1, "must be >= 1"),
        ("eval.kl_prompts", c.eval.kl_prompts >= -1, "must be >= 0, or -1 (sized by the held-out set)"),
        ("eval.kl_samples", c.eval.kl_samples >= 1, "must be >= 1"),
        ("eval.max_new_tokens", c.eval.max_new_tokens >= 1, "must be >= 1"),
        ("diagnostics.window", c.diagnostics.window >= 1, "must be >= 1"),
        ("online.samples_per_prompt", c.online.samples_per_prompt >= 2, "must be >= 2 (pairs need two samples)"),
        ("online.temperature", c.online.temperature > 0, "must be > 0"),
        ("online.top_p", 0 < c.online.top_p <= 1, "must be in (0, 1]"),
        ("online.top_k", c.online.top_k >= 0, "must be >= 0"),
        ("online.max_new_tokens", c.online.max_new_tokens >= 1, "must be >= 1"),
        ("online.min_margin", c.online.min_margin >= 0, "must be >= 0"),
        ("online.rounds", c.online.rounds >= 1, "must be >= 1"),
        ("online.judge_retries", c.online.judge_retries >= 0, "must be >= 0"),
        ("online.judge_timeout_s", c.online.judge_timeout_s > 0, "must be > 0"),
        ("online.prompts_per_step", c.online.prompts_per_step >= 1, "must be >= 1"),
        ("online.eval_samples", c.online.eval_samples >= 1, "must be >= 1"),
        ("online.grpo_iterations", c.online.grpo_iterations >= 1, "must be >= 1"),
        ("diagnostics.probe_every", c.diagnostics.probe_every >= 0, "must be >= 0"),
        ("diagnostics.probe_prompts", c.diagnostics.probe_prompts == -1 or c.diagnostics.probe_prompts >= 1,
         "must be >= 1, or -1 (sized by the run)"),
        ("diagnostics.probe_eval_pairs", c.diagnostics.probe_eval_pairs >= 0, "must be >= 0"),
        ("diagnostics.length_growth", c.diagnostics.length_growth > 1, "must be > 1"),
        ("diagnostics.length_shrink", 0 < c.diagnostics.length_shrink < 1, "must be in (0, 1)"),
    ]
    for key, ok, problem in checks:
        if not ok:
            yield key, problem
    yield from _number_problems(c)
    yield from _sampling_problems(c)
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        if value not in allowed:
            yield key, f"{value!r} is not one of {', '.join(allowed)}{_did_you_mean(str(value), allowed)}"
    for section in dataclasses.fields(c):  # each declared range (loss settings: core.losses.setting)
        for f in dataclasses.fields(getattr(c, section.name)):
            value = getattr(getattr(c, section.name), f.name)
            if (problem := range_problem(value, f.metadata.get("bounds"))) is not None:
                yield f"{section.name}.{f.name}", problem
    for i, term in enumerate(c.loss.mix):
        ok = (isinstance(term, list) and len(term) == 2 and isinstance(term[0], str) and term[0] in LOSSES
              and isinstance(term[1], (int, float)) and not isinstance(term[1], bool) and math.isfinite(term[1]))
        if not ok:
            yield f"loss.mix[{i}]", f"expected [name, weight] with a name from {', '.join(sorted(LOSSES))}, got {term!r}"
        elif not (kind := LOSSES[term[0]].kind).mixable:
            yield f"loss.mix[{i}]", (f"{term[0]!r} is a {kind.name.replace('_', ' ')} loss (preftune {kind.command}) "
                                     "and cannot be mixed")
        elif LOSSES[term[0]].state:
            yield f"loss.mix[{i}]", f"{term[0]!r} keeps loop state (a running baseline) and cannot be mixed"
    for i, name in enumerate(c.diagnostics.stop_on):
        if isinstance(name, str) and name not in CHECKS:
            yield f"diagnostics.stop_on[{i}]", f"unknown check {name!r}{_did_you_mean(str(name), CHECKS)}; known: {', '.join(CHECKS)}"
    if c.loss.name not in LOSSES:
        yield "loss.name", (f"unknown loss {c.loss.name!r}{_did_you_mean(c.loss.name, LOSSES)}; "
                            f"known: {', '.join(sorted(LOSSES))}")


def _reads_reference_tokens(name: str, mix: list) -> bool:
    """Whether the loss reads the reference's per-token log-probs (LD-DPO's tails), which cached
    sums cannot give (an unknown loss or bad mix: its own check says so)."""
    try:
        return "tail_logps" in build_loss(name, mix).inputs
    except (KeyError, ValueError, TypeError):
        return False


def _streams(name: str, mix: list) -> bool:
    """Whether data.streaming applies: a loss trained on pairs or unpaired examples (an unknown
    loss or bad mix: its own check says so)."""
    try:
        return build_loss(name, mix).kind.data in ("pairs", "unpaired")
    except (KeyError, ValueError, TypeError):
        return True


_INT_MAX = 2**31 - 1  # larger counts overflow torch/numpy sizes long before they mean anything
_SEED_MAX = 2**32 - 1  # numpy's and torch's seeds both accept [0, 2**32)


def _number_problems(c: Config):
    """Every float finite and every int in a range the libraries accept; list-valued settings
    hold the element types they promise. Generated from the dataclass fields, not a hand list."""
    for section in dataclasses.fields(c):
        for f in dataclasses.fields(getattr(c, section.name)):
            key, value = f"{section.name}.{f.name}", getattr(getattr(c, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                yield key, "must be a finite number"
            elif isinstance(value, int) and not isinstance(value, bool):
                top = _SEED_MAX if f.name == "seed" else _INT_MAX
                if not -_INT_MAX <= value <= top:
                    yield key, f"{value} is out of range (at most {top})"
                elif f.name == "seed" and value < 0:
                    yield key, "must be >= 0"
    for key, value in (("online.length_penalty", c.online.length_penalty),
                       ("online.disagreement_penalty", c.online.disagreement_penalty)):
        if value < 0:
            yield key, "must be >= 0"
    yield from _shape_problems(c)


# Hugging Face TrainingArguments / TRL DPOConfig and ModelConfig names -> our keys, for users who
# bring their flags along (`--learning_rate 5e-5` on the command line, or `train.learning_rate=`
# in an override, which names the key to use). docs: README "Names you know from TRL"
HF_ALIASES = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps", "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm", "seed": "train.seed", "logging_steps": "train.log_every",
    "save_steps": "train.checkpoint_every", "save_total_limit": "train.keep_last", "report_to": "train.report_to",
    "bf16": "train.autocast_bf16", "gradient_checkpointing": "model.gradient_checkpointing",
    "per_device_eval_batch_size": "eval.batch_size", "output_dir": "run.output_dir", "run_name": "run.name",
    "overwrite_output_dir": "run.overwrite", "beta": "loss.beta", "loss_type": "loss.name",
    "label_smoothing": "loss.label_smoothing", "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length", "model_name_or_path": "model.name_or_path",
    "model_revision": "model.revision", "trust_remote_code": "model.trust_remote_code",
    "use_peft": "model.lora", "lora_r": "model.lora_r", "lora_alpha": "model.lora_alpha",
    "lora_dropout": "model.lora_dropout", "lora_target_modules": "model.lora_target_modules",
    "load_in_4bit": "model.load_in_4bit", "attn_implementation": "model.attn_implementation",
}

RM_SPLITS = ("disjoint", "seed")  # how `preftune train-rm --ensemble K` splits its members (rm.py)

F32_MAX = 3.4028234663852886e38  # the optimizer's arithmetic is float32: any larger lr is inf there

# the pip extra that installs each tracker (pyproject.toml [project.optional-dependencies])
TRACKER_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _tracker_problems(report_to: list):
    """Trackers are checked with the config, before any model loads or any run file is written: a
    name Accelerate does not know (a typo used to fail as an internal error after loading the model,
    leaving an empty run directory), or one whose package is missing (wandb used to train to the
    end logging nothing). The names and availability checks are Accelerate's own."""
    from accelerate.utils import LoggerType  # deferred: only configs that ask for trackers pay for accelerate
    from accelerate.utils import imports as available

    known = [t.value for t in LoggerType]
    for name in report_to:
        if name not in known:
            yield "train.report_to", (f"unknown tracker {name!r}{_did_you_mean(name, known)}; known: "
                                      f"{', '.join(known)}")
        elif name != "all" and not getattr(available, f"is_{name}_available", lambda: True)():
            extra = TRACKER_EXTRAS.get(name)
            how = f"pip install 'preftune[{extra}]'" if extra else f"pip install {name.replace('_', '-')}"
            yield "train.report_to", f"{name!r} is not installed ({how}), or leave it out of train.report_to"


def _shape_problems(c: Config):
    strings = {"model.lora_target_modules": c.model.lora_target_modules, "train.report_to": c.train.report_to,
               "diagnostics.stop_on": c.diagnostics.stop_on}
    for key, value in strings.items():
        items = [value] if isinstance(value, str) else value
        bad = [x for x in items if not isinstance(x, str) or not x]
        if bad or not isinstance(items, list):
            yield key, f"expected a list of names, got {value!r}"
    if c.train.report_to and all(isinstance(x, str) and x for x in c.train.report_to):
        yield from _tracker_problems(c.train.report_to)
    if c.model.load_in_4bit and not c.model.lora:
        yield "model.load_in_4bit", "4-bit weights are frozen: set model.lora=true (QLoRA) or model.load_in_4bit=false"
    if c.model.load_in_4bit and c.model.adapter_name_or_path:
        yield "model.load_in_4bit", ("starting from an SFT adapter on a 4-bit base is not supported yet: merge the "
                                     "adapter into a full-precision model first, or set model.load_in_4bit=false")
    if not c.model.lora_target_modules:
        yield "model.lora_target_modules", "is empty; name modules (e.g. [q_proj, v_proj]) or all-linear"
    bad = {k: v for k, v in c.data.column_map.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        yield "data.column_map", f"expected source: target names, got {bad!r}"
    for i, term in enumerate(c.online.reward_ensemble):
        if not (isinstance(term, list) and len(term) == 2 and isinstance(term[0], str)
                and isinstance(term[1], (int, float)) and not isinstance(term[1], bool) and math.isfinite(term[1])):
            yield f"online.reward_ensemble[{i}]", f"expected [source, weight], got {term!r}"


def _sampling_problems(c: Config):
    """vLLM samples from model.name_or_path's weights plus the pushed LoRA adapter, so the policy
    must be exactly that (models/vllm_engine.py says why full fine-tuning is not pushed)."""
    s, m = c.sampling, c.model
    if s.sync_every < 1:
        yield "sampling.sync_every", "must be >= 1"
    if not s.timeout_s > 0:
        yield "sampling.timeout_s", "must be > 0"
    if s.overlap and s.engine != "vllm":
        yield "sampling.overlap", ("needs sampling.engine=vllm: the built-in sampler runs on the trainer's own "
                                   "weights and cores, so there is nothing to overlap")
    if s.engine != "vllm":
        return
    if not m.lora:
        yield "sampling.engine", ("vllm needs model.lora=true: full fine-tuning would push weights through vLLM's "
                                  "reload_weights, which leaves a tied output head (the default model's) stale; "
                                  "use sampling.engine=builtin")
    elif m.load_in_4bit:
        yield "sampling.engine", "vllm serves full-precision base weights, not model.load_in_4bit's 4-bit ones"
    elif m.adapter_name_or_path and m.adapter_merge:
        yield "sampling.engine", ("vllm serves model.name_or_path, not the base with model.adapter_name_or_path "
                                  "merged in: set model.adapter_merge=false or sampling.engine=builtin")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, annotation: Any, source: str, key: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    kind = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), None)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `5e-5` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if key == "model.lora_target_modules" and isinstance(value, str):  # PEFT's shorthand, e.g. all-linear
        return value
    raise ConfigError(source, key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")


def _apply(cfg: Config, data: dict, source: str, origin: dict) -> None:
    if not isinstance(data, dict):
        raise ConfigError(source, "<top>", f"expected a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(source, str(section), f"unknown section{_did_you_mean(str(section), sections)}")
        if not isinstance(values, dict):
            raise ConfigError(source, section, f"expected a mapping, got {type(values).__name__}")
        target = getattr(cfg, section)
        names = {f.name: f for f in dataclasses.fields(target)}
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in names:
                alias = HF_ALIASES.get(str(name))
                hint = f" (did you mean {alias}? Hugging Face's {name})" if alias else _did_you_mean(str(name), names)
                raise ConfigError(source, key, f"unknown key{hint}")
            setattr(target, name, _coerce(value, names[name].type, source, key))
            origin[key] = source


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=5e-5` -> ('train.lr', 5e-05); values are parsed as YAML scalars or lists."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError("command line", text, "expected section.key=value, e.g. train.lr=5e-5")
    key, raw = text.split("=", 1)
    if len(raw) > 65536:
        raise ConfigError("command line", key.strip(), "value longer than 65536 characters")
    try:
        value = yaml.safe_load(raw) if raw != "" and "&" not in raw and "*" not in raw else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                saved_run: bool = False) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated at the end.
    `saved_run`: `path` is a run directory's own config.yaml (eval --run, export, resume, bon and
    serve of a run, implicit:/rm: rewards): its security opt-ins (`_f(opt_in=True)`) are data that
    anyone who can write the run directory controls, so they are reset to their defaults and only
    the command line can set them."""
    cfg, origin = Config(), {}
    if path is not None:
        path = recipe_path(str(path)) if str(path).startswith(RECIPE_PREFIX) else Path(path)
        if not path.exists():
            raise ConfigError(str(path), "<file>", "no such config file")
        try:
            data = load_yaml(path, follow_symlinks=not saved_run) or {}  # a run's own file is never a link
        except DataError as err:
            where = f"{path}:{err.line}" if err.line else str(path)
            raise ConfigError(where, err.field, err.problem) from None
        if isinstance(data, dict):
            _check_version(data.pop("preftune_version", None), path)
            data.pop("recipe", None)  # a recipe's metadata (preftune.core.recipes), not settings
        _apply(cfg, data, str(path), origin)
        if saved_run:
            _drop_opt_ins(cfg, origin)
    for text in overrides or []:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        _apply(cfg, {section: {name: value}}, "command line", origin)
    _resolve_defaults(cfg, origin)
    for key, problem in _range_problems(cfg):
        raise ConfigError(origin.get(key.split("[")[0], "defaults"), key, problem)
    for key, problem in _inapplicable(cfg, origin):  # after the ranges: a value must be valid before it is unused
        raise ConfigError(origin[key], key, problem)
    return cfg


def opt_in_keys() -> tuple[str, ...]:
    """The dotted keys marked `opt_in` (trust_remote_code, allow_pickle_weights, ...)."""
    cfg = Config()
    return tuple(f"{s.name}.{k}" for s in dataclasses.fields(cfg) for k in fields_where(getattr(cfg, s.name), "opt_in"))


def _inapplicable(cfg: Config, origin: dict):
    """A loss setting given for a loss that does not read it (loss.label_smoothing with ipo,
    loss.simpo_gamma with sigmoid) was a silent no-op: refused, naming the settings the loss takes.
    Only values that differ from the default count, so a saved config.yaml (every key written)
    loads as before; beta stays open to every loss (eval and the health checks scale by it)."""
    try:
        spec = build_loss(cfg.loss.name, cfg.loss.mix)
    except (KeyError, ValueError, TypeError):
        return  # an unknown loss or a bad mix: its own check says so
    takes = (*spec.params, *spec.uses)
    for f in dataclasses.fields(cfg.loss):
        key = f"loss.{f.name}"
        if f.name in ("name", "mix", "beta", *takes) or key not in origin:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg.loss, f.name) != default:
            yield key, (f"{spec.name!r} does not use it (its settings: "
                        f"{', '.join(p for p in takes if p != 'beta') or 'none besides loss.beta'}); remove it")
    # the ppo section: what each policy-gradient estimator reads (core/losses/ppo.py), nothing for other losses
    only = {"gamma": "gae", "lam": "gae", "whiten_advantages": "gae", "shared_critic": "gae",
            "critic_from_reward_model": "gae", "reinforce_baseline": "reinforce_pp"}
    for f in dataclasses.fields(cfg.ppo):
        key = f"ppo.{f.name}"
        if key not in origin or getattr(cfg.ppo, f.name) == f.default:
            continue
        if spec.kind.name != "policy_gradient":
            yield key, f"ppo.* settings are read by preftune ppo's losses (ppo, rloo, reinforce_pp), not {spec.name!r}"
        elif f.name in only and spec.estimator != only[f.name]:
            needs = next(n for n, s in LOSSES.items() if s.estimator == only[f.name])
            yield key, f"only {needs!r} reads it, not {spec.name!r}; remove it"


def _drop_opt_ins(cfg: Config, origin: dict) -> None:
    for key in opt_in_keys():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, getattr(getattr(Config(), section), name))
        origin.pop(key, None)


LORA_LR = 5e-5  # losses without a recipe (robust, hinge, sft, ...); full fine-tuning takes a tenth


def _resolve_defaults(cfg: Config, origin: dict) -> None:
    """Defaults that depend on other settings, written into the config (config.yaml shows them).
    The loss's recipe (preftune.core.recipes) gives the learning rate when none is set (a tenth of it
    for full fine-tuning) and its loss settings the user did not set (simpo's beta 2, cdpo's
    label smoothing, ...); batch, epochs and LoRA shape stay the user's (see `preftune advise`)."""
    cfg.loss.name = ALIASES.get(cfg.loss.name, cfg.loss.name)
    cfg.loss.mix = [[ALIASES.get(t[0], t[0]), *t[1:]] if isinstance(t, list) and t and isinstance(t[0], str) else t
                    for t in cfg.loss.mix]
    name = recipe_name(cfg.loss.name, cfg.loss.mix)
    recipe = load_recipe(name) if name else None
    if recipe is not None:
        types = {f.name: f.type for f in dataclasses.fields(cfg.loss)}
        # weights the user gave by hand are not replaced by the recipe's automatic ones
        mine = {"kto_auto_weights"} if {"loss.desirable_weight", "loss.undesirable_weight"} & set(origin) else set()
        for key, value in recipe.settings.get("loss", {}).items():
            if key not in ("name", "mix", *mine) and f"loss.{key}" not in origin:
                setattr(cfg.loss, key, _coerce(value, types[key], str(recipe.path), f"loss.{key}"))
                origin[f"loss.{key}"] = str(recipe.path)
    if cfg.train.lr == 0:
        lora_lr = recipe.get("train.lr", LORA_LR) if recipe is not None else LORA_LR
        cfg.train.lr = lora_lr if cfg.model.lora else lora_lr / 10


def _check_version(saved: str | None, path: Path) -> None:
    """Saved run configs carry the version that wrote them; a newer one loads with a warning."""

    def key(v: str):
        return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))

    if saved and key(str(saved)) > key(__version__):
        warnings.warn(f"{path}: written by preftune {saved}, loading with {__version__}", stacklevel=3)


def run_name(cfg: Config) -> str:
    """`run.name`, or the output directory's own name when it is empty (`runs/mine` -> mine)."""
    return cfg.run.name or Path(cfg.run.output_dir).resolve().name


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path, extra: dict | None = None) -> None:
    """Write the fully resolved config (every key, defaults included) plus `extra` (version...)."""
    data = {**(extra or {}), **config_to_dict(cfg)}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def config_help(sections: tuple[str, ...] | None = None) -> str:
    """One line per key, generated from the dataclasses: `section.key (default): help`; only the
    given sections (in Config's order) when `sections` is set."""
    lines = []
    for section in dataclasses.fields(Config):
        if sections is not None and section.name not in sections:
            continue
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section.name}.{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)

