"""`python -m benchmarks.scaling` (benchmarks/scaling/__main__.py): its synthetic pairs (exact token
counts, nothing that merges across the prompt/completion boundary, so TRL and preftune see the same
tokens) and the TRL ratio, without training."""

from __future__ import annotations

import argparse
import json
import subprocess
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


def test_trl_ratio_and_loss_agreement_take_the_block_point_of_the_same_invocation():
    """0.69003 against 0.6900 is 3e-5 absolute, 4.3e-5 relative: over the 1e-5 bar; 0.690003 is
    4.3e-6 relative: within it."""
    block = {"length": 256, "mode": "block", "pairs_per_s": 0.9, "losses": [0.6931, 0.6900], "command": "now"}
    gc = {**block, "mode": "block+gc", "pairs_per_s": 0.6}
    older = {**block, "length": 2048, "command": "before"}
    trl = {"length": 256, "mode": "trl+gc", "pairs_per_s": 0.3, "losses": [0.6931, 0.69003], "command": "now"}
    got = scaling.versus_block(trl, [older, block, gc])
    assert got["preftune_over_trl"] == 3.0 and got["preftune_gc_over_trl"] == 2.0
    assert abs(got["loss_max_abs_diff"] - 3e-5) < 1e-9 and abs(got["loss_max_rel_diff"] - 3e-5 / 0.69) < 1e-9
    assert got["losses_agree"] is False
    close = scaling.versus_block({**trl, "losses": [0.6931, 0.690003]}, [block])
    assert close["losses_agree"] is True and "preftune_gc_over_trl" not in close  # no block+gc point ran
    assert scaling.versus_block({**trl, "length": 2048}, [older, block]) == {}  # a block point of another run: no ratio
    assert scaling.versus_block({"length": 256, "mode": "trl", "error": "killed", "command": "now"}, [block]) == {}


def test_where_block_did_not_run_the_checkpointed_point_is_the_reference():
    """Gemma at 4096 tokens: block does not fit, so TRL is compared with block+gc (named)."""
    gc = {"length": 4096, "mode": "block+gc", "pairs_per_s": 0.009, "losses": [0.6931, 0.50396], "command": "now"}
    trl = {"length": 4096, "mode": "trl+gc", "pairs_per_s": 0.0045, "losses": [0.6931, 0.503955], "command": "now"}
    got = scaling.versus_block(trl, [gc])
    assert got["losses_vs"] == "block+gc" and got["preftune_gc_over_trl"] == 2.0 and "preftune_over_trl" not in got
    assert got["losses_agree"] is True
    assert scaling.versus_block({**trl, "losses": [0.6931, 0.50390]}, [gc])["losses_agree"] is False
    assert scaling.versus_block(gc, [gc]) == {}  # block+gc is not compared with itself
    assert scaling.versus_block(trl, [{**gc, "command": "before"}]) == {}


def test_every_route_to_the_same_losses_is_checked_against_block_but_qlora_and_block_itself():
    block = {"length": 256, "mode": "block", "pairs_per_s": 0.9, "losses": [0.6931, 0.6900], "command": "now"}
    for mode in ("block+gc", "dense-head", "dense"):
        got = scaling.versus_block({**block, "mode": mode}, [block])
        assert got["losses_agree"] is True and got["loss_max_abs_diff"] == 0.0 and "preftune_over_trl" not in got
    assert scaling.versus_block({**block, "mode": "qlora"}, [block]) == {}  # a 4-bit base: other losses
    assert scaling.versus_block(block, [block]) == {}
    short = scaling.versus_block({**block, "mode": "trl", "losses": [0.6931]}, [block])
    assert short["losses_agree"] is False  # a run that logged fewer steps never agrees


def test_another_model_writes_its_own_files_and_the_default_keeps_its_own():
    assert scaling.output("results.json", "smollm2-135m-instruct") == scaling.HERE / "results.json"
    assert scaling.output("results.json", "gemma3-270m") == scaling.HERE / "results-gemma3-270m.json"
    assert scaling.output("cost.png", "gemma3-270m").name == "cost-gemma3-270m.png"


def test_a_point_trains_the_model_it_is_given_with_the_head_it_is_given(tmp_path):
    """dense-head: block attention, train.logprob_chunk_tokens=0; a chunk sweep sets the value;
    otherwise the config's default (logprobs.DEFAULT_CHUNK_TOKENS)."""
    from preftune.config import load_config
    from preftune.core.logprobs import DEFAULT_CHUNK_TOKENS

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')

    def cfg(mode, **kw):
        return load_config(None, scaling.overrides(str(data), str(tmp_path / "run"), mode, 2, 4, 512, **kw))

    head = cfg("dense-head", model="gemma3-270m")
    assert head.model.name_or_path == "gemma3-270m" and head.train.logprob_chunk_tokens == 0
    assert not head.model.gradient_checkpointing and (head.data.max_length, head.data.max_prompt_length) == (520, 260)
    gc = cfg("block+gc")
    assert gc.model.name_or_path == "smollm2-135m-instruct" and gc.model.gradient_checkpointing
    assert gc.train.logprob_chunk_tokens == DEFAULT_CHUNK_TOKENS
    assert cfg("block", chunk=256).train.logprob_chunk_tokens == 256
    # the TRL worker's lr and beta, whatever the DPO recipe says (its search moved beta to 0.3)
    from benchmarks.speed_vs_trl.__main__ import BETA, LR
    assert (gc.train.lr, gc.loss.beta) == (LR, BETA)


