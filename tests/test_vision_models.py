"""Vision models on the fused layers: fastfuse.nn.ResBlock and AdaptiveConcatPool2d, fastfuse.models' XResNet,
create_head, create_body, vision_model and reflect_padding, and fuse() of fastai's ResBlock and timm's
BatchNormAct2d. Against fastai's own classes where fastai is installed (CI installs it as a test extra): the same
state_dict keys and repr, checkpoints loading both ways, the same eval outputs. Tiny widths, 32x32 and smaller."""
import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

import fastfuse
from fastfuse.models import (XResNet, create_body, create_head, min_input_size, reflect_padding, vision_model,
                             xresnet18, xresnet50)
from fastfuse.nn import ResBlock

from conftest import CPP

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")

TOL = dict(rtol=1e-4, atol=1e-5)
SMALL = dict(widen=0.25, n_out=5)  # stages of 16, 32, 64, 128 channels (the stem stays 32, 32, 64)


def _fastai(name):
    return pytest.importorskip(name)


def _reflect_everywhere(model):
    """fastai's model with every padded conv reflection-padded (fastai's own padding_mode skips the stem)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
            m.padding_mode = "reflect"
    return model


def _grads(y, model, r):
    return torch.autograd.grad((y * r).sum(), list(model.parameters()), allow_unused=True, materialize_grads=True)


def _same_as_fastai(fa, ff, x, train=True):
    """ff has fa's keys and repr; fa's checkpoint loads into ff and back; the same eval outputs (and in training the
    same outputs, gradients and running statistics)."""
    assert list(ff.state_dict()) == list(fa.state_dict())
    assert [v.shape for v in ff.state_dict().values()] == [v.shape for v in fa.state_dict().values()]
    assert repr(ff) == repr(fa)
    ff.load_state_dict(fa.state_dict())
    if train:
        fa.train(), ff.train()
        ya, yf = fa(x), ff(x)
        torch.testing.assert_close(yf, ya, **TOL)
        r = torch.randn_like(ya)  # a random projection: a plain sum after a batch norm has a vanishing gradient
        for a, b in zip(_grads(ya, fa, r), _grads(yf, ff, r)):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
        for a, b in zip(fa.buffers(), ff.buffers()):
            torch.testing.assert_close(b, a, **TOL)
    fa.eval(), ff.eval()
    torch.testing.assert_close(ff(x), fa(x), **TOL)
    fa.load_state_dict(ff.state_dict())  # and back (a deepcopy of fa fails after a spectral-normed forward)
    torch.testing.assert_close(fa(x), ff(x), **TOL)


# ---- ResBlock ------------------------------------------------------------------------------------------------------
RESBLOCKS = [dict(expansion=1, ni=8, nf=8), dict(expansion=1, ni=8, nf=16, stride=2),
             dict(expansion=4, ni=4, nf=4, stride=2), dict(expansion=1, ni=16, nf=16, reduction=4),
             dict(expansion=1, ni=16, nf=16, sa=True), dict(expansion=1, ni=8, nf=16, stride=2, pool_first=False),
             dict(expansion=1, ni=8, nf=8, ks=5, groups=2)]


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("kw", RESBLOCKS)
def test_resblock_is_fastais(kw, padding_mode):
    fa_layers = _fastai("fastai.layers")
    torch.manual_seed(0)
    fa = fa_layers.ResBlock(**kw, padding_mode=padding_mode)
    ff = ResBlock(**kw, padding_mode=padding_mode)
    x = torch.randn(4, kw["ni"] * kw["expansion"], 9, 9)
    _same_as_fastai(fa, ff, x)


def _same_signature(ff, fa):
    """The same parameters, kinds and defaults but padding_mode's ('reflect' here, 'zeros' in fastai)."""
    want, got = inspect.signature(fa).parameters, inspect.signature(ff).parameters
    assert list(got) == list(want)
    for name, p in got.items():
        assert p.kind == want[name].kind, name
        if name == "padding_mode":
            assert p.default == "reflect"
        elif name not in ("norm_type", "pool"):  # fastai's own enum and function
            assert p.default == want[name].default, name
    assert got["norm_type"].default.name == want["norm_type"].default.name


