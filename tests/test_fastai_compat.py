"""Against fastai itself, where it is installed (CI does not install it: fastai pins torchvision, which pins a torch):
TabularModel, LinBnDrop and ConvLayer have fastai's state_dict keys, shapes and repr, load checkpoints both ways
and give fastai's outputs, gradients and running statistics; fastfuse.fuse swaps fastai's own blocks."""
import copy

import pytest
import torch

import fastfuse

from conftest import CPP

fa_tab = pytest.importorskip("fastai.tabular.model")
fa_layers = pytest.importorskip("fastai.layers")
pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")

EMB_SZS = [(1116, 81), (8, 5), (4, 3), (13, 7), (3, 3)]


def _same(fa, ff, *inputs):
    """ff, loaded from fa's state_dict, matches fa in eval and train (outputs, gradients, running stats)."""
    assert list(ff.state_dict()) == list(fa.state_dict()) and repr(ff) == repr(fa)
    ff.load_state_dict(fa.state_dict())
    fa.eval(), ff.eval()
    torch.testing.assert_close(ff(*inputs), fa(*inputs), rtol=1e-5, atol=1e-5)
    fa.train(), ff.train()
    ya, yf = fa(*inputs), ff(*inputs)
    torch.testing.assert_close(yf, ya, rtol=1e-5, atol=1e-5)
    r = torch.randn_like(ya)  # a random projection: sum(y**2) after a batch norm has a vanishing gradient
    grads = [torch.autograd.grad((y * r).sum(), list(m.parameters()), allow_unused=True, materialize_grads=True)
             for y, m in ((ya, fa), (yf, ff))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for a, b in zip(fa.buffers(), ff.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    copy.deepcopy(fa).load_state_dict(ff.state_dict())  # and back


@pytest.mark.parametrize("kw", [{}, dict(bn_final=True), dict(use_bn=False), dict(bn_cont=False),
                                dict(lin_first=False), dict(n_cont=0)])
def test_tabular_model_is_fastais(kw):
    from fastfuse.models import TabularModel, emb_sz_rule
    args = dict(emb_szs=EMB_SZS, n_cont=6, out_sz=1, layers=[32, 16], ps=[0.0, 0.0], y_range=(0, 1.2)) | kw
    torch.manual_seed(0)
    x_cat = torch.stack([torch.randint(0, n, (32,)) for n, _ in EMB_SZS], 1)
    _same(fa_tab.TabularModel(**args), TabularModel(**args), x_cat, torch.randn(32, args["n_cont"]))
    assert all(emb_sz_rule(n) == fa_tab.emb_sz_rule(n) for n in range(1, 3000))


@pytest.mark.parametrize("lin_first", [True, False])
def test_lin_bn_drop_is_fastais(lin_first):
    torch.manual_seed(0)
    args = dict(n_in=20, n_out=10, p=0.0, act=torch.nn.ReLU(), lin_first=lin_first)
    _same(fa_layers.LinBnDrop(**args), fastfuse.nn.LinBnDrop(**args), torch.randn(16, 20))


@pytest.mark.parametrize("kw", [{}, dict(stride=2), dict(ks=5), dict(bn_1st=False), dict(ks=1),
                                dict(padding_mode="zeros")])
def test_conv_layer_is_fastais(kw):
    torch.manual_seed(0)
    fa = fa_layers.ConvLayer(3, 8, **({"padding_mode": "reflect"} | kw))
    _same(fa, fastfuse.nn.ConvLayer(3, 8, **kw), torch.randn(4, 3, 17, 15))


def test_fuse_swaps_fastais_blocks():
    torch.manual_seed(0)
    tab = fa_tab.TabularModel(EMB_SZS, 6, 1, [32, 16], y_range=(0, 1.2)).eval()
    x_cat = torch.stack([torch.randint(0, n, (8,)) for n, _ in EMB_SZS], 1)
    x_cont, ref = torch.randn(8, 6), copy.deepcopy(tab)
    fused = fastfuse.fuse(tab)
    assert type(fused) is fastfuse.models.TabularModel
    torch.testing.assert_close(fused(x_cat, x_cont), ref(x_cat, x_cont), rtol=1e-5, atol=1e-5)
    net = torch.nn.Sequential(fa_layers.ConvLayer(3, 8, padding_mode="reflect"),
                              fa_layers.ConvLayer(8, 4, stride=2, padding_mode="reflect"), fa_layers.ConvLayer(4, 4))
    ref, x = copy.deepcopy(net), torch.randn(2, 3, 12, 12)
    fastfuse.fuse(net)
    assert all(type(m) is fastfuse.nn.ConvLayer for m in net)
    assert [type(m[0]) for m in net] == [fastfuse.nn.ReflectConv2d] * 2 + [torch.nn.Conv2d]  # zeros: torch's
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fused_xresnet_matches_fastais():
    """fastai's xresnet18 with reflection padding: every ConvLayer, Conv2d and BatchNorm2d swapped, same outputs and
    gradients in train and eval."""
    xresnet = pytest.importorskip("fastai.vision.models.xresnet")
    torch.manual_seed(0)
    net = xresnet.xresnet18(n_out=5)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0):
            m.padding_mode = "reflect"
    # 64x64: the last stage is 2x2 (reflection needs more pixels than the padding, as in torch)
    ref, keys, x = copy.deepcopy(net), list(net.state_dict()), torch.randn(2, 3, 64, 64)
    fastfuse.fuse(net)
    assert list(net.state_dict()) == keys
    assert sum(type(m) is fastfuse.nn.ReflectConv2d for m in net.modules()) == 19  # every padded conv
    y, yr = net(x), ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    r = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * r).sum(), list(net.parameters())),
                    torch.autograd.grad((yr * r).sum(), list(ref.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    net.eval(), ref.eval()
    torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
