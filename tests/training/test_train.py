import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import PAIRS, write_jsonl
from preftune.config import load_config
from preftune.training.train import train
from preftune.utils.errors import NumericalError


def _cfg(tmp_path, model_dir, *extra, name="run"):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train_path={data}",
                              f"run.output_dir={tmp_path / name}", "data.max_length=64",
                              "data.max_prompt_length=32", "train.lr=1e-2", "model.lora_r=4",
                              "model.lora_alpha=8", *extra])


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents_and_loss_falls(tmp_path, tiny_model_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, "train.epochs=6", "train.batch_size=4", "loss.beta=0.5",
                        f"data.eval_path={tmp_path / 'pairs.jsonl'}"))
    run = result.run_dir
    rows = _metrics(run)
    assert len(rows) == result.steps == 12
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "lengths/chosen", "lengths/rejected"):
        assert key in rows[0], key
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # step 1: policy == reference
    assert rows[-1]["loss"] < 0.6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["preftune_version"] and saved["train"]["lr"] == 1e-2
    ref = json.loads((run / "reference.json").read_text())
    assert ref["strategy"] == "adapters_off" and len(ref["weights_sha256"]) == 64
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["accuracy/implicit_reward"] >= 0.75
    assert saved["train"]["autocast_bf16"] == "auto" and summary["autocast_bf16"] is False  # auto on CPU: fp32
    assert (run / "model" / "adapter_model.safetensors").is_file()
    assert not [p for p in run.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]


