"""Device-correct by construction (issue 12): every tensor that reaches a model goes through
`devices.place`, which puts it on the model's device. Without a GPU this is proven by tagging:
the test wraps `devices.place` so that everything it returns is remembered, and checks in a
forward pre-hook and around `generate` that the model only ever receives remembered tensors
(and on its own device). A path that builds a CPU tensor and hands it straight to the model, as
sampling and eval did, fails here; on a CUDA machine it would have failed at step 1."""

from __future__ import annotations

import weakref

import pytest
import torch

from conftest import PAIRS, write_jsonl

DATA_KEYS = ("input_ids", "position_ids")  # what carries the data; masks and ranges are derived on-device


class DeviceChecker:
    def __init__(self):
        self.placed = {}  # id -> weakref (tensors compare elementwise, so no WeakSet)
        self.problems, self.forwards, self.samplings = [], 0, 0

    def wrap_to(self, to):
        """devices.place moves through devices._to (recursively, via the module global), so
        wrapping _to tags every tensor place returns, wherever place was imported."""
        def tagging(obj, device):
            out = to(obj, device)
            if isinstance(out, torch.Tensor):
                self.placed[id(out)] = weakref.ref(out)
            return out
        return tagging

    def _check(self, where: str, model, kwargs: dict):
        device = next(model.parameters()).device
        for key in DATA_KEYS:
            t = kwargs.get(key)
            ref = self.placed.get(id(t)) if isinstance(t, torch.Tensor) else None
            if isinstance(t, torch.Tensor) and (ref is None or ref() is not t or t.device != device):
                self.problems.append(f"{where}: {key} reached the model without devices.place")

    def attach(self, model):
        checker = self

        def pre_hook(module, args, kwargs):
            checker.forwards += 1
            cache = kwargs.get("past_key_values")
            if kwargs.get("shared_prefix") is not None or cache is not None and cache.get_seq_length() > 0:
                return None  # a decode step: its tokens were drawn on the model's device from its own logits
            checker._check("forward", module, {**dict(zip(("input_ids",), args)), **kwargs})
            return None

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return model


@pytest.fixture
def checker(monkeypatch):
    import transformers

    check = DeviceChecker()
    try:
        import preftune.utils.devices as devices

        monkeypatch.setattr(devices, "_to", check.wrap_to(devices._to))
    except ImportError:  # the code before this helper existed: nothing is ever placed
        pass
    import preftune.models.sampler as sampler

    run_batch = sampler._run_batch

    def counting(*args, **kwargs):  # every sampling path runs its batches through here
        check.samplings += 1
        return run_batch(*args, **kwargs)

    monkeypatch.setattr(sampler, "_run_batch", counting)
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def loading(cls, *args, **kwargs):
        return check.attach(original(cls, *args, **kwargs))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(loading))
    return check


def test_train_with_probes_reference_cache_and_eval_place_every_input(tmp_path, tiny_model_dir, checker, monkeypatch):
    from preftune.config import load_config

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))  # its own reference cache: computed here
    from preftune.apps.eval import run_eval
    from preftune.training.train import train

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    base = [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", f"data.eval_path={data}",
            "data.max_length=64", "data.max_prompt_length=32", "model.lora_r=4", "train.batch_size=4",
            "train.max_steps=2", "diagnostics.probe_every=1", "diagnostics.probe_prompts=2", "eval.max_new_tokens=4"]
    train(load_config(None, [*base, f"run.output_dir={tmp_path / 'a'}", "train.reference_cache=true"]))
    train(load_config(None, [*base, f"run.output_dir={tmp_path / 'b'}", "data.layout=padded"]))
    run_eval(load_config(tmp_path / "a" / "config.yaml"), run_dir=str(tmp_path / "a"), data_path=str(data))
    assert checker.forwards > 10 and checker.samplings >= 4
    assert checker.problems == []


def test_sampling_kl_and_the_demo_scoring_place_every_input(tmp_path, tiny_model_dir, checker, monkeypatch):
    import preftune.apps.demo
    import preftune.models.rewards
    from preftune.models.generate import sample_completions
    from preftune.models.loading import AdaptersOffReference, apply_lora, load_model, load_tokenizer
    from preftune.training.evaluate import kl_estimate

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    samples = sample_completions(model, tok, [tok("The movie was")["input_ids"]], n=2, max_new_tokens=4, seed=0)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    kl_estimate(lora, AdaptersOffReference(lora), samples, pad_id=tok.pad_token_id)
    monkeypatch.setattr(preftune.models.rewards, "sentiment_scores", lambda texts: [len(t) % 7 / 7 for t in texts])
    preftune.apps.demo.run_demo(tmp_path / "demo", quick=True, model=str(tiny_model_dir))
    assert checker.samplings >= 3 and checker.forwards > 5
    assert checker.problems == []


def test_a_path_that_skips_the_helper_is_caught(tiny_model_dir, checker):
    """The checker itself can fail: a raw CPU tensor handed to the model is reported."""
    from preftune.models.loading import load_model

    model = load_model(str(tiny_model_dir))
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert checker.problems == ["forward: input_ids reached the model without devices.place"]


def test_bf16_generation(tiny_model_dir):
    from preftune.models.generate import sample_completions
    from preftune.models.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = sample_completions(model, tok, [tok("The movie was")["input_ids"]], n=2, max_new_tokens=5, seed=0)
    assert len(out) == 2 and all(1 <= len(c) <= 5 for _, c in out)


def test_place_moves_nested_batches_to_the_models_device():
    from preftune.utils.devices import place

    meta = torch.nn.Linear(2, 2, device="meta")
    batch = place({"input_ids": torch.ones(1, 3), "n": 3, "pair": (torch.zeros(2), [torch.zeros(1)])}, meta)
    assert batch["input_ids"].device.type == "meta" and batch["n"] == 3
    assert batch["pair"][0].device.type == "meta" and batch["pair"][1][0].device.type == "meta"
