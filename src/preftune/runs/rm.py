"""`preftune train-rm`: a Bradley-Terry reward model from preference files, on the one loop.

The model is the base causal LM with a one-output score head (models.load_reward_start; LoRA
adapters plus the head in full, or every weight), trained by train() on the same pair files as
DPO with the `bt` loss (losses/reward.py: -log sigmoid(r_c - r_r - margin), optional centering),
padded rows (the head pools one sequence per row), no reference and no sampling probes. The
pairs are rendered the way `rm:DIR` will later score them (as_reward_records), so the reward
model scores exactly the tokens it was trained on. At the end:

- held-out pair accuracy (Wilson 95% interval) and calibration (reliability bins of
  sigmoid(margin) against the observed accuracy, ECE) on `data.eval_path`, in summary.json;
- RUN/reward_model: the merged model as a plain Hugging Face sequence-classification directory
  (safetensors + tokenizer), which `rm:RUN` (or `rm:RUN/reward_model`) loads.

`--ensemble K` trains K members in RUN/member-<k>: on K disjoint slices of the training file
(`split=disjoint`) or on the whole file with K seeds (`split=seed`: different head init and
order), and writes RUN/ensemble.json. `rm:RUN` is then the members' mean score less
`disagreement_penalty` x their spread (an uncertainty-penalised reward). The ensemble's held-out
accuracy, the members' spread and how often they disagree on a pair are measured by scoring
the held-out pairs through `rm:` itself, the path every consumer uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..config import RM_SPLITS, Config
from ..core.losses import LOSSES, build_loss
from ..core.losses.kinds import REWARD_MODEL
from ..core.stats import wilson
from ..data import render
from ..data.batches import OfflineSource
from ..data.prepare import load_data
from ..data.records import PreferenceRecord
from ..data.sources import split_path
from ..models.loading import load_reward_start, load_tokenizer, resolve_model_dir
from ..models.rewards import SCORING_FILE, build_reward, read_ensemble
from ..training.train import RunResult, check_output_dir, train
from ..utils.errors import ConfigError
from ..utils.safeio import atomic_path, atomic_write, read_json

__all__ = ["run_train_rm", "as_reward_records", "export_reward_model", "SPLITS"]

SPLITS = RM_SPLITS  # declared with the config, so the CLI's parser reads it without importing this module


def as_reward_records(records: list, tokenizer) -> list:
    """Pairs as a reward model reads them: render.as_chat, the conversion rm: scoring applies too."""
    out = []
    for r in records:
        prompt, chosen = render.as_chat(tokenizer, r.prompt, r.chosen)
        out.append(PreferenceRecord(prompt, chosen, render.as_chat(tokenizer, r.prompt, r.rejected)[1], r.source,
                                    r.line))
    return out


def _rm_config(cfg: Config) -> Config:
    """The reward-model settings every member trains with: the `bt` loss, padded rows, no probes."""
    name = cfg.loss.name if build_loss(cfg.loss.name).kind is REWARD_MODEL else "bt"
    return dataclasses.replace(
        cfg, loss=dataclasses.replace(cfg.loss, name=name, mix=[]),
        data=dataclasses.replace(cfg.data, layout="padded", prefix_sharing=False),
        diagnostics=dataclasses.replace(cfg.diagnostics, probe_every=0))


def export_reward_model(cfg: Config, run_dir: Path, tokenizer) -> Path:
    """RUN/reward_model: the trained head and weights (LoRA merged) as a plain HF directory."""
    from peft import PeftModel  # deferred: only LoRA reward models need peft

    trained = run_dir / "model"
    if (trained / "adapter_config.json").is_file():
        base = load_reward_start(cfg.model, resolve_model_dir(cfg.model.name_or_path), tokenizer.pad_token_id)
        model = PeftModel.from_pretrained(base, str(trained)).merge_and_unload()
    else:
        model = load_reward_start(cfg.model, str(trained), tokenizer.pad_token_id)
    dest = run_dir / "reward_model"
    with atomic_path(dest, directory=True, replace_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # the lengths it trained at: `rm:` cuts long texts the same way (travels with an export)
        (Path(tmp) / SCORING_FILE).write_text(json.dumps(
            {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}) + "\n")
    return dest


def _train_one(cfg: Config, tokenizer, *, resume: bool = False, allow_config_change: bool = False) -> RunResult:
    spec = build_loss(cfg.loss.name)
    source = OfflineSource.load(cfg, spec)
    source.records = as_reward_records(source.records, tokenizer)
    if source.eval_records is not None:
        source.eval_records = as_reward_records(source.eval_records, tokenizer)
    result = train(cfg, resume=resume, allow_config_change=allow_config_change, source=source)
    export_reward_model(cfg, result.run_dir, tokenizer)
    return result


def _member_paths(path: str, n_records: int, k: int, members: int) -> str:
    """Member k's disjoint slice of `path` (a slice already in the path is sliced further)."""
    file, part = split_path(path)
    start = part.start or 0
    lo, hi = start + k * n_records // members, start + (k + 1) * n_records // members
    return f"{file}[{lo}:{hi}]"


