"""fastfuse.fuse: torch layers and fastai's blocks swapped for their fused twins in place, over the same parameters."""
import copy
import sys
import types

import pytest
import torch

import fastfuse
from fastfuse.models import EagerTabularModel, TabularModel
from fastfuse.models.tabular import _EagerLinBnDrop

from conftest import CPP

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")


def _tabular(p):
    torch.manual_seed(0)
    m = EagerTabularModel([(7, 3), (5, 4), (11, 2)], 4, 1, [20, 10], ps=[p, p], embed_p=p, y_range=(0, 3))
    x_cat = torch.stack([torch.randint(0, n, (16,)) for n in (7, 5, 11)], 1)
    return m, x_cat, torch.randn(16, 4)


def test_tabular_model_becomes_the_fused_one_over_the_same_parameters():
    eager, x_cat, x_cont = _tabular(0.0)
    keys = list(eager.state_dict())
    ref = copy.deepcopy(eager)
    fused = fastfuse.fuse(eager)
    assert type(fused) is TabularModel and all(type(b) is fastfuse.nn.LinBnDrop for b in fused.layers[:3])
    assert list(fused.state_dict()) == keys
    assert all(a is b for a, b in zip(fused.parameters(), eager.parameters()))  # shared: optimizers stay valid
    y, yr = fused(x_cat, x_cont), ref(x_cat, x_cont)  # training, no dropout: the same computation
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    g, gr = (torch.autograd.grad(t.sum(), list(m.parameters())) for t, m in ((y, fused), (yr, ref)))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.buffers(), ref.buffers()):  # running statistics updated alike
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x_cat, x_cont), ref(x_cat, x_cont), rtol=1e-5, atol=1e-6)


def test_fastai_blocks_are_swapped_when_fastai_is_imported(monkeypatch):
    """fastai's own classes (stand-ins registered under fastai's module names, fastai is not installed here)."""
    layers, model = types.ModuleType("fastai.layers"), types.ModuleType("fastai.tabular.model")
    layers.LinBnDrop = type("LinBnDrop", (_EagerLinBnDrop,), {})
    layers.ConvLayer = type("ConvLayer", (torch.nn.Sequential,), {})
    model.TabularModel = type("TabularModel", (EagerTabularModel,), {})
    monkeypatch.setitem(sys.modules, "fastai.layers", layers)
    monkeypatch.setitem(sys.modules, "fastai.tabular.model", model)
    lbd = layers.LinBnDrop(6, 5, p=0.2, act=torch.nn.ReLU(), lin_first=True)
    conv = layers.ConvLayer(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False, padding_mode="reflect"),
                            torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 6), lbd)
    keys, x = list(net.state_dict()), torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(net).eval()
    fastfuse.fuse(net).eval()
    assert type(net[0]) is fastfuse.nn.ConvLayer and type(net[0][0]) is fastfuse.nn.ReflectConv2d
    assert type(net[3]) is fastfuse.nn.LinBnDrop and type(net[3][2]) is fastfuse.nn.BatchNorm1d
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
    tab = model.TabularModel([(4, 2)], 2, 1, [8])
    assert type(fastfuse.fuse(tab)) is TabularModel


def test_layers_swap_in_place():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.1))
    bn = m[1]
    assert fastfuse.fuse(m) is m
    assert type(m[1]) is fastfuse.nn.BatchNorm1d and type(m[2]) is fastfuse.nn.Dropout
    assert m[1].running_mean is bn.running_mean and m[1].weight is bn.weight
