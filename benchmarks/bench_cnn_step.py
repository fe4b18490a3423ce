"""Whole training steps (forward, cross-entropy, backward, SGD step) of two small CNNs, against the same model in
plain torch (eager) and torch.compile of that, on small inputs where per-call overhead shows:
- cnn_step: a torchvision-style ResNet (BasicBlocks of Conv2d -> BatchNorm2d -> ReLU with residual adds; 4 stages,
  32 to 256 channels), as a user who calls fastfuse.fuse(model) gets it: fastfuse's BatchNorm2d swapped in, the
  zero-padded convolutions kept;
- convlayer_step: six fastai-style ConvLayers with reflection padding (fastfuse.nn.ConvLayer: reflect_conv2d, then
  one fused BN -> ReLU), three of them stride 2, against nn.Conv2d(padding_mode='reflect') -> BatchNorm2d -> ReLU;
- xresnet18_step: fastfuse.models.xresnet18 (reflection padding in every conv, fused ResBlocks) against the same
  model in fastai's layout in plain torch ("eager": nn.Conv2d(padding_mode='reflect'), nn.BatchNorm2d, fastai's
  ResBlock forward), torch.compile of that, and the zero-padded eager model ("zeros", what padding costs);
  CPU batch 16 at 64x64, GPU batch 64 at 224x224 in bf16 autocast; channels_last ("_cl") and NCHW;
- tv_resnet18_step / tv_resnet18_inf: fastfuse.fuse() on torchvision's resnet18 (zero-padded: only BN -> ReLU and
  BN + add -> ReLU fuse), a training step and inference (eval, no_grad), as a new user would try it."""
import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastfuse
from fastfuse.bench import StepCase, sgd_step
from fastfuse.models import xresnet18
from fastfuse.nn import ResBlock

OP = "cnn_step"
XRESNET = "xresnet18_step"
TV_STEP, TV_INF = "tv_resnet18_step", "tv_resnet18_inf"
# (op, device) -> {provider compared with: min speedup of fastfuse over it}; printed by check_targets, never asserted
TARGETS = {(XRESNET + "_cl", "cpu"): {"eager": 1.3, "compile": 1.1, "zeros": 1.0},
           (XRESNET, "cpu"): {"eager": 1.2},
           (XRESNET + "_cl", "cuda"): {"eager": 1.2, "compile": 1.0},
           (TV_STEP + "_cl", "cpu"): {"eager": 1.1}, (TV_STEP, "cpu"): {"eager": 1.1},
           (TV_INF + "_cl", "cpu"): {"eager": 1.0}, (TV_INF, "cpu"): {"eager": 1.0}}


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


def _small_cases(device, quick):
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


# ---- xresnet18 and torchvision's resnet18 ----------------------------------------------------------------------------
class _EagerResBlock(nn.Module):
    """fastai's ResBlock forward over a fastfuse ResBlock's children (plain torch once they are retyped)."""

    def forward(self, x):
        return self.act(self.convpath(x) + self.idpath(x))


def eager_twin(model):
    """A copy of a fastfuse model in plain torch, fastai's layout and keys: ReflectConv2d -> nn.Conv2d(padding_mode=
    'reflect'), fastfuse's BatchNorm -> torch's, ConvLayer -> nn.Sequential, ResBlock -> fastai's forward."""
    twin = copy.deepcopy(model)
    retype = {fastfuse.nn.ReflectConv2d: nn.Conv2d, fastfuse.nn.BatchNorm2d: nn.BatchNorm2d,
              fastfuse.nn.BatchNorm1d: nn.BatchNorm1d, fastfuse.nn.ConvLayer: nn.Sequential, ResBlock: _EagerResBlock,
              fastfuse.nn.Dropout: nn.Dropout}
    for m in twin.modules():
        cls = retype.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return twin


def _autocast(device, dtype):
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def _amp(fn, device, dtype):
    def run(*args):
        with _autocast(device, dtype):
            return fn(*args)
    return run


def _inference(model, x, device, dtype):
    def run():
        with torch.no_grad(), _autocast(device, dtype):
            return model(x)
    return {"inf": run}


def _formats(quick):
    """channels_last is the targets' layout; --quick (CI's smoke run, the GPU check) times only it."""
    return (torch.channels_last,) if quick else (torch.channels_last, torch.contiguous_format)


