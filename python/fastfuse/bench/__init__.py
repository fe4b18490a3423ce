"""Shared benchmark machinery: each benchmarks/bench_<op>.py gives cases(device, quick) -> [Case];
run() times every provider and mode in one process on the same inputs, after warm-up."""
import dataclasses
import datetime
import subprocess
from typing import Callable, Dict

import torch

import fastfuse


@dataclasses.dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    bytes: Dict[str, int]  # bytes moved per mode, for GB/s
    providers: Dict[str, Dict[str, Callable[[], object]]]  # provider -> mode -> zero-arg callable
    copy: Callable[[], object]  # same-run bandwidth baseline: copy_ into a preallocated tensor


def time_ms(fn, device: str, slow: bool = False):
    """(p50, p20, p80) in ms."""
    if device == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    from torch.utils import benchmark
    fn()  # warm-up
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
    jobs = [(c, None, None) for c in cases] + [(c, p, m) for c in cases for p, modes in c.providers.items()
                                               for m in modes]
    bar = tqdm(total=len(jobs), desc="fastfuse.bench", disable=not progress) if tqdm else None
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(device=dev_name, torch=torch.__version__, triton=triton_version, fastfuse=fastfuse.__version__,
                commit=_commit(), time=datetime.datetime.now().isoformat(timespec="seconds"))
    rows, copy_ms, timed = [], {}, {}
    for case, prov, mode in jobs:
        key = id(case)
        if prov is None:
            copy_ms[key] = time_ms(case.copy, device)[0]
        else:
            timed[(key, prov, mode)] = time_ms(case.providers[prov][mode], device, slow=prov == "eager")
        if bar:
            bar.update()
    if bar:
        bar.close()
    for case in cases:
        key = id(case)
        copy_gbps = case.bytes["fwd"] / copy_ms[key] / 1e6
        for prov, modes in case.providers.items():
            for mode in modes:
                p50, p20, p80 = timed[(key, prov, mode)]
                gbps = case.bytes[mode] / p50 / 1e6
                ref = lambda name: timed.get((key, name, mode), (None,))[0]  # noqa: E731
                rows.append(dict(op=case.op, shape="x".join(map(str, case.shape)), dtype=str(case.dtype)[6:],
                                 provider=prov, mode=mode, ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=gbps,
                                 pct_copy=100 * gbps / copy_gbps,
                                 speedup_eager=ref("eager") / p50 if ref("eager") else None,
                                 speedup_compile=ref("compile") / p50 if ref("compile") else None,
                                 copy_gbps=copy_gbps, **meta))
    return rows


def print_table(rows):
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    head = f"{'op':10} {'shape':14} {'dtype':9} {'provider':9} {'mode':8} {'ms':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'vs eager':>8} {'vs compile':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:10} {r['shape']:14} {r['dtype']:9} {r['provider']:9} {r['mode']:8} "
              f"{r['ms_p50']:9.3f} {r['gbps']:7.1f} {r['pct_copy']:6.1f} {fmt(r['speedup_eager'], '8.2f')} "
              f"{fmt(r['speedup_compile'], '10.2f')}")
    if rows:
        print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}")
