"""Held-out quality of every method (`python -m benchmarks.quality`), its TRL peer (peer_trl) and recipe search (search)."""
