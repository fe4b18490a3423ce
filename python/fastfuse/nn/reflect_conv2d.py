"""ReflectConv2d (drop-in for nn.Conv2d(padding_mode='reflect')) and fastai's ConvLayer on top of it."""
import enum

import torch
from torch import nn

from ..ops.reflect_conv2d import reflect_conv2d
from ._hooks import hooked
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, is_fused_bn


class ReflectConv2d(nn.Conv2d):
    """nn.Conv2d(..., padding_mode='reflect') running fastfuse.reflect_conv2d: same arguments, init,
    parameters and state_dict keys (weights load both ways), same extra_repr; isinstance(m, nn.Conv2d) holds.
    padding='same' with an even effective kernel pads asymmetrically, which the op cannot express: that
    case runs torch's own pad + conv."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="reflect", device=None, dtype=None):
        if padding_mode != "reflect":
            raise ValueError(f"ReflectConv2d only pads with padding_mode='reflect', got {padding_mode!r}; "
                             "use torch.nn.Conv2d for other modes")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)

    def _get_name(self):
        return "Conv2d"  # the same repr as the nn.Conv2d it replaces (fastfuse.nn.BatchNorm2d's is torch's too)

    def _symmetric_padding(self):
        if not isinstance(self.padding, str):
            return list(self.padding)
        # nn.Conv2d stores (left, right, top, bottom) for string padding
        left, right, top, bottom = self._reversed_padding_repeated_twice
        return [top, left] if left == right and top == bottom else None

    def _conv_forward(self, input, weight, bias):
        padding = self._symmetric_padding()
        if padding is None:
            return super()._conv_forward(input, weight, bias)
        return reflect_conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups)


class NormType(enum.Enum):
    """fastai's NormType (same names)."""
    Batch = 1
    BatchZero = 2
    Weight = 3
    Spectral = 4
    Instance = 5
    InstanceZero = 6


def _norm(nf, norm_type, ndim):
    """fastai's BatchNorm / InstanceNorm: bias 1e-3, weight 0 for the *Zero types (a residual branch
    starts as identity), else 1."""
    batch = norm_type in (NormType.Batch, NormType.BatchZero)
    cls = getattr(nn, f"{'BatchNorm' if batch else 'InstanceNorm'}{ndim}d")
    if batch:  # fastfuse's drop-ins: same keys, and bn_act can fuse them with the ReLU
        cls = (BatchNorm1d, BatchNorm2d, BatchNorm3d)[ndim - 1]
    norm = cls(nf) if batch else cls(nf, affine=True)
    with torch.no_grad():
        norm.bias.fill_(1e-3)
        norm.weight.fill_(0.0 if norm_type in (NormType.BatchZero, NormType.InstanceZero) else 1.0)
    return norm


_KAIMING_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)  # fastai gives these __default_init__ = kaiming_uniform_


def _init_conv(conv, act, init, bias_std):
    """fastai's init_linear: bias ~ N(0, bias_std); weight kaiming_uniform_ for ReLU-like activations."""
    if getattr(conv, "bias", None) is not None and bias_std is not None:
        with torch.no_grad():
            conv.bias.normal_(0, bias_std) if bias_std != 0 else conv.bias.zero_()
    if init == "auto":
        init = nn.init.kaiming_uniform_ if isinstance(act, _KAIMING_ACTS) else None
    if init is not None:
        init(conv.weight)


def bn_act(bn: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm then activation: one fused fastfuse.batch_norm(..., post_act="relu") for a fastfuse
    BatchNorm followed by nn.ReLU, else the two modules in turn."""
    if is_fused_bn(bn) and type(act) is nn.ReLU:
        return bn(x, post_act="relu")
    return act(bn(x))


class ConvLayer(nn.Sequential):
    """fastai's ConvLayer: [conv, BN, act] (bn_1st) or [conv, act, BN], the same defaults (padding
    (ks-1)//2, bias only without BN, kaiming init for ReLU, BN bias 1e-3) and the same state_dict keys.
    With padding_mode='reflect' (the default here) the 2-D conv is a ReflectConv2d; 'zeros' and the other
    modes use torch's convolution. [conv, BN, ReLU] runs BN -> ReLU through bn_act (the fusion point)."""

    def __init__(self, ni, nf, ks=3, stride=1, padding=None, bias=None, ndim=2, norm_type=NormType.Batch,
                 bn_1st=True, act_cls=nn.ReLU, transpose=False, init="auto", xtra=None, bias_std=0.01,
                 padding_mode="reflect", **kwargs):
        if padding is None:
            padding = (ks - 1) // 2 if not transpose else 0
        bn = norm_type in (NormType.Batch, NormType.BatchZero)
        inn = norm_type in (NormType.Instance, NormType.InstanceZero)
        if bias is None:
            bias = not (bn or inn)
        if ndim == 2 and not transpose and padding_mode == "reflect":
            conv = ReflectConv2d(ni, nf, kernel_size=ks, bias=bias, stride=stride, padding=padding, **kwargs)
        else:
            cls = getattr(nn, f"Conv{'Transpose' if transpose else ''}{ndim}d")
            conv = cls(ni, nf, kernel_size=ks, bias=bias, stride=stride, padding=padding, padding_mode=padding_mode,
                       **kwargs)
        act = None if act_cls is None else act_cls()
        _init_conv(conv, act, init, bias_std)
        if norm_type == NormType.Weight:
            conv = nn.utils.weight_norm(conv)
        elif norm_type == NormType.Spectral:
            conv = nn.utils.spectral_norm(conv)
        layers = [conv]
        act_bn = []
        if act is not None:
            act_bn.append(act)
        if bn or inn:
            act_bn.append(_norm(nf, norm_type, ndim))
        if bn_1st:
            act_bn.reverse()
        layers += act_bn
        if xtra:
            layers.append(xtra)
        super().__init__(*layers)

    def forward(self, x):
        mods = list(self)
        if hooked(mods):  # the children one by one, so that their hooks run (see _hooks)
            return super().forward(x)
        x = mods[0](x)
        i = 1
        while i < len(mods):
            if i + 1 < len(mods) and is_fused_bn(mods[i]) and isinstance(mods[i + 1], nn.ReLU):
                x = bn_act(mods[i], mods[i + 1], x)
                i += 2
            else:
                x = mods[i](x)
                i += 1
        return x
