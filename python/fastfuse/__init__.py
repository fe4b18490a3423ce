"""fastfuse: fused PyTorch kernels (C++, CUDA, Triton) for the layers of fast.ai-style models."""
from . import _extension  # noqa: F401  (loads fastfuse._C: every op, its autograd and its C++ kernels)
from . import nn, reference
from ._backends import backends, use_backend
from ._extension import empty_cpu_cache
from . import models  # noqa: F401  (after nn: models are built from its modules)
from .ops import augment, batch_norm, dropout, embedding_concat_dropout, lin_bn_drop, reflect_conv2d
from .swap import fuse

__version__ = "0.1.0"
__all__ = ["augment", "backends", "batch_norm", "dropout", "embedding_concat_dropout", "empty_cpu_cache", "fuse", "lin_bn_drop",
           "models", "nn", "reference", "reflect_conv2d", "use_backend"]
