"""Time `laplace` data-parallel subcommands on 1 and 2 MPI ranks (bench/MPI.md).

Python standard library only. Writes a workload (bench/make_workloads.py's
mlp_mnist: 784-100-100-10 tanh MLP, float32, random weights and inputs,
uniform labels; here N points, default 4000) as model.json +
weights.safetensors + data.safetensors, then runs every quantity with

  R=1, 2 threads   plain `laplace`, all cores (the single-process baseline)
  R=1, 1 thread    `mpirun -n 1` with RAYON_NUM_THREADS=1
  R=2, 1 thread    `mpirun -n 2`, each rank on one core (the default split)

and prints a markdown table of median wall times (whole process: start,
loading, computing, writing) over --repeat runs, interleaved.

    python3 bench/mpi_scaling.py --plain target/laplace-plain --mpi target/release/laplace
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from synthetic import mlp


def workload(out, n):
    """mlp_mnist: 784-100-100-10 tanh, float32, N points."""
    mlp(out, 784, 100, 2, 10, n)


QUANTITIES = [
    ("GGN diagonal", ["curvature", "--structure", "diag"]),
    ("KFAC (GGN)", ["curvature", "--structure", "kron"]),
    ("MC Fisher diagonal, 10 samples", ["curvature", "--structure", "diag", "--curvature", "fisher-mc", "--samples", "10"]),
    ("EF full, last layer (P = 1010)", ["curvature", "--structure", "full", "--curvature", "ef", "--last-layer"]),
    ("Jacobians, last layer", ["jacobians", "--last-layer"]),
    ("gradients, last layer", ["gradients", "--last-layer"]),
    ("Lanczos top-5 (GGN, matrix-free)", ["eigen", "--top-k", "5", "--tol", "1e-6"]),
    ("Hutchinson trace, 20 probes", ["trace", "--estimator", "hutchinson", "--samples", "20"]),
    ("fit KFAC + marglik", ["fit", "--structure", "kron", "--optimize-prior", "marglik"]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", required=True, help="laplace built without --features mpi")
    ap.add_argument("--mpi", required=True, help="laplace built with --features mpi")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings of the quantities to run (default: all)")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="laplace-mpi-bench-")
    workload(d, args.n)
    common = ["--model", f"{d}/model.json", "--weights", f"{d}/weights.safetensors", "--data", f"{d}/data.safetensors"]
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
    setups = [
        ("R=1, 2 threads", [args.plain], {"RAYON_NUM_THREADS": "2"}),
        ("R=1, 1 thread", mpirun + ["-n", "1", args.mpi], {"RAYON_NUM_THREADS": "1"}),
        ("R=2, 1 thread each", mpirun + ["-n", "2", args.mpi], {}),
    ]
    print(f"N = {args.n}, P = 89610 (784-100-100-10 MLP, float32), median of {args.repeat}, seconds\n")
    print("| quantity | " + " | ".join(s[0] for s in setups) + " | speed-up R=2 vs R=1 (1 thread) |")
    print("|---|" + "---:|" * (len(setups) + 1))
    only = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    for name, q in QUANTITIES:
        if only and not any(w in name.lower() for w in only):
            continue
        times = {s[0]: [] for s in setups}
        for _ in range(args.repeat):
            for label, prefix, env in setups:
                out = f"{d}/out.safetensors"
                likelihood = [] if q[0] == "jacobians" else ["--likelihood", "classification"]
                cmd = prefix + [q[0]] + common + q[1:] + likelihood + ["--out", out]
                e = dict(os.environ)
                e.pop("RAYON_NUM_THREADS", None)
                e.update(env)
                t = time.perf_counter()
                subprocess.run(cmd, check=True, env=e, stdout=subprocess.DEVNULL)
                times[label].append(time.perf_counter() - t)
        med = [statistics.median(times[s[0]]) for s in setups]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {med[1] / med[2]:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
