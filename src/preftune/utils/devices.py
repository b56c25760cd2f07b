"""The one helper that puts data where a model lives (layer 0: torch only).

Every tensor that reaches a model's forward or `generate` goes through `place(batch, model)`:
the scoring choke point (`logprobs.completion_logps`), sampling, the servers and reward models.
Batches are built on the CPU by the collators; on a CUDA (or any other) device they are moved
here, once, with `non_blocking` copies. Nothing else calls `.to(device)` on data.
"""

from __future__ import annotations

import torch

__all__ = ["model_device", "place"]


def model_device(model) -> torch.device:
    """Where the model's weights are (its first parameter, else its first buffer, else CPU)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def place(batch, model):
    """`batch` (a tensor, or a dict/list/tuple holding tensors) on `model`'s device."""
    return _to(batch, model_device(model))
