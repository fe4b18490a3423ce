"""Batch norm, training mode: fastfuse vs torch eager (native / cuDNN) vs torch.compile, fwd / bwd / fwd+bwd.

Cases: BatchNorm2d on (64, 64, 56, 56) in NCHW and channels_last, and the ReLU -> BatchNorm1d -> Dropout
epilogue of a fastai LinBnDrop(lin_first=True) block at (512, 1000). Bytes are the memory-traffic floor:
forward reads x twice (statistics, then normalise) and writes y once; backward reads grad and x twice
(sums, then the gradient) and writes grad_input once."""
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse.bench import Case, allow_retained_graphs, autograd_modes, cuda_backends

allow_retained_graphs()
P = 0.1  # LinBnDrop's dropout
# targets from the issues (cpu): fwd+bwd speedup vs eager, per case and shape
TARGETS = {("bn2d", "64x64x56x56", "cpu"): 3.0, ("bn2d_cl", "64x64x56x56", "cpu"): 3.0,
           ("bn1d_small", "64x1000", "cpu"): 1.0}


def _bn2d_case(shape, dtype, channels_last, device, backends):
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    C = shape[1]
    eager_bn = torch.nn.BatchNorm2d(C, device=device)
    provs = {}
    for b in backends:
        ff_bn = fastfuse.nn.BatchNorm2d(C, device=device)

        def run(t, ff_bn=ff_bn, b=b):
            with fastfuse.use_backend(b):
                return ff_bn(t)
        provs[b] = autograd_modes(run, x, g)
    provs["eager"] = autograd_modes(eager_bn, x, g)
    provs["compile"] = autograd_modes(torch.compile(torch.nn.BatchNorm2d(C, device=device)), x, g)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    name = "bn2d_cl" if channels_last else "bn2d"
    return Case(name, shape, dtype, 3 * nbytes, 5 * nbytes, provs, copy=lambda: y.copy_(x), clone=lambda: x.clone())


def _bn1d_case(shape, dtype, device, backends):
    """A BatchNorm1d module at a small shape: the per-call cost of the module against torch's."""
    x = torch.randn(shape, device=device, dtype=dtype)
    g = torch.randn_like(x)
    provs = {b: autograd_modes(fastfuse.nn.BatchNorm1d(shape[1], device=device), x, g) for b in backends}
    provs["eager"] = autograd_modes(torch.nn.BatchNorm1d(shape[1], device=device), x, g)
    provs["compile"] = autograd_modes(torch.compile(torch.nn.BatchNorm1d(shape[1], device=device)), x, g)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    return Case("bn1d_small", shape, dtype, 3 * nbytes, 5 * nbytes, provs, copy=lambda: y.copy_(x),
                clone=lambda: x.clone())


def _epilogue_case(shape, dtype, device, backends):
    """ReLU -> BatchNorm1d -> Dropout, as in LinBnDrop(lin_first=True) after its Linear."""
    x = torch.randn(shape, device=device, dtype=dtype)
    g = torch.randn_like(x)
    C = shape[1]
    provs = {}
    for b in backends:
        bn = fastfuse.nn.BatchNorm1d(C, device=device)

        def run(t, bn=bn, b=b):
            with fastfuse.use_backend(b):
                return bn(t, pre_act="relu", dropout_p=P)
        provs[b] = autograd_modes(run, x, g)
    eager_bn = torch.nn.BatchNorm1d(C, device=device)
    eager = lambda t: F.dropout(eager_bn(F.relu(t)), P)  # noqa: E731
    provs["eager"] = autograd_modes(eager, x, g)
    compile_bn = torch.nn.BatchNorm1d(C, device=device)
    provs["compile"] = autograd_modes(torch.compile(lambda t: F.dropout(compile_bn(F.relu(t)), P)), x, g)
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    return Case("relu_bn_drop", shape, dtype, 3 * nbytes, 5 * nbytes, provs, copy=lambda: y.copy_(x),
                clone=lambda: x.clone())


def cases(device, quick):
    if device == "cuda":
        backends = cuda_backends()
        out = [_bn2d_case((64, 64, 56, 56), dt, cl, device, backends)
               for dt in (torch.float32, torch.bfloat16) for cl in (False, True)]
        return out + [_epilogue_case((4096, 1000), dt, device, backends) for dt in (torch.float32, torch.bfloat16)]
    backends = ["cpp"]
    shape = (8, 64, 28, 28) if quick else (64, 64, 56, 56)
    return [_bn2d_case(shape, torch.float32, cl, device, backends) for cl in (False, True)] + \
        [_epilogue_case((512, 1000), torch.float32, device, backends),
         _bn1d_case((64, 1000), torch.float32, device, backends)]


GPU_FLOOR = 1.25  # GPU target: BN2d fwd+bwd within 1.25x its traffic floor (bytes / copy bandwidth), and faster
# than cuDNN (eager) and torch.compile


def check_targets(rows, device):
    """Print the issues' speed targets against this run (never asserted in tests)."""
    for r in rows:
        if device == "cuda" and r["op"] in ("bn2d", "bn2d_cl") and r["mode"] == "fwd+bwd" and \
                r["provider"] in ("cuda", "triton"):
            floor = 100.0 / r["pct_copy"]
            se, sc = r["speedup_eager"] or 0.0, r["speedup_compile"] or 0.0
            ok = floor <= GPU_FLOOR and se > 1.0 and sc > 1.0
            print(f"target {r['op']} {r['shape']} {r['dtype']} {r['provider']} fwd+bwd <= {GPU_FLOOR}x traffic floor, "
                  f"beats cuDNN and compile: {floor:.2f}x floor, {se:.2f}x cuDNN, "
                  f"{sc:.2f}x compile{'' if r['speedup_compile'] else ' (compile not timed)'} "
                  f"({'met' if ok else 'NOT met'})")
    for r in rows:
        want = TARGETS.get((r["op"], r["shape"], device))
        if want is None or r["mode"] != "fwd+bwd" or r["provider"] not in ("cpp", "cuda", "triton"):
            continue
        got = r["speedup_eager"] or 0.0
        print(f"target {r['op']} {r['shape']} {r['provider']} fwd+bwd >= {want:.1f}x eager: {got:.2f}x "
              f"({'met' if got >= want else 'NOT met'}; vs compile {r['speedup_compile'] or 0:.2f}x)")
