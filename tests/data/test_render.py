"""data/render.py: one rendering for every path, exactly one BOS, spans that add up (issue 12).

The tokenizers are built offline: a byte-level BPE with a post-processor that adds BOS (like
Llama-3, Mistral, Gemma) and a template that also writes `{{ bos_token }}` -- the double-BOS
trap -- plus ChatML with a system prompt and a template whose generation prompt differs from the
assistant-turn prefix."""

from __future__ import annotations

import json

import pytest

from preftune.data import render
from preftune.data.records import PreferenceRecord
from preftune.data.tokenize import tokenize_records
from preftune.utils.errors import DataError

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
THINKING = (  # the generation prompt opens a think block that finished assistant turns do not have
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CORPUS = ["The movie was great and the acting was wonderful.", "I hated the ending; the plot was slow.",
          "What is the capital of France? Paris is the capital.", "system user assistant"] * 20


@pytest.fixture(scope="module")
def bos_tokenizer():
    """Adds BOS itself (add_special_tokens=True) AND has a template that writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<pad>")
    fast.chat_template = LLAMA3
    assert fast("hi")["input_ids"][0] == bos  # the tokenizer adds BOS by itself
    return fast


CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}],
     [{"role": "assistant", "content": "Paris is the capital."}], [{"role": "assistant", "content": "I hated it."}]),
    ([{"role": "system", "content": "The movie was great."}, {"role": "user", "content": "The ending?"}],
     [{"role": "assistant", "content": "wonderful"}], [{"role": "assistant", "content": "slow"}]),
    ([{"role": "user", "content": "The plot?"}, {"role": "assistant", "content": "slow"},  # multi-turn history
      {"role": "user", "content": "And the acting?"}],
     [{"role": "assistant", "content": "great acting"}], [{"role": "assistant", "content": "boring"}]),
]


def _records():
    return [PreferenceRecord(p, c, r, "mem", i + 1) for i, (p, c, r) in enumerate(CONVERSATIONS)]


def test_the_trap_is_real_for_this_tokenizer(bos_tokenizer):
    """The old rendering (template text tokenized WITH special tokens) doubles the BOS."""
    text = bos_tokenizer.apply_chat_template(CONVERSATIONS[0][0], tokenize=False, add_generation_prompt=True)
    ids = bos_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert render.has_double_bos(bos_tokenizer, ids)


def test_training_tokenization_has_exactly_one_bos_and_spans_that_add_up(bos_tokenizer):
    pairs, _ = tokenize_records(_records(), bos_tokenizer, max_length=512, max_prompt_length=256)
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    for pair, (prompt, chosen, rejected) in zip(pairs, CONVERSATIONS):
        assert pair.prompt_ids[0] == bos and pair.prompt_ids.count(bos) == 1
        for completion, ids in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
            assert ids[-1] == eos
            whole = bos_tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            # prompt + completion ids == the whole conversation tokenized as the template renders it
            assert pair.prompt_ids + ids == render.text_ids(bos_tokenizer, whole.rstrip("\n"), first=True)
            assert not render.boundary_mismatch(bos_tokenizer, prompt, completion, eos)


def test_plain_string_prompts_get_the_tokenizers_bos_once(bos_tokenizer):
    ids = render.prompt_ids(bos_tokenizer, "The movie was")
    assert ids == bos_tokenizer("The movie was")["input_ids"] and ids.count(bos_tokenizer.bos_token_id) == 1
    typed = render.prompt_ids(bos_tokenizer, "<|begin_of_text|>The movie was")  # BOS typed into the text
    assert typed == ids


def test_chatml_with_a_system_prompt(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The movie?"}]
    completion = [{"role": "assistant", "content": "great"}]
    p, c = render.encode(tokenizer, prompt, completion, eos=tokenizer.eos_token_id)
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert p + c == tokenizer(text.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(c) == "great<|im_end|>"


def test_a_generation_prompt_that_is_not_the_turn_prefix_is_refused_with_its_line(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINKING
    rec = PreferenceRecord([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                           [{"role": "assistant", "content": "b"}], "f.jsonl", 7)
    with pytest.raises(DataError, match=r"f.jsonl:7: chosen: the chat template does not render the prompt as a prefix"):
        tokenize_records([rec], tok, max_length=64, max_prompt_length=32)


def test_a_model_without_a_template_renders_messages_plainly(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    prompt = [{"role": "user", "content": "The movie?"}]
    assert render.prompt_text(tok, prompt) == "user: The movie?\nassistant:"
    p, c = render.encode(tok, prompt, [{"role": "assistant", "content": "great"}], eos=tok.eos_token_id)
    assert tok.decode(c[:-1]) == " great\n" and c[-1] == tok.eos_token_id


def test_online_generation_and_serve_see_the_training_rendering(bos_tokenizer, monkeypatch):
    import preftune.models.generate
    from preftune.apps.serve import ChatModel
    from preftune.config import OnlineConfig
    from preftune.runs.online.rollouts import generate_and_pair

    seen = []

    def fake_sample(model, tokenizer, prompts, *, n, **kw):
        seen.extend(prompts)
        return [(p, bos_tokenizer(f" answer {i}", add_special_tokens=False)["input_ids"] + [bos_tokenizer.eos_token_id])
                for p in prompts for i in range(n)]

    monkeypatch.setattr(preftune.models.generate, "sample_completions", fake_sample)

    class Length:
        def score(self, prompts, completions):
            return [float(len(c)) + 0.1 * i for i, c in enumerate(completions)]

    prompt = CONVERSATIONS[1][0]
    pairs, counts = generate_and_pair(None, bos_tokenizer, [prompt], Length(), OnlineConfig(samples_per_prompt=3), seed=0)
    trained, _ = tokenize_records([PreferenceRecord(p["prompt"], p["chosen"], p["rejected"], "x", 1) for p in pairs],
                                  bos_tokenizer, max_length=512, max_prompt_length=256)
    assert seen[0] == trained[0].prompt_ids and seen[0].count(bos_tokenizer.bos_token_id) == 1
    assert pairs[0]["chosen"][0]["role"] == "assistant"  # a conversational prompt makes a conversational pair

    class Tiny:
        def eval(self):
            return self

    served = ChatModel(Tiny(), bos_tokenizer, "m")._prompt_ids(prompt)
    assert served == trained[0].prompt_ids


def test_data_inspect_flags_a_file_rendered_with_another_template(bos_tokenizer, tmp_path):
    from preftune.data.inspect import inspect_records
    from preftune.data.sources import load_records

    rendered = bos_tokenizer.apply_chat_template(CONVERSATIONS[0][0], tokenize=False, add_generation_prompt=True)
    rows = [{"prompt": "<|begin_of_text|>" + rendered, "chosen": " a", "rejected": " b"},  # BOS twice
            {"prompt": "plain", "chosen": " a", "rejected": " b"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = inspect_records(load_records(tmp_path / "d.jsonl"), bos_tokenizer, max_length=256, max_prompt_length=128)
    assert stats["double_bos"] == 1 and stats["special_tokens_in_text"] == 1
    clean = inspect_records(_records(), bos_tokenizer, max_length=256, max_prompt_length=128)
    assert clean["double_bos"] == 0 and clean["special_tokens_in_text"] == 0


def test_hh_transcripts_as_chat(bos_tokenizer, tmp_path):
    from preftune.config import load_config
    from preftune.data.prepare import load_data, prepare_pairs

    row = {"chosen": "\n\nHuman: The movie?\n\nAssistant: slow\n\nHuman: And the acting?\n\nAssistant: great acting",
           "rejected": "\n\nHuman: The movie?\n\nAssistant: slow\n\nHuman: And the acting?\n\nAssistant: boring"}
    (tmp_path / "hh.jsonl").write_text(json.dumps(row) + "\n")
    cfg = load_config(None, [f"data.train_path={tmp_path / 'hh.jsonl'}", "data.hh_as_chat=true"])
    (rec,) = load_data(cfg.data.train_path, cfg.data)
    assert rec.prompt == [{"role": "user", "content": "The movie?"}, {"role": "assistant", "content": "slow"},
                          {"role": "user", "content": "And the acting?"}]
    assert rec.chosen == [{"role": "assistant", "content": "great acting"}]
    (pair,), _ = prepare_pairs(cfg.data.train_path, cfg, bos_tokenizer)
    text = bos_tokenizer.apply_chat_template(rec.prompt, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == bos_tokenizer(text, add_special_tokens=False)["input_ids"]  # one BOS, from the template
    plain = load_config(None, [f"data.train_path={tmp_path / 'hh.jsonl'}"])
    assert load_data(plain.data.train_path, plain.data)[0].prompt.endswith("\n\nAssistant:")


def test_training_counts_pairs_whose_split_differs_from_the_whole_text(tokenizer):
    """A prompt ending in a space: apart, " " and "great" are tokens of their own; whole, the
    BPE merges " great". Counted in the training stats (data_stats.json), not silently changed."""
    ok = PreferenceRecord("The movie was", " great and wonderful.", " slow and boring.", "m", 1)
    split = PreferenceRecord("The movie was ", "great and wonderful.", "slow and boring.", "m", 2)
    _, stats = tokenize_records([ok], tokenizer, max_length=64, max_prompt_length=32)
    assert stats.boundary_mismatches == 0
    _, stats = tokenize_records([ok, split], tokenizer, max_length=64, max_prompt_length=32)
    assert stats.boundary_mismatches == 1 and stats.as_dict()["boundary_mismatches"] == 1


def test_hh_transcripts_as_chat_for_kto_from_pairs(bos_tokenizer, tmp_path):
    """KTO reading HH pairs (`data.paired_to_unpaired=true`) renders the same chat turns as the
    paired losses: both sides of the pair become unpaired examples with the pair's message prompt."""
    from preftune.config import load_config
    from preftune.data.prepare import load_data, prepare_pairs
    from preftune.data.tokenize import tokenize_unpaired

    row = {"chosen": "\n\nHuman: The movie?\n\nAssistant: great acting",
           "rejected": "\n\nHuman: The movie?\n\nAssistant: boring"}
    (tmp_path / "hh.jsonl").write_text(json.dumps(row) + "\n")
    cfg = load_config(None, [f"data.train_path={tmp_path / 'hh.jsonl'}", "data.hh_as_chat=true", "loss.name=kto",
                             "data.paired_to_unpaired=true"])
    good, bad = load_data(cfg.data.train_path, cfg.data, paired=False)
    assert good.prompt == bad.prompt == [{"role": "user", "content": "The movie?"}]
    assert (good.completion, good.label) == ([{"role": "assistant", "content": "great acting"}], True)
    assert (bad.completion, bad.label) == ([{"role": "assistant", "content": "boring"}], False)
    (pair,), _ = prepare_pairs(cfg.data.train_path, cfg, bos_tokenizer)  # what eval scores: the same prompt tokens
    examples, _ = tokenize_unpaired([good, bad], bos_tokenizer, max_length=64, max_prompt_length=32)
    assert examples[0].prompt_ids == examples[1].prompt_ids == pair.prompt_ids
