"""fastfuse: fused PyTorch kernels (C++, CUDA, Triton) for the layers of fast.ai-style models."""
from . import _extension, _library  # noqa: F401  (load _C if it is there; define every op schema)
from . import nn, reference
from ._backends import backends, use_backend
from .ops import batch_norm, dropout, reflect_conv2d
from .swap import fuse

__version__ = "0.1.0"
__all__ = ["backends", "batch_norm", "dropout", "fuse", "nn", "reference", "reflect_conv2d", "use_backend"]
