"""shared_prefix.py: the sampler's decode attention over prompt K/V stored once per prompt.

Oracle: the DynamicCache route (each prompt's cache copied to its rows, the library's attention),
fed the same tokens. Tiny random models of the architecture matrix (tests/test_arch_matrix.py),
matrices redrawn at std 0.3 so that attention is far from uniform and a wrong mask, head order or
scale moves the logits well beyond the 1e-5 tolerance.
"""

from __future__ import annotations

import pytest
import torch

import preftune.models.sampler as sampler
from preftune.models import shared_prefix
from preftune.models.sampler import sample

TOL = 1e-5
VOCAB, PAD, EOS = 96, 0, 1
BIG = 4096  # a sliding window that never binds at these lengths


def _config(arch: str, window: int):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD,
                  bos_token_id=None, tie_word_embeddings=True)
    return {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=window),
        "qwen2": lambda: tf.Qwen2Config(**common, use_sliding_window=False),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, sliding_window=window, attn_logit_softcapping=20.0,
                                          final_logit_softcapping=15.0, query_pre_attn_scalar=8),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=window, query_pre_attn_scalar=8,
                                                   layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: tf.Phi3Config(**{**common, "bos_token_id": 1}),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                                             eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS),
    }[arch]()


def _model(arch: str, window: int = BIG, std: float = 0.3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, window), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neox"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36], [40]]


def _decode(model, route, prompts, counts, steps, leave):
    """Logits of every decode step through `route` (sampler._CopiedCache or _SharedPrefix) for the
    left-padded batch of `prompts` with counts[i] rows each; row r feeds token (7 r + 3 s) % VOCAB
    at step s, and rows in leave[s] leave after step s. Returns [(rows, V) per step]."""
    from transformers import DynamicCache

    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    row_slot = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    out = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out.append(sampler._step(model, ids, mask, positions, cache)[row_slot])
        decoder = route(model, cache, mask, row_slot, steps) if route is sampler._SharedPrefix else \
            route(model, cache, mask, row_slot)
        live, next_pos = torch.arange(len(row_slot)), positions[row_slot, -1] + 1
        with decoder.context:
            for step in range(steps - 1):
                keep = torch.tensor([i for i, r in enumerate(live.tolist()) if r not in leave.get(step, ())])
                if keep.numel() < live.numel():
                    decoder.keep(keep)
                    live, next_pos = live[keep], next_pos[keep]
                out.append(decoder.step((7 * live + 3 * step) % VOCAB, next_pos))
                next_pos = next_pos + 1
    return out


def _assert_routes_agree(model, prompts, counts, steps, leave):
    old = _decode(model, sampler._CopiedCache, prompts, counts, steps, leave)
    new = _decode(model, sampler._SharedPrefix, prompts, counts, steps, leave)
    assert [o.shape for o in old] == [n.shape for n in new]
    worst = max((o - n).abs().max().item() for o, n in zip(old, new))
    scale = max(o.abs().max().item() for o in old)
    assert worst <= TOL, (worst, scale)
    assert scale > 1.0  # logits far from flat: a wrong attention would show


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_logits_equal_the_copied_cache_route(arch, monkeypatch):
    """Prompts of 11, 3, 7 and 1 tokens (left-padded to 11) with 3, 1, 2 and 2 rows (not a
    regular grid), 9 steps with suffix buffers starting at 2 slots (so they double twice); rows
    leave after steps 1, 3 and 5, the 3-token prompt's only row among the first (its K/V dropped)."""
    monkeypatch.setattr(shared_prefix, "_FIRST_CAPACITY", 2)
    model = _model(arch)
    assert shared_prefix.unsupported(model, _prefill_cache(model), 11 + 9) is None
    _assert_routes_agree(model, PROMPTS, [3, 1, 2, 2], 9, {1: {3}, 3: {0, 6}, 5: {5}})


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_regular_grid_and_one_row_per_prompt(arch):
    """n rows for every prompt (the grid is a view of the rows), and n=1; no row leaves, then all
    rows of the first prompt leave at once (the grid stays regular with one prompt fewer)."""
    model = _model(arch)
    _assert_routes_agree(model, PROMPTS, [4, 4, 4, 4], 6, {})
    _assert_routes_agree(model, PROMPTS, [1, 1, 1, 1], 6, {})
    _assert_routes_agree(model, PROMPTS, [2, 2, 2, 2], 6, {2: {0, 1}})


