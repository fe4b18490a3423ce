"""fuse(model): swap torch layers for their fastfuse twins in place, keeping parameters, buffers and mode."""
import torch

from . import nn as ffnn


def _fused_dropout(m: torch.nn.Dropout) -> torch.nn.Module:
    new = ffnn.Dropout(m.p, m.inplace)
    new.train(m.training)
    return new


def _fused_reflect_conv2d(m: torch.nn.Conv2d) -> torch.nn.Module:
    if m.padding_mode != "reflect":
        return m  # zero/circular/replicate padding: torch's convolution stays
    new = ffnn.ReflectConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.groups, m.bias is not None, device="meta")
    new.weight, new.bias = m.weight, m.bias  # shares the parameters: optimizers and state_dict keep working
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
          torch.nn.BatchNorm2d: _fused_batch_norm(ffnn.BatchNorm2d),
          torch.nn.BatchNorm3d: _fused_batch_norm(ffnn.BatchNorm3d),
          torch.nn.Conv2d: _fused_reflect_conv2d}


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every swappable layer of `model` (in place) and return it."""
    for name, child in list(model.named_children()):
        make = _SWAPS.get(type(child))
        if make is not None:
            setattr(model, name, make(child))
        else:
            fuse(child)
    return model
