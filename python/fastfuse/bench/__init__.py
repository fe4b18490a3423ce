"""Shared benchmark machinery: each benchmarks/bench_<op>.py gives cases(device, quick) -> [Case];
run() times every provider and mode in one process on the same inputs, after warm-up."""
import dataclasses
import datetime
import subprocess
import time
from typing import Callable, Dict

import torch

import fastfuse


@dataclasses.dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    bytes_fwd: int  # bytes moved by one forward, for GB/s
    bytes_bwd: int  # bytes moved by one backward
    providers: Dict[str, Dict[str, Callable[[], object]]]  # provider -> mode -> zero-arg callable
    copy: Callable[[], object]  # same-run bandwidth baseline: copy_ into a preallocated tensor
    clone: Callable[[], object] = None  # same-run baseline: x.clone() (allocates)

    def bytes(self, mode):
        return {"fwd": self.bytes_fwd, "bwd": self.bytes_bwd, "fwd+bwd": self.bytes_fwd + self.bytes_bwd}[mode]


def autograd_modes(fn, x, grad):
    """{"fwd", "bwd", "fwd+bwd"} zero-arg callables timing fn on x (bwd re-runs backward on one graph)."""
    xr = x.detach().requires_grad_()
    out = fn(xr)
    return {"fwd": lambda: fn(x),
            "bwd": lambda: torch.autograd.grad(out, xr, grad, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(xr), xr, grad)}


def allow_retained_graphs():
    """The "bwd" mode re-runs backward on one graph (retain_graph=True); torch.compile's donated buffers
    forbid that."""
    try:
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False
    except (ImportError, AttributeError):
        pass


def time_ms(fn, device: str, slow: bool = False):
    """(p50, p20, p80) in ms."""
    if device == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    from torch.utils import benchmark
    fn()  # warm-up (also triggers torch.compile's compilation)
    t0 = time.perf_counter()
    fn()
    slow = slow or time.perf_counter() - t0 > 0.02  # ~200 ms/call providers: keep the run short
    m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.3 if slow else 1.0)
    ts = sorted(m.times)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))] * 1e3  # noqa: E731
    return m.median * 1e3, q(0.2), q(0.8)


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=__file__.rsplit("/", 3)[0], timeout=5).stdout.strip() or None
    except Exception:
        return None


def run(cases, device: str, progress: bool = True):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    jobs = [(c, b, "fwd") for c in cases for b in ("copy_", "clone") if getattr(c, b.rstrip("_"))] + [(c, p, m) for c in cases for p, modes in c.providers.items()
                                               for m in modes]
    bar = tqdm(total=len(jobs), desc="fastfuse.bench", disable=not progress) if tqdm else None
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(device=device, device_name=dev_name, torch=torch.__version__, triton=triton_version, fastfuse=fastfuse.__version__,
                commit=_commit(), timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    rows, timed = [], {}
    for case, prov, mode in jobs:
        key = id(case)
        if prov in ("copy_", "clone"):
            timed[(key, prov, mode)] = time_ms(getattr(case, prov.rstrip("_")), device)
        else:
            timed[(key, prov, mode)] = time_ms(case.providers[prov][mode], device,
                                               slow=prov in ("eager", "reference"))
        if bar:
            bar.update()
    if bar:
        bar.close()
    for case in cases:
        key = id(case)
        copy_gbps = case.bytes_fwd / timed[(key, "copy_", "fwd")][0] / 1e6
        base = [(b, ["fwd"]) for b in ("copy_", "clone") if (key, b, "fwd") in timed]
        for prov, modes in base + list(case.providers.items()):
            for mode in modes:
                p50, p20, p80 = timed[(key, prov, mode)]
                gbps = case.bytes(mode) / p50 / 1e6
                ref = lambda name: None if prov in ("copy_", "clone") else \
                    timed.get((key, name, mode), (None,))[0]  # noqa: E731
                rows.append(dict(op=case.op, shape="x".join(map(str, case.shape)), dtype=str(case.dtype)[6:],
                                 provider=prov, mode=mode, ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=gbps,
                                 pct_copy=100 * gbps / copy_gbps,
                                 speedup_eager=ref("eager") / p50 if ref("eager") else None,
                                 speedup_compile=ref("compile") / p50 if ref("compile") else None,
                                 copy_gbps=copy_gbps, **meta))
    return rows


def print_table(rows):
    fmt = lambda v, f: format("-" if v is None else v, f if v is not None else ">" + f.split(".")[0])  # noqa: E731
    head = f"{'op':10} {'shape':14} {'dtype':9} {'provider':10} {'mode':8} {'ms':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'vs eager':>8} {'vs compile':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:10} {r['shape']:14} {r['dtype']:9} {r['provider']:10} {r['mode']:8} "
              f"{r['ms_p50']:9.3f} {r['gbps']:7.1f} {r['pct_copy']:6.1f} {fmt(r['speedup_eager'], '8.2f')} "
              f"{fmt(r['speedup_compile'], '10.2f')}")
    if rows:
        print(f"device: {rows[0]['device_name']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, fastfuse {rows[0]['fastfuse']}, commit {rows[0]['commit']}")
