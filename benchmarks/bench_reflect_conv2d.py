"""Reflection-padded conv2d on ResNet-34's 3x3 shapes at batch 16 (stride 1 and the stride-2 entries) and the
7x7 stride-2 stem: fastfuse backends vs eager nn.Conv2d(padding_mode='reflect') ("eager"), the same conv with
zero padding ("zeros", the speed target) and torch.compile of eager ("compile"); fwd and fwd+bwd. Channels_last
(the faster layout on CPU, where the targets are), and the same in NCHW ("reflect_conv2d_nchw", torch's default).
Also ConvLayer (reflect conv -> BN -> ReLU) fwd+bwd against its eager and compiled nn.Sequential twin, and batch-1
inference ("reflect_conv2d_b1": the stride-1 shapes' forward under no_grad, NCHW and channels_last)."""
import torch
from torch import nn

import fastfuse
from fastfuse.bench import Case, cuda_backends

try:  # "fwd+bwd" re-runs a compiled graph's backward on fresh graphs; keep buffers undonated like dropout
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
except (ImportError, AttributeError):
    pass

# (input shape, out channels, kernel, stride)
RESNET34 = [((16, 64, 56, 56), 64, 3, 1), ((16, 128, 28, 28), 128, 3, 1), ((16, 256, 14, 14), 256, 3, 1),
            ((16, 512, 7, 7), 512, 3, 1), ((16, 64, 56, 56), 128, 3, 2), ((16, 128, 28, 28), 256, 3, 2),
            ((16, 256, 14, 14), 512, 3, 2), ((16, 3, 224, 224), 64, 7, 2)]
QUICK = [((2, 16, 20, 20), 16, 3, 1), ((2, 16, 20, 20), 32, 3, 2)]
# --quick on a GPU (.ci/gpu check): the issue's shapes where the pad weighs most (the stem, the 64-channel layers)
QUICK_CUDA = [RESNET34[0], RESNET34[4], RESNET34[7]]
# Batch 1 inference (forward under no_grad, both layouts: NCHW is torch's default), as when a model predicts one
# image at a time (fastai's learn.predict): the fixed costs of every design weigh most there. No targets; no
# torch.compile (one compile per shape and layout, for forward-only rows).
INFER = [((1, 64, 56, 56), 64), ((1, 128, 28, 28), 128), ((1, 256, 14, 14), 256), ((1, 512, 7, 7), 512)]
QUICK_INFER = [((1, 16, 20, 20), 16)]


def _modes(fn, x, params):
    """{"fwd", "fwd+bwd"} callables of fn(x) with gradients for x and params."""
    xr = x.detach().requires_grad_()
    g = []  # made on the first call: building a case must not compile (fastfuse.bench times compile jobs last)

    def fwd():
        return fn(x)

    def fwd_bwd():
        y = fn(xr)
        if not g:
            g.append(torch.randn_like(y))
        return torch.autograd.grad(y, [xr] + params, g[0])

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _ours(backend, weight, stride, padding):
    """fastfuse.reflect_conv2d(t, weight) on this backend."""
    def fn(t):
        with fastfuse.use_backend(backend):
            return fastfuse.reflect_conv2d(t, weight, None, stride, padding)
    return fn


