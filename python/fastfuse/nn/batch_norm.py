"""Drop-in BatchNorm1d/2d: torch's classes (same arguments, repr, state_dict keys, checkpoints load both ways)
with a forward that runs fastfuse.batch_norm, and optional fused neighbours for FusedSequential."""
import torch

from ..ops.batch_norm import batch_norm


class _FusedBatchNormMixin:
    def forward(self, input, *, pre_act=None, residual=None, post_act=None, dropout_p=0.0):
        """bn(input) as torch computes it; the keyword arguments fuse the neighbours of fastfuse.batch_norm."""
        self._check_input_dim(input)
        # torch's _BatchNorm.forward rules: batch statistics in training or without running stats; buffers
        # updated only in training with track_running_stats.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        update = self.training and self.track_running_stats
        return batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                          self.weight, self.bias, bn_training, self.momentum, self.eps, pre_act=pre_act,
                          residual=residual, post_act=post_act, dropout_p=dropout_p,
                          num_batches_tracked=self.num_batches_tracked if update else None)


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d ((N, C) or (N, C, L) input)."""


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d ((N, C, H, W) input, contiguous or channels_last)."""


def is_fused_bn(m) -> bool:
    return isinstance(m, _FusedBatchNormMixin)
