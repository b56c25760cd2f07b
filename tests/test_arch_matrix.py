"""The architecture matrix (issue 12): a tiny random model per decoder architecture, built from its
config offline. For each: completion log-probs in every layout equal each sequence forwarded
alone (fp32); a 3-step LoRA DPO run with `all-linear` targets; the adapter reloads with plain peft
and reproduces the run's held-out log-probs. Sliding windows are smaller than the test
sequences, so they are exercised, and Gemma 2 has soft-capping on."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PAIRS, write_jsonl

TOL = 1e-4  # nats per sequence


def _configs(vocab: int, eos: int, pad: int) -> dict:
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=eos, pad_token_id=pad, bos_token_id=None, tie_word_embeddings=True)
    return {
        "llama": tf.LlamaConfig(**common),
        "mistral": tf.MistralConfig(**common, sliding_window=6),
        "qwen2": tf.Qwen2Config(**common, use_sliding_window=False),
        "qwen3": tf.Qwen3Config(**common, head_dim=8),
        "gemma2": tf.Gemma2Config(**common, head_dim=8, sliding_window=6, attn_logit_softcapping=20.0,
                                  final_logit_softcapping=15.0, query_pre_attn_scalar=8),
        "gemma3_text": tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                                           layer_types=["sliding_attention", "full_attention"]),
        "phi3": tf.Phi3Config(**{**common, "bos_token_id": 1}),
        "gpt2": tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                              eos_token_id=eos, pad_token_id=pad, bos_token_id=eos),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                                     eos_token_id=eos, pad_token_id=pad, bos_token_id=eos),
        "olmo2": tf.Olmo2Config(**common),
    }


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "olmo2"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("archs")
    configs = _configs(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    out = {}
    for name in ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(configs[name], dtype=torch.float32)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_layouts_agree_with_single_sequences(arch, arch_dirs, tokenizer):
    from preftune.config import load_config
    from preftune.data.layouts import check_layouts, choose_layout
    from preftune.data.prepare import prepare_pairs
    from preftune.models.loading import load_model

    model = load_model(str(arch_dirs[arch])).eval()
    assert model.config.model_type == arch
    # prompts longer than the sliding windows (6 tokens), completions of different lengths
    rows = [{"prompt": p["prompt"] + " and then the story goes on", "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in PAIRS[:4]]
    path = write_jsonl(arch_dirs[arch] / "pairs.jsonl", rows)
    pairs, _ = prepare_pairs(str(path), load_config(None, ["data.max_length=64", "data.max_prompt_length=48"]), tokenizer)
    deltas = check_layouts(model, pairs, tokenizer.pad_token_id)
    said = []
    layout, sharing, _ = choose_layout(model, pairs, tokenizer.pad_token_id, layout="packed", prefix_sharing=True,
                                       max_length=64, name=arch, log=said.append)
    print(f"{arch}: {deltas} -> {layout}, prefix_sharing={sharing}")
    assert deltas["padded"] <= TOL, deltas
    used = "packed_shared" if layout == "packed" and sharing else layout
    assert deltas[used] <= TOL, (deltas, layout, sharing)  # never silently wrong numbers
    if deltas["packed_shared"] > TOL:
        assert len(said) == 1 and arch in said[0] and "data.layout=padded" in said[0]
    else:
        assert (layout, sharing, said) == ("packed", True, [])  # no fallback where packing is exact


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_all_linear_dpo_and_plain_peft_reload(arch, arch_dirs, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.config import load_config
    from preftune.core.losses import LOSSES
    from preftune.data.prepare import prepare_pairs
    from preftune.models.loading import AdaptersOffReference
    from preftune.training.evaluate import evaluate_pairs
    from preftune.training.train import train

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    cfg = load_config(None, [f"model.name_or_path={arch_dirs[arch]}", f"data.train_path={data}",
                             f"data.eval_path={data}", f"run.output_dir={tmp_path / 'run'}", "data.max_length=64",
                             "data.max_prompt_length=32", "model.lora_r=4", "model.lora_target_modules=all-linear",
                             "train.lr=1e-2", "train.max_steps=3", "train.epochs=2", "train.batch_size=4",
                             "diagnostics.probe_every=0"])
    result = train(cfg)
    assert result.steps == 3
    assert result.summary["layout"]["layout"] == "packed"  # exact everywhere, sliding windows included
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert adapter["target_modules"]  # peft expanded all-linear into this architecture's linear layers
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(arch_dirs[arch]),
                                       str(tmp_path / "run" / "model")).eval()
    pairs, _ = prepare_pairs(str(data), cfg, tokenizer)
    again = evaluate_pairs(policy, AdaptersOffReference(policy), LOSSES["sigmoid"], pairs,
                           loss_kwargs={"beta": cfg.loss.beta}, batch_size=8, pad_id=tokenizer.pad_token_id)
    ev = result.summary["eval"]
    assert again["logps/chosen"] == pytest.approx(ev["logps/chosen"], abs=TOL)
    assert again["rewards/margins"] == pytest.approx(ev["rewards/margins"], abs=TOL)
    assert abs(ev["rewards/margins"]) > 0  # the adapter changed something


def test_a_model_that_ignores_the_packed_mask_falls_back_and_says_so_once(arch_dirs, tokenizer, monkeypatch, tmp_path, capsys):
    """What the windowed mask fixed is the detector's job elsewhere: with the window left out of
    the packed mask (as before), mistral's packed numbers are off and training falls back."""
    import preftune.core.attention as at
    import preftune.core.logprobs as lp
    from preftune.config import load_config
    from preftune.training.train import train

    plain = lambda model, batch, dtype: torch.zeros(lp.dense_mask(batch).shape, dtype=dtype).masked_fill(  # noqa: E731
        ~lp.dense_mask(batch), torch.finfo(dtype).min)
    monkeypatch.setattr(lp, "packed_attention_mask", plain)  # the dense-mask route, without the window
    real = at.segment_mask
    monkeypatch.setattr(at, "segment_mask", lambda q, k, window: real(q, k, None))  # the block route, likewise
    rows = [{"prompt": p["prompt"] + " and then the story goes on", "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in PAIRS]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"model.name_or_path={arch_dirs['mistral']}", f"data.train_path={data}",
                             f"run.output_dir={tmp_path / 'run'}", "data.max_length=64", "data.max_prompt_length=48",
                             "model.lora_r=4", "train.max_steps=2", "train.batch_size=4", "diagnostics.probe_every=0"])
    result = train(cfg)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layout:")]
    assert len(said) == 1 and "does not honour" in said[0] and "data.layout=padded" in said[0]
    assert result.summary["layout"]["layout"] == "padded" and result.summary["layout"]["checked"]["packed_shared"] > 1e-3
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "layout: padded" in saved  # the config written is the one that ran
