"""Whole training steps (forward, cross-entropy, backward, SGD step) of two small CNNs, against the same model in
plain torch (eager) and torch.compile of that, on small inputs where per-call overhead shows:
- cnn_step: a torchvision-style ResNet (BasicBlocks of Conv2d -> BatchNorm2d -> ReLU with residual adds; 4 stages,
  32 to 256 channels), as a user who calls fastfuse.fuse(model) gets it: fastfuse's BatchNorm2d swapped in, the
  zero-padded convolutions kept;
- convlayer_step: six fastai-style ConvLayers with reflection padding (fastfuse.nn.ConvLayer: reflect_conv2d, then
  one fused BN -> ReLU), three of them stride 2, against nn.Conv2d(padding_mode='reflect') -> BatchNorm2d -> ReLU."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse.bench import StepCase, sgd_step

OP = "cnn_step"


class _Block(nn.Module):
    def __init__(self, ni, nf, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(nf)
        self.down = None
        if stride != 1 or ni != nf:
            self.down = nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)


def small_resnet(n_classes=10):
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         _Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 128, 2), _Block(128, 256, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, n_classes))


def _step(model, x, y, forward=None):
    return sgd_step(model, (x,), lambda out: F.cross_entropy(out, y), 1e-3, forward)


def _eager_conv_layer(ni, nf, stride=1):
    return nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False, padding_mode="reflect"), nn.BatchNorm2d(nf),
                         nn.ReLU())


def conv_layer_net(layer, n_classes=10):
    return nn.Sequential(layer(3, 32, stride=2), layer(32, 32), layer(32, 64, stride=2), layer(64, 64),
                         layer(64, 128, stride=2), layer(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, n_classes))


def _models(op):
    """(fastfuse model, eager model) with the same weights."""
    if op == OP:
        eager = small_resnet()
        return fastfuse.fuse(copy.deepcopy(eager)), eager
    fused = conv_layer_net(lambda ni, nf, stride=1: fastfuse.nn.ConvLayer(ni, nf, 3, stride))
    eager = conv_layer_net(_eager_conv_layer)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def cases(device, quick):
    shapes = [(4, 32)] if quick else [(4, 32), (16, 64)]  # (batch, image side)
    # (op, batch, side, memory format): the ResNet also in channels_last, every provider's model converted
    # (model.to(memory_format=torch.channels_last)): on CPU that layout, which torch.compile picks by itself for
    # convolutions, is most of compile's lead over eager NCHW
    runs = [(op, B, S, torch.contiguous_format) for op in (OP, "convlayer_step") for B, S in shapes]
    if not quick:  # and the ConvLayer net, where on AVX-512 CPUs reflect_conv2d's direct design takes over
        runs += [(op + "_cl", 16, 64, torch.channels_last) for op in (OP, "convlayer_step")]
    out = []
    for op, B, S, fmt in runs:
        torch.manual_seed(0)
        fused, eager = (m.to(device, memory_format=fmt).train() for m in _models(op.removesuffix("_cl")))
        twin = copy.deepcopy(eager)
        x, y = torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device)
        x = x.contiguous(memory_format=fmt)
        provs = {"fastfuse": _step(fused, x, y), "eager": _step(eager, x, y),
                 "compile": _step(twin, x, y, forward=torch.compile(twin))}
        nbytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        dst = torch.empty_like(x)
        out.append(StepCase(op, (B, 3, S, S), torch.float32, nbytes, nbytes, provs,
                            copy=lambda d=dst, s=x: d.copy_(s), clone=lambda s=x: s.clone()))
    return out
