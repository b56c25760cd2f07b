"""benchmarks/scaling/run.py: its synthetic pairs (exact token counts, nothing that merges across
the prompt/completion boundary, so TRL and preftune see the same tokens) and the TRL ratio, without
training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import needs_shared

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling" / "run.py"


def _script():
    spec = importlib.util.spec_from_file_location("scaling_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_shared
def test_synthetic_pairs_have_exact_lengths_and_clean_boundaries(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    _script().make_pairs(path, 64, 6, tok=tokenizer)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 6

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for r in rows:
        assert len(ids(r["prompt"])) == 32 and len(ids(r["chosen"])) == 15 and len(ids(r["rejected"])) == 15
        for completion in (r["chosen"], r["rejected"]):  # what TRL does: tokenize the two together
            assert ids(r["prompt"] + completion) == ids(r["prompt"]) + ids(completion), (r["prompt"][-20:], completion[:20])


def test_trl_ratio_takes_the_block_point_of_the_same_invocation():
    run = _script()
    block = {"length": 256, "mode": "block", "pairs_per_s": 0.9, "losses": [0.6931, 0.6900], "command": "now"}
    older = {**block, "length": 2048, "command": "before"}
    trl = {"length": 256, "mode": "trl+gc", "pairs_per_s": 0.3, "losses": [0.6931, 0.69003], "command": "now"}
    got = run.versus_trl(trl, [older, block])
    assert got["preftune_over_trl"] == 3.0 and abs(got["loss_max_abs_diff"] - 3e-5) < 1e-9
    assert run.versus_trl({**trl, "length": 2048}, [older, block]) == {}  # a block point of another run: no ratio
    assert run.versus_trl({"length": 256, "mode": "trl", "error": "killed", "command": "now"}, [block]) == {}
