"""fuse(model): swap torch layers for their fastfuse twins in place, keeping parameters, buffers and mode."""
import torch

from . import nn as ffnn


def _fused_dropout(m: torch.nn.Dropout) -> torch.nn.Module:
    new = ffnn.Dropout(m.p, m.inplace)
    new.train(m.training)
    return new


def _fused_batch_norm(cls):
    def make(m):
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        # share the parameters and buffers themselves: optimizers and other references stay valid
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            setattr(new, name, t)
        new.train(m.training)
        return new
    return make


# exact types only: a subclass may do more than the layer itself
_SWAPS = {torch.nn.Dropout: _fused_dropout,
          torch.nn.BatchNorm1d: _fused_batch_norm(ffnn.BatchNorm1d),
          torch.nn.BatchNorm2d: _fused_batch_norm(ffnn.BatchNorm2d)}


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every swappable layer of `model` (in place) and return it."""
    for name, child in list(model.named_children()):
        make = _SWAPS.get(type(child))
        if make is not None:
            setattr(model, name, make(child))
        else:
            fuse(child)
    return model
