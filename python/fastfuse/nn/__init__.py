"""Drop-in nn.Modules backed by fastfuse ops."""
from .dropout import Dropout

__all__ = ["Dropout"]
from .reflect_conv2d import ConvLayer, NormType, ReflectConv2d  # noqa: E402

__all__ += ["ConvLayer", "NormType", "ReflectConv2d"]
