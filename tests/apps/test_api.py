"""api.py: preftune.training.train takes the objects a notebook holds, and a Config as before."""

import pytest
import yaml

from conftest import PAIRS
from preftune.utils.errors import ConfigError


def test_objects_are_staged_once_by_content_and_the_run_reopens_them(tmp_path, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import preftune

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = {"train": {"max_steps": 1, "batch_size": 4}, "diagnostics.probe_every": 0,
              "run": {"output_dir": str(tmp_path / "a")}}
    a = preftune.train(model=model, tokenizer=tok, train_dataset=datasets.Dataset.from_list(PAIRS), config=config)
    b = preftune.train(model=model, tokenizer=tok, train_dataset=PAIRS,
                       config={**config, "run": {"output_dir": str(tmp_path / "b")}})
    cfg_a, cfg_b = (yaml.safe_load((r.run_dir / "config.yaml").read_text()) for r in (a, b))
    # the same weights and rows: the same staged directory and file (a Dataset and a list alike)
    assert cfg_a["model"]["name_or_path"] == cfg_b["model"]["name_or_path"]
    assert cfg_a["data"]["train_path"] == cfg_b["data"]["train_path"]
    assert a.steps == b.steps == 1 and a.summary["final"]["loss"] == pytest.approx(b.summary["final"]["loss"], abs=1e-6)


def test_bad_objects_are_one_line(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    import preftune

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="tokenizer: needed with model="):
        preftune.train(model=model)
    with pytest.raises(ConfigError, match="train_dataset: expected a datasets.Dataset or a list of dicts"):
        preftune.train(train_dataset="pairs.jsonl")
    with pytest.raises(ConfigError, match="config: expected a Config"):
        preftune.train(config=3)
