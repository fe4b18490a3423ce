"""Heatmaps of where a CNN looks: CAM, Grad-CAM and Grad-CAM++, taken through hooks.

    heat = fastfuse.cam.grad_cam(model, x, model[7])   # (B, H, W) in [0, 1], x: (B, C, H, W)
    fastfuse.cam.show(x[0], heat[0], "gradcam.png")

In each method A is `layer`'s output, (B, K, h, w), and y the model's output, (B, n_classes):
- cam:         the channel mean of A (the fast.ai lesson's heatmap): (1/K) sum_k A_k.
- grad_cam:    ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of dy_c/dA_k (Selvaraju et al., 2017).
- grad_cam_pp: ReLU(sum_k w_k A_k), w_k = sum_ij a_kij ReLU(g_kij) with g = dy_c/dA and
               a_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab g_kij^3), 0 where that denominator is 0
               (Chattopadhyay et al., 2018, for an exponential score S_c = exp(y_c); exp(y_c) cancels from a).
c is `target`: None for each image's predicted class, an int for one class for all, or one class per image.

The maps come back at the input's size, bilinearly upsampled and scaled to [0, 1] per image (min -> 0, max -> 1;
a constant map gives zeros), or with raw=True at the layer's resolution, (B, h, w), unscaled.

The model runs in eval mode (batch norm on its running statistics, no dropout), every module's mode restored
afterwards, and no parameter's .grad is touched. A is taken by a forward hook, cloned at once, and dA by
Tensor.register_hook on the layer's output, registered in that hook: both see the values of the layer's output
itself, even when the next layer is an in-place ReLU (a hook on a tensor that is later changed in place gets the
gradient for its value before the change). The backward stops at the layer. Every hook is removed when the call
ends, by an error too, and nothing of A or dA is kept. fastfuse's fused blocks see a hook on a child and run their
children one by one for that call (fastfuse.nn._hooks), so a layer inside a fused block is hooked correctly."""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cam", "grad_cam", "grad_cam_pp", "show"]


def cam(model: nn.Module, x: torch.Tensor, layer, *, raw: bool = False) -> torch.Tensor:
    """The channel mean of `layer`'s output A: (B, H_in, W_in) in [0, 1], or (B, h, w) with raw=True."""
    act, _ = _capture(model, x, layer, need_grad=False)
    return _finish(act.mean(1), x, raw)


def grad_cam(model: nn.Module, x: torch.Tensor, layer, target=None, *, raw: bool = False) -> torch.Tensor:
    """Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of d y_target / d A_k."""
    act, grad = _capture(model, x, layer, need_grad=True, target=target)
    return _finish(grad_cam_map(act, grad), x, raw)


def grad_cam_pp(model: nn.Module, x: torch.Tensor, layer, target=None, *, raw: bool = False) -> torch.Tensor:
    """Grad-CAM++: ReLU(sum_k w_k A_k) with the weights of Chattopadhyay et al. (see the module's doc)."""
    act, grad = _capture(model, x, layer, need_grad=True, target=target)
    return _finish(grad_cam_pp_map(act, grad), x, raw)


# ---- the formulas, on A and dA (B, K, h, w) ----------------------------------------------------------------------
def grad_cam_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    alpha = grad.mean((2, 3), keepdim=True)
    return torch.relu((alpha * act).sum(1))


def grad_cam_pp_map(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    g2 = grad * grad
    g3 = g2 * grad
    denom = 2 * g2 + act.sum((2, 3), keepdim=True) * g3
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    a = torch.where(denom != 0, g2 / safe, torch.zeros_like(denom))
    w = (a * torch.relu(grad)).sum((2, 3), keepdim=True)
    return torch.relu((w * act).sum(1))


def _finish(maps: torch.Tensor, x: torch.Tensor, raw: bool) -> torch.Tensor:
    if raw:
        return maps
    up = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - lo
    return torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(up))


# ---- hooks -------------------------------------------------------------------------------------------------------
def _resolve_layer(model: nn.Module, layer) -> nn.Module:
    """layer: a module of `model`, or its name in model.named_modules() ('7', '0.4.1')."""
    if isinstance(layer, str):
        names = dict(model.named_modules())
        if layer not in names:
            top = ", ".join(repr(n) for n, _ in model.named_children())
            raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__} (its children: {top}); "
                             "name a module as model.named_modules() does, e.g. '7' or '0.4.1'")
        return names[layer]
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a module of the model or its name, got {type(layer).__name__}")
    if not any(m is layer for m in model.modules()):
        raise ValueError(f"layer {type(layer).__name__} is not a module of {type(model).__name__}: pass one of "
                         "model.modules() (after fastfuse.fuse(), take it from the fused model: fuse swaps modules)")
    return layer


