import torch

from .batch_norm import BatchNorm1d
from .dropout import Dropout
from .fused_sequential import FusedSequential


class LinBnDrop(FusedSequential):
    """fastai's LinBnDrop (same signature, child order and state_dict keys): lin_first=True is
    [Linear(bias=not bn), act, BatchNorm1d, Dropout], else [BatchNorm1d, Dropout, Linear, act]. The BatchNorm,
    a ReLU act before it and the Dropout after it run as one fused fastfuse.batch_norm (FusedSequential)."""

    def __init__(self, n_in, n_out, bn=True, p=0., act=None, lin_first=False):
        layers = [BatchNorm1d(n_out if lin_first else n_in)] if bn else []
        if bn:  # fastai's BatchNorm(): weight 1, bias 1e-3
            layers[0].bias.data.fill_(1e-3)
        if p != 0:
            layers.append(Dropout(p))
        lin = [torch.nn.Linear(n_in, n_out, bias=not bn)]
        if act is not None:
            lin.append(act)
        super().__init__(*(lin + layers if lin_first else layers + lin))