def _sizes(device, quick):
    """(batch, image side, dtype) of the whole-model steps: the issue's shapes, or a small batch for --quick."""
    B, S, dtype = (64, 224, torch.bfloat16) if device == "cuda" else (16, 64, torch.float32)
    return (4, 64, dtype) if quick else (B, S, dtype)


def _xresnet_cases(device, quick):
    B, S, dtype = _sizes(device, quick)
    out = []
    for fmt in _formats(quick):
        torch.manual_seed(0)
        fused = xresnet18(n_out=10)
        eager = eager_twin(fused)
        zeros = xresnet18(n_out=10, padding_mode="zeros")
        zeros.load_state_dict(fused.state_dict())
        zeros = eager_twin(zeros)
        twin = copy.deepcopy(eager)
        fused, eager, zeros, twin = (m.to(device, memory_format=fmt).train() for m in (fused, eager, zeros, twin))
        x = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (B,), device=device)
        compiled = torch.compile(twin)
        provs = {"fastfuse": _step(fused, x, y, _amp(fused, device, dtype)),
                 "eager": _step(eager, x, y, _amp(eager, device, dtype)),
                 "compile": _step(twin, x, y, _amp(compiled, device, dtype)),
                 "zeros": _step(zeros, x, y, _amp(zeros, device, dtype))}
        nbytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        dst = torch.empty_like(x)
        op = XRESNET + ("_cl" if fmt is torch.channels_last else "")
        out.append(StepCase(op, (B, 3, S, S), dtype, nbytes, nbytes, provs,
                            copy=lambda d=dst, s=x: d.copy_(s), clone=lambda s=x: s.clone()))
    return out


def _torchvision_cases(device, quick):
    try:
        import torchvision
    except ImportError:
        return []
    B, S, dtype = _sizes(device, quick)
    out = []
    for fmt in _formats(quick):
        torch.manual_seed(0)
        eager = torchvision.models.resnet18(num_classes=10)
        fused = fastfuse.fuse(copy.deepcopy(eager))
        twin = copy.deepcopy(eager)
        fused, eager, twin = (m.to(device, memory_format=fmt) for m in (fused, eager, twin))
        x = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (B,), device=device)
        compiled = torch.compile(twin)
        sfx = "_cl" if fmt is torch.channels_last else ""
        nbytes = sum(p.numel() * p.element_size() for p in eager.parameters())
        dst = torch.empty_like(x)
        base = dict(copy=lambda d=dst, s=x: d.copy_(s), clone=lambda s=x: s.clone())
        provs = {"fastfuse": _step(fused.train(), x, y, _amp(fused, device, dtype)),
                 "eager": _step(eager.train(), x, y, _amp(eager, device, dtype)),
                 "compile": _step(twin.train(), x, y, _amp(compiled, device, dtype))}
        out.append(StepCase(TV_STEP + sfx, (B, 3, S, S), dtype, nbytes, nbytes, provs, **base))
        # inference on eval-mode copies (the step's models keep training)
        fused_e, eager_e, twin_e = (copy.deepcopy(m).eval() for m in (fused, eager, twin))
        provs = {"fastfuse": _inference(fused_e, x, device, dtype), "eager": _inference(eager_e, x, device, dtype),
                 "compile": _inference(torch.compile(twin_e), x, device, dtype)}
        out.append(StepCase(TV_INF + sfx, (B, 3, S, S), dtype, nbytes, nbytes, provs, **base))
    return out


def cases(device, quick):
    return _small_cases(device, quick) + _xresnet_cases(device, quick) + _torchvision_cases(device, quick)


def check_targets(rows, device):
    """Print the issue's speed targets against this run (never asserted in tests)."""
    ms = {(r["op"], r["provider"], r["mode"]): r["ms_p50"] for r in rows}
    for r in rows:
        want = TARGETS.get((r["op"], device))
        if want is None or r["provider"] != "fastfuse":
            continue
        got = {p: ms[(r["op"], p, r["mode"])] / r["ms_p50"] for p in want if (r["op"], p, r["mode"]) in ms}
        ok = all(got.get(p, 0.0) >= v for p, v in want.items())
        print(f"target {r['op']} {r['shape']} {r['mode']}: " + ", ".join(f">= {v}x {p}" for p, v in want.items())
              + ": " + ", ".join(f"{got[p]:.2f}x {p}" for p in got) + f" ({'met' if ok else 'NOT met'})")
