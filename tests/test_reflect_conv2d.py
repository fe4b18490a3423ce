"""fastfuse.reflect_conv2d and its modules against nn.Conv2d(padding_mode='reflect') with copied weights:
forward and every gradient, on each CPU backend (C++ with both designs, the reference; the Triton kernel is
retired, see test_triton_override_runs_torchs_path)."""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse import _backends, reference

from conftest import CPP, TRITON_INTERPRET, bits

rc_ops = importlib.import_module("fastfuse.ops.reflect_conv2d")  # the package attribute is the function

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")

# (N, C, H, W, OC, kernel, stride, padding, dilation, groups, bias)
CONFIGS = [
    (2, 4, 7, 8, 6, 3, 1, 1, 1, 1, True),            # the common 3x3 'same' conv, odd sizes
    (2, 3, 5, 5, 5, 1, 1, 0, 1, 1, False),           # no padding at all
    (2, 3, 5, 7, 4, 1, 1, 1, 1, 1, True),            # 1x1 with padding: the whole frame is reflected
    (2, 4, 8, 8, 4, 3, 2, 1, 1, 4, True),            # depthwise, stride 2
    (2, 4, 7, 7, 6, 5, 1, 2, 2, 2, False),           # 5x5, dilation 2, groups 2
    (1, 3, 9, 8, 5, 7, 2, 3, 1, 1, True),            # the stem: 7x7 stride 2
    (2, 4, 3, 3, 4, 3, 1, 2, 1, 1, True),            # input one pixel larger than the padding
    (2, 4, 2, 5, 4, 3, 1, 1, 1, 1, False),           # height = padding + 1
    (2, 2, 5, 6, 4, 2, 1, 1, 1, 1, True),            # even kernel
    (2, 4, 6, 9, 4, (3, 5), (1, 2), (1, 2), (2, 1), 1, True),  # pair arguments
    (2, 6, 7, 5, 4, 4, 2, 3, 1, 2, True),            # 4x4 stride 2, padding 3, groups 2
    (2, 4, 8, 7, 4, 6, 1, 3, 1, 1, False),           # 6x6 kernel
]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=1e-2, atol=2e-2), torch.bfloat16: dict(rtol=4e-2, atol=8e-2)}

# (backend, C++ design): the C++ backend is tested with both designs, whatever "auto" would pick
DESIGNS = ("frame", "direct")  # direct: AVX-512, fp32, one group, NCHW or channels_last; else auto
RUNS = [("reference", None)] + ([("cpp", a) for a in DESIGNS] if CPP else [])  # no Triton kernel (retired)


def _conv(cfg, dtype=torch.float32, channels_last=False):
    N, C, H, W, OC, k, s, p, d, g, bias = cfg
    m = nn.Conv2d(C, OC, k, s, p, d, g, bias, padding_mode="reflect").to(dtype)
    x = torch.randn(N, C, H, W, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return m, x


def _run(backend, algo, monkeypatch, fn):
    if algo:
        monkeypatch.setenv("FASTFUSE_REFLECT_CONV2D_ALGO", algo)
    with fastfuse.use_backend(backend):
        return fn()


def _fwd_bwd(m, x, fn):
    """Output and (grad_input, grad_weight, grad_bias) of fn(x, weight, bias) for one fixed grad_output."""
    xr = x.detach().clone().requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    b = None if m.bias is None else m.bias.detach().clone().requires_grad_()
    y = fn(xr, w, b)
    torch.manual_seed(1)
    go = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (xr, w, b) if t is not None], go)
    return y, grads


def _ours(m):
    return lambda x, w, b: fastfuse.reflect_conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)


def _theirs(m):
    return lambda x, w, b: m._conv_forward(x, w, b)  # nn.Conv2d's own reflect path


@contextlib.contextmanager
def _num_threads(n):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _auto_matches(op, args, names):
    """The forced C++ designs among `names` whose outputs (all of them, None left out) auto's match bit for bit."""
    def outs(algo):
        out = op(*args, algo)
        return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    auto = outs(0)
    return [a for a in names if all(torch.equal(u, v) for u, v in zip(auto, outs(rc_ops._ALGOS[a])))]


