"""Reward sources: one registry, each scoring (prompt, completion) pairs with one float.

A source is named by a spec string, `kind:argument`:

    sentiment                 VADER compound sentiment in [-1, 1] (the demo's reward)
    arithmetic                1/0: the completion's last integer is the arithmetic problem's answer
                              (verifiable; problems from `preftune data arithmetic`, see verifiable.py)
    fn:package.module:func    a Python callable func(prompts, completions) -> list of floats
    rm:PATH                   a Hugging Face sequence-classification reward model (logit 0)
    implicit:RUN_DIR          beta * log(pi / pi_ref) of a trained preftune run (its own beta)
    judge:URL                 an LLM judge over an OpenAI-compatible chat API (see judge.py)

and combined with `ensemble(sources, weights, disagreement_penalty=...)` or
`length_penalized(source, alpha)`. Sources are plain objects with `name` and
`score(prompts, completions)`; nothing inherits from anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ...config import _did_you_mean, load_config
from ...core.logprobs import completion_logps
from ...data import render
from ...data.collate import collate_sequences
from ...data.tokenize import truncate
from ...utils.devices import place
from ...utils.envvars import env
from ...utils.errors import ConfigError, DataError
from ...utils.safeio import loads_json, read_capped, read_json
from .. import REWARD_SYNTAX
from ..generate import run_models
from ..loading import load_model, load_tokenizer, resolve_model_dir
from .judge import JudgeReward
from .verifiable import arithmetic_reward

__all__ = ["sentiment_scores", "RewardSource", "REWARD_KINDS", "build_reward", "read_ensemble", "Ensemble", "LengthPenalized", "FunctionReward",
           "SCORING_FILE"]


class RewardSource(Protocol):
    name: str

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One float per (prompt, completion); higher is better."""


@dataclass
class FunctionReward:
    name: str
    fn: Callable

    def score(self, prompts, completions):
        out = [float(x) for x in self.fn(list(prompts), list(completions))]
        if len(out) != len(completions):
            raise ConfigError(self.name, "reward", f"returned {len(out)} scores for {len(completions)} completions")
        return out


def sentiment_scores(texts: list[str]) -> list[float]:
    """VADER compound score in [-1, 1] (Hutto & Gilbert 2014); positive = positive sentiment."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # only when the source is used

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def _sentiment(_prompts, completions):
    return sentiment_scores(completions)


FN_MODULES_ENV = "PREFTUNE_FN_MODULES"


def _fn_module_allowed(spec: str, module: str) -> None:
    """Which modules `fn:` may import (checked before anything is imported, since an import runs the
    module): the user's own code (a top-level module found outside site-packages, e.g. beside the
    config or on PYTHONPATH), and installed packages named in $PREFTUNE_FN_MODULES (comma-separated
    top-level names). The standard library never: `fn:pty:spawn` ran a program named in the data,
    and a spec can come from a run's saved config."""
    top = module.split(".")[0]
    allowed = set(env(FN_MODULES_ENV))
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ConfigError(spec, "reward", f"{top!r} is part of Python's standard library, not a reward module")
    if top in allowed:
        return
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError) as err:
        raise ConfigError(spec, "reward", f"cannot find module {top!r} ({err})") from None
    if found is None:
        raise ConfigError(spec, "reward", f"no module named {top!r}")
    where = Path(found.origin or next(iter(found.submodule_search_locations or []), "")).resolve()
    if any(part in ("site-packages", "dist-packages") for part in where.parts):
        raise ConfigError(spec, "reward", f"{top!r} is an installed package; fn: imports your own modules, or "
                          f"installed ones you list in ${FN_MODULES_ENV} (e.g. {FN_MODULES_ENV}={top})")


def _callable(spec: str, arg: str) -> FunctionReward:
    module, _, func = arg.rpartition(":")
    if not module or not func:
        raise ConfigError(spec, "reward", "expected fn:package.module:function")
    _fn_module_allowed(spec, module)
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as err:
        raise ConfigError(spec, "reward", f"cannot import {func!r} from {module!r} ({err})") from None
    if not inspect.isfunction(fn):  # a class, a builtin, a bound method of some object: not a reward function
        raise ConfigError(spec, "reward", f"{func!r} is not a plain Python function (prompts, completions) -> scores")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise ConfigError(spec, "reward", f"{func!r} does not take (prompts, completions)") from None
    return FunctionReward(spec, fn)


SCORING_FILE = "preftune_scoring.json"  # written by `preftune train-rm` beside its reward model


