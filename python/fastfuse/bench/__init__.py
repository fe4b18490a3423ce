"""Shared benchmark machinery: each benchmarks/bench_<op>.py gives cases(device, quick) -> [Case];
run() times every provider and mode in one process on the same inputs, after warm-up (on CPU the jobs of a
case interleaved in rounds, see time_interleaved)."""
import dataclasses
import datetime
import platform
import subprocess
import time
from typing import Callable, Dict

import torch

import fastfuse


def _allow_recompiles():
    """Every compiled module shares one code object (and so dynamo's cache), and each case compiles its own:
    past recompile_limit (8) dynamo quietly runs the rest eagerly, so the "compile" rows of a run with more
    than 8 compiled shapes timed eager. Lift the limits, and fail loudly if one is still hit."""
    cfg = getattr(getattr(torch, "_dynamo", None), "config", None)
    if cfg is None:
        return
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


_allow_recompiles()  # on import: the bench modules import Case, and build (and compile) their cases after


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


class StepCase(Case):
    """A whole training step (mode "step"), which moves no meaningful byte count: reports parameter bytes."""

    def bytes(self, mode):
        return self.bytes_fwd


def sgd_step(model, args, loss, lr, forward=None):
    """{"step": callable}: one training step of model: forward(*args) (forward: model, or a compiled model),
    loss(output), backward, an SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    forward = model if forward is None else forward

    def step():
        value = loss(forward(*args))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return value

    return {"step": step}


def autograd_modes(fn, x, grad):
    """{"fwd", "bwd", "fwd+bwd"} zero-arg callables timing fn on x (bwd re-runs backward on one graph, made on its
    first call: building a case runs nothing, so a torch.compile provider compiles only when it is timed)."""
    xr = x.detach().requires_grad_()
    graph = []

    def bwd():
        if not graph:
            graph.append(fn(xr))
        return torch.autograd.grad(graph[0], xr, grad, retain_graph=True)

    return {"fwd": lambda: fn(x), "bwd": bwd, "fwd+bwd": lambda: torch.autograd.grad(fn(xr), xr, grad)}


def allow_retained_graphs():
    """The "bwd" mode re-runs backward on one graph (retain_graph=True); torch.compile's donated buffers
    forbid that."""
    try:
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False
    except (ImportError, AttributeError):
        pass


def time_ms(fn, device: str, slow: bool = False):
    """(p50, p20, p80) in ms of one callable: CUDA with triton.testing.do_bench; CPU through time_interleaved
    (a single job)."""
    if device == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    return time_interleaved({0: fn}, slow={0} if slow else ())[0]


# CPU timing. On a shared, noisy machine, timing each provider in its own block one after the other lets a
# burst of someone else's work land on one provider only: ratios swung +-20% run to run. Instead, the jobs of
# one case (every provider and mode, the copy_/clone baselines) are timed interleaved: each round times every
# job once (a sample of one or a few calls, the order rotated each round), and the result is the median over
# rounds, so every job sees the same conditions. Budget per job as the per-job blocks had (so the whole run
# takes about as long): _FAST_S for jobs under _SLOW_CALL_S a call, _SLOW_S for slower ones and the explicitly
# slow providers (eager/reference), each plus a few calls of warm-up.
# A shared VM can switch between quiet and throttled every few seconds, often within one case; per-job medians over all rounds could then take one provider from quiet rounds and the
# next from throttled ones. So the quantiles come from the quieter half of the rounds, the SAME rounds for
# every job: a round's load is the geometric mean over all jobs of (its time / the job's median time), and
# the rounds at or under the median load are kept. The selection never looks at one provider alone.
_FAST_S, _SLOW_S, _SLOW_CALL_S = 1.0, 0.3, 0.02
_SAMPLE_S = 0.05   # a sample of a fast job repeats its call to at least this long: long enough that the
# aftermath of the job before it (a slow eager call freeing 100s of MB) does not land on one or two calls
_MIN_ROUNDS, _MAX_ROUNDS = 5, 400


def _quantiles(ts):
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))] * 1e3  # noqa: E731
    n = len(ts)
    med = (ts[(n - 1) // 2] + ts[n // 2]) / 2 * 1e3
    return med, q(0.2), q(0.8)


def time_interleaved(jobs, slow=()):
    """{key: zero-arg callable} -> {key: (p50, p20, p80) in ms}, CPU, the jobs timed interleaved in rounds.

    Every job is called once as warm-up (this also runs torch.compile's compilation) and once more to
    estimate its time. Then each round times every job once, in an order rotated from round to round: a job
    slower than _SAMPLE_S one call, a faster one as many calls as fill _SAMPLE_S after one untimed call (so
    it starts warm after another job). time.perf_counter, Python's GC paused while timing (as timeit does;
    collected between rounds). Jobs in `slow`, or slower than _SLOW_CALL_S a call, get the smaller budget;
    rounds go on until the summed budget is spent, at least _MIN_ROUNDS and at most _MAX_ROUNDS of them.
    The quantiles are taken over the quieter half of the rounds, the same rounds for every job."""
    import gc
    keys = list(jobs)
    est, budget = {}, 0.0
    for k in keys:
        jobs[k]()  # warm-up
        t0 = time.perf_counter()
        jobs[k]()
        est[k] = max(time.perf_counter() - t0, 1e-7)
        is_slow = k in slow or est[k] > _SLOW_CALL_S
        budget += max(_SLOW_S if is_slow else _FAST_S, est[k])
    calls = {k: max(1, int(_SAMPLE_S / est[k])) for k in keys}  # calls per sample
    samples = {k: [] for k in keys}
    was_enabled = gc.isenabled()
    start = time.perf_counter()
    try:
        for r in range(_MAX_ROUNDS):
            if r >= _MIN_ROUNDS and time.perf_counter() - start >= budget:
                break
            gc.collect()
            gc.disable()
            for i in range(len(keys)):
                k = keys[(i + r) % len(keys)]
                fn, n = jobs[k], calls[k]
                if n > 1:  # a short call: one untimed call first, so the sample starts warm after another job
                    fn()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[k].append((time.perf_counter() - t0) / n)
            if was_enabled:
                gc.enable()
    finally:
        if was_enabled:
            gc.enable()
    return {k: _quantiles([samples[k][r] for r in _quiet_rounds(samples)]) for k in keys}


def _quiet_rounds(samples):
    """Indices of the rounds whose load over all jobs is at or under the median (see the note above)."""
    import math
    rounds = len(next(iter(samples.values())))
    if len(samples) < 2:  # nothing to compare a round's load with: all rounds
        return list(range(rounds))
    med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    load = [sum(math.log(v[r] / med[k]) for k, v in samples.items()) for r in range(rounds)]
    cut = sorted(load)[(rounds - 1) // 2]
    return [r for r in range(rounds) if load[r] <= cut]


# Memory: what a training step keeps from forward to backward. A fused op saves fewer tensors for its backward
# (BN -> ReLU -> dropout keeps its input and output and a seed, not the intermediate results and a mask), so the
# same model fits a bigger batch. Measured with saved-tensor hooks on one call, each storage counted once, leaf
# tensors that require grad (parameters, the benchmark's input) left out: the same for every provider, and
# deterministic, unlike timings. None where the hooks do not apply (compiled graphs may refuse them).
SAVED_MODES = ("fwd+bwd", "step")


def saved_mb(fn):
    """MB of the distinct storages that autograd saves for backward during one call of fn."""
    seen = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    except Exception:  # noqa: BLE001  (torch.compile may reject the hooks; the timing is what matters there)
        return None
    return sum(seen.values()) / 2 ** 20


def _commit():
    """HEAD's short hash, with "+dirty" when tracked files differ from it (the results are then not HEAD's). Files
    under benchmarks/results/ do not count: one run's --out file is not code the next run measures."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=__file__.rsplit("/", 3)[0],
                              timeout=5).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results")
        return (head + ("+dirty" if changed else "")) or None
    except Exception:
        return None


