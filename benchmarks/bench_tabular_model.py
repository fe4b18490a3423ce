"""A whole TabularModel training step (forward, backward, SGD step), Rossmann shape (24 tables, 16
continuous columns, layers [1000, 500], ps [0.001, 0.01], embed_p 0.04): fastfuse.models.TabularModel vs its
eager twin (same weights) vs torch.compile of the eager twin."""
import copy

import torch
import torch.nn.functional as F

import fastfuse
from fastfuse.bench import StepCase, sgd_step
from fastfuse.models import EagerTabularModel, TabularModel
from fastfuse.models.synthetic import rossmann_batch, rossmann_model

OP = "tab_step"
# (device, batch) -> (min speedup vs eager, min speedup vs compile or None)
TARGETS = {("cpu", 512): (1.25, None), ("cpu", 64): (1.5, None), ("cuda", 4096): (2.0, 1.2)}


def _step_fn(model, x_cat, x_cont, y, forward=None):
    return sgd_step(model, (x_cat, x_cont), lambda out: F.mse_loss(out, y), 1e-4, forward)


def cases(device, quick):
    batches = ([4096] if quick else [512, 4096]) if device == "cuda" else ([512] if quick else [64, 512])
    out = []
    for B in batches:
        torch.manual_seed(0)
        eager = rossmann_model(EagerTabularModel).to(device).train()
        x_cat, x_cont, y = rossmann_batch(B, device)
        provs = {}
        fused = rossmann_model(TabularModel).to(device).train()
        fused.load_state_dict(eager.state_dict())
        provs["fastfuse"] = _step_fn(fused, x_cat, x_cont, y)
        # the fused input layer alone, with the eager head: what embedding_concat_dropout contributes
        hybrid = copy.deepcopy(fused)
        hybrid.layers = copy.deepcopy(eager.layers)
        provs["ff_input"] = _step_fn(hybrid, x_cat, x_cont, y)
        provs["eager"] = _step_fn(eager, x_cat, x_cont, y)
        twin = copy.deepcopy(eager)
        provs["compile"] = _step_fn(twin, x_cat, x_cont, y, forward=torch.compile(twin))
        nbytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        src = torch.randn(B, 233, device=device)
        dst = torch.empty_like(src)
        out.append(StepCase(OP, (B,), torch.float32, nbytes, nbytes, provs,
                            copy=lambda d=dst, s=src: d.copy_(s), clone=lambda s=src: s.clone()))
    return out


def check_targets(rows, device):
    """Print the issue's speed targets against this run (never asserted in tests)."""
    for r in rows:
        if r["op"] != OP or r["provider"] != "fastfuse":  # ff_input (fused input layer, eager head) is for reading
            continue
        want = TARGETS.get((device, int(r["shape"])))
        if want is None:
            continue
        got, got_c = r["speedup_eager"] or 0.0, r["speedup_compile"] or 0.0
        ok = got >= want[0] and (want[1] is None or got_c >= want[1])
        print(f"target {OP} B={r['shape']} {r['provider']}: >= {want[0]}x eager"
              f"{'' if want[1] is None else f', >= {want[1]}x compile'}: {got:.2f}x eager, {got_c:.2f}x compile "
              f"({'met' if ok else 'NOT met'})")
