"""sampler.py: KV-cache sampling with length buckets, early exit and per-sample random streams.

The model is conftest's tiny random Llama with its matrices redrawn at std 0.3: at the default
init (std 0.02) every distribution is near uniform and greedy decoding repeats the last prompt
token, which would let a wrong mask or position pass the HF comparisons.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_model
from preftune.core.logprobs import completion_token_logps
from preftune.models.sampler import SamplingCopy, draw_tokens, filtered_probs, row_seed, sample

TEXTS = ["The movie was", "Human: how do I bake bread?\n\nAssistant:", "I", "What is the capital of France? Paris",
         "The acting was wonderful and the plot was slow and boring, and then"]


def _sharpen(model, seed: int = 0, std: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _sharpen(build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]  # lengths 3 .. 16, one single-token prompt


def _kw(tokenizer, **kw):
    return {**dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=7), **kw}


class Calls:
    """Records the (rows, tokens) of every forward of `model`, and its mode and grad state."""

    def __init__(self, model):
        self.shapes, self.training, self.grad = [], [], []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))
        self.training.append(module.training)
        self.grad.append(torch.is_grad_enabled())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _hf_greedy(model, prompt, max_new_tokens, eos):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def _early_token(completions, step: int = 2):
    """Token `step` of the first completion, when it is not earlier in that completion and some
    other completion lacks it up to `step`: as the EOS it stops the first completion after
    step + 1 tokens while another runs on."""
    token = completions[0][step]
    if token in completions[0][:step] or all(token in c[: step + 1] for c in completions[1:]):
        pytest.skip("no suitable early token in this model's completions")
    return token


# ---- the distribution: filtering and inverse-CDF draws, by hand ----------------------------------

def test_filtered_probs_by_hand():
    """logits = log([0.5, 0.2, 0.3]).
    temperature 2: p**(1/2) = [.70711, .44721, .54772], sum 1.70204 -> [.41545, .26275, .32181].
    top_k 2 keeps 0.5 and 0.3 -> [0.5, 0, 0.3] / 0.8 = [.625, 0, .375].
    top_p 0.6: sorted [.5, .3, .2], mass above each [0, .5, .8]: keep .5 and .3 (0.5 < 0.6) -> [.625, 0, .375].
    top_p 0.5: mass above .3 is .5, not < .5 -> only the top token: [1, 0, 0].
    top_k 2 then top_p 0.7: [.625, 0, .375], mass above .375 is .625 < .7 -> unchanged."""
    logits = torch.tensor([[0.5, 0.2, 0.3]]).log()
    close = lambda a, b: torch.testing.assert_close(a, torch.tensor([b]), atol=1e-5, rtol=0)  # noqa: E731
    close(filtered_probs(logits), [0.5, 0.2, 0.3])
    close(filtered_probs(logits, temperature=2.0), [0.41545, 0.26275, 0.32181])
    close(filtered_probs(logits, top_k=2), [0.625, 0.0, 0.375])
    close(filtered_probs(logits, top_p=0.6), [0.625, 0.0, 0.375])
    close(filtered_probs(logits, top_p=0.5), [1.0, 0.0, 0.0])
    close(filtered_probs(logits, top_k=2, top_p=0.7), [0.625, 0.0, 0.375])
    close(filtered_probs(logits, top_k=1), [1.0, 0.0, 0.0])
    # rows are filtered independently; top_k ties with the k-th logit are kept
    two = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert filtered_probs(two, top_k=1).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]


def test_draw_tokens_is_inverse_cdf_in_vocabulary_order():
    """probs [.5, 0, .5]: CDF [.5, .5, 1]; u < .5 -> 0, u >= .5 -> 2, never the empty token 1.
    probs [.3, .7, 0]: u near 1 -> 1 (the last token with mass), also for u*total rounding up."""
    probs = torch.tensor([[0.5, 0.0, 0.5]]).expand(5, 3)
    assert draw_tokens(probs, torch.tensor([0.0, 0.49, 0.5, 0.75, 0.999999])).tolist() == [0, 0, 2, 2, 2]
    tail = torch.tensor([[0.3, 0.7, 0.0]]).expand(3, 3)
    assert draw_tokens(tail, torch.tensor([0.29, 0.3, 1.0])).tolist() == [0, 1, 1]


def test_draw_tokens_by_blocks_equals_a_flat_float64_cdf():
    """Vocabularies of 1000 (three blocks of 256 and a shorter one) and 49152 (192 blocks): the
    two-level search picks the token a flat float64 cumsum picks, for every row, on skewed rows,
    rows with empty blocks and unnormalized rows; u -> 1 falls back to the last token with mass
    even when the blocks after it are empty."""
    gen = torch.Generator().manual_seed(0)
    for vocab in (1000, 49152):
        probs = (torch.randn(64, vocab, generator=gen) * 4).softmax(dim=-1)
        probs[:8, 100:900] = 0.0                                   # empty blocks between two with mass
        probs[8:16] *= 7.0                                         # not normalized
        u = torch.rand(64, generator=gen, dtype=torch.float64)
        cdf = probs.double().cumsum(dim=-1)
        flat = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        assert draw_tokens(probs, u).tolist() == flat.tolist()
    two = torch.zeros(2, 1000)
    two[:, [10, 900]] = 0.5
    two[1, 900:] = 0.0                                             # mass at 10 only: u -> 1 gives 10
    assert draw_tokens(two, torch.tensor([0.5, 1.0], dtype=torch.float64)).tolist() == [900, 10]


def test_row_seed_separates_keys():
    seeds = {row_seed(s, i, j) for s in range(3) for i in range(5) for j in range(5)}
    assert len(seeds) == 75 and all(0 <= x < 2**63 for x in seeds)


def test_sampling_frequencies_follow_the_filtered_distribution(model, tokenizer, prompts):
    """3000 first tokens of one prompt (top_k 5): each of the 5 tokens within 0.03 of its
    probability (3 standard deviations at p=0.5 is 0.027), none outside the top 5."""
    out = sample(model, [prompts[0]], n=3000, max_new_tokens=1, max_rows=3000, top_k=5, **_kw(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[:, -1]
    probs = filtered_probs(logits, top_k=5)[0]
    counts = torch.bincount(torch.tensor([s.completion[0] for s in out]), minlength=probs.numel()).float() / 3000
    assert set(counts.nonzero().squeeze(1).tolist()) <= set(probs.nonzero().squeeze(1).tolist())
    assert (counts - probs).abs().max() < 0.03


# ---- the KV cache, buckets and early exit, seen from the forwards the model receives -----------

def test_each_prompt_prefilled_once_and_its_cache_shared_by_its_samples(model, tokenizer, prompts):
    """2 prompts x 4 samples, 5 tokens, no EOS: one prefill of the 2 prompts (not 8 rows), then 4
    one-token decode steps of 8 rows; the 4 samples of a prompt differ."""
    a, b = prompts[0], prompts[1]
    with Calls(model) as calls:
        out = sample(model, [a, b], n=4, max_new_tokens=5, **_kw(tokenizer, eos_id=-1))
    assert calls.shapes == [(2, len(b))] + [(8, 1)] * 4
    assert len({tuple(s.completion) for s in out[:4]}) == 4 and all(len(s.completion) == 5 for s in out)
    assert [s.prompt for s in out] == [a] * 4 + [b] * 4  # prompt-major


def test_rows_are_bucketed_by_prompt_length(model, tokenizer):
    """Lengths [3, 40, 4, 41], n=2, max_rows=4: the two short prompts share a batch padded to 4,
    the two long ones a batch padded to 41 (one batch would pad all four to 41)."""
    prompts = [[5, 6, 7], list(range(10, 50)), [8, 9, 10, 11], list(range(60, 101))]
    with Calls(model) as calls:
        sample(model, prompts, n=2, max_new_tokens=3, max_rows=4, **_kw(tokenizer, eos_id=-1))
    assert [s for s in calls.shapes if s[1] > 1] == [(2, 4), (2, 41)]
    assert max(rows for rows, _ in calls.shapes) <= 4


def test_finished_rows_stop_at_their_eos_and_leave_the_batch(model, tokenizer, prompts):
    """Sample without EOS, then call a token of sample 0's third position the EOS: every sample is
    the same as before cut after its first EOS (the per-sample streams do not depend on which rows
    are still running), and the batch shrinks as rows finish."""
    free = sample(model, prompts[:2], n=3, max_new_tokens=8, **_kw(tokenizer, eos_id=-1))
    eos = _early_token([s.completion for s in free])
    with Calls(model) as calls:
        cut = sample(model, prompts[:2], n=3, max_new_tokens=8, **_kw(tokenizer, eos_id=eos))
    for before, after in zip(free, cut):
        c = before.completion
        assert after.completion == (c[: c.index(eos) + 1] if eos in c else c)
        assert after.logps == pytest.approx(before.logps[: len(after.completion)], abs=1e-5)
    assert len(cut[0].completion) == 3
    decode_rows = [rows for rows, width in calls.shapes[1:]]
    assert decode_rows[0] == 6 and decode_rows[-1] < 6 and decode_rows == sorted(decode_rows, reverse=True)
    assert sum(decode_rows) == sum(len(s.completion) for s in cut) - 6  # no step for a finished row


# ---- the per-sample random streams ---------------------------------------------------------------

def test_samples_do_not_depend_on_max_rows(model, tokenizer, prompts):
    """max_rows 1 (every sample alone), 3 (a prompt's 4 samples split 3+1, prompts mixed) and 64
    (one batch): token-identical samples, log-probs equal to fp32 rounding."""
    runs = [sample(model, prompts, n=4, max_new_tokens=6, max_rows=m, **_kw(tokenizer)) for m in (1, 3, 64)]
    for other in runs[1:]:
        assert [s.completion for s in other] == [s.completion for s in runs[0]]
        for x, y in zip(other, runs[0]):
            assert x.logps == pytest.approx(y.logps, abs=1e-4)
            assert x.model_logps == pytest.approx(y.model_logps, abs=1e-4)


def test_other_prompts_do_not_change_a_prompts_samples(model, tokenizer, prompts):
    """[a, b] and [a, b, c] with c the shortest (so it is bucketed first and moves a and b to other
    batches at max_rows=4): a's and b's samples are identical. The key is (seed, index, sample),
    so the same prompt at another index gets other samples, as a duplicated prompt should."""
    a, b, c = prompts[1], prompts[4], prompts[2]
    two = sample(model, [a, b], n=3, max_new_tokens=6, max_rows=4, **_kw(tokenizer))
    three = sample(model, [a, b, c], n=3, max_new_tokens=6, max_rows=4, **_kw(tokenizer))
    assert [s.completion for s in three[:6]] == [s.completion for s in two]
    dup = sample(model, [a, a], n=1, max_new_tokens=6, **_kw(tokenizer))
    assert dup[0].completion == two[0].completion and dup[1].completion != dup[0].completion
    other_seed = sample(model, [a, b], n=3, max_new_tokens=6, max_rows=4, **_kw(tokenizer, seed=8))
    assert [s.completion for s in other_seed] != [s.completion for s in two]


def test_callers_rng_untouched(model, tokenizer, prompts):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(state)
    sample(model, prompts, n=2, max_new_tokens=4, **_kw(tokenizer))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(torch.rand(4), expected)


# ---- against HF generate and the trainer's log-probs ---------------------------------------------

def _gpt2(tokenizer):
    """A tiny GPT-2: learned absolute positions, so a left-padded row whose position ids counted
    its pads would decode differently (Llama's rotary attention only sees position differences)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _sharpen(GPT2LMHeadModel(config))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_hf_generate_per_prompt(model, tokenizer, prompts, arch):
    """Prompts of 1 to 16 tokens in one left-padded batch, EOS chosen to stop one row early:
    each completion equals HF `generate(do_sample=False)` on that prompt alone."""
    model = model if arch == "llama" else _gpt2(tokenizer)
    free = [_hf_greedy(model, p, 10, eos=-1) for p in prompts]
    eos = _early_token(free)
    out = sample(model, prompts, n=1, max_new_tokens=10, greedy=True, **_kw(tokenizer, eos_id=eos))
    assert [s.completion for s in out] == [_hf_greedy(model, p, 10, eos) for p in prompts]
    assert len(out[0].completion) == 3 and all(lp == 0.0 for s in out for lp in s.logps)


@pytest.mark.parametrize("filters", [dict(temperature=0.7, top_k=50), dict(), dict(greedy=True)],
                         ids=["filtered", "plain", "greedy"])
def test_logps_match_a_teacher_forced_forward(model, tokenizer, prompts, filters):
    """model_logps equal the trainer's per-token log-probs (logprobs.completion_token_logps) of
    the same tokens; logps equal the log of the filtered distribution (temperature 0.7, top-k 50)
    of the teacher-forced logits at the sampled token, the model log-probs themselves without
    filters, and 0 for greedy (a point mass)."""
    out = sample(model, prompts, n=2, max_new_tokens=6, **filters, **_kw(tokenizer))
    for s in out:
        ids = torch.tensor([s.prompt + s.completion])
        completion = torch.tensor([[0] * len(s.prompt) + [1] * len(s.completion)])
        with torch.no_grad():
            token_logps, mask = completion_token_logps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                               "completion_mask": completion})
            logits = model(input_ids=ids).logits[0, len(s.prompt) - 1: -1]
        torch.testing.assert_close(torch.tensor(s.model_logps), token_logps[mask], atol=1e-4, rtol=0)
        if "greedy" in filters:
            assert s.logps == [0.0] * len(s.completion)
            continue
        filtered = filtered_probs(logits, **filters)
        expected = filtered[torch.arange(len(s.completion)), torch.tensor(s.completion)].log()
        torch.testing.assert_close(torch.tensor(s.logps), expected, atol=1e-4, rtol=0)
        if filters:
            assert not math.isclose(s.logps[0], s.model_logps[0], abs_tol=1e-3)  # the two really differ


