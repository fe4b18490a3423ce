"""Train a reflection-padded xresnet18 on real images, fused vs eager, side by side, and look at its Grad-CAM.

    python -m fastfuse.examples.vision [--epochs 8] [--bs 32] [--size 64] [--limit N] [--png PATH]

Data: scikit-image's lfw_subset, which ships inside the scikit-image wheel (pip install "fastfuse[vision]"): no
download at run time. 100 faces and 100 non-faces (patches of the same photos' backgrounds) from Labeled Faces in
the Wild, 25x25 gray; the task is face or not. A fifth of each class is held out for validation.

The images are upsampled to 9/8 of --size (72 for 64): an xresnet halves its input five times, and at 25x25 its last
stage would reach 1x1, where reflection padding cannot pad. Training batches go through fastfuse.nn.BatchAugment
(fastai's aug_transforms: flips, rotations, zooms, perspective warps and lighting, with reflection padding, then
the normalisation, in one pass) down to --size; validation images are only resized and normalised. The model is fastfuse.models.xresnet18 with reflection
padding in every convolution (the stem too), and its eager twin is the same model with each fastfuse module turned
back into the torch class it stands in for: same weights at the start, same batches, so only the kernels differ.
Both train with Adam on a one-cycle schedule. At the end the fused model's Grad-CAM (fastfuse.cam) of three
validation faces and three non-faces, at its last two stages, is saved as a PNG."""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastfuse
from fastfuse.models import xresnet18

CLASSES = ("not a face", "face")


