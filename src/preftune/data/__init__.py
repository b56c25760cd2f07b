"""Data pipeline: load -> validate/normalize (sources) -> tokenize -> collate."""

import importlib

from .records import PreferenceRecord, UnpairedRecord
from .sources import load_records, to_unpaired
from .tokenize import TokenizedExample, TokenizedPair, tokenize_records, tokenize_unpaired

__all__ = ["PreferenceRecord", "UnpairedRecord", "load_records", "to_unpaired", "TokenizedPair", "TokenizedExample",
           "tokenize_records", "tokenize_unpaired", "collate_pairs", "collate_unpaired"]


def __getattr__(name: str):
    """PEP 562: collate (tensors) loads torch on first use, not when config reads the data registries."""
    if name in ("collate_pairs", "collate_unpaired"):
        return getattr(importlib.import_module(f"{__name__}.collate"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
