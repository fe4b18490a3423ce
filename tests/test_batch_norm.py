"""fastfuse.batch_norm and the BatchNorm/LinBnDrop modules against torch, on the default CPU backend (C++)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse import reference

from conftest import CPP, CPU_BACKENDS, bits

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}
# (module class pair, shape, channels_last)
LAYOUTS = [("1d", (16, 6), False), ("1d", (5, 4, 7), False), ("1d", (5, 4, 7), True), ("2d", (3, 5, 6, 7), False),
           ("2d", (3, 5, 6, 7), True), ("3d", (2, 3, 4, 5, 6), False), ("3d", (2, 3, 4, 5, 6), True)]
KINDS = {"1d": "BatchNorm1d", "2d": "BatchNorm2d", "3d": "BatchNorm3d"}


def _modules(kind, C, dtype, **kw):
    tm = getattr(torch.nn, KINDS[kind])(C, **kw)
    fm = getattr(fastfuse.nn, KINDS[kind])(C, **kw)
    if tm.affine:
        with torch.no_grad():
            tm.weight.uniform_(0.5, 1.5)
            tm.bias.uniform_(-0.5, 0.5)
    if dtype == torch.float64:
        tm, fm = tm.double(), fm.double()
    fm.load_state_dict(tm.state_dict())
    return tm, fm


def _input(shape, channels_last, dtype):
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if not channels_last:
        return x
    if x.dim() == 3:  # (N, C, L) with channels innermost, as a transposed (N, L, C) tensor is
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,shape,cl", LAYOUTS)
def test_module_matches_torch_over_steps(kind, shape, cl, dtype):
    tm, fm = _modules(kind, shape[1], dtype)
    for step in range(3):
        x = _input(shape, cl, dtype)
        # 16-bit inputs: torch's CPU reference runs on the float32 upcast (fastfuse computes in float32 too)
        xt = (x.float() if dtype in (torch.float16, torch.bfloat16) else x).detach().requires_grad_()
        xf = x.detach().requires_grad_()
        yt, yf = tm(xt), fm(xf)
        assert yf.dtype == dtype and yf.stride() == x.stride()
        g = torch.randn_like(yt).to(dtype).to(yt.dtype)  # representable in dtype: both sides see the same g
        gt = torch.autograd.grad(yt, (xt, tm.weight, tm.bias), g)
        gf = torch.autograd.grad(yf, (xf, fm.weight, fm.bias), g.to(dtype))
        torch.testing.assert_close(yf.to(yt.dtype), yt, **TOL[dtype])
        for a, b in zip(gf, gt):
            torch.testing.assert_close(a.to(b.dtype), b, **TOL[dtype])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fm, name), getattr(tm, name), **TOL[dtype])
    assert fm.num_batches_tracked == tm.num_batches_tracked == 3
    tm.eval(), fm.eval()
    x = _input(shape, cl, dtype)
    torch.testing.assert_close(fm(x).to(torch.float64), tm(x.float() if dtype.itemsize == 2 else x).double(),
                               **TOL[dtype])


@pytest.mark.parametrize("kw", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                dict(momentum=0.3, eps=1e-3)])
def test_module_options(kw):
    tm, fm = _modules("2d", 4, torch.float32, **kw)
    assert repr(tm) == repr(fm) and list(tm.state_dict()) == list(fm.state_dict())
    for step in range(3):
        x = torch.randn(2, 4, 3, 3)
        torch.testing.assert_close(fm(x), tm(x))
    for (k, a), b in zip(fm.state_dict().items(), tm.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    tm.eval(), fm.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fm(x), tm(x))


def test_checkpoints_load_both_ways():
    tm, fm = _modules("2d", 3, torch.float32)
    tm(torch.randn(4, 3, 2, 2))
    fm.load_state_dict(tm.state_dict())
    tm2 = torch.nn.BatchNorm2d(3)
    tm2.load_state_dict(fm.state_dict())
    for a, b in zip(tm2.state_dict().values(), tm.state_dict().values()):
        assert torch.equal(a, b)


def _seed_drawn(s):
    """The Philox (key, offset) fastfuse draws right after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64).tolist()


