import torch

from ..ops.dropout import dropout


class Dropout(torch.nn.Dropout):
    """Drop-in for torch.nn.Dropout (same arguments, repr, state_dict and train/eval behaviour, and
    isinstance(m, nn.Dropout) holds), running fastfuse.dropout."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)
