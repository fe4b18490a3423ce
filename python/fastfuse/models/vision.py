"""fastai's vision model assembly on fastfuse's layers: create_head (fastai's head, its BatchNorm -> Dropout ->
Linear -> ReLU runs fused), create_body and vision_model (fastai's create_body / create_vision_model semantics, for
fastfuse's XResNets and torchvision's ResNets alike), and reflect_padding, which turns a zero-padded model into a
reflection-padded one for training from scratch."""
import re
import sys

import torch
from torch import nn

from .. import nn as ffnn
from ..nn._hooks import hooked
from ..nn.fused_sequential import fused_forward
from ..nn.lin_bn_drop import _lin_bn_drop_args
from ..ops.lin_bn_drop import lin_bn_drop
from . import xresnet
from .tabular import SigmoidRange

__all__ = ["create_body", "create_head", "reflect_padding", "vision_model"]


# ---- head ----------------------------------------------------------------------------------------------------------
class _Head(nn.Sequential):
    """create_head's flat nn.Sequential (fastai's children, keys and repr), whose forward fuses: each
    [Linear(bias=False), ReLU?, BatchNorm1d, Dropout?] run is one fastfuse.lin_bn_drop call, and the rest runs as a
    FusedSequential (a BatchNorm with the ReLU before it and the Dropout after it in one fastfuse.batch_norm call)."""

    def _get_name(self):
        return "Sequential"

    def forward(self, x):
        mods = list(self)
        if hooked(mods):  # the children one by one, so that their hooks run (see nn/_hooks)
            for m in mods:
                x = m(x)
            return x
        i, n = 0, len(mods)
        while i < n:
            if type(mods[i]) is nn.Linear:
                for k in (4, 3, 2):
                    args = _lin_bn_drop_args(mods[i:i + k], x) if i + k <= n else None
                    if args is not None:
                        x = lin_bn_drop(x, *args[:-1], **args[-1])
                        i += k
                        break
                else:
                    x = mods[i](x)
                    i += 1
                continue
            j = i + 1
            while j < n and type(mods[j]) is not nn.Linear:
                j += 1
            x = fused_forward(mods[i:j], x)
            i = j
        return x


def _listify(ps):
    if isinstance(ps, (str, bytes)) or not hasattr(ps, "__iter__"):
        return [ps]
    return list(ps)


def create_head(nf, n_out, lin_ftrs=None, ps=0.5, pool=True, concat_pool=True, first_bn=True, bn_final=False,
                lin_first=False, y_range=None):
    """fastai's create_head: [pool, Flatten] and LinBnDrop blocks from nf features (2*nf with concat_pool) through
    lin_ftrs (default [512]) to n_out, flattened into one Sequential (fastai's keys and repr). Built from
    fastfuse.nn.LinBnDrop, AdaptiveConcatPool2d and Flatten; its forward runs the fused ops (see _Head)."""
    if pool and concat_pool:
        nf *= 2
    lin_ftrs = [nf, 512, n_out] if lin_ftrs is None else [nf] + list(lin_ftrs) + [n_out]
    bns = [first_bn] + [True] * len(lin_ftrs[1:])
    ps = _listify(ps)
    if len(ps) == 1:
        ps = [ps[0] / 2] * (len(lin_ftrs) - 2) + ps
    actns = [nn.ReLU(inplace=True)] * (len(lin_ftrs) - 2) + [None]  # one module, as fastai's list repeats it
    layers = []
    if pool:
        layers += [ffnn.AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), ffnn.Flatten()]
    if lin_first:
        layers.append(ffnn.Dropout(ps.pop(0)))
    for ni, no, bn, p, actn in zip(lin_ftrs[:-1], lin_ftrs[1:], bns, ps, actns):
        layers += ffnn.LinBnDrop(ni, no, bn=bn, p=p, act=actn, lin_first=lin_first)
    if lin_first:
        layers.append(nn.Linear(lin_ftrs[-2], n_out))
    if bn_final:
        layers.append(ffnn.BatchNorm1d(lin_ftrs[-1], momentum=0.01))
    if y_range is not None:
        layers.append(SigmoidRange(*y_range))
    return _Head(*layers)


# ---- body ----------------------------------------------------------------------------------------------------------
def _is_pool_type(m):
    return re.search(r"Pool[123]d$", m.__class__.__name__)


def has_pool_type(m):
    """fastai's has_pool_type: m is a pooling layer or has one below it."""
    return bool(_is_pool_type(m)) or any(has_pool_type(c) for c in m.children())


def _first_layer(m):
    """(the module of m's first parameter, its parent, its name in the parent)."""
    c, p, n = m, None, None
    for n in next(m.named_parameters())[0].split(".")[:-1]:
        p, c = c, getattr(c, n)
    return c, p, n


def _update_first_layer(model, n_in, pretrained):
    """fastai's: a first Conv2d for n_in channels; pretrained 3-channel weights summed (1), scaled (2) or padded
    with zeros (4+). A reflection-padded first conv stays fastfuse's ReflectConv2d."""
    if n_in == 3:
        return
    first, parent, name = _first_layer(model)
    if not isinstance(first, nn.Conv2d):
        raise ValueError(f"changing the input channels needs a Conv2d first layer, found {type(first).__name__}")
    if first.in_channels != 3:
        raise ValueError(f"expected the first layer to take 3 input channels, it takes {first.in_channels}")
    kw = {a: getattr(first, a) for a in "out_channels kernel_size stride padding dilation groups padding_mode".split()}
    cls = ffnn.ReflectConv2d if isinstance(first, ffnn.ReflectConv2d) else nn.Conv2d
    new = cls(n_in, bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype, **kw)
    if pretrained:
        with torch.no_grad():
            w = first.weight
            if n_in == 1:
                new.weight.copy_(w.sum(dim=1, keepdim=True))
            elif n_in == 2:
                new.weight.copy_(w[:, :2] * 1.5)
            else:
                new.weight[:, :3] = w
                new.weight[:, 3:].zero_()
    setattr(parent, name, new)


