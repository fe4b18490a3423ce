"""torch.compile(fullgraph=True) traces through fastfuse ops with no graph break, and compiled code gives eager's
results for the same seed: the dropout seeds come from fastfuse::seed, an op inductor calls as it is (kept few:
~20 s per compile)."""
import pytest
import torch

import fastfuse

from conftest import CPP

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")


def _run(f, *args, seed=3):
    torch.manual_seed(seed)
    out = f(*args)
    out.sum().backward()
    return out.detach(), [a.grad.clone() for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def test_compiled_dropout_draws_eagers_masks():
    """torch.manual_seed(3); fastfuse.dropout(x, 0.3): the same mask eager and compiled (inductor), two calls in
    one graph drawing two different seeds in eager's order."""
    def f(x):
        return fastfuse.dropout(x, 0.3) + fastfuse.dropout(x, 0.3) * 2

    x = torch.randn(64, 33)
    compiled = torch.compile(f, fullgraph=True)
    want, (gx_want,) = _run(f, _leaf(x))
    got, (gx_got,) = _run(compiled, _leaf(x))
    assert torch.equal(got, want) and torch.equal(gx_got, gx_want)
    torch.manual_seed(3)
    a, b = fastfuse.dropout(torch.ones(1000), 0.3), fastfuse.dropout(torch.ones(1000), 0.3)
    assert not torch.equal(a, b)  # two calls, two masks (the test above would pass with one seed for both)


def test_compile_module_stack_fullgraph_matches_eager():
    """Linear -> Dropout, LinBnDrop (ReLU -> BN -> Dropout fused) and a BN2d -> ReLU block, forward and backward
    through aot_eager: eager's outputs, gradients and running statistics."""
    torch.manual_seed(0)
    lin = fastfuse.nn.LinBnDrop(6, 8, p=0.2, act=torch.nn.ReLU(), lin_first=True)
    conv = fastfuse.nn.FusedSequential(torch.nn.Conv2d(2, 4, 3), fastfuse.nn.BatchNorm2d(4), torch.nn.ReLU())
    drop = torch.nn.Sequential(torch.nn.Linear(6, 5), fastfuse.nn.Dropout(0.5))
    state = {k: v.clone() for k, v in {**lin.state_dict(prefix="l."), **conv.state_dict(prefix="c.")}.items()}

    def f(a, b):
        return lin(a).sum() + conv(b).sum() + drop(a).sum()

    a, b = torch.randn(16, 6), torch.randn(2, 2, 6, 6)
    want, grads_want = _run(f, _leaf(a), _leaf(b))
    stats_want = [conv[1].running_mean.clone(), lin[2].running_var.clone(), lin[2].num_batches_tracked.clone()]
    lin.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("l.")})
    conv.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("c.")})
    got, grads_got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), _leaf(a), _leaf(b))
    torch.testing.assert_close(got, want)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)
    for s, w in zip([conv[1].running_mean, lin[2].running_var, lin[2].num_batches_tracked], stats_want):
        torch.testing.assert_close(s, w)
    assert lin[2].num_batches_tracked == 1
