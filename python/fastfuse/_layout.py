"""Memory-layout helpers. Elementwise kernels work on a tensor's dense storage order, so a channels_last
input gives a channels_last output, and element i of the RNG stream is the i-th element in memory."""
import torch


def is_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill one gap-free block of memory (contiguous in some dimension order)."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(x.shape, x.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when dense, else a contiguous copy (what torch's elementwise ops give for strided views)."""
    return x if is_dense(x) else x.contiguous()


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """1-D view of a dense tensor in memory order."""
    return x.as_strided((x.numel(),), (1,))


def to_strides(x: torch.Tensor, stride) -> torch.Tensor:
    """x with the given strides (a copy only when they differ), e.g. a gradient laid out like the output."""
    if tuple(x.stride()) == tuple(stride) or x.numel() <= 1:
        return x
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)


def is_channels_inner(x: torch.Tensor) -> bool:
    """True for a dense (N, C, *) tensor whose channel dim is innermost in memory (channels_last and its 1-D
    and 3-D analogues)."""
    return x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def channel_dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous or channels-inner (the two layouts per-channel kernels take), else contiguous."""
    return x if x.is_contiguous() or is_channels_inner(x) else x.contiguous()
