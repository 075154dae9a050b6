"""All-gather with gradient, for negatives shared across DDP ranks.

`gather_rows(x)` concatenates every rank's (n, ...) tensor along rows, in rank order, and returns it
with this rank's index. It uses `torch.distributed.nn.functional.all_gather`, whose backward sums
every rank's gradient for a slice into the rank that owns it (reduce-scatter on NCCL; all-to-all +
sum elsewhere, gloo included). FlagEmbedding instead gathers without gradient and puts the local
tensor back in its slice, which gives 1/W of the full-batch gradient after DDP averaging; with the
gradient-carrying gather, the averaged gradient equals the single-process full-batch gradient.
Outside an initialised process group of more than one rank it returns x unchanged and rank 0.
"""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    rank, size = world()
    if size == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0), rank