# ---- mode, grad, dtype and arguments -------------------------------------------------------------

def test_eval_mode_no_grad_and_restored(model, tokenizer, prompts):
    model.train()
    try:
        with Calls(model) as calls:
            sample(model, prompts[:2], n=2, max_new_tokens=3, **_kw(tokenizer))
        assert model.training and not any(calls.training) and not any(calls.grad)
    finally:
        model.eval()


def test_bf16_autocast_leaves_the_weights_alone(model, tokenizer, prompts):
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        out = sample(model, prompts[:2], n=2, max_new_tokens=4, dtype=torch.bfloat16, **_kw(tokenizer, eos_id=-1))
    finally:
        handle.remove()
    assert set(seen) == {torch.bfloat16} and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(len(s.completion) == 4 and all(math.isfinite(x) for x in s.model_logps) for s in out)


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(max_rows=0), dict(prompts=[[1], []])])
def test_bad_arguments(model, tokenizer, bad):
    kw = {**dict(prompts=[[1, 2]], n=1, max_new_tokens=2), **bad}
    with pytest.raises(ValueError):
        sample(model, kw.pop("prompts"), **kw, **_kw(tokenizer))


# ---- SamplingCopy --------------------------------------------------------------------------------

def _lora_policy(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _sharpen(build_model(len(tokenizer), eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # B != 0: the adapters change the logits from the start
    return get_peft_model(base, config)


def _base_weights(policy) -> dict:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}


def test_sampling_copy_follows_the_policy_and_never_touches_its_base(tokenizer, prompts):
    policy = _lora_policy(tokenizer)
    base = _base_weights(policy)
    ids = torch.tensor([prompts[4]])
    logits = lambda m: m(input_ids=ids).logits  # noqa: E731
    copy = SamplingCopy(policy)
    with torch.no_grad():
        torch.testing.assert_close(logits(copy.model), logits(policy), atol=1e-5, rtol=0)
    assert not any("lora" in n for n, _ in copy.model.named_modules())

    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    logits(policy)[0, :, 5].mean().backward()
    optimizer.step()
    policy.eval()
    with torch.no_grad():
        assert (logits(copy.model) - logits(policy)).abs().max() > 1e-3  # stale until refreshed
        copy.refresh(policy)
        torch.testing.assert_close(logits(copy.model), logits(policy), atol=1e-5, rtol=0)
    after = _base_weights(policy)
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)


def test_sampling_copy_of_a_plain_model_is_the_model(model):
    assert SamplingCopy(model).model is model and SamplingCopy(model).refresh(model).model is model


def test_sampling_copy_in_bf16(tokenizer, prompts):
    policy = _lora_policy(tokenizer)
    copy = SamplingCopy(policy, dtype=torch.bfloat16)
    assert {p.dtype for p in copy.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    out = sample(copy.model, prompts[:2], n=2, max_new_tokens=3, **_kw(tokenizer))
    assert all(len(s.completion) >= 1 for s in out)


def test_sampling_copy_refuses_weights_it_would_not_follow(tokenizer):
    policy = _lora_policy(tokenizer)
    policy.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="norm.weight is trainable"):
        SamplingCopy(policy)


def test_sampling_from_the_copy_equals_sampling_from_the_peft_policy(tokenizer, prompts):
    """The same draws through the unmerged PEFT forward and through the merged copy (fp32): the
    same tokens, and log-probs equal to rounding."""
    policy = _lora_policy(tokenizer).eval()
    merged = sample(SamplingCopy(policy).model, prompts, n=2, max_new_tokens=6, **_kw(tokenizer))
    unmerged = sample(policy, prompts, n=2, max_new_tokens=6, **_kw(tokenizer))
    assert [s.completion for s in merged] == [s.completion for s in unmerged]
    for x, y in zip(merged, unmerged):
        assert x.model_logps == pytest.approx(y.model_logps, abs=1e-4)
