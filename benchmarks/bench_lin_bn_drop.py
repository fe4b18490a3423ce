"""fastai's LinBnDrop(lin_first=True) block, Linear(bias=False) -> ReLU -> BatchNorm1d -> Dropout, training mode:
fastfuse.nn.LinBnDrop (one fastfuse.lin_bn_drop call) vs the same block in torch eager vs torch.compile of it,
fwd / bwd / fwd+bwd, at the first hidden layer of the Rossmann TabularModel (233 -> 1000) and its second
(1000 -> 500). Bytes: the input, the weight and the output once each way (a floor, not the traffic)."""
import torch

import fastfuse
from fastfuse.bench import Case, allow_retained_graphs, autograd_modes

allow_retained_graphs()
P = 0.001  # the Rossmann model's first ps


def _case(B, n_in, n_out, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(B, n_in, device=device, dtype=dtype)
    fused = fastfuse.nn.LinBnDrop(n_in, n_out, p=P, act=torch.nn.ReLU(), lin_first=True).to(device, dtype)
    eager = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=False), torch.nn.ReLU(), torch.nn.BatchNorm1d(n_out),
                                torch.nn.Dropout(P)).to(device, dtype)
    eager.load_state_dict(fused.state_dict())
    compiled_block = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=False), torch.nn.ReLU(),
                                         torch.nn.BatchNorm1d(n_out), torch.nn.Dropout(P)).to(device, dtype)
    compiled_block.load_state_dict(fused.state_dict())
    g = torch.randn(B, n_out, device=device, dtype=dtype)
    provs = {"fastfuse": autograd_modes(fused, x, g), "eager": autograd_modes(eager, x, g),
             "compile": autograd_modes(torch.compile(compiled_block), x, g)}
    nbytes = (x.numel() + fused[0].weight.numel() + B * n_out) * x.element_size()
    y = torch.empty(B, n_out, device=device, dtype=dtype)
    src = torch.randn(B, n_out, device=device, dtype=dtype)
    return Case("lin_bn_drop", (B, n_in, n_out), dtype, nbytes, 2 * nbytes, provs, copy=lambda: y.copy_(src),
                clone=lambda: src.clone())


def cases(device, quick):
    batches = [4096] if device == "cuda" else [64, 512]
    layers = [(233, 1000)] if quick else [(233, 1000), (1000, 500)]
    return [_case(B, n_in, n_out, torch.float32, device) for B in batches for n_in, n_out in layers]
