"""TabularEmbedding and TabularModel: fastai's structure and state_dict keys, outputs and gradients equal to
the eager twin (fastai's forward on plain torch layers) with the same weights."""
import copy

import pytest
import torch

import fastfuse
from fastfuse.models import EagerTabularModel, SigmoidRange, TabularModel, emb_sz_rule

from conftest import CPP


BACKEND = "cpp" if CPP else "reference"

EMB_SZS = [(5, 3), (2, 2), (11, 4)]
# The keys of fastai.tabular.model.TabularModel(EMB_SZS, 2, 1, [8, 6], ps=[0.1, 0.2], y_range=(0, 3)),
# written out from fastai's code: embeds ModuleList, bn_cont BatchNorm1d, then per LinBnDrop(lin_first=True)
# [Linear(bias=False), ReLU, BatchNorm1d, Dropout], a last LinBnDrop [Linear] and SigmoidRange (no state).
BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
FASTAI_KEYS = (["embeds.0.weight", "embeds.1.weight", "embeds.2.weight"] + [f"bn_cont.{k}" for k in BN]
               + ["layers.0.0.weight"] + [f"layers.0.2.{k}" for k in BN]
               + ["layers.1.0.weight"] + [f"layers.1.2.{k}" for k in BN]
               + ["layers.2.0.weight", "layers.2.0.bias"])


def _pair(**kw):
    args = dict(emb_szs=EMB_SZS, n_cont=2, out_sz=1, layers=[8, 6], ps=[0.1, 0.2], y_range=(0, 3))
    args.update(kw)
    eager = EagerTabularModel(**args)
    fused = TabularModel(**args)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _batch(B=16):
    x = torch.stack([torch.randint(0, n, (B,)) for n, _ in EMB_SZS], 1)
    return x, torch.randn(B, 2)


def test_state_dict_keys_are_fastais():
    eager, fused = _pair()
    assert list(fused.state_dict().keys()) == FASTAI_KEYS
    assert list(eager.state_dict().keys()) == FASTAI_KEYS
    assert isinstance(fused.layers[3], SigmoidRange) and len(fused.layers) == 4
    assert repr(fused.layers[3]) == "SigmoidRange(low=0, high=3)"  # fastai's (fastcore's basic_repr)
    assert type(fused.layers[0]) is fastfuse.nn.LinBnDrop
    emb = fastfuse.nn.TabularEmbedding(EMB_SZS, 2)
    assert list(emb.state_dict().keys()) == FASTAI_KEYS[:8]  # embeds.*, bn_cont.*


def test_structure_and_init():
    _, fused = _pair(bn_final=True, ps=0.5)
    assert [type(m).__name__ for m in fused.layers[0]] == ["Linear", "ReLU", "BatchNorm1d", "Dropout"]
    assert [type(m).__name__ for m in fused.layers[2]] == ["Linear", "BatchNorm1d"]  # bn_final, no act
    assert fused.layers[0][3].p == 0.5 and fused.layers[1][3].p == 0.5  # a scalar ps repeats
    w = TabularModel([(1000, 50)], 0, 1, [4]).embeds[0].weight
    assert w.abs().max() <= 0.02 and 0.007 < w.std() < 0.011  # fastai's trunc-normal, std 0.01, cut at 2 std
    assert TabularModel(EMB_SZS, 2, 1, [4], emb_drop=0.3).emb_drop.p == 0.3  # the lesson's older name
    with pytest.raises(TypeError):
        TabularModel(EMB_SZS, 2, 1, [4], embed_p=0.1, emb_drop=0.3)


def test_emb_sz_rule():
    assert [emb_sz_rule(n) for n in (2, 3, 10, 1116, 10**6)] == [2, 3, 6, 81, 600]


@pytest.mark.parametrize("B", [1, 16])
def test_checkpoint_loads_and_eval_outputs_match(B):
    eager, fused = _pair()
    eager.train()
    x, c = _batch(32)
    with torch.no_grad():
        eager(x, c)  # move the running statistics away from their init
    fused.load_state_dict(eager.state_dict())
    eager.eval(), fused.eval()
    x, c = _batch(B)
    with fastfuse.use_backend(BACKEND):
        got = fused(x, c)
    torch.testing.assert_close(got, eager(x, c))