def test_resblock_signature_is_fastais():
    fa_layers = _fastai("fastai.layers")
    _same_signature(ResBlock.__init__, fa_layers.ResBlock.__init__)


def _eager_twin(block):
    """block with its fused tail turned off: fastai's forward over the same children."""
    twin = copy.deepcopy(block)
    twin._fused_tail = lambda: None
    return twin


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kw", [dict(expansion=1, ni=8, nf=8), dict(expansion=1, ni=8, nf=16, stride=2),
                                dict(expansion=4, ni=4, nf=4, stride=2)])
def test_resblock_fused_matches_eager(kw, fmt):
    """The fused tail (one batch_norm call for bn + identity + ReLU) against fastai's forward on the same weights:
    outputs, gradients of the input and every parameter, running statistics; train and eval."""
    torch.manual_seed(0)
    block = ResBlock(**kw).to(memory_format=fmt)
    with torch.no_grad():  # non-trivial BN weights (BatchZero starts at 0: the conv path would vanish)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    twin = _eager_twin(block)
    assert block._fused_tail() is not None
    calls = []
    last_bn = block.convpath[-1][1]
    orig = last_bn.forward
    last_bn.forward = lambda x, **k: calls.append(k) or orig(x, **k)
    x = torch.randn(4, kw["ni"] * kw["expansion"], 10, 10).contiguous(memory_format=fmt)
    for train in (True, False):
        block.train(train), twin.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, yt = block(xa), twin(xb)
        torch.testing.assert_close(y, yt, **TOL)
        r = torch.randn_like(y)
        ga = torch.autograd.grad((y * r).sum(), [xa, *block.parameters()])
        gb = torch.autograd.grad((yt * r).sum(), [xb, *twin.parameters()])
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for a, b in zip(block.buffers(), twin.buffers()):
            torch.testing.assert_close(a, b, **TOL)
    assert [c["post_act"] for c in calls] == ["relu", "relu"] and all(c["residual"] is not None for c in calls)


def test_resblock_hooks_see_the_batch_norms_output():
    """A hook on the last batch norm: the block runs its children one by one (the hook sees bn's output, not the
    fused result), with the same output."""
    torch.manual_seed(0)
    block = ResBlock(1, 8, 8)
    block.convpath[-1][1].weight.data.fill_(1.0)  # BatchZero starts at 0: its output would be the bias alone
    ref = _eager_twin(block)
    seen = []
    block.convpath[-1][1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(block(x), ref(x), **TOL)
    assert len(seen) == 1 and (seen[0] < 0).any()  # before the ReLU


# ---- XResNet -------------------------------------------------------------------------------------------------------
def test_xresnet_signature_is_fastais():
    xr = _fastai("fastai.vision.models.xresnet")
    _same_signature(XResNet.__init__, xr.XResNet.__init__)
    for name in ("xresnet18", "xresnet34", "xresnet50", "xresnet101"):
        assert inspect.signature(getattr(fastfuse.models, name)) == inspect.signature(getattr(xr, name))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("arch, kw", [("xresnet18", SMALL), ("xresnet50", dict(SMALL, widen=0.0625))])
def test_xresnet_is_fastais(arch, kw, padding_mode):
    """The same keys, repr and eval outputs as fastai's model under the same padding (fastai's with every padded conv
    set to reflection for 'reflect'); checkpoints load both ways."""
    xr = _fastai("fastai.vision.models.xresnet")
    torch.manual_seed(0)
    fa = getattr(xr, arch)(**kw, padding_mode=padding_mode)  # fastai's padding_mode reaches the ResBlocks only,
    _reflect_everywhere(fa) if padding_mode == "reflect" else None  # so the stem is made to reflect by hand
    ff = getattr(fastfuse.models, arch)(**kw, padding_mode=padding_mode)
    x = torch.randn(2, 3, 33, 33)  # the smallest input reflection padding takes here
    _same_as_fastai(fa, ff, x, train=arch == "xresnet18")


def test_padding_mode_reaches_every_conv():
    model = xresnet18(**SMALL)
    padded = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)]
    assert len(padded) == 19  # 3 stem convs + 2 in each of the 8 blocks
    assert all(type(m) is fastfuse.nn.ReflectConv2d and m.padding_mode == "reflect" for m in padded)
    assert type(model[0][0]) is fastfuse.nn.ReflectConv2d  # the stem too (fastai's argument skips it)
    zeros = xresnet18(**SMALL, padding_mode="zeros")
    assert all(type(m) is nn.Conv2d and m.padding_mode == "zeros" for m in zeros.modules() if isinstance(m, nn.Conv2d))
    assert sum(type(m) is ResBlock for m in model.modules()) == 8
    assert all(m._fused_tail() is not None for m in model.modules() if type(m) is ResBlock)


