"""base vs base_mammoth on the real MIL datasets, same folds and seeds.

    python -m mammoth_fast.examples.compare --models abmil meanmil maxmil --epochs 5 --batch-size 8
    python -m mammoth_fast.examples.compare --merge A/compare-<date>.json B/compare-<date>.json

Writes results/compare-<date>.json and .md (a Markdown table; rewritten after
every cell, so a run cut short keeps what it finished). --merge joins the JSON
files of runs done in parallel (e.g. one per dataset) into one table. For ABMIL on MUSK1/MUSK2
the table also shows the accuracies published by Ilse et al. 2018.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from .datasets import load_dataset
from .train import cross_validate

# Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018: the MUSK
# accuracies (mean ± std, 10-fold CV) as we recall its table; NOT verified against the paper here.
ILSE_2018 = {
    ("abmil", "musk1"): "0.900 ± 0.050 gated, 0.892 ± 0.040 attention",
    ("abmil", "musk2"): "0.863 ± 0.042 gated, 0.858 ± 0.048 attention",
}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt(r, key):
    return f"{r[key + '_mean']:.3f} ± {r[key + '_std']:.3f}"


def table(results, header) -> str:
    lines = [header, "", "| dataset | model | base acc | base_mammoth acc | base AUROC | base_mammoth AUROC | Ilse et al. 2018 acc (unverified) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    cells = {(r["dataset"], r["model"]): r for r in results}
    seen = []
    for r in results:
        ds, m = r["dataset"], r["model"].split(".")[0]
        if (ds, m) in seen:
            continue
        seen.append((ds, m))
        b, q = cells.get((ds, f"{m}.base")), cells.get((ds, f"{m}.base_mammoth"))
        get = lambda x, k: _fmt(x, k) if x else "–"
        lines.append(f"| {ds} | {m} | {get(b, 'accuracy')} | {get(q, 'accuracy')} | {get(b, 'auroc')} | "
                     f"{get(q, 'auroc')} | {ILSE_2018.get((m, ds), '')} |")
    return "\n".join(lines)


def merge(paths, out: Path, date: str) -> str:
    """One table from several compare JSON files (runs done in parallel, same settings)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    results = [r for run in runs for r in run["results"]]
    order = {"musk1": 0, "musk2": 1, "ucsb": 2, "mnist_bags": 3}
    results.sort(key=lambda r: order.get(r["dataset"], 9))
    walls = [run["wall_seconds"] for run in runs]
    r0 = results[0]
    folds = ", ".join(dict.fromkeys(f"{r['dataset']}: {r['folds']}" for r in results))
    mnist = next((r["dataset_args"] for r in results if r["dataset"] == "mnist_bags"), None)
    header = (f"Mean ± std over stratified folds (seed {r0['seed']}; same folds and seeds for base and base_mammoth); "
              f"{r0['epochs']} epochs, batch {r0['batch_size']} bags (padded, masked), Adam lr {r0['lr']:g} wd "
              f"{r0['weight_decay']:g}; folds {folds}"
              + (f"; MNIST-bags: {mnist.get('num_bags')} bags of {mnist.get('bag_size')} digits" if mnist else "")
              + f". {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {len(runs)} processes in parallel "
              f"(wall {', '.join(f'{w:.0f}' for w in walls)} s; wall {max(walls):.0f} s, "
              f"{sum(r['seconds'] for r in results):.0f} s of training/evaluation in all); {date}.")
    md = table(results, header)
    (out / f"compare-{date}.md").write_text(md + "\n")
    (out / f"compare-{date}.json").write_text(json.dumps(
        {"wall_seconds": max(walls), "process_wall_seconds": walls, "results": results}, indent=1))
    print(md)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["abmil", "meanmil", "maxmil"])
    p.add_argument("--datasets", nargs="+", default=["musk1", "musk2", "ucsb", "mnist_bags"])
    p.add_argument("--folds", type=int, default=None, help="default: 10 for MUSK, 5 otherwise")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bag-size", type=int, default=10)
    p.add_argument("--num-bags", type=int, default=200)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only join these compare JSON files (runs in parallel) into one table in --out-dir")
    a = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        return merge(a.merge, out, date)
    results, start = [], time.perf_counter()
    for ds in a.datasets:
        args = {"bag_size": a.bag_size, "num_bags": a.num_bags} if ds == "mnist_bags" else {}
        data = load_dataset(ds, **args)
        for m in a.models:
            for cfg in ("base", "base_mammoth"):
                r = cross_validate(f"{m}.{cfg}", ds, a.folds, a.epochs, seed=a.seed, dataset_args=args, data=data,
                                   batch_size=a.batch_size)
                results.append(r)
                print(f"{ds:10s} {m}.{cfg:13s} acc {_fmt(r, 'accuracy')}  AUROC {_fmt(r, 'auroc')}  {r['seconds']:.0f} s",
                      flush=True)
                wall = time.perf_counter() - start
                folds = sorted({f"{x['dataset']}: {x['folds']}" for x in results})
                header = (f"Mean ± std over folds (stratified, seed {a.seed}, same folds and seeds for both configs); "
                          f"{a.epochs} epochs, batch {a.batch_size}, Adam lr 5e-4 wd 1e-4; folds {', '.join(folds)}; "
                          f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} CPU; {date}; wall {wall:.0f} s.")
                md = table(results, header)
                (out / f"compare-{date}.md").write_text(md + "\n")
                (out / f"compare-{date}.json").write_text(json.dumps({"wall_seconds": wall, "results": results}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
