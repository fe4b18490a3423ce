"""The Triton kernels' launch rules: compiled once per dtype and shape class whatever the seed (the RNG words and
the threshold are unspecialised uint32 arguments), a threshold of 1 (p in [2^-16, 2^-15)) works, batch norm's
grouped dropout keys match the C++ kernels on both layouts, and the embedding launcher reads the tables in place
through metadata cached on the device. On CPU through the interpreter (TRITON_INTERPRET=1); the JIT-cache check
needs a GPU."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastfuse
from fastfuse import reference
from conftest import CPP, CPU_BACKENDS, CUDA, bits

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP = "triton" in CPU_BACKENDS
P_THRESHOLD_1 = 1.5 / 65536  # dropout_threshold(p) == 1: the value Triton would make a constexpr


def test_p_gives_threshold_one():
    assert fastfuse._rng.dropout_threshold(P_THRESHOLD_1) == 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_rng_arguments_are_not_specialised():
    """Every kernel taking RNG words declares them uint32 and unspecialised; Triton's own binder then gives the
    same specialisation (so the same compiled kernel) for words 1, 16 and 2^31 + 5. Run without the interpreter,
    in a subprocess: that is how the kernels are compiled on a GPU, and binding needs no GPU."""
    code = textwrap.dedent("""
        import inspect, triton
        from triton.runtime.jit import JITFunction
        from fastfuse.triton_kernels import batch_norm, dropout, embedding_concat_dropout, philox
        kernels = [f for m in (batch_norm, dropout, embedding_concat_dropout) for f in vars(m).values()
                   if isinstance(f, JITFunction) and f.__name__.endswith("_kernel")]  # the launched ones
        assert len(kernels) == 7, [k.__name__ for k in kernels]
        for k in kernels:
            for p in k.params:
                if p.name in philox.RNG_ARGS:
                    assert p.do_not_specialize and p.annotation_type == "u32", (k.__name__, p.name)
        try:
            from triton.runtime.jit import create_function_from_signature
            from triton.backends.compiler import BaseBackend
        except ImportError:  # another Triton: the declarations above are what it reads
            print("declarations only"); raise SystemExit
        import torch
        k, x = dropout.dropout_kernel, torch.zeros(16)
        bind = create_function_from_signature(k.signature, k.params, BaseBackend)
        specs = {str(bind(x, x, 16, w, 1.5, w, w, w, w, BLOCK_GROUPS=128)[1]) for w in (1, 16, 2**31 + 5, 7)}
        assert len(specs) == 1, specs
        print("one specialisation")
    """)
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not INTERP, reason="the Triton interpreter runs CPU tensors only with TRITON_INTERPRET=1")
def test_threshold_one_on_every_kernel():
    p, seed = P_THRESHOLD_1, torch.tensor([8, 0])  # key 0 (a drop: 1 in 65536) at element 928 of this stream
    x = torch.randn(2, 1000)
    with fastfuse.use_backend("triton"):
        y = torch.ops.fastfuse.dropout(x, p, seed)
    want = reference.dropout(x, p, 8, 0)
    assert torch.equal(bits(y), bits(want)) and (y == 0).any()
    # batch norm without a post-ReLU: the backward's reductions read the dropout keys (planes layout)
    xb = torch.randn(2, 3, 20, 21, requires_grad=True)
    outs = []
    for be in ("triton", "cpp") if CPP else ("triton",):
        with fastfuse.use_backend(be):
            torch.manual_seed(0)
            y = fastfuse.batch_norm(xb, None, None, None, None, True, dropout_p=p)
            outs.append((y, *torch.autograd.grad(y, xb, torch.ones_like(y))))
    assert torch.equal(outs[0][0] == 0, outs[-1][0] == 0)
    for a, e in zip(outs[0], outs[-1]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    # embedding_concat_dropout: forward and the backward's mask
    w = [torch.randn(50, 40, requires_grad=True), torch.randn(7, 9, requires_grad=True)]
    x_cat = torch.stack([torch.arange(50) % 50, torch.arange(50) % 7], 1)
    with fastfuse.use_backend("triton"):
        out = torch.ops.fastfuse.embedding_concat_dropout(x_cat, w, p, seed, None, False)
        gw = torch.autograd.grad(out, w, torch.ones_like(out))
    with fastfuse.use_backend("reference"):
        ref = torch.ops.fastfuse.embedding_concat_dropout(x_cat, w, p, seed, None, False)
        gw_ref = torch.autograd.grad(ref, w, torch.ones_like(ref))
    assert torch.equal(bits(out), bits(ref))
    for a, e in zip(gw, gw_ref):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(not (INTERP and CPP), reason="needs the interpreter and the C++ kernels")
@pytest.mark.parametrize("channels_last", [False, True], ids=["planes", "rows"])
def test_batch_norm_grouped_dropout_keys_match_cpp(channels_last):
    """Dropout without a post-ReLU, so every kernel reads the keys: the planes walk (S = 12, planes not aligned to
    groups of 8) and the rows walk (C = 5, runs not aligned) against the C++ kernels."""
    x = torch.randn(3, 5, 4, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b, res = torch.rand(5), torch.randn(5), torch.randn_like(x)
    outs = {}
    for be in ("cpp", "triton"):
        xx, ww, bb, rr = (t.detach().clone().requires_grad_() for t in (x, w, b, res))
        with fastfuse.use_backend(be):
            torch.manual_seed(5)
            y = fastfuse.batch_norm(xx, None, None, ww, bb, True, residual=rr, dropout_p=0.3)
            outs[be] = (y, *torch.autograd.grad(y, (xx, ww, bb, rr), torch.randn_like(y)))
    assert torch.equal(outs["triton"][0] == 0, outs["cpp"][0] == 0)  # no ReLU: zeros are the mask
    for a, e in zip(outs["triton"], outs["cpp"]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERP, reason="the Triton interpreter runs CPU tensors only with TRITON_INTERPRET=1")
def test_embedding_tables_read_in_place_with_cached_metadata():
    from fastfuse.triton_kernels import embedding_concat_dropout as tk
    w = [torch.randn(6, 3), torch.randn(4, 2)]
    x_cat = torch.tensor([[0, 1], [5, 3], [2, 0]])
    tk._META.clear()
    first = tk.forward(x_cat, w, 0.0, 0, 0, None)
    w[0][5].fill_(7.0)  # in place: same address, new values, which the next call must read
    second = tk.forward(x_cat, w, 0.0, 0, 0, None)
    assert len(tk._META) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(second[1, :3], torch.full((3,), 7.0))
    tk.forward(x_cat, [w[0].clone(), w[1]], 0.0, 0, 0, None)  # another table: its own entry
    assert len(tk._META) == 2


def _compiled_variants(fn) -> int:
    """How many kernels a JITFunction has compiled. Triton 3.2+ (3.6 on the GPU machine, 3.8 here) keeps
    device_caches[device] = (kernel_cache, ...); older releases kept cache[device] = kernel_cache."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in fn.cache.values())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_each_kernel_compiles_once_across_seeds():
    """20 calls of every Triton kernel with fresh seeds (forward and backward, batch norm on both layouts without a
    post-ReLU so the reductions read the keys) compile nothing after the first."""
    from triton.runtime.jit import JITFunction
    from fastfuse.triton_kernels import batch_norm, dropout, embedding_concat_dropout
    kernels = [f for m in (batch_norm, dropout, embedding_concat_dropout) for f in vars(m).values()
               if isinstance(f, JITFunction) and f.__name__.endswith("_kernel")]
    dev = "cuda"
    x = torch.randn(8, 16, 14, 14, device=dev, requires_grad=True)
    xl = torch.randn(8, 16, 14, 14, device=dev).to(memory_format=torch.channels_last).requires_grad_()
    w = [torch.randn(100, 8, device=dev, requires_grad=True), torch.randn(10, 4, device=dev, requires_grad=True)]
    x_cat = torch.stack([torch.randint(0, 100, (64,)), torch.randint(0, 10, (64,))], 1).to(dev)

    def step():
        with fastfuse.use_backend("triton"):
            y = fastfuse.dropout(x, 0.3)
            y.sum().backward()
            for t in (x, xl):
                fastfuse.batch_norm(t, None, None, None, None, True, dropout_p=0.2).sum().backward()
            fastfuse.embedding_concat_dropout(x_cat, w, 0.1).sum().backward()

    step()
    first = {k.__name__: _compiled_variants(k) for k in kernels}
    assert sum(first.values()) > 0
    for i in range(20):
        torch.manual_seed(100 + i)  # fresh seeds, as a training loop draws
        step()
    assert {k.__name__: _compiled_variants(k) for k in kernels} == first
