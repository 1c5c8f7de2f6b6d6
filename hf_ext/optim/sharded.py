"""DTensor parameters (FSDP2's ``fully_shard``) in the 4-bit optimizers: where each state entry lives and what the
step reduces across ranks.

FSDP2 shards a parameter along dim 0 (``Shard(0)``, ``torch.chunk``'s split: ranks hold ceil(n0 / W) rows, the
last ones fewer or none), on one mesh dimension; HSDP adds ``Replicate`` dimensions, whose ranks hold equal
gradients. A state entry whose dim 0 indexes the parameter's rows (``AdamW4bit``'s ``row_keys``) is sharded like
the parameter; every other entry is replicated, and where the statistic it holds runs over rows it is reduced
across the shard group: MAX for rank-1 scales, SUM for the factored means. States are DTensors whose global shapes
are the ones a plain parameter of the same shape gets, so distributed checkpoints move between meshes and to one
process. A parameter whose quantization blocks do not split at row boundaries keeps its whole state on every rank
and steps the gathered parameter (``Shards.replicated``).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard


@dataclass(frozen=True)
class Shards:
    """How one DTensor parameter is split: dim 0 across ``group`` (one mesh dimension's), ``rows`` in all,
    this rank holding rows ``[start, start + local_rows)``.

    Attributes:
        mesh, placements: the parameter's device mesh and placements.
        group: the process group of the mesh dimension that shards dim 0.
        rows, start, local_rows: the parameter's dim-0 size, and this rank's first row and row count.
    """

    mesh: DeviceMesh
    placements: tuple
    group: object
    rows: int
    start: int
    local_rows: int

    def wrap(self, local: torch.Tensor, shape: tuple, sharded: bool) -> DTensor:
        """A DTensor of global ``shape`` from this rank's ``local`` part: rows of a sharded entry, the whole of a
        replicated one."""
        placements = self.placements if sharded else tuple(Replicate() for _ in self.placements)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=shape, stride=stride)

    def rows_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (global) tensor, a view."""
        return full[self.start : self.start + self.local_rows]

    def all_max(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its elementwise maximum across the shard group, in one collective."""
        self._all_reduce(tensors, dist.ReduceOp.MAX)

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its elementwise sum across the shard group, in one collective."""
        self._all_reduce(tensors, dist.ReduceOp.SUM)

    def _all_reduce(self, tensors: list[torch.Tensor], op) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=op, group=self.group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))


def shards_of(param: torch.Tensor, owner: str) -> Shards | None:
    """The split of a DTensor parameter; None for a plain tensor.

    Args:
        param: a parameter; a DTensor must be ``Shard(0)`` on one mesh dimension and ``Replicate`` on the others.
        owner: the optimizer's name, for the error.

    Raises:
        TypeError: other placements (tensor parallelism's ``Shard(1)``, ``Partial``, strided shards), naming them.
    """
    if not isinstance(param, DTensor):
        return None
    placements = tuple(param.placements)
    sharded = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
        raise TypeError(
            f"{owner} supports DTensor parameters sharded along dim 0 on one mesh dimension (FSDP2's fully_shard, "
            f"HSDP), got placements {placements} for a parameter of shape {tuple(param.shape)}. Tensor-parallel "
            "layouts are not supported: use FSDP2 alone, or another optimizer with tensor parallelism."
        )
    mesh_dim = sharded[0]
    mesh = param.device_mesh
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    rows = param.shape[0]
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    local_rows = param.to_local().shape[0]
    if local_rows != min(per_rank, rows - start):
        raise TypeError(
            f"{owner}: a DTensor parameter of shape {tuple(param.shape)} holds {local_rows} rows on rank {rank} of "
            f"{world}; torch.chunk's split (FSDP2's) gives {min(per_rank, rows - start)}."
        )
    return Shards(mesh, placements, mesh.get_group(mesh_dim), rows, start, local_rows)


def local(value):
    """The local part of a DTensor (a view), anything else as it is."""
    return value.to_local() if isinstance(value, DTensor) else value


def full(value):
    """The whole of a DTensor (gathered), anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def all_finite(splits: list[Shards | None], flags: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter "gradient is finite" flags agreed by every rank: a DTensor's local flag is AND-reduced across
    its shard group (one collective per group), so all ranks skip or raise together.

    Args:
        splits: each parameter's ``shards_of`` (None for a plain tensor); flags: bool 0-d tensors, whether this
            rank's local gradient is finite, for each.

    Returns:
        The flags, those of DTensor parameters replaced by the group's.
    """
    by_group: dict[object, list[int]] = {}
    for i, shards in enumerate(splits):
        if shards is not None:
            by_group.setdefault(shards.group, []).append(i)
    flags = list(flags)
    for group, indices in by_group.items():
        agreed = torch.stack([flags[i] for i in indices]).to(torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        for i, flag in zip(indices, agreed.bool(), strict=True):
            flags[i] = flag
    return flags