def _cpu_name():
    """'cpu (<model>, <ATen capability>, <n> threads)': sessions land on different CPUs (an AVX2 EPYC, an
    AVX-512 Xeon), and a ratio means little without knowing which."""
    model = platform.processor() or "unknown model"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu ({model}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def cuda_backends(*names):
    """The fastfuse backends a CUDA case times, of `names` (default: all three candidates for an op's CUDA default),
    those available here. The bench runs with every CUDA default set to "cuda" (see main), so "cuda" times the C++
    kernels without an override, the per-call cost a user would see; "triton" and "reference" run under one."""
    names = names or ("cuda", "triton", "reference")
    return [b for b in names if fastfuse.backends()[b]["available"]]


# torch.compile's first compile of a case (inductor, one graph per mode) on a fresh GPU machine: a "compile" job is
# skipped when less than this is left before the run's soft deadline.
COMPILE_RESERVE_S = 40.0


def run(cases, device: str, progress: bool = True, modes=None, select=None, deadline=None):
    """Rows of every case's jobs. modes: the modes to time (None: all); select(provider): whether to time a provider
    (None: all; the copy_ and clone baselines always run). On CUDA with a deadline (time.monotonic()): no job starts past it, and a "compile" job
    starts only with COMPILE_RESERVE_S left; skipped jobs leave no row."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    jobs = [(c, b, "fwd") for c in cases for b in ("copy_", "clone") if getattr(c, b.rstrip("_"))]
    jobs += [(c, p, m) for c in cases for p, ms in c.providers.items() for m in ms
             if (modes is None or m in modes) and (select is None or select(p))]
    bar = tqdm(total=len(jobs), desc="fastfuse.bench", disable=not progress) if tqdm else None
    dev_name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(device=device, device_name=dev_name, torch=torch.__version__, triton=triton_version,
                fastfuse=fastfuse.__version__, commit=_commit(),
                timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    rows, timed = [], {}
    for case in cases:  # CPU: all jobs of one case interleaved; CUDA: one job after the other
        key = id(case)
        case_jobs = {(key, prov, mode): (getattr(case, prov.rstrip("_")) if prov in ("copy_", "clone")
                                         else case.providers[prov][mode])
                     for c, prov, mode in jobs if c is case}
        if device == "cuda":
            for k, fn in case_jobs.items():
                left = None if deadline is None else deadline - time.monotonic()
                if left is None or left > (COMPILE_RESERVE_S if k[1] == "compile" else 0.0):
                    timed[k] = time_ms(fn, device)
                if bar:
                    bar.update()
        else:
            timed.update(time_interleaved(case_jobs, slow={k for k in case_jobs
                                                           if k[1] in ("eager", "reference")}))
            if bar:
                bar.update(len(case_jobs))
    if bar:
        bar.close()
    saved = {(id(c), p, m): saved_mb(fn) for c in cases for p, ms in c.providers.items()
             for m, fn in ms.items() if m in SAVED_MODES and (id(c), p, m) in timed}
    for case in cases:
        key = id(case)
        if (key, "copy_", "fwd") not in timed:  # the deadline came first
            continue
        copy_gbps = case.bytes_fwd / timed[(key, "copy_", "fwd")][0] / 1e6
        base = [(b, ["fwd"]) for b in ("copy_", "clone") if (key, b, "fwd") in timed]
        for prov, ms in base + list(case.providers.items()):
            for mode in ms:
                if (key, prov, mode) not in timed:  # not selected, or skipped at the deadline
                    continue
                p50, p20, p80 = timed[(key, prov, mode)]
                gbps = case.bytes(mode) / p50 / 1e6
                ref = lambda name: None if prov in ("copy_", "clone") else \
                    timed.get((key, name, mode), (None,))[0]  # noqa: E731
                rows.append(dict(op=case.op, shape="x".join(map(str, case.shape)), dtype=str(case.dtype)[6:],
                                 provider=prov, mode=mode, ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=gbps,
                                 pct_copy=100 * gbps / copy_gbps,
                                 speedup_eager=ref("eager") / p50 if ref("eager") else None,
                                 speedup_compile=ref("compile") / p50 if ref("compile") else None,
                                 copy_gbps=copy_gbps, saved_mb=saved.get((key, prov, mode)), **meta))
    return rows


def print_table(rows):
    fmt = lambda v, f: format("-" if v is None else v, f if v is not None else ">" + f.split(".")[0])  # noqa: E731
    head = f"{'op':10} {'shape':14} {'dtype':9} {'provider':10} {'mode':8} {'ms':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'vs eager':>8} {'vs compile':>10} {'saved MB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:10} {r['shape']:14} {r['dtype']:9} {r['provider']:10} {r['mode']:8} "
              f"{r['ms_p50']:9.3f} {r['gbps']:7.1f} {r['pct_copy']:6.1f} {fmt(r['speedup_eager'], '8.2f')} "
              f"{fmt(r['speedup_compile'], '10.2f')} {fmt(r.get('saved_mb'), '8.2f')}")
    if rows:
        r = rows[0]
        print(f"device: {r['device_name']}, torch {r['torch']}, triton {r['triton']}, fastfuse {r['fastfuse']}, "
              f"commit {r['commit']}")


def merge_compile(rows, compile_rows):
    """rows with the "compile" rows of a later run of the same cases added, and speedup_compile filled in."""
    t = {(r["op"], r["shape"], r["dtype"], r["mode"]): r["ms_p50"] for r in compile_rows if r["provider"] == "compile"}
    out = []
    for r in rows:
        c = t.get((r["op"], r["shape"], r["dtype"], r["mode"]))
        out.append(dict(r, speedup_compile=c / r["ms_p50"]) if c and r["provider"] not in ("copy_", "clone") else r)
    return out + [r for r in compile_rows if r["provider"] == "compile"]


# ---- the CUDA default of each op, from a run's rows (.ci/gpu check prints it and writes _cuda_defaults.json) ----
CANDIDATES = ("cuda", "triton", "reference")


def choose_defaults(rows_by_op):
    """{op: [backends, fastest first]} for the ops of fastfuse._backends.OPS in {op: rows}. Per op, over the
    (case, shape, dtype) groups in which every candidate was timed ("fwd+bwd", else "fwd"), the geometric mean of
    each candidate's time over the reference's; the reference wins ties. An op with no such group is left out
    (unmeasured: it keeps the reference)."""
    import math

    from .. import _backends
    out = {}
    for op, rows in rows_by_op.items():
        if op not in _backends.OPS:
            continue
        groups = {}
        for r in rows:
            if r["provider"] in CANDIDATES and r["mode"] in ("fwd+bwd", "fwd"):
                groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r["ms_p50"]
        both = {k: v for k, v in groups.items() if k[3] == "fwd+bwd"} or groups
        timed = [c for c in CANDIDATES if c == "reference" or any(c in v for v in both.values())]
        full = [v for v in both.values() if all(c in v for c in timed) and len(timed) > 1]
        if not full:
            continue
        score = {c: math.exp(sum(math.log(v[c] / v["reference"]) for v in full) / len(full)) for c in timed}
        out[op] = sorted(timed, key=lambda c: (score[c], c != "reference"))
    return out
