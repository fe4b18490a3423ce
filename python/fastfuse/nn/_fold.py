"""Inference: a batch norm folded into the convolution before it. In eval mode, without autograd, bn(conv(x)) is the
convolution with weight w * s and bias (b - mean) * s + beta, s = gamma / sqrt(running_var + eps): the batch norm's
pass over the activations disappears (torch.compile's freezing and torch.fx's fuse() do the same). The folded weights
are cached per batch norm and recomputed whenever a parameter or running statistic of the pair changes (a new
tensor, or an in-place update: an optimizer step, load_state_dict) and after every train() / eval() of the batch norm
(model.eval() reaches it): a change through `.data` (fastai's optimizers) bumps no version counter, so a weight
changed through `.data` while the model stays in eval mode is seen after the next model.eval(). Training, and eval
with autograd (Grad-CAM, eval losses with gradients), never fold: they run the fused batch norm."""
import torch
from torch import nn

from .batch_norm import FOLDED as _FOLDED
from .batch_norm import is_fused_bn
from .reflect_conv2d import ReflectConv2d

_CONVS = (nn.Conv2d, ReflectConv2d)
# _FOLDED: bn -> (conv, source tensors, their versions, folded weight, folded bias)


def can_fold(conv, bn) -> bool:
    """conv -> bn may run folded now: inference (eval bn with running statistics, no autograd, not being compiled:
    torch.compile folds on its own) of torch's Conv2d or fastfuse's ReflectConv2d (exact types) and a fastfuse
    BatchNorm. (Called on every forward: attributes read from the modules' dicts, the cheapest checks first.)"""
    if torch.is_grad_enabled() or bn.training or type(conv) not in _CONVS or not is_fused_bn(bn):
        return False
    buffers = bn._buffers
    return (buffers.get("running_mean") is not None and buffers.get("running_var") is not None
            and conv._parameters["weight"].shape[0] == bn.num_features and not torch.compiler.is_compiling())


def _folded(conv, bn):
    cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
    src = (cp["weight"], cp.get("bias"), bp.get("weight"), bp.get("bias"), bb["running_mean"], bb["running_var"])
    try:
        versions = tuple(-1 if t is None else t._version for t in src) + (bn.eps,)
    except RuntimeError:  # inference tensors have no version counter: fold on every call
        versions = None
    hit = _FOLDED.get(bn)
    if (versions is not None and hit is not None and hit[0] is conv and hit[2] == versions
            and all(a is b for a, b in zip(hit[1], src))):
        return hit[3], hit[4]
    w, b, gamma, beta, mean, var = src
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(var.to(acc) + bn.eps)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    shift = (b.to(acc) - mean.to(acc)) * scale if b is not None else -mean.to(acc) * scale
    if beta is not None:
        shift = shift + beta.to(acc)
    weight = (w.to(acc) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)  # keeps w's memory format
    bias = shift.to(w.dtype)
    if versions is not None:
        _FOLDED[bn] = (conv, src, versions, weight, bias)
    return weight, bias


def conv_bn(conv, bn, x, residual=None, relu=False):
    """relu?(bn(conv(x)) + residual?) for a pair where can_fold holds: one convolution with the folded weights, then
    the residual added and the ReLU in place on its fresh output."""
    weight, bias = _folded(conv, bn)
    out = conv._conv_forward(x, weight, bias)
    if residual is not None:
        if (type(residual) is torch.Tensor and residual.shape == out.shape and residual.dtype == out.dtype
                and residual.device == out.device):
            out = out.add_(residual)
        else:
            out = out + residual
    return out.relu_() if relu else out
