"""The benchmark's memory column: saved_mb counts what autograd keeps for backward, each storage once, leaves
that require grad (parameters, the benchmark input) left out."""
import torch

from fastfuse.bench import saved_mb


def test_saved_mb():
    a = torch.randn(256, 1024, requires_grad=True)  # 1 MB
    assert saved_mb(lambda: a.sin()) == 0.0  # sin saves its input: a leaf
    assert saved_mb(lambda: (a * 2).relu()) == 1.0  # relu saves its output; mul by a number saves nothing
    assert saved_mb(lambda: (a * 2).relu().relu()) == 2.0  # two outputs, two storages
    b = (a * 2).detach().requires_grad_(False)
    assert saved_mb(lambda: (a * b) * b) == 1.0  # both muls save b (for the grad of their other factor): once
