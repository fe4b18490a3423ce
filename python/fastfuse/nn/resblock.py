"""fastai's ResBlock (and the SE and self-attention layers it can hold) on fastfuse's layers: the same signature,
children, repr and state_dict keys as fastai.layers.ResBlock, padding_mode reaching every convolution, and the
block's end, relu(bn(conv(h)) + idpath(x)), as one fastfuse.batch_norm call."""
import inspect
import math

import torch
from torch import nn

from ._hooks import hooked
from .batch_norm import is_fused_bn
from .pooling import AvgPool
from .reflect_conv2d import ConvLayer, NormType


def _norm_type(norm_type):
    """fastfuse's NormType for fastfuse's or fastai's (an enum with the same names); None stays None."""
    if norm_type is None or isinstance(norm_type, NormType):
        return norm_type
    return NormType[norm_type.name]


# ConvLayer's keyword arguments as fastai's signatures list them (fastai's @delegates): keyword-only, after the
# block's own; padding_mode defaults to 'reflect' here
_CONV_KWARGS = (("padding", None), ("bias", None), ("bn_1st", True), ("transpose", False), ("init", "auto"),
                ("xtra", None), ("bias_std", 0.01), ("dilation", 1), ("padding_mode", "reflect"), ("device", None),
                ("dtype", None))


def delegated_signature(f, extra):
    """Give f (which takes **kwargs) fastai's delegated signature: its own parameters but **kwargs, then `extra`
    ((name, default) pairs) as keyword-only ones (inspect.signature, help() and IDEs show them)."""
    sig = inspect.signature(f)
    names = {n for n, _ in extra}
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD and p.name not in names]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in extra]
    f.__signature__ = sig.replace(parameters=params)
    return f


class ProdLayer(nn.Module):
    """fastai's ProdLayer: the layer's input times the block's input (SequentialEx passes it)."""

    def forward(self, x, orig):
        return x * orig


