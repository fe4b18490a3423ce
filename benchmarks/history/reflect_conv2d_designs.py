"""Run at commit fd4ef12 (the five-design picker), from the repository root:
python benchmarks/history/reflect_conv2d_designs.py cl|nchw (docs/reflect_conv2d.md's loss table).
Old auto pick vs the two remaining designs, per direction, on bench_reflect_conv2d.py's shapes, one process per
layout: python measure_designs.py cl|nchw. Raw fastfuse_C ops with the algo int (what FASTFUSE_REFLECT_CONV2D_ALGO
sets), so the forward and the backward designs can be chosen independently; jobs timed interleaved."""
import sys
import importlib
import torch
import fastfuse
import fastfuse.bench as fb

fb._MIN_ROUNDS = 10
sys.path.insert(0, "benchmarks")
import bench_reflect_conv2d as B  # noqa: E402

rc = importlib.import_module("fastfuse.ops.reflect_conv2d")
A = rc._ALGOS
F, BW = torch.ops.fastfuse_C.reflect_conv2d, torch.ops.fastfuse_C.reflect_conv2d_backward
layout = sys.argv[1]
fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
torch.manual_seed(0)
shapes = [(s, oc, k, st, True) for s, oc, k, st in B.RESNET34 + B.QUICK]
shapes += [(s, oc, 3, 1, False) for s, oc in B.INFER + B.QUICK_INFER]  # batch-1 inference: forward only
NAMES = ("auto", "frame", "direct") if torch.backends.cpu.get_cpu_capability() == "AVX512" else ("auto", "frame")
print(f"layout={layout} threads={torch.get_num_threads()} cap={torch.backends.cpu.get_cpu_capability()}")
print("shape | dir | old pick | auto ms | frame ms | direct ms")
for shape, oc, k, st, bwd in shapes:
    p = (k - 1) // 2
    x = torch.randn(shape).to(memory_format=fmt)
    w = torch.randn(oc, shape[1], k, k).to(memory_format=fmt)  # the module's weight in the input's layout
    args = ([st, st], [p, p], [1, 1], 1)
    y = F(x, w, None, *args, 0)
    go = torch.randn_like(y)
    jobs = {}
    for name in NAMES:
        jobs["fwd", name] = (lambda a: lambda: F(x, w, None, *args, a))(A[name])
        if bwd:
            jobs["bwd", name] = (lambda a: lambda: BW(go, x, w, *args, [True, True, False], a))(A[name])
    # which design auto runs: forward by name, backward by bits against each forced design
    picks = {"fwd": fastfuse._C.reflect_conv2d_cpu_design(x, w, *args, 0)}
    if bwd:
        ref = BW(go, x, w, *args, [True, True, False], 0)
        picks["bwd"] = "/".join(n for n in A if n != "auto" and all(
            torch.equal(u, v) for u, v in zip(ref[:2], BW(go, x, w, *args, [True, True, False], A[n])[:2]))) or "?"
    t = fb.time_interleaved(jobs)
    tag = "x".join(map(str, shape + (oc, k, st)))
    for d in ("fwd", "bwd") if bwd else ("fwd",):
        ms = [t[d, n][0] if n in NAMES else float("nan") for n in ("auto", "frame", "direct")]
        print(f"{tag} | {d} | {picks[d]} | " + " | ".join(f"{m:.3f}" for m in ms), flush=True)
