"""Wall time of ``Laplace(model, ..., backend=B).fit(loader)``: laplace_rs.torch.RustGGN vs laplace-torch's
backends, on bench/make_workloads.py's workloads (float32, same process, interleaved rounds).

    RAYON_NUM_THREADS=2 venv/bin/python python/bench_laplace_fit.py [--rounds 3] [--threads 2] [--md python/BENCH.md]

Per (workload, Laplace variant): every backend once untimed (warm-up), then ``--rounds`` interleaved
rounds (the backend order rotates) of a fresh ``Laplace(...).fit(loader)``; the median is reported.
"RustGGN" includes exporting the module (once per backend object, i.e. per fresh Laplace);
"RustGGN refit" is a second ``fit`` of the same object (θ refresh only). The evidence of each fit is
compared with CurvlinopsGGN's (relative difference, float32).
"""

import argparse
import os
import statistics
import sys
import time
import warnings
import zlib

# this file lives in python/, next to the laplace_rs sources (without the compiled _native):
# import the installed package instead
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch-size", type=int, default=256)
ap.add_argument("--workloads", default="mlp_mnist,cnn_mnist")
ap.add_argument("--budget", type=float, default=120.0, help="skip a backend in later rounds if one fit takes longer")
ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                help="address-space limit of the process: a backend that needs more fails (MemoryError) instead of "
                     "the machine killing the benchmark")
ap.add_argument("--quiet-wait", type=float, default=600.0,
                help="before each variant, wait up to this many seconds for the 1-minute load average to fall "
                     "below --quiet-load (other processes on the machine distort the times)")
ap.add_argument("--quiet-load", type=float, default=0.5)
ap.add_argument("--process", choices=["tuned", "default"], default="tuned",
                help="tuned: laplace_rs.torch.tune_process() (the laplace CLI's malloc settings and "
                     "CANDLE_NUM_THREADS=1, process-wide, so for every backend); default: neither")
ap.add_argument("--json", default=None, help="also write the rows as JSON")
ap.add_argument("--merge", nargs="*", default=None,
                help="only write --md from these JSON files (one table each)")
ap.add_argument("--md", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "BENCH.md"))
args = ap.parse_args()
os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before laplace_rs starts its thread pool
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

if args.mem_limit_gb > 0:
    import resource
    lim = int(args.mem_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

import copy  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

torch.set_num_threads(args.threads)
warnings.filterwarnings("ignore")

from laplace import Laplace  # noqa: E402
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN  # noqa: E402

from laplace_rs.torch import RustGGN, tune_process  # noqa: E402

if args.process == "tuned" and not args.merge:
    tune_process()

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(REPO, "bench"))
from make_workloads import workloads  # noqa: E402

# (subset_of_weights, hessian_structure); the last-layer Kron is Laplace()'s default
VARIANTS = [("all", "diag"), ("all", "kron"), ("last_layer", "kron"), ("last_layer", "full"), ("all", "full")]
TORCH_BACKENDS = [CurvlinopsGGN, AsdlGGN, BackPackGGN]
MAX_FULL_P = 10_000  # all-weights full GGN only for small models


def data_of(name, shape, n, lik, c):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, c, (n,), generator=g) if lik == "classification" else torch.randn((n, c), generator=g)
    return x, y


def wait_quiet():
    """Wait (up to --quiet-wait s) for a quiet machine; the 1-minute load average when starting."""
    t0 = time.time()
    while os.getloadavg()[0] >= args.quiet_load and time.time() - t0 < args.quiet_wait:
        time.sleep(5)
    return os.getloadavg()[0]


def fit(model, lik, sub, hs, backend, loader):
    # a fresh copy: ASDL / BackPACK leave hooks and attributes on the modules they touch
    model = copy.deepcopy(model)
    la = Laplace(model, lik, subset_of_weights=sub, hessian_structure=hs, backend=backend)
    t = time.perf_counter()
    la.fit(loader)
    dt = time.perf_counter() - t
    return la, dt


