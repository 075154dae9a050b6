"""All-gather with gradient, for negatives shared across DDP ranks.

`gather_rows(x)` concatenates every rank's (n, ...) tensor along rows, in rank order, and returns it
with this rank's index. It uses `torch.distributed.nn.functional.all_gather`, whose backward sums
every rank's gradient for a slice into the rank that owns it (reduce-scatter on NCCL; all-to-all +
sum elsewhere, gloo included). FlagEmbedding instead gathers without gradient and puts the local
tensor back in its slice, which gives 1/W of the full-batch gradient after DDP averaging; with the
gradient-carrying gather, the averaged gradient equals the single-process full-batch gradient.
Outside an initialised process group of more than one rank it returns x unchanged and rank 0.

`same_on_every_rank(x)` says whether every rank holds an equal small tensor (gathered without
gradient): a check that ranks meant to share data do share it (MultiTask's
`retrieval_ranks_share_queries`).
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


def same_on_every_rank(x: torch.Tensor) -> bool:
    """Whether every rank's x (same shape and dtype on every rank) equals this rank's; True
    outside a process group of more than one rank."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return True
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return all(torch.equal(part, x) for part in parts)
