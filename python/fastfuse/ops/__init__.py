"""One module per op: functional wrapper, backend routing, fake kernel and autograd."""
from .batch_norm import batch_norm
from .dropout import dropout

from .embedding_concat_dropout import embedding_concat_dropout
from .reflect_conv2d import reflect_conv2d

__all__ = ["batch_norm", "dropout", "embedding_concat_dropout", "reflect_conv2d"]