def _conv_case(shape, oc, k, stride, device, dtype, backends, fmt=torch.channels_last):
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
    p = (k - 1) // 2
    # the module in the input's layout, weight included, as model.to(memory_format=torch.channels_last) leaves it
    # (and as the ConvLayer case below): every provider gets this one weight. From an OIHW weight fastfuse's designs
    # re-lay it out per call (~0.6 ms at 512x512x3x3, up to ~10% of a 7x7 forward here; benchmarks/NOTES.md)
    eager = nn.Conv2d(shape[1], oc, k, stride, p, bias=False, padding_mode="reflect").to(
        device, dtype, memory_format=fmt)
    zeros = nn.Conv2d(shape[1], oc, k, stride, p, bias=False).to(device, dtype)
    zeros.weight = eager.weight
    params = [eager.weight]
    provs = {b: _modes(_ours(b, eager.weight, stride, p), x, params) for b in backends}
    provs["eager"] = _modes(eager, x, params)
    provs["zeros"] = _modes(zeros, x, params)
    if fmt == torch.channels_last:  # NCHW: no compile rows (compile converts convolutions to channels_last itself)
        provs["compile"] = _modes(torch.compile(eager), x, params)
    out_numel = shape[0] * oc * (shape[2] // stride) * (shape[3] // stride)
    nbytes = (x.numel() + eager.weight.numel() + out_numel) * x.element_size()
    y = torch.empty_like(x)
    op = "reflect_conv2d" if fmt == torch.channels_last else "reflect_conv2d_nchw"
    return Case(op, shape + (oc, k, stride), dtype, nbytes, 2 * nbytes, provs,
                copy=lambda: y.copy_(x), clone=lambda: x.clone())


def _infer_case(shape, oc, channels_last, device, dtype, backends):
    x = torch.randn(shape, device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # the whole module, as in _conv_case
    eager = nn.Conv2d(shape[1], oc, 3, 1, 1, bias=False, padding_mode="reflect").to(device, dtype, memory_format=fmt)
    zeros = nn.Conv2d(shape[1], oc, 3, 1, 1, bias=False).to(device, dtype)
    zeros.weight = eager.weight

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x)
        return {"fwd": run}

    provs = {b: fwd(_ours(b, eager.weight, 1, 1)) for b in backends}
    provs["eager"], provs["zeros"] = fwd(eager), fwd(zeros)
    nbytes = (x.numel() + eager.weight.numel() + shape[0] * oc * shape[2] * shape[3]) * x.element_size()
    y = torch.empty_like(x)
    return Case("reflect_conv2d_b1", shape + (oc, "cl" if channels_last else "nchw"), dtype, nbytes, 0, provs,
                copy=lambda: y.copy_(x), clone=lambda: x.clone())


def _conv_layer_case(shape, device, dtype):
    ni = shape[1]
    ours = fastfuse.nn.ConvLayer(ni, ni).to(device, dtype).to(memory_format=torch.channels_last)
    twin = nn.Sequential(nn.Conv2d(ni, ni, 3, 1, 1, bias=False, padding_mode="reflect"), nn.BatchNorm2d(ni),
                         nn.ReLU()).to(device, dtype).to(memory_format=torch.channels_last)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    modes = lambda m: {"fwd+bwd": _modes(m, x, list(m.parameters()))["fwd+bwd"]}  # noqa: E731
    provs = {"fastfuse": modes(ours), "eager": modes(twin), "compile": modes(torch.compile(twin))}
    nbytes = 3 * x.numel() * x.element_size()
    y = torch.empty_like(x)
    return Case("reflect_conv2d_layer", shape, dtype, nbytes, 2 * nbytes, provs, copy=lambda: y.copy_(x),
                clone=lambda: x.clone())


def cases(device, quick):
    if device == "cuda":
        dtype = torch.bfloat16
        backends = cuda_backends("cuda", "reference")  # no Triton kernel (retired)
    else:
        dtype = torch.float32  # channels_last: oneDNN's faster layout on this CPU
        backends = [b for b in ("cpp",) if fastfuse.backends()[b]["available"]]
    shapes = (QUICK_CUDA if device == "cuda" else QUICK) if quick else RESNET34
    out = [_conv_case(s, oc, k, st, device, dtype, backends) for s, oc, k, st in shapes]
    if not (quick and device == "cuda"):  # the same in NCHW, torch's default layout (no targets there)
        out += [_conv_case(s, oc, k, st, device, dtype, backends, torch.contiguous_format) for s, oc, k, st in shapes]
    # ConvLayer (the issue's GPU target; on CPU too, as what a fastai model's conv blocks get)
    out += [_conv_layer_case(s, device, dtype) for s, _, k, st in shapes if k == 3 and st == 1]
    out += [_infer_case(s, oc, cl, device, dtype, backends) for s, oc in (QUICK_INFER if quick else INFER)
            for cl in (False, True)]
    return out


def check_targets(rows, device):
    """Print the issue's speed targets against this run (never asserted in tests). CPU: forward and forward+backward
    each at most 1.05x torch's zero-padded conv of the same shape. GPU: at least 1.0x F.pad + cuDNN ("eager"), and
    1.3x where the pad dominates (read here as the 3-channel stem and the 64-channel inputs)."""
    issue_shapes = {"x".join(map(str, s + (oc, k, st))) for s, oc, k, st in RESNET34}  # not --quick's
    ms = {(r["shape"], r["mode"], r["provider"]): r for r in rows
          if r["op"] == "reflect_conv2d" and r["shape"] in issue_shapes}
    for (shape, mode, prov), r in ms.items():
        if prov not in ("cpp", "cuda"):
            continue
        if device == "cpu":
            zeros = ms.get((shape, mode, "zeros"))
            if zeros is None:
                continue
            got = r["ms_p50"] / zeros["ms_p50"]
            print(f"target reflect_conv2d {shape} {prov} {mode} <= 1.05x the zero-padded conv: {got:.2f}x "
                  f"({'met' if got <= 1.05 else 'NOT met'}; {r['speedup_eager'] or 0:.2f}x eager)")
        else:
            want = 1.3 if shape.split("x")[1] in ("3", "64") else 1.0
            got = r["speedup_eager"] or 0.0
            print(f"target reflect_conv2d {shape} {prov} {mode} >= {want}x F.pad + cuDNN: {got:.2f}x "
                  f"({'met' if got >= want else 'NOT met'}; {r['speedup_compile'] or 0:.2f}x compile)")