def test_run_point_hands_the_model_and_chunk_to_its_worker(monkeypatch, tmp_path):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='noise\nRESULT {"pairs_per_s": 1.0}\n', stderr="")

    monkeypatch.setattr(scaling.subprocess, "run", fake_run)
    got = scaling.run_point(tmp_path / "p.jsonl", "block", 2, 4, 128, model="gemma3-270m", chunk=0)
    assert got == {"pairs_per_s": 1.0}
    cmd = seen[0]
    assert cmd[cmd.index("--model") + 1] == "gemma3-270m" and cmd[cmd.index("--chunk-tokens") + 1] == "0"
    scaling.run_point(tmp_path / "p.jsonl", "trl", 2, 4, 128)
    assert seen[1][seen[1].index("--model") + 1] == "smollm2-135m-instruct" and "--chunk-tokens" not in seen[1]


def test_workers_run_on_the_allocator_each_tool_runs_on_for_its_users(monkeypatch, tmp_path):
    """preftune's worker gets what the `preftune` command would pick (preload_env: jemalloc when
    installed), TRL's keeps glibc; --allocators' variant replaces both, the user's LD_PRELOAD too."""
    envs = []

    def fake_run(cmd, env=None, **kw):
        envs.append(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='RESULT {"pairs_per_s": 1.0}\n', stderr="")

    monkeypatch.setattr(scaling.subprocess, "run", fake_run)
    monkeypatch.setattr(scaling, "preload_env", lambda env: {**env, "LD_PRELOAD": "/lib/libjemalloc.so.2"})
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    scaling.run_point(tmp_path / "p.jsonl", "block", 2, 4, 128)
    scaling.run_point(tmp_path / "p.jsonl", "trl+gc", 2, 4, 128)
    scaling.run_point(tmp_path / "p.jsonl", "block", 2, 4, 128, allocator="glibc")
    scaling.run_point(tmp_path / "p.jsonl", "block", 2, 4, 128, allocator="tcmalloc")
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")
    scaling.run_point(tmp_path / "p.jsonl", "block", 2, 4, 128, allocator="glibc")
    scaling.run_point(tmp_path / "p.jsonl", "block", 2, 4, 128, allocator="jemalloc-fast")
    assert envs[0]["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and envs[1]["LD_PRELOAD"] == "/opt/mine.so"
    assert "LD_PRELOAD" not in envs[2] and envs[2]["PREFTUNE_MALLOC"] == "system"
    assert envs[3]["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")
    assert "MALLOC_CONF" not in envs[4]  # a variant runs on its own settings, not the shell's
    assert envs[5]["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1" and "libjemalloc" in envs[5]["LD_PRELOAD"]


def test_a_worker_past_its_timeout_is_an_error_point_not_the_end_of_the_grid(monkeypatch, tmp_path):
    def slow(cmd, timeout, **kw):
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(scaling.subprocess, "run", slow)
    got = scaling.run_point(tmp_path / "p.jsonl", "trl+gc", 2, 4, 4096, timeout=5)
    assert got == {"error": "timed out after 5 s (--timeout)", "rc": None}


def test_chunk_sweep_runs_each_value_and_checks_each_run_against_the_first(monkeypatch, tmp_path):
    calls = []

    def fake_point(data, mode, steps, batch, length, *, model, chunk, **kw):
        calls.append((mode, length, model, chunk))
        return {"pairs_per_s": 0.1 * (1 + chunk // 256), "peak_rss_mb": 3000.0 - chunk,
                "losses": [0.6931, 0.69 + (1e-4 if chunk == 64 else 0.0)]}

    monkeypatch.setattr(scaling, "HERE", tmp_path)
    monkeypatch.setattr(scaling, "make_pairs", lambda *a, **kw: None)
    monkeypatch.setattr(scaling, "_tokenizer", lambda model: None)
    monkeypatch.setattr(scaling, "run_point", fake_point)
    args = argparse.Namespace(lengths="1024,2048", modes=None, steps=2, batch=4, model="gemma3-270m",
                              chunk_sweep="0,64,1024", timeout=60)
    scaling.chunk_sweep(args)
    assert calls == [("block", 1024, "gemma3-270m", c) for c in (0, 64, 1024)]  # the first length only
    saved = json.loads((tmp_path / "chunks-gemma3-270m.json").read_text())
    assert saved["model"] == "gemma3-270m" and [r["chunk"] for r in saved["results"]] == [0, 64, 1024]
    assert [r.get("losses_agree") for r in saved["results"]] == [None, False, True]
    assert (tmp_path / "chunks-gemma3-270m.png").stat().st_size > 0


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
