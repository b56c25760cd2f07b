"""layouts.choose_layout: the layout asked for is measured against single-sequence forwards, and a
further layout only when the one before it fails (each is one more forward before step 1)."""

from __future__ import annotations

import torch

import preftune.data.layouts as layouts
from conftest import build_model
from preftune.core.attention import use_block_attention
from preftune.data.tokenize import TokenizedPair

PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], "x", 1),
         TokenizedPair([5], [11, 12, 13, 14, 2], [15, 2], "x", 2),
         TokenizedPair([3, 4, 5, 6, 7, 8], [9, 2], [9, 10, 11, 2], "x", 3)]


def _counted(monkeypatch, broken: set[str] = frozenset()):
    """Count the forwards by layout; a layout in `broken` comes back 1 nat off (a mask the model ignores)."""
    calls = []
    original = layouts.completion_logps

    def forward(model, batch):
        kind = batch.pop("_kind", "alone")
        calls.append(kind)
        logps, counts = original(model, batch)
        return (logps + 1.0 if kind in broken else logps), counts

    for name, collate in list(layouts._COLLATE.items()):
        monkeypatch.setitem(layouts._COLLATE, name, lambda pairs, pad, c=collate, n=name: {**c(pairs, pad), "_kind": n})
    monkeypatch.setattr(layouts, "completion_logps", forward)
    return calls


def test_the_layout_asked_for_is_the_only_one_measured_when_it_is_exact(monkeypatch):
    model = build_model(64).eval()
    use_block_attention(model)
    calls = _counted(monkeypatch)
    layout, sharing, deltas = layouts.choose_layout(model, PAIRS, 0, layout="packed", prefix_sharing=True,
                                                    max_length=64, log=lambda msg: None)
    assert (layout, sharing) == ("packed", True) and deltas["packed_shared"] < 1e-5
    assert calls == ["alone"] * 6 + ["packed_shared"]  # six sequences alone, then one packed row
    assert "packed" not in deltas and "padded" not in deltas and deltas["attention"] == "block"


def test_a_failing_layout_falls_back_measuring_the_next_ones_in_order(monkeypatch):
    model = build_model(64).eval()
    said = []
    calls = _counted(monkeypatch, broken={"packed_shared", "packed"})
    layout, sharing, deltas = layouts.choose_layout(model, PAIRS, 0, layout="packed", prefix_sharing=True,
                                                    max_length=64, log=said.append)
    assert (layout, sharing) == ("padded", False)
    assert calls == ["alone"] * 6 + ["packed_shared", "packed", "padded"]
    assert abs(deltas["packed_shared"] - 1.0) < 1e-4 and abs(deltas["packed"] - 1.0) < 1e-4 and deltas["padded"] < 1e-5
    assert len(said) == 1 and "data.layout=padded" in said[0]


def test_packed_without_sharing_asked_for_never_forwards_the_shared_row(monkeypatch):
    model = build_model(64).eval()
    calls = _counted(monkeypatch)
    assert layouts.choose_layout(model, PAIRS, 0, layout="packed", prefix_sharing=False, max_length=64,
                                 log=lambda msg: None)[:2] == ("packed", False)
    assert calls == ["alone"] * 6 + ["packed"]


def test_check_layouts_still_measures_all_three():
    model = build_model(64).eval()
    with torch.no_grad():
        deltas = layouts.check_layouts(model, PAIRS, 0)
    assert set(deltas) == {"packed_shared", "packed", "padded"} and max(deltas.values()) < 1e-5
