"""Batch augmentation, B=64 uint8 3x256x256 -> 3x224x224 (fastai's aug_transforms + Normalize): fastfuse's backends
against the reference composition in eager mode (what fastai runs: grid, warp, grid_sample, lighting, normalise),
a kornia-style sequence of separate passes written in torch, torch.compile of the reference, and a same-run copy
of the bytes the op must move (input read once + output written once). Peak extra memory of one call is printed
with the targets (CPU: growth of the peak resident set over a warm call; CUDA: max_memory_allocated)."""
import torch
import torch.nn.functional as F

import fastfuse
from fastfuse import reference
from fastfuse.bench import Case
from fastfuse.nn import BatchAugment

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# targets from the issue: (vs eager, vs compile, % of copy bandwidth)
TARGETS = {"cpu": (10.0, 5.0, 40.0), "cuda": (10.0, None, 70.0)}
_PEAK_MB = {}  # (shape, out dtype, provider) -> MB


def _kornia_style(x, p, size, mean, std):
    """One pass per augmentation, as kornia's AugmentationSequential runs them: to float, flip, affine (grid +
    grid_sample), brightness, contrast, normalise (the warp is left out: kornia's perspective is another pass)."""
    xf = x.float() / 255
    flipped = torch.where((p["flip"] < 0).view(-1, 1, 1, 1), xf.flip(3), xf)
    aff = p["affine"]
    grid = F.affine_grid(aff[:, :2], [x.shape[0], x.shape[1], *size], align_corners=True)
    y = F.grid_sample(flipped, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    y = (y + (p["brightness"] - 0.5).view(-1, 1, 1, 1)).clamp(0, 1)
    y = (y * p["contrast"].view(-1, 1, 1, 1)).clamp(0, 1)
    return (y - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _peak_mb(fn, device):
    """MB at the peak of one (warm) call above what was in use before it."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # CPU: the growth of the resident set's peak (VmHWM, reset through /proc/self/clear_refs) over one warm call,
    # after malloc_trim hands the memory glibc keeps from earlier calls back; None where /proc does not allow it
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field)) * 1024
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS:")
        fn()
        return max(0, status("VmHWM:") - base) / 2 ** 20
    except OSError:
        return None


def cases(device, quick):
    B = 8 if quick else 64
    H = W = 256
    size = (224, 224)
    out_dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    backends = ["cuda", "triton"] if device == "cuda" else ["cpp"]
    backends = [b for b in backends if fastfuse.backends()[b]["available"]]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, device=device)
    aug = BatchAugment(size, mean=MEAN, std=STD).to(device)
    p = aug.draw(B, device, in_size=(H, W))
    mean, std = aug.mean, aug.std
    # the affine part alone for the kornia-style sequence (its own passes do the flip and leave out the warp)
    p["affine"] = torch.eye(3, device=device).expand(B, 3, 3).clone()
    p["affine"][:, :2] = p["matrix"][:, :2] / p["matrix"][:, 2:, 2:]
    out = []
    for od in out_dtypes:
        kw = dict(brightness=p["brightness"], contrast=p["contrast"], mean=mean, std=std, out_dtype=od)

        def with_backend(name):
            if name in ("cpp", "cuda"):  # the device's default: no override, the cost a user sees
                return lambda: fastfuse.augment(x, p["matrix"], size, **kw)
            def fn():
                with fastfuse.use_backend(name):
                    return fastfuse.augment(x, p["matrix"], size, **kw)
            return fn

        ref = lambda xx: reference.augment(xx, p["matrix"], size, p["brightness"], p["contrast"], mean,  # noqa: E731
                                           std, "reflection", od, False)
        compiled = torch.compile(ref)
        provs = {b: {"fwd": with_backend(b)} for b in backends}
        provs["BatchAugment"] = {"fwd": lambda: aug.train()(x)} if od == torch.float32 else {}
        provs["eager"] = {"fwd": lambda: ref(x)}
        provs["kornia_style"] = {"fwd": lambda: _kornia_style(x, p, size, mean, std).to(od)}
        provs["compile"] = {"fwd": lambda: compiled(x)}
        provs = {k: v for k, v in provs.items() if v}
        in_bytes = x.numel()
        out_bytes = B * 3 * size[0] * size[1] * torch.empty((), dtype=od).element_size()
        nbytes = in_bytes + out_bytes
        src = torch.empty(nbytes // 8, device=device)
        dst = torch.empty_like(src)
        for name, modes in provs.items():
            _PEAK_MB[(B, str(od)[6:], name)] = _peak_mb(modes["fwd"], device)
        out.append(Case("augment", (B, 3, H, W), od, nbytes, 0, provs, copy=lambda s=src, d=dst: d.copy_(s),
                        clone=lambda s=src: s.clone()))
    return out


def check_targets(rows, device):
    """Print the issue's targets against this run (never asserted in tests), and each provider's peak memory."""
    eager_x, compile_x, pct = TARGETS[device]
    for r in rows:
        if r["op"] != "augment" or r["provider"] in ("copy_", "clone"):
            continue
        B = int(r["shape"].split("x")[0])
        peak = _PEAK_MB.get((B, r["dtype"], r["provider"]))
        print(f"augment {r['shape']} {r['dtype']} {r['provider']}: peak extra memory "
              f"{'-' if peak is None else f'{peak:.1f} MB'}")
        if r["provider"] not in ("cpp", "cuda", "triton"):
            continue
        checks = [("eager", r["speedup_eager"], eager_x), ("compile", r["speedup_compile"], compile_x),
                  ("% copy bandwidth", r["pct_copy"], pct)]
        for what, got, want in checks:
            if want is None or got is None:
                continue
            unit = "%" if what.startswith("%") else "x"
            print(f"target augment {r['shape']} {r['dtype']} {r['provider']} vs {what} >= {want:.0f}{unit}: "
                  f"{got:.1f}{unit} ({'met' if got >= want else 'NOT met'})")
