"""fastfuse.augment and fastfuse.nn.BatchAugment: against the reference composition (every pad_mode, dtype,
layout, up- and downsampling), against F.affine_grid + F.grid_sample, exact identity and flip, C++ against the
Triton interpreter, fastai's lighting formula and matrices, the parameter draws' distributions, determinism,
every bad input, B = 0. Tiny images: the whole file runs in seconds (the Triton interpreter is slow)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse import reference
from fastfuse.nn import BatchAugment

from conftest import CPP, TRITON, bits

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
PADS = ["reflection", "zeros", "border"]


def _images(B, C, H, W, dtype=torch.uint8, channels_last=False):
    x = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    if dtype != torch.uint8:
        x = (x.float() / 255).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _matrices(B, warp=0.3, seed=1):
    """Random flips, rotations, zooms about off-centre points and fastai warps: coordinates well outside the
    image, so every pad_mode matters."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: torch.rand(B, generator=g, dtype=torch.float64) * (hi - lo) + lo  # noqa: E731
    th, s = u(-0.6, 0.6), u(0.6, 1.6)
    aff = torch.zeros(B, 3, 3, dtype=torch.float64)
    aff[:, 0, 0], aff[:, 0, 1], aff[:, 1, 0], aff[:, 1, 1] = s * th.cos(), s * th.sin(), -s * th.sin(), s * th.cos()
    aff[:, 0, 0] *= torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    aff[:, 0, 2], aff[:, 1, 2], aff[:, 2, 2] = u(-0.5, 0.5), u(-0.5, 0.5), 1
    from fastfuse.nn.augment import warp_matrix
    return (warp_matrix(u(-warp, warp), u(-warp, warp)) @ aff).float()


