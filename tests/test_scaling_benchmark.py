"""`python -m benchmarks.scaling` (benchmarks/scaling/__main__.py): its synthetic pairs (exact token
counts, nothing that merges across the prompt/completion boundary, so TRL and preftune see the same
tokens) and the TRL ratio, without training."""

from __future__ import annotations

import json

from benchmarks.scaling import __main__ as scaling
from conftest import needs_shared


@needs_shared
def test_synthetic_pairs_have_exact_lengths_and_clean_boundaries(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    scaling.make_pairs(path, 64, 6, tok=tokenizer)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 6

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for r in rows:
        assert len(ids(r["prompt"])) == 32 and len(ids(r["chosen"])) == 15 and len(ids(r["rejected"])) == 15
        for completion in (r["chosen"], r["rejected"]):  # what TRL does: tokenize the two together
            assert ids(r["prompt"] + completion) == ids(r["prompt"]) + ids(completion), (r["prompt"][-20:], completion[:20])


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
