"""`python -m benchmarks.scaling` (benchmarks/scaling/__main__.py): its synthetic pairs (exact token
counts, nothing that merges across the prompt/completion boundary, so TRL and preftune see the same
tokens) and the TRL ratio, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scaling import __main__ as scaling
from conftest import needs_shared
from preftune.models.zoo import ZOO
from preftune.utils.envvars import cache_root

USER_CACHE = cache_root()  # the user's, where `preftune models fetch` converted the models


def _sentencepiece_tokenizer():
    """A tiny Gemma-style vocabulary trained on the HH text the pairs come from: spaces become '▁'
    before BPE, nothing pre-splits the text (so merges may cross words, as in Gemma's), BOS in front."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Replace("\u2581", " ")
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False)
    tok.train_from_iterator(scaling._texts()[:400], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _installed_tokenizer(name: str):
    """The tokenizer of a packaged model already converted in the user's cache (read at import,
    before the autouse fixture points PREFTUNE_CACHE at a temporary directory): the test never
    converts a model; absent, it skips."""
    from preftune.models.loading import load_tokenizer

    found = sorted((USER_CACHE / "models").glob(f"{Path(ZOO[name].gguf).stem}-*/tokenizer.json"))
    if not found:
        pytest.skip(f"{name} is not converted in {USER_CACHE}: `preftune models fetch {name}`")
    return load_tokenizer(str(found[0].parent))


def assert_exact_clean_pairs(path, tok, length: int, n: int) -> None:
    """Every pair is `length` tokens as preftune reads it (the tokenizer's BOS, the prompt, two
    completions with their EOS), and tokenizing prompt + completion together (what TRL does)
    gives the prompt's tokens then the completion's: nothing merges across the boundary."""
    from preftune.data.render import completion_ids, prompt_ids

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == n

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    eos = tok.eos_token_id
    for r in rows:
        sizes = [len(prompt_ids(tok, r["prompt"])), *(len(completion_ids(tok, r["prompt"], r[k], eos=eos))
                                                      for k in ("chosen", "rejected"))]
        assert sizes == [length // 2, length // 4, length // 4] and sum(sizes) == length
        for completion in (r["chosen"], r["rejected"]):
            assert ids(r["prompt"] + completion) == ids(r["prompt"]) + ids(completion), (r["prompt"][-20:], completion[:20])


@needs_shared
@pytest.mark.parametrize("vocab", ["byte-level", "sentencepiece"])
def test_synthetic_pairs_have_exact_lengths_and_clean_boundaries(tmp_path, tokenizer, vocab):
    """GPT-2 byte-level BPE marks a space 'Ġ' (SmolLM2), SentencePiece-style vocabularies '▁' and
    add a BOS (Gemma): make_pairs reads the mark from the tokenizer and counts the BOS."""
    tok = tokenizer if vocab == "byte-level" else _sentencepiece_tokenizer()
    assert (tok.bos_token is None) == (vocab == "byte-level")
    path = tmp_path / "pairs.jsonl"
    scaling.make_pairs(path, 64, 6, tok=tok)
    assert_exact_clean_pairs(path, tok, 64, 6)


@needs_shared
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_synthetic_pairs_on_the_benchmarked_models_tokenizers(tmp_path, name):
    """The two models the benchmark runs (Gemma only when `preftune models fetch gemma3-270m` ran)."""
    tok = _installed_tokenizer(name)
    path = tmp_path / "pairs.jsonl"
    scaling.make_pairs(path, 128, 8, tok=tok)
    assert_exact_clean_pairs(path, tok, 128, 8)


def test_trl_ratio_takes_the_block_point_of_the_same_invocation():
    block = {"length": 256, "mode": "block", "pairs_per_s": 0.9, "losses": [0.6931, 0.6900], "command": "now"}
    older = {**block, "length": 2048, "command": "before"}
    trl = {"length": 256, "mode": "trl+gc", "pairs_per_s": 0.3, "losses": [0.6931, 0.69003], "command": "now"}
    got = scaling.versus_trl(trl, [older, block])
    assert got["preftune_over_trl"] == 3.0 and abs(got["loss_max_abs_diff"] - 3e-5) < 1e-9
    assert scaling.versus_trl({**trl, "length": 2048}, [older, block]) == {}  # a block point of another run: no ratio
    assert scaling.versus_trl({"length": 256, "mode": "trl", "error": "killed", "command": "now"}, [block]) == {}


def test_cpu_attention_flops_count_the_keys_each_query_visits():
    """torch's counter has no formula for the CPU SDPA kernels (it would count attention as 0); the
    benchmark's counts 2 matmuls of 2*d FLOPs per visible (query, key) pair per head forward and
    2.5 times that backward. Causal 5x5: 15 visible pairs; with a full mask: 25."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    mapping = scaling._cpu_attention_flops()
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))

    def count(custom, **kw):
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        with counter:
            F.scaled_dot_product_attention(q, k, v, **kw).sum().backward()
        return counter.get_total_flops()

    per_pair = 2 * 2 * 2 * 4  # two matmuls, 2 FLOPs a multiply-add, 2 heads, d = 4
    assert count(mapping, is_causal=True) == per_pair * 15 * 3.5  # forward 1 + backward 2.5
    assert count(mapping, attn_mask=torch.ones(5, 5, dtype=torch.bool)) == per_pair * 25 * 3.5
    assert count({}, is_causal=True) == 0  # what the benchmark would read without them
