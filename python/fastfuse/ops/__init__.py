"""One module per op: the public function with its argument checks, the fake kernels (for torch.compile) and the
Python backends. Schemas, autograd and the C++ kernels are in csrc/<op>.cpp (see docs/architecture.md)."""
import torch

from .. import _extension

if _extension.available():
    @torch.library.register_fake("fastfuse::seed")
    def _seed_fake():
        return torch.empty(2, dtype=torch.int64)

from .augment import augment  # noqa: E402
from .batch_norm import batch_norm  # noqa: E402
from .dropout import dropout  # noqa: E402
from .embedding_concat_dropout import embedding_concat_dropout  # noqa: E402
from .lin_bn_drop import lin_bn_drop  # noqa: E402
from .reflect_conv2d import reflect_conv2d  # noqa: E402
from .sync_batch_norm import sync_batch_norm  # noqa: E402

__all__ = ["augment", "batch_norm", "dropout", "embedding_concat_dropout", "lin_bn_drop", "reflect_conv2d",
           "sync_batch_norm"]