def test_training_step_matches_eager_without_dropout():
    eager, fused = _pair(ps=None, embed_p=0.0)
    x, c = _batch(24)
    y = torch.rand(24, 1) * 3
    with fastfuse.use_backend(BACKEND):
        loss_f = torch.nn.functional.mse_loss(fused(x, c), y)
        loss_f.backward()
    loss_e = torch.nn.functional.mse_loss(eager(x, c), y)
    loss_e.backward()
    torch.testing.assert_close(loss_f, loss_e)
    pe = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, pe[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(dict(fused.named_buffers())[name], b, msg=name)


def test_embedding_dropout_is_the_reference_mask():
    emb = fastfuse.nn.TabularEmbedding(EMB_SZS, 2, embed_p=0.5)
    x, c = _batch(40)
    torch.manual_seed(11)
    out = emb(x, c)
    torch.manual_seed(11)
    key, off = fastfuse._rng.new_seed().tolist()
    keep = fastfuse.reference.embedding_concat_keep_mask(40, 9, 0.5, key, off)
    rows = torch.cat([e.weight[x[:, t]] for t, e in enumerate(emb.embeds)], 1)
    torch.testing.assert_close(out[:, :9], torch.where(keep, rows * 2, torch.zeros(())))
    emb.eval()
    torch.testing.assert_close(emb(x, c)[:, :9], rows)


def test_only_categorical_or_only_continuous():
    e1, f1 = _pair(n_cont=0, bn_cont=False)
    x, _ = _batch(8)
    e1.eval(), f1.eval()
    with fastfuse.use_backend(BACKEND):
        torch.testing.assert_close(f1(x), e1(x))
    e2, f2 = _pair(emb_szs=[])
    e2.eval(), f2.eval()
    c = torch.randn(8, 2)
    with fastfuse.use_backend(BACKEND):
        no_cat = torch.zeros(8, 0, dtype=torch.long)
        torch.testing.assert_close(f2(no_cat, c), e2(no_cat, c))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_compile_tabular_model_fullgraph():
    """The whole TabularModel (fused input layer with bn_cont, LinBnDrop blocks with dropout, SigmoidRange) under
    torch.compile(fullgraph=True): no graph break, forward and backward, and for the same seed the same masks,
    outputs, gradients and running statistics as eager (seeds come from torch's generator either way)."""
    _, fused = _pair(embed_p=0.2)
    ref = copy.deepcopy(fused)
    x, c = _batch(12)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    results = []
    for m in (compiled, ref):
        torch.manual_seed(4)
        y = m(x, c)
        results.append((y, torch.autograd.grad(y.sum(), list(m.parameters()))))
    (y, g), (yr, gr) = results
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["train", "eval", "bn_eval_drop_train", "drop_eval"])
def test_lin_bn_drop_one_node_path_equals_fused_sequential(monkeypatch, mode, dtype):
    """On CPU, LinBnDrop runs as one C++ call each way (fastfuse_C::lin_bn_drop, C++ autograd); the FusedSequential
    path it replaces must give the same outputs, gradients and running statistics (to rounding: its matmuls are
    split differently) and the same dropout masks (bit for bit)."""
    import importlib
    lbd = importlib.import_module("fastfuse.nn.lin_bn_drop")
    base = fastfuse.nn.LinBnDrop(12, 90, p=0.3, act=torch.nn.ReLU(inplace=True), lin_first=True).to(dtype)
    base[2].running_mean.uniform_(-1, 1), base[2].running_var.uniform_(0.5, 2)  # eval mode: non-trivial stats
    x = torch.randn(33, 12, dtype=dtype) + 2
    g = torch.randn(33, 90, dtype=dtype)
    results, taken = [], []
    fused_cpu = lbd._fused_cpu
    for fast in (True, False):
        m = copy.deepcopy(base)
        if mode == "eval":
            m.eval()
        elif mode == "bn_eval_drop_train":
            m[2].eval()
        elif mode == "drop_eval":
            m[3].eval()
        def fused_or_not(mods, x, fast=fast):
            out = fused_cpu(mods, x) if fast else None
            taken.append(out is not None)
            return out
        monkeypatch.setattr(lbd, "_fused_cpu", fused_or_not)
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = m(xi)
        grads = torch.autograd.grad(y, [xi] + list(m.parameters()), g)
        results.append((y, grads, m[2].running_mean.clone(), m[2].running_var.clone(), m[2].num_batches_tracked))
    (y1, g1, *s1), (y2, g2, *s2) = results
    assert taken == [mode != "bn_eval_drop_train", False]  # that mix runs the Dropout on its own, unfused
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y1, y2, **tol)
    assert torch.equal(y1 == 0, y2 == 0)  # the same dropout mask
    for a, b in zip(g1, g2):  # float32: both within a few ulps of float64 relative to the largest entry
        scale = float(b.abs().max()) if dtype == torch.float32 else 1.0
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale)
    # running mean, var (the same kernels on a y = x W^T that the one-node path computes as two GEMMs at small
    # batch: to rounding) and num_batches_tracked (exactly)
    for a, b in zip(s1[:2], s2[:2]):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(s1[2], s2[2])


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n_in,n_out,pre,p", [(64, 23, 1000, True, 0.01), (33, 12, 91, False, 0.3),
                                                   (2, 3, 2, True, 0.0), (128, 7, 5, True, 0.5)])