def test_too_small_an_input_gets_a_clear_error():
    model = xresnet18(**SMALL).eval()
    assert min_input_size(model) == 33 and min_input_size(xresnet18(**SMALL, padding_mode="zeros")) == 1
    with pytest.raises(ValueError, match=r"25x25 input is too small for reflection padding.*smallest input this "
                                         r"model takes is 33x33"):
        model(torch.randn(1, 3, 25, 25))
    with pytest.raises(ValueError, match="33x33"):
        model(torch.randn(1, 3, 64, 32))  # one side is enough
    assert model(torch.randn(1, 3, 33, 40)).shape == (1, 5)
    assert xresnet18(**SMALL, padding_mode="zeros").eval()(torch.randn(1, 3, 25, 25)).shape == (1, 5)
    # the body cut from it: same walk
    assert min_input_size(create_body(model, cut=-4)) == 33


def test_xresnet_slices_and_pickles():
    model = xresnet18(**SMALL)
    assert type(model[:3]) is nn.Sequential and len(model[3:]) == len(model) - 3
    again = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 33, 33)
    model.eval(), again.eval()
    torch.testing.assert_close(again(x), model(x))


# ---- head, body, vision_model --------------------------------------------------------------------------------------
HEADS = [{}, dict(concat_pool=False), dict(lin_ftrs=[32, 16], ps=[0.1, 0.2, 0.3]), dict(first_bn=False),
         dict(bn_final=True, y_range=(0, 3)), dict(lin_first=True), dict(pool=False)]


@pytest.mark.parametrize("kw", HEADS)
def test_create_head_is_fastais(kw):
    learner = _fastai("fastai.vision.learner")
    torch.manual_seed(0)
    fa, ff = learner.create_head(16, 5, **kw), create_head(16, 5, **kw)
    x = torch.randn(8, 16) if kw.get("pool") is False else torch.randn(8, 16, 3, 3)
    _same_as_fastai(fa, ff, x, train=False)
    ff.train()  # training: dropout is random; check it runs and differs from eval
    assert ff(x).shape == (8, 5)


def test_create_head_fuses():
    """[Linear(bias=False), ReLU, BatchNorm1d, Dropout] in the head is one lin_bn_drop call; its BN -> Dropout one
    batch_norm call; the eval output is the children's."""
    import fastfuse.models.vision as vision
    head = create_head(16, 5).eval()
    calls = []
    orig = vision.lin_bn_drop
    vision.lin_bn_drop = lambda *a, **k: calls.append(k) or orig(*a, **k)
    try:
        x = torch.randn(4, 16, 2, 2)
        y = head(x)
    finally:
        vision.lin_bn_drop = orig
    assert len(calls) == 1 and calls[0]["pre_act"] == "relu"
    ref = x
    for m in head:
        ref = m(ref)
    torch.testing.assert_close(y, ref, **TOL)
    assert type(head[2]) is fastfuse.nn.BatchNorm1d and type(head[3]) is fastfuse.nn.Dropout


def test_adaptive_concat_pool_is_fastais():
    fa_layers = _fastai("fastai.layers")
    x = torch.randn(2, 4, 5, 7)
    for size in (None, 2):
        fa, ff = fa_layers.AdaptiveConcatPool2d(size), fastfuse.nn.AdaptiveConcatPool2d(size)
        assert repr(ff) == repr(fa) and ff.size == fa.size
        torch.testing.assert_close(ff(x), fa(x))


