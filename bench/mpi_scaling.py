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
import json
import os
import random
import statistics
import struct
import subprocess
import tempfile
import time


def write_safetensors(path, arrays):
    """arrays: name -> (dtype 'F32'/'I64', shape, flat list)"""
    fmt = {"F32": "f", "I64": "q"}
    header, blobs, at = {}, [], 0
    for name, (dtype, shape, values) in arrays.items():
        blob = struct.pack("<%d%s" % (len(values), fmt[dtype]), *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def workload(out, n):
    rng = random.Random(0)
    sizes = [784, 100, 100, 10]
    layers, weights = [], {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        idx = 2 * i
        layers.append({"type": "Linear", "in_features": a, "out_features": b})
        if i < len(sizes) - 2:
            layers.append({"type": "Tanh"})
        bound = 1 / a ** 0.5
        weights[f"{idx}.weight"] = ("F32", [b, a], [rng.uniform(-bound, bound) for _ in range(a * b)])
        weights[f"{idx}.bias"] = ("F32", [b], [rng.uniform(-bound, bound) for _ in range(b)])
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"input_shape": [784], "layers": layers}, f)
    write_safetensors(os.path.join(out, "weights.safetensors"), weights)
    x = [rng.gauss(0, 1) for _ in range(n * 784)]
    y = [rng.randrange(10) for _ in range(n)]
    write_safetensors(os.path.join(out, "data.safetensors"), {"x": ("F32", [n, 784], x), "y": ("I64", [n], y)})


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
