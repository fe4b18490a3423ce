"""fastfuse.fuse's graph pass (fastfuse.fuse_graph): batch norm -> [residual add] -> ReLU written in a block's forward
becomes one fused batch norm call, with the same results, state_dict and parameters; blocks it cannot rewrite safely
are left alone."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse.fuse_graph import SwappedSequential, bn_add_relu, bn_relu

from conftest import CPP

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock forward: one ReLU module used twice, `out += identity`, downsample after bn2."""

    def __init__(self, ni, nf, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(nf)
        self.downsample = None
        if stride != 1 or ni != nf:
            self.downsample = nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class FunctionalBlock(nn.Module):
    """F.relu(bn(...) + identity) and Tensor.relu(), as people write it by hand."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.bn_b = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn_b(self.conv(x)).relu()
        return F.relu(x + self.bn(y))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         TorchvisionBlock(8, 8), TorchvisionBlock(8, 16, 2), FunctionalBlock(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _fused_calls(block):
    return [n.target for n in block.graph.nodes if n.target in (bn_relu, bn_add_relu)]


def test_blocks_are_rewritten_over_the_same_children():
    net = _net()
    keys, params = list(net.state_dict()), list(net.parameters())
    fused = fastfuse.fuse(net)
    assert fused is net and isinstance(fused, fastfuse.nn.FusedSequential)  # in place; fuses the stem's BN -> ReLU
    assert repr(fused).startswith("Sequential(")
    assert _fused_calls(fused[3]) == [bn_relu, bn_add_relu] and _fused_calls(fused[4]) == [bn_relu, bn_add_relu]
    assert _fused_calls(fused[5]) == [bn_relu, bn_add_relu]
    assert not any(n.op == "call_module" and n.target == "relu" for n in fused[3].graph.nodes)
    assert list(fused.state_dict()) == keys and all(a is b for a, b in zip(fused.parameters(), params))
    assert type(fused[3]).__name__ == "TorchvisionBlock" and "(relu): ReLU(inplace=True)" in repr(fused[3])
    # Conv -> BN alone: nothing to fuse in training, folded into one convolution in inference
    assert type(fused[4].downsample) is SwappedSequential and repr(fused[4].downsample).startswith("Sequential(")


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_and_eval_match_the_unfused_model(channels_last):
    """float64: batch norm over a small batch amplifies float32 rounding, so tight tolerances need doubles."""
    ref = _net().double()
    fused = fastfuse.fuse(copy.deepcopy(ref))
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    if channels_last:
        ref, fused, x = ref.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last), \
            x.to(memory_format=torch.channels_last)
    for _ in range(2):  # two steps: running statistics and parameters move alike
        outs = []
        for m in (ref, fused):
            xr = x.detach().requires_grad_()
            y = m(xr)
            grads = torch.autograd.grad((y * torch.arange(5.0, dtype=y.dtype)).sum(), [xr, *m.parameters()])
            with torch.no_grad():
                for p, g in zip(m.parameters(), grads[1:]):
                    p.sub_(0.1 * g)
            outs.append((y, grads))
        torch.testing.assert_close(outs[1][0], outs[0][0])
        for a, b in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(a, b)
    for a, b in zip(fused.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(x), ref(x))


class TrainBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.bn(x)) if self.training else self.bn(x)


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.bn(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.relu(self.bn(x) + self.shift)  # the residual broadcasts: the fused kernel does not take it


class TwoUses(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) + y  # the norm's output is needed on its own


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, mask=None):
        y = F.relu(self.bn(x))
        return y if mask is None else y * mask  # traced with a proxy, `mask is None` would be fixed to False


@pytest.mark.parametrize("cls", [TrainBranch, DataBranch, TwoUses, OptionalArg])
def test_blocks_that_cannot_be_rewritten_safely_are_kept(cls):
    net = nn.Sequential(cls())
    fastfuse.fuse(net)
    assert type(net[0]) is cls and type(net[0].bn) is fastfuse.nn.BatchNorm1d  # layers are still swapped
    x = torch.randn(6, 4)
    ref = copy.deepcopy(net)
    torch.testing.assert_close(net(x), ref(x))


def test_a_broadcast_residual_runs_the_plain_composition():
    torch.manual_seed(0)
    ref = nn.Sequential(Broadcast())
    fused = fastfuse.fuse(copy.deepcopy(ref))
    assert _fused_calls(fused[0]) == [bn_add_relu]
    x = torch.randn(6, 4)
    torch.testing.assert_close(fused(x), ref(x))
    g, gr = (torch.autograd.grad(m(x).sum(), list(m.parameters())) for m in (fused, ref))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_hooks_registered_after_fuse_see_what_they_see_in_torch():
    ref = _net()
    fused = fastfuse.fuse(copy.deepcopy(ref))
    seen = {}
    for name, m in (("ref", ref[3]), ("fused", fused[3])):
        m.bn2.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, []).append(o.clone()))
        m.relu.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name + "_relu", []).append(o.clone()))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    assert len(seen["fused"]) == 1 and len(seen["fused_relu"]) == 2
    torch.testing.assert_close(seen["fused"][0], seen["ref"][0], rtol=1e-4, atol=1e-5)  # bn2's own output
    for a, b in zip(seen["fused_relu"], seen["ref_relu"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_graphs_false_only_swaps_layers():
    net = _net()
    fastfuse.fuse(net, graphs=False)
    assert type(net[3]) is TorchvisionBlock and type(net[3].bn1) is fastfuse.nn.BatchNorm2d


def test_fused_model_deepcopies_and_pickles():
    fused = fastfuse.fuse(_net()).eval()
    x = torch.randn(2, 3, 8, 8)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        assert _fused_calls(other[3]) == [bn_relu, bn_add_relu]
        torch.testing.assert_close(other(x), fused(x))


def test_compiles_fullgraph():
    torch._dynamo.reset()
    ref = _net()
    fused = fastfuse.fuse(copy.deepcopy(ref))
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(fused, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)
