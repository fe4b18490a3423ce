"""fastfuse.lin_bn_drop: fastai's LinBnDrop(lin_first=True) block (Linear without bias, [ReLU], BatchNorm1d,
[Dropout]) as one op, forward and backward.

A call: lin_bn_drop() checks its arguments as fastfuse.batch_norm does and calls fastfuse::lin_bn_drop, whose
autograd (csrc/lin_bn_drop.cpp) and kernel (csrc/lin_bn_drop_kernel.cpp, one for every device: ATen's GEMMs around
fastfuse::batch_norm and its backward) are C++. The op has no Python backends of its own: the backend override
reaches the batch norm inside it. This file holds the fake kernels."""
import torch

from .. import _extension, _rng
from .batch_norm import _check


def _fake(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
          pre_relu, p, seed):
    acc = _rng.acc_dtype(x.dtype)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return torch.empty_like(y), y, y.new_empty(weight.shape[0], dtype=acc), y.new_empty(weight.shape[0], dtype=acc)


def _fake_backward(grad_out, x, weight, y, bn_weight, mean, var, training, eps, pre_relu, p, seed, mask):
    empty = x.new_empty(0)
    gdt = bn_weight.dtype if bn_weight is not None else _rng.acc_dtype(x.dtype)
    C = weight.shape[0]
    return (torch.empty_like(x) if mask[0] else empty, torch.empty_like(weight) if mask[1] else empty.clone(),
            x.new_empty(C if mask[2] else 0, dtype=gdt), x.new_empty(C if mask[3] else 0, dtype=gdt))


if _extension.available():
    torch.library.register_fake("fastfuse::lin_bn_drop", _fake)
    torch.library.register_fake("fastfuse::lin_bn_drop_backward", _fake_backward)


def lin_bn_drop(input, weight, running_mean, running_var, bn_weight=None, bn_bias=None, training=False, momentum=0.1,
                eps=1e-5, *, pre_act=None, dropout_p=0.0, num_batches_tracked=None):
    """dropout(batch_norm(pre_act(input @ weight.T))): fastfuse.batch_norm's semantics (running statistics updated
    in training, momentum=None the cumulative average with num_batches_tracked) on the output of a bias-free
    Linear, in one op. input (B, in), weight (out, in) of one dtype."""
    p = _rng.check_p(dropout_p)
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("lin_bn_drop(): input and weight must be tensors")
    if input.dim() != 2 or weight.dim() != 2 or input.shape[1] != weight.shape[1]:
        raise ValueError(f"lin_bn_drop(): expected input (B, in) and weight (out, in), got {tuple(input.shape)} and "
                         f"{tuple(weight.shape)}")
    if input.dtype != weight.dtype or input.device != weight.device:
        raise ValueError(f"lin_bn_drop(): input is {input.dtype} on {input.device}, weight {weight.dtype} on "
                         f"{weight.device}; they must match")
    # batch_norm()'s checks on a stand-in of the Linear's output (no memory: a 0-stride expand)
    y = torch.empty((), dtype=input.dtype, device=input.device).expand(input.shape[0], weight.shape[0])
    _check(y, running_mean, running_var, bn_weight, bn_bias, None, training, momentum, eps, pre_act, None,
           num_batches_tracked)
    p = p if training else 0.0
    _extension.require()
    seed = torch.ops.fastfuse.seed() if p > 0 else _rng.NO_SEED
    update = training and running_mean is not None
    out, _, _, _ = torch.ops.fastfuse.lin_bn_drop(
        input, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked if update else None,
        bool(training), None if momentum is None else float(momentum), float(eps), pre_act == "relu", p, seed)
    return out
