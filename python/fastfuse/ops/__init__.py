"""One module per op: functional wrapper, backend routing, fake kernel and autograd."""
from .dropout import dropout

__all__ = ["dropout"]
