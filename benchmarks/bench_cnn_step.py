"""A whole training step (forward, cross-entropy, backward, SGD step) of a small torchvision-style ResNet
(BasicBlocks of Conv2d -> BatchNorm2d -> ReLU with residual adds; 4 stages, 32 to 256 channels), as a user who
calls fastfuse.fuse(model) gets it: fastfuse's BatchNorm2d swapped in, the zero-padded convolutions kept. Against
the same model unfused (eager) and torch.compile of it. Small inputs, where per-call overhead shows."""
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


def cases(device, quick):
    shapes = [(4, 32)] if quick else [(4, 32), (16, 64)]  # (batch, image side)
    out = []
    for B, S in shapes:
        torch.manual_seed(0)
        eager = small_resnet().to(device).train()
        fused = fastfuse.fuse(copy.deepcopy(eager))
        twin = copy.deepcopy(eager)
        x, y = torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device)
        provs = {"fastfuse": _step(fused, x, y), "eager": _step(eager, x, y),
                 "compile": _step(twin, x, y, forward=torch.compile(twin))}
        nbytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        dst = torch.empty_like(x)
        out.append(StepCase(OP, (B, 3, S, S), torch.float32, nbytes, nbytes, provs,
                            copy=lambda d=dst, s=x: d.copy_(s), clone=lambda s=x: s.clone()))
    return out
