"""fuse(model): swap torch layers, and fastai's blocks, for their fastfuse twins in place, keeping parameters,
buffers, state_dict keys and mode."""
import copy
import sys
from collections import OrderedDict

import torch

from . import nn as ffnn
from .fuse_graph import fused_block
from .nn._hooks import hooked


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


def _fused_sync_batch_norm(m: torch.nn.SyncBatchNorm) -> torch.nn.Module:
    return ffnn.SyncBatchNorm.convert_sync_batchnorm(m, m.process_group)  # same tensors, group and mode


# exact types only: a subclass may do more than the layer itself
_SWAPS = {torch.nn.Dropout: _fused_dropout,
          torch.nn.BatchNorm1d: _fused_batch_norm(ffnn.BatchNorm1d),
          torch.nn.BatchNorm2d: _fused_batch_norm(ffnn.BatchNorm2d),
          torch.nn.BatchNorm3d: _fused_batch_norm(ffnn.BatchNorm3d),
          torch.nn.SyncBatchNorm: _fused_sync_batch_norm,
          torch.nn.Conv2d: _fused_reflect_conv2d}


# ---- blocks: fastai's LinBnDrop / ConvLayer / TabularModel (and fastfuse's eager twins of them) ----------------
# The fused block takes over the very same children (so parameters, buffers, state_dict keys and optimizers stay
# valid); only the class, and with it the forward, changes.
def _as_block(cls):
    def make(m):
        new = cls.__new__(cls)
        torch.nn.Sequential.__init__(new, OrderedDict(m._modules))  # same children under the same names
        new.train(m.training)
        return new  # fuse() then swaps its children: the fused block needs the fused BatchNorm / Dropout / Conv2d
    return make


def _fused_tabular(m):
    from .models import TabularModel
    new = TabularModel.__new__(TabularModel)
    torch.nn.Module.__init__(new)
    for name in ("embeds", "emb_drop", "bn_cont", "layers"):  # fastai's order: the same state_dict
        setattr(new, name, getattr(m, name))
    new.n_emb, new.n_cont = m.n_emb, m.n_cont
    new.train(m.training)
    return new


def _retyped(cls):
    """A maker for a module whose fused twin differs only in its forward: the same object's state (children,
    parameters, buffers, hooks, attributes) under cls, in new containers (the original stays as it was)."""
    def make(m):
        new = cls.__new__(cls)
        new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set)) else v) for k, v in m.__dict__.items()})
        return new  # fuse() then swaps its children: the fused block needs the fused BatchNorm / Conv2d
    return make


# timm's BatchNormAct2d (a BatchNorm2d subclass with `drop` and `act` children): when its act is a ReLU, the fused
# twin below, a subclass of timm's class (isinstance holds, same keys) whose forward is one fastfuse.batch_norm
# call. Made on first use, so that importing fastfuse does not import timm; module __getattr__ lets pickle find it.
_TIMM_BN_ACT = None


def _timm_bn_act_cls():
    global _TIMM_BN_ACT
    if _TIMM_BN_ACT is None:
        from timm.layers.norm_act import BatchNormAct2d as TimmBatchNormAct2d

        from .ops.batch_norm import module_batch_norm

        class BatchNormAct2d(TimmBatchNormAct2d):
            """timm's BatchNormAct2d whose BN -> ReLU runs as one fastfuse.batch_norm(..., post_act='relu') call
            when drop is an Identity, act an nn.ReLU and neither is hooked; otherwise timm's forward."""

            def forward(self, x):
                if (type(self.drop) is not torch.nn.Identity or type(self.act) is not torch.nn.ReLU
                        or hooked((self.drop, self.act)) or x.ndim != 4):
                    return super().forward(x)
                return module_batch_norm(self, x, self.training, post_act="relu")

        BatchNormAct2d.__module__, BatchNormAct2d.__qualname__ = __name__, "BatchNormAct2d"
        _TIMM_BN_ACT = BatchNormAct2d
    return _TIMM_BN_ACT


def __getattr__(name):
    if name == "BatchNormAct2d":
        return _timm_bn_act_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_timm_bn_act(m):
    if type(m.act) is not torch.nn.ReLU:
        return m  # another activation: timm's own forward
    return _retyped(_timm_bn_act_cls())(m)


def _block_swaps():
    """Exact block types -> makers. fastai's (and timm's) classes only when imported (a fastai model means it is)."""
    from .models import tabular
    swaps = {tabular._EagerLinBnDrop: _as_block(ffnn.LinBnDrop), tabular.EagerTabularModel: _fused_tabular}
    layers, model = sys.modules.get("fastai.layers"), sys.modules.get("fastai.tabular.model")
    for mod, name, make in ((layers, "LinBnDrop", _as_block(ffnn.LinBnDrop)),
                            (layers, "ConvLayer", _as_block(ffnn.ConvLayer)),
                            (layers, "ResBlock", _retyped(ffnn.ResBlock)),
                            (model, "TabularModel", _fused_tabular),
                            (sys.modules.get("timm.layers.norm_act"), "BatchNormAct2d", _fused_timm_bn_act)):
        cls = getattr(mod, name, None)
        if isinstance(cls, type):
            swaps[cls] = make
    return swaps


def fuse(model: torch.nn.Module, graphs: bool = True) -> torch.nn.Module:
    """Replace every swappable layer of `model` in place and return the model. Layers: torch's Dropout,
    BatchNorm1d/2d/3d, SyncBatchNorm and
    Conv2d(padding_mode='reflect'), and timm's BatchNormAct2d with a ReLU (one fused
    BN -> ReLU call). Blocks: fastai's LinBnDrop, ConvLayer, ResBlock and TabularModel become fastfuse.nn.LinBnDrop,
    fastfuse.nn.ConvLayer, fastfuse.nn.ResBlock and fastfuse.models.TabularModel over the same children (the fused
    input layer, one-call LinBnDrop, fused BN -> ReLU, the block's last BN + residual add + ReLU in one call). When
    `model` itself is such a block, the returned model is its fused twin (sharing its parameters):
    `learn.model = fastfuse.fuse(learn.model)`.

    With `graphs` (fastfuse.fuse_graph), the forward of every other block below `model` that has a batch norm
    child is traced, and a batch norm followed by a ReLU, or by a residual add and a ReLU, becomes one fused call
    (in inference, eval without autograd, folded into the convolution before it): the block becomes a GraphModule
    over the same children (same name, state_dict keys and parameters), and a plain nn.Sequential (`model` too) a
    FusedSequential, in place. `model` itself, when its own forward has such a pattern (torchvision's ResNet: its
    stem's conv1 -> bn1 -> relu), is returned as that GraphModule, its fused twin over the same children; `model`
    stays usable with its own forward and its fused children: use the returned model."""
    blocks = _block_swaps()
    make = blocks.get(type(model))
    model = _fuse(model if make is None else make(model), {**_SWAPS, **blocks}, graphs)
    if graphs:
        twin = fused_block(model)  # an nn.Sequential: in place (twin is model)
        if twin is not None:
            model = twin
    return model


def _fuse(model, swaps, graphs):
    """Swap model's children by their exact type (swaps: type -> maker), then the children's children; with
    `graphs`, then each child's forward (fused_block), after its own children: a GraphModule holds the children
    as they are when it is made."""
    for name, child in list(model.named_children()):
        make = swaps.get(type(child))
        if make is not None:
            child = make(child)
            setattr(model, name, child)
        _fuse(child, swaps, graphs)
        new = fused_block(child) if graphs else None
        if new is not None:
            setattr(model, name, new)
    return model