def load_lfw(limit=0):
    """(x, y): x (N, 1, 25, 25) float32 in [0, 1], y (N,) 1 for a face; limit > 0: the first limit // 2 of each."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise SystemExit("this example needs scikit-image's bundled data: pip install 'fastfuse[vision]'") from None
    x = torch.from_numpy(lfw_subset()).float()[:, None]
    y = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long)])  # faces come first
    if limit:
        keep = torch.cat([torch.arange(limit // 2), 100 + torch.arange(limit // 2)])
        x, y = x[keep], y[keep]
    return x, y


def split(x, y, gen, valid_pct=0.2):
    """A random split, stratified: valid_pct of each class held out."""
    train_idx, valid_idx = [], []
    for c in (0, 1):
        idx = torch.nonzero(y == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_valid = max(1, round(len(idx) * valid_pct))
        valid_idx.append(idx[:n_valid])
        train_idx.append(idx[n_valid:])
    t, v = torch.cat(train_idx), torch.cat(valid_idx)
    return (x[t], y[t]), (x[v], y[v])


def resize(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ---- the eager twin ----------------------------------------------------------------------------------------------
class _EagerResBlock(nn.Module):
    """fastai's ResBlock forward, over a fused ResBlock's own children (fastai's layout: convpath, idpath, act)."""

    def forward(self, x):
        return self.act(self.convpath(x) + self.idpath(x))


def eager_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` that runs plain PyTorch: each fastfuse module becomes the torch class it stands in for
    (ReflectConv2d a Conv2d with padding_mode='reflect', the batch norms torch's, ConvLayer an nn.Sequential, ResBlock
    fastai's forward), over the same children, parameters and buffers: the same state_dict."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        cls = type(m)
        if not cls.__module__.startswith("fastfuse"):
            continue
        if cls.__name__ == "ResBlock":
            m.__class__ = _EagerResBlock
            continue
        base = next(b for b in cls.__mro__ if b.__module__.startswith("torch."))
        if base is not nn.Module:  # e.g. an nn.Sequential, nn.Conv2d, nn.BatchNorm2d
            m.__class__ = base
    return twin


class _FastfuseOps(TorchDispatchMode):
    """Records the fastfuse ops that run."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastfuse":
            self.seen.add(func.__name__)
        return func(*args, **(kwargs or {}))


def fastfuse_ops(model, x):
    """The fastfuse ops that one eval-mode forward of `model` runs (eval: the running statistics stay)."""
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), _FastfuseOps() as ops:
            model(x)
    finally:
        for m, t in training:
            m.training = t
    return ops.seen


# ---- the picture -------------------------------------------------------------------------------------------------
def gradcam_picture(fused, x, y, path, per_class=3):
    """Grad-CAM of the first `per_class` validation images of each class, for the class the fused model predicts,
    at its last stage (fused[7], 512 channels at 1/32 of the input) and at the stage before (fused[6], 1/16), under
    each image; saved as a PNG at `path`. Returns the largest difference to the maps of an eager twin of `fused`
    (the same weights: the fused and eager heatmaps agree)."""
    from matplotlib.figure import Figure

    idx = torch.cat([torch.nonzero(y == c)[:per_class, 0] for c in (1, 0)])
    xs, ys = x[idx], y[idx]
    fused.eval()
    with torch.no_grad():
        prob = fused(xs).softmax(1)
    pred = prob.argmax(1)
    rows = [("Grad-CAM, last stage (model[7])", 7), ("Grad-CAM, stage 3 (model[6])", 6)]
    maps = [fastfuse.cam.grad_cam(fused, xs, fused[i], pred) for _, i in rows]
    eager = eager_twin(fused)
    twin = [fastfuse.cam.grad_cam(eager, xs, eager[i], pred) for _, i in rows]
    fig = Figure(figsize=(1.5 * len(idx) + 0.4, 1.6 * (1 + len(rows)) + 0.3), layout="constrained")
    axes = fig.subplots(1 + len(rows), len(idx), squeeze=False)
    for j in range(len(idx)):
        axes[0, j].imshow(xs[j, 0].numpy(), cmap="gray")
        axes[0, j].set_axis_off()
        axes[0, j].set_title(f"{CLASSES[int(ys[j])]}\nsays {CLASSES[int(pred[j])]} {prob[j, pred[j]]:.2f}",
                             fontsize=8)
        for r, heat in enumerate(maps):
            fastfuse.cam.show(xs[j], heat[j], ax=axes[r + 1, j])
    for r, (label, _) in enumerate(rows):
        axes[r + 1, 0].text(-0.08, 0.5, label.replace(", ", "\n"), transform=axes[r + 1, 0].transAxes,
                            rotation=90, ha="right", va="center", fontsize=8)
    fig.suptitle("xresnet18 (reflection padding, fastfuse) on lfw_subset validation images", fontsize=9)
    fig.savefig(path, format="png", dpi=100)
    return max((a - b).abs().max().item() for a, b in zip(maps, twin))


# ---- training ----------------------------------------------------------------------------------------------------
def accuracy(model, x, y, bs=64):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])
    return (pred == y).float().mean().item()


def train_epoch(model, opt, sched, batches, desc):
    from tqdm import tqdm
    model.train()
    t0 = time.perf_counter()
    losses = []
    for xb, yb in tqdm(batches, desc=desc, leave=False):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return time.perf_counter() - t0, sum(losses) / len(losses)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastfuse.examples.vision", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--size", type=int, default=64, help="the training crop (images are upsampled to 9/8 of it)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--limit", type=int, default=0, help="use only LIMIT images, half faces (a quick run)")
    ap.add_argument("--png", default="vision_gradcam.png", help="where the Grad-CAM picture goes")
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    (x_train, y_train), (x_valid, y_valid) = split(*load_lfw(args.limit), gen)
    aug = fastfuse.nn.BatchAugment(args.size, mean=[x_train.mean().item()], std=[x_train.std().item()])
    big = args.size * 9 // 8
    x_train = resize(x_train, big)
    x_valid = aug.eval()(resize(x_valid, big))  # eval mode: resize and normalise only
    aug.train()
    print(f"data: scikit-image lfw_subset, {len(y_train)} training and {len(y_valid)} validation images "
          f"(half faces), 25x25 gray -> {big}x{big}, augmented to {args.size}x{args.size} (fastfuse.nn.BatchAugment)")

    torch.manual_seed(args.seed)
    fused = xresnet18(n_out=2, c_in=1, padding_mode="reflect")
    eager = eager_twin(fused)  # the same initial weights
    ops = fastfuse_ops(fused, x_valid[:2]), fastfuse_ops(eager, x_valid[:2])
    if not ops[0] or ops[1]:
        raise RuntimeError(f"the fused model should run fastfuse ops and its eager twin none; they run {ops}")
    n_params = sum(p.numel() for p in fused.parameters())
    print(f"model: xresnet18(n_out=2, c_in=1, padding_mode='reflect'), {n_params / 1e6:.1f}M parameters; "
          f"fused runs {', '.join(sorted(ops[0]))}")

    n_batches = len(y_train) // args.bs  # drop the last partial batch, as fastai's training DataLoader
    if n_batches == 0:
        raise SystemExit(f"--bs {args.bs} is larger than the {len(y_train)} training images")
    models = {"fused": fused, "eager": eager}
    opts = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in models.items()}
    scheds = {k: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=args.lr, total_steps=args.epochs * n_batches)
              for k, o in opts.items()}
    times = {k: [] for k in models}
    losses = {}
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        xb_all = aug(x_train[perm])  # this epoch's augmented images, the same for both models
        batches = [(xb_all[i * args.bs:(i + 1) * args.bs], y_train[perm][i * args.bs:(i + 1) * args.bs])
                   for i in range(n_batches)]
        for name, model in models.items():
            dt, losses[name] = train_epoch(model, opts[name], scheds[name], batches,
                                           f"{name} epoch {epoch + 1}/{args.epochs}")
            times[name].append(dt)
            print(f"  {name:5s} epoch {epoch + 1}: {dt:6.2f} s  train loss {losses[name]:.4f}  "
                  f"valid accuracy {accuracy(model, x_valid, y_valid):.3f}")

    results = {k: (sum(times[k]) / len(times[k]), accuracy(m, x_valid, y_valid), losses[k]) for k, m in models.items()}
    print(f"\n{'model':8s} {'s/epoch':>8s} {'accuracy':>9s}")
    for name, (t, acc, _) in results.items():
        print(f"{name:8s} {t:8.2f} {acc:9.3f}")
    print(f"fused speedup per epoch: {results['eager'][0] / results['fused'][0]:.2f}x "
          f"(torch {torch.get_num_threads()} threads)")

    diff = gradcam_picture(fused, x_valid, y_valid, args.png)
    print(f"Grad-CAM of validation images: {args.png} (the fused model's maps; an eager twin of the trained model, "
          f"with its weights, gives the same to {diff:.1e})")
    return results


if __name__ == "__main__":
    main()
