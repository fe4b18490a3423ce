"""One module per op: functional wrapper, backend routing, fake kernel and autograd."""
from .dropout import dropout

__all__ = ["dropout"]
from .reflect_conv2d import reflect_conv2d  # noqa: E402

__all__ += ["reflect_conv2d"]
