"""fastfuse.embedding_concat_dropout against the eager composition (lookups, cat, reference dropout mask,
BatchNorm1d), forward and every gradient, on every backend that runs CPU tensors here."""

import pytest
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse import reference

from conftest import CPP, CPU_BACKENDS, bits

ecd = torch.ops.fastfuse.embedding_concat_dropout
SEED = torch.tensor([0x0123456789ABCDEF, 77])
TABLES = {"odd": [(7, 3), (1, 5), (13, 4), (2, 1)], "single": [(5, 7)]}


def _data(tables, B, C, dtype=torch.float32):
    ws = [torch.randn(n, d, dtype=dtype) for n, d in tables]
    x = torch.stack([torch.randint(0, n, (B,)) for n, _ in tables], 1) if B else torch.zeros(0, len(tables),
                                                                                            dtype=torch.long)
    return x, ws, torch.randn(B, C, dtype=dtype)


def _eager(x, ws, p, seed, x_cont, bn, training):
    """fastai's forward, with the reference's mask in place of torch's dropout mask."""
    emb = torch.cat([F.embedding(x[:, t], w) for t, w in enumerate(ws)], 1)
    if training and p > 0:
        keep = reference.embedding_concat_keep_mask(emb.shape[0], emb.shape[1], p, *seed)
        emb = torch.where(keep, emb * (1 / (1 - p)), torch.zeros(()))
    if x_cont is None:
        return emb
    return torch.cat([emb, bn(x_cont) if bn is not None else x_cont], 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tables", ["odd", "single"])
@pytest.mark.parametrize("C", [0, 5])
@pytest.mark.parametrize("B,p,training", [(37, 0.3, True), (37, 0.0, True), (64, 0.3, False), (1, 0.3, False)])
def test_matches_eager_forward_and_grads(backend, tables, C, B, p, training):
    x, ws, xc = _data(TABLES[tables], B, C)
    bn_f, bn_e = torch.nn.BatchNorm1d(C), torch.nn.BatchNorm1d(C)
    for bn in (bn_f, bn_e):  # non-trivial, equal running stats for eval mode
        bn.running_mean.fill_(0.5), bn.running_var.fill_(2.0), bn.weight.data.fill_(1.5)
        bn.train(training)
    wf = [w.clone().requires_grad_() for w in ws]
    we = [w.clone().requires_grad_() for w in ws]
    xcf, xce = xc.clone().requires_grad_(), xc.clone().requires_grad_()
    torch.manual_seed(5)
    with fastfuse.use_backend(backend):
        y = fastfuse.embedding_concat_dropout(x, wf, p, training, xcf if C else None, bn_f if C else None)
    torch.manual_seed(5)
    seed = fastfuse._rng.new_seed().tolist()
    want = _eager(x, we, p, seed, xce if C else None, bn_e if C else None, training)
    assert y.shape == (B, sum(d for _, d in TABLES[tables]) + C)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    with fastfuse.use_backend(backend):
        got = torch.autograd.grad(y, wf + ([xcf] if C else []), g)
    exp = torch.autograd.grad(want, we + ([xce] if C else []), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    if C:
        torch.testing.assert_close(bn_f.running_mean, bn_e.running_mean)
        torch.testing.assert_close(bn_f.running_var, bn_e.running_var)
        assert bn_f.num_batches_tracked == bn_e.num_batches_tracked


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_backends_bit_identical_to_reference(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take 16/32-bit floats")
    x, ws, xc = _data(TABLES["odd"] + [(3, 6)], 29, 3, dtype)
    with fastfuse.use_backend(backend):
        y = ecd(x, ws, 0.37, SEED, xc, True)
    assert torch.equal(bits(y), bits(reference.embedding_concat_dropout(x, ws, 0.37, *SEED.tolist(), cont=xc)))
    g = torch.randn(y.shape, dtype=dtype)
    with fastfuse.use_backend(backend):
        gw = torch.ops.fastfuse.embedding_concat_dropout_backward(g, x, ws, 0.37, SEED)
    want = reference.embedding_concat_dropout_backward(g, x, ws, 0.37, *SEED.tolist())
    for a, b in zip(gw, want):
        torch.testing.assert_close(a, b, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                   atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hot_rows_deterministic_and_exact(backend):
    # a 3-row table hit by 4096 rows: every code is a long run of the same row
    x = torch.randint(0, 3, (4096, 1))
    w = torch.randn(3, 8)
    g = torch.randn(4096, 8)
    with fastfuse.use_backend(backend):
        a = torch.ops.fastfuse.embedding_concat_dropout_backward(g, x, [w], 0.2, SEED)[0]
        b = torch.ops.fastfuse.embedding_concat_dropout_backward(g, x, [w], 0.2, SEED)[0]
    assert torch.equal(a, b)
    keep = reference.embedding_concat_keep_mask(4096, 8, 0.2, *SEED.tolist())
    gd = torch.where(keep, g.double() / 0.8, torch.zeros((), dtype=torch.float64))
    exact = torch.zeros(3, 8, dtype=torch.float64).index_add_(0, x[:, 0], gd)
    torch.testing.assert_close(a.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    x, ws, xc = _data(TABLES["odd"], 0, 4)
    ws = [w.requires_grad_() for w in ws]
    bn = torch.nn.BatchNorm1d(4)
    with fastfuse.use_backend(backend):
        y = fastfuse.embedding_concat_dropout(x, ws, 0.5, True, xc, bn)
        assert y.shape == (0, 13 + 4)
        grads = torch.autograd.grad(y.sum(), ws)
    assert all(torch.equal(gw, torch.zeros_like(w)) for gw, w in zip(grads, ws))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_codes_raise_index_error_naming_column_and_value(backend):
    x, ws, _ = _data(TABLES["odd"], 10, 0)
    for bad in (13, -1):
        xb = x.clone()
        xb[4, 2] = bad
        with fastfuse.use_backend(backend), pytest.raises(IndexError, match=f"column 2 has code {bad}"):
            fastfuse.embedding_concat_dropout(xb, ws, 0.1)
    # unchecked: the bad code gives a zero row and no gradient, and nothing out of bounds is read
    xb = x.clone()
    xb[4, 2] = 10**9
    wr = [w.clone().requires_grad_() for w in ws]
    with fastfuse.use_backend(backend):
        y = fastfuse.embedding_concat_dropout(xb, wr, 0.0, check_index=False)
        y.sum().backward()
    assert torch.equal(y[4, 8:12], torch.zeros(4))
    assert torch.equal(wr[2].grad.sum(0), torch.ones(4) * (xb[:, 2] < 13).sum())


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_cpp_kernel_checks_codes_itself():
    x, ws, _ = _data(TABLES["odd"], 6, 0)
    x[5, 1] = 1
    with pytest.raises(IndexError, match="column 1 has code 1"):
        ecd(x, ws, 0.0, SEED, None, True)


def test_input_errors():
    x, ws, xc = _data(TABLES["odd"], 8, 3)
    with pytest.raises(TypeError, match="integer category codes"):
        fastfuse.embedding_concat_dropout(x.float(), ws)
    with pytest.raises(ValueError, match="x_cat has 3 columns but 4 embedding tables"):
        fastfuse.embedding_concat_dropout(x[:, :3], ws)
    with pytest.raises(ValueError, match="batch size 8 but x_cont has 7"):
        fastfuse.embedding_concat_dropout(x, ws, x_cont=xc[:7])
    with pytest.raises(ValueError, match="dropout probability"):
        fastfuse.embedding_concat_dropout(x, ws, p=1.5)
    with pytest.raises(ValueError, match="table 2 is torch.float64"):
        fastfuse.embedding_concat_dropout(x, ws[:2] + [ws[2].double()] + ws[3:])
    with pytest.raises(ValueError, match="table 1 must be a 2-D floating-point"):
        fastfuse.embedding_concat_dropout(x, ws[:1] + [ws[1][0]] + ws[2:])


def test_int32_codes_and_embedding_modules():
    x, ws, _ = _data(TABLES["odd"], 9, 0)
    embs = [torch.nn.Embedding.from_pretrained(w) for w in ws]
    y = fastfuse.embedding_concat_dropout(x.int(), embs, 0.0)
    torch.testing.assert_close(y, torch.cat([w[x[:, t]] for t, w in enumerate(ws)], 1))


def test_cumulative_moving_average_momentum_none():
    x, ws, _ = _data(TABLES["single"], 16, 0)
    bn_f, bn_e = torch.nn.BatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    for _ in range(3):
        xc = torch.randn(16, 3) * 2 + 1
        fastfuse.embedding_concat_dropout(x, ws, 0.0, True, xc, bn_f)
        bn_e(xc)
    torch.testing.assert_close(bn_f.running_mean, bn_e.running_mean)
    torch.testing.assert_close(bn_f.running_var, bn_e.running_var)
    assert int(bn_f.num_batches_tracked) == 3


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_gradcheck_float64():
    x, ws, xc = _data([(4, 3), (3, 2)], 6, 2, torch.float64)
    inputs = [w.requires_grad_() for w in ws] + [xc.requires_grad_()]
    assert torch.autograd.gradcheck(lambda w0, w1, c: ecd(x, [w0, w1], 0.4, SEED, c, True), inputs)
    # create_graph=True: through the reference composition; squared, so the second derivative is not 0
    assert torch.autograd.gradgradcheck(lambda w0, w1, c: ecd(x, [w0, w1], 0.4, SEED, c, True) ** 2, inputs)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("B,C", [(5, 2), (0, 3), (7, 0)])
def test_opcheck(B, C):
    x, ws, xc = _data([(4, 3), (3, 2), (9, 5)], B, C)
    ws = [w.requires_grad_() for w in ws]
    cont = xc.requires_grad_() if C else None
    torch.library.opcheck(ecd.default, (x, ws, 0.3, SEED, cont, True))
    g = torch.randn(B, 10 + C)
    torch.library.opcheck(torch.ops.fastfuse.embedding_concat_dropout_backward.default,
                          (g, x, [w.detach() for w in ws], 0.3, SEED))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_nan_and_signed_zeros_as_torch(backend):
    # as torch's dropout after the cat: a dropped NaN stays NaN, a dropped negative value gives -0
    ws = [torch.tensor([[float("nan"), -1.0, 2.0]] * 3)]
    x = torch.randint(0, 3, (64, 1))
    with fastfuse.use_backend(backend):
        y = ecd(x, ws, 0.5, SEED, None, True)
    assert y[:, 0].isnan().all()
    dropped = y[:, 1] == 0
    assert dropped.any() and y[:, 1][dropped].signbit().all() and (y[:, 2] == 0).any()


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("affine", [True, False])
def test_bn_cont_gradcheck_float64(affine):
    """With bn_cont: every gradient, the batch norm's weight and bias included, by finite differences."""
    x, ws, xc = _data(TABLES["odd"], 9, 3, torch.float64)
    bn = torch.nn.BatchNorm1d(3, affine=affine).double()
    params = [w.requires_grad_() for w in ws] + [xc.requires_grad_()] + list(bn.parameters())

    def f(*args):
        bn.reset_running_stats()  # the forward updates them; every call must see the same batch norm
        with torch.random.fork_rng():
            torch.manual_seed(3)  # the same dropout mask in every call
            return fastfuse.embedding_concat_dropout(x, list(args[:4]), 0.3, True, args[4], bn)

    assert torch.autograd.gradcheck(lambda *a: f(*a), params)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("which", ["tables", "cont", "bn"])
def test_bn_cont_partial_requires_grad(which):
    """Only some inputs need a gradient: exactly those come back, equal to the ones of a call where all do."""
    x, ws, xc = _data(TABLES["odd"], 11, 3)
    g = torch.randn(11, sum(w.shape[1] for w in ws) + 3)
    grads = []
    for only in (which, None):
        bn = torch.nn.BatchNorm1d(3)
        bn.weight.data = torch.linspace(0.5, 1.5, 3)  # not 1: the grads of cont depend on it
        wr = [w.clone().requires_grad_(only in ("tables", None)) for w in ws]
        cr = xc.clone().requires_grad_(only in ("cont", None))
        bn.requires_grad_(only in ("bn", None))
        torch.manual_seed(5)
        y = fastfuse.embedding_concat_dropout(x, wr, 0.3, True, cr, bn)
        inputs = {"tables": wr, "cont": [cr], "bn": list(bn.parameters())}[which]
        grads.append(torch.autograd.grad(y, inputs, g))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_input_errors_with_bn_cont():
    """With bn_cont, the tables and the codes are checked before the batch norm runs: nothing runs half way."""
    x, ws, xc = _data(TABLES["odd"], 8, 3)
    bn = torch.nn.BatchNorm1d(3)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"table 2 is torch.float64 on cpu, table 0 is torch.float32 on cpu"):
        fastfuse.embedding_concat_dropout(x, ws[:2] + [ws[2].double()] + ws[3:], 0.2, True, xc, bn)
    with pytest.raises(ValueError, match="table 1 must be a 2-D floating-point"):
        fastfuse.embedding_concat_dropout(x, ws[:1] + [ws[1][0]] + ws[2:], 0.2, True, xc, bn)
    with pytest.raises(ValueError, match="table 3 must be a 2-D floating-point"):
        fastfuse.embedding_concat_dropout(x, ws[:3] + [ws[3].long()], 0.2, True, xc, bn)
    assert torch.equal(torch.get_rng_state(), rng)  # checked before the dropout seed is drawn
    with pytest.raises(IndexError, match="column 2 has code 13"):
        fastfuse.embedding_concat_dropout(torch.cat([x[:, :2], x[:, 2:3] * 0 + 13, x[:, 3:]], 1), ws, 0.2, True,
                                          xc, bn)
    assert all(torch.equal(v, state[k]) for k, v in bn.state_dict().items())  # nothing ran half way


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_bn_cont_non_contiguous_tables():
    x, ws, xc = _data(TABLES["odd"], 10, 3)
    outs = []
    for column_major in (True, False):
        wr = [w.clone().t().contiguous().t() if column_major and w.shape[1] > 1 else w.clone() for w in ws]
        assert all(w.is_contiguous() for w in wr) != column_major
        wr = [w.requires_grad_() for w in wr]
        torch.manual_seed(2)
        y = fastfuse.embedding_concat_dropout(x, wr, 0.3, True, xc, torch.nn.BatchNorm1d(3))
        outs.append((y, torch.autograd.grad(y, wr, torch.ones_like(y))))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
