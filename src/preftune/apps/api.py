"""The Python API a notebook expects: `preftune.train(model=..., tokenizer=..., train_dataset=...,
config=...)` as well as `preftune.train(cfg)` (layer 6: an app over train()).

Objects are written once to the cache, content-addressed (`$PREFTUNE_CACHE/inputs/`), and the run
is an ordinary run on those paths. Why not train the objects in place: every other part of a run
keys on files (the reference-log-prob cache on the data file's sha256, resume on the data's hash,
`eval`, `export` and `resume` reopen the base model by the path in config.yaml); a run whose inputs
lived only in a notebook's memory could be neither resumed, evaluated later nor exported. The cost
is one save of the model (about 2 s for the 135M default on this CPU) and of the data.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..config import Config, load_config
from ..models.loading import weights_sha256
from ..training.train import RunResult
from ..training.train import train as train_config
from ..utils.envvars import cache_root
from ..utils.errors import ConfigError
from ..utils.safeio import atomic_path

__all__ = ["train"]


def _config(config) -> Config:
    if config is None:
        return load_config(None, [])
    if isinstance(config, Config):
        return config
    if isinstance(config, (list, tuple)):
        return load_config(None, list(config))
    if isinstance(config, dict):  # {"train.lr": 5e-4, ...} or {"train": {"lr": 5e-4}}
        flat = {}
        for key, value in config.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return load_config(None, [f"{k}={_yaml_value(v)}" for k, v in flat.items()])
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise ConfigError("preftune.train", "config", f"expected a Config, a dict, a list of section.key=value or a "
                      f"YAML path, got {type(config).__name__}")


def _yaml_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def _stage_model(model, tokenizer) -> str:
    """The model and tokenizer as a model directory in the cache, keyed by the weights' sha256."""
    if hasattr(model, "peft_config"):
        raise ConfigError("preftune.train", "model", "a PEFT model: pass its base (model.merge_and_unload() or the "
                          "base model) or save the adapter and set model.adapter_name_or_path")
    if tokenizer is None:
        raise ConfigError("preftune.train", "tokenizer", "needed with model= (the run saves them together)")
    digest = weights_sha256(model, skip_substring="")
    dest = cache_root() / "inputs" / "models" / digest[:24]
    if not (dest / "config.json").is_file():
        with atomic_path(dest, directory=True, replace_dir=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return str(dest)


def _stage_dataset(dataset, field: str) -> str:
    """A `datasets.Dataset` (or a list of dicts) as a JSONL file in the cache, keyed by its content."""
    if hasattr(dataset, "to_list"):
        rows = dataset.to_list()
    elif isinstance(dataset, list) and all(isinstance(r, dict) for r in dataset):
        rows = dataset
    else:
        raise ConfigError("preftune.train", field, f"expected a datasets.Dataset or a list of dicts, got "
                          f"{type(dataset).__name__} (a DatasetDict: pass one split, e.g. ds['train'])")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    dest = cache_root() / "inputs" / "data" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.jsonl"
    if not dest.is_file():
        with atomic_path(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return str(dest)


def train(config=None, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
          resume: bool = False, allow_config_change: bool = False, source=None) -> RunResult:
    """Train and return the RunResult (run_dir, steps, summary).

    `config`: a Config, a dict ({"train.lr": 5e-4} or {"train": {"lr": 5e-4}}), a list of
    `section.key=value`, or a YAML path. `model`/`tokenizer` (transformers objects) and
    `train_dataset`/`eval_dataset` (`datasets.Dataset` or lists of dicts, in any format preftune
    reads) take the place of model.name_or_path and data.train_path/eval_path."""
    cfg = _config(config)
    if model is not None:
        cfg.model.name_or_path = _stage_model(model, tokenizer)
    elif tokenizer is not None:
        raise ConfigError("preftune.train", "tokenizer", "given without model=; set model.name_or_path instead")
    if train_dataset is not None:
        cfg.data.train_path = _stage_dataset(train_dataset, "train_dataset")
    if eval_dataset is not None:
        cfg.data.eval_path = _stage_dataset(eval_dataset, "eval_dataset")
    return train_config(cfg, resume=resume, allow_config_change=allow_config_change, source=source)