def test_vision_model_on_torchvision_resnet18():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = vision_model(tv.resnet18, 4)
    body, head = model
    assert len(body) == 8 and type(body[-1]) is type(tv.resnet18().layer4)  # cut at -2: no avgpool, no fc
    assert head[2].num_features == 1024  # concat pool of 512 channels
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 4)
    gray = vision_model(tv.resnet18, 4, n_in=1)
    assert gray[0][0].weight.shape == (64, 1, 7, 7) and gray(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    body = create_body(tv.resnet18(), cut=None)
    assert len(body) == 8  # before its last child that pools
    learner = pytest.importorskip("fastai.vision.learner")
    fa = learner.create_vision_model(tv.resnet18, 4, pretrained=False)
    assert list(fa.state_dict()) == list(model.state_dict()) and repr(fa) == repr(model)
    fa.load_state_dict(model.state_dict())
    fa.eval(), model.eval()
    torch.testing.assert_close(model(x), fa(x), **TOL)


def test_vision_model_on_xresnet():
    from functools import partial
    model = vision_model(partial(xresnet18, **SMALL), 3, n_in=4)  # a partial: not in model_meta, cut before the pool
    body = model[0]
    assert len(body) == 8 and type(body[0][0]) is fastfuse.nn.ReflectConv2d and body[0][0].in_channels == 4
    assert model.eval()(torch.randn(2, 4, 33, 33)).shape == (2, 3)
    net = xresnet18(**SMALL)
    w = net[0][0].weight.detach().clone()
    body = create_body(net, n_in=4, cut=-4)  # pretrained (the default): the 3-channel weights kept, the 4th zero
    assert torch.equal(body[0][0].weight[:, :3], w) and not body[0][0].weight[:, 3:].any()
    model = vision_model(xresnet18, 3)
    assert len(model[0]) == 8 and model[1][2].num_features == 1024
    # the nf probe leaves the mode as it was
    assert model.training and all(m.training for m in model.modules())


def test_reflect_padding():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tv.resnet18(num_classes=3)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
            m.padding_mode = "reflect"  # torch's own reflection padding
    params, keys = list(model.parameters()), list(model.state_dict())
    assert reflect_padding(model) is model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is fastfuse.nn.ReflectConv2d and m.padding_mode == "reflect" for m in convs
               if m.padding != (0, 0))
    assert all(type(m) is nn.Conv2d and m.padding_mode == "zeros" for m in convs if m.padding == (0, 0))
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    x = torch.randn(2, 3, 64, 64)  # at 32x32 the last stage is 1x1: too small to reflect
    torch.testing.assert_close(model(x), ref(x), **TOL)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), **TOL)
    assert reflect_padding(nn.Conv2d(3, 4, 3, padding=1)).padding_mode == "reflect"


