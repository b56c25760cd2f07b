"""Data pipeline: load -> validate/normalize (sources) -> tokenize -> collate."""

from .collate import collate_pairs, collate_unpaired
from .records import PreferenceRecord, UnpairedRecord
from .sources import load_records, to_unpaired
from .tokenize import TokenizedExample, TokenizedPair, tokenize_records, tokenize_unpaired

__all__ = ["PreferenceRecord", "UnpairedRecord", "load_records", "to_unpaired", "TokenizedPair", "TokenizedExample",
           "tokenize_records", "tokenize_unpaired", "collate_pairs", "collate_unpaired"]
