"""Train fastai's TabularModel on real data, fused vs eager, side by side.

    python -m fastfuse.examples.tabular [--epochs 3] [--bs 256] [--rows N] [--csv PATH]

Data: plotnine's txhousing.csv (Texas home sales by city and month, 2000-2015), which ships inside the
plotnine wheel (pip install "fastfuse[examples]"): no download at run time. A Rossmann-shaped problem: predict
a city's monthly sales. Preprocessing follows the fast.ai lesson: date parts, categorify (code 0 = unknown),
fill missing continuous values with the training median plus a `<col>_na` category, normalize; the model
trains on log(sales) with y_range and is scored by RMSPE on the last 12 months."""
import argparse
import csv
import importlib.util
import math
import os
import time

import torch

from fastfuse.models import EagerTabularModel, TabularModel, emb_sz_rule

CAT_NAMES = ["city", "year", "month", "quarter", "is_quarter_start", "is_year_end"]
CONT_NAMES = ["median", "listings", "inventory", "elapsed"]
VALID_FROM = 2014 + 7 / 12  # the last 12 months: Aug 2014 .. Jul 2015


def txhousing_path() -> str:
    spec = importlib.util.find_spec("plotnine")  # locates the package without importing it (no matplotlib)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example needs plotnine's bundled data: pip install 'fastfuse[examples]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "txhousing.csv")


def _num(v):
    return float(v) if v not in ("", "NA") else math.nan


def load_rows(path, limit=0):
    """The CSV's rows with a sales figure, as dicts with date parts; limit > 0: only its first `limit` lines (a
    small slice: the file runs city by city, each over every month)."""
    rows = []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if limit and i >= limit:
                break
            sales = _num(r["sales"])
            if math.isnan(sales) or sales <= 0:
                continue  # no target
            year, month = int(r["year"]), int(r["month"])
            rows.append({"city": r["city"], "year": year, "month": month,  # date parts, as add_datepart
                         "quarter": (month - 1) // 3 + 1, "is_quarter_start": month % 3 == 1,
                         "is_year_end": month == 12, "elapsed": year + (month - 1) / 12,
                         "median": _num(r["median"]), "listings": _num(r["listings"]),
                         "inventory": _num(r["inventory"]), "sales": sales})
    return rows


def preprocess(rows):
    train = [r for r in rows if r["elapsed"] < VALID_FROM]
    valid = [r for r in rows if r["elapsed"] >= VALID_FROM]
    cats = list(CAT_NAMES)
    # FillMissing: the training median, and a <col>_na category where anything is missing
    fills = {}
    for c in CONT_NAMES:
        vals = sorted(r[c] for r in train if not math.isnan(r[c]))
        fills[c] = vals[len(vals) // 2]
        if any(math.isnan(r[c]) for r in rows):
            cats.append(f"{c}_na")
            for r in rows:
                r[f"{c}_na"] = math.isnan(r[c])
                if r[f"{c}_na"]:
                    r[c] = fills[c]
    # Categorify: codes from the training set, 0 for a value it never saw (fastai's #na#)
    vocab = {c: {v: i + 1 for i, v in enumerate(sorted({r[c] for r in train}, key=str))} for c in cats}
    # Normalize with training statistics
    stats = {}
    for c in CONT_NAMES:
        v = torch.tensor([r[c] for r in train], dtype=torch.float64)
        stats[c] = (v.mean().item(), v.std().item())

    def tensors(part):
        x_cat = torch.tensor([[vocab[c].get(r[c], 0) for c in cats] for r in part], dtype=torch.long)
        x_cont = torch.tensor([[(r[c] - stats[c][0]) / stats[c][1] for c in CONT_NAMES] for r in part],
                              dtype=torch.float32)
        y = torch.tensor([[math.log(r["sales"])] for r in part], dtype=torch.float32)
        return x_cat, x_cont, y

    emb_szs = [(len(vocab[c]) + 1, emb_sz_rule(len(vocab[c]) + 1)) for c in cats]
    return tensors(train), tensors(valid), emb_szs, cats


def rmspe(model, x_cat, x_cont, y):
    model.eval()
    with torch.no_grad():
        pred = torch.exp(model(x_cat, x_cont))
    targ = torch.exp(y)
    return torch.sqrt((((targ - pred) / targ) ** 2).mean()).item()


def train_epoch(model, opt, data, bs, gen, desc):
    from tqdm import tqdm
    x_cat, x_cont, y = data
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    n_batches = len(y) // bs  # drop the last partial batch, as fastai's training DataLoader
    t0 = time.perf_counter()
    for i in tqdm(range(n_batches), desc=desc, leave=False):
        idx = perm[i * bs:(i + 1) * bs]
        loss = torch.nn.functional.mse_loss(model(x_cat[idx], x_cont[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastfuse.examples.tabular", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rows", type=int, default=0, help="use only the CSV's first ROWS lines (a quick run)")
    ap.add_argument("--csv", default=None, help="a CSV of txhousing's columns (default: plotnine's txhousing.csv)")
    args = ap.parse_args(argv)

    path = args.csv or txhousing_path()
    train, valid, emb_szs, cats = preprocess(load_rows(path, args.rows))
    print(f"data: {path}\n  {len(train[2])} training rows, {len(valid[2])} validation rows (last 12 months)")
    print(f"  categorical {cats} -> emb_szs {emb_szs}\n  continuous {CONT_NAMES}")
    y_max = max(train[2].max().item(), valid[2].max().item())
    cfg = dict(emb_szs=emb_szs, n_cont=len(CONT_NAMES), out_sz=1, layers=[200, 100], ps=[0.001, 0.01],
               embed_p=0.04, y_range=(0.0, y_max * 1.2))
    torch.manual_seed(args.seed)
    eager = EagerTabularModel(**cfg)
    fused = TabularModel(**cfg)
    fused.load_state_dict(eager.state_dict())  # the same initial weights
    results = {}
    for name, model in (("fused", fused), ("eager", eager)):
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(args.seed)  # same batch order for both
        torch.manual_seed(args.seed)
        times = []
        for epoch in range(args.epochs):
            dt, loss = train_epoch(model, opt, train, args.bs, gen, f"{name} epoch {epoch + 1}/{args.epochs}")
            times.append(dt)
            print(f"  {name:5s} epoch {epoch + 1}: {dt:6.2f} s  train mse(log) {loss:.4f}  "
                  f"valid RMSPE {rmspe(model, *valid):.4f}")
        results[name] = (sum(times) / len(times), rmspe(model, *valid))
    print(f"\n{'model':8s} {'s/epoch':>8s} {'RMSPE':>8s}")
    for name, (t, r) in results.items():
        print(f"{name:8s} {t:8.2f} {r:8.4f}")
    print(f"fused speedup per epoch: {results['eager'][0] / results['fused'][0]:.2f}x "
          f"(torch {torch.get_num_threads()} threads)")
    return results


if __name__ == "__main__":
    main()
