"""Helpers for training under torch.distributed (DDP)."""
import torch
import torch.distributed as dist


def seed_per_rank(seed: int, group=None) -> int:
    """torch.manual_seed(seed + rank) on this rank, and that seed returned (the rank in `group`, default the default
    group; 0 without an initialised process group).

    Every fastfuse dropout mask, like torch's, comes from the rank's own generator: ranks seeded alike draw the same
    masks for their (different) samples. Call this after building the model (DDP copies rank 0's parameters to every
    rank when it wraps the model) to give each rank its own masks, reproducibly."""
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    torch.manual_seed(seed + rank)
    return seed + rank
