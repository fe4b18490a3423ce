"""fastfuse.lin_bn_drop and the LinBnDrop module on it: the same outputs, gradients, running statistics and dropout
masks as the block's children run one by one through fastfuse.batch_norm (FusedSequential), torch's values, every
gradient in float64, opcheck."""
import pytest
import torch
from torch import nn

import fastfuse

from conftest import CPP, CPU_BACKENDS

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")

SEED = torch.tensor([77, 5])


def _block(n_in, n_out, p, dtype, pre=True):
    torch.manual_seed(0)
    m = fastfuse.nn.LinBnDrop(n_in, n_out, p=p, act=nn.ReLU() if pre else None, lin_first=True).to(dtype)
    bn = m[2 if pre else 1]
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)  # eval mode: non-trivial statistics
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return m


def _steps(m, x, unfused):
    """Two training steps and an eval step: outputs, every gradient, the buffers."""
    got = []
    for step, training in enumerate((True, True, False)):
        m.train(training)
        xi = (x + step).requires_grad_()
        torch.manual_seed(3 + step)
        y = nn.Sequential.forward(m, xi) if unfused else m(xi)
        fused_call = "LinBnDrop" in str(y.grad_fn.name()) if y.grad_fn is not None else False
        assert fused_call != unfused or not training  # the block ran as one op exactly when it should
        got += [y, *torch.autograd.grad(y, [xi, *m.parameters()], torch.cos(y))]
    return got + [t.clone() for t in m.buffers()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 12, 90), (200, 7, 33), (5, 3, 1)], ids=str)
@pytest.mark.parametrize("pre,p", [(True, 0.3), (False, 0.0), (True, 0.0)])
def test_op_equals_the_children_one_by_one(dtype, shape, pre, p):
    B, n_in, n_out = shape
    x = torch.randn(B, n_in, dtype=dtype)
    a = _steps(_block(n_in, n_out, p, dtype, pre), x, unfused=False)
    e = _steps(_block(n_in, n_out, p, dtype, pre), x, unfused=True)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, want in zip(a, e):
        torch.testing.assert_close(got, want, **tol)
    assert all(torch.equal(g == 0, w == 0) for g, w in zip(a[:1], e[:1]))  # the same dropout mask


def test_matches_torch_without_dropout():
    x = torch.randn(32, 10)
    m = _block(10, 20, 0.0, torch.float32)
    ref = nn.Sequential(nn.Linear(10, 20, bias=False), nn.ReLU(), nn.BatchNorm1d(20))
    ref.load_state_dict(m.state_dict())
    for training in (True, False):
        m.train(training), ref.train(training)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(m.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["bn_eval_drop_train", "hooked"])
def test_runs_the_children_where_it_must(mode):
    m = _block(6, 8, 0.5, torch.float32)
    seen = []
    if mode == "hooked":
        m[0].register_forward_hook(lambda mod, i, o: seen.append(o))
    else:
        m.train(), m[2].eval()
    y = m(torch.randn(4, 6, requires_grad=True))
    assert "LinBnDrop" not in y.grad_fn.name()
    assert len(seen) == (mode == "hooked")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(training, p):
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bw = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bb = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, w, bw, bb):
        return torch.ops.fastfuse.lin_bn_drop(x, w, bw, bb, rm, rv, None, training, 0.1, 1e-5, True, p, SEED)[0]
    assert torch.autograd.gradcheck(f, (x, w, bw, bb))
    assert torch.autograd.gradgradcheck(f, (x, w, bw, bb))  # create_graph=True: the reference composition


def test_opcheck():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    for args in [(x, w, torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True), torch.zeros(4),
                  torch.ones(4), torch.tensor(0), True, 0.1, 1e-5, True, 0.25, SEED),
                 (x, w, None, None, torch.zeros(4), torch.ones(4), None, False, None, 1e-5, False, 0.0, SEED),
                 (x.double(), w.double(), None, None, None, None, None, True, 0.1, 1e-5, True, 0.5, SEED)]:
        torch.library.opcheck(torch.ops.fastfuse.lin_bn_drop, args)
    y = torch.randn(6, 4)
    torch.library.opcheck(torch.ops.fastfuse.lin_bn_drop_backward,
                          (torch.randn(6, 4), x.detach(), w.detach(), y, torch.rand(4), y.mean(0), y.var(0) + 0.5,
                           True, 1e-5, True, 0.25, SEED, [True, True, True, True]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_runs_its_batch_norm(backend):
    """The override reaches the batch norm inside the op: every backend gives the default's result."""
    x = torch.randn(16, 6)
    ys = []
    for b in ("cpp", backend) if CPP else (backend,):
        m = _block(6, 8, 0.3, torch.float32)
        torch.manual_seed(1)
        with fastfuse.use_backend(b):
            ys.append(m(x))
    torch.testing.assert_close(ys[0], ys[-1], rtol=1e-4, atol=1e-5)


def test_errors_change_nothing():
    m = _block(6, 8, 0.3, torch.float32)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 6))
    with pytest.raises(ValueError, match=r"expected input \(B, in\)"):
        fastfuse.lin_bn_drop(torch.randn(4, 5), m[0].weight, None, None, training=True)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
