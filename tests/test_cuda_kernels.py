"""The CUDA C++ kernels (csrc/cuda/*.cu) against the C++ CPU kernels and the reference: bit-identical dropout
masks, forward outputs and gradients, odd sizes, misaligned storage offsets, layouts, bad codes, determinism.
Skipped without a GPU (conftest.py); the GPU backends' other tests are in test_backends.py and
test_batch_norm.py (test_gpu_matches_cpu)."""
import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse import reference

from conftest import CPP, CUDA, bits

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CPP, reason="fastfuse._C not built")]

_EMULATED = False  # True in the CPU emulation of the CUDA kernels (tests/cuda_emu/run.py)
SEED = torch.tensor([0x0123456789ABCDEF, 0xFEDCBA98])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 convolutions and matmuls in full precision (cuDNN uses TF32 by default), restored afterwards."""
    if not CUDA:
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
        torch.cuda.synchronize()  # an illegal access in the test surfaces here, in the test that caused it


@contextlib.contextmanager
def _deterministic():
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = old


# ---- dropout ------------------------------------------------------------------------------------------
def _drop(x, p=0.37, seed=SEED):
    with fastfuse.use_backend("cuda"):
        return torch.ops.fastfuse.dropout(x, p, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4095, 4097, 100_003])
@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_dropout_odd_sizes_and_misaligned_offsets(dtype, n, start):
    # start > 0: data_ptr not 4-element aligned, so the kernel must take its scalar path
    buf = torch.randn(n + start, dtype=dtype, device="cuda")
    x = buf[start:]
    got = _drop(x).cpu()
    assert torch.equal(bits(got), bits(reference.dropout(x.cpu(), 0.37, *SEED.tolist())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_dense_non_contiguous_layouts(dtype):
    # the mask follows memory order: channels_last and a permuted dense tensor keep their strides
    for x in (torch.randn(3, 5, 7, 9, dtype=dtype, device="cuda").to(memory_format=torch.channels_last),
              torch.randn(6, 5, 4, dtype=dtype, device="cuda").permute(2, 0, 1)):
        y = _drop(x)
        assert y.stride() == x.stride()
        assert torch.equal(bits(y.cpu()), bits(reference.dropout(x.cpu(), 0.37, *SEED.tolist())))
    x = torch.randn(8, 10, dtype=dtype, device="cuda")[:, 1:7]  # not dense: a contiguous copy, as torch does
    assert torch.equal(bits(_drop(x).cpu()), bits(reference.dropout(x.cpu().contiguous(), 0.37, *SEED.tolist())))


def test_dropout_autograd_and_edge_cases():
    x = torch.randn(1001, device="cuda", requires_grad=True)
    with fastfuse.use_backend("cuda"):
        y = torch.ops.fastfuse.dropout(x, 0.25, SEED)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert _drop(torch.empty(0, device="cuda")).shape == (0,)
        assert torch.equal(fastfuse.dropout(x.detach(), 1.0), x.detach() * 0)
    assert torch.equal(gx.cpu(), reference.dropout(torch.ones(1001), 0.25, *SEED.tolist()))


def test_dropout_on_a_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(999, device="cuda:1")
    assert torch.equal(_drop(x).cpu(), reference.dropout(x.cpu(), 0.37, *SEED.tolist()))


def _keys_at(i0, n, seed, offset):
    """reference.dropout_keys for elements i0 .. i0+n-1 (i0 a multiple of 8), without the elements before."""
    g = torch.arange(i0 // 8, (i0 + n + 7) // 8, dtype=torch.int64)
    m = 0xFFFFFFFF
    w = reference.philox4x32_10(g & m, g >> 32, torch.full_like(g, offset & m), torch.full_like(g, offset >> 32),
                                seed & m, seed >> 32)
    words = torch.stack(w, 1)  # (groups, 4)
    keys = torch.stack([(words >> 16 * h) & 0xFFFF for h in (0, 1)], 2).reshape(-1)  # low half first
    return keys[:n]


def test_dropout_past_2_pow_31_elements():
    # 64-bit indexing: elements beyond 2^31 get their own keys (4.3 GB in, 4.3 GB out in fp16)
    n = (1 << 31) + 8 * 5 + 3
    if torch.cuda.get_device_properties(0).total_memory < 3 * 2 * n:
        pytest.skip("needs ~13 GB of GPU memory")
    x = torch.ones(n, dtype=torch.float16, device="cuda")
    y = _drop(x, 0.5)
    del x
    tail = 8 * 9 + 3
    i0 = n - tail
    got = y[i0:].cpu()
    keep = _keys_at(i0, tail, *SEED.tolist()) >= 32768
    assert torch.equal(got != 0, keep)
    assert torch.equal(y[:64].cpu() != 0, reference.dropout_keys(64, *SEED.tolist()) >= 32768)


# ---- embedding_concat_dropout -------------------------------------------------------------------------
ecd = torch.ops.fastfuse.embedding_concat_dropout
ecd_bwd = torch.ops.fastfuse.embedding_concat_dropout_backward
TABLES = [(7, 3), (1, 5), (13, 4), (2, 1), (3, 6), (40, 17)]


def _ecd_data(B, C, dtype, tables=TABLES):
    ws = [torch.randn(n, d, dtype=dtype) for n, d in tables]
    x = torch.stack([torch.randint(0, n, (B,)) for n, _ in tables], 1)
    return x, ws, torch.randn(B, C, dtype=dtype)


def _to(a, dev):
    if isinstance(a, torch.Tensor):
        return a.to(dev)
    return [w.to(dev) for w in a] if isinstance(a, list) else a


def _both(fn, *args):
    """fn's result with the cpp backend on CPU tensors and with the cuda backend on their CUDA copies."""
    out = []
    for dev, be in (("cpu", "cpp"), ("cuda", "cuda")):
        with fastfuse.use_backend(be):
            out.append(fn(*[_to(a, dev) for a in args]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,p", [(1, 0, 0.37), (37, 3, 0.37), (37, 3, 0.0), (513, 0, 0.5)])
def test_ecd_forward_bit_identical_to_cpu(dtype, B, C, p):
    x, ws, xc = _ecd_data(B, C, dtype)
    cont = xc if C else None
    cpu, gpu = _both(lambda x, ws, c: ecd(x, ws, p, SEED, c, True), x, ws, cont)
    assert torch.equal(bits(gpu.cpu()), bits(cpu))
    assert torch.equal(bits(cpu), bits(reference.embedding_concat_dropout(x, ws, p, *SEED.tolist(), cont=cont)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 37, 4096])
def test_ecd_backward_matches_cpu_and_is_deterministic(dtype, B):
    x, ws, _ = _ecd_data(B, 2, dtype)
    g = torch.randn(B, sum(d for _, d in TABLES) + 2, dtype=dtype)
    cpu, gpu = _both(lambda g, x, ws: ecd_bwd(g, x, ws, 0.37, SEED), g, x, ws)
    with fastfuse.use_backend("cuda"):
        again = ecd_bwd(g.cuda(), x.cuda(), [w.cuda() for w in ws], 0.37, SEED)
    # sums of up to 4096 rows in another order (CPU: row by row; CUDA: chunks of 32, then the chunks)
    tol = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
           torch.float32: dict(rtol=1e-4, atol=2e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]
    for a, b, c in zip(gpu, cpu, again):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, **tol)
        assert torch.equal(bits(a), bits(c))  # the same bits run to run: no atomics


def test_ecd_hot_rows_exact():
    # a 3-row table hit by 4096 rows: long segments cut into many chunks
    x = torch.randint(0, 3, (4096, 1))
    w, g = torch.randn(3, 8), torch.randn(4096, 8)
    with fastfuse.use_backend("cuda"):
        a = ecd_bwd(g.cuda(), x.cuda(), [w.cuda()], 0.2, SEED)[0].cpu()
    keep = reference.embedding_concat_keep_mask(4096, 8, 0.2, *SEED.tolist())
    gd = torch.where(keep, g.double() / 0.8, torch.zeros((), dtype=torch.float64))
    exact = torch.zeros(3, 8, dtype=torch.float64).index_add_(0, x[:, 0], gd)
    torch.testing.assert_close(a.double(), exact, rtol=1e-5, atol=1e-4)


def test_ecd_autograd_through_the_public_function():
    x, ws, xc = _ecd_data(64, 4, torch.float32)
    outs = []
    for dev, be in (("cpu", "cpp"), ("cuda", "cuda")):
        wr = [w.to(dev).requires_grad_() for w in ws]
        xcr = xc.to(dev).requires_grad_()
        torch.manual_seed(11)
        with fastfuse.use_backend(be):
            y = fastfuse.embedding_concat_dropout(x.to(dev), wr, 0.3, True, xcr, None)
            grads = torch.autograd.grad(y, wr + [xcr], torch.ones_like(y))
        outs.append([y.cpu()] + [t.cpu() for t in grads])
    assert torch.equal(outs[1][0], outs[0][0])  # same seed drawn, same mask
    for a, b in zip(outs[1][1:], outs[0][1:]):
        torch.testing.assert_close(a, b)


_BAD_CODE_CHILD = """
import torch, fastfuse
ws = [torch.randn(n, d, device='cuda') for n, d in [(7, 3), (1, 5), (13, 4), (2, 1)]]
x = torch.zeros(10, 4, dtype=torch.long, device='cuda')
x[4, 2] = {bad}
with fastfuse.use_backend('cuda'):
    fastfuse.embedding_concat_dropout(x, ws, 0.1)
torch.cuda.synchronize()
"""


def test_ecd_bad_codes_on_cuda():
    x, ws, _ = _ecd_data(10, 0, torch.float32, TABLES[:4])
    ws = [w.cuda() for w in ws]
    for bad in (13, -1):
        # check_index on CUDA: a device-side assert with no host sync, fatal to the CUDA context (as torch's
        # nn.Embedding), so on a GPU it runs in a child process; the emulation raises it in the op
        if _EMULATED:
            xb = x.clone()
            xb[4, 2] = bad
            with fastfuse.use_backend("cuda"), pytest.raises(RuntimeError,
                                                             match=f"device-side assert.*column 2 has code {bad} "):
                fastfuse.embedding_concat_dropout(xb.cuda(), ws, 0.1)
        else:
            r = subprocess.run([sys.executable, "-c", _BAD_CODE_CHILD.format(bad=bad)], capture_output=True,
                               text=True, timeout=300)
            assert r.returncode != 0
            assert f"column 2 has code {bad} (row 4), outside [0, 13)" in r.stdout + r.stderr
            assert "device-side assert" in r.stderr
    # unchecked: zero rows and no gradient for bad codes, nothing read out of bounds (the fixture synchronizes)
    xb = x.clone()
    xb[4, 2], xb[7, 0] = 10**12, -(10**12)
    wr = [w.clone().requires_grad_() for w in ws]
    with fastfuse.use_backend("cuda"):
        y = fastfuse.embedding_concat_dropout(xb.cuda(), wr, 0.0, check_index=False)
        y.sum().backward()
    torch.cuda.synchronize()
    assert torch.equal(y[4, 8:12].cpu(), torch.zeros(4)) and torch.equal(y[7, 0:3].cpu(), torch.zeros(3))
    valid = lambda t, n: int(((xb[:, t] >= 0) & (xb[:, t] < n)).sum())  # noqa: E731
    assert torch.equal(wr[2].grad.sum(0).cpu(), torch.ones(4) * valid(2, 13))
    assert torch.equal(wr[0].grad.sum(0).cpu(), torch.ones(3) * valid(0, 7))


def test_ecd_more_tables_than_one_launch_takes():
    # 70 tables: two groups of tables (64 + 6), each with its own launches; one zero-width table
    tables = [(3 + t % 5, 1 + t % 3) for t in range(70)]
    tables[65] = (4, 0)
    x, ws, xc = _ecd_data(19, 2, torch.float32, tables)
    cpu, gpu = _both(lambda x, ws, c: ecd(x, ws, 0.4, SEED, c, True), x, ws, xc)
    assert torch.equal(bits(gpu.cpu()), bits(cpu))
    g = torch.randn(19, sum(d for _, d in tables) + 2)
    cpu, gpu = _both(lambda g, x, ws: ecd_bwd(g, x, ws, 0.4, SEED), g, x, ws)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_ecd_empty_and_zero_width():
    for B, tables in ((0, TABLES[:2]), (5, [(4, 0), (3, 0)]), (5, [(4, 0), (3, 2)])):
        x, ws, _ = _ecd_data(B, 0, torch.float32, tables)
        cpu, gpu = _both(lambda x, ws: ecd(x, ws, 0.3, SEED, None, True), x, ws)
        assert torch.equal(gpu.cpu(), cpu)
        g = torch.randn(B, sum(d for _, d in tables))
        cpu, gpu = _both(lambda g, x, ws: ecd_bwd(g, x, ws, 0.3, SEED), g, x, ws)
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b)


