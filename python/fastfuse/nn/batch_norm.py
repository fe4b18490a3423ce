"""Drop-in BatchNorm1d/2d/3d: torch's classes (same arguments, repr, state_dict keys, checkpoints load both ways)
with a forward that runs fastfuse.batch_norm, and optional fused neighbours for FusedSequential."""
import weakref

import torch

from ..ops.batch_norm import module_batch_norm

# nn/_fold.py's inference cache: batch norm -> its convolution's folded weights. Dropped on every train() / eval()
# of the batch norm (model.eval() reaches every module): weights changed through .data (fastai's optimizers) bump
# no version counter, so only a mode switch tells that training may have changed them.
FOLDED = weakref.WeakKeyDictionary()


class _FusedBatchNormMixin:
    def train(self, mode=True):
        FOLDED.pop(self, None)
        return super().train(mode)

    def forward(self, input, *, pre_act=None, residual=None, post_act=None, dropout_p=0.0):
        """bn(input) as torch computes it; the keyword arguments fuse the neighbours of fastfuse.batch_norm.
        One fastfuse::batch_norm call, which also updates the running statistics."""
        self._check_input_dim(input)
        return module_batch_norm(self, input, self.training, pre_act=pre_act, residual=residual,
                                 post_act=post_act, dropout_p=dropout_p)


class BatchNorm1d(_FusedBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d ((N, C) or (N, C, L) input)."""


class BatchNorm2d(_FusedBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d ((N, C, H, W) input, contiguous or channels_last)."""


class BatchNorm3d(_FusedBatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d ((N, C, D, H, W) input, contiguous or channels_last_3d)."""


def is_fused_bn(m) -> bool:
    return isinstance(m, _FusedBatchNormMixin)