def _trained_lengths(model_dir: Path) -> dict:
    """The data lengths a `preftune train-rm` reward model trained at: its SCORING_FILE, or (a run
    from before that file) the run's config.yaml one level up; {} for any other classifier."""
    if (model_dir / SCORING_FILE).is_file():
        got = loads_json(read_capped(model_dir / SCORING_FILE, field=SCORING_FILE, cap=4096),
                         model_dir / SCORING_FILE, field=SCORING_FILE)
        ok = isinstance(got, dict) and all(isinstance(got.get(k), int) and not isinstance(got.get(k), bool)
                                           and got[k] > 0 for k in ("max_length", "max_prompt_length"))
        if not ok or got["max_prompt_length"] >= got["max_length"]:
            raise ConfigError(str(model_dir / SCORING_FILE), "max_length",
                              "expected positive integers max_length > max_prompt_length")
        return {"max_length": got["max_length"], "max_prompt_length": got["max_prompt_length"]}
    run_config = model_dir.parent / "config.yaml"
    if model_dir.name == "reward_model" and run_config.is_file():
        d = load_config(run_config, saved_run=True).data
        return {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length}
    return {}


@dataclass
class RewardModel:
    """A sequence-classification model scoring the prompt and completion as one text."""
    name: str
    model: object
    tokenizer: object
    batch_size: int = 16
    max_length: int = 1024
    # a `preftune train-rm` run's data.max_prompt_length: cut like its training pairs were (the
    # prompt's last tokens, then the completion's first) instead of keeping the last max_length
    max_prompt_length: int | None = None

    @classmethod
    def load(cls, spec: str, path: str) -> RewardModel:
        from transformers import (  # loads only for rm: sources
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        if not Path(path).is_dir():
            raise ConfigError(spec, "reward", f"no reward model directory at {path}")
        if (Path(path) / "reward_model").is_dir():  # a `preftune train-rm` run: its merged reward model
            path = str(Path(path) / "reward_model")
        lengths = _trained_lengths(Path(path))
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True,
                                                                   trust_remote_code=False).eval()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
        return cls(spec, model, tok, **lengths)

    def score(self, prompts, completions):
        out, tok = [], self.tokenizer
        rows = [self._row(p, c) for p, c in zip(prompts, completions)]
        with torch.no_grad():
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i: i + self.batch_size]
                width = max(map(len, chunk))  # right padding: the head reads the last non-pad token
                ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in chunk])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
                batch = place({"input_ids": ids, "attention_mask": mask}, self.model)
                out += self.model(**batch).logits[:, 0].float().tolist()
        return out

    def _row(self, prompt, completion: str) -> list[int]:
        p_ids, c_ids = self._ids(prompt, completion)
        if self.max_prompt_length is None:
            return (p_ids + c_ids)[-self.max_length:]
        p_ids, (c_ids,), _ = truncate(p_ids, [c_ids], self.max_length, self.max_prompt_length)
        return p_ids + c_ids

    def _ids(self, prompt, completion: str) -> tuple[list[int], list[int]]:
        """(prompt, completion) as the reward model reads it: through the one rendering
        (data/render.py) with ITS tokenizer, as messages when it has a chat template (a plain
        prompt as a user turn, the completion as the assistant's), else as text. `preftune
        train-rm` renders its training pairs the same way (rm.as_reward_records), so a reward
        model scores exactly the tokens it was trained on (render.as_chat serves both)."""
        tok = self.tokenizer
        prompt, completion = render.as_chat(tok, prompt, completion)
        return render.prompt_ids(tok, prompt), render.completion_ids(tok, prompt, completion, eos=tok.eos_token_id)


@dataclass
class ImplicitReward:
    """DPO's implicit reward of a run: beta * (log pi(y|x) - log pi_ref(y|x)), summed over tokens."""
    name: str
    policy: object
    reference: object
    tokenizer: object
    beta: float
    batch_size: int = 8

    @classmethod
    def load(cls, spec: str, run_dir: str) -> ImplicitReward:
        run = Path(run_dir)
        if not (run / "config.yaml").is_file() or not (run / "model").is_dir():
            raise ConfigError(spec, "reward", f"{run_dir} is not a finished preftune run (config.yaml, model/)")
        cfg = load_config(run / "config.yaml", saved_run=True)
        model_dir = resolve_model_dir(cfg.model.name_or_path)
        policy, reference = run_models(cfg, run, load_model(model_dir))
        return cls(spec, policy.eval(), reference, load_tokenizer(model_dir), cfg.loss.beta)

    def score(self, prompts, completions):
        tok, out = self.tokenizer, []
        p_ids = [render.prompt_ids(tok, p) for p in prompts]
        c_ids = [render.completion_ids(tok, p, c, eos=tok.eos_token_id) for p, c in zip(prompts, completions)]
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                batch = collate_sequences(p_ids[i: i + self.batch_size], c_ids[i: i + self.batch_size],
                                          tok.pad_token_id)
                pol, _ = completion_logps(self.policy, batch)
                with self.reference.context():
                    ref, _ = completion_logps(self.reference.forward_model(self.policy), batch)
                out += (self.beta * (pol - ref)).tolist()
        return out


