"""fastfuse.augment: fastai's batch augmentation (flip, rotate, zoom, perspective warp, lighting, normalisation,
with reflection padding) as one pass over the batch.

A call: augment() checks its arguments and calls fastfuse::augment, whose C++ kernels (csrc/cpu/augment_kernel.cpp,
csrc/cuda/augment_kernel.cu) read each input pixel it needs and write each output element once. The op is forward
only (csrc/augment.cpp): its output never requires grad. This file holds the fake kernel and the Python backends
(triton, reference)."""
import numbers

import torch

from .. import _backends, _extension, reference

PAD_MODES = ("reflection", "zeros", "border")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton(*args):
    from ..triton_kernels import augment as tk  # imported lazily: triton is optional and slow to import
    return tk.augment(*args)


def _fake(x, matrix, size, brightness, contrast, mean, std, pad_mode, out_dtype, channels_last):
    torch._check(x.dim() == 4, lambda: f"fastfuse augment: x must be (B, C, H, W), got {x.dim()} dims")
    torch._check(matrix.dim() == 3 and matrix.shape[0] == x.shape[0],
                 lambda: f"fastfuse augment: matrix must be (B, 3, 3), got {tuple(matrix.shape)}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], size[0], size[1]), dtype=out_dtype, device=x.device,
                       memory_format=fmt)


if _extension.available():
    torch.library.register_fake("fastfuse::augment", _fake)
    _backends.register("augment", triton=_triton, reference=reference.augment)


def _size(size):
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"augment(): size must be an int or (h, w), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"augment(): size must be positive, got {size!r}")
    return h, w


def _per(name, t, n, what, x):
    """t as a float32 (n,) tensor on x's device; a Python number is broadcast."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        t = [float(t)] * n
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device) if not isinstance(t, torch.Tensor) else t
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"augment(): {name} must have one value per {what} ({n}), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t.to(x.device)


def augment(x: torch.Tensor, matrix: torch.Tensor, size, *, brightness=None, contrast=None, mean=None, std=None,
            pad_mode: str = "reflection", out_dtype: torch.dtype = torch.float32,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Resample, relight and normalise a batch of images in one pass (fastai's aug_transforms on the batch).

    x: (B, C, H, W), uint8 (read as x / 255) or floating point in [0, 1], contiguous or channels_last.
    matrix: (B, 3, 3). The output pixel at normalised coordinates (u, v) in [-1, 1] (align_corners=True: +-1 are
    the centres of the corner pixels) samples the input at (x / w, y / w), [x, y, w] = matrix @ [u, v, 1], in the
    input's normalised coordinates: with last row [0, 0, 1], F.affine_grid(matrix[:, :2]) + F.grid_sample.
    size: int or (h, w) of the output. Bilinear sampling, pad_mode 'reflection', 'zeros' or 'border' (grid_sample's
    meaning with align_corners=True).
    brightness, contrast: (B,) per image: y = sigmoid(contrast * (logit(v) + logit(brightness))), fastai's
    lighting (logit clamped to [1e-7, 1 - 1e-7]); one of them alone uses the neutral value (0.5, 1) for the other;
    both None skip the lighting. mean, std: per channel (sequences or (C,) tensors): (y - mean) / std.
    Returns (B, C, h, w) in out_dtype (float32, bfloat16, float16) and memory_format.

    Forward only: the output never requires grad, whatever the inputs' requires_grad (augmentation draws its
    parameters, it does not learn them); backpropagating through it raises torch's "does not require grad"
    error. Deterministic: the same inputs give the same bits on every run and thread count."""
    if not isinstance(x, torch.Tensor) or not isinstance(matrix, torch.Tensor):
        raise TypeError("augment(): x and matrix must be torch.Tensors")
    if x.dim() != 4:
        raise ValueError(f"augment(): x must be (B, C, H, W), got {x.dim()} dims (shape {tuple(x.shape)})")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"augment(): x must be uint8 or floating point, got {x.dtype}")
    B, C = x.shape[:2]
    if matrix.shape != (B, 3, 3):
        raise ValueError(f"augment(): matrix must be (B, 3, 3) = ({B}, 3, 3), got {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"augment(): matrix must be floating point, got {matrix.dtype}")
    if matrix.device != x.device:
        raise ValueError(f"augment(): matrix is on {matrix.device}, x on {x.device}")
    h, w = _size(size)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"augment(): pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"augment(): out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"augment(): memory_format must be torch.contiguous_format or torch.channels_last, "
                         f"got {memory_format}")
    if brightness is not None or contrast is not None:
        brightness = _per("brightness", 0.5 if brightness is None else brightness, B, "image", x)
        contrast = _per("contrast", 1.0 if contrast is None else contrast, B, "image", x)
    if (mean is None) != (std is None):
        raise ValueError("augment(): mean and std come together (or neither)")
    if mean is not None:
        mean, std = _per("mean", mean, C, "channel", x), _per("std", std, C, "channel", x)
        if std.device.type == "cpu" and bool((std == 0).any()):  # on a GPU this check would be a host sync
            raise ValueError(f"augment(): std must be non-zero, got {std.tolist()}")
    _extension.require()
    return torch.ops.fastfuse.augment(x, matrix, [h, w], brightness, contrast, mean, std, pad_mode, out_dtype,
                                      memory_format == torch.channels_last)