def main():
    all_w = workloads()
    rows = []
    for name in args.workloads.split(","):
        model, shape, n, lik, c = all_w[name]
        model = model.float().eval()
        P = sum(p.numel() for p in model.parameters())
        x, y = data_of(name, shape, n, lik, c)
        loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
        for sub, hs in VARIANTS:
            if sub == "all" and hs == "full" and P > MAX_FULL_P:
                continue
            load = wait_quiet()
            times = {}
            lml = {}
            backends = [RustGGN] + TORCH_BACKENDS
            ok = {}
            for be in backends:  # warm-up; also finds backends that cannot do this variant
                try:
                    la, dt = fit(model, lik, sub, hs, be, loader)
                    lml[be.__name__] = la.log_marginal_likelihood().item()
                    ok[be] = True
                    times[be.__name__] = []
                    if be is RustGGN:
                        times["RustGGN refit"] = []
                except Exception as e:  # noqa: BLE001
                    ok[be] = False
                    msg = (str(e).splitlines() or [""])[0][:60]
                    times[be.__name__] = f"fails: {type(e).__name__}: {msg}".rstrip(": ")
            for r in range(args.rounds):
                order = backends[r % len(backends):] + backends[:r % len(backends)]
                for be in order:
                    if not ok[be]:
                        continue
                    t_prev = times[be.__name__]
                    if t_prev and t_prev[-1] > args.budget:
                        continue
                    la, dt = fit(model, lik, sub, hs, be, loader)
                    times[be.__name__].append(dt)
                    if be is RustGGN:
                        t = time.perf_counter()
                        la.fit(loader)
                        times["RustGGN refit"].append(time.perf_counter() - t)
            med = {k: (statistics.median(v) if isinstance(v, list) and v else v) for k, v in times.items()}
            torch_ok = {k: v for k, v in med.items() if k in {b.__name__ for b in TORCH_BACKENDS} and isinstance(v, float)}
            fastest = min(torch_ok, key=torch_ok.get) if torch_ok else None
            ref = lml.get("CurvlinopsGGN")
            dl = abs(lml["RustGGN"] - ref) / abs(ref) if ref is not None and "RustGGN" in lml else None
            rows.append(dict(workload=name, P=P, n=n, variant=f"{sub} / {hs}", med=med, fastest=fastest, load=load,
                             load_end=os.getloadavg()[0],
                             lml_rel=dl, runs={k: len(v) for k, v in times.items() if isinstance(v, list)}))
            print(name, sub, hs, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items()},
                  "fastest torch:", fastest, "lml rel diff", dl, f"load {load:.2f}", flush=True)
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(dict(process=args.process, rows=rows, args=vars(args)), fh, indent=1)
    write_md([(args.process, rows)])


def fmt(v):
    if isinstance(v, float):
        return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"
    return str(v)


def write_md(tables):
    import platform
    lines = [
        "# laplace_rs.torch: `Laplace(...).fit(loader)` wall time",
        "",
        "`python/bench_laplace_fit.py` (re-run: `venv/bin/python python/bench_laplace_fit.py`): "
        f"workloads of `bench/make_workloads.py` (float32, random weights and data), "
        f"{args.threads} threads on both sides (`torch.set_num_threads`, `RAYON_NUM_THREADS`), one process, "
        f"loader batch size {args.batch_size}, median of {args.rounds} interleaved rounds after a warm-up "
        "fit of every backend; each timed fit builds a fresh `Laplace(model, 'classification', "
        "subset_of_weights=..., hessian_structure=..., backend=...)`.",
        "",
        "- **RustGGN**: `backend=laplace_rs.torch.RustGGN`, including the module's export "
        "(tools/laplace_export.py, once per backend object, so once per fresh `Laplace`);",
        "- **RustGGN refit**: a second `fit` of the same object (only θ is refreshed);",
        "- **fastest laplace-torch**: the fastest of CurvlinopsGGN, AsdlGGN, BackPackGGN for that variant "
        "(each one's median in the last columns);",
        "- **speed-up** = fastest laplace-torch / RustGGN (with export);",
        "- a backend that fails says why (`DefaultCPUAllocator`: out of memory under the benchmark's "
        f"{args.mem_limit_gb:g} GiB address-space limit; CurvlinopsGGN's diagonal is laplace-torch's "
        "torch.func Jacobians of the whole batch, its full GGN curvlinops applied to all P identity columns at once);",
        "- **evidence rel. diff**: |lml(RustGGN) − lml(CurvlinopsGGN)| / |lml(CurvlinopsGGN)| of the warm-up fits (float32).",
        "- **load**: the 1-minute load average before the variant's runs (after waiting up to "
        f"{args.quiet_wait:g} s for it to fall below {args.quiet_load:g}) and after them (about 1 is this "
        "benchmark itself on 2 cores; more means other processes shared the cores).",
        "- **process**: `tuned` = `laplace_rs.torch.tune_process()` called first (the `laplace` CLI's glibc "
        "malloc settings, process-wide, so they apply to the laplace-torch backends too, and "
        "`CANDLE_NUM_THREADS=1`); `default` = neither (what a plain `import laplace_rs.torch` gets).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}.",
    ]
    for process, rows in tables:
        lines += [""] + table(process, rows)
    with open(args.md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", args.md)


def table(process, rows):
    lines = [
        f"### process: {process}",
        "",
        "| workload (P, N) | variant | RustGGN | RustGGN refit | fastest laplace-torch | speed-up | evidence rel. diff | CurvlinopsGGN | AsdlGGN | BackPackGGN | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["med"]
        f = r["fastest"]
        su = (f"{m[f] / m['RustGGN']:.1f}×" if f and isinstance(m.get("RustGGN"), float) else "—")
        fast = f"{fmt(m[f])} ({f})" if f else "none works"
        dl = f"{r['lml_rel']:.1e}" if r["lml_rel"] is not None else "—"
        lines.append(f"| {r['workload']} ({r['P']:,}, {r['n']}) | {r['variant']} | {fmt(m.get('RustGGN'))} | "
                     f"{fmt(m.get('RustGGN refit'))} | {fast} | {su} | {dl} | {fmt(m.get('CurvlinopsGGN'))} | "
                     f"{fmt(m.get('AsdlGGN'))} | {fmt(m.get('BackPackGGN'))} | {r['load']:.1f} → {r['load_end']:.1f} |")
    return lines


if __name__ == "__main__":
    if args.merge:
        import json
        tabs = []
        for f in args.merge:
            d = json.load(open(f))
            tabs.append((d["process"], d["rows"]))
        write_md(tabs)
    else:
        main()
