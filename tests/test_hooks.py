"""Hooks on the children of fused blocks (fastai's Learner.summary, ActivationStats, hook_outputs) run and see what
they see in torch: a block with hooked children calls them one by one (fastfuse/nn/_hooks.py)."""
import torch
from torch import nn

import fastfuse
from fastfuse.models import EagerTabularModel, TabularModel


def _record(model):
    """Forward hooks on every leaf module; returns the list of (name, output) they fill."""
    seen = []
    for name, m in model.named_modules():
        if not list(m.children()):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, out.detach().clone())))
    return seen


def _same_hooks(fused, twin, *inputs):
    a, b = _record(fused), _record(twin)
    y, z = fused(*inputs), twin(*inputs)
    torch.testing.assert_close(y, z, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, u), (_, v) in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)


def test_conv_layer():
    m = fastfuse.nn.ConvLayer(3, 4).train()
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(4), nn.ReLU())
    t.load_state_dict(m.state_dict())
    _same_hooks(m, t, torch.randn(2, 3, 6, 7))


def test_lin_bn_drop_blocks():
    m = fastfuse.nn.LinBnDrop(5, 6, act=nn.ReLU(), lin_first=True).train()  # the one-call C++ path
    t = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.BatchNorm1d(6))
    t.load_state_dict(m.state_dict())
    _same_hooks(m, t, torch.randn(8, 5))
    m = fastfuse.nn.LinBnDrop(5, 6, act=nn.ReLU(), lin_first=False).train()  # FusedSequential: BN first
    t = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 6, bias=False), nn.ReLU())
    t.load_state_dict(m.state_dict())
    _same_hooks(m, t, torch.randn(8, 5))


def test_tabular_model():
    args = dict(emb_szs=[(5, 3), (4, 2)], n_cont=2, out_sz=1, layers=[8, 6], y_range=(0, 3))
    t = EagerTabularModel(**args).train()
    m = TabularModel(**args).train()
    m.load_state_dict(t.state_dict())
    x = torch.stack([torch.randint(0, 5, (10,)), torch.randint(0, 4, (10,))], 1)
    _same_hooks(m, t, x, torch.randn(10, 2))
