"""Dropout p=0.5: fastfuse backends vs eager F.dropout vs torch.compile, fwd / bwd / fwd+bwd."""
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse.bench import Case, allow_retained_graphs, autograd_modes, cuda_backends

P = 0.5
allow_retained_graphs()
# targets from the issues (cpu): fwd+bwd speedup vs eager, per shape
TARGETS = {((64, 64, 56, 56), "cpu"): 20.0, ((64, 100), "cpu"): 1.0}


def _providers(x, backends):
    g = torch.randn_like(x)
    modes = lambda fn: autograd_modes(fn, x, g)  # noqa: E731

    def with_backend(name):
        def fn(t):
            with fastfuse.use_backend(name):
                return fastfuse.dropout(t, P, training=True)
        # the device's default backend runs without the override: the per-call cost a user sees
        return (lambda t: fastfuse.dropout(t, P, training=True)) if name in ("cpp", "cuda") else fn

    eager = lambda t: F.dropout(t, P)  # noqa: E731
    provs = {b: modes(with_backend(b)) for b in backends}
    provs["eager"] = modes(eager)
    provs["compile"] = modes(torch.compile(eager))
    return provs


def cases(device, quick):
    if device == "cuda":
        shapes = [((64, 64, 56, 56), torch.float32), ((64, 64, 56, 56), torch.bfloat16),
                  ((8192, 8192), torch.float32), ((8192, 8192), torch.bfloat16)]
        backends = cuda_backends()
    else:
        shapes = [((64, 100), torch.float32), ((512, 1000), torch.float32)] + \
            ([] if quick else [((64, 64, 56, 56), torch.float32)])
        backends = ["cpp"]  # "reference" is added per case for small tensors only
    out = []
    for shape, dtype in shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        y = torch.empty_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        bk = [b for b in backends if fastfuse.backends()[b]["available"]]
        if device == "cpu" and x.numel() <= 1 << 20 and fastfuse.backends()["reference"]["available"]:
            bk.append("reference")  # pure-PyTorch reference: too slow to be worth timing on big shapes
        out.append(Case("dropout", shape, dtype, nbytes, nbytes, _providers(x, bk),
                        copy=lambda x=x, y=y: y.copy_(x), clone=lambda x=x: x.clone()))
    return out


GPU_PCT_COPY = 85.0  # GPU target: fwd and fwd+bwd at >= 85% of a same-run copy's bandwidth, fp32 and bf16


def check_targets(rows, device):
    """Print the issues' speed targets against this run (never asserted in tests)."""
    for r in rows:
        if device == "cuda" and r["op"] == "dropout" and r["provider"] in ("cuda", "triton") and \
                r["mode"] in ("fwd", "fwd+bwd") and r["dtype"] in ("float32", "bfloat16"):
            got = r["pct_copy"]
            print(f"target dropout {r['shape']} {r['dtype']} {r['provider']} {r['mode']} >= {GPU_PCT_COPY:.0f}% of "
                  f"copy bandwidth: {got:.0f}% ({'met' if got >= GPU_PCT_COPY else 'NOT met'})")
    for r in rows:
        if r["op"] != "dropout" or r["mode"] != "fwd+bwd" or r["provider"] not in ("cpp", "cuda", "triton"):
            continue
        shape = tuple(int(v) for v in r["shape"].split("x"))
        want = TARGETS.get((shape, device))
        if want is None:
            continue
        got = r["speedup_eager"] or 0.0
        print(f"target dropout {r['shape']} {r['provider']} fwd+bwd >= {want:.1f}x eager: {got:.2f}x "
              f"({'met' if got >= want else 'NOT met'}; vs compile {r['speedup_compile'] or 0:.2f}x)")
