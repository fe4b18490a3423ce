"""python -m fastfuse.bench [OPS...] [--device cpu|cuda] [--out FILE.json|.csv] [--quick] [--plot FILE.png]
[--time-budget SECONDS] [--choose FILE.json] [--dry-run]

Ops run one after the other, in PRIORITY order (the ops with GPU targets first); after each op its table and targets
are printed and --out is rewritten with every row so far, so a run that is stopped keeps what ran.
On CUDA every op's default is set to "cuda" for the run, so the "cuda" and "fastfuse" rows time the C++ kernels
without an override; --quick there times the issue's target shapes in modes fwd and fwd+bwd (and model steps), not
bwd alone. --time-budget (CUDA): no job starts past it; every op runs first without torch.compile, then the compile
jobs run op by op while COMPILE_RESERVE_S is left, and the compile ratios are filled into the op's rows. --choose writes the CUDA default of
each op that its rows imply (fastfuse.bench.choose_defaults), in the format fastfuse/_cuda_defaults.json is read in."""
import argparse
import contextlib
import csv
import importlib
import json
import os
import pkgutil
import time

import torch

from . import COMPILE_RESERVE_S, choose_defaults, merge_compile, print_table, run

# the ops with GPU speed targets first, so a run cut short has measured those
PRIORITY = ("dropout", "batch_norm", "embedding_concat_dropout", "tabular_model", "reflect_conv2d", "lin_bn_drop",
            "cnn_step")
QUICK_CUDA_MODES = ("fwd", "fwd+bwd", "step")
COMPILE_MODES = ("fwd+bwd", "step")  # the second pass's torch.compile jobs: the modes the targets compare


def available_ops():
    import fastfuse.benchmarks as bench_pkg
    names = {m.name[len("bench_"):] for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name.startswith("bench_")}
    return [op for op in PRIORITY if op in names] + sorted(names - set(PRIORITY))


def _write(path, rows):
    """Write rows to path (.json or .csv) through a temporary file, so a stop mid-write leaves the last full file."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        if path.endswith(".csv"):
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        else:
            json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def write_choice(path, ranking, rows):
    meta = rows[0] if rows else {}
    doc = {"ranking": ranking, "device_name": meta.get("device_name"), "torch": meta.get("torch"),
           "triton": meta.get("triton"), "commit": meta.get("commit"), "timestamp": meta.get("timestamp"),
           "rule": "per op, the geometric mean over its fwd+bwd cases of each backend's time over the reference's; "
                   "fastest first (python -m fastfuse.bench --choose)"}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def print_choice(ranking, ops):
    from .. import _backends
    print("CUDA defaults these numbers imply (fastest of cuda, triton, reference per op):")
    for op in _backends.OPS:
        if op in ranking:
            print(f"  {op:26} {ranking[op][0]:10} (ranking: {', '.join(ranking[op])})")
        else:
            why = "not run" if op not in ops else "not every candidate timed"
            print(f"  {op:26} {_backends.UNMEASURED:10} (unmeasured: {why})")


def _plot(path, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped")
        return
    sel = [r for r in rows if r["speedup_eager"] and r["provider"] != "eager"]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(sel) + 1.5))
    ax.barh([f"{r['op']} {r['shape']} {r['dtype']} {r['provider']} {r['mode']}" for r in sel],
            [r["speedup_eager"] for r in sel])
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup vs PyTorch eager")
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


def _report(op, mod, by_op, args, seconds, what=""):
    """After an op's pass: its table and targets, and --out rewritten with every row so far."""
    print_table(by_op[op])
    check = getattr(mod, "check_targets", None)  # printed, never asserted
    if check:
        check(by_op[op], args.device)
    print(f"op {op}: {what}{len(by_op[op])} rows in {seconds:.0f} s")
    rows = [r for op_rows in by_op.values() for r in op_rows]
    if args.out and rows:
        _write(args.out, rows)
        print(f"wrote {len(rows)} rows to {args.out}")