def test_saved_adapter_loads_with_plain_peft_and_reproduces_logps(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.core.logprobs import completion_logps, split_pairs
    from preftune.data import collate_pairs, load_records, tokenize_records

    result = train(_cfg(tmp_path, tiny_model_dir, "train.epochs=2", f"data.eval_path={tmp_path / 'pairs.jsonl'}"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, result.run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(result.run_dir / "model")
    pairs, _ = tokenize_records(load_records(tmp_path / "pairs.jsonl"), tok, max_length=64, max_prompt_length=32)
    with torch.no_grad():
        chosen, rejected = split_pairs(completion_logps(model, collate_pairs(pairs, tok.pad_token_id))[0])
    assert chosen.mean().item() == pytest.approx(result.summary["eval"]["logps/chosen"], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(result.summary["eval"]["logps/rejected"], abs=1e-5)


def test_per_step_loss_matches_a_hand_written_loop(tmp_path, tiny_model_dir, tokenizer):
    """The same LoRA init, data and AdamW, written out with full logits and no Accelerate."""
    from accelerate.utils import set_seed

    from preftune.data import collate_pairs, load_records, tokenize_records
    from preftune.models.loading import apply_lora, load_model

    steps, beta, lr = 4, 0.1, 1e-2
    result = train(_cfg(tmp_path, tiny_model_dir, f"train.max_steps={steps}", "train.batch_size=8", f"loss.beta={beta}",
                        "train.scheduler=constant", "train.warmup_ratio=0", "train.epochs=10"))
    ours = [r["loss"] for r in _metrics(result.run_dir)]

    set_seed(42)
    model = apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pairs, _ = tokenize_records(load_records(tmp_path / "pairs.jsonl"), tokenizer, max_length=64, max_prompt_length=32)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)  # all 8 pairs: order inside a batch does not matter

    def logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        tok = torch.gather(torch.log_softmax(logits, -1), 2, batch["input_ids"][:, 1:, None])[..., 0]
        return (tok * batch["completion_mask"][:, 1:]).sum(1).chunk(2)

    theirs = []
    for _ in range(steps):
        with torch.no_grad(), model.disable_adapter():
            rc, rr = logps(model)
        pc, pr = logps(model)
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        theirs.append(loss.item())
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-6, (ours, theirs)
    assert theirs[-1] < theirs[0]


def test_accumulation_equivalence(tmp_path, tiny_model_dir):
    """batch 8 x accumulation 1 == batch 1 x accumulation 8, step by step."""
    common = ["train.scheduler=constant", "train.warmup_ratio=0", "train.epochs=3"]
    a = train(_cfg(tmp_path, tiny_model_dir, "train.batch_size=8", "train.grad_accum=1", *common, name="a"))
    b = train(_cfg(tmp_path, tiny_model_dir, "train.batch_size=1", "train.grad_accum=8", *common, name="b"))
    la, lb = [r["loss"] for r in _metrics(a.run_dir)], [r["loss"] for r in _metrics(b.run_dir)]
    assert len(la) == len(lb) == 3
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)


def test_full_finetuning_uses_a_frozen_copy_and_saves_an_hf_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result = train(_cfg(tmp_path, tiny_model_dir, "model.lora=false", "train.lr=1e-3", "train.max_steps=2"))
    ref = json.loads((result.run_dir / "reference.json").read_text())
    assert ref["strategy"] == "frozen_copy"
    model = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert (result.run_dir / "model" / "model.safetensors").is_file()


def test_huge_learning_rate_stops_with_numerical_error(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "train.lr=1e30", "train.epochs=20", "train.batch_size=2",
               "train.max_grad_norm=0")
    with pytest.raises(NumericalError, match="not finite"):
        train(cfg)
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("name", sorted(n for n, s in __import__("preftune.core.losses", fromlist=["LOSSES"]).LOSSES.items()
                                         if s.kind.command == "train"))
# rollout losses sample: tests/runs/online/test_grpo_online.py; demonstrations: tests/runs/test_sft.py
def test_every_registered_loss_trains_on_the_tiny_model(tmp_path, tiny_model_dir, name):
    from preftune.core.losses import LOSSES

    spec = LOSSES[name]
    extra = [] if spec.kind.data == "pairs" else ["data.paired_to_unpaired=true"]
    result = train(_cfg(tmp_path, tiny_model_dir, f"loss.name={name}", "train.epochs=3", "train.batch_size=4",
                        f"data.eval_path={tmp_path / 'pairs.jsonl'}", *extra))
    rows = _metrics(result.run_dir)
    assert len(rows) == result.steps > 0
    assert all(np.isfinite(r["loss"]) for r in rows)
    ref = json.loads((result.run_dir / "reference.json").read_text())
    assert ref["strategy"] == ("adapters_off" if spec.needs_reference else "none")
    assert 0.0 <= result.summary["eval"]["accuracy/logp"] <= 1.0
    if spec.kind.data == "unpaired":
        assert rows[0]["examples/desirable"] + rows[0]["examples/undesirable"] == 4  # one batch
        assert "kl" in rows[0]


def test_reference_free_full_finetuning_never_copies_the_model(tmp_path, tiny_model_dir, monkeypatch):
    import sys

    train_module = sys.modules["preftune.training.train"]  # the package attribute `train` is the function

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference was built for a reference-free loss")

    monkeypatch.setattr(train_module, "build_reference", forbidden)
    monkeypatch.setattr(train_module, "weights_sha256", forbidden)
    result = train(_cfg(tmp_path, tiny_model_dir, "loss.name=simpo", "loss.beta=2.0", "model.lora=false",
                        "train.lr=1e-3", "train.max_steps=2"))
    assert result.summary["reference"]["strategy"] == "none"


def test_kto_auto_weights_and_eval_prompt_removal(tmp_path, tiny_model_dir):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i % 2 == 1} for i, p in enumerate(PAIRS)]
    unpaired = write_jsonl(tmp_path / "u.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", PAIRS[:1])  # its prompt occurs twice in u.jsonl
    result = train(_cfg(tmp_path, tiny_model_dir, "loss.name=kto", f"data.train_path={unpaired}",
                        f"data.eval_path={held}", "data.drop_eval_prompts=true", "loss.kto_auto_weights=true",
                        "train.max_steps=2"))
    data = result.summary["data"]
    assert data["dropped_eval_prompts"] == 2 and data["pairs"] == 6
    assert (data["desirable"], data["undesirable"]) == (4, 2)  # rows 0 and 4 (undesirable) were held out
    assert result.summary["loss_params"]["desirable_weight"] == 1.0
    assert result.summary["loss_params"]["undesirable_weight"] == 2.0


