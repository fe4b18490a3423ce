"""python -m fastfuse.bench [OPS...] [--device cpu|cuda] [--out FILE.json|.csv] [--quick] [--plot FILE.png]"""
import argparse
import csv
import importlib
import json
import pkgutil

import torch

from . import print_table, run


def main(argv=None):
    import fastfuse.benchmarks as bench_pkg
    available = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench_pkg.__path__)
                       if m.name.startswith("bench_"))
    ap = argparse.ArgumentParser(prog="python -m fastfuse.bench", description=__doc__)
    ap.add_argument("ops", nargs="*", help=f"ops to run (default: all of {available})")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write rows to this .json or .csv file")
    ap.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    ap.add_argument("--plot", help="save a bar chart of speedup vs eager (needs matplotlib)")
    args = ap.parse_args(argv)
    unknown = set(args.ops) - set(available)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {available}")
    cases = []
    for op in args.ops or available:
        cases += importlib.import_module(f"fastfuse.benchmarks.bench_{op}").cases(args.device, args.quick)
    rows = run(cases, args.device)
    print_table(rows)
    for op in args.ops or available:  # speed targets of the ops that define them (printed, never asserted)
        check = getattr(importlib.import_module(f"fastfuse.benchmarks.bench_{op}"), "check_targets", None)
        if check:
            check(rows, args.device)
    if args.out:
        with open(args.out, "w", newline="") as f:
            if args.out.endswith(".csv"):
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            else:
                json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.out}")
    if args.plot:
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
        fig.savefig(args.plot)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