class SequentialEx(nn.Module):
    """fastai's SequentialEx (its `layers` ModuleList, so the same keys), for the layers used here: each layer takes
    the previous one's output; a ProdLayer also takes the block's input."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        res = x
        for layer in self.layers:
            res = layer(res, x) if isinstance(layer, ProdLayer) else layer(res)
        return res

    def __getitem__(self, i):
        return self.layers[i]


def SEModule(ch, reduction, act_cls=nn.ReLU):  # noqa: N802  (fastai's name)
    """fastai's squeeze-and-excitation module: x * sigmoid(conv(act(conv(avgpool(x)))))."""
    nf = math.ceil(ch // reduction / 8) * 8
    return SequentialEx(nn.AdaptiveAvgPool2d(1),
                        ConvLayer(ch, nf, ks=1, norm_type=None, act_cls=act_cls, padding_mode="zeros"),
                        ConvLayer(nf, ch, ks=1, norm_type=None, act_cls=nn.Sigmoid, padding_mode="zeros"),
                        ProdLayer())


class SimpleSelfAttention(nn.Module):
    """fastai's SimpleSelfAttention (a spectral-normed 1-D conv and a gamma that starts at 0)."""

    def __init__(self, n_in: int, ks=1, sym=False):
        super().__init__()
        self.sym, self.n_in = sym, n_in
        conv = nn.Conv1d(n_in, n_in, ks, padding=ks // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight)
        self.conv = nn.utils.spectral_norm(conv)
        self.gamma = nn.Parameter(torch.tensor([0.]))

    def forward(self, x):
        if self.sym:
            c = self.conv.weight.view(self.n_in, self.n_in)
            c = (c + c.t()) / 2
            self.conv.weight = c.view(self.n_in, self.n_in, 1)
        size = x.size()
        x = x.view(*size[:2], -1)
        convx = self.conv(x)
        xxT = torch.bmm(x, x.permute(0, 2, 1).contiguous())
        o = torch.bmm(xxT, convx)
        o = self.gamma * o + x
        return o.view(*size).contiguous()


class ResBlock(nn.Module):
    """fastai's ResBlock: act(convpath(x) + idpath(x)), with fastai's signature, children (convpath, idpath, act),
    init, repr and state_dict keys; the remaining keyword arguments go to every ConvLayer, padding_mode (default
    'reflect', as fastfuse.nn.ConvLayer's) among them, so it reaches every convolution of the block.

    The fused forward: when convpath ends with a [conv, fastfuse BatchNorm] ConvLayer (the default block, no SE or
    self-attention after it), act is an nn.ReLU, no child on the way is hooked and idpath(x) has the output's shape
    and dtype, relu(bn(conv(h)) + idpath(x)) is one fastfuse.batch_norm(..., residual=idpath(x), post_act='relu')
    call. Otherwise fastai's forward runs, with the same result."""

    def __init__(self, expansion, ni, nf, stride=1, groups=1, reduction=None, nh1=None, nh2=None, dw=False, g2=1,
                 sa=False, sym=False, norm_type=NormType.Batch, act_cls=nn.ReLU, ndim=2, ks=3, pool=AvgPool,
                 pool_first=True, **kwargs):
        super().__init__()
        norm_type = _norm_type(norm_type)
        norm2 = (NormType.BatchZero if norm_type == NormType.Batch else
                 NormType.InstanceZero if norm_type == NormType.Instance else norm_type)
        if nh2 is None:
            nh2 = nf
        if nh1 is None:
            nh1 = nh2
        nf, ni = nf * expansion, ni * expansion
        k0 = dict(norm_type=norm_type, act_cls=act_cls, ndim=ndim, **kwargs)
        k1 = dict(norm_type=norm2, act_cls=None, ndim=ndim, **kwargs)
        convpath = [ConvLayer(ni, nh2, ks, stride=stride, groups=ni if dw else groups, **k0),
                    ConvLayer(nh2, nf, ks, groups=g2, **k1)
                    ] if expansion == 1 else [
                    ConvLayer(ni, nh1, 1, **k0),
                    ConvLayer(nh1, nh2, ks, stride=stride, groups=nh1 if dw else groups, **k0),
                    ConvLayer(nh2, nf, 1, groups=g2, **k1)]
        if reduction:
            convpath.append(SEModule(nf, reduction=reduction, act_cls=act_cls))
        if sa:
            convpath.append(SimpleSelfAttention(nf, ks=1, sym=sym))
        self.convpath = nn.Sequential(*convpath)
        idpath = []
        if ni != nf:
            idpath.append(ConvLayer(ni, nf, 1, act_cls=None, ndim=ndim, **kwargs))
        if stride != 1:
            idpath.insert((1, 0)[pool_first], pool(stride, ndim=ndim, ceil_mode=True))
        self.idpath = nn.Sequential(*idpath)
        self.act = nn.ReLU(inplace=True) if act_cls is nn.ReLU else act_cls()

    def _fused_tail(self):
        """(the convpath's layers before the last conv, the last conv, its batch norm) when the block's end can run
        as one fused batch norm call, else None."""
        mods = list(self.convpath)
        if not mods or type(self.act) is not nn.ReLU:
            return None
        last = mods[-1]
        if not isinstance(last, nn.Sequential) or len(last) != 2 or not is_fused_bn(last[1]):
            return None
        if hooked((self.convpath, last, last[0], last[1], self.act)):
            return None  # their own calls run their hooks (see _hooks)
        return mods[:-1], last[0], last[1]

    def forward(self, x):
        tail = self._fused_tail()
        if tail is None:
            return self.act(self.convpath(x) + self.idpath(x))
        head, conv, bn = tail
        h = x
        for m in head:
            h = m(h)
        h = conv(h)
        identity = self.idpath(x)
        if (type(identity) is not torch.Tensor or identity.shape != h.shape or identity.dtype != h.dtype
                or identity.device != h.device):
            return self.act(bn(h) + identity)  # a residual the fused kernel does not take (a broadcast, a dtype)
        return bn(h, residual=identity, post_act="relu")


delegated_signature(ResBlock.__init__, _CONV_KWARGS)
