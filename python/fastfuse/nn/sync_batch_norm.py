"""Drop-in torch.nn.SyncBatchNorm (same arguments, repr, state_dict keys and train/eval behaviour) whose forward
runs fastfuse.sync_batch_norm in training (fastfuse.batch_norm without a process group of more than one rank, and in
eval mode), with the fused neighbours of the BatchNorm modules. It runs on CPU (gloo) as well as on CUDA (NCCL)."""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.batch_norm import module_bn_args, module_batch_norm
from ..ops.sync_batch_norm import sync_batch_norm
from .batch_norm import _FusedBatchNormMixin


class SyncBatchNorm(_FusedBatchNormMixin, _BatchNorm):
    """torch.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    process_group=None), fused: forward(input, *, pre_act=None, residual=None, post_act=None, dropout_p=0.0).

    A _BatchNorm like torch's class, not a subclass of it: DDP refuses modules with torch's SyncBatchNorm on CPU."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input, *, pre_act=None, residual=None, post_act=None, dropout_p=0.0):
        """bn(input) with torch's SyncBatchNorm rules: batch statistics over the process group in training (one
        fastfuse::sync_batch_norm call, which also updates the running statistics), the running statistics in eval
        mode (or the batch's when there are none, unsynced, as torch does)."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not self.training:
            return module_batch_norm(self, input, False, pre_act=pre_act, residual=residual, post_act=post_act,
                                     dropout_p=dropout_p)
        running_mean, running_var, weight, bias, _, momentum, eps, nbt = module_bn_args(self, True)
        return sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                               process_group=self.process_group, pre_act=pre_act, residual=residual,
                               post_act=post_act, dropout_p=dropout_p, num_batches_tracked=nbt)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """`module` with every batch norm below it (torch's BatchNorm1d/2d/3d and SyncBatchNorm, fastfuse's) replaced
        by a fastfuse SyncBatchNorm that shares its parameters and buffers and keeps its mode, as torch's
        nn.SyncBatchNorm.convert_sync_batchnorm does. Returns the converted module (a new one when `module` itself
        is a batch norm)."""
        out = module
        if isinstance(module, _BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, device="meta")
            # the very tensors: optimizers and other references stay valid
            for name in ("weight", "bias"):
                setattr(out, name, getattr(module, name))
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(out, name, getattr(module, name))
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