def _lighting(B, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, generator=g) * 0.4 + 0.3, torch.exp(torch.rand(B, generator=g) * 0.8 - 0.4)


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("pad_mode", PADS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,size", [((2, 3, 7, 9), (11, 13)), ((3, 3, 16, 12), (5, 7)), ((1, 2, 1, 5), (3, 1))])
def test_matches_reference(pad_mode, dtype, channels_last, shape, size):
    x = _images(*shape, dtype=dtype, channels_last=channels_last)
    m = _matrices(shape[0])
    br, con = _lighting(shape[0])
    C = shape[1]
    kw = dict(brightness=br, contrast=con, mean=MEAN[:C], std=STD[:C], pad_mode=pad_mode,
              memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    got = fastfuse.augment(x, m, size, **kw)
    want = reference.augment(x, m, size, br, con, torch.tensor(MEAN[:C]), torch.tensor(STD[:C]), pad_mode,
                             torch.float32, channels_last)
    assert got.shape == (shape[0], C, *size) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the CPU kernel's own log/exp and the order of its coordinate arithmetic: a few float ulps of the input range
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_out_dtypes(out_dtype):
    x, m = _images(2, 3, 9, 8), _matrices(2)
    got = fastfuse.augment(x, m, 6, mean=MEAN, std=STD, out_dtype=out_dtype)
    want = fastfuse.augment(x, m, 6, mean=MEAN, std=STD)
    assert got.dtype == out_dtype
    assert torch.equal(got, want.to(out_dtype))  # the same float32 result, rounded to nearest even


@pytest.mark.parametrize("pad_mode", PADS)
def test_affine_matches_grid_sample(pad_mode):
    x = _images(3, 3, 10, 14, dtype=torch.float32)
    m = _matrices(3, warp=0.0)
    grid = F.affine_grid(m[:, :2], [3, 3, 8, 12], align_corners=True)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode=pad_mode, align_corners=True)
    torch.testing.assert_close(fastfuse.augment(x, m, (8, 12), pad_mode=pad_mode), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_identity_and_flip_exact(dtype):
    x = _images(2, 3, 7, 10, dtype=dtype)
    xf = x.float() / 255 if dtype == torch.uint8 else x
    eye = torch.eye(3).expand(2, 3, 3)
    assert torch.equal(fastfuse.augment(x, eye, (7, 10)), xf)
    flip = torch.diag(torch.tensor([-1.0, 1, 1])).expand(2, 3, 3)
    assert torch.equal(fastfuse.augment(x, flip, (7, 10)), torch.flip(xf, [3]))
    vflip = torch.diag(torch.tensor([1.0, -1, 1])).expand(2, 3, 3)
    assert torch.equal(fastfuse.augment(x, vflip, (7, 10)), torch.flip(xf, [2]))
    # identity at another size: the bilinear resize with align_corners=True
    want = F.interpolate(xf, size=(5, 13), mode="bilinear", align_corners=True)
    torch.testing.assert_close(fastfuse.augment(x, eye, (5, 13)), want, atol=1e-6, rtol=0)


def test_lighting_is_fastais_formula():
    x = _images(4, 3, 5, 6, dtype=torch.float32)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 1e-9])  # the clamp of logit
    br, con = _lighting(4)
    got = fastfuse.augment(x, torch.eye(3).expand(4, 3, 3), (5, 6), brightness=br, contrast=con)

    def logit(t):  # fastai.torch_core.logit
        t = t.clamp(1e-7, 1 - 1e-7)
        return -(1 / t - 1).log()
    want = torch.sigmoid(con.view(-1, 1, 1, 1) * (logit(x.double()) + logit(br.double()).view(-1, 1, 1, 1)))
    torch.testing.assert_close(got, want.float(), atol=2e-6, rtol=0)
    # brightness alone (contrast 1) and contrast alone (brightness 0.5)
    only_b = fastfuse.augment(x, torch.eye(3).expand(4, 3, 3), (5, 6), brightness=br)
    torch.testing.assert_close(only_b, fastfuse.augment(x, torch.eye(3).expand(4, 3, 3), (5, 6), brightness=br,
                                                        contrast=torch.ones(4)), atol=0, rtol=0)
    fa = pytest.importorskip("fastai.vision.augment")
    from fastai.torch_core import TensorImage
    b_t, c_t = fa._BrightnessLogit(draw=br.tolist(), p=1.0), fa._ContrastLogit(draw=con.tolist(), p=1.0)
    b_t.before_call(x)
    c_t.before_call(x)
    want_fa = TensorImage(x.clone()).lighting(lambda t: c_t(b_t(t)))
    torch.testing.assert_close(got, want_fa.as_subclass(torch.Tensor), atol=2e-6, rtol=0)


@pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("pad_mode", PADS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_equals_triton(pad_mode, channels_last):
    x = _images(2, 3, 6, 7, channels_last=channels_last)
    m = _matrices(2)
    with fastfuse.use_backend("triton"):
        tri = fastfuse.augment(x, m, (5, 9), mean=MEAN, std=STD, pad_mode=pad_mode)
    # coordinates, weights and blend: the same float operations in the same order, so the same bits
    assert torch.equal(bits(fastfuse.augment(x, m, (5, 9), mean=MEAN, std=STD, pad_mode=pad_mode)), bits(tri))
    br, con = _lighting(2)
    with fastfuse.use_backend("triton"):
        tri = fastfuse.augment(x, m, (5, 9), brightness=br, contrast=con, pad_mode=pad_mode)
    # lighting: numpy's (the interpreter's) log and exp against the CPU kernel's vectorisable ones
    torch.testing.assert_close(fastfuse.augment(x, m, (5, 9), brightness=br, contrast=con, pad_mode=pad_mode), tri,
                               atol=2e-6, rtol=0)


def test_deterministic_across_threads():
    x, m = _images(4, 3, 40, 50), _matrices(4)
    br, con = _lighting(4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastfuse.augment(x, m, 33, brightness=br, contrast=con)
        torch.set_num_threads(max(2, old))
        many = fastfuse.augment(x, m, 33, brightness=br, contrast=con)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(bits(one), bits(many))


def test_forward_only():
    x = _images(2, 3, 5, 5, dtype=torch.float32).requires_grad_()
    m = _matrices(2).requires_grad_()
    y = fastfuse.augment(x, m, 4)
    assert not y.requires_grad and y.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_opcheck():
    x, m = _images(2, 3, 5, 6), _matrices(2)
    br, con = _lighting(2)
    torch.library.opcheck(torch.ops.fastfuse.augment.default,
                          (x, m, [4, 7], br, con, torch.tensor(MEAN), torch.tensor(STD), "reflection",
                           torch.float32, True))


def test_batch_zero():
    x = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    y = fastfuse.augment(x, torch.zeros(0, 3, 3), 4)
    assert y.shape == (0, 3, 4, 4)
    assert BatchAugment(4)(x).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("call,err,match", [
    (lambda x, m: fastfuse.augment(x[0], m, 4), ValueError, "dims"),
    (lambda x, m: fastfuse.augment(x, m[:, :2], 4), ValueError, r"\(B, 3, 3\)"),
    (lambda x, m: fastfuse.augment(x, m[:1], 4), ValueError, r"\(B, 3, 3\)"),
    (lambda x, m: fastfuse.augment(x, m, 0), ValueError, "positive"),
    (lambda x, m: fastfuse.augment(x, m, (4, -1)), ValueError, "positive"),
    (lambda x, m: fastfuse.augment(x, m, "4"), TypeError, "size"),
    (lambda x, m: fastfuse.augment(x, m, 4, pad_mode="reflect"), ValueError, "pad_mode"),
    (lambda x, m: fastfuse.augment(x.int(), m, 4), TypeError, "uint8"),
    (lambda x, m: fastfuse.augment(x, m.long(), 4), TypeError, "floating"),
    (lambda x, m: fastfuse.augment(x, m, 4, mean=[0.5, 0.5], std=[1, 1]), ValueError, "per channel"),
    (lambda x, m: fastfuse.augment(x, m, 4, mean=MEAN, std=[1, 0, 1]), ValueError, "non-zero"),
    (lambda x, m: fastfuse.augment(x, m, 4, mean=MEAN), ValueError, "together"),
    (lambda x, m: fastfuse.augment(x, m, 4, brightness=torch.ones(3)), ValueError, "per image"),
    (lambda x, m: fastfuse.augment(x, m, 4, out_dtype=torch.float64), TypeError, "out_dtype"),
    (lambda x, m: BatchAugment(4, p_affine=1.5), ValueError, "p_affine"),
    (lambda x, m: BatchAugment(4, p_lighting=-0.1), ValueError, "p_lighting"),
    (lambda x, m: BatchAugment(4, min_zoom=2, max_zoom=1), ValueError, "min_zoom"),
    (lambda x, m: BatchAugment(4, pad_mode="wrap"), ValueError, "pad_mode"),
    (lambda x, m: BatchAugment(4, mean=[0.5], std=[0.0]), ValueError, "non-zero"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call(_images(2, 3, 6, 6), _matrices(2))


def test_kernel_checks_too():
    # the op itself (not only the Python wrapper) rejects bad arguments, with its own messages
    x, m = _images(2, 3, 6, 6), _matrices(2)
    with pytest.raises(RuntimeError, match="pad_mode"):
        torch.ops.fastfuse.augment(x, m, [4, 4], None, None, None, None, "wrap", torch.float32, False)
    with pytest.raises(RuntimeError, match="matrix"):
        torch.ops.fastfuse.augment(x, m[:1], [4, 4], None, None, None, None, "zeros", torch.float32, False)


# ---- BatchAugment -------------------------------------------------------------------------------------
def test_draw_distributions():
    a = BatchAugment(8)
    torch.manual_seed(0)
    n = 20000
    p = a.draw(n)
    se = lambda q: 5 * math.sqrt(q * (1 - q) / n)  # noqa: E731  (5 standard errors of a frequency)

    def frac(mask, q):
        assert abs(mask.float().mean().item() - q) < se(q)

    frac(p["flip"] == -1, 0.5)
    for name, neutral in (("rotate", 0), ("zoom", 1), ("warp_x", 0), ("warp_y", 0)):
        frac(p[name] != neutral, 0.75)
    for name, neutral in (("brightness", 0.5), ("contrast", 1)):
        frac(p[name] != neutral, 0.75)

    def uniform(v, lo, hi):  # the Kolmogorov-Smirnov distance to U(lo, hi), under its 0.1% critical value
        v, _ = ((v.double() - lo) / (hi - lo)).sort()
        ecdf = torch.arange(1, len(v) + 1, dtype=torch.float64) / len(v)
        assert v.min() >= 0 and v.max() <= 1
        assert (ecdf - v).abs().max() < 1.95 / math.sqrt(len(v))

    uniform(p["rotate"][p["rotate"] != 0], -10, 10)
    uniform(p["zoom"][p["zoom"] != 1], 1, 1.1)
    uniform(p["warp_x"][p["warp_x"] != 0], -0.2, 0.2)
    uniform(p["col_pct"], 0, 1)
    uniform(p["row_pct"], 0, 1)
    uniform(p["brightness"][p["brightness"] != 0.5], 0.4, 0.6)
    uniform(p["contrast"][p["contrast"] != 1].log(), math.log(0.8), -math.log(0.8))
    # independent coins: rotation and zoom applied together about p_affine^2 of the time
    frac((p["rotate"] != 0) & (p["zoom"] != 1), 0.75 ** 2)


def test_draw_matches_fastai_matrices():
    fa = pytest.importorskip("fastai.vision.augment")
    a = BatchAugment(8, mult=1.5)
    torch.manual_seed(3)
    B, H, W = 6, 20, 30
    p = a.draw(B, in_size=(H, W))
    x = torch.zeros(B, 3, H, W)
    m = fa.flip_mat(x, p=1.0, draw=((1 - p["flip"]) / 2).tolist())
    m = m @ fa.rotate_mat(x, p=1.0, draw=p["rotate"].tolist())
    m = m @ fa.zoom_mat(x, p=1.0, draw=p["zoom"].tolist(), draw_x=p["col_pct"].tolist(),
                        draw_y=p["row_pct"].tolist())
    grid = fa.affine_grid(fa._prepare_mat(x, m), (B, 3, 5, 7), align_corners=True)
    warp = fa._WarpCoord(magnitude=0.3, p=1.0, draw_x=p["warp_x"].tolist(), draw_y=p["warp_y"].tolist())
    warp.before_call(x)
    want = warp(grid).as_subclass(torch.Tensor)
    uv = F.affine_grid(torch.eye(3)[:2].expand(B, 2, 3), [B, 3, 5, 7], align_corners=True)
    xyw = torch.cat([uv, torch.ones_like(uv[..., :1])], -1).view(B, -1, 3) @ p["matrix"].transpose(1, 2)
    torch.testing.assert_close((xyw[..., :2] / xyw[..., 2:]).view_as(want), want, atol=2e-5, rtol=0)


def test_same_seed_same_params_and_output():
    a = BatchAugment(6, mean=MEAN, std=STD)
    x = _images(3, 3, 9, 9)
    torch.manual_seed(7)
    p1, y1 = a.draw(3, in_size=(9, 9)), None
    torch.manual_seed(7)
    p2 = a.draw(3, in_size=(9, 9))
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    torch.manual_seed(7)
    y1 = a(x)
    torch.manual_seed(7)
    assert torch.equal(y1, a(x))
    want = fastfuse.augment(x, p1["matrix"], 6, brightness=p1["brightness"], contrast=p1["contrast"], mean=MEAN,
                            std=STD)
    assert torch.equal(y1, want)


def test_eval_resizes_and_normalises_only():
    a = BatchAugment(6, mean=MEAN, std=STD).eval()
    x = _images(2, 3, 11, 11)
    y = a(x)
    assert torch.equal(y, a(x))
    want = (F.interpolate(x.float() / 255, size=(6, 6), mode="bilinear", align_corners=True) -
            torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    assert a.state_dict() == {} and "max_rotate=10.0" in repr(a)
