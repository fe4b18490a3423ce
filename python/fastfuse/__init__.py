"""fastfuse: fused PyTorch kernels (C++, CUDA, Triton) for the layers of fast.ai-style models."""
from . import _extension  # noqa: F401  (loads fastfuse._C: every op, its autograd and its C++ kernels)
from . import nn, reference
from ._backends import backends, use_backend
from ._extension import empty_cpu_cache
from . import models  # noqa: F401  (after nn: models are built from its modules)
from . import cam  # noqa: F401  (heatmaps: fastfuse.cam.grad_cam, ...)
from .ops import (augment, batch_norm, dropout, embedding_concat_dropout, lin_bn_drop, reflect_conv2d,
                  sync_batch_norm)
from .distributed import seed_per_rank
from .swap import fuse

__version__ = "0.1.0"
__all__ = ["augment", "backends", "batch_norm", "cam", "dropout", "embedding_concat_dropout", "empty_cpu_cache",
           "fuse", "lin_bn_drop", "models", "nn", "reference", "reflect_conv2d", "seed_per_rank", "sync_batch_norm",
           "use_backend"]