# ---- fuse() --------------------------------------------------------------------------------------------------------
def test_fuse_swaps_fastais_resblock():
    fa_layers = _fastai("fastai.layers")
    torch.manual_seed(0)
    net = nn.Sequential(fa_layers.ResBlock(1, 8, 8, padding_mode="reflect"), fa_layers.ResBlock(1, 8, 16, stride=2))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    ref, keys, params = copy.deepcopy(net), list(net.state_dict()), list(net.parameters())
    convpaths = [b.convpath for b in net]
    fastfuse.fuse(net)
    assert all(type(b) is ResBlock and b._fused_tail() is not None for b in net)
    assert [b.convpath for b in net] == convpaths  # the same children
    assert list(net.state_dict()) == keys and all(a is b for a, b in zip(net.parameters(), params))
    assert type(net[0].convpath[0][0]) is fastfuse.nn.ReflectConv2d and type(net[1].convpath[0][0]) is nn.Conv2d
    x = torch.randn(2, 8, 8, 8)
    y, yr = net(x), ref(x)
    torch.testing.assert_close(y, yr, **TOL)
    r = torch.randn_like(y)
    for a, b in zip(_grads(y, net, r), _grads(yr, ref, r)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    single = fastfuse.fuse(fa_layers.ResBlock(1, 4, 4))  # the block itself: its fused twin is returned
    assert type(single) is ResBlock


def test_fuse_of_fastais_xresnet():
    xr = _fastai("fastai.vision.models.xresnet")
    torch.manual_seed(0)
    net = _reflect_everywhere(xr.xresnet18(**SMALL))
    ref, x = copy.deepcopy(net), torch.randn(2, 3, 33, 33)
    fastfuse.fuse(net)
    assert sum(type(m) is ResBlock for m in net.modules()) == 8
    assert repr(net) == repr(ref)
    torch.testing.assert_close(net(x), ref(x), **TOL)
    net.eval(), ref.eval()
    torch.testing.assert_close(net(x), ref(x), **TOL)


def test_fuse_converts_timm_batchnorm_act():
    timm_layers = pytest.importorskip("timm.layers")
    from fastfuse.swap import BatchNormAct2d
    torch.manual_seed(0)
    net = nn.Sequential(timm_layers.ConvNormAct(3, 8, 3), timm_layers.ConvNormAct(8, 8, 3, act_layer=nn.GELU),
                        timm_layers.BatchNormAct2d(8, apply_act=False))
    ref, keys = copy.deepcopy(net), list(net.state_dict())
    bn_params = list(net[0].bn.parameters())
    fastfuse.fuse(net)
    assert type(net[0].bn) is BatchNormAct2d and isinstance(net[0].bn, timm_layers.BatchNormAct2d)
    assert all(a is b for a, b in zip(net[0].bn.parameters(), bn_params))
    assert type(net[1].bn) is timm_layers.BatchNormAct2d  # GELU: timm's own
    assert type(net[2]) is timm_layers.BatchNormAct2d  # no activation
    assert list(net.state_dict()) == keys
    x = torch.randn(2, 3, 8, 8)
    for train in (True, False):
        net.train(train), ref.train(train)
        torch.testing.assert_close(net(x), ref(x), **TOL)
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TOL)
    again = pickle.loads(pickle.dumps(net))
    assert type(again[0].bn) is BatchNormAct2d


def test_fuse_on_torchvision_resnet18_trains_and_infers_as_eager():
    """fuse() of torchvision's resnet18: the top-level model is returned as its fused twin (the stem's
    conv1 -> bn1 -> relu fused too); training matches eager; inference (eval, no_grad) runs each conv -> bn folded
    into one convolution, matches eager, and refolds after the weights or running statistics change (in place,
    or through .data and then eval())."""
    tv = pytest.importorskip("torchvision.models")
    import fastfuse.fuse_graph as fg
    torch.manual_seed(0)
    ref = tv.resnet18(num_classes=3).double()  # doubles: training batch norm over 2 values amplifies rounding
    fused = fastfuse.fuse(copy.deepcopy(ref))
    assert type(fused).__name__ == "ResNet" and list(fused.state_dict()) == list(ref.state_dict())
    assert any(n.target is fg.bn_relu for n in fused.graph.nodes)  # the stem
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), **TOL)
    fused.eval(), ref.eval()
    calls = []
    orig = fg.conv_bn
    fg.conv_bn = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), **TOL)
            assert len(calls) == 20  # the stem, both convs of every block, the 3 downsamples
            for m in (ref, fused):  # an in-place change of a running statistic and of a conv weight
                m.layer1[0].bn1.running_mean.add_(0.5)
                m.layer2[1].conv2.weight.mul_(1.5)
            torch.testing.assert_close(fused(x), ref(x), **TOL)
            for m in (ref, fused):  # through .data (fastai's optimizers): no version bump; seen after eval()
                m.layer3[0].conv1.weight.data.mul_(0.5)
            fused.eval()
            torch.testing.assert_close(fused(x), ref(x), **TOL)
        y = fused(x)  # with autograd: the fused batch norms, no folding
        assert len(calls) == 60
        torch.testing.assert_close(y, ref(x), **TOL)
    finally:
        fg.conv_bn = orig
