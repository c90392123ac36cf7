#!/usr/bin/env python
"""Two builds of `laplace` side by side on the bench/ workloads: every
harness quantity, `laplace bench` of each binary run interleaved (A, B, A,
B, ...) for several rounds, median of the per-process medians, and the
ratio B / A. Used to check that an engine change is no slower.

    venv/bin/python bench/make_workloads.py
    venv/bin/python bench/compare_binaries.py --a OLD/laplace --b target/release/laplace \\
        --rounds 3 --repeat 5 --md compare.md
    # the shape sweep (make_workloads.py --sweep): name the quantities
    venv/bin/python bench/compare_binaries.py --a OLD/laplace --b target/release/laplace \\
        --workloads mlp_w16_d2,resnet_c16_s16 --quantities ggn_diag,ef_kron --md compare.md
    # what a shell user waits for: the real command, exec to exit
    venv/bin/python bench/compare_binaries.py --a OLD/laplace --b target/release/laplace --whole ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import QUANTITIES, WORKLOADS, time_whole  # noqa: E402

SCRATCH = tempfile.mkdtemp(prefix="compare-binaries-")


def bench_argv(binary, wdir, q, repeat, threads):
    lik = open(os.path.join(wdir, "likelihood")).read().strip()
    n = int(np.load(os.path.join(wdir, "data.npz"))["x"].shape[0])
    return [binary, "bench", "--model", os.path.join(wdir, "model.json"),
            "--weights", os.path.join(wdir, "weights.safetensors"), "--data", os.path.join(wdir, "data.npz"),
            "--likelihood", lik, *QUANTITIES[q]["ours"], "--batch-size", str(n), "--repeat", str(repeat),
            "--threads", str(threads), "--json"]


def bench(binary, wdir, q, repeat, threads):
    """`laplace bench`: its JSON (times_s, peak_rss_bytes), or None and the error."""
    argv = bench_argv(binary, wdir, q, repeat, threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
    d = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    return d, None


def whole(binary, wdir, q, repeat, threads):
    """The same quantity as the real command (`laplace curvature` / `gradients` /
    `jacobians ... --out`), exec to exit, `repeat` processes: the times in the
    shape `bench` returns. No peak RSS: a child's high-water mark from wait4
    includes the forked interpreter it was before exec (37 MB here), which
    is larger than a small command's own; `laplace bench` reports it."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    try:
        times = time_whole(bench_argv(binary, wdir, q, repeat, threads), env, SCRATCH, repeat, 600)
    except RuntimeError as e:
        return None, str(e).strip().splitlines()[-1]
    return {"times_s": times, "peak_rss_bytes": None}, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="baseline binary")
    ap.add_argument("--b", required=True, help="new binary")
    ap.add_argument("--workload-dir", default=os.path.join(HERE, "workloads"))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--quantities", default=None, help="comma-separated subset (default: every harness quantity)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true",
                    help="time the whole process of the real command (exec to exit, writing its --out file) "
                         "instead of `laplace bench`: --repeat processes per round")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    rows = []
    for w in args.workloads.split(","):
        wdir = os.path.join(args.workload_dir, w)
        # A workload of the sweep (not in WORKLOADS) takes --quantities as given.
        for q in WORKLOADS.get(w, (args.quantities or "").split(",")):
            if not q or (args.quantities and q not in args.quantities.split(",")):
                continue
            med = {"a": [], "b": []}
            rss = {"a": [], "b": []}
            err = None
            for _ in range(args.rounds):
                for side in ("a", "b"):
                    d, e = (whole if args.whole else bench)(getattr(args, side), wdir, q, args.repeat, args.threads)
                    if d is None:
                        err = e
                        continue
                    med[side].append(statistics.median(d["times_s"]))
                    rss[side].append(d["peak_rss_bytes"])
            if not med["a"] or not med["b"]:
                rows.append((w, q, None, None, None, None, None, err))
                continue
            a, b = statistics.median(med["a"]), statistics.median(med["b"])
            peak = lambda xs: None if None in xs else max(xs)
            rows.append((w, q, a, b, b / a, peak(rss["a"]), peak(rss["b"]), None))
            print(f"{w:10s} {q:14s} A {a*1e3:9.2f} ms  B {b*1e3:9.2f} ms  B/A {b/a:5.2f}", flush=True)
    lines = ["| workload | quantity | A (ms) | B (ms) | B / A | peak RSS A (MB) | peak RSS B (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for w, q, a, b, r, ra, rb, err in rows:
        if a is None:
            lines.append(f"| {w} | {q} | | | {err} | | |")
        else:
            mb = lambda x: "—" if x is None else f"{x/1e6:.0f}"
            lines.append(f"| {w} | {q} | {a*1e3:.2f} | {b*1e3:.2f} | {r:.2f} | {mb(ra)} | {mb(rb)} |")
    ratios = [row[4] for row in rows if row[4] is not None]
    if ratios:
        lines.append("")
        lines.append(f"B / A over {len(ratios)} quantities: median {statistics.median(ratios):.2f}, "
                     f"worst {max(ratios):.2f}, best {min(ratios):.2f}")
    text = "\n".join(lines)
    print(text)
    if args.md:
        open(args.md, "w").write(text + "\n")


if __name__ == "__main__":
    main()
