"""(Lives in data/, layer 1, not at layer 2 as ARCHITECTURE.md sketches it: data/tokenize.py
must call it, and imports only point down.)

The ONE place where (prompt, completion) becomes token ids: training, eval, probes, the demo,
online/iterative generation, synth, sft-pairs, reward-model scoring and `serve` all call it.

Policy (decided once, here):
- A prompt is a plain string or a list of chat messages. Messages are rendered with the
  tokenizer's chat template (generation prompt on); a tokenizer without a template renders them
  with `PLAIN_TEMPLATE` ("role: content" lines, then "assistant:"), so base models such as
  Gemma 3 270M take conversational data too. A plain string is used as it is, on every path
  (no implicit wrapping into a user turn: the same string trains, generates and is scored).
- Special tokens: the rendered text is tokenized without the tokenizer's own special tokens,
  then the tokenizer's leading special tokens (its BOS, found by comparing an encoding with and
  without them) are put in front unless the text already starts with them. So a template that
  writes `{{ bos_token }}` on a tokenizer that also adds BOS (Llama-3, Mistral, Gemma) gives
  exactly one BOS, and a plain string gets the BOS the model was trained with. Nothing the
  tokenizer appends at the end (some add EOS) ever lands inside a prompt.
- A completion is the text the template writes after the prompt (for messages: the full
  conversation's rendering minus the prompt's, which must be a prefix), tokenized on its own,
  ending in EOS (appended unless the template already closed the turn with it).
- Spans are token-level: prompt ids + completion ids, each tokenized apart, which is exactly
  what generation produces (the model continues the prompt ids). Where tokenizing the whole
  conversation at once would merge tokens across the boundary, the pair is counted
  (`boundary_mismatch`, reported by training stats and `data inspect`), not changed.
"""

from __future__ import annotations

from ..utils.errors import DataError
from .records import Text

__all__ = ["plain_text", "completion_for", "PLAIN_TEMPLATE", "special_prefix", "text_ids", "prompt_text", "prompt_ids", "completion_text",
           "completion_ids", "encode", "conversation_ids", "boundary_mismatch", "has_double_bos", "as_messages", "as_chat"]

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text when it adds its special tokens (usually [BOS])."""
    cached = getattr(tokenizer, "_preftune_prefix", None)
    if cached is not None:
        return cached
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    prefix = next((full[:i] for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), [])
    try:
        tokenizer._preftune_prefix = prefix
    except AttributeError:  # a tokenizer that refuses new attributes: recompute next time
        pass
    return prefix


def text_ids(tokenizer, text: str, *, first: bool) -> list[int]:
    """Ids of `text`; with `first`, the tokenizer's leading special tokens exactly once."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if first:
        prefix = special_prefix(tokenizer)
        if prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
    return ids


def _template(tokenizer, messages: list, *, generation: bool) -> str:
    kw = {} if tokenizer.chat_template else {"chat_template": PLAIN_TEMPLATE}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kw)


def prompt_text(tokenizer, prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else _template(tokenizer, list(prompt), generation=True)


def prompt_ids(tokenizer, prompt: Text) -> list[int]:
    """What a model reads before it writes its completion (training, generation, scoring alike)."""
    return text_ids(tokenizer, prompt_text(tokenizer, prompt), first=True)


def completion_text(tokenizer, prompt: Text, completion: Text, where: tuple = ("data", 0), name: str = "completion") -> str:
    if isinstance(completion, str):
        return completion
    head = prompt_text(tokenizer, prompt)
    full = _template(tokenizer, as_messages(prompt) + list(completion), generation=False)
    if not full.startswith(head):
        raise DataError(*where, name, "the chat template does not render the prompt as a prefix of the conversation")
    text = full[len(head):]
    # drop the template's trailing newline after the end-of-turn token; EOS is the last token
    eos = tokenizer.eos_token
    return text.rstrip() if eos and text.rstrip().endswith(eos) else text


def completion_ids(tokenizer, prompt: Text, completion: Text, *, eos: int, where: tuple = ("data", 0),
                   name: str = "completion") -> list[int]:
    ids = text_ids(tokenizer, completion_text(tokenizer, prompt, completion, where, name), first=False)
    return ids if ids and ids[-1] == eos else ids + [eos]


def encode(tokenizer, prompt: Text, completion: Text, *, eos: int, where: tuple = ("data", 0),
           name: str = "completion") -> tuple[list[int], list[int]]:
    return prompt_ids(tokenizer, prompt), completion_ids(tokenizer, prompt, completion, eos=eos, where=where, name=name)


def as_messages(prompt: Text) -> list:
    """A message list for `prompt` (a plain string becomes one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def conversation_ids(tokenizer, prompt: Text, completion: Text) -> list[int]:
    """The whole prompt + completion tokenized in one piece (for the boundary check)."""
    return text_ids(tokenizer, prompt_text(tokenizer, prompt) + completion_text(tokenizer, prompt, completion),
                    first=True)


def boundary_mismatch(tokenizer, prompt: Text, completion: Text, eos: int) -> bool:
    """True when the apart-tokenized spans differ from tokenizing the conversation whole."""
    p, c = encode(tokenizer, prompt, completion, eos=eos)
    whole, apart = conversation_ids(tokenizer, prompt, completion), p + c
    if apart[-1] == eos and (not whole or whole[-1] != eos):  # the EOS we append is not in the text
        apart = apart[:-1]
    return apart != whole


def has_double_bos(tokenizer, ids: list[int]) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos


def plain_text(prompt: Text) -> str:
    """A prompt as text for reward functions and judges: a string as it is, messages as
    "role: content" lines (the same shape as PLAIN_TEMPLATE, without any model's markup)."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"


def as_chat(tokenizer, prompt: Text, completion: Text) -> tuple[Text, Text]:
    """(prompt, completion) as a reward model reads them (rm: scoring and `preftune train-rm`
    alike): with a chat template a plain prompt becomes a user turn, and a plain completion after
    a message prompt the assistant's turn; message lists stay as they are."""
    prompt = as_messages(prompt) if tokenizer.chat_template else prompt
    return prompt, completion_for(prompt, completion) if isinstance(completion, str) else completion


def completion_for(prompt: Text, text: str) -> Text:
    """A sampled completion in the prompt's format: an assistant turn for message prompts."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
