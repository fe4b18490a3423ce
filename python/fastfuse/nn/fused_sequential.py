"""FusedSequential: an nn.Sequential whose forward runs each [ReLU] -> BatchNorm -> [ReLU] -> [Dropout] run of
children as one fastfuse.batch_norm call. Children, order and state_dict are exactly nn.Sequential's, so
fastai blocks (LinBnDrop, ConvLayer) keep their keys; anything else runs as usual."""
import torch

from ._hooks import hooked
from .batch_norm import is_fused_bn
from .dropout import Dropout

_DROPOUTS = (torch.nn.Dropout, Dropout)


def _is_relu(m):
    return type(m) is torch.nn.ReLU


def fused_forward(mods, x):
    if hooked(mods):  # the children one by one, so that their hooks run (see _hooks)
        for m in mods:
            x = m(x)
        return x
    i, n = 0, len(mods)
    while i < n:
        pre = None
        if _is_relu(mods[i]) and i + 1 < n and is_fused_bn(mods[i + 1]):
            pre, i = "relu", i + 1
        m = mods[i]
        i += 1
        if not is_fused_bn(m):
            x = m(x)
            continue
        post, p = None, 0.0
        if i < n and _is_relu(mods[i]):
            post, i = "relu", i + 1
        if i < n and type(mods[i]) in _DROPOUTS:
            if not mods[i].training:
                i += 1  # an eval-mode dropout is the identity
            elif m.training:
                p, i = mods[i].p, i + 1  # only fused when BN also trains: the op drops out only in training
        x = m(x, pre_act=pre, post_act=post, dropout_p=p)
    return x


def fuses_any(mods) -> bool:
    """fused_forward would fuse something in mods: a batch norm next to a ReLU or followed by a dropout."""
    return any((is_fused_bn(a) and (_is_relu(b) or type(b) in _DROPOUTS)) or (_is_relu(a) and is_fused_bn(b))
               for a, b in zip(mods, mods[1:]))


class FusedSequential(torch.nn.Sequential):
    def forward(self, input):
        return fused_forward(list(self), input)