def cut_model(model, cut):
    """fastai's cut_model: the first `cut` children (an int) as a Sequential, or cut(model)."""
    if isinstance(cut, int):
        return nn.Sequential(*list(model.children())[:cut])
    if callable(cut):
        return cut(model)
    raise NameError("cut must be either integer or a function")


def create_body(model, n_in=3, cut=None, *, pretrained=True):
    """fastai's create_body: the model cut before its head (by default before its last child that pools), with
    its first conv made for n_in channels (pretrained: its weights adapted)."""
    _update_first_layer(model, n_in, pretrained)
    if cut is None:
        children = list(enumerate(model.children()))
        cut = next(i for i, o in reversed(children) if has_pool_type(o))
    return cut_model(model, cut)


# ---- full model ----------------------------------------------------------------------------------------------------
_XRESNETS = (xresnet.xresnet18, xresnet.xresnet34, xresnet.xresnet50, xresnet.xresnet101)


def _meta(arch):
    """fastai's model_meta for arch: (cut, torchvision's weights argument or None)."""
    if arch in _XRESNETS:
        return -4, None
    fa = sys.modules.get("fastai.vision.models.xresnet")
    if fa is not None and arch in tuple(getattr(fa, f"xresnet{d}", None) for d in (18, 34, 50, 101, 152)):
        return -4, None
    tv = sys.modules.get("torchvision.models")
    if tv is not None and arch in tuple(getattr(tv, f"resnet{d}", None) for d in (18, 34, 50, 101, 152)):
        return -2, "DEFAULT"
    return None, None


def num_features_model(body, n_in=3):
    """The channels of body's output (fastai's num_features_model): one image of 32, 64, ... pixels a side run in
    eval mode without gradients; the mode is restored."""
    p = next(body.parameters())
    training = body.training
    try:
        sz = 32
        while True:
            try:
                with torch.no_grad():
                    return body.eval()(p.new_empty(1, n_in, sz, sz).uniform_(-1.0, 1.0)).shape[1]
            except Exception:
                if sz >= 4096:
                    raise
                sz *= 2
    finally:
        body.train(training)


def _apply_init(m, func):
    """fastai's apply_init: func on the weight and 0 on the bias of every module below m but the norms."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
             nn.LayerNorm)
    for mod in m.modules():
        params = list(mod.parameters())
        if isinstance(mod, norms) or not params or not params[0].requires_grad:
            continue
        if getattr(mod, "weight", None) is not None:
            func(mod.weight)
        if isinstance(getattr(mod, "bias", None), torch.Tensor):
            with torch.no_grad():
                mod.bias.fill_(0.0)


def vision_model(arch, n_out, n_in=3, pretrained=False, cut=None, concat_pool=True, *, weights=None,
                 init=nn.init.kaiming_normal_, custom_head=None, pool=True, lin_ftrs=None, ps=0.5, first_bn=True,
                 bn_final=False, lin_first=False, y_range=None):
    """fastai's create_vision_model: nn.Sequential(body, head), the body cut from arch() (fastfuse's and fastai's
    xresnets at -4, torchvision's resnets at -2, any other model before its last child that pools), the head
    create_head's (or custom_head), initialized with `init` (not its norms). arch: a function making the model
    (torchvision's get `weights`, 'DEFAULT' when pretrained; others `pretrained`), or an nn.Module to use as it is."""
    meta_cut, default_weights = (None, None) if isinstance(arch, nn.Module) else _meta(arch)
    if isinstance(arch, nn.Module):
        model = arch
    elif default_weights is not None:
        model = arch(weights=default_weights if (weights is None and pretrained) else weights)
    else:
        model = arch(pretrained=pretrained)
    body = create_body(model, n_in, meta_cut if cut is None else cut, pretrained=pretrained)
    nf = num_features_model(body, n_in) if custom_head is None else None
    head = custom_head if custom_head is not None else create_head(
        nf, n_out, lin_ftrs=lin_ftrs, ps=ps, pool=pool, concat_pool=concat_pool, first_bn=first_bn,
        bn_final=bn_final, lin_first=lin_first, y_range=y_range)
    model = nn.Sequential(body, head)
    if init is not None:
        _apply_init(model[1], init)
    return model


# ---- reflection padding --------------------------------------------------------------------------------------------
def _is_zero_padded(m):
    if m.padding_mode != "zeros":
        return False
    return m.padding not in ("valid",) and (m.padding == "same" or any(p != 0 for p in m.padding))


def reflect_padding(model):
    """Every zero-padded Conv2d of `model` (model itself too) pads by reflection instead, in place; returns model.
    torch's nn.Conv2d becomes fastfuse's ReflectConv2d (the same module object, retyped: parameters, hooks and
    references stay; the same keys, and the repr but for padding_mode); other Conv2d subclasses get
    padding_mode='reflect'. This changes what the model computes: it is for training from scratch (a model trained
    zero-padded loses accuracy). Convolutions without padding are left as they are."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and _is_zero_padded(m):
            if type(m) is nn.Conv2d:
                m.__class__ = ffnn.ReflectConv2d  # a subclass that only changes the forward
            m.padding_mode = "reflect"
    return model
