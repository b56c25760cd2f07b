"""Data pipeline: load -> validate/normalize (sources) -> tokenize -> collate."""

from .collate import collate_pairs
from .records import PreferenceRecord
from .sources import load_records
from .tokenize import TokenizedPair, tokenize_records

__all__ = ["PreferenceRecord", "load_records", "TokenizedPair", "tokenize_records", "collate_pairs"]
