import torch

from .._rng import check_p
from ..ops.dropout import dropout


class Dropout(torch.nn.Dropout):
    """Drop-in for torch.nn.Dropout (same arguments, repr, state_dict and train/eval behaviour, and
    isinstance(m, nn.Dropout) holds), running fastfuse.dropout."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(check_p(p), inplace)  # also rejects NaN, which nn.Dropout lets through

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)