@dataclass
class Ensemble:
    """sum_i w_i * s_i - penalty * disagreement: a weighted sum of the members' raw scores, less a
    penalty on how much the members disagree about this completion relative to the others.

    Disagreement is measured on normalised scores, never on raw ones (a 1-10 judge and a [-1, 1]
    sentiment score would "disagree" by their scales alone): each member's scores are z-scored
    over the batch being scored (its mean and population std over the finite scores; a member
    with no spread gives 0 everywhere), and the disagreement of a completion is the population
    std of its members' z-scores. Members that rank the batch alike in an affine way (any scale
    and offset) have disagreement 0. A completion a member failed on (NaN) scores NaN."""
    name: str
    members: list
    weights: list[float]
    disagreement_penalty: float = 0.0

    def score(self, prompts, completions):
        columns = [m.score(prompts, completions) for m in self.members]
        z_columns = [_z_scores(c) for c in columns]
        out = []
        for values, zs in zip(zip(*columns), zip(*z_columns)):
            total = sum(w * v for w, v in zip(self.weights, values))
            mean = sum(zs) / len(zs)
            spread = math.sqrt(sum((z - mean) ** 2 for z in zs) / len(zs))
            out.append(total - self.disagreement_penalty * spread)
        return out


def _z_scores(values: list[float]) -> list[float]:
    """(v - mean) / std over the finite values (population std); all 0 when they have no spread."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return list(values)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    return [(v - mean) / std if std > 0 else 0.0 * v for v in values]  # 0 * NaN stays NaN


@dataclass
class LengthPenalized:
    """score - alpha * (completion length in words): counters rewards that favour verbosity."""
    name: str
    inner: object
    alpha: float

    def score(self, prompts, completions):
        return [s - self.alpha * len(c.split()) for s, c in zip(self.inner.score(prompts, completions), completions)]


def load_reward_models(spec: str, path: str):
    """`rm:DIR`: a reward model directory, a `preftune train-rm` run, or an ensemble trained with
    `--ensemble K` (DIR/ensemble.json): the mean of its members' scores less
    `disagreement_penalty` x their spread (the Ensemble source), an uncertainty-penalised reward."""
    manifest = Path(path) / "ensemble.json"
    if not manifest.is_file():
        return RewardModel.load(spec, path)
    info = read_ensemble(Path(path))
    members = [RewardModel.load(f"{spec}#{k}", str(Path(path) / m)) for k, m in enumerate(info["members"])]
    return Ensemble(spec, members, [1.0 / len(members)] * len(members), float(info.get("disagreement_penalty", 0.0)))


def read_ensemble(run_dir: Path) -> dict:
    """DIR/ensemble.json, checked: an object whose `members` are relative member directories."""
    path = Path(run_dir) / "ensemble.json"
    info = read_json(path)
    members = info.get("members") if isinstance(info, dict) else None
    if not (isinstance(members, list) and members and all(isinstance(m, str) and m and not Path(m).is_absolute()
                                                           and ".." not in Path(m).parts for m in members)):
        raise DataError(path, 1, "members", "expected a non-empty list of member directories inside the run")
    penalty = info.get("disagreement_penalty", 0.0)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise DataError(path, 1, "disagreement_penalty", "expected a number")
    return info


def _judge(spec: str, url: str, **settings):
    return JudgeReward.from_spec(spec, url, **settings)


_FACTORIES = {
    "sentiment": lambda spec, _arg: FunctionReward(spec, _sentiment),
    "arithmetic": lambda spec, _arg: FunctionReward(spec, arithmetic_reward),
    "fn": _callable,
    "rm": load_reward_models,
    "implicit": ImplicitReward.load,
    "judge": _judge,
}
REWARD_KINDS: dict[str, Callable[[str, str], object]] = {kind: _FACTORIES[kind] for kind in REWARD_SYNTAX}


def build_reward(spec, *, length_penalty: float = 0.0, judge: dict | None = None):
    """A source from a spec string, or an ensemble from {"ensemble": [[spec, weight], ...],
    "disagreement_penalty": x}; `length_penalty` wraps the result; `judge` holds JudgeClient
    settings (timeout_s, retries, backoff_s) for judge sources."""
    if isinstance(spec, dict):
        members = spec.get("ensemble")
        if not isinstance(members, list) or not members:
            raise ConfigError("reward", "ensemble", "expected a non-empty list of [spec, weight]")
        sources = [build_reward(m[0], judge=judge) for m in members]
        source = Ensemble("ensemble(" + ", ".join(f"{m[1]}*{m[0]}" for m in members) + ")", sources,
                          [float(m[1]) for m in members], float(spec.get("disagreement_penalty", 0.0)))
    else:
        kind, _, arg = str(spec).partition(":")
        if kind not in REWARD_KINDS:
            raise ConfigError(str(spec), "reward", f"unknown reward source {kind!r}{_did_you_mean(kind, REWARD_KINDS)};"
                              f" known: {', '.join(REWARD_KINDS)}")
        extra = (judge or {}) if kind == "judge" else {}
        source = REWARD_KINDS[kind](str(spec), arg, **extra)
    return LengthPenalized(f"{source.name}-{length_penalty}*len", source, length_penalty) if length_penalty else source