def _check_images(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of images (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        hint = "; for one image pass x[None]" if x.dim() == 3 else ""
        raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point (normalized images), got {x.dtype}")


def _targets(out: torch.Tensor, target) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model's output must be class scores (B, n_classes), got {got}")
    n_cls = out.shape[1]
    if target is None:
        return out.argmax(1)
    t = torch.as_tensor(target, device=out.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"target must be class indices (int), got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(out.shape[0])
    if t.shape != (out.shape[0],):
        raise ValueError(f"target must be one class or one per image ({out.shape[0]}), got shape {tuple(t.shape)}")
    bad = (t < 0) | (t >= n_cls)
    if bad.any():
        raise ValueError(f"target class {t[bad][0].item()} is out of range for a model with {n_cls} outputs "
                         f"(0..{n_cls - 1})")
    return t.long()


@contextmanager
def _eval_mode(model):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _capture(model, x, layer, need_grad, target=None):
    """(A, dA) of `layer` for the batch x: A (B, K, h, w) float32, dA the gradient of the target classes' scores
    (their sum over the batch; each image's own score depends on its image only in eval mode), or None."""
    _check_images(x)
    module = _resolve_layer(model, layer)
    store = {"calls": 0}
    handles = []

    def forward_hook(mod, args, out):
        store["calls"] += 1
        if store["calls"] > 1:
            raise ValueError(f"layer {type(mod).__name__} ran more than once in one forward: pick a layer that "
                             "runs once")
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"layer {type(mod).__name__} must output feature maps (B, K, h, w), got {shape}")
        store["act"] = out.detach().clone()  # now: an in-place op after the layer would change `out` itself
        if need_grad:
            if not out.requires_grad:
                raise ValueError(f"layer {type(mod).__name__}'s output has no gradient (is it computed under "
                                 "torch.no_grad() or detached inside the model?)")
            store["edge"] = torch.autograd.graph.get_gradient_edge(out)  # where the backward stops
            handles.append(out.register_hook(lambda g: store.__setitem__("grad", g.detach())))

    handles.append(module.register_forward_hook(forward_hook))
    out = score = None
    try:
        with _eval_mode(model), torch.inference_mode(False):
            if need_grad:
                with torch.enable_grad():
                    # a leaf that requires grad: A has a gradient even where the parameters before it are frozen
                    out = model(x.detach().clone().requires_grad_(True))
                    if store["calls"] == 0:
                        raise ValueError(f"layer {type(module).__name__} did not run in the model's forward")
                    t = _targets(out, target)
                    score = out.gather(1, t[:, None]).sum()
                    # the backward from the scores to the layer only; the tensor hook takes dA
                    torch.autograd.grad(score, store["edge"], allow_unused=True)
                    if "grad" not in store:
                        raise ValueError(f"the model's output does not depend on layer {type(module).__name__}")
                    grad = store.pop("grad").float()
            else:
                with torch.no_grad():
                    model(x)
                if store["calls"] == 0:
                    raise ValueError(f"layer {type(module).__name__} did not run in the model's forward")
                grad = None
        return store.pop("act").float(), grad
    finally:
        for h in handles:
            h.remove()
        store.clear()
        out = score = None  # noqa: F841  (a traceback keeps this frame: not the graph, nor the activations in it)


# ---- showing -----------------------------------------------------------------------------------------------------
def _to_numpy(t):
    import numpy as np
    if isinstance(t, torch.Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def _image_hwc(image):
    """image as an (H, W) or (H, W, 3) float array in [0, 1]: a tensor (C, H, W) or (H, W), C in 1, 3; an array
    (H, W), (H, W, C) or a PIL image; uint8 divided by 255, any other range scaled by its min and max."""
    import numpy as np
    is_tensor = isinstance(image, torch.Tensor)
    a = _to_numpy(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if is_tensor and a.ndim == 3:
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"image must be (C, H, W) as a tensor, or (H, W[, C]) as an array, with C 1 or 3; got "
                         f"shape {tuple(image.shape) if hasattr(image, 'shape') else a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def show(image, heat, path=None, alpha: float = 0.5, cmap: str = "magma", *, ax=None, title=None):
    """Overlay `heat` (H, W), one image's map from cam/grad_cam/grad_cam_pp (a raw map is stretched over the
    image, bilinearly), on `image` (see _image_hwc for the layouts taken) with matplotlib. Draws into `ax` when
    given (a grid of pictures), else into a new Figure; saves the figure as a PNG at `path` when given. Returns
    the Figure (a notebook shows it; no pyplot state is touched)."""
    from matplotlib.figure import Figure  # the vision extra: pip install "fastfuse[vision]"

    img = _image_hwc(image)
    h = _to_numpy(heat)
    while h.ndim > 2 and h.shape[0] == 1:
        h = h[0]
    if h.ndim != 2:
        raise ValueError(f"heat must be one image's map (H, W), got shape {tuple(heat.shape)}")
    height, width = img.shape[:2]
    extent = (0, width, height, 0)
    if ax is None:
        fig = Figure(figsize=(4, 4 * height / width))
        ax = fig.add_axes((0, 0, 1, 1) if title is None else (0, 0, 1, 0.9))
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=extent, interpolation="nearest")
    ax.imshow(h, cmap=cmap, alpha=alpha, extent=extent, interpolation="bilinear")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=9)
    if path is not None:
        ax.figure.savefig(path, format="png")
    return ax.figure
