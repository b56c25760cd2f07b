"""How many completion positions one block of the chunked LM head holds (lmhead.py).

Torch-free, so that `preftune advise`, which loads no torch, sizes the head's memory with the same
rule the training applies (core/logprobs.py's _chunk_plan).
"""

from __future__ import annotations

__all__ = ["LOGITS_PER_BLOCK", "block_tokens"]

# At most this many logits in one block: 256 MB per float32 copy. On SmolLM2's 49k vocabulary the
# cap is 1365 positions, above train.logprob_chunk_tokens' default 1024, so it changes nothing
# there; on Gemma 3's 262k it is 256, where the block sweep on this CPU ran as fast as the dense
# head and 1024-position blocks (benchmarks/scaling/chunks-gemma3-270m.json) and held 1.6 GB less
# than 1024 at 1024-token pairs.
LOGITS_PER_BLOCK = 2**26


def block_tokens(chunk_tokens: int, vocab: int) -> int:
    """Completion positions per block: train.logprob_chunk_tokens (`chunk_tokens`), capped so that a
    block holds at most LOGITS_PER_BLOCK logits of a `vocab`-wide head (1024 for a 49k vocabulary,
    256 for 262k). 0 stays 0 (the dense head); an unknown vocabulary (0) leaves the setting as it is."""
    if chunk_tokens <= 0 or vocab <= 0:
        return chunk_tokens
    return max(1, min(chunk_tokens, LOGITS_PER_BLOCK // vocab))
