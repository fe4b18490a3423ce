"""Second derivatives (create_graph=True) through the public functions and the modules: the fused backward
kernels are not differentiable, so such a backward recomputes its gradients through the op's reference
composition (csrc/double_backward.h). The op-level gradgradchecks are next to each op's gradcheck."""
import pytest
import torch
from torch import nn

import fastfuse
from fastfuse.models import EagerTabularModel, TabularModel

from conftest import CPP, CPU_BACKENDS

f64 = torch.float64
# gradgradcheck needs float64, which the Triton kernels do not take (the second derivative never runs them anyway)
F64_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]


def _fixed_rng(fn, seed=3):
    """fn with the same dropout masks on every call (gradgradcheck calls it many times)."""
    def run(*args):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return fn(*args)
    return run


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_function(backend, training):
    x = torch.randn(6, 3, 4, dtype=f64, requires_grad=True)
    w, b = torch.rand(3, dtype=f64, requires_grad=True), torch.randn(3, dtype=f64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=f64), torch.ones(3, dtype=f64)

    def f(x, w, b):
        return fastfuse.batch_norm(x, rm.clone(), rv.clone(), w, b, training, pre_act="relu", post_act="relu",
                                   dropout_p=0.3)
    with fastfuse.use_backend(backend):
        assert torch.autograd.gradgradcheck(_fixed_rng(f), (x, w, b))


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_embedding_concat_dropout_function(backend):
    x = torch.stack([torch.randint(0, 4, (7,)), torch.randint(0, 3, (7,))], 1)
    ws = [torch.randn(4, 3, dtype=f64, requires_grad=True), torch.randn(3, 2, dtype=f64, requires_grad=True)]
    cont = torch.randn(7, 2, dtype=f64, requires_grad=True)

    def f(w0, w1, c):
        return fastfuse.embedding_concat_dropout(x, [w0, w1], 0.3, True, c) ** 2
    with fastfuse.use_backend(backend):
        assert torch.autograd.gradgradcheck(_fixed_rng(f), (*ws, cont))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("training", [True, False])
def test_lin_bn_drop_module(training):
    m = fastfuse.nn.LinBnDrop(5, 4, p=0.3, act=nn.ReLU(), lin_first=True).double().train(training)
    x = (torch.randn(9, 5, dtype=f64) + 0.5).requires_grad_()

    def f(x, w, bw, bb):
        m[2].reset_running_stats()
        return torch.func.functional_call(m, {"0.weight": w, "2.weight": bw, "2.bias": bb}, (x,))
    assert torch.autograd.gradgradcheck(_fixed_rng(f), (x, m[0].weight, m[2].weight, m[2].bias))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,cl", [((5, 3, 2, 3), False), ((5, 3, 2, 3), True), ((9, 3), False)], ids=str)
@pytest.mark.parametrize("combo", [dict(pre_act="relu", dropout_p=0.3), dict(post_act="relu", dropout_p=0.2)],
                         ids=str)
def test_batch_norm_module(training, shape, cl, combo):
    """The BatchNorm modules on the planes, channels-inner and rows routes."""
    kind = fastfuse.nn.BatchNorm2d if len(shape) == 4 else fastfuse.nn.BatchNorm1d
    m = kind(3).double().train(training)
    x = torch.randn(shape, dtype=f64) + 0.5
    x = (x.to(memory_format=torch.channels_last) if cl else x).requires_grad_()
    res = torch.randn_like(x).requires_grad_()

    def f(x, w, b, r):
        m.reset_running_stats()
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,), dict(residual=r, **combo))
    assert torch.autograd.gradgradcheck(_fixed_rng(f), (x, m.weight, m.bias, res))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_tabular_embedding_module():
    m = fastfuse.nn.TabularEmbedding([(4, 3), (3, 2)], 3, embed_p=0.3).double()
    x = torch.stack([torch.randint(0, 4, (9,)), torch.randint(0, 3, (9,))], 1)
    cont = torch.randn(9, 3, dtype=f64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(c, *ps):
        m.bn_cont.reset_running_stats()
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, c)) ** 2
    assert torch.autograd.gradgradcheck(_fixed_rng(f), (cont, *m.parameters()))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_tabular_model_gradient_penalty_matches_eager_twin():
    """A gradient penalty (the norm of d loss / d params, differentiated again) through the whole fused model
    equals the eager twin's, dropout off (the eager twin draws torch's masks)."""
    args = dict(emb_szs=[(5, 3), (4, 2)], n_cont=2, out_sz=1, layers=[8, 6], y_range=(0, 3))
    eager = EagerTabularModel(**args).double()
    fused = TabularModel(**args).double()
    fused.load_state_dict(eager.state_dict())
    x = torch.stack([torch.randint(0, 5, (12,)), torch.randint(0, 4, (12,))], 1)
    c, y = torch.randn(12, 2, dtype=f64), torch.rand(12, 1, dtype=f64) * 3
    grads = []
    for m in (fused, eager):
        params = list(m.parameters())
        g = torch.autograd.grad(nn.functional.mse_loss(m(x, c), y), params, create_graph=True)
        penalty = sum((t ** 2).sum() for t in g)
        grads.append(torch.autograd.grad(penalty, params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_reflect_conv_layer():
    m = fastfuse.nn.ConvLayer(2, 3, ks=3).double()
    x = torch.randn(2, 2, 5, 6, dtype=f64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))
    assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)