# ---- batch_norm ---------------------------------------------------------------------------------------
def _misaligned(t):
    """t's values in a tensor whose data starts one element into its storage."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


def _bn_both(x, training=True, misalign=False, **kw):
    C = x.shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    go = torch.randn(x.shape).to(x.dtype)
    outs = []
    for dev, be in (("cpu", "cpp"), ("cuda", "cuda")):
        xx = (_misaligned(x.to(dev)) if misalign else x.to(dev)).detach().requires_grad_()
        ww, bb = w.to(dev).requires_grad_(), b.to(dev).requires_grad_()
        rm, rv = torch.full((C,), 0.2, device=dev), torch.full((C,), 1.5, device=dev)
        res = kw.get("residual")
        extra = dict(kw, residual=(_misaligned(res.to(dev)) if misalign else res.to(dev)) if res is not None else None)
        with fastfuse.use_backend(be):
            torch.manual_seed(3)
            y = fastfuse.batch_norm(xx, rm, rv, ww, bb, training, **extra)
            grads = torch.autograd.grad(y, (xx, ww, bb), go.to(dev))
        outs.append([t.cpu().float() for t in (y, *grads, rm, rv)])
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,cl", [((64, 3, 2, 2), False), ((5, 3, 2, 2), True), ((33, 2000), False),
                                      ((2, 7, 300), False), ((3, 1, 5, 5), False), ((200, 5, 1, 1), True),
                                      ((5, 3, 4, 4), False), ((3, 16, 3, 3), True)])
@pytest.mark.parametrize("training", [True, False])
def test_bn_shapes_layouts_modes(dtype, shape, cl, training):
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if cl:
        x = x.to(memory_format=torch.channels_last)
    gpu_cpu = _bn_both(x, training, pre_act="relu", post_act="relu", dropout_p=0.3)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-3, atol=5e-3)
    for a, e in zip(gpu_cpu[1], gpu_cpu[0]):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (6, 4, 4, 4)])  # planes of 25 (any walk) and 16 (8-element units)
def test_bn_misaligned_input_and_residual(shape):
    x, res = torch.randn(shape), torch.randn(shape)
    gpu_cpu = _bn_both(x, True, misalign=True, residual=res, dropout_p=0.2)
    for a, e in zip(gpu_cpu[1], gpu_cpu[0]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape,cl", [((3, 5, 75, 75), False), ((2, 4, 96, 96), False), ((2, 24, 40, 40), True)])
def test_bn_grid_stride_walk(shape, cl):
    """Over 65536 elements, so that a thread's cursor (plane position, channel) steps past its first unit in every
    walk (any, planes of 8-element units, rows of 8 channels) on the emulation's one-SM grid as well."""
    x = torch.randn(shape) + 0.5
    res = torch.randn(shape)
    if cl:
        x, res = x.to(memory_format=torch.channels_last), res.to(memory_format=torch.channels_last)
    gpu_cpu = _bn_both(x, True, residual=res, post_act="relu", dropout_p=0.2)
    for a, e in zip(gpu_cpu[1], gpu_cpu[0]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_running_stats_on_the_device(momentum, dtype):
    """The forward's finalize kernel updates running_mean, running_var and num_batches_tracked (bf16 buffers: a
    module cast with .to(bfloat16)) as torch's _BatchNorm does, over two steps."""
    x = torch.randn(6, 8, 3, 3) * 3 + 1
    got = []
    for dev, be in (("cpu", "cpp"), ("cuda", "cuda")):
        rm, rv = torch.zeros(8, dtype=dtype, device=dev), torch.ones(8, dtype=dtype, device=dev)
        nbt = torch.tensor(2, device=dev)
        with fastfuse.use_backend(be):
            for _ in range(2):
                fastfuse.batch_norm(x.to(dev), rm, rv, None, None, True, momentum, num_batches_tracked=nbt)
        got.append([rm.cpu().float(), rv.cpu().float(), nbt.cpu()])
    assert got[1][2].item() == 4
    for a, e in zip(got[1], got[0]):
        torch.testing.assert_close(a, e, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_bn_primitives_match_cpu():
    """fastfuse_C's batch-norm primitives (SyncBatchNorm's building blocks) on CUDA against the CPU's. (The CPU
    emulation registers no CUDA kernels for them: there both sides run on the CPU.)"""
    torch.manual_seed(0)
    x, go = torch.randn(4, 6, 5, 5) + 1, torch.randn(4, 6, 5, 5)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    P = torch.ops.fastfuse_C
    res = []
    for dev, _ in (("cpu", "cpp"), ("cuda", "cuda")):
        xx, gg = x.to(dev), go.to(dev)
        mean, var = P.bn_stats(xx, True)
        scale = torch.rsqrt(var + 1e-5) * w.to(dev)
        y = P.bn_apply(xx, mean, scale, b.to(dev), None, True, True, 0.3, *SEED.tolist())
        sg, sgx = P.bn_grad_reduce(gg, xx, y, mean, True, True, 0.3, *SEED.tolist())
        k2, k3 = -scale * sgx / (var + 1e-5) / 100, -scale * sg / 100
        gi, g = P.bn_grad_apply(gg, xx, y, mean, scale, k2, k3, True, True, 0.3, *SEED.tolist(), True, True)
        res.append([t.cpu() for t in (mean, var, y, sg, sgx, gi, g)])
    for a, e in zip(res[1], res[0]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_bn_deterministic():
    x, go = torch.randn(64, 32, 9, 9, device="cuda"), torch.randn(64, 32, 9, 9, device="cuda")
    runs = []
    for _ in range(2):
        xx = x.detach().requires_grad_()
        w = torch.ones(32, device="cuda", requires_grad=True)
        with fastfuse.use_backend("cuda"):
            torch.manual_seed(0)
            y = fastfuse.batch_norm(xx, None, None, w, None, True, dropout_p=0.1)
            runs.append([y, *torch.autograd.grad(y, (xx, w), go)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # fixed-order reductions: the same bits every run


# ---- reflect_conv2d -----------------------------------------------------------------------------------
# (N, C, H, W, OC, kernel, stride, padding, dilation, groups, bias)
CONV_CONFIGS = [
    (2, 4, 7, 8, 6, 3, 1, 1, 1, 1, True),
    (2, 3, 5, 7, 4, 1, 1, 1, 1, 1, True),
    (2, 4, 8, 8, 4, 3, 2, 1, 1, 4, True),
    (2, 4, 7, 7, 6, 5, 1, 2, 2, 2, False),
    (1, 3, 9, 8, 5, 7, 2, 3, 1, 1, True),
    (2, 4, 3, 3, 4, 3, 1, 2, 1, 1, True),
    (2, 4, 6, 9, 4, (3, 5), (1, 2), (1, 2), (2, 1), 1, True),
    (3, 64, 14, 14, 32, 3, 1, 1, 1, 1, True),
]


def _conv_both(cfg, dtype, channels_last, algo, monkeypatch, slice_input=False):
    N, C, H, W, OC, k, s, p, d, g, bias = cfg
    m = nn.Conv2d(C, OC, k, s, p, d, g, bias, padding_mode="reflect").to(dtype)
    x = torch.randn(N, C, H, W + (1 if slice_input else 0), dtype=dtype)
    res = []
    if algo:
        monkeypatch.setenv("FASTFUSE_REFLECT_CONV2D_ALGO", algo)
    for dev, be in (("cuda", "cuda"), ("cuda", None)):
        xx = x.to(dev)
        if channels_last:
            xx = xx.to(memory_format=torch.channels_last)
        if slice_input:
            xx = xx[..., 1:]  # non-contiguous, storage offset 1
        xx = xx.detach().requires_grad_()
        w = m.weight.detach().to(dev).requires_grad_()
        b = m.bias.detach().to(dev).requires_grad_() if bias else None
        if be:
            with fastfuse.use_backend(be):
                y = fastfuse.reflect_conv2d(xx, w, b, m.stride, m.padding, m.dilation, m.groups)
        else:
            y = m._conv_forward(xx, w, b)  # nn.Conv2d's own reflect path
        torch.manual_seed(1)
        go = torch.randn_like(y)
        grads = torch.autograd.grad(y, [t for t in (xx, w, b) if t is not None], go)
        res.append((y, grads))
    return res


@pytest.mark.parametrize("algo", ["frame"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("i", range(len(CONV_CONFIGS)))
def test_reflect_conv2d_matches_torch_on_cuda(i, channels_last, algo, monkeypatch):
    (y, grads), (y_ref, grads_ref) = _conv_both(CONV_CONFIGS[i], torch.float32, channels_last, algo, monkeypatch)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reflect_conv2d_dtypes_and_sliced_input(dtype, monkeypatch):
    tol = {torch.float16: dict(rtol=1e-2, atol=2e-2), torch.bfloat16: dict(rtol=4e-2, atol=8e-2),
           torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]
    for cfg in (CONV_CONFIGS[0], CONV_CONFIGS[2], CONV_CONFIGS[4]):
        (y, grads), (y_ref, grads_ref) = _conv_both(cfg, dtype, False, None, monkeypatch, slice_input=True)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y_ref.double(), **tol)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a.double(), b.double(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reflect_conv2d_frame_rounded_twice(dtype):
    """The frame pixels are rounded twice in bf16/fp16 (cuDNN's zero-padded output a, then a + correction): error
    <= u(|a| + |y|) against the exact y, where one rounding gives u|y| (u = 2^-8 bf16, 2^-11 fp16); a factor 2
    for the fp32 accumulations, plus a small absolute term."""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    x = torch.randn(2, 16, 9, 10).to(dtype)
    w = (torch.randn(8, 16, 3, 3) / 12).to(dtype)
    with fastfuse.use_backend("cuda"):
        y = fastfuse.reflect_conv2d(x.cuda(), w.cuda(), None, 1, 1).cpu().double()
    exact = F.conv2d(F.pad(x.double(), (1, 1, 1, 1), mode="reflect"), w.double())
    a = F.conv2d(x.double(), w.double(), padding=1)  # what zero padding gives
    frame = torch.ones_like(exact, dtype=torch.bool)
    frame[..., 1:-1, 1:-1] = False
    err = (y - exact).abs()
    assert (err[frame] <= 2 * u * (a.abs() + exact.abs())[frame] + 1e-3).all()
    assert (err[~frame] <= 2 * u * exact.abs()[~frame] + 1e-3).all()  # the interior: cuDNN's, rounded once


def test_reflect_conv2d_gradients_deterministic():
    x = torch.randn(4, 16, 12, 12, device="cuda", requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    go = torch.randn(4, 16, 12, 12, device="cuda")
    runs = []
    with _deterministic(), fastfuse.use_backend("cuda"):
        for _ in range(2):
            y = fastfuse.reflect_conv2d(x, w, None, 1, 1)
            runs.append(torch.autograd.grad(y, (x, w), go))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- a whole model ------------------------------------------------------------------------------------
def test_tabular_model_training_step_matches_cpu():
    """TabularModel (embedding_concat_dropout, batch norm with ReLU and dropout) on the cuda backend against the
    same model on the C++ CPU kernels: the same seeds draw the same masks, so loss and gradients agree."""
    import copy

    from fastfuse.models import TabularModel

    emb_szs = [(5, 3), (2, 2), (11, 4), (300, 9)]
    model = TabularModel(emb_szs, 2, 1, [16, 8], ps=[0.1, 0.2], embed_p=0.1, y_range=(0, 3))
    x = torch.stack([torch.randint(0, n, (64,)) for n, _ in emb_szs], 1)
    c, y = torch.randn(64, 2), torch.rand(64, 1) * 3
    runs = []
    for dev, be in (("cpu", "cpp"), ("cuda", "cuda")):
        m = copy.deepcopy(model).to(dev)
        torch.manual_seed(7)
        with fastfuse.use_backend(be):
            loss = F.mse_loss(m(x.to(dev), c.to(dev)), y.to(dev))
            loss.backward()
        runs.append((loss.detach().cpu(), {k: p.grad.cpu() for k, p in m.named_parameters()},
                     {k: b.cpu() for k, b in m.named_buffers()}))
    (l0, g0, b0), (l1, g1, b1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in b0:
        torch.testing.assert_close(b1[k], b0[k], msg=k)


# ---- no host synchronisation; CUDA graphs ------------------------------------------------------------------
@contextlib.contextmanager
def _sync_debug_error():
    """Any host sync raises (torch.cuda.set_sync_debug_mode("error")). The CPU emulation makes the same check
    inside every emulated op instead (tests/cuda_emu/emu_patch.py), so there this is a no-op."""
    if _EMULATED:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def _sync_case(name):
    """The leaves that need gradients, and a call of the op `name` through its public function."""
    if name == "dropout":
        x = torch.randn(1001, device="cuda", requires_grad=True)
        return [x], lambda: fastfuse.dropout(x, 0.3)
    if name == "batch_norm":
        x, res = (torch.randn(8, 4, 5, 5, device="cuda", requires_grad=True) for _ in range(2))
        w, b = torch.rand(4, device="cuda", requires_grad=True), torch.randn(4, device="cuda", requires_grad=True)
        rm, rv = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
        return [x, res, w, b], lambda: fastfuse.batch_norm(x, rm, rv, w, b, True, pre_act="relu", residual=res,
                                                           post_act="relu", dropout_p=0.2)
    if name == "reflect_conv2d":
        x = torch.randn(2, 4, 7, 8, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
        w, b = torch.randn(6, 4, 3, 3, device="cuda", requires_grad=True), torch.randn(6, device="cuda",
                                                                                        requires_grad=True)
        return [x, w, b], lambda: fastfuse.reflect_conv2d(x, w, b, 1, 1)
    if name == "embedding_concat_dropout":
        x, ws, xc = _ecd_data(37, 3, torch.float32)
        x, xc = x.cuda(), xc.cuda().requires_grad_()
        ws = [w.cuda().requires_grad_() for w in ws]
        bn = nn.BatchNorm1d(3).cuda()
        return ws + [xc], lambda: fastfuse.embedding_concat_dropout(x, ws, 0.3, True, xc, bn)
    assert name == "lin_bn_drop"
    x, w = torch.randn(16, 8, device="cuda", requires_grad=True), torch.randn(6, 8, device="cuda", requires_grad=True)
    bw, bb = torch.rand(6, device="cuda", requires_grad=True), torch.randn(6, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(6, device="cuda"), torch.ones(6, device="cuda")
    return [x, w, bw, bb], lambda: fastfuse.lin_bn_drop(x, w, rm, rv, bw, bb, True, pre_act="relu", dropout_p=0.2)


@pytest.mark.parametrize("name", ["dropout", "batch_norm", "reflect_conv2d", "embedding_concat_dropout",
                                  "lin_bn_drop"])
def test_no_host_sync_forward_and_backward(name):
    leaves, run = _sync_case(name)
    with fastfuse.use_backend("cuda"):
        run()  # once before: first calls may initialise cuDNN / cuBLAS handles
        with _sync_debug_error():
            y = run()
            grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert len(grads) == len(leaves)


def _graph_step_matches_eager(model, inputs, target):
    """One SGD step of `model` (no dropout: nothing random) captured in a CUDA graph and replayed twice; before
    each replay the same step runs eagerly on a copy of the model, and the replay must give its loss, parameters
    and buffers."""
    import copy

    def step(m, opt):
        opt.zero_grad(set_to_none=False)  # the graph's gradients stay the same tensors
        loss = F.mse_loss(m(*inputs), target)
        loss.backward()
        opt.step()
        return loss

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with fastfuse.use_backend("cuda"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks: allocations, cuDNN/cuBLAS choices
            for _ in range(3):
                step(model, opt)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step(model, opt)
        for _ in range(2):
            ref = copy.deepcopy(model)
            ref_loss = step(ref, torch.optim.SGD(ref.parameters(), lr=0.05))
            graph.replay()
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
            for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(_EMULATED, reason="CUDA graphs need a GPU")
def test_cuda_graph_tabular_model_step():
    from fastfuse.models import TabularModel

    emb_szs = [(5, 3), (2, 2), (11, 4), (300, 9)]
    model = TabularModel(emb_szs, 2, 1, [16, 8], ps=[0.0, 0.0], embed_p=0.0, y_range=(0, 3)).cuda()
    x = torch.stack([torch.randint(0, n, (64,)) for n, _ in emb_szs], 1).cuda()
    _graph_step_matches_eager(model, (x, torch.randn(64, 2).cuda()), (torch.rand(64, 1) * 3).cuda())


class _XResBlock(nn.Module):
    """xresnet's basic block with reflection padding: conv-bn-relu, conv-bn, + identity, relu."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = fastfuse.nn.ReflectConv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = fastfuse.nn.BatchNorm2d(c)
        self.conv2 = fastfuse.nn.ReflectConv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = fastfuse.nn.BatchNorm2d(c)

    def forward(self, x):
        h = self.bn1(self.conv1(x), post_act="relu")
        return self.bn2(self.conv2(h), residual=x, post_act="relu")


@pytest.mark.skipif(_EMULATED, reason="CUDA graphs need a GPU")
def test_cuda_graph_xresnet_block_step():
    model = _XResBlock(16).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 12, 12).cuda().to(memory_format=torch.channels_last)
    _graph_step_matches_eager(model, (x,), torch.randn(8, 16, 12, 12).cuda())


@pytest.mark.skipif(not _EMULATED, reason="checks the CPU emulation's host-sync detection")
def test_emulation_catches_host_syncs():
    import emu_patch
    import run

    # a device argument of .to(...) in a .cu file goes through emu::to_arg, which raises for a device
    assert "t.to(emu::to_arg(x.device()), true)" in run.transform("t.to(x.device(), true); k<<<1, 1>>>(t);")
    assert ".to(emu::to_arg(c10::DeviceType::CPU))" in run.transform("t.cpu(); k<<<1, 1>>>(t);")
    # an op whose own code reads device data on the host fails; one that does not passes
    lib = torch.library.Library("fastfuse_emu", "FRAGMENT")
    for name, fn in (("selftest_nonzero", lambda x: x.nonzero()), ("selftest_item", lambda x: x * x.sum().item()),
                     ("selftest_ok", lambda x: x * 2)):
        lib.define(f"{name}(Tensor x) -> Tensor")
        lib.impl(name, fn, "CPU")
    for name in ("selftest_nonzero", "selftest_item"):
        with emu_patch._NoHostSync(name), pytest.raises(emu_patch.HostSyncError, match="reads device data"):
            getattr(torch.ops.fastfuse_emu, name)(torch.ones(3))
    with emu_patch._NoHostSync("selftest_ok"):
        torch.ops.fastfuse_emu.selftest_ok(torch.ones(3))


# ---- augment ------------------------------------------------------------------------------------------
# Here (not only in test_augment.py) so that tests/cuda_emu/run.py, which runs this file, checks the CUDA kernel.
def _aug_inputs(B, channels_last):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (B, 3, 6, 7), dtype=torch.uint8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    th = torch.rand(B, generator=g) - 0.5
    m = torch.zeros(B, 3, 3)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = th.cos() * 1.3, th.sin(), -th.sin(), th.cos() * 0.8
    m[:, 0, 2], m[:, 1, 2], m[:, 2, 2] = 0.3, -0.4, 1
    m[:, 2, 0], m[:, 2, 1] = 0.1, -0.05  # perspective
    return x, m, torch.rand(B, generator=g) * 0.4 + 0.3, torch.rand(B, generator=g) + 0.5


@pytest.mark.parametrize("pad_mode", ["reflection", "zeros", "border"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_augment_matches_cpu(pad_mode, channels_last, out_dtype):
    x, m, br, con = _aug_inputs(2, channels_last)
    kw = dict(mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], pad_mode=pad_mode, out_dtype=out_dtype,
              memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    cpu = fastfuse.augment(x, m, (5, 4), **kw)
    with fastfuse.use_backend("cuda"):
        gpu = fastfuse.augment(x.cuda(), m.cuda(), (5, 4), **kw)
    assert gpu.is_contiguous(memory_format=kw["memory_format"])
    assert torch.equal(bits(gpu.cpu()), bits(cpu))  # the same coordinates, weights and blend, rounded as written
    cpu = fastfuse.augment(x, m, (5, 4), brightness=br, contrast=con, **kw)
    with fastfuse.use_backend("cuda"):
        gpu = fastfuse.augment(x.cuda(), m.cuda(), (5, 4), brightness=br.cuda(), contrast=con.cuda(), **kw)
    tol = dict(atol=2e-5, rtol=0) if out_dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)  # lighting: logf/expf against the CPU kernel's own