def test_lin_bn_drop_small_batch_forward_is_bn_forward_bits(rows, n_in, n_out, pre, p, dtype):
    """Up to 128 rows in training, fastfuse_C::lin_bn_drop runs its GEMM halves and the batch norm in one parallel
    region (bn_train_rows_forward): on the y it returns, its output, mean and var must be fastfuse_C::bn_forward's
    bits (the two-pass kernels), dropout mask included."""
    C = torch.ops.fastfuse_C
    x, w = torch.randn(rows, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
    bw, bb = torch.rand(n_out, dtype=dtype) + 0.5, torch.randn(n_out, dtype=dtype)
    rm, rv = torch.zeros(n_out, dtype=dtype), torch.ones(n_out, dtype=dtype)
    out, y, mean, var = C.lin_bn_drop(x, w, bw, bb, rm, rv, None, True, False, 0.1, 1e-5, pre, p, 7, 3)
    torch.testing.assert_close(y, x @ w.t())
    ref = C.bn_forward(y, bw, bb, rm, rv, None, True, 1e-5, pre, False, p, 7, 3)
    for a, b in zip((out, mean, var), ref):
        assert torch.equal(a, b)
    if p > 0:
        assert 0 < int((out == 0).sum()) < out.numel()


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_lin_bn_drop_one_node_gradcheck_float64():
    """The C++ autograd node of LinBnDrop (fastfuse_C::lin_bn_drop): every gradient by finite differences, with
    ReLU and dropout (one mask for every call: same generator state)."""
    m = fastfuse.nn.LinBnDrop(5, 7, p=0.3, act=torch.nn.ReLU(), lin_first=True).double()
    x = (torch.randn(9, 5, dtype=torch.float64) + 0.5).requires_grad_()

    def f(x, w, bw, bb):
        m[2].reset_running_stats()
        with torch.random.fork_rng():
            torch.manual_seed(4)
            return torch.func.functional_call(m, {"0.weight": w, "2.weight": bw, "2.bias": bb}, (x,))

    assert torch.autograd.gradcheck(f, (x, m[0].weight, m[2].weight, m[2].bias))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("frozen", ["x", "linear", "bn"])
def test_lin_bn_drop_one_node_partial_grads(monkeypatch, frozen):
    """Only some inputs need a gradient: the one-node path gives those, as the FusedSequential path does."""
    import importlib
    lbd = importlib.import_module("fastfuse.nn.lin_bn_drop")
    base = fastfuse.nn.LinBnDrop(6, 11, p=0.2, act=torch.nn.ReLU(), lin_first=True)
    x, g = torch.randn(13, 6), torch.randn(13, 11)
    fused_cpu, grads = lbd._fused_cpu, []
    for fast in (True, False):
        monkeypatch.setattr(lbd, "_fused_cpu", fused_cpu if fast else (lambda mods, x: None))
        m = copy.deepcopy(base)
        xi = x.clone().requires_grad_(frozen != "x")
        m[0].requires_grad_(frozen != "linear")
        m[2].requires_grad_(frozen != "bn")
        inputs = ([xi] if frozen != "x" else []) + [p for p in m.parameters() if p.requires_grad]
        torch.manual_seed(1)
        grads.append(torch.autograd.grad(m(xi), inputs, g))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


# ---- the head's tail: last Linear + SigmoidRange as fastfuse_C::linear_sigmoid_range (CPU, eager) ----------------

def _sigmoid_range_ref(x, w, b, low, high):
    return torch.sigmoid(torch.nn.functional.linear(x, w, b)) * (high - low) + low


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,K,N,bias", [(64, 50, 1, True), (7, 13, 3, False), (0, 5, 2, True), (33, 20, 12, True),
                                        (5, 0, 1, True), (300, 9, 2, True)])
