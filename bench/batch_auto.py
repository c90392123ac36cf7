#!/usr/bin/env python
"""`--batch-size auto` against one batch of all points, on the sweep's
workloads: the whole `laplace` command (exec to exit, result written), its
time and peak memory, for the default batch rule of this build (and, with
`--old`, of another build), interleaved over rounds. The check behind the
batch rule of crates/laplace/src/curvature/batching.rs: a batch of about
the cache's size must be no slower than one batch, and leaner.

    venv/bin/python bench/make_workloads.py --sweep
    venv/bin/python bench/batch_auto.py --laplace target/release/laplace \\
        [--old OLD/laplace] --rounds 3 --md bench/BATCH.md --analysis bench/BATCH_ANALYSIS.md

Peak memory is the process's maximum resident set (`/usr/bin/time -f %M`,
which execs the command from a small process, so no interpreter's pages are
counted). Times are the minimum over rounds (this machine is shared; the
minimum is the least disturbed run), each ratio of two minima.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import QUANTITIES, whole_command  # noqa: E402

DEFAULT_QUANTITIES = "ggn_diag,ef_diag,gradients,ggn_kron,ef_kron,ll_ggn_full"
SCRATCH = tempfile.mkdtemp(prefix="batch-auto-")


def bench_argv(binary, wdir, q, batch):
    lik = open(os.path.join(wdir, "likelihood")).read().strip()
    return [binary, "bench", "--model", os.path.join(wdir, "model.json"),
            "--weights", os.path.join(wdir, "weights.safetensors"), "--data", os.path.join(wdir, "data.npz"),
            "--likelihood", lik, *QUANTITIES[q]["ours"], "--batch-size", batch, "--repeat", "1",
            "--threads", "2", "--json"]


def batch_points(argv, env):
    """The batch `laplace bench` resolved for `argv` (its JSON's batch_points)."""
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()[-300:]}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])["batch_points"]


def run_whole(argv, env):
    """Wall time (s) and peak RSS (bytes) of the real command for `argv`."""
    out = os.path.join(SCRATCH, "out.safetensors")
    cmd = ["/usr/bin/time", "-f", "%M", *whole_command(argv, out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()[-300:]}")
    os.remove(out)
    return wall, int(p.stderr.strip().splitlines()[-1]) * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--laplace", default=os.path.join(HERE, "..", "target", "release", "laplace"))
    ap.add_argument("--old", help="another build, run with --batch-size auto as a third entrant")
    ap.add_argument("--workload-dir", default=os.path.join(HERE, "workloads"))
    ap.add_argument("--workloads", help="comma-separated (default: every sweep workload there)")
    ap.add_argument("--quantities", default=DEFAULT_QUANTITIES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md", default=None)
    ap.add_argument("--analysis", help="hand-written reading appended to --md (bench/BATCH_ANALYSIS.md)")
    args = ap.parse_args()

    names = args.workloads.split(",") if args.workloads else sorted(
        w for w in os.listdir(args.workload_dir) if os.path.exists(os.path.join(args.workload_dir, w, "sweep_case")))
    env = dict(os.environ, RAYON_NUM_THREADS="2", OMP_NUM_THREADS="2")
    entrants = [("one batch", args.laplace, None), ("auto", args.laplace, "auto")]
    if args.old:
        entrants.insert(1, ("auto, old build", args.old, "auto"))
    rows = []
    for w in names:
        wdir = os.path.join(args.workload_dir, w)
        n = int(np.load(os.path.join(wdir, "data.npz"))["x"].shape[0])
        for q in args.quantities.split(","):
            argvs = {e: bench_argv(b, wdir, q, str(n) if bs is None else bs) for e, b, bs in entrants}
            try:
                batches = {e: batch_points(argvs[e], env) for e, _, _ in entrants}
                runs = {e: [] for e, _, _ in entrants}
                for _ in range(args.rounds):
                    for e, _, _ in entrants:
                        runs[e].append(run_whole(argvs[e], env))
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"{w} {q}: skipped ({str(err)[-200:]})", file=sys.stderr)
                continue
            cell = {e: dict(batch=batches[e], s=min(t for t, _ in runs[e]), rss=max(m for _, m in runs[e]))
                    for e in runs}
            rows.append(dict(workload=w, quantity=q, n=n, cells=cell))
            print(w, q, {e: (c["batch"], round(c["s"] * 1e3, 1), c["rss"] >> 20) for e, c in cell.items()},
                  flush=True)
    md = report(rows, [e for e, _, _ in entrants], args)
    if args.analysis:
        with open(args.analysis) as fh:
            md += "\n" + fh.read()
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md)
    print(md)


def report(rows, entrants, args):
    L = ["# `--batch-size auto` against one batch of all points", "",
         f"Generated by `bench/batch_auto.py` on {time.strftime('%Y-%m-%d')} "
         f"(`--rounds {args.rounds}`): the whole `laplace` command (exec to exit, result written), "
         "2 threads, float32, on the sweep workloads (bench/workloads, `make_workloads.py --sweep`). "
         "Time: the minimum over the rounds, interleaved; memory: the process's peak RSS. "
         "Ratios are to one batch of all N points (what the sweep runs).", ""]
    L += ["Cells where an entrant chose all N points run the same command as one batch: their "
          "ratios are this machine's noise, the yardstick for the others.", "",
          "| entrant | cells | time ÷ one batch: best | median | worst | peak memory ÷ one batch: best | median | worst |",
          "|---|---|---|---|---|---|---|---|"]
    for e in entrants[1:]:
        for which, keep in (("split into batches", lambda r: r["cells"][e]["batch"] < r["n"]),
                            ("one batch chosen (noise)", lambda r: r["cells"][e]["batch"] >= r["n"])):
            sel = [r for r in rows if keep(r)]
            if not sel:
                continue
            t = sorted(r["cells"][e]["s"] / r["cells"]["one batch"]["s"] for r in sel)
            m = sorted(r["cells"][e]["rss"] / r["cells"]["one batch"]["rss"] for r in sel)
            L.append(f"| {e}: {which} | {len(t)} | {t[0]:.2f}× | {statistics.median(t):.2f}× | {t[-1]:.2f}× | "
                     f"{m[0]:.2f}× | {statistics.median(m):.2f}× | {m[-1]:.2f}× |")
    L += ["", "| workload | quantity | N | " + " | ".join(f"{e}: batch · time · peak" for e in entrants)
          + " | auto ÷ one batch: time · peak |", "|---|---|---|" + "---|" * (len(entrants) + 1)]
    for r in rows:
        c = r["cells"]
        cells = " | ".join(f"{c[e]['batch']} · {c[e]['s'] * 1e3:.1f} ms · {c[e]['rss'] / 2**20:.0f} MB" for e in entrants)
        L.append(f"| {r['workload']} | {QUANTITIES[r['quantity']]['label']} | {r['n']} | {cells} | "
                 f"{c['auto']['s'] / c['one batch']['s']:.2f}× · {c['auto']['rss'] / c['one batch']['rss']:.2f}× |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
