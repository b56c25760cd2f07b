"""FSDP2 on any backend, and the few collectives a sharded run needs around Accelerate.

Accelerate drives FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`). Two things
are ours, both thin and both on library APIs:

* Accelerate 1.15 switches its FSDP plugin on only for GPU-like backends; on CPU processes (gloo)
  the same launch silently becomes DDP. PyTorch's `fully_shard` (FSDP2) itself runs on CPU, so
  `enable_fsdp_on_cpu` builds the plugin Accelerate would have built from the launcher's
  environment and selects it before `prepare`. That is how FSDP is tested on CPU machines; on GPUs
  Accelerate does it itself and this is a no-op.
* Checkpoints stay one format at every world size: sharded tensors (DTensors) are gathered with
  `DTensor.full_tensor()` on every rank (a collective) and rank 0 writes them as safetensors; on
  resume each rank reads the full tensor and keeps its shard (`distribute_tensor`). We do not use
  torch.distributed.checkpoint here: its metadata file is a pickle, and every file we save is
  safetensors. The cost is one full copy of the *trainable* state on rank 0 while a checkpoint is
  written (the LoRA adapter and its Adam moments; for full fine-tuning, weights plus two moments).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

__all__ = ["enable_fsdp_on_cpu", "is_fsdp", "loads_on_rank0_only", "shard_frozen", "init_root", "unsharded_root",
           "full_tensor", "full_tensors", "shard_like", "full_model_state", "local_state_mb", "sharded_modules",
           "rank_and_world", "gather_objects"]


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Select FSDP2 on CPU processes launched with an FSDP config (see the module docstring).
    Returns True when it switched; call before `accelerator.prepare`."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState  # deferred: ~1 s, for runs only
    from accelerate.utils import DistributedType  # see above

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* as `accelerate launch` exported them
    if plugin.fsdp_version != 2:
        return False  # FSDP1 needs CUDA; Accelerate's plain DDP stays in charge
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # both singletons: AcceleratorState copies PartialState's fields each time it is constructed
    # (Accelerate does that internally), which would quietly switch the run back to DDP
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return True


def loads_on_rank0_only(accelerator) -> bool:
    """FSDP2 with `fsdp_cpu_ram_efficient_loading`, on a rank other than 0: this process builds the
    model without weights and receives its shards from rank 0 at prepare (Accelerate broadcasts
    them), so it never holds a whole copy of the policy and reference."""
    return (is_fsdp(accelerator) and accelerator.is_fsdp2 and not accelerator.is_main_process
            and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading))


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType  # deferred: callers already hold an Accelerator

    return accelerator.distributed_type == DistributedType.FSDP


def shard_frozen(accelerator, module):
    """A frozen module (the reference copy) sharded like the policy: Accelerate's own FSDP2 preparation,
    same wrap policy and mesh. (`prepare_model(evaluation_mode=True)` places a model but does not shard
    it.) Under FSDP1 Accelerate places it unsharded: a full copy per process."""
    from accelerate.utils import fsdp2_prepare_model  # deferred: callers already hold an Accelerator

    if accelerator.is_fsdp2:
        return fsdp2_prepare_model(accelerator, module)
    return accelerator.prepare_model(module, evaluation_mode=True)


def _is_fsdp_module(model) -> bool:
    from torch.distributed.fsdp import FSDPModule  # deferred: torch.distributed.fsdp loads only for runs

    return isinstance(model, FSDPModule)


@torch.no_grad()
def init_root(model, token_id: int) -> None:
    """One forward through the root module (every rank), so FSDP knows its root before anything
    calls an inner module first: `generate()` on a PEFT model enters at the wrapped model, and
    FSDP2 would otherwise take the first sharded submodule it meets for the root and refuse.
    Evaluation mode and no gradient: no RNG is drawn, no state changes."""
    if not _is_fsdp_module(model):
        return
    was_training = model.training
    model.eval()
    model(input_ids=torch.tensor([[token_id]]), use_cache=False)
    model.train(was_training)


@contextmanager
def unsharded_root(model):
    """The root module's own parameters (final norm, anything outside the wrapped layers) gathered
    for forwards that do not enter through the root (generation); the wrapped layers gather
    themselves as they run. A no-op for an unsharded model."""
    if not _is_fsdp_module(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _dtensor():
    from torch.distributed.tensor import DTensor  # deferred: torch.distributed for runs only

    return DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` as a plain CPU tensor; a sharded one is gathered (a collective: every rank calls)."""
    return (t.full_tensor() if isinstance(t, _dtensor()) else t).detach().contiguous().cpu()


def full_tensors(tensors: dict) -> dict:
    """`full_tensor` of every value (all ranks must call, in the same order: dict order is the
    parameter order, the same on every rank)."""
    return {k: full_tensor(v) for k, v in tensors.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: this rank's shard when `like` is a DTensor, else `full`."""
    DTensor = _dtensor()
    if not isinstance(like, DTensor):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor  # deferred like DTensor (see _dtensor)

    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)


def full_model_state(model) -> dict:
    """The whole model's weights as plain CPU tensors on rank 0 ({} elsewhere); every rank calls.
    torch's own API directly: Accelerate's `get_state_dict` asks for `broadcast_from_rank0`, which
    hands back DTensors on CPU meshes (torch 2.13)."""
    from torch.distributed.checkpoint import state_dict as dcp_state  # deferred: only under FSDP

    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = dcp_state.get_model_state_dict(model, options=options)
    # tied parameters (input and output embeddings) come back as separate copies; make them one
    # tensor again, so save_pretrained sees the tie and writes it once, as it does unsharded
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state and id(param) in first and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def local_state_mb(modules, optimizer) -> float:
    """Megabytes of weights, gradients and optimizer state this process holds (its shards under
    FSDP; tied weights counted once): what sharding divides, whatever the allocator keeps."""
    DTensor = _dtensor()

    def size(t) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += size(p) + (size(p.grad) if p.grad is not None else 0)
    inner = getattr(optimizer, "optimizer", optimizer)
    total += sum(size(v) for state in inner.state.values() for v in state.values() if torch.is_tensor(v))
    return round(total / 2**20, 3)


def sharded_modules(model) -> list[str]:
    """Class names of the modules FSDP wrapped (empty when unsharded)."""
    from torch.distributed.fsdp import FSDPModule  # see _is_fsdp_module

    return sorted({type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)})


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_objects(value) -> list:
    """One JSON-able value per rank, in rank order, on every rank (a single process: [value])."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out
