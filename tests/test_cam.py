"""fastfuse.cam: CAM, Grad-CAM and Grad-CAM++ against a direct computation (A and dA taken by hand with
autograd.grad, no hook), no hook, gradient or activation left behind (after an error too), the errors, a fused model
and its eager twin giving the same heatmaps, and show() writing a PNG."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _mm

import fastfuse
from fastfuse import cam as fcam

N_CLS = 5
K = 8  # channels of the hooked layers: A is (B, 8, h, w)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with reflection padding: relu(bn2(conv2(relu(bn1(conv1(x))))) + x)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False, padding_mode="reflect")
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def conv_layer(ni, nf, stride=1):
    """fastai's ConvLayer layout (conv, bn, relu under keys 0, 1, 2) in plain torch."""
    return nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False, padding_mode="reflect"), nn.BatchNorm2d(nf),
                         nn.ReLU(inplace=True))


def net():
    """body (model[0]: ConvLayer, BasicBlock) and head (model[1]), with non-trivial batch-norm statistics."""
    body = nn.Sequential(conv_layer(3, K, stride=2), BasicBlock(K))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(K, N_CLS))
    model = nn.Sequential(body, head)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(b=3, size=16):
    return torch.randn(b, 3, size, size)


def direct(model, x, target=None):
    """A = the body's output and dA = d(sum_b y[b, target_b])/dA, by hand (eval mode, no hooks)."""
    model.eval()
    body, head = model
    a = body(x)
    y = head(a)
    t = y.argmax(1) if target is None else torch.as_tensor(target).expand(len(x))
    da, = torch.autograd.grad(y[torch.arange(len(x)), t].sum(), a)
    return a.detach(), da, y.detach(), t


def scaled(maps, size):
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo)


# ---- the formulas ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [None, 2, [0, 4, 1]])
def test_grad_cam_is_relu_of_the_gradient_weighted_channels(target):
    model, x = net(), images()
    a, da, _, _ = direct(model, x, target)
    alpha = da.mean((2, 3))                                   # (B, K): the spatial mean of the gradient
    want = torch.relu(torch.einsum("bk,bkij->bij", alpha, a))
    raw = fcam.grad_cam(model, x, model[0], target, raw=True)
    assert raw.shape == a.shape[:1] + a.shape[2:]
    torch.testing.assert_close(raw, want, rtol=1e-5, atol=1e-6)
    heat = fcam.grad_cam(model, x, model[0], target)
    assert heat.shape == (3, 16, 16)
    torch.testing.assert_close(heat, scaled(want, (16, 16)), rtol=1e-5, atol=1e-5)
    assert heat.min() >= 0 and heat.max() <= 1


@pytest.mark.parametrize("target", [None, 3])
def test_grad_cam_pp_has_the_papers_weights(target):
    """Chattopadhyay et al.'s formula with the exponential score S = exp(y_c) written out, as in their code: the
    derivatives of S are exp(y_c) g, exp(y_c) g^2, exp(y_c) g^3; fastfuse drops exp(y_c), which cancels from the
    alphas and scales each image's map by a positive constant."""
    model, x = net(), images()
    a, g, y, t = direct(model, x, target)
    e = torch.exp(y[torch.arange(len(x)), t])[:, None, None, None]
    first, second, third = e * g, e * g ** 2, e * g ** 3
    global_sum = a.sum((2, 3), keepdim=True)
    denom = 2 * second + global_sum * third
    alphas = second / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alphas * torch.relu(first)).sum((2, 3))
    paper = torch.relu(torch.einsum("bk,bkij->bij", weights, a))
    raw = fcam.grad_cam_pp(model, x, model[0], target, raw=True)
    torch.testing.assert_close(raw * e[:, 0], paper, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fcam.grad_cam_pp(model, x, model[0], target), scaled(paper, (16, 16)),
                               rtol=1e-4, atol=1e-5)


def test_cam_is_the_channel_mean():
    model, x = net(), images()
    a = model[0](x).detach()
    torch.testing.assert_close(fcam.cam(model, x, model[0], raw=True), a.mean(1))
    torch.testing.assert_close(fcam.cam(model, x, model[0]), scaled(a.mean(1), (16, 16)), rtol=1e-5, atol=1e-5)


