"""Bit-identical dropout across backends: C++ CPU == reference == Triton (interpreter) == CUDA."""
import pytest
import torch

import fastfuse
from fastfuse import reference

from conftest import CPU_BACKENDS, CUDA, TRITON, bits

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