def test_kto_packed_rows_with_a_shared_prompt_train_exactly_like_padded_rows(tmp_path, tiny_model_dir):
    """Each KTO example and its KL row (prompt i, completion i+1) share prompt i: packed with prefix
    sharing the prompt is processed once. Per-step losses, grad norms and the KL anchor equal the
    padded rows', and the layout the run used is the one it records."""
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": i % 3 != 0}
            for i, p in enumerate(PAIRS)]
    unpaired = write_jsonl(tmp_path / "u.jsonl", rows)
    runs = {}
    for layout in ("packed", "padded"):
        runs[layout] = train(_cfg(tmp_path, tiny_model_dir, "loss.name=kto", f"data.train_path={unpaired}",
                                  f"data.layout={layout}", "train.batch_size=4", "train.epochs=3", name=layout))
    packed, padded = (_metrics(runs[k].run_dir) for k in ("packed", "padded"))
    assert runs["packed"].summary["layout"]["layout"] == "packed"
    assert runs["packed"].summary["layout"]["prefix_sharing"] is True
    assert runs["padded"].summary["layout"]["layout"] == "padded"
    assert len(packed) == len(padded) >= 4
    assert any(r["loss"] != packed[0]["loss"] for r in packed)  # it trained
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)


def test_kto_steps_of_one_class_log_only_their_side(tmp_path, tiny_model_dir, capsys):
    labels = [True, True, False, False, True, False]
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": y} for p, y in zip(PAIRS, labels)]
    unpaired = write_jsonl(tmp_path / "u.jsonl", rows)
    result = train(_cfg(tmp_path, tiny_model_dir, "loss.name=kto", f"data.train_path={unpaired}", "train.shuffle=false",
                        "train.batch_size=2", "train.log_every=1"))
    got = _metrics(result.run_dir)
    assert [(r["examples/desirable"], r["examples/undesirable"]) for r in got] == [(2, 0), (0, 2), (1, 1)]
    assert "rewards/rejected" not in got[0] and "rewards/chosen" not in got[1] and "rewards/margins" in got[2]
    assert not any(r["health"] for r in got) and "nonfinite" not in capsys.readouterr().out


def test_rpo_mixture_logs_each_term(tmp_path, tiny_model_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, "loss.mix=[[sigmoid, 1.0], [sft, 0.2]]", "train.max_steps=2"))
    row = _metrics(result.run_dir)[0]
    assert row["loss"] == pytest.approx(row["loss/sigmoid"] + 0.2 * row["loss/sft"], abs=1e-5)
    assert result.summary["loss"] == "1*sigmoid+0.2*sft"


def test_degenerate_pairs_raise_the_margin_stuck_flag(tmp_path, tiny_model_dir, capsys):
    """RELIABILITY C5: chosen == rejected (kept on purpose) gives zero gradient; the run says so."""
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["chosen"]} for p in PAIRS]
    data = write_jsonl(tmp_path / "same.jsonl", rows)
    result = train(_cfg(tmp_path, tiny_model_dir, f"data.train_path={data}", "data.allow_degenerate=true",
                        "train.epochs=5", "train.batch_size=4"))
    assert result.summary["data"]["degenerate_kept"] == 8
    assert result.summary["health"] == {"margin_stuck": 10}
    assert capsys.readouterr().out.count("health: margin_stuck at step 10") == 1
    assert _metrics(result.run_dir)[-1]["health"] == ["margin_stuck"]


