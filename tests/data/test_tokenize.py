import pytest

from preftune.data.records import PreferenceRecord
from preftune.data.tokenize import tokenize_records
from preftune.utils.errors import DataError


def rec(prompt, chosen, rejected, line=1):
    return PreferenceRecord(prompt, chosen, rejected, "d.jsonl", line)


def test_spans_are_separately_tokenized_and_eos_appended(tokenizer):
    (pair,), stats = tokenize_records([rec("The movie was", " great.", " bad.")], tokenizer,
                                      max_length=64, max_prompt_length=32)
    eos = tokenizer.eos_token_id
    assert pair.prompt_ids == tokenizer("The movie was")["input_ids"]
    assert pair.chosen_ids == tokenizer(" great.", add_special_tokens=False)["input_ids"] + [eos]
    assert pair.rejected_ids[-1] == eos and pair.rejected_ids.count(eos) == 1
    assert stats.truncated == 0 and stats.pairs == 1


def test_chat_messages_use_the_template_and_end_with_a_single_eos(tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    (pair,), _ = tokenize_records([rec(prompt, [{"role": "assistant", "content": "hello"}],
                                       [{"role": "assistant", "content": "go"}])], tokenizer,
                                  max_length=64, max_prompt_length=32)
    prompt_text = tokenizer.decode(pair.prompt_ids)
    assert prompt_text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(pair.chosen_ids) == "hello<|im_end|>"


def test_truncation_keeps_prompt_end_and_completion_start_and_is_counted(tokenizer):
    long_prompt = "The movie was great " * 20
    (pair,), stats = tokenize_records([rec(long_prompt, " great and wonderful acting" * 5, " bad.", line=7)],
                                      tokenizer, max_length=24, max_prompt_length=10)
    full_prompt = tokenizer(long_prompt)["input_ids"]
    assert pair.prompt_ids == full_prompt[-10:]
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 24
    assert pair.chosen_ids == tokenizer(" great and wonderful acting" * 5, add_special_tokens=False)["input_ids"][:14]
    assert (stats.truncated, stats.truncated_lines) == (1, [7])


def test_pairs_identical_after_truncation_stop_or_are_dropped(tokenizer):
    r = rec("p", " the same start and then a", " the same start and then b", line=3)
    with pytest.raises(DataError) as info:
        tokenize_records([r, rec("q", " a", " b", line=4)], tokenizer, max_length=4, max_prompt_length=1)
    assert info.value.line == 3 and "after truncation" in info.value.problem
    pairs, stats = tokenize_records([r, rec("q", " a", " b", line=4)], tokenizer, max_length=4,
                                    max_prompt_length=1, drop_overlong=True)
    assert [p.line for p in pairs] == [4] and (stats.dropped, stats.dropped_lines) == (1, [3])


def test_nothing_left_is_an_error(tokenizer):
    r = rec("p", " the same start and then a", " the same start and then b")
    with pytest.raises(DataError, match="no usable pairs"):
        tokenize_records([r], tokenizer, max_length=4, max_prompt_length=1, drop_overlong=True)


def test_empty_completions_are_counted(tokenizer):
    _, stats = tokenize_records([rec("p", " ", " no"), rec("q", " yes", " no")], tokenizer, max_length=32,
                                max_prompt_length=16)
    assert stats.empty_completions == 1