def test_a_layer_before_an_in_place_relu_gets_its_own_values_and_gradient():
    """The hooked batch norm's output is then changed in place by ReLU(inplace=True): A and dA are still those of
    the batch norm's output (the negative values and the ReLU's zero gradient there included)."""
    model, x = net(), images()
    stem = model[0][0]  # conv, bn, ReLU(inplace=True)
    bn = stem[1]
    a = bn(stem[0](x))
    rest = torch.nn.Sequential(model[0][1], model[1])
    y = rest(F.relu(a))
    t = y.argmax(1)
    da, = torch.autograd.grad(y[torch.arange(3), t].sum(), a)
    assert (a < 0).any() and (da == 0).any()
    want = torch.relu(torch.einsum("bk,bkij->bij", da.mean((2, 3)), a.detach()))
    torch.testing.assert_close(fcam.grad_cam(model, x, bn, raw=True), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fcam.cam(model, x, "0.0.1", raw=True), a.detach().mean(1))


def test_a_constant_map_scales_to_zeros():
    model, x = net(), images()
    with torch.no_grad():
        model[1][2].weight.zero_()  # no gradient reaches A: every Grad-CAM weight is 0
    heat = fcam.grad_cam(model, x, model[0])
    assert heat.shape == (3, 16, 16) and (heat == 0).all()


# ---- nothing left behind -----------------------------------------------------------------------------------------
def _no_hooks(model):
    assert not (_mm._global_forward_hooks or _mm._global_forward_pre_hooks or _mm._global_backward_hooks
                or _mm._global_backward_pre_hooks)
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks), m


def _tensors_shaped(shape):
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and tuple(o.shape) == shape)


CALLS = [lambda m, x, layer: fcam.cam(m, x, layer), lambda m, x, layer: fcam.grad_cam(m, x, layer),
         lambda m, x, layer: fcam.grad_cam_pp(m, x, layer, target=1)]