COMBOS = [dict(pre_act="relu"), dict(post_act="relu"), dict(residual=True, post_act="relu"),
          dict(dropout_p=0.3), dict(pre_act="relu", dropout_p=0.5), dict(residual=True, post_act="relu", dropout_p=0.2),
          dict(residual=True)]


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_combination_matches_eager(combo, cl):
    x = _input((4, 6, 5, 3), cl, torch.float32).requires_grad_()
    w, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)
    res = torch.randn_like(x).requires_grad_() if combo.get("residual") else None
    p = combo.get("dropout_p", 0.0)
    kw = {k: v for k, v in combo.items() if k != "residual"}
    rm, rv = torch.zeros(6), torch.ones(6)
    torch.manual_seed(7)
    y = fastfuse.batch_norm(x, rm, rv, w, b, True, residual=res, **kw)
    # eager composition; the dropout mask comes from the reference Philox over the output's memory order
    z = F.batch_norm(x.relu() if kw.get("pre_act") else x, torch.zeros(6), torch.ones(6), w, b, True)
    if res is not None:
        z = z + res
    if kw.get("post_act"):
        z = z.relu()
    if p:
        key, off = _seed_drawn(7)
        keep = torch.empty_like(z, dtype=torch.bool)
        keep.as_strided((keep.numel(),), (1,)).copy_(reference.dropout_keep_mask(z.numel(), p, key, off))
        z = torch.where(keep, z / (1 - p), 0.0)
    torch.testing.assert_close(y, z)
    assert y.stride() == x.stride()
    g = torch.randn_like(y)
    ins = [t for t in (x, w, b, res) if t is not None]
    for a, e in zip(torch.autograd.grad(y, ins, g), torch.autograd.grad(z, ins, g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    xs = x.detach().relu() if kw.get("pre_act") else x.detach()
    torch.testing.assert_close(rm, 0.1 * xs.mean((0, 2, 3)))
    torch.testing.assert_close(rv, 0.9 + 0.1 * xs.var((0, 2, 3)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_only_residual_needs_grad(backend, training):
    # no weight and an input without grad: the residual's gradient alone (the batch-stat terms are skipped)
    x, res = torch.randn(8, 5), torch.randn(8, 5, requires_grad=True)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    g = torch.randn(8, 5)
    with fastfuse.use_backend(backend):
        y = fastfuse.batch_norm(x, rm.clone(), rv.clone(), None, None, training, residual=res, post_act="relu")
        gr = torch.autograd.grad(y, res, g)[0]
    z = (F.batch_norm(x, rm.clone(), rv.clone(), None, None, training) + res).relu()
    torch.testing.assert_close(y, z)
    torch.testing.assert_close(gr, torch.autograd.grad(z, res, g)[0])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("combo", [dict(), dict(pre_act=True, p=0.3), dict(post_act=True, res=True, p=0.4)])
def test_gradcheck_float64(training, combo):
    C = 3
    x = torch.randn(4, C, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True) if combo.get("res") else None
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    seed = torch.tensor([123, 4], dtype=torch.int64)  # fixed, so every gradcheck call sees the same mask

    def f(x, w, b, *r):
        return torch.ops.fastfuse.batch_norm(x, w, b, rm, rv, None, r[0] if r else None, training, 0.1, 1e-5,
                                             bool(combo.get("pre_act")), bool(combo.get("post_act")),
                                             combo.get("p", 0.0), seed)[0]
    inputs = (x, w, b) + ((res,) if res is not None else ())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)  # create_graph=True: through the reference composition


def test_opcheck():
    x = torch.randn(4, 3, 5, 2)
    seed = torch.tensor([5, 0], dtype=torch.int64)
    nbt = torch.tensor(0)
    samples = [
        (x, torch.rand(3), torch.randn(3), torch.zeros(3), torch.ones(3), nbt, None, True, 0.1, 1e-5, False, False,
         0.0, seed),
        (x.to(memory_format=torch.channels_last).requires_grad_(), torch.rand(3, requires_grad=True), None,
         torch.zeros(3), torch.ones(3), nbt, torch.randn(4, 3, 5, 2), True, None, 1e-5, True, True, 0.25, seed),
        (torch.randn(6, 3, requires_grad=True), None, None, torch.zeros(3), torch.ones(3), None, None, False, 0.1,
         1e-3, False, False, 0.5, seed),
        (torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True), None, torch.randn(3, requires_grad=True),
         None, None, None, None, True, 0.1, 1e-5, False, True, 0.0, seed),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastfuse.batch_norm, args)
    g = torch.randn(4, 3, 5, 2)
    torch.library.opcheck(torch.ops.fastfuse.batch_norm_backward,
                          (g, x, torch.rand(3), torch.rand(3), torch.rand(3) + 0.5, None, True, 1e-5, True, False,
                           0.25, seed, [True, True, True, False]))


def test_large_mean_small_variance():
    x = (1e4 + 1e-2 * torch.randn(64, 8, 9, 9, dtype=torch.float64)).float().double()  # fp32-representable
    exact = F.batch_norm(x, None, None, training=True)
    fm = fastfuse.nn.BatchNorm2d(8)
    y = fm(x.float()).double()
    # fp32 cannot hold the mean to better than half an ulp of 1e4 (0.05 std here): that bounds any fp32 BN,
    # torch's included; a naive E[x^2] - E[x]^2 would be off by whole units.
    torch.testing.assert_close(y, exact, rtol=0, atol=0.05)
    torch.testing.assert_close(y, torch.nn.BatchNorm2d(8)(x.float()).double(), rtol=0, atol=0.08)
    torch.testing.assert_close(fm.running_var.double(), 0.9 + 0.1 * x.var((0, 2, 3)), rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(fm.running_mean.double(), 0.1 * x.mean((0, 2, 3)), rtol=1e-6, atol=0)


def test_backward_is_deterministic():
    x = torch.randn(32, 16, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    fm = fastfuse.nn.BatchNorm2d(16)
    g = torch.randn_like(x)
    runs = [torch.autograd.grad(fm(x), (x, fm.weight, fm.bias), g) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(bits(a), bits(b))


def test_errors_modify_nothing():
    fm = fastfuse.nn.BatchNorm1d(4)
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fm(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        fm(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        fastfuse.nn.BatchNorm2d(4)(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements.*not 4"):
        fm(torch.randn(3, 5))
    with pytest.raises(ValueError, match="dropout probability"):
        fastfuse.batch_norm(torch.randn(3, 4), fm.running_mean, fm.running_var, training=True, dropout_p=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        fastfuse.batch_norm(torch.ones(3, 4, dtype=torch.long), None, None, training=True)
    with pytest.raises(ValueError, match="residual"):
        fastfuse.batch_norm(torch.randn(3, 4), None, None, training=True, residual=torch.randn(3, 5))
    for k, v in fm.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("lin_first", [True, False])
def test_lin_bn_drop_matches_fastai_structure_and_eager(lin_first):
    m = fastfuse.nn.LinBnDrop(10, 6, p=0.25, act=torch.nn.ReLU(inplace=True), lin_first=lin_first)
    kinds = [type(c).__name__ for c in m]
    assert kinds == (["Linear", "ReLU", "BatchNorm1d", "Dropout"] if lin_first else
                     ["BatchNorm1d", "Dropout", "Linear", "ReLU"])
    assert m[kinds.index("BatchNorm1d")].bias.eq(1e-3).all()  # fastai's BatchNorm init
    assert m[kinds.index("Linear")].bias is None  # no Linear bias when there is a BatchNorm
    eager = torch.nn.Sequential(*[torch.nn.Dropout(c.p) if isinstance(c, torch.nn.Dropout) else
                                  (torch.nn.BatchNorm1d(c.num_features) if isinstance(c, torch.nn.BatchNorm1d) else c)
                                  for c in m])
    eager.load_state_dict(m.state_dict())
    assert list(eager.state_dict()) == list(m.state_dict())
    m.eval(), eager.eval()  # eval: no dropout, running stats: exact comparison
    x = torch.randn(12, 10)
    torch.testing.assert_close(m(x), eager(x))
    m.train()
    y = m(torch.randn(64, 10))
    assert 0 < (y == 0).float().mean() < 1


def test_saved_tensors_hold_no_mask():
    sizes = []
    x = torch.randn(64, 32, requires_grad=True)
    bn = fastfuse.nn.BatchNorm1d(32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append((t.numel(), t.dtype)) or t, lambda t: t):
        bn(x, dropout_p=0.5).sum().backward()
    assert all(dt != torch.bool for _, dt in sizes) and sum(n for n, _ in sizes) <= x.numel() + 3 * 32 + 2


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "cpp"])
@pytest.mark.parametrize("cl", [False, True])
def test_backend_parity(backend, cl):
    x = _input((3, 5, 4, 3), cl, torch.float32)
    w, b = torch.rand(5), torch.randn(5)
    res = torch.randn_like(x)
    outs = {}
    for be in ("cpp", backend):
        xx, ww, bb, rr = (t.detach().clone().requires_grad_() for t in (x, w, b, res))
        rm, rv = torch.zeros(5), torch.ones(5)
        with fastfuse.use_backend(be):
            torch.manual_seed(11)
            y = fastfuse.batch_norm(xx, rm, rv, ww, bb, True, residual=rr, post_act="relu", dropout_p=0.3)
            grads = torch.autograd.grad(y, (xx, ww, bb, rr), torch.ones_like(y))
        outs[be] = (y, *grads, rm, rv)
    for a, e in zip(outs[backend], outs["cpp"]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    # dropout masks are bit-identical across backends
    assert torch.equal(outs[backend][0] == 0, outs["cpp"][0] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_nan_and_signed_zeros_as_torch(backend):
    # as torch's BatchNorm -> Dropout: a NaN poisons its channel, dropped NaNs included; a dropped negative
    # output is -0; a NaN gradient reaches the input even through dropped elements
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    x.requires_grad_()
    w, b = torch.ones(3), torch.zeros(3)
    with fastfuse.use_backend(backend):
        y0 = fastfuse.batch_norm(x, None, None, w, b, True)
        y = fastfuse.batch_norm(x, None, None, w, b, True, dropout_p=0.5)
        g = torch.ones_like(y)
        g[0, 1, 0, 0] = float("nan")
        (gx,) = torch.autograd.grad(y, x, g)
    assert y[:, 0].isnan().all() and not y[:, 1:].isnan().any()
    zero = y[:, 1:] == 0
    assert zero.any() and torch.equal(y[:, 1:][zero].signbit(), y0[:, 1:][zero] < 0)
    assert gx[:, 1].isnan().all() and not gx[:, 2].isnan().any()


def test_fuse_swaps_batch_norm_and_shares_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.BatchNorm1d(16), torch.nn.Unflatten(1, (2, 2, 2, 2)),
                                torch.nn.BatchNorm3d(2))
    model(torch.randn(5, 3, 4, 4))
    eager = __import__("copy").deepcopy(model)
    weight = model[1].weight
    fastfuse.fuse(model)
    assert type(model[1]) is fastfuse.nn.BatchNorm2d and type(model[4]) is fastfuse.nn.BatchNorm1d
    assert type(model[6]) is fastfuse.nn.BatchNorm3d
    assert model[1].weight is weight and repr(model) == repr(eager)
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(model(x), eager(x))
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,shape,cl", LAYOUTS + [("2d", (8, 64, 33, 17), True), ("1d", (4096, 1000), False)])
def test_gpu_matches_cpu(backend, dtype, kind, shape, cl):
    """GPU backends against the C++ CPU kernels: outputs, every gradient, running stats; same dropout mask."""
    x = _input(shape, cl, dtype)
    C = shape[1]
    w, b, res = torch.rand(C), torch.randn(C), torch.randn_like(x)
    outs = []
    for dev, be in (("cpu", "cpp"), ("cuda", backend)):
        xx, rr = x.to(dev).detach().requires_grad_(), res.to(dev).detach().requires_grad_()
        ww, bb = w.to(dev).detach().requires_grad_(), b.to(dev).detach().requires_grad_()
        rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
        with fastfuse.use_backend(be):
            torch.manual_seed(3)
            y = fastfuse.batch_norm(xx, rm, rv, ww, bb, True, residual=rr, post_act="relu", dropout_p=0.2)
            grads = torch.autograd.grad(y, (xx, ww, bb, rr), torch.ones_like(y))
        outs.append([t.cpu().float() for t in (y, *grads, rm, rv)])
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-3)
    for a, e in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, e, **tol)
    if dtype == torch.float32:
        # Same Philox mask. A zero here is a dropped element or a ReLU'd one; nvcc and Triton contract
        # (x - mean) * scale + bias into an FMA and the CPU build does not (-ffp-contract=off), so an output within
        # rounding of zero may be ReLU'd on one side only. Those flips must be tiny on both sides.
        gpu, cpu = outs[1][0], outs[0][0]
        flips = (gpu == 0) != (cpu == 0)
        assert (gpu[flips].abs() + cpu[flips].abs()).max(initial=0.0) <= 1e-5
        assert flips.sum() <= max(1, gpu.numel() // 10_000)


def test_fused_sequential_keeps_module_modes():
    """A training Dropout after an eval-mode BatchNorm still drops (unfused); an eval Dropout is the identity."""
    m = fastfuse.nn.LinBnDrop(8, 8, p=0.5, act=torch.nn.ReLU(), lin_first=True)
    x = torch.randn(64, 8)
    m[2].eval()  # BN uses running stats, Dropout still trains
    y = m(x)
    assert (y == 0).float().mean() > 0.3
    m.train()
    m[3].eval()
    z = m(x)
    torch.testing.assert_close(z, F.batch_norm(F.relu(m[0](x)), None, None, m[2].weight, m[2].bias, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combo", [dict(), dict(pre_act="relu", dropout_p=0.3),
                                   dict(residual=True, post_act="relu", dropout_p=0.2)], ids=str)
def test_one_read_planes_path_matches_two_pass(monkeypatch, dtype, combo):
    """Contiguous (N, C, *) training on cpp takes bn_train_planes(_backward); they must agree with the four
    two-pass primitives (the Python backends' composition of the C++ primitives), dropout masks included."""
    bn_ops = importlib.import_module("fastfuse.ops.batch_norm")  # the module (fastfuse.ops.batch_norm is the function)
    x = torch.randn(4, 6, 5, 7, dtype=dtype) + 3
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    res = torch.randn_like(x) if combo.get("residual") else None
    kw = {k: v for k, v in combo.items() if k != "residual"}
    g = torch.randn_like(x)
    results = {}
    monkeypatch.setattr(bn_ops, "_kernels", lambda backend: torch.ops.fastfuse_C)
    for allowed in (True, False):
        ins = [t.detach().clone().requires_grad_() for t in (x, w, b) + ((res,) if res is not None else ())]
        rm, rv = torch.zeros(6), torch.ones(6)
        torch.manual_seed(5)
        with fastfuse.use_backend("cpp" if allowed else "reference"):
            y = fastfuse.batch_norm(ins[0], rm, rv, ins[1], ins[2], True,
                                    residual=ins[3] if res is not None else None, **kw)
            results[allowed] = (y, *torch.autograd.grad(y, ins, g), rm, rv)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else TOL[dtype]
    for a, e in zip(results[True], results[False]):
        torch.testing.assert_close(a, e, **tol)
    assert torch.equal(results[True][0] == 0, results[False][0] == 0)  # the same dropout masks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 300), (8, 520), (3, 257)], ids=str)
@pytest.mark.parametrize("combo", [dict(pre_act="relu", dropout_p=0.3), dict(dropout_p=0.1),
                                   dict(residual=True, post_act="relu", dropout_p=0.2), dict(affine=False)], ids=str)
def test_rows_backward_route_matches_two_pass(monkeypatch, dtype, shape, combo):
    """Rows tensors with few rows and 256+ columns (these shapes) take bn_train_rows_backward on cpp: one task per
    block of columns, dropout keys drawn once. It must give the four two-pass primitives' bits (fp32, fp64; bf16 to
    its tolerance, where the primitives' coefficients below come from ATen ops), dropout masks included."""
    bn_ops = importlib.import_module("fastfuse.ops.batch_norm")
    C = shape[1]
    x = torch.randn(shape).to(dtype) + 3
    w, b = (None, None) if combo.get("affine") is False else (torch.rand(C) + 0.5, torch.randn(C))
    res = torch.randn(shape).to(dtype) if combo.get("residual") else None
    kw = {k: v for k, v in combo.items() if k not in ("residual", "affine")}
    g = torch.randn(shape).to(dtype)
    results = {}
    for route in ("cpp", "primitives"):
        # "primitives": the Python backends' composition (ops/batch_norm.py) of the same C++ primitives
        monkeypatch.setattr(bn_ops, "_kernels", lambda backend: torch.ops.fastfuse_C)
        ins = [t.detach().clone().requires_grad_() for t in (x, w, b, res) if t is not None]
        rm, rv = torch.zeros(C), torch.ones(C)
        torch.manual_seed(5)
        with fastfuse.use_backend("reference" if route == "primitives" else "cpp"):
            y = fastfuse.batch_norm(ins[0], rm, rv, *(ins[1:3] if w is not None else (None, None)), True,
                                    residual=ins[-1] if res is not None else None, **kw)
            results[route] = (y, *torch.autograd.grad(y, ins, g), rm, rv)
    for a, e in zip(results["cpp"], results["primitives"]):
        if dtype == torch.bfloat16:
            torch.testing.assert_close(a, e, **TOL[dtype])
        else:
            assert torch.equal(bits(a), bits(e))
    assert torch.equal(results["cpp"][0] == 0, results["primitives"][0] == 0)  # the same dropout masks
