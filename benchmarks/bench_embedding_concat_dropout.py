"""Tabular input layer, Rossmann shape (24 tables, 16 continuous columns, embed_p 0.04): fastfuse backends
vs the eager sequence (24 lookups, cat, dropout, BatchNorm1d, cat) vs torch.compile of it; fwd / bwd / fwd+bwd.
`<backend>_nocheck` runs with check_index=False: the difference is the cost of the code check."""
import copy

import torch
import torch.nn.functional as F

import fastfuse
from fastfuse.bench import Case, cuda_backends
from fastfuse.models.synthetic import ROSSMANN_EMBED_P, ROSSMANN_N_CONT, rossmann_batch, rossmann_emb_szs

OP = "emb_concat"
# targets from the issue: fused input layer fwd+bwd vs eager (device, batch) -> minimum speedup
TARGETS = {("cpu", 512): 5.0, ("cuda", 4096): 10.0}

try:  # "bwd" re-runs backward on one graph; torch.compile's donated buffers forbid that
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
except (ImportError, AttributeError):
    pass


def _parts(device):
    embeds = [torch.nn.Embedding(n, d).to(device) for n, d in rossmann_emb_szs()]
    bn = torch.nn.BatchNorm1d(ROSSMANN_N_CONT).to(device)
    return embeds, bn


def _providers(embeds, bn, x_cat, x_cont, backends):
    params = [e.weight for e in embeds]
    cont = x_cont.detach().requires_grad_()

    def eager(bn):
        def fn(xc, xn):
            x = torch.cat([e(xc[:, i]) for i, e in enumerate(embeds)], 1)
            return torch.cat([F.dropout(x, ROSSMANN_EMBED_P), bn(xn)], 1)
        return fn

    def fused(name, check):
        def make(bn):
            def fn(xc, xn):
                with fastfuse.use_backend(name):
                    return fastfuse.embedding_concat_dropout(xc, params, ROSSMANN_EMBED_P, True, xn, bn,
                                                             check_index=check)
            return fn
        return make

    def modes(make, wrap=lambda f: f):
        # one BatchNorm copy per mode: a forward updates the running stats in place, which would invalidate
        # the graph that "bwd" re-runs
        f_fwd, f_bwd, f_both = (wrap(make(copy.deepcopy(bn))) for _ in range(3))
        graph = []  # (out, g), made on the first bwd call: building a case must not compile (see fastfuse.bench)
        inputs = params + [cont]

        def fwd():
            with torch.no_grad():
                return f_fwd(x_cat, x_cont)

        def bwd():
            if not graph:
                out = f_bwd(x_cat, cont)
                graph.append((out, torch.ones_like(out)))
            return torch.autograd.grad(graph[0][0], inputs, graph[0][1], retain_graph=True)

        def fwd_bwd():
            out = f_both(x_cat, cont)
            return torch.autograd.grad(out, inputs, torch.ones_like(out))

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}

    provs = {}
    for b in backends:
        provs[b] = modes(fused(b, True))
        if b != "reference":
            provs[f"{b}_nocheck"] = modes(fused(b, False))
    provs["eager"] = modes(eager)
    provs["compile"] = modes(eager, torch.compile)
    return provs


def cases(device, quick):
    if device == "cuda":
        batches = [4096] if quick else [512, 4096]
        backends = cuda_backends()
    else:
        batches = [512] if quick else [64, 512]
        backends = [b for b in ("cpp",) if fastfuse.backends()[b]["available"]]
    out = []
    for B in batches:
        torch.manual_seed(0)
        embeds, bn = _parts(device)
        x_cat, x_cont, _ = rossmann_batch(B, device)
        D = sum(e.embedding_dim for e in embeds)
        width = D + ROSSMANN_N_CONT
        y = torch.empty(B, width, device=device)
        src = torch.randn(B, width, device=device)
        nbytes = 4 * (2 * B * width) + 8 * x_cat.numel()  # rows read + output written + codes
        out.append(Case(OP, (B, len(embeds), D, ROSSMANN_N_CONT), torch.float32, nbytes, nbytes,
                        _providers(embeds, bn, x_cat, x_cont, backends),
                        copy=lambda y=y, s=src: y.copy_(s), clone=lambda s=src: s.clone()))
    return out


def check_targets(rows, device):
    """Print the issue's speed targets against this run (never asserted in tests)."""
    for r in rows:
        if r["op"] != OP or r["mode"] != "fwd+bwd" or r["provider"] not in ("cpp", "cuda", "triton"):
            continue
        B = int(r["shape"].split("x")[0])
        want = TARGETS.get((device, B))
        if want is None:
            continue
        got = r["speedup_eager"] or 0.0
        print(f"target {OP} B={B} {r['provider']} fwd+bwd >= {want:.1f}x eager: {got:.2f}x "
              f"({'met' if got >= want else 'NOT met'}; vs compile {r['speedup_compile'] or 0:.2f}x)")
