"""Drop-in nn.Modules backed by fastfuse ops."""
from .batch_norm import BatchNorm1d, BatchNorm2d
from .dropout import Dropout
from .fused_sequential import FusedSequential
from .lin_bn_drop import LinBnDrop

__all__ = ["BatchNorm1d", "BatchNorm2d", "Dropout", "FusedSequential", "LinBnDrop"]
from .tabular import Embedding, TabularEmbedding  # noqa: E402
__all__ += ["Embedding", "TabularEmbedding"]
