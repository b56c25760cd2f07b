import torch

from preftune.data.collate import collate_pairs
from preftune.data.tokenize import TokenizedPair


def test_worked_example_from_docstring():
    P, C, R = 7, 8, 9
    pairs = [TokenizedPair([P, P], [C, C, C], [R], "x", 1), TokenizedPair([P], [C], [R, R], "x", 2)]
    b = collate_pairs(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[P, P, C, C, C], [P, C, 0, 0, 0], [P, P, R, 0, 0], [P, R, R, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert b["input_ids"].dtype == torch.long
