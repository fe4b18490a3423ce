"""fastfuse.sync_batch_norm: fastfuse.batch_norm in training with the statistics of every rank of a process group.

A call: sync_batch_norm() checks its arguments and, when a process group of more than one rank is initialised, calls
fastfuse::sync_batch_norm, whose autograd (csrc/sync_batch_norm.cpp) and kernels (csrc/sync_batch_norm_kernel.cpp:
batch norm's primitives around one all_reduce per direction, through torch's functional collectives) are C++.
Otherwise it is fastfuse.batch_norm(training=True). This file holds the fake kernels."""
import torch
import torch.distributed as dist

from .. import _extension, _rng
from .batch_norm import _backward_fake, _check, _forward_fake, batch_norm


def _fake(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, momentum, eps, pre_relu,
          post_relu, p, seed, group_name):
    out, mean, var = _forward_fake(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, True,
                                   momentum, eps, pre_relu, post_relu, p, seed)
    return out, mean, var, x.new_empty((), dtype=torch.float64)


def _fake_backward(grad_out, x, weight, mean, var, count, out, eps, pre_relu, post_relu, p, seed, group_name, mask):
    return _backward_fake(grad_out, x, weight, mean, var, out, True, eps, pre_relu, post_relu, p, seed, mask)


if _extension.available():
    torch.library.register_fake("fastfuse::sync_batch_norm", _fake)
    torch.library.register_fake("fastfuse::sync_batch_norm_backward", _fake_backward)


def sync_group(process_group=None):
    """The group whose statistics a batch norm in training combines (`process_group`, or the default group), or None
    where there is nothing to combine: torch.distributed unavailable or not initialised, or a group of one rank."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, momentum=0.1, eps=1e-5, *,
                    process_group=None, pre_act=None, residual=None, post_act=None, dropout_p=0.0,
                    num_batches_tracked=None):
    """dropout(post_act(batch_norm(pre_act(input)) + residual)) in training, with the mean and variance of the
    batch over every rank of `process_group` (default: the default group), as torch's SyncBatchNorm computes them.
    Ranks may have different batch sizes, or none. The running statistics are updated with the global mean and
    unbiased variance, the same on every rank. The input's gradient is that of the global batch; the weight's and
    bias's are this rank's share (DDP's gradient all_reduce adds them up). Without an initialised process group of
    more than one rank, this is fastfuse.batch_norm(..., training=True). Every rank of the group must make the same
    calls: each one runs one all_reduce forward and one backward."""
    group = sync_group(process_group)
    if group is None:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, pre_act=pre_act,
                          residual=residual, post_act=post_act, dropout_p=dropout_p,
                          num_batches_tracked=num_batches_tracked)
    p = _rng.check_p(dropout_p)
    # batch_norm's checks, but for its "more than 1 value per channel" rule, which here holds over all ranks (the op
    # checks it on the global count: a rank may have one sample, or none). These are the checks of its eval mode, with
    # stand-ins where there are no running statistics, and the one of training that eval lacks.
    if (running_mean is None) != (running_var is None):
        raise ValueError("sync_batch_norm(): give both running_mean and running_var, or neither")
    if isinstance(input, torch.Tensor) and input.dim() >= 2 and running_mean is None:
        stand_in = input.new_zeros((), dtype=torch.float32).expand(input.shape[1])
        stats = (stand_in, stand_in)
    else:
        stats = (running_mean, running_var)
    _check(input, *stats, weight, bias, residual, False, momentum, eps, pre_act, post_act, num_batches_tracked)
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("sync_batch_norm(): momentum=None (cumulative average) needs num_batches_tracked")
    seed = torch.ops.fastfuse.seed() if p > 0 else _rng.NO_SEED
    out, _, _, _ = torch.ops.fastfuse.sync_batch_norm(
        input, weight, bias, running_mean, running_var, num_batches_tracked if running_mean is not None else None,
        residual, None if momentum is None else float(momentum), float(eps), pre_act == "relu", post_act == "relu", p,
        seed, group.group_name)
    return out
