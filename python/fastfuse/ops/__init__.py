"""One module per op: functional wrapper, backend routing, fake kernel and autograd."""
from .batch_norm import batch_norm
from .dropout import dropout

__all__ = ["batch_norm", "dropout"]
from .embedding_concat_dropout import embedding_concat_dropout  # noqa: E402
__all__ += ["embedding_concat_dropout"]
