"""torch.compile(fullgraph=True) traces through fastfuse ops with no graph break (kept few: ~20 s each)."""
import pytest
import torch

import fastfuse

from conftest import CPP

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")


def test_compile_function_and_module_fullgraph():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), fastfuse.nn.Dropout(0.5), torch.nn.ReLU())

    def f(x):
        return fastfuse.dropout(model(x), 0.3).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, requires_grad=True)
    out = compiled(x)
    out.backward()
    assert torch.isfinite(out) and x.grad is not None and x.grad.abs().sum() > 0
    # same seed -> same masks in compiled and eager code (seeds come from torch's generator in both)
    torch.manual_seed(3)
    a = compiled(x)
    torch.manual_seed(3)
    b = compiled(x)
    assert torch.equal(a, b)


def test_compile_inductor_module():
    m = fastfuse.nn.Dropout(0.5)
    compiled = torch.compile(lambda t: m(t) * 2, fullgraph=True)
    x = torch.randn(64, 33)
    y = compiled(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 4)
    assert 0.3 < kept.float().mean() < 0.7


def test_compile_batch_norm_blocks_fullgraph():
    """LinBnDrop (ReLU -> BN -> Dropout fused) and a BN2d -> ReLU block, forward and backward, no graph break;
    the running statistics are updated in the compiled code as in eager."""
    lin = fastfuse.nn.LinBnDrop(6, 8, p=0.2, act=torch.nn.ReLU(), lin_first=True)
    conv = fastfuse.nn.FusedSequential(torch.nn.Conv2d(2, 4, 3), fastfuse.nn.BatchNorm2d(4), torch.nn.ReLU())

    def f(a, b):
        return lin(a).sum() + conv(b).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = torch.randn(16, 6, requires_grad=True), torch.randn(2, 2, 6, 6, requires_grad=True)
    compiled(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert lin[2].num_batches_tracked == 1 and conv[1].num_batches_tracked == 1
    assert not torch.equal(conv[1].running_mean, torch.zeros(4))
    lin.eval(), conv.eval()
    torch.testing.assert_close(compiled(a, b), f(a, b))