def _cases():
    out = []
    for backend, algo in RUNS:
        for i, cfg in enumerate(CONFIGS):
            for cl in (False, True):
                out.append(pytest.param(backend, algo, cfg, cl, id=f"{backend}-{algo}-{i}-{'cl' if cl else 'nchw'}"))
    return out


@pytest.mark.parametrize("backend,algo,cfg,channels_last", _cases())
def test_matches_nn_conv2d_reflect(backend, algo, cfg, channels_last, monkeypatch):
    m, x = _conv(cfg, channels_last=channels_last)
    y, grads = _run(backend, algo, monkeypatch, lambda: _fwd_bwd(m, x, _ours(m)))
    y_ref, grads_ref = _fwd_bwd(m, x, _theirs(m))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg", [(2, 32, 28, 28, 8, 3, 1, 1, 1, 1, True), (2, 32, 7, 7, 8, 3, 1, 1, 1, 1, True),
                                 (2, 32, 14, 14, 8, 3, 2, 1, 1, 1, True), (2, 2, 20, 20, 8, 3, 1, 1, 1, 1, False)],
                         ids=["28", "7", "s2", "small-k"])
def test_auto_runs_one_of_the_designs_each_direction(cfg, channels_last):
    """"auto" picks the forward's and the backward's design independently, whichever they are: the output must be
    the bits of one forced design and the gradients the bits of one forced design."""
    m, x = _conv(cfg, channels_last=channels_last)
    args = ([m.stride[0]] * 2, [m.padding[0]] * 2, [m.dilation[0]] * 2, m.groups)
    w = m.weight.detach()
    go = torch.randn_like(torch.ops.fastfuse_C.reflect_conv2d(x, w, None, *args, 0))
    b = None if m.bias is None else m.bias.detach()
    assert _auto_matches(torch.ops.fastfuse_C.reflect_conv2d, (x, w, b, *args), DESIGNS)
    assert _auto_matches(torch.ops.fastfuse_C.reflect_conv2d_backward, (go, x, w, *args, [True, True, False]),
                         DESIGNS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,algo", [r for r in RUNS if r[0] != "reference"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[6]], ids=["3x3", "depthwise", "pad+1"])
def test_half_precision_against_fp32(backend, algo, cfg, dtype, monkeypatch):
    m, x = _conv(cfg, dtype=dtype, channels_last=True)
    y, grads = _run(backend, algo, monkeypatch, lambda: _fwd_bwd(m, x, _ours(m)))
    m32 = m.float()
    y_ref, grads_ref = _fwd_bwd(m32, x.float(), _theirs(m32))
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.float(), b, **TOL[dtype])


@pytest.mark.parametrize("algo", DESIGNS)
@pytest.mark.parametrize("cfg", [(1, 2, 4, 5, 3, 3, 1, 1, 1, 1, True), (1, 2, 5, 4, 4, 3, 2, 2, 1, 2, True),
                                 (1, 2, 5, 6, 2, 4, 2, 3, 1, 2, True)], ids=["3x3", "s2g2", "k4s2g2"])