def _texts(completion) -> str:
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def ensemble_heldout(run_dir: Path, cfg: Config) -> dict:
    """Score the held-out pairs with each member through `rm:` and combine: the ensemble's
    accuracy (mean margin > 0, Wilson interval), each member's, the mean spread (population std)
    of the members' margins, and the fraction of pairs on which members disagree in sign."""
    records = load_data(cfg.data.eval_path, cfg.data)
    prompts = [r.prompt for r in records]
    info = read_ensemble(run_dir)
    margins = []  # per member, per pair
    for member in info["members"]:
        rm = build_reward(f"rm:{run_dir / member}")
        chosen = rm.score(prompts, [_texts(r.chosen) for r in records])
        rejected = rm.score(prompts, [_texts(r.rejected) for r in records])
        margins.append([c - r for c, r in zip(chosen, rejected)])
    n = len(records)
    mean = [sum(col) / len(col) for col in zip(*margins)]
    spread = [math.sqrt(sum((v - m) ** 2 for v in col) / len(col)) for col, m in zip(zip(*margins), mean)]
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in mean)
    return {"pairs": n, "accuracy": wins / n, "accuracy_ci95": wilson(wins, n),
            "member_accuracy": [sum(1.0 if v > 0 else 0.5 if v == 0 else 0.0 for v in col) / n for col in margins],
            "margin_spread_mean": sum(spread) / n,
            "disagreement": sum(len({v > 0 for v in col}) > 1 for col in zip(*margins)) / n}


def run_train_rm(cfg: Config, *, ensemble: int = 1, split: str = "disjoint", disagreement_penalty: float = 0.0,
                 resume: bool = False, allow_config_change: bool = False) -> dict:
    """Train one reward model (or `ensemble` members) per the module docstring; returns what to
    print: the run directory, held-out accuracy and calibration (and the ensemble's figures)."""
    if ensemble < 1:
        raise ConfigError("--ensemble", "ensemble", f"must be >= 1, got {ensemble}")
    if split not in SPLITS:
        raise ConfigError("--split", "split", f"{split!r} is not one of {', '.join(SPLITS)}")
    if not cfg.data.train_path:
        raise ConfigError("defaults", "data.train_path", "is required")
    if LOSSES[cfg.loss.name].kind is not REWARD_MODEL and cfg.loss.name != "sigmoid":  # sigmoid: the untouched default
        raise ConfigError("defaults", "loss.name", f"{cfg.loss.name!r} is not a reward-model loss; preftune train-rm "
                          f"trains with {', '.join(n for n, s in LOSSES.items() if s.kind is REWARD_MODEL)}")
    cfg = _rm_config(cfg)
    m = cfg.model
    tokenizer = load_tokenizer(resolve_model_dir(m.name_or_path, allow_pickle_weights=m.allow_pickle_weights),
                               trust_remote_code=m.trust_remote_code, revision=m.revision)
    run_dir = Path(cfg.run.output_dir)
    if ensemble == 1:
        result = _train_one(cfg, tokenizer, resume=resume, allow_config_change=allow_config_change)
        return {"run": str(run_dir), "members": [str(run_dir)], "eval": result.summary.get("eval")}
    if not resume:
        check_output_dir(run_dir, cfg.run.overwrite)
    n_records = len(load_data(cfg.data.train_path, cfg.data)) if split == "disjoint" else 0
    members, evals = [], []
    for k in range(ensemble):
        member = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, output_dir=str(run_dir / f"member-{k}")),
            data=dataclasses.replace(cfg.data, train_path=_member_paths(cfg.data.train_path, n_records, k, ensemble))
            if split == "disjoint" else cfg.data,
            train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k) if split == "seed" else cfg.train)
        done = (run_dir / f"member-{k}" / "reward_model").is_dir() and resume
        result = None if done else _train_one(member, tokenizer, resume=resume, allow_config_change=allow_config_change)
        summary = result.summary if result else read_json(run_dir / f"member-{k}" / "summary.json")
        members.append(f"member-{k}/reward_model")
        evals.append(summary.get("eval"))
    atomic_write(run_dir / "ensemble.json", json.dumps(
        {"members": members, "split": split, "disagreement_penalty": disagreement_penalty,
         "train_path": cfg.data.train_path}, indent=2) + "\n")
    out = {"run": str(run_dir), "members": members, "member_eval": evals}
    if cfg.data.eval_path:
        out["ensemble_eval"] = ensemble_heldout(run_dir, cfg)
        atomic_write(run_dir / "ensemble_eval.json", json.dumps(out["ensemble_eval"], indent=2) + "\n")
    return out