def test_probe_rows_carry_kl_lengths_and_eval_accuracy(tmp_path, tiny_model_dir):
    result = train(_cfg(tmp_path, tiny_model_dir, "train.epochs=3", "train.batch_size=4", "diagnostics.probe_every=2",
                        "diagnostics.probe_prompts=3", "eval.max_new_tokens=6",
                        f"data.eval_path={tmp_path / 'pairs.jsonl'}"))
    rows = _metrics(result.run_dir)
    probed = [r["step"] for r in rows if "probe/kl" in r]
    assert probed == [2, 4, 6]
    first = next(r for r in rows if "probe/kl" in r)
    assert first["probe/kl"] != 0 and abs(first["probe/kl"]) < 5 and 1 <= first["probe/sample_length"] <= 6
    assert 0 <= first["probe/eval_accuracy"] <= 1 and first["probe/reference_length"] > 0
    assert len({r["probe/reference_length"] for r in rows if "probe/kl" in r}) == 1  # measured once


def test_probe_does_not_change_the_training_trajectory(tmp_path, tiny_model_dir):
    """Sampling runs in a forked RNG: losses with and without probes are identical (dropout on)."""
    common = ("train.epochs=2", "train.batch_size=4", "model.lora_dropout=0.1", "eval.max_new_tokens=4")
    a = train(_cfg(tmp_path, tiny_model_dir, *common, "diagnostics.probe_every=1", name="a"))
    b = train(_cfg(tmp_path, tiny_model_dir, *common, "diagnostics.probe_every=0", name="b"))
    assert [r["loss"] for r in _metrics(a.run_dir)] == [r["loss"] for r in _metrics(b.run_dir)]


def test_stop_on_kl_drift_ends_the_run_early_and_saves_the_model(tmp_path, tiny_model_dir, capsys):
    result = train(_cfg(tmp_path, tiny_model_dir, "train.epochs=5", "train.batch_size=4", "diagnostics.probe_every=3",
                        "diagnostics.kl_max=-100", "diagnostics.stop_on=[kl_drift]", "eval.max_new_tokens=4"))
    assert result.summary["stopped_early"] == {"check": "kl_drift", "step": 3}
    assert result.steps == 3 and len(_metrics(result.run_dir)) == 3
    assert "stopping early: kl_drift at step 3" in capsys.readouterr().out
    assert (result.run_dir / "model" / "adapter_model.safetensors").is_file()


def test_tensorboard_tracker_receives_the_metrics(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")  # a dev dependency: installed by `make test`
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls, real = [], Accelerator.init_trackers
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, *a, **k: calls.append((a, k)) or real(self, *a, **k))
    result = train(_cfg(tmp_path, tiny_model_dir, "train.epochs=2", "train.batch_size=4", "train.tracker_project=tiny",
                        "train.report_to=[tensorboard]", "diagnostics.probe_every=0"))
    assert calls[0][0] == ("tiny",) and calls[0][1]["init_kwargs"] == {}  # tensorboard: the run's own directory
    events = list((result.run_dir / "trackers" / "tiny").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in _metrics(result.run_dir)], abs=1e-6)


def test_trackers_get_the_run_name_under_their_own_keyword():
    from preftune.config import run_name
    from preftune.training.train import tracker_kwargs

    assert tracker_kwargs(["wandb", "tensorboard", "mlflow"], "dpo-hh") == {
        "wandb": {"name": "dpo-hh"}, "mlflow": {"run_name": "dpo-hh"}}
    assert tracker_kwargs(["all"], "x")["trackio"] == {"name": "x"}
    assert tracker_kwargs([], "x") == {}
    cfg = load_config(None, ["run.output_dir=runs/mine/"])
    assert run_name(cfg) == "mine" and run_name(load_config(None, ["run.name=first try"])) == "first try"