@pytest.mark.parametrize("call", CALLS, ids=["cam", "grad_cam", "grad_cam_pp"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_no_hook_gradient_or_activation_is_left_behind(call, fused):
    model = net()
    if fused:
        model = fastfuse.fuse(model)
    model.train()  # the call runs in eval mode and restores every module's mode
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    layer = model[0][1]
    outs = []
    spy = layer.register_forward_hook(lambda m, i, o: outs.append(weakref.ref(o)))
    a_shape = (3, K, 8, 8)
    before = _tensors_shaped(a_shape)
    heat = call(model, x, layer)
    spy.remove()
    assert heat.shape == (3, 16, 16)
    assert len(outs) == 1 and outs[0]() is None, "the layer's output (and the graph) is still alive"
    assert _tensors_shaped(a_shape) == before, "an activation or its gradient is still alive"
    _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # eval mode: the running statistics did not move
        assert torch.equal(v, stats[k]), k


@pytest.mark.parametrize("bad", [
    dict(target=N_CLS), dict(target=-1), dict(target=[0, 1]), dict(target=1.5)], ids=str)
def test_hooks_are_removed_after_an_error(bad):
    model = net().train()
    x = images()
    a_shape = (3, K, 8, 8)
    before = _tensors_shaped(a_shape)
    with pytest.raises(ValueError):
        fcam.grad_cam(model, x, model[0], **bad)  # raised after the forward, with the hooks in place
    _no_hooks(model)
    assert _tensors_shaped(a_shape) == before
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


# ---- errors ------------------------------------------------------------------------------------------------------
def test_errors():
    model, x = net(), images()
    with pytest.raises(ValueError, match="not a module of"):
        fcam.grad_cam(model, x, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="not a module of.*children: '0', '1'"):
        fcam.cam(model, x, "body")
    with pytest.raises(TypeError, match="layer must be"):
        fcam.cam(model, x, 3)
    with pytest.raises(ValueError, match=r"target class 5 is out of range for a model with 5 outputs \(0..4\)"):
        fcam.grad_cam(model, x, model[0], target=5)
    with pytest.raises(ValueError, match="target class -1 is out of range"):
        fcam.grad_cam_pp(model, x, model[0], target=[0, -1, 2])
    with pytest.raises(ValueError, match="one class or one per image"):
        fcam.grad_cam(model, x, model[0], target=[[0, 1, 2]])
    with pytest.raises(ValueError, match="class indices"):
        fcam.grad_cam(model, x, model[0], target=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got shape \(3, 16, 16\); for one image pass x\[None\]"):
        fcam.grad_cam(model, x[0], model[0])
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 3, 16, 16\)"):
        fcam.cam(model, x[None], model[0])
    with pytest.raises(ValueError, match="floating point"):
        fcam.cam(model, (x * 100).to(torch.uint8), model[0])
    with pytest.raises(ValueError, match=r"feature maps \(B, K, h, w\), got \(3, 5\)"):
        fcam.grad_cam(model, x, model[1][2])
    with pytest.raises(ValueError, match=r"class scores \(B, n_classes\), got shape \(3, 8, 8, 8\)"):
        fcam.grad_cam(model[0], x, model[0][1])
    shared = nn.Sequential(model[0][0], model[0][1], model[0][1], model[1])
    with pytest.raises(ValueError, match="ran more than once"):
        fcam.grad_cam(shared, x, model[0][1])
    unused = nn.Sequential(model[0], nn.Identity(), model[1])
    with pytest.raises(ValueError, match="did not run"):
        unused.forward = lambda inp: model(inp)  # the Identity is a module of `unused` that never runs
        fcam.grad_cam(unused, x, unused[1])
    for m in (model, shared, unused):
        _no_hooks(m)


# ---- fused vs eager ----------------------------------------------------------------------------------------------
def _twins():
    eager = net()
    fused = fastfuse.fuse(copy.deepcopy(eager))  # ReflectConv2d, fused BN -> ReLU, the BasicBlock as a fused graph
    convlayer = copy.deepcopy(eager)  # its stem as fastfuse.nn.ConvLayer, the same keys and weights
    stem = fastfuse.nn.ConvLayer(3, K, stride=2)
    stem.load_state_dict(eager[0][0].state_dict())
    convlayer[0][0] = stem
    convlayer = fastfuse.fuse(convlayer).eval()
    assert type(fused[0][1]).__name__ == "BasicBlock" and isinstance(fused[0][1], torch.fx.GraphModule)
    assert isinstance(fused[0][1].bn2, fastfuse.nn.BatchNorm2d)
    return eager, fused, convlayer


@pytest.mark.parametrize("layer", ["0", "0.1", "0.1.bn2", "0.0"])
def test_fused_and_eager_twins_give_the_same_heatmaps(layer):
    eager, fused, convlayer = _twins()
    x = images(4, 24)
    t = eager(x).argmax(1)
    for model in (fused, convlayer):
        torch.testing.assert_close(model(x).argmax(1), t)
        for fn in (fcam.grad_cam, fcam.grad_cam_pp):
            want = fn(eager, x, layer, t)
            torch.testing.assert_close(fn(model, x, layer, t), want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fn(model, x, layer, t, raw=True), fn(eager, x, layer, t, raw=True),
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fcam.cam(model, x, layer), fcam.cam(eager, x, layer), rtol=1e-4, atol=1e-4)
        _no_hooks(model)


# ---- show --------------------------------------------------------------------------------------------------------
def test_show_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    model, x = net(), images(2, 32)
    heat = fcam.grad_cam(model, x, model[0])
    path = tmp_path / "gradcam.png"
    fig = fcam.show(x[0], heat[0], path)  # a normalized (C, H, W) tensor: scaled to [0, 1] for display
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = imread(path)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100 and png[..., :3].std() > 0
    assert fig.axes
    # a gray (1, H, W) image with a raw map at the layer's resolution; an (H, W, 3) uint8 array, no file
    gray = tmp_path / "gray.png"
    fcam.show(x[1, :1], fcam.cam(model, x, model[0], raw=True)[1], str(gray), alpha=0.3, cmap="jet")
    assert gray.stat().st_size > 0
    rgb = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    assert fcam.show(rgb, heat[0]) is not None
    with pytest.raises(ValueError, match="one image's map"):
        fcam.show(x[0], heat)
    with pytest.raises(ValueError, match="image must be"):
        fcam.show(x[0, 0, 0], heat[0])
