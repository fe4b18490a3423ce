"""Drop-in nn.Modules backed by fastfuse ops."""
from .dropout import Dropout

__all__ = ["Dropout"]