def test_gradcheck_float64(cfg, algo, monkeypatch):
    monkeypatch.setenv("FASTFUSE_REFLECT_CONV2D_ALGO", algo)
    N, C, H, W, OC, k, s, p, d, g, _ = cfg
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(OC, C // g, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OC, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: fastfuse.reflect_conv2d(x, w, b, s, p, d, g), (x, w, b),
                                    fast_mode=True)
    # create_graph=True: through the reference composition (csrc/double_backward.h)
    assert torch.autograd.gradgradcheck(lambda x, w, b: fastfuse.reflect_conv2d(x, w, b, s, p, d, g), (x, w, b),
                                        fast_mode=True)
    # the op called directly
    op = lambda x, w, b: torch.ops.fastfuse.reflect_conv2d(x, w, b, [s, s], [p, p], [d, d], g)  # noqa: E731
    assert torch.autograd.gradcheck(op, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(op, (x, w, b), fast_mode=True)


def test_opcheck():
    x = torch.randn(2, 4, 6, 7)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    for xi in (x.requires_grad_(), x.to(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(torch.ops.fastfuse.reflect_conv2d, (xi, w, b, [1, 2], [1, 2], [1, 1], 2))
        torch.library.opcheck(torch.ops.fastfuse.reflect_conv2d, (xi.detach(), w.detach(), None, [2, 1], [2, 1],
                                                                  [1, 2], 1 if w.shape[1] == 4 else 2))
    go = torch.randn(2, 6, 6, 7)
    torch.library.opcheck(torch.ops.fastfuse.reflect_conv2d_backward,
                          (go, x.detach(), w.detach(), [1, 1], [1, 1], [1, 1], 2, [True, True, True]))
    torch.library.opcheck(torch.ops.fastfuse.reflect_conv2d_backward,
                          (go, x.detach(), w.detach(), [1, 1], [1, 1], [1, 1], 2, [False, True, False]))


@pytest.mark.parametrize("backend,algo", [r for r in RUNS if r[0] != "reference"])
def test_gradients_bit_identical_run_to_run(backend, algo, monkeypatch):
    cfg = (3, 8, 12, 11, 8, 3, 1, 1, 1, 1, True)
    m, x = _conv(cfg, channels_last=True)
    first = _run(backend, algo, monkeypatch, lambda: _fwd_bwd(m, x, _ours(m)))
    for _ in range(2):
        again = _run(backend, algo, monkeypatch, lambda: _fwd_bwd(m, x, _ours(m)))
        for a, b in zip((first[0],) + first[1], (again[0],) + again[1]):
            assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("algo", DESIGNS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_many_tasks_match_and_do_not_depend_on_thread_count(algo, channels_last, monkeypatch):
    """Enough GEMM rows for several CPU tasks and grad_weight runs (7x7 outputs: several images per task).
    Bits across thread counts for direct's forward (it computes each pixel in one call whatever the task split):
    oneDNN's own results in the frame design depend on them."""
    cfg = (37, 6, 7, 7, 5, 3, 1, 1, 1, 1, True)
    m, x = _conv(cfg, channels_last=channels_last)
    runs = []
    for n in (1, 2, 3):
        with _num_threads(n):
            runs.append(_run("cpp", algo, monkeypatch, lambda: _fwd_bwd(m, x, _ours(m))))
    ref = _fwd_bwd(m, x, _theirs(m))
    for run in runs:
        for a, b in zip((run[0],) + run[1], (ref[0],) + ref[1]):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    for again in runs[1:]:
        same = {"direct": runs[0][:1]}.get(algo, ())
        for a, b in zip(same, (again[0],) + again[1]):
            assert torch.equal(bits(a), bits(b))


AVX512 = CPP and torch.backends.cpu.get_cpu_capability() == "AVX512"

# The direct design's own grid, (N, C, H, W, OC, kernel, stride, padding, dilation, bias): its kernel takes lines of
# up to 14 pixels and tiles of 32 output channels (masked past OC), folds the frame's taps, and runs the corners as
# lines across even pieces of the batch.
DIRECT = [
    (2, 5, 9, 11, 16, 3, 1, 1, 1, True),      # odd sizes, one 16-lane vector per tile
    (17, 4, 5, 6, 40, 3, 1, 1, 1, False),     # 17 images: corner lines over 8 + 9; a tile of 8 lanes
    (2, 3, 12, 10, 33, 7, 2, 3, 1, True),     # the stem's 7x7 stride 2 on 3 channels; a tile of 1 lane
    (2, 6, 9, 8, 32, 5, 1, 2, 2, True),       # 5x5, dilation 2
    (3, 8, 3, 3, 8, 3, 1, 2, 1, True),        # one pixel more than the padding: taps fold 3 ways
    (2, 4, 2, 5, 48, 3, 1, 1, 1, False),      # height = padding + 1
    (2, 4, 6, 7, 20, 2, 1, 1, 1, True),       # even kernel
    (1, 64, 14, 14, 64, 3, 1, 1, 1, True),    # ResNet's 14x14 lines of 12, one image: tasks split by tiles
    (2, 8, 30, 30, 16, 3, 1, 1, 1, True),     # lines of 28: two calls of 14
    (2, 4, 9, 9, 8, 1, 1, 1, 1, True),        # 1x1 with padding: the whole frame reflected
    (2, 4, 8, 9, 8, 4, 2, 3, 1, True),        # 4x4 stride 2, padding 3
    (3, 16, 5, 5, 200, 3, 1, 1, 1, True),     # the weight outweighs the activations: a task per tile, 7 tiles
    (2, 40, 12, 10, 30, 3, 2, 1, 1, False),   # grad_weight: input channels in a tile of 32 and a masked one of 8
    (2, 70, 16, 16, 29, 3, 1, 1, 1, False),   # grad_weight: three tiles (the last of 6 lanes), blocks of 9-10
    (2, 96, 40, 40, 96, 3, 1, 1, 1, False),   # grad_weight: an image over 1 MB, summed in bands of rows
    (1, 4, 40, 36, 16, 3, 1, 1, 1, True),     # one image, one tile: bands of rows, as many as the threads want
    (1, 3, 30, 28, 16, 7, 2, 3, 1, False),    # the stem at batch 1: bands, and runs of taps 7 x 3 channels long
]


@pytest.mark.skipif(not AVX512, reason="the direct design runs on AVX-512 CPUs only")
@pytest.mark.parametrize("layout", ["cl", "cl-ohwi", "nchw"])
@pytest.mark.parametrize("cfg", DIRECT, ids=[str(i) for i in range(len(DIRECT))])
def test_direct_design_against_float64(cfg, layout):
    """The direct design, forced: it must be the design that runs (fp32, channels_last input or NCHW through the
    relayout), match the float64 reference to fp32 accuracy with torch's output and grad_input layout, and give the
    same bits run to run and on 1, 2 or 3 threads; its grad_input and grad_weight likewise."""
    N, C, H, W, OC, k, s, p, d, has_bias = cfg
    fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
    x = torch.randn(N, C, H, W).to(memory_format=fmt)
    w = torch.randn(OC, C, k, k)
    w = w.to(memory_format=torch.channels_last) if layout == "cl-ohwi" else w
    b = torch.randn(OC) if has_bias else None
    conv = (x, w, b, [s, s], [p, p], [d, d], 1, rc_ops._ALGOS["direct"])
    assert fastfuse._C.reflect_conv2d_cpu_design(*conv[:2], *conv[3:]) == "direct"
    xr = x.double().requires_grad_()
    go = torch.randn(N, OC, (H + 2 * p - d * (k - 1) - 1) // s + 1,
                     (W + 2 * p - d * (k - 1) - 1) // s + 1).to(memory_format=fmt)
    wr = w.double().requires_grad_()
    ref = F.conv2d(F.pad(xr, (p, p, p, p), mode="reflect"), wr, None if b is None else b.double(), s, 0, d)
    gi_ref, gw_ref = torch.autograd.grad(ref, (xr, wr), go.double())
    grad = (go, x, w, [s, s], [p, p], [d, d], 1, [True, True, False], rc_ops._ALGOS["direct"])
    runs = []
    for n in (1, 2, 3):
        with _num_threads(n):
            for _ in range(2):
                runs.append((torch.ops.fastfuse_C.reflect_conv2d(*conv),
                             *torch.ops.fastfuse_C.reflect_conv2d_backward(*grad)[:2]))
    y, gi, gw = runs[0]
    torch.testing.assert_close(y, ref.detach().float(), **TOL[torch.float32])
    assert y.is_contiguous(memory_format=fmt) and y.stride() == torch.empty_like(y, memory_format=fmt).stride()
    torch.testing.assert_close(gw, gw_ref.float(), **TOL[torch.float32])
    torch.testing.assert_close(gi, gi_ref.float(), **TOL[torch.float32])
    assert gi.is_contiguous(memory_format=fmt)
    for again in runs[1:]:
        assert torch.equal(bits(y), bits(again[0])) and torch.equal(bits(gi), bits(again[1]))
        assert torch.equal(bits(gw), bits(again[2]))


@pytest.mark.skipif(not AVX512, reason="the direct design runs on AVX-512 CPUs only")
def test_forced_direct_design_only_where_it_applies():
    """Forced, it runs on fp32 channels_last or NCHW input with one group; elsewhere the automatic pick runs."""
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(8, 4, 3, 3)
    design = lambda x, w, g=1: fastfuse._C.reflect_conv2d_cpu_design(  # noqa: E731
        x, w, [1, 1], [1, 1], [1, 1], g, rc_ops._ALGOS["direct"])
    cl = x.to(memory_format=torch.channels_last)
    assert design(cl, w) == "direct" and design(x, w) == "direct"
    assert design(x.transpose(2, 3), w) != "direct" and design(cl.double(), w.double()) != "direct"
    assert design(cl, w[:, :2], 2) != "direct" and design(cl.bfloat16(), w.bfloat16()) != "direct"


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if CPP else []))
def test_autocast_as_torch_conv(backend):
    """Under torch.autocast the drop-in runs in the autocast dtype, as nn.Conv2d does; gradients reach the fp32
    parameters in fp32."""
    m = fastfuse.nn.ReflectConv2d(3, 4, 3, padding=1)
    t = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    t.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16), fastfuse.use_backend(backend):
        y, y_ref = m(x), t(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32


def test_unbatched_and_strided_inputs():
    m, x = _conv(CONFIGS[0])
    torch.testing.assert_close(fastfuse.reflect_conv2d(x[0], m.weight, m.bias, 1, 1), m(x[0]))
    xs = torch.randn(2, 8, 9, 16)[:, ::2, 1:, ::2]  # strided view, not dense
    torch.testing.assert_close(fastfuse.reflect_conv2d(xs, m.weight, m.bias, 1, 1), m(xs))


def _both_raise(fn_ours, fn_torch, match):
    if fn_torch is not None:
        with pytest.raises(RuntimeError):
            fn_torch()
    with pytest.raises(RuntimeError, match=match):
        fn_ours()


@pytest.mark.parametrize("case", ["pad_h", "pad_w", "groups_out", "groups_in", "weight_channels", "dtype", "bias",
                                  "device"])
def test_errors_match_torch_and_run_nothing(case, monkeypatch):
    x, w, b, p, g = torch.randn(2, 4, 6, 5), torch.randn(6, 4, 3, 3), None, 1, 1
    match = "should be the same"
    if case == "pad_h":
        x, p, match = torch.randn(2, 4, 3, 8), 3, "Padding size should be less than the corresponding input dimension"
    elif case == "pad_w":
        x, p, match = torch.randn(2, 4, 8, 2), 2, "Padding size should be less than the corresponding input dimension"
    elif case == "groups_out":
        w, g, match = torch.randn(5, 2, 3, 3), 2, "expected weight to be divisible by 2"
    elif case == "groups_in":
        w, g, match = torch.randn(6, 4, 3, 3), 3, "to have 12 channels, but got 4 channels"
    elif case == "weight_channels":
        w, match = torch.randn(6, 3, 3, 3), "to have 3 channels, but got 4 channels"
    elif case == "dtype":
        w = w.double()
    elif case == "bias":
        b = torch.randn(6, dtype=torch.float16)
    elif case == "device":
        w = w.to("meta")
    calls = []  # the kernels check first: reaching a backend's implementation would be a bug
    monkeypatch.setitem(_backends._IMPLS["reflect_conv2d"], "reference", lambda *a: calls.append(a))
    # a CPU input with a meta weight does not raise in torch (meta wins); a CUDA one would, with this message
    torch_fn = None if case == "device" else lambda: F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), w, b, 1, 0, 1, g)
    _both_raise(lambda: fastfuse.reflect_conv2d(x, w, b, 1, p, 1, g), torch_fn, match)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastfuse.reflect_conv2d(x, w, b, [1, 1], [p, p], [1, 1], g)  # the op checks too
    with fastfuse.use_backend("reference"), pytest.raises(RuntimeError, match=match):
        torch.ops.fastfuse.reflect_conv2d(x, w, b, [1, 1], [p, p], [1, 1], g)
    assert not calls


def test_reflect_conv2d_module_is_a_drop_in():
    torch_m = nn.Conv2d(4, 6, 3, 2, 1, bias=True, padding_mode="reflect")
    ours = fastfuse.nn.ReflectConv2d(4, 6, 3, 2, 1, bias=True)
    assert repr(ours) == repr(torch_m)
    assert isinstance(ours, nn.Conv2d) and list(ours.state_dict()) == list(torch_m.state_dict())
    ours.load_state_dict(torch_m.state_dict())
    x = torch.randn(2, 4, 7, 9)
    torch.testing.assert_close(ours(x), torch_m(x))
    torch_m.load_state_dict(fastfuse.nn.ReflectConv2d(4, 6, 3, 2, 1).state_dict())  # and back
    same = nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect")
    ours_same = fastfuse.nn.ReflectConv2d(4, 6, 3, padding="same")
    ours_same.load_state_dict(same.state_dict())
    torch.testing.assert_close(ours_same(x), same(x))
    with pytest.raises(ValueError):
        fastfuse.nn.ReflectConv2d(4, 6, 3, padding_mode="zeros")


def _fastai_layout(ni, nf, ks, stride, bias, padding_mode="reflect"):
    """What fastai's ConvLayer(ni, nf, ks, stride, padding_mode=...) builds with BN and ReLU (bn_1st)."""
    return nn.Sequential(nn.Conv2d(ni, nf, ks, stride, (ks - 1) // 2, bias=bias, padding_mode=padding_mode),
                         nn.BatchNorm2d(nf), nn.ReLU())


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_conv_layer_matches_fastai_layout(padding_mode):
    layer = fastfuse.nn.ConvLayer(4, 8, ks=3, stride=2, padding_mode=padding_mode)
    twin = _fastai_layout(4, 8, 3, 2, False, padding_mode)
    assert list(layer.state_dict()) == list(twin.state_dict())
    assert type(layer[0]) is (fastfuse.nn.ReflectConv2d if padding_mode == "reflect" else nn.Conv2d)
    assert layer[0].bias is None and torch.all(layer[1].bias == 1e-3)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 9, 8)
    torch.testing.assert_close(layer(x), twin(x))  # train mode: batch statistics and running-stat updates
    torch.testing.assert_close(layer[1].running_mean, twin[1].running_mean)
    layer.eval(), twin.eval()
    torch.testing.assert_close(layer(x), twin(x))
    no_bn = fastfuse.nn.ConvLayer(4, 8, ks=5, norm_type=None, bn_1st=False)
    assert len(no_bn) == 2 and no_bn[0].bias is not None and no_bn[0].padding == (2, 2)


@pytest.mark.parametrize("ndim", [1, 3])
def test_conv_layer_other_ndim_uses_fused_batch_norm(ndim):
    # fastai's ConvLayer(ndim=1|3): torch's reflect conv, then fastfuse's BatchNorm{1,3}d fused with the ReLU
    layer = fastfuse.nn.ConvLayer(3, 4, ks=3, ndim=ndim)
    conv = getattr(nn, f"Conv{ndim}d")
    twin = nn.Sequential(conv(3, 4, 3, 1, 1, bias=False, padding_mode="reflect"), getattr(nn, f"BatchNorm{ndim}d")(4),
                         nn.ReLU())
    assert type(layer[1]) is getattr(fastfuse.nn, f"BatchNorm{ndim}d")
    assert list(layer.state_dict()) == list(twin.state_dict())
    twin.load_state_dict(layer.state_dict())
    x = torch.randn((2, 3) + (5,) * ndim)
    torch.testing.assert_close(layer(x), twin(x))
    torch.testing.assert_close(layer[1].running_var, twin[1].running_var)


def test_fuse_swaps_reflect_conv_and_keeps_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    weight = model[0].weight
    fastfuse.fuse(model)
    assert type(model[0]) is fastfuse.nn.ReflectConv2d and model[0].weight is weight
    assert type(model[2]) is nn.Conv2d
    torch.testing.assert_close(model(x), expected)


def test_compile_conv_layer_stack_fullgraph():
    model = nn.Sequential(fastfuse.nn.ConvLayer(3, 8, stride=2), fastfuse.nn.ConvLayer(8, 8))
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(gx, x.grad)


@pytest.mark.skipif(not TRITON_INTERPRET, reason="the triton override takes CPU tensors only with TRITON_INTERPRET=1")
def test_triton_override_runs_torchs_path():
    """The Triton kernel is retired (docs/reflect_conv2d.md): under the "triton" override the op runs the reference
    (F.pad + conv2d), forward and backward, so a model under that override still runs."""
    cfg = CONFIGS[4]
    m, x = _conv(cfg, channels_last=True)
    x.requires_grad_()
    with fastfuse.use_backend("triton"):
        y = _ours(m)(x, m.weight, m.bias)
        gx = torch.autograd.grad(y.sum(), x)[0]
    with fastfuse.use_backend("reference"):
        y_ref = _ours(m)(x, m.weight, m.bias)
        gx_ref = torch.autograd.grad(y_ref.sum(), x)[0]
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


@pytest.mark.parametrize("algo", DESIGNS)
@pytest.mark.parametrize("shape,stride", [((3, 4, 7, 6), 1), ((2, 4, 9, 8), 2), ((2, 4, 2, 2), 1), ((0, 4, 7, 6), 1)],
                         ids=["s1", "s2", "no-block", "batch0"])
def test_backward_each_mask_as_reference(algo, shape, stride):
    """The backward op alone, each output asked for on its own and all together (the autograd node asks for
    what needs a gradient), against the reference's; also an empty batch and inputs with no unpadded block."""
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3)
    ref_m = nn.Conv2d(4, 5, 3, stride, 1, padding_mode="reflect", bias=True)
    ref_m.weight.data.copy_(w)
    y, grads = _fwd_bwd(ref_m, x, _theirs(ref_m))
    torch.manual_seed(1)
    go = torch.randn_like(y)
    for mask in ([True, False, False], [False, True, False], [False, False, True], [True, True, True]):
        out = torch.ops.fastfuse_C.reflect_conv2d_backward(go, x, w, [stride] * 2, [1, 1], [1, 1], 1, mask,
                                                           rc_ops._ALGOS[algo])
        for want, got, ref in zip(mask, out, grads):
            if want:
                torch.testing.assert_close(got, ref, **TOL[torch.float32])


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("algo", ["auto", *DESIGNS])
def test_raw_cpu_ops_with_inputs_that_require_grad(algo, channels_last):
    """fastfuse_C's ops have no autograd kernel; called directly under grad mode with inputs that require grad
    (as a traced graph or a user may), every design must compute as usual: its inner ATen calls run below autograd
    (index_select_out, say, refuses inputs that require grad)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 7, 9).to(memory_format=fmt).requires_grad_()
    w = torch.randn(5, 6, 3, 3).requires_grad_()
    go = torch.randn(2, 5, 7, 9).to(memory_format=fmt)
    a = rc_ops._ALGOS[algo]
    y = torch.ops.fastfuse_C.reflect_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, a)
    gi, gw, _ = torch.ops.fastfuse_C.reflect_conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1,
                                                              [True, True, False], a)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(F.pad(xr, (1, 1, 1, 1), mode="reflect"), wr)
    ref_gi, ref_gw = torch.autograd.grad(ref, [xr, wr], go.double())
    torch.testing.assert_close(y.detach().double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gi.double(), ref_gi, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-4)
