"""BatchAugment: fastai's aug_transforms (flip, warp, rotate, zoom, brightness, contrast) plus Normalize, applied to
a batch in one fastfuse.augment call.

Parameter draws. Every parameter is drawn on torch's default CPU generator, the per-image matrices are composed on
the CPU (a handful of numbers per image, and an 8x8 solve for the warp), and the result goes to the batch's
device in one non-blocking copy from pinned memory. Why not Philox on the device, as dropout does: the draws are a
few numbers per image, so generating them is not worth a kernel; composing them (matrix products, fastai's
perspective solve) on a GPU would be a dozen tiny launches, and torch.linalg.solve checks its result on the host;
the CPU generator makes the same torch.manual_seed give the same parameters on every device; and a pinned
non-blocking copy never waits for the GPU. Drawing causes no host sync."""
import math
import numbers

import torch
from torch import nn

from ..ops.augment import PAD_MODES, augment

_DIHEDRAL = torch.tensor([  # fastai's dihedral_mat: (xs, ys, m0, m1) for k = 0..7
    [1, -1, 1, -1, -1, 1, 1, -1], [1, 1, -1, 1, -1, -1, 1, -1], [1, 1, 1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 1, 1, 1]],
    dtype=torch.float64)


def _check_p(name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(float(p)) or not 0 <= p <= 1:
        raise ValueError(f"BatchAugment: {name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def warp_matrix(x_t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """fastai's perspective warp (_WarpCoord) as (B, 3, 3) matrices: the homography that maps the corners
    (-1-y, -1-x), (-1+y, 1+x), (1+y, -1+x), (1-y, 1-x) onto (-1, -1), (-1, 1), (1, -1), (1, 1) (find_coeffs)."""
    B = x_t.shape[0]
    dt = x_t.dtype
    orig = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=dt).expand(B, 4, 2)
    targ = torch.stack([torch.stack([-1 - y_t, -1 - x_t], 1), torch.stack([-1 + y_t, 1 + x_t], 1),
                        torch.stack([1 + y_t, -1 + x_t], 1), torch.stack([1 - y_t, 1 - x_t], 1)], 1)
    one, zero = torch.ones(B, dtype=dt), torch.zeros(B, dtype=dt)
    rows = []
    for i in range(4):  # p1 = orig (the result), p2 = targ (the argument), as fastai's find_coeffs(orig, targ)
        (qx, qy), (px, py) = targ[:, i].unbind(1), orig[:, i].unbind(1)
        rows.append(torch.stack([qx, qy, one, zero, zero, zero, -px * qx, -px * qy], 1))
        rows.append(torch.stack([zero, zero, zero, qx, qy, one, -py * qx, -py * qy], 1))
    coeffs = torch.linalg.solve(torch.stack(rows, 1), orig.reshape(B, 8, 1))[..., 0]
    return torch.cat([coeffs, one[:, None]], 1).view(B, 3, 3)


class BatchAugment(nn.Module):
    """fastai's aug_transforms on a batch, with its signature, defaults and distributions, then Normalize:
    flip with p 0.5 (with flip_vert: one of the 8 dihedral transforms); with probability p_affine each: a
    perspective warp of magnitude uniform in +-max_warp in x and in y (each its own coin), a rotation uniform in
    +-max_rotate degrees, a zoom uniform in [min_zoom, max_zoom] about a uniform random centre; with probability
    p_lighting each: brightness uniform in 0.5 (1 +- max_lighting) and contrast log-uniform in
    [1 - max_lighting, 1 / (1 - max_lighting)]. mult scales max_rotate, max_lighting and max_warp.
    Training mode draws per-image parameters and calls fastfuse.augment; eval mode resizes (bilinear,
    align_corners=True) and normalises only. Input (B, C, H, W) uint8 or float in [0, 1]; output float32."""

    def __init__(self, size, mult=1.0, do_flip=True, flip_vert=False, max_rotate=10., min_zoom=1., max_zoom=1.1,
                 max_lighting=0.2, max_warp=0.2, p_affine=0.75, p_lighting=0.75, pad_mode="reflection", mean=None,
                 std=None):
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, numbers.Integral) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"BatchAugment: size must be a positive int or (h, w), got {size!r}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"BatchAugment: pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if min_zoom > max_zoom:
            raise ValueError(f"BatchAugment: min_zoom ({min_zoom}) must not exceed max_zoom ({max_zoom})")
        if not 0 <= max_lighting * mult < 1:
            raise ValueError(f"BatchAugment: max_lighting * mult must be in [0, 1), got {max_lighting * mult}")
        self.mult, self.do_flip, self.flip_vert = mult, do_flip, flip_vert
        self.max_rotate, self.max_lighting, self.max_warp = max_rotate * mult, max_lighting * mult, max_warp * mult
        self.min_zoom, self.max_zoom = min_zoom, max_zoom
        self.p_affine, self.p_lighting = _check_p("p_affine", p_affine), _check_p("p_lighting", p_lighting)
        self.pad_mode = pad_mode
        if (mean is None) != (std is None):
            raise ValueError("BatchAugment: mean and std come together (or neither)")
        if mean is not None:
            mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
            std = torch.as_tensor(std, dtype=torch.float32).flatten()
            if mean.shape != std.shape:
                raise ValueError(f"BatchAugment: mean and std must have the same length, got {len(mean)} and "
                                 f"{len(std)}")
            if bool((std == 0).any()):
                raise ValueError(f"BatchAugment: std must be non-zero, got {std.tolist()}")
        # not part of the state_dict (fastai's transforms have none); they move with .to(device)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def extra_repr(self):
        return (f"size={self.size}, mult={self.mult}, do_flip={self.do_flip}, flip_vert={self.flip_vert}, "
                f"max_rotate={self.max_rotate}, min_zoom={self.min_zoom}, max_zoom={self.max_zoom}, "
                f"max_lighting={self.max_lighting}, max_warp={self.max_warp}, p_affine={self.p_affine}, "
                f"p_lighting={self.p_lighting}, pad_mode={self.pad_mode!r}")

    def draw(self, batch_size: int, device=None, in_size=None) -> dict:
        """The parameters and matrices a training call on a batch of batch_size images of in_size (H, W) (default
        square) would use, drawn from torch's default CPU generator, on `device`: flip ((B,) +-1, or the dihedral
        index with flip_vert), rotate (degrees), zoom, col_pct, row_pct, warp_x, warp_y, brightness, contrast
        ((B,), or None without lighting) and matrix ((B, 3, 3), the op's argument)."""
        B = int(batch_size)
        f64 = dict(dtype=torch.float64)

        def coin(p):
            return torch.rand(B, **f64) < p

        def uniform(lo, hi):
            return torch.rand(B, **f64) * (hi - lo) + lo

        one, zero = torch.ones(B, **f64), torch.zeros(B, **f64)
        out = {}
        if self.do_flip and self.flip_vert:
            k = torch.where(coin(0.5), torch.randint(0, 8, (B,)), torch.zeros(B, dtype=torch.int64))
            xs, ys, m0, m1 = _DIHEDRAL[:, k]
            flip = torch.stack([torch.stack([xs * m0, xs * m1, zero], 1), torch.stack([ys * m1, ys * m0, zero], 1),
                                torch.stack([zero, zero, one], 1)], 1)
            out["flip"] = k
        else:
            f = torch.where(coin(0.5), -one, one) if self.do_flip else one
            flip = torch.diag_embed(torch.stack([f, one, one], 1))
            out["flip"] = f
        wx = torch.where(coin(self.p_affine), uniform(-self.max_warp, self.max_warp), zero)
        wy = torch.where(coin(self.p_affine), uniform(-self.max_warp, self.max_warp), zero)
        deg = torch.where(coin(self.p_affine), uniform(-self.max_rotate, self.max_rotate), zero)
        zoom = torch.where(coin(self.p_affine), uniform(self.min_zoom, self.max_zoom), one)
        col, row = torch.rand(B, **f64), torch.rand(B, **f64)
        th = deg * math.pi / 180
        rot = torch.stack([torch.stack([th.cos(), th.sin(), zero], 1), torch.stack([-th.sin(), th.cos(), zero], 1),
                           torch.stack([zero, zero, one], 1)], 1)
        s = 1 / zoom
        zm = torch.stack([torch.stack([s, zero, (1 - s) * (2 * col - 1)], 1),
                          torch.stack([zero, s, (1 - s) * (2 * row - 1)], 1), torch.stack([zero, zero, one], 1)], 1)
        aff = flip @ rot @ zm  # fastai's AffineCoordTfm: the product of its affine transforms, in list order
        H, W = in_size if in_size is not None else (1, 1)
        aff[:, 0, 1] *= H / W  # fastai's _prepare_mat: the aspect ratio of the input
        aff[:, 1, 0] *= W / H
        matrix = warp_matrix(wx, wy) @ aff  # the warp applies to the affine grid's coordinates
        out.update(rotate=deg, zoom=zoom, col_pct=col, row_pct=row, warp_x=wx, warp_y=wy)
        if self.max_lighting:
            ml = self.max_lighting
            out["brightness"] = torch.where(coin(self.p_lighting), uniform(0.5 * (1 - ml), 0.5 * (1 + ml)), 0.5 * one)
            out["contrast"] = torch.where(coin(self.p_lighting),
                                          uniform(math.log(1 - ml), -math.log(1 - ml)).exp(), one)
        else:
            out["brightness"] = out["contrast"] = None
        out["matrix"] = matrix
        return self._to(out, device)

    @staticmethod
    def _to(params, device):
        """Every parameter as float32 (the flip index stays int64) on device, in one pinned non-blocking copy."""
        names = [k for k, v in params.items() if v is not None]
        B = params["matrix"].shape[0]
        flat = torch.cat([params[k].reshape(B, math.prod(params[k].shape[1:])).to(torch.float32) for k in names], 1)
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        out, i = dict(params), 0
        for k in names:
            n = math.prod(params[k].shape[1:])
            v = flat[:, i:i + n].reshape(params[k].shape)
            out[k] = v.long() if params[k].dtype == torch.int64 else v
            i += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchAugment: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        B = x.shape[0]
        if self.training:
            p = self.draw(B, x.device, in_size=tuple(x.shape[-2:]))
            matrix, bright, con = p["matrix"], p["brightness"], p["contrast"]
        else:
            matrix = torch.eye(3, device=x.device).expand(B, 3, 3)
            bright = con = None
        return augment(x, matrix, self.size, brightness=bright, contrast=con, mean=self.mean, std=self.std,
                       pad_mode=self.pad_mode)
