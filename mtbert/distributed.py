"""Data-parallel training of a flat [K, P] gradient buffer under ``torch.distributed`` (torchrun),
exact: the same update as one process on the whole batch, for any gradient-combination method.

Each step, with R ranks (each has back-propagated its share of every task's batch into its
[K, P] rows, its losses weighted by its share of the examples so that the sum over ranks is the
global mean):

1. **reduce-scatter** the rows: rank r receives the global rows of its column shard [K, W];
2. the Gram matrix of the shard per segment (the C++/CUDA op), then one **all-reduce** of the
   [C, K, K] float64 partial Grams gives every rank the Gram of the global rows;
3. every rank derives the same weights from it and combines its shard only;
4. the optimizer (``FusedAdamW(shard=...)``) updates only the shard, holding state for W columns;
5. **all-gather** the updated parameters.

Traffic per step: K·P (reduce-scatter) + P (all-gather) + C·K² (Gram), against 2·K·P for an
all-reduce of the rows ((K + 1) / (2K) of it). Nothing here knows about BERT or tasks: tensors only.
"""
import datetime
import os
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .optim import ALIGNMENT, FlatParameters, combine_gradients
from .optim.combine import GradientCombination, Weighting

BACKENDS = ("gloo", "nccl")
# How long a collective waits for the other ranks before raising: a rank that died or hangs ends
# the job instead of blocking it. Generous, as the other ranks wait at the next collective while
# rank 0 writes checkpoints and, at the end, the test predictions.
DEFAULT_TIMEOUT_S = 1800.0


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> Tuple[int, int]:
    """(this process's rank, the number of ranks); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_with_several_ranks() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_backend(device: torch.device) -> str:
    """nccl for CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(device: torch.device, backend: Optional[str] = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); on CUDA each process takes the GPU numbered by LOCAL_RANK."""
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def column_shards(numel: int, world_size: int) -> List[Tuple[int, int]]:
    """The (begin, end) columns of each rank: equal widths W (a multiple of ALIGNMENT), the last
    shards cut at ``numel`` (none is when ``numel`` is a multiple of world_size * ALIGNMENT, as
    :class:`ShardedRows` needs)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    width = -(-numel // (world_size * ALIGNMENT)) * ALIGNMENT
    return [(min(r * width, numel), min((r + 1) * width, numel)) for r in range(world_size)]


def shard_boundaries(boundaries: List[int], begin: int, width: int) -> List[int]:
    """Segment boundaries of the columns [begin, begin + width), relative to ``begin``: segments
    outside the shard become empty; the last one ends at ``width``."""
    inside = [min(max(b - begin, 0), width) for b in boundaries]
    inside[-1] = width
    return inside


class ShardedRows:
    """This rank's column shard of a :class:`FlatParameters`' rows and the collectives of a step.

    >>> sharded = ShardedRows(flat)
    >>> optimizer = FusedAdamW(flat.parameters(), shard=sharded.shard, gather_shards=sharded.gather_shards)
    >>> ...each rank: backward of its share into flat.grads...
    >>> sharded.reduce_scatter(); sharded.combine("pcgrad", generator=g); optimizer.step()
    >>> sharded.all_gather_parameters()

    ``collective_bytes`` adds up, per collective, the size of the whole tensor it reduces or
    gathers (the input of a reduce-scatter, the output of an all-gather), for benchmarks.
    """

    def __init__(self, flat: FlatParameters, group: Optional[dist.ProcessGroup] = None):
        self.flat = flat
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        multiple = self.world_size * ALIGNMENT
        if flat.numel % multiple:
            raise ValueError(f"flat.numel ({flat.numel}) must be a multiple of world_size * ALIGNMENT = {multiple}: "
                             f"pack it with FlatParameters(..., numel_multiple={multiple})")
        self.shards = column_shards(flat.numel, self.world_size)
        self.shard = self.shards[self.rank]
        self.width = flat.numel // self.world_size
        K, device = flat.num_tasks, flat.params.device
        # Rank r's columns of row k are a contiguous view: the reduce-scatter reads the rows in place.
        self._row_chunks = [list(flat.grads[k].view(self.world_size, self.width).unbind(0)) for k in range(K)]
        self.rows = torch.zeros(K, self.width, device=device)  # the global rows of this shard
        self._staging = torch.zeros(self.width, device=device)
        self.boundaries = shard_boundaries(flat.boundaries, self.shard[0], self.width)
        self.collective_bytes = {"reduce_scatter": 0, "all_reduce": 0, "all_gather": 0}

    def reduce_scatter(self) -> None:
        """rows <- the sum over ranks of this shard's columns of ``flat.grads``: one reduce-scatter
        per row (the list form: gloo runs it about 25% faster than reduce_scatter_single, measured
        with 2 ranks and 68M floats)."""
        for row, chunks in zip(self.rows, self._row_chunks):
            dist.reduce_scatter(row, chunks, group=self.group)
        self.collective_bytes["reduce_scatter"] += self.flat.grads.numel() * self.flat.grads.element_size()

    def all_reduce_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of the partial Gram matrices: the Gram of the global rows."""
        gram = gram.contiguous()
        dist.all_reduce(gram, group=self.group)
        self.collective_bytes["all_reduce"] += gram.numel() * gram.element_size()
        return gram

    def combine(self, method: Union[str, Weighting] = "sum", *, main: int = 0, **options) -> GradientCombination:
        """Combines this shard's global rows with weights from the global Gram (surgery on the
        shared segment, each head its own task's row, as ``FlatParameters.combine``) into this
        shard's columns of ``flat.grad``. ``main``: a task index or name."""
        begin, end = self.shard
        return combine_gradients(self.rows, self.flat.grad[begin:end], method, boundaries=self.boundaries,
                                 main=self.flat.task_index(main), reduce_gram=self.all_reduce_gram, **options)

    def gather_shards(self, local: torch.Tensor) -> torch.Tensor:
        """The full [P] tensor whose shard r is ``local`` ([W]) on rank r (an all-gather)."""
        gathered = torch.empty_like(self.flat.params)
        dist.all_gather_single(gathered, local.contiguous(), group=self.group)
        self.collective_bytes["all_gather"] += gathered.numel() * gathered.element_size()
        return gathered

    def all_gather_parameters(self) -> None:
        """Every rank's updated shard of ``flat.params`` into every rank's buffer, in place."""
        begin, end = self.shard
        self._staging.copy_(self.flat.params[begin:end])  # the input may not alias the output
        dist.all_gather_single(self.flat.params, self._staging, group=self.group)
        self.collective_bytes["all_gather"] += self.flat.params.numel() * self.flat.params.element_size()


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The sum over ranks of a small float64 tensor (per-step statistics)."""
    values = values.to(torch.float64).contiguous()
    dist.all_reduce(values, group=group)
    return values


__all__ = ["BACKENDS", "DEFAULT_TIMEOUT_S", "ShardedRows", "all_gather_objects", "all_reduce_sum", "column_shards",
           "default_backend", "init_process_group", "is_distributed", "launched_with_several_ranks",
           "rank_and_world_size", "shard_boundaries"]