def test_reference_cache_equals_the_live_reference_and_is_reused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from preftune.models.loading import AdaptersOffReference

    # its own cache: a "before" eval elsewhere in the session may have stored these pairs' logps already
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))

    calls = []
    original = AdaptersOffReference.context
    monkeypatch.setattr(AdaptersOffReference, "context", lambda self: calls.append(1) or original(self))
    common = ("train.epochs=3", "train.batch_size=4", "diagnostics.probe_every=0", "eval.batch_size=8")
    live = train(_cfg(tmp_path, tiny_model_dir, *common, name="live"))
    live_calls, calls[:] = len(calls), []
    cached = train(_cfg(tmp_path, tiny_model_dir, *common, "train.reference_cache=true", name="cached"))
    assert live_calls == 6 and len(calls) == 1  # one no-grad pass over the 8 pairs, none per step
    assert "computed and cached in" in capsys.readouterr().out
    a, b = _metrics(live.run_dir), _metrics(cached.run_dir)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-5), key
    calls[:] = []
    train(_cfg(tmp_path, tiny_model_dir, *common, "train.reference_cache=true", name="again"))
    assert calls == [] and "read from" in capsys.readouterr().out  # another run: nothing recomputed
    from safetensors.torch import load_file

    from preftune.utils.envvars import cache_root

    files = list((cache_root() / "reference_logps").glob("*.safetensors"))
    assert files and {load_file(str(f))["logps"].shape[0] for f in files} == {8}


def test_reference_cache_key_changes_with_every_input():
    from preftune.data.refcache import cache_key

    base = dict(reference_sha256="a", tokenizer_sha256="t", data_sha256="d", data_settings={"max_length": 64})
    keys = {cache_key(**base), cache_key(**{**base, "reference_sha256": "b"}), cache_key(**{**base, "tokenizer_sha256": "u"}),
            cache_key(**{**base, "data_sha256": "e"}), cache_key(**{**base, "data_settings": {"max_length": 65}})}
    assert len(keys) == 5 and cache_key(**base) == cache_key(**dict(base))