def test_bf16_model_as_accurate_as_the_copied_cache_route():
    """A bf16 model: logits in bf16, and no further from the same weights' fp32 logits than the
    DynamicCache route's (the route keeps K/V and scores in fp32, as SDPA does internally)."""
    model = _model("llama").to(torch.bfloat16)
    wide = _decode(_model("llama").to(torch.bfloat16).float(), sampler._CopiedCache, PROMPTS, [2, 1, 1, 2], 5, {})
    old = _decode(model, sampler._CopiedCache, PROMPTS, [2, 1, 1, 2], 5, {})
    new = _decode(model, sampler._SharedPrefix, PROMPTS, [2, 1, 1, 2], 5, {})
    assert {n.dtype for n in new} == {torch.bfloat16}
    error = lambda run: max((r.float() - w).abs().max().item() for r, w in zip(run, wide))  # noqa: E731
    print(f"bf16 max |logit - fp32 logit|: copied cache {error(old):.4f}, shared prefix {error(new):.4f}")
    assert error(new) <= 1.25 * error(old) + 1e-3


def _prefill_cache(model):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
    return cache


# ---- where the route does not apply: the DynamicCache route is taken ------------------------------

def _routes_taken(monkeypatch) -> list:
    taken = []
    real = sampler._decoder

    def spy(*args):
        decoder = real(*args)
        taken.append(type(decoder).__name__)
        return decoder
    monkeypatch.setattr(sampler, "_decoder", spy)
    return taken


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
def test_a_binding_sliding_window_takes_the_copied_cache_route(arch, monkeypatch):
    """Window 6 < prompt + new tokens: the route would attend past the window, so it is refused
    and sampling decodes on the DynamicCache; greedy completions equal HF generate per prompt."""
    model = _model(arch, window=6)
    assert "sliding window" in shared_prefix.unsupported(model, _prefill_cache(model), 20)
    taken = _routes_taken(monkeypatch)
    out = sample(model, PROMPTS, n=1, max_new_tokens=8, greedy=True, seed=0, eos_id=-1, pad_id=PAD)
    assert set(taken) == {"_CopiedCache"}
    assert [s.completion for s in out] == [_hf_greedy(model, p, 8) for p in PROMPTS]


def test_an_unchecked_model_type_takes_the_copied_cache_route(monkeypatch):
    model = _model("llama")
    monkeypatch.setattr(shared_prefix, "MODEL_TYPES", frozenset({"qwen2"}))
    assert "not one this route was checked on" in shared_prefix.unsupported(model, _prefill_cache(model), 20)
    taken = _routes_taken(monkeypatch)
    sample(model, PROMPTS, n=2, max_new_tokens=4, seed=0, eos_id=-1, pad_id=PAD)
    assert set(taken) == {"_CopiedCache"}


def _hf_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=steps, eos_token_id=-1, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate_per_prompt_on_the_route(arch, monkeypatch):
    """Greedy sampling of a left-padded batch (prompts of 1 to 11 tokens) through the shared-prefix
    route equals HF generate on each prompt alone, for every architecture of the matrix."""
    model = _model(arch)
    taken = _routes_taken(monkeypatch)
    out = sample(model, PROMPTS, n=2, max_new_tokens=8, greedy=True, seed=0, eos_id=-1, pad_id=PAD)
    assert set(taken) == {"_SharedPrefix"}
    expected = [_hf_greedy(model, p, 8) for p in PROMPTS]
    assert [s.completion for s in out] == [c for c in expected for _ in range(2)]


# ---- the switch --------------------------------------------------------------------------------

def test_attention_implementation_restored_after_sampling_and_after_an_error(monkeypatch):
    model = _model("llama")
    before = model.config._attn_implementation
    sample(model, PROMPTS, n=2, max_new_tokens=3, seed=0, eos_id=-1, pad_id=PAD)
    assert model.config._attn_implementation == before

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(shared_prefix.SharedPrefixKV, "attend", broken)
    with pytest.raises(RuntimeError, match="boom"):
        sample(model, PROMPTS, n=2, max_new_tokens=3, seed=0, eos_id=-1, pad_id=PAD)
    assert model.config._attn_implementation == before
    with torch.no_grad():  # and the model still runs its own attention
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_the_registered_attention_refuses_calls_without_the_cache():
    model = _model("llama")
    with shared_prefix.decoding(model), pytest.raises(RuntimeError, match="decode steps only"), torch.no_grad():
        model(input_ids=torch.tensor([[5]]), use_cache=False)
