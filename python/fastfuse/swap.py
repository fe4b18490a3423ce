"""fuse(model): swap torch layers for their fastfuse twins in place, keeping parameters, buffers and mode."""
import torch

from . import nn as ffnn


def _fused_dropout(m: torch.nn.Dropout) -> torch.nn.Module:
    new = ffnn.Dropout(m.p, m.inplace)
    new.train(m.training)
    return new


# exact types only: a subclass of nn.Dropout may do more than dropout
_SWAPS = {torch.nn.Dropout: _fused_dropout}


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every swappable layer of `model` (in place) and return it."""
    for name, child in list(model.named_children()):
        make = _SWAPS.get(type(child))
        if make is not None:
            setattr(model, name, make(child))
        else:
            fuse(child)
    return model
