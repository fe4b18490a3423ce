"""fastfuse.dropout against its semantics and the reference; bit-identical masks on every backend (C++ CPU ==
reference == Triton (interpreter) == CUDA), and the backend override."""
import pytest
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse import _layout, reference

from conftest import CPP, CPU_BACKENDS, CUDA, TRITON, bits

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1,), (7,), (3, 5), (2, 3, 7, 11), (4, 8, 5, 5)]


def _mask_and_out(x, p):
    torch.manual_seed(123)
    y = fastfuse.dropout(x, p)
    torch.manual_seed(123)
    seed = torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64)  # what fastfuse draws
    return y, seed.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_forward_matches_reference_and_semantics(shape, dtype, p):
    x = torch.randn(shape, dtype=dtype)
    y, (key, off) = _mask_and_out(x, p)
    assert torch.equal(bits(y), bits(reference.dropout(x, p, key, off)))
    keep = reference.dropout_keep_mask(x.numel(), p, key, off).view(shape)
    expected = torch.where(keep, x.double() / (1 - p), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(y.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_regenerates_mask(dtype):
    # no zeros in x, so y != 0 is the kept mask (torch 2.11's bfloat16 randn gives exact zeros)
    sign = torch.where(torch.rand(6, 37) < 0.5, -1.0, 1.0)
    x = (sign * (torch.rand(6, 37) + 0.5)).to(dtype).requires_grad_()
    y = fastfuse.dropout(x, 0.3)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    kept = y != 0
    torch.testing.assert_close(gx[kept].float(), (g[kept].float() / 0.7).to(dtype).float())
    assert torch.all(gx[~kept] == 0)


def test_saved_tensors_are_o1():
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = torch.randn(64, 1024, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastfuse.dropout(x, 0.5).sum().backward()  # the eager C++ node keeps the seed as two numbers: no tensor
        torch.ops.fastfuse.dropout(x, 0.5, torch.tensor([1, 2])).sum().backward()  # the registered op: a seed
    assert sizes and max(sizes) <= 2, sizes
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.dropout(x, 0.5).sum()
    assert max(sizes) == x.numel()  # torch keeps a numel-sized mask; we keep [key, offset]


def test_layouts_channels_last_and_noncontiguous():
    x = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    y = fastfuse.dropout(x, 0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 7)  # a contiguous gradient for a channels_last output
    xr = x.clone().requires_grad_()
    torch.manual_seed(1)
    yr = fastfuse.dropout(xr, 0.5)
    (gx,) = torch.autograd.grad(yr, xr, g)
    torch.testing.assert_close(gx, torch.where(yr != 0, g * 2, torch.zeros(())))
    s = torch.randn(6, 10)[:, ::2]
    ys = fastfuse.dropout(s, 0.5)
    assert ys.shape == s.shape and ys.is_contiguous()
    torch.testing.assert_close(ys[ys != 0], s[ys != 0] * 2)


def test_special_cases():
    x = torch.randn(10, 10, requires_grad=True)
    assert fastfuse.dropout(x, 0.5, training=False) is x
    assert fastfuse.dropout(x, 0.0) is x
    z = fastfuse.dropout(x, 1.0)
    assert torch.equal(z, torch.zeros_like(x))
    z.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    e = torch.randn(0, 3)
    assert fastfuse.dropout(e, 0.5).shape == (0, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_nan_inf_and_signed_zeros_as_torch(backend, p):
    # torch multiplies by its mask: a dropped NaN or inf gives NaN, a dropped negative value -0 (p = 1 too)
    x = torch.tensor([float("nan"), float("inf"), -1.0, 2.0] * 256, requires_grad=True)
    with fastfuse.use_backend(backend):
        y = fastfuse.dropout(x, p)
        (gx,) = torch.autograd.grad(y, x, torch.full_like(y, float("nan")))
    y = y.detach()
    assert y[0::4].isnan().all() and gx.isnan().all()  # NaN in, NaN out; a NaN gradient stays NaN
    assert (y[1::4].isnan() | (y[1::4] == float("inf"))).all() and y[1::4].isnan().any()
    assert torch.equal(y[2::4] == 0, y[2::4].signbit() & (y[2::4] == 0)) and (y[2::4] == 0).any()
    assert (y[3::4] == 0).any() and (y[3::4] == 0).logical_not().any() == (p < 1)
    if p == 1:  # no randomness left: exactly torch's result
        t = F.dropout(x.detach(), p)
        assert torch.equal(y.isnan(), t.isnan()) and torch.equal(y.signbit(), t.signbit())


def test_inplace():
    x = torch.randn(100)
    orig = x.clone()
    y = fastfuse.dropout(x, 0.5, inplace=True)
    assert y is x and not torch.equal(x, orig)
    x2 = torch.randn(100)
    c = x2.clone()
    fastfuse.dropout(x2, 0.5)
    assert torch.equal(x2, c)  # out of place writes nothing to the input


def test_seed_reproducibility_and_keep_fraction():
    x = torch.ones(200_000)
    torch.manual_seed(7)
    a = fastfuse.dropout(x, 0.3)
    torch.manual_seed(7)
    b = fastfuse.dropout(x, 0.3)
    c = fastfuse.dropout(x, 0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    frac = (a != 0).double().mean().item()
    assert abs(frac - 0.7) < 5 * (0.3 * 0.7 / x.numel()) ** 0.5  # 5 sigma
    torch.testing.assert_close(a.mean().item(), 1.0, rtol=0, atol=0.02)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_bad_p(p):
    with pytest.raises(ValueError, match="dropout probability"):
        fastfuse.dropout(torch.randn(3), p)
    with pytest.raises(ValueError):
        fastfuse.nn.Dropout(p if isinstance(p, float) else -1.0)


def test_integer_tensor():
    with pytest.raises(TypeError, match="floating-point"):
        fastfuse.dropout(torch.arange(5), 0.5)


def test_gradcheck_float64():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([12345, 0])
    assert torch.autograd.gradcheck(lambda t: torch.ops.fastfuse.dropout(t, 0.4, seed), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.fastfuse.dropout(t, 0.4, seed), (x,))

    def eager(t):  # the public function, the same mask on every call
        with torch.random.fork_rng():
            torch.manual_seed(5)
            return fastfuse.dropout(t, 0.4)
    assert "DropoutFunction" in eager(x).grad_fn.name()
    assert torch.autograd.gradcheck(eager, (x,))
    assert torch.autograd.gradgradcheck(eager, (x,))


@pytest.mark.parametrize("args", [((5, 7), torch.float32, 0.5), ((2, 3, 4, 4), torch.float64, 0.2),
                                  ((0, 4), torch.float32, 0.5), ((9,), torch.bfloat16, 0.7)])
def test_opcheck(args):
    shape, dtype, p = args
    x = torch.randn(shape, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.fastfuse.dropout.default, (x, p, torch.tensor([99, 3])))
    torch.library.opcheck(torch.ops.fastfuse.dropout_backward.default, (x.detach(), p, torch.tensor([99, 3])))


def test_module_dropin():
    m, ref = fastfuse.nn.Dropout(0.25), torch.nn.Dropout(0.25)
    assert repr(m) == repr(ref) == "Dropout(p=0.25, inplace=False)"
    assert isinstance(m, torch.nn.Dropout) and m.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(20, 20)
    assert torch.equal(m.eval()(x), x)
    y = m.train()(x)
    torch.testing.assert_close(y[y != 0], x[y != 0] / 0.75)


def test_fuse_swaps_dropout_and_keeps_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1),
                                torch.nn.Sequential(torch.nn.Dropout(0.2)))
    w = model[0].weight.clone()
    fastfuse.fuse(model)
    assert type(model[1]) is fastfuse.nn.Dropout and model[1].p == 0.1
    assert type(model[2][0]) is fastfuse.nn.Dropout and torch.equal(model[0].weight, w)


@pytest.mark.parametrize("shape,cl", [((64, 100), False), ((2, 3, 5, 7), True), ((6, 10), "t"), ((6, 10), "strided")],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layouts_of_input_and_gradient_as_reference(shape, cl, dtype):
    """The seed fastfuse.dropout draws, its mask, output and gradient, whatever the layouts of the input and of the
    incoming gradient: the mask follows the output's memory order, and the gradient is laid out like it."""
    x = torch.randn(shape, dtype=dtype)
    layouts = {True: lambda: x.to(memory_format=torch.channels_last), "t": x.t, "strided": lambda: x[:, ::2]}
    x = layouts.get(cl, lambda: x)()
    g = torch.randn(x.shape, dtype=dtype)
    xr = x.detach().clone().requires_grad_()
    y, (key, off) = _mask_and_out(xr, 0.3)
    (gx,) = torch.autograd.grad(y, xr, g)
    want = reference.dropout(x, 0.3, key, off)
    assert y.stride() == want.stride() and torch.equal(bits(y), bits(want))
    assert torch.equal(bits(gx.contiguous()), bits(reference.dropout(_layout.to_strides(g, y.stride()), 0.3, key,
                                                                       off).contiguous()))


# ---- every backend: the same bits -------------------------------------------------------------------------
SEED = torch.tensor([0x0123456789ABCDEF, 0xFEDCBA98])


def test_philox_known_answers():
    # Random123's published Philox4x32-10 test vectors
    T = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, out in cases:
        got = reference.philox4x32_10(*[T(c) for c in ctr], *key)
        assert tuple(int(w) for w in got) == out


def test_dropout_keys_are_16_bit_halves_of_philox_words():
    # element i: group i // 8 (counter lo/hi = group, offset lo/hi), word (i % 8) // 2, low half first
    seed, offset = 0x0123456789ABCDEF, 0x1122334455667788
    keys = reference.dropout_keys(8 * 3, seed, offset)
    m = 0xFFFFFFFF
    for g in range(3):
        T = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
        words = reference.philox4x32_10(T(g), T(0), T(offset & m), T(offset >> 32), seed & m, seed >> 32)
        want = [(int(words[l // 2]) >> (16 * (l % 2))) & 0xFFFF for l in range(8)]
        assert keys[8 * g:8 * g + 8].tolist() == want


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threshold_steps_of_2_pow_minus_16(backend):
    # p = k / 2^16 drops exactly the keys below k: the mask matches the reference keys on every backend
    x = torch.ones(4096)
    keys = reference.dropout_keys(x.numel(), *SEED.tolist())
    for k in (1, 300, 32768, 65535):
        y = _run(backend, x, p=k / 65536)
        assert torch.equal(y != 0, keys >= k)


def _run(backend, x, p=0.37, seed=SEED):
    with fastfuse.use_backend(backend):
        return torch.ops.fastfuse.dropout(x, p, seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (5, 3), (3, 67), (2, 3, 5, 4)])
def test_cpu_backends_bit_identical(backend, dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    want = reference.dropout(x, 0.37, *SEED.tolist())
    assert torch.equal(bits(_run(backend, x)), bits(want))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_and_large_offsets(backend):
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    seed = torch.tensor([2**63 - 5, 2**40 + 3])
    y = _run(backend, x, 0.5, seed)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bits(y), bits(reference.dropout(x, 0.5, *seed.tolist())))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fastfuse._C not built")
def test_cpp_simd_paths_match_reference_on_a_long_tensor():
    # long enough for the AVX-512/AVX2 chunks, the scalar tail and several threads; odd length
    x = torch.randn(100_003)
    assert torch.equal(_run("cpp", x), reference.dropout(x, 0.37, *SEED.tolist()))


@pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and TRITON_INTERPRET unset)")
def test_triton_backward_matches_reference():
    x = torch.randn(3, 50, requires_grad=True, device="cuda" if CUDA else "cpu")
    with fastfuse.use_backend("triton"):
        y = torch.ops.fastfuse.dropout(x, 0.25, SEED)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx.cpu(), reference.dropout(torch.ones(3, 50), 0.25, *SEED.tolist()))


def test_backend_errors():
    with pytest.raises(ValueError, match="unknown fastfuse backend"):
        with fastfuse.use_backend("nope"):
            pass
    if not CUDA:
        with fastfuse.use_backend("cuda"), pytest.raises(RuntimeError, match="runs CUDA tensors"):
            fastfuse.dropout(torch.randn(4), 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (1001,), (4, 3, 33, 7), (1 << 20) + 3])
def test_gpu_bit_identical_to_cpu(backend, dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    want = reference.dropout(x, 0.37, *SEED.tolist())
    got = _run(backend, x.cuda()).cpu()
    assert torch.equal(bits(got), bits(want))


@pytest.mark.cuda
def test_gpu_unaligned_and_channels_last():
    x = torch.randn(1, 8, 9, 5, device="cuda").to(memory_format=torch.channels_last)
    xs = torch.randn(1003, device="cuda")[1:]  # misaligned storage offset
    for backend in ("cuda", "triton"):
        assert torch.equal(_run(backend, x).cpu(), reference.dropout(x.cpu(), 0.37, *SEED.tolist()))
        assert torch.equal(_run(backend, xs).cpu(), reference.dropout(xs.cpu(), 0.37, *SEED.tolist()))


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    """A forward under use_backend records its backend; the backward runs there even outside the block."""
    from fastfuse import _backends
    calls = []
    ref = _backends._IMPLS["dropout_backward"]["reference"]
    monkeypatch.setitem(_backends._IMPLS["dropout_backward"], "reference",
                        lambda *a: calls.append(1) or ref(*a))
    x = torch.randn(40, requires_grad=True)
    with fastfuse.use_backend("reference"):
        y = fastfuse.dropout(x, 0.5)
    assert fastfuse.backends()["default"]["override"] is None
    y.sum().backward()
    assert calls == [1]
    y = fastfuse.dropout(x, 0.5)  # the default backend: no Python
    y.sum().backward()
    assert calls == [1]
