"""Fully sharded data parallel training with PyTorch's FSDP2 (``fully_shard``), through Lightning's
``ModelParallelStrategy`` (``trainer=fsdp``).

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP2 keeps each parameter a sharded ``DTensor`` that
``clip_grad_norm_``, AdamW and the state-dict helpers handle directly, lets frozen and trained parameters share a
shard unit (LoRA over a frozen base), and runs on the CPU with the gloo backend as on GPUs with NCCL, so the
multi-process path is tested in CI on two CPU processes (FSDP1 refuses the CPU).

The unit of sharding: every DiT block, and every other child module with parameters (embeddings, time
projection, head, audio modules), each on its own. The streaming engine and the Stage 2 rollout call the DiT's
helpers (``embed_video``, ``time_modulation``, ``run_blocks``, ``head``...) rather than its ``forward``, so there
is no single forward to gather the parameters in; with every child its own unit, each call goes through a child's
``__call__`` and FSDP gathers exactly that child's weights. The two helper methods that reach inside a child
(``DiTBlock.context_kv`` for the text cross-attention cache, ``AudioProjection.project_grouped``) are registered
as forward methods, so they gather too.
"""
from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ..models.dit import AvatarDiT

# Methods of sharded children that run outside their ``forward`` (see the module docstring), by child name.
BLOCK_FORWARD_METHODS = ("context_kv",)
CHILD_FORWARD_METHODS = {"audio_proj": ("project_grouped",)}


class FSDP2Strategy(ModelParallelStrategy):
    """Pure data parallel FSDP2: one mesh dimension over every process (no tensor parallelism).

    Args:
        distributed_checkpoint: each rank writes its shard (a checkpoint folder) instead of rank 0 gathering
            the full weights and optimizer states into one file.
    """

    def __init__(self, distributed_checkpoint: bool = False, **kwargs):
        super().__init__(data_parallel_size=1, tensor_parallel_size=1,
                         save_distributed_checkpoint=distributed_checkpoint, **kwargs)

    @property
    def distributed_checkpoint(self) -> bool:
        return self._save_distributed_checkpoint

    def setup_environment(self) -> None:
        # The world size is known only now; Lightning's own "auto" would split it into data x tensor parallel.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def mixed_precision(precision: str):
    """FSDP2's policy for ``trainer.precision``: ``bf16-mixed`` gathers bf16 weights and reduces gradients in
    float32 (the master weights stay float32); other precisions keep the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if str(precision) == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_dit(model: AvatarDiT, mesh, precision: str = "32-true") -> AvatarDiT:
    """Shard ``model`` in place over ``mesh`` (1-D data parallel), one unit per block and per other child."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if list(model.parameters(recurse=False)):
        raise ValueError("shard_dit: the DiT holds parameters outside its children, which no unit would gather")
    policy = mixed_precision(precision)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        for method in BLOCK_FORWARD_METHODS:
            register_fsdp_forward_method(block, method)
    for name, child in model.named_children():
        if name == "blocks" or not any(True for _ in child.parameters()):
            continue
        fully_shard(child, mesh=mesh, mp_policy=policy)
        for method in CHILD_FORWARD_METHODS.get(name, ()):
            register_fsdp_forward_method(child, method)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state of a sharded model on the CPU (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (``clip_grad_norm_`` over sharded parameters returns a DTensor)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def mesh_of(module) -> object | None:
    """The data-parallel mesh Lightning's model-parallel strategy gave ``module`` (a LightningModule), or None
    when it runs unsharded."""
    mesh = getattr(module, "_device_mesh", None)
    return None if mesh is None else mesh["data_parallel"]


def gathered(model: nn.Module, build) -> nn.Module | None:
    """``model`` itself when it is not sharded; else an unsharded copy on the CPU, on global rank 0 (None on the
    other ranks): ``build()`` makes a model of the same structure, which gets the full state. Sharded, it is a
    collective: every rank must call it."""
    import torch.distributed as dist

    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    plain = build()
    plain.load_state_dict(state, strict=True)
    return plain