def main(argv=None):
    available = available_ops()
    ap = argparse.ArgumentParser(prog="python -m fastfuse.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ops", nargs="*", help=f"ops to run (default: all of {available})")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write rows to this .json or .csv file (rewritten after each op)")
    ap.add_argument("--quick", action="store_true",
                    help="CPU: small shapes only (a smoke run); CUDA: the target shapes, modes fwd and fwd+bwd")
    ap.add_argument("--plot", help="save a bar chart of speedup vs eager (needs matplotlib)")
    ap.add_argument("--time-budget", type=float, help="seconds for the whole run (see above)")
    ap.add_argument("--choose", help="write the CUDA defaults the rows imply to this .json file")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (ops, modes, budget) and exit")
    args = ap.parse_args(argv)
    unknown = set(args.ops) - set(available)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {available}")
    ops = [op for op in available if op in args.ops] if args.ops else available
    modes = QUICK_CUDA_MODES if args.quick and args.device == "cuda" else None
    if args.dry_run:
        budget = f"{args.time_budget:.0f} s" if args.time_budget else "no time budget"
        print(f"bench plan: device {args.device}, {'quick' if args.quick else 'full'}, modes "
              f"{', '.join(modes) if modes else 'all'}, ops in order: {', '.join(ops)}")
        print(f"bench budget: {budget}, about {args.time_budget / len(ops):.0f} s an op without torch.compile, then "
              f"torch.compile op by op while {COMPILE_RESERVE_S:.0f} s are left" if args.time_budget else
              f"bench budget: {budget}")
        return
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    # with a budget on CUDA, two passes: every op without torch.compile first (the fastfuse, eager and reference rows
    # that the targets and the defaults need), then compile jobs, op by op in the same order, while time is left
    two_pass = deadline is not None and args.device == "cuda"
    by_op = {}
    from .. import _backends
    # on CUDA: "cuda" rows and model steps time the C++ kernels, not the unmeasured default (the reference)
    defaults = _backends.defaults("cuda", "cuda") if args.device == "cuda" else contextlib.nullcontext()
    with defaults:
        for op in ops:
            if deadline is not None and time.monotonic() >= deadline:
                print(f"op {op}: not run (time budget spent)")
                continue
            t0 = time.monotonic()
            mod = importlib.import_module(f"fastfuse.benchmarks.bench_{op}")
            by_op[op] = run(mod.cases(args.device, args.quick), args.device, modes=modes, deadline=deadline,
                            select=(lambda p: p != "compile") if two_pass else None)
            _report(op, mod, by_op, args, time.monotonic() - t0)
        for op in list(by_op) if two_pass else ():
            if deadline - time.monotonic() < COMPILE_RESERVE_S:
                print(f"op {op}: torch.compile not timed (time budget spent)")
                continue
            t0 = time.monotonic()
            mod = importlib.import_module(f"fastfuse.benchmarks.bench_{op}")
            extra = run(mod.cases(args.device, args.quick), args.device, modes=COMPILE_MODES, deadline=deadline,
                        select=lambda p: p == "compile")
            by_op[op] = merge_compile(by_op[op], extra)
            _report(op, mod, by_op, args, time.monotonic() - t0, "torch.compile ")
    rows = [r for op_rows in by_op.values() for r in op_rows]
    if two_pass:
        print("== targets ==")  # every target of the run, on its final rows (.ci/gpu check prints this section)
        for op, op_rows in by_op.items():
            check = getattr(importlib.import_module(f"fastfuse.benchmarks.bench_{op}"), "check_targets", None)
            if check:
                check(op_rows, args.device)
        for op in ops:
            if op not in by_op:
                print(f"op {op}: not run (time budget spent)")
    if args.choose:
        ranking = choose_defaults(by_op)
        print_choice(ranking, ops)
        write_choice(args.choose, ranking, rows)
        print(f"wrote {args.choose}")
    if args.plot:
        _plot(args.plot, rows)


if __name__ == "__main__":
    main()