def test_linear_sigmoid_range_op_matches_torch(B, K, N, bias, dtype):
    """Output and every gradient equal torch's sigmoid(linear(x, W, b)) * (high - low) + low: few outputs take
    the op's loops (300 rows: two row tasks), 12 ATen's GEMMs; empty batch and no input features too."""
    torch.manual_seed(0)
    x = torch.randn(B, K, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, dtype=dtype) * max(K, 1) ** -0.5).requires_grad_()
    b = torch.randn(N, dtype=dtype, requires_grad=True) if bias else None
    out = torch.ops.fastfuse_C.linear_sigmoid_range(x, w, b, -1.0, 5.5)[0]
    ref = _sigmoid_range_ref(x, w, b, -1.0, 5.5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    ins = [x, w] + ([b] if bias else [])
    for a, r in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g)):
        torch.testing.assert_close(a, r)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_linear_sigmoid_range_gradcheck_float64():
    """First and second derivatives by finite differences (create_graph=True takes the node's ATen twin)."""
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: torch.ops.fastfuse_C.linear_sigmoid_range(x, w, b, 0.0, 3.0)[0]
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_linear_sigmoid_range_bad_input():
    op = torch.ops.fastfuse_C.linear_sigmoid_range
    x, w = torch.randn(4, 3), torch.randn(1, 3)
    with pytest.raises(RuntimeError, match="expected x \\(B, in\\) and weight \\(out, in\\)"):
        op(x, torch.randn(1, 4), None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="one floating dtype"):
        op(x, w.double(), None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="bias of shape \\(1\\)"):
        op(x, w, torch.randn(2), 0.0, 1.0)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_tabular_tail_is_one_node_and_equals_the_modules(monkeypatch):
    """With y_range, TabularModel's last Linear and SigmoidRange run as one C++ node; the modules' own path gives
    the same output, gradients and dropout masks (the tail draws no random numbers)."""
    import fastfuse.models.tabular as tab
    _, fused = _pair()
    x, c = _batch(16)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(tab, "_fusable_tail", lambda layers, mods: None)
        torch.manual_seed(5)
        y = fused(x, c)
        assert ("LinearSigmoidRange" in y.grad_fn.name()) == fast
        results.append((y, torch.autograd.grad(y.sum(), list(fused.parameters()))))
    (y, g), (yr, gr) = results
    torch.testing.assert_close(y, yr)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_tabular_tail_runs_the_modules_where_it_must():
    """Hooks on the tail's modules run (the modules' own calls); no y_range, float16 or torch.compile leave the
    modules as they are."""
    _, fused = _pair()
    x, c = _batch(8)
    seen = []
    h = fused.layers[3].register_forward_hook(lambda m, i, o: seen.append(o))
    y = fused(x, c)
    h.remove()
    assert len(seen) == 1 and torch.equal(seen[0], y) and "LinearSigmoidRange" not in y.grad_fn.name()
    _, plain = _pair(y_range=None)
    assert "LinearSigmoidRange" not in plain(x, c).grad_fn.name()


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("wrt", ["x", "w", "b"])
def test_linear_sigmoid_range_partial_grads(wrt):
    """Only the asked-for gradient is computed (a frozen layer, a constant input) and it is the reference's."""
    torch.manual_seed(1)
    t = {"x": torch.randn(6, 4), "w": torch.randn(2, 4) * 0.5, "b": torch.randn(2)}
    t[wrt].requires_grad_()
    out = torch.ops.fastfuse_C.linear_sigmoid_range(t["x"], t["w"], t["b"], 1.0, 2.0)[0]
    ref = _sigmoid_range_ref(t["x"], t["w"], t["b"], 1.0, 2.0)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, t[wrt], g)[0], torch.autograd.grad(ref, t[wrt], g)[0])


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_tabular_tail_takes_fastais_sigmoid_range(monkeypatch):
    """A fastai TabularModel made ours by fastfuse.fuse keeps fastai's SigmoidRange (fastai.layers, stood in for
    here: CI has no fastai); its tail is fused too."""
    import sys
    import types
    fake = types.ModuleType("fastai.layers")

    class FastaiSigmoidRange(torch.nn.Module):
        def __init__(self, low, high):
            super().__init__()
            self.low, self.high = low, high

        def forward(self, x):
            return torch.sigmoid(x) * (self.high - self.low) + self.low

    fake.SigmoidRange = FastaiSigmoidRange
    monkeypatch.setitem(sys.modules, "fastai.layers", fake)
    eager, fused = _pair(y_range=(-1, 2))
    fused.layers[3] = FastaiSigmoidRange(-1, 2)
    x, c = _batch(8)
    fused.eval(), eager.eval()
    y = fused(x, c)
    assert "LinearSigmoidRange" in y.grad_fn.name()
    torch.testing.assert_close(y, eager(x, c))