def test_gradient_checkpointing_keeps_every_step_identical(tmp_path, tiny_model_dir):
    """Same per-step losses and grad norms, and the same final adapter, with activations
    recomputed in the backward pass (LoRA with dropout, packed rows with prefix sharing)."""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", "train.lr=1e-2", "model.lora_r=4",
              "model.lora_dropout=0.1", "train.batch_size=4", "train.epochs=2", "diagnostics.probe_every=0"]
    plain = train(load_config(None, [*common, f"run.output_dir={tmp_path / 'plain'}"]))
    ckpt = train(load_config(None, [*common, f"run.output_dir={tmp_path / 'gc'}", "model.gradient_checkpointing=true"]))
    a, b = _metrics(plain.run_dir), _metrics(ckpt.run_dir)
    assert (plain.summary["gradient_checkpointing"], ckpt.summary["gradient_checkpointing"]) == (False, True)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_trains_lora_on_a_4bit_base_and_the_adapter_reloads(tmp_path, qlora_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.core.logprobs import completion_logps, split_pairs
    from preftune.data import collate_pairs, load_records, tokenize_records
    from preftune.models.loading import quantization_config
    from preftune.models.qlora import keep_one_cpu_path

    result = train(_cfg(tmp_path, qlora_model_dir, "model.load_in_4bit=true", "train.epochs=6", "train.batch_size=4",
                        "loss.beta=0.5", f"data.eval_path={tmp_path / 'pairs.jsonl'}"))
    rows = _metrics(result.run_dir)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # reference = the 4-bit base, adapters off
    assert rows[-1]["loss"] < 0.6
    ref = json.loads((result.run_dir / "reference.json").read_text())
    assert ref["strategy"] == "adapters_off" and ref["quantization"] == "4bit-nf4"
    assert result.summary["quantization"] == "4bit-nf4"
    # the adapter on the same 4-bit base, loaded with plain transformers + peft, gives the run's eval
    base = AutoModelForCausalLM.from_pretrained(qlora_model_dir, quantization_config=quantization_config(
        "nf4", "float32", "cpu"))
    model = PeftModel.from_pretrained(base, result.run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(result.run_dir / "model")
    pairs, _ = tokenize_records(load_records(tmp_path / "pairs.jsonl"), tok, max_length=64, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        plain, _ = split_pairs(completion_logps(model, batch)[0])
    # plain bitsandbytes on an AVX512-BF16 CPU runs eval-mode 4-bit matmuls in a bf16 layout (qlora.py):
    # the same adapter to ~1e-3 nats on a ~42-nat sum there, exactly elsewhere
    assert plain.mean().item() == pytest.approx(result.summary["eval"]["logps/chosen"], rel=1e-3)
    fresh = AutoModelForCausalLM.from_pretrained(qlora_model_dir, quantization_config=quantization_config(
        "nf4", "float32", "cpu"))
    keep_one_cpu_path(fresh)  # what preftune does on load: then the run's figure to fp32 rounding
    model = PeftModel.from_pretrained(fresh, result.run_dir / "model").eval()
    with torch.no_grad():
        chosen, _ = split_pairs(completion_logps(model, batch)[0])
    assert chosen.mean().item() == pytest.approx(result.summary["eval"]["logps/chosen"], abs=1e-4)


def test_reference_cache_refuses_data_without_a_file_hash(tmp_path, tiny_model_dir):
    """A dataset directory (or hub dataset) has no sha256 to key the cache: another dataset's
    cached logps, under the same record indices, would be read back as this one's."""
    import datasets

    from preftune.utils.errors import ConfigError

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "dsdir"))
    with pytest.raises(ConfigError, match="train.reference_cache: needs a data file"):
        train(_cfg(tmp_path, tiny_model_dir, f"data.train_path={tmp_path / 'dsdir'}", "train.reference_cache=true",
                   "train.max_steps=1"))


def _scripted_probe_accuracy(monkeypatch, accuracies: dict):
    """The probe runs as usual, but reports held-out accuracy `accuracies[step]` (so the best step
    is known in advance, whatever the tiny model does)."""
    import sys

    train_module = sys.modules["preftune.training.train"]
    real = train_module.run_probe

    def scripted(model, reference, tokenizer, source, spec, loss_kwargs, cfg, step, baseline, total_steps):
        return {**real(model, reference, tokenizer, source, spec, loss_kwargs, cfg, step, baseline, total_steps),
                "probe/eval_accuracy": accuracies[step]}

    monkeypatch.setattr(train_module, "run_probe", scripted)


def _trainable_of(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_keep_best_ends_at_the_best_probe(tmp_path, tiny_model_dir, monkeypatch):
    """Probes say step 3 was best (0.9); a plain run's checkpoint of step 3 holds the very weights
    keep_best restores, evaluates and saves; the last step's weights are not what is saved."""
    from safetensors.torch import load_file

    accuracies = {1: 0.5, 2: 0.6, 3: 0.9, 4: 0.7, 5: 0.9, 6: 0.6}  # ties keep the earlier step
    common = ("train.epochs=3", "train.batch_size=4", "diagnostics.probe_every=1", "model.lora_dropout=0.0",
              f"data.eval_path={tmp_path / 'pairs.jsonl'}", "diagnostics.probe_prompts=2", "eval.max_new_tokens=4")
    _scripted_probe_accuracy(monkeypatch, accuracies)
    best = train(_cfg(tmp_path, tiny_model_dir, "train.keep_best=true", *common, name="best"))
    plain = train(_cfg(tmp_path, tiny_model_dir, "train.checkpoint_every=1", "train.keep_last=10", *common,
                       name="plain"))
    assert best.summary["best"] == {"step": 3, "accuracy": 0.9, "restored": True}
    kept = load_file(best.run_dir / "best" / "step-00000003.safetensors")
    at3 = load_file(plain.run_dir / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert kept.keys() == at3.keys() and all(torch.equal(kept[k], at3[k]) for k in kept)
    saved = {k.replace(".weight", ".default.weight"): v
             for k, v in load_file(best.run_dir / "model" / "adapter_model.safetensors").items()}
    last = {k.replace(".weight", ".default.weight"): v
            for k, v in load_file(plain.run_dir / "model" / "adapter_model.safetensors").items()}
    assert all(torch.equal(saved[k], at3[k]) for k in at3)
    assert not all(torch.equal(last[k], at3[k]) for k in at3)
    assert best.summary["eval"]["accuracy/implicit_reward"] != plain.summary["eval"]["accuracy/implicit_reward"] \
        or best.summary["eval"]["rewards/margins"] != plain.summary["eval"]["rewards/margins"]


def test_keep_best_never_keeps_the_probe_a_stop_on_check_fired_at(tmp_path, tiny_model_dir, monkeypatch):
    """Step 3's probe has the best accuracy but kl_drift fires there and stop_on stops the run: the
    run ends at step 2's weights, the best probe before the refused state, not at step 3's."""
    import sys

    train_module = sys.modules["preftune.training.train"]
    real = train_module.health_checks
    monkeypatch.setattr(train_module, "health_checks",
                        lambda history, **kw: real(history, **kw) + (["kl_drift"] if history[-1]["step"] == 3 else []))
    _scripted_probe_accuracy(monkeypatch, {1: 0.5, 2: 0.6, 3: 0.9, 4: 0.9})
    got = train(_cfg(tmp_path, tiny_model_dir, "train.keep_best=true", "diagnostics.stop_on=[kl_drift]",
                     "train.epochs=3", "train.batch_size=4", "diagnostics.probe_every=1", "model.lora_dropout=0.0",
                     f"data.eval_path={tmp_path / 'pairs.jsonl'}", "diagnostics.probe_prompts=2",
                     "eval.max_new_tokens=4", name="stopped"))
    assert got.summary["stopped_early"] == {"check": "kl_drift", "step": 3}
    assert got.summary["best"] == {"step": 2, "accuracy": 0.6, "restored": True}
    assert [p.name for p in (got.run_dir / "best").iterdir()] == ["step-00000002.safetensors"]


def test_keep_best_survives_a_resume_and_is_refused_without_probes(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import interrupt_after_checkpoint
    from preftune.utils.errors import ConfigError

    accuracies = {1: 0.5, 2: 0.8, 3: 0.6, 4: 0.7, 5: 0.6, 6: 0.6}
    common = ("train.epochs=3", "train.batch_size=4", "diagnostics.probe_every=1", "model.lora_dropout=0.0",
              f"data.eval_path={tmp_path / 'pairs.jsonl'}", "diagnostics.probe_prompts=2", "eval.max_new_tokens=4",
              "train.keep_best=true", "train.checkpoint_every=1")
    _scripted_probe_accuracy(monkeypatch, accuracies)
    full = train(_cfg(tmp_path, tiny_model_dir, *common, name="full"))
    interrupt_after_checkpoint(monkeypatch, 4, lambda: train(_cfg(tmp_path, tiny_model_dir, *common, name="cut")))
    _scripted_probe_accuracy(monkeypatch, accuracies)  # interrupt_after_checkpoint undid the patches
    resumed = train(_cfg(tmp_path, tiny_model_dir, *common, name="cut"), resume=True)
    assert resumed.summary["best"] == full.summary["best"] == {"step": 2, "accuracy": 0.8, "restored": True}
    a = (full.run_dir / "model" / "adapter_model.safetensors").read_bytes()
    assert a == (resumed.run_dir / "model" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="probe_every"):
        load_config(None, ["train.keep_best=true", "diagnostics.probe_every=0"])
    with pytest.raises(ConfigError, match="data.eval_path"):
        train(_cfg(tmp_path, tiny_model_dir, "train.keep_best=true", name="noeval"))


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A write error on metrics.jsonl was exit 1 with no file named."""
    import errno

    from preftune.cli import main
    from preftune.training.train import RunLog

    real = RunLog.record

    def full(self, row):
        class Full:
            def write(self, _text):
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                pass
        self.metrics = Full()
        return real(self, row)

    monkeypatch.setattr(RunLog, "record", full)
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    rc = main(["train", f"data.train_path={data}", f"model.name_or_path={tiny_model_dir}", "train.max_steps=1",
               f"run.output_dir={tmp_path / 'run'}", "diagnostics.probe_every=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"{tmp_path / 'run' / 'metrics.jsonl'}: metrics.jsonl: "
                                                           "not written: no space left on the device"), err
