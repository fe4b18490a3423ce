"""Seeds and dropout parameters of the Python side (csrc/dropout.h has the C++ side's)."""
import math
import numbers

import torch


def new_seed() -> torch.Tensor:
    """[key, offset] for Philox, drawn by fastfuse::seed from torch's default CPU generator as
    torch.randint(0, 2**63 - 1, (2,)) would draw it: torch.manual_seed reproduces it, CPU and CUDA runs with the same
    seed draw the same masks, and so does compiled code (it calls the same op)."""
    return torch.ops.fastfuse.seed()


def seed_ints(seed: torch.Tensor):
    if seed.dtype != torch.int64 or seed.numel() != 2 or seed.device.type != "cpu":
        raise ValueError(f"fastfuse: seed must be a CPU int64 tensor [key, offset], got {seed.dtype} "
                         f"of shape {tuple(seed.shape)} on {seed.device}")
    key, offset = seed.tolist()
    return key, offset


def check_p(p) -> float:
    """Dropout probability as a float; ValueError naming the value if it is not a number in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(float(p)) or not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be a number between 0 and 1, but got {p!r}")
    return float(p)


def dropout_threshold(p: float) -> int:
    """keep <=> 16-bit dropout key >= threshold (p < 1; p == 1 is handled without a kernel).
    The keys are 16-bit halves of Philox words (csrc/philox.h), so p acts in steps of 2^-16."""
    return int(math.floor(p * 65536.0))


def dropout_scale(p: float) -> float:
    return 1.0 / (1.0 - p)


def drop_args(p: float):
    """(threshold, scale) as the kernels take them; p == 0 gives (0, 1.0), which keeps every element as it is."""
    return (dropout_threshold(p), dropout_scale(p)) if p > 0 else (0, 1.0)


NO_SEED = torch.zeros(2, dtype=torch.int64)  # the seed passed where p == 0: no random stream is used (never written)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32 for 16-bit floats, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
