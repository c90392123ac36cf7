"""Side-by-side benchmark: `laplace bench` (laplace-rs) against laplace-torch's backends.

Run with the reference virtual environment (see bench/README.md):

    venv/bin/python bench/make_workloads.py
    cargo build --release
    venv/bin/python bench/harness.py [--workloads mlp_small,reg_uci] [--quantities ggn_diag,...]
        [--repeat 3] [--rounds 2] [--timeout 300] [--mem-limit-gb 16] [--skip-torch]

For every (workload, quantity) it runs our command and every laplace-torch
backend that can compute the quantity, alternately, for --rounds rounds, each
measurement in a process of its own with a memory limit and a timeout;
checks our result against a reference backend's; and writes one table per
workload to bench/RESULTS.md and every raw number to bench/results.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD = os.path.join(HERE, "torch_child.py")

BACKENDS = ["backpack", "asdl", "curvlinops", "torchfunc"]
BACKEND_LABEL = {"ours": "ours (laplace-rs)", "backpack": "BackPACK", "asdl": "ASDL",
                 "curvlinops": "curvlinops", "torchfunc": "torch.func (base interface)"}

COMMON = ["ggn_diag", "ggn_diag_mc", "ef_diag", "gradients", "ggn_kron", "ggn_kron_mc", "ef_kron",
          "ll_ggn_full"]
EXTRA = ["jacobians", "ggn_full", "ef_full", "hessian_full"]
WORKLOADS = {"mlp_mnist": COMMON, "cnn_mnist": COMMON, "mlp_small": COMMON + EXTRA,
             "reg_uci": COMMON + EXTRA}

# label; our command's arguments; how to check; reference backends in order of preference;
# whether laplace-torch's value is 2x ours for regression (EF and gradients, see the spec).
QUANTITIES = {
    "ggn_diag": dict(label="GGN diag (exact)", ours=["--curvature", "ggn", "--structure", "diag"],
                     ref=["backpack", "asdl", "torchfunc", "curvlinops"]),
    "ggn_diag_mc": dict(label="GGN diag (MC, 1 sample)",
                        ours=["--curvature", "fisher-mc", "--structure", "diag", "--samples", "1",
                              "--seed", "0"], exact="ggn_diag"),
    "ef_diag": dict(label="EF diag", ours=["--curvature", "ef", "--structure", "diag"],
                    ref=["backpack", "asdl", "torchfunc", "curvlinops"], reg2=True),
    "gradients": dict(label="gradients (per sample)", ours=["--quantity", "gradients"],
                      ref=["torchfunc", "backpack", "asdl", "curvlinops"], reg2=True),
    "ggn_kron": dict(label="GGN kron (exact)", ours=["--curvature", "ggn", "--structure", "kron"],
                     ref=["curvlinops", "asdl", "backpack"]),
    "ggn_kron_mc": dict(label="GGN kron (MC, 1 sample)",
                        ours=["--curvature", "fisher-mc", "--structure", "kron", "--samples", "1",
                              "--seed", "0"], exact="ggn_kron"),
    "ef_kron": dict(label="EF kron", ours=["--curvature", "ef", "--structure", "kron"],
                    ref=["curvlinops", "asdl"], reg2=True),
    "ll_ggn_full": dict(label="last-layer GGN full",
                        ours=["--curvature", "ggn", "--structure", "full", "--last-layer"],
                        ref=["torchfunc", "curvlinops", "backpack", "asdl"]),
    "jacobians": dict(label="Jacobians", ours=["--quantity", "jacobians"],
                      ref=["torchfunc", "backpack", "asdl", "curvlinops"]),
    "ggn_full": dict(label="GGN full", ours=["--curvature", "ggn", "--structure", "full"],
                     ref=["curvlinops", "torchfunc", "backpack", "asdl"]),
    "ef_full": dict(label="EF full", ours=["--curvature", "ef", "--structure", "full"],
                    ref=["curvlinops", "torchfunc", "backpack", "asdl"], reg2=True),
    "hessian_full": dict(label="Hessian full", ours=["--curvature", "hessian", "--structure", "full"],
                         ref=["curvlinops", "asdl"]),
}
ORDER = list(QUANTITIES)

# The largest result a sweep quantity may have (float32 bytes); larger ones are skipped, for
# laplace-torch and ours alike, and named in RESULTS.md.
SWEEP_RESULT_LIMIT = 2 * 2**30


def quantities_of(w, meta):
    """The quantities a workload runs: the fixed lists above for the four standard workloads;
    for a sweep workload (bench/sweep_models.py), COMMON less those whose result would exceed
    SWEEP_RESULT_LIMIT (per-sample gradients N·P, the last-layer full matrix P_ll²)."""
    if w in WORKLOADS:
        return WORKLOADS[w], []
    p, n, p_ll = meta["n_params"], meta["n_data"], meta["n_last_layer"]
    sizes = {"gradients": 4 * n * p, "ll_ggn_full": 4 * p_ll * p_ll}
    keep = [q for q in COMMON if sizes.get(q, 0) <= SWEEP_RESULT_LIMIT]
    skipped = [f"{QUANTITIES[q]['label']} skipped: its result would be {sizes[q] / 2**30:.1f} GiB "
               f"(> {SWEEP_RESULT_LIMIT / 2**30:g} GiB)" for q in COMMON if q not in keep]
    return keep, skipped

# laplace-torch classes (for the notes; the child builds them, see torch_child.CLASSES).
KIND = {"ggn_diag": "ggn", "ggn_diag_mc": "ggn", "ef_diag": "ef", "gradients": "grad", "ggn_kron": "ggn",
        "ggn_kron_mc": "ggn", "ef_kron": "ef", "ll_ggn_full": "ggn", "jacobians": "jac", "ggn_full": "ggn",
        "ef_full": "ef", "hessian_full": "hess"}
CLASSES = {
    "ggn": {"backpack": "BackPackGGN", "asdl": "AsdlGGN", "curvlinops": "CurvlinopsGGN",
            "torchfunc": "GGNInterface"},
    "jac": {"backpack": "BackPackGGN", "asdl": "AsdlGGN", "curvlinops": "CurvlinopsGGN",
            "torchfunc": "CurvatureInterface"},
    "ef": {"backpack": "BackPackEF", "asdl": "AsdlEF", "curvlinops": "CurvlinopsEF",
           "torchfunc": "EFInterface"},
    "grad": {"backpack": "BackPackEF", "asdl": "AsdlEF", "curvlinops": "CurvlinopsEF",
             "torchfunc": "CurvatureInterface"},
    "hess": {"backpack": None, "asdl": "AsdlHessian", "curvlinops": "CurvlinopsHessian",
             "torchfunc": "CurvatureInterface"},
}
# Backends whose method for a quantity is inherited from the torch.func base interface
# (same code as the torchfunc column; measured anyway, as its own backend).
SAME_AS_TORCHFUNC = {
    ("ggn_diag", "curvlinops"), ("ggn_diag_mc", "curvlinops"), ("ef_diag", "curvlinops"),
    ("gradients", "curvlinops"), ("jacobians", "curvlinops"),
    ("ll_ggn_full", "backpack"), ("ll_ggn_full", "asdl"),
}
STATIC_NA = {("hessian_full", "backpack"): "n/a (laplace-torch has no BackPACK Hessian backend)"}

TOL = 1e-4  # relative Frobenius error, float32
MC_BOUND = 0.5  # MC vs exact GGN, relative Frobenius error (loose: one sample per point)


# --------------------------------------------------------------------------- processes

class LineReader:
    """Lines from a pipe with a timeout (no buffered-reader surprises under select)."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def readline(self, timeout):
        end = time.monotonic() + timeout if timeout is not None else None
        while b"\n" not in self.buf:
            left = None if end is None else max(0.0, end - time.monotonic())
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("pipe closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def kill_group(pid):
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass


def watch(pid, poll, timeout, mem_limit):
    """Wait for a child: poll() -> (status, maxrss_kb) or None. Kills it past the
    timeout or past mem_limit bytes of RSS. Returns (status, maxrss_kb, wall_s, killed_for)."""
    t0 = time.monotonic()
    killed_for = None
    while True:
        done = poll(0.05)
        if done is not None:
            return done[0], done[1], time.monotonic() - t0, killed_for
        if killed_for is None:
            if time.monotonic() - t0 > timeout:
                killed_for = "timeout"
                kill_group(pid)
            elif mem_limit and rss_bytes(pid) > mem_limit:
                killed_for = "oom-watchdog"
                kill_group(pid)


def limit_preexec(mem_limit):
    def f():
        os.setpgid(0, 0)
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    return f


def run_exec(argv, env, log_out, log_err, timeout, mem_limit):
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        p = subprocess.Popen(argv, stdout=fo, stderr=fe, env=env, cwd=ROOT,
                             preexec_fn=limit_preexec(mem_limit))

    def poll(wait):
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == 0:
            time.sleep(wait)
            return None
        p.returncode = status  # reaped here; keep Popen quiet
        return status, ru.ru_maxrss

    return watch(p.pid, poll, timeout, mem_limit)


class TorchServer:
    """torch_child.py --server: imports once, forks one child per measurement."""

    def __init__(self, python, env):
        self.python, self.env, self.proc, self.child = python, env, None, None

    def start(self):
        self.proc = subprocess.Popen([self.python, CHILD, "--server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env,
                                     cwd=ROOT)
        self.reader = LineReader(self.proc.stdout.fileno())

    def run(self, req, timeout, mem_limit):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        line = self.reader.readline(120)  # imports on first use
        if line is None:
            raise RuntimeError("torch server did not start a child")
        pid = self.child = json.loads(line)["pid"]

        def poll(wait):
            line = self.reader.readline(wait)
            if line is None:
                return None
            d = json.loads(line)
            return d["status"], d["maxrss_kb"]

        out = watch(pid, poll, timeout, mem_limit)
        self.child = None
        return out

    def close(self):
        if self.child is not None:  # interrupted mid-measurement
            kill_group(self.child)
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def describe_status(status, killed_for, timeout, mem_limit):
    if killed_for == "timeout":
        return "timeout", f"timeout (>{timeout:g} s)"
    if killed_for == "oom-watchdog":
        return "oom", f"OOM (RSS > {mem_limit / 2**30:g} GiB, killed)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name
        return ("oom" if sig == signal.SIGKILL else "error"), f"killed by {name}"
    return "error", f"exit status {os.WEXITSTATUS(status)}"


def read_text(path, limit=4000):
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- measurements

def measure_ours(args, w, q, rnd, out, tmp):
    wdir = os.path.join(args.workload_dir, w)
    lik = open(os.path.join(wdir, "likelihood")).read().strip()
    n = int(np.load(os.path.join(wdir, "data.npz"))["x"].shape[0])
    argv = [args.laplace, "bench", "--model", os.path.join(wdir, "model.json"),
            "--weights", os.path.join(wdir, "weights.safetensors"),
            "--data", os.path.join(wdir, "data.npz"), "--likelihood", lik,
            *QUANTITIES[q]["ours"], "--batch-size", str(n), "--repeat", str(args.repeat),
            "--threads", str(args.threads), "--json"]
    if out:
        argv += ["--out", out]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    tag = f"{w}.{q}.ours.r{rnd}"
    lo, le = os.path.join(tmp, tag + ".out"), os.path.join(tmp, tag + ".err")
    status, maxrss_kb, wall, killed = run_exec(argv, env, lo, le, args.timeout, args.mem_limit)
    rec = dict(workload=w, quantity=q, entrant="ours", round=rnd, wall_s=wall,
               wait4_maxrss_bytes=maxrss_kb * 1024, command=shlex.join(argv))
    stdout, stderr = read_text(lo, 20000), read_text(le)
    if status == 0 and killed is None:
        js = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        d = json.loads(js[-1])
        rec.update(ok=True, times_s=d["times_s"], median_s=statistics.median(d["times_s"]),
                   peak_rss_bytes=d["peak_rss_bytes"], baseline_rss_bytes=None,
                   n_params=d.get("n_params"), n_selected=d.get("n_selected"), ours_json=d)
        if args.whole:
            # A failed or timed-out whole-process run is recorded, not fatal to the sweep.
            try:
                rec["whole_s"] = time_whole(argv, env, tmp, args.whole, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                rec["whole_error"] = str(e)[-500:]
        return rec
    kind, reason = describe_status(status, killed, args.timeout, args.mem_limit)
    err = stderr.strip()
    if killed is None:
        if "hessian" in err.lower():
            kind, reason = "unsupported", "n/a (not implemented)"
        elif "memory allocation" in err or "out of memory" in err.lower():
            kind, reason = "oom", f"OOM ({err.splitlines()[-1][:80]})"
        elif err:
            reason = err.splitlines()[0][:150]
    rec.update(ok=False, error_kind=kind, error=reason, stderr=err[-2000:])
    return rec


def whole_command(bench_argv, out):
    """The command a shell user runs for the quantity `laplace bench` timed (same model, data,
    flags and batch size): `laplace curvature`, `gradients` or `jacobians`, writing its file."""
    argv = list(bench_argv)
    laplace, sub = argv.pop(0), argv.pop(0)
    if sub != "bench":
        raise ValueError(f"not a `laplace bench` command: {shlex.join(bench_argv)}")
    for flag, n in (("--repeat", 1), ("--threads", 1), ("--json", 0), ("--out", 1)):
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 1 + n]
    sub = "curvature"
    if "--quantity" in argv:
        i = argv.index("--quantity")
        sub = argv[i + 1]
        del argv[i:i + 2]
    return [laplace, sub, *argv, "--out", out, "--quiet"]


def time_whole(bench_argv, env, tmp, runs, timeout):
    """Wall time of the whole `laplace` process, exec to exit (reading the files, computing,
    writing the result): what a shell user waits for. `runs` processes of the real command
    for `bench_argv` (see `whole_command`), its output written under `tmp` and removed after
    each run; RuntimeError (with the command's stderr) where one fails."""
    out = os.path.join(tmp, "whole.safetensors")
    argv = whole_command(bench_argv, out)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=timeout)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed: {r.stderr.decode()[-500:]}")
        os.remove(out)
    return times


def spawn_baseline(args):
    """Median wall time of `laplace --version` (exec, dynamic loading, exit: the part of every
    whole-process time that no command can avoid)."""
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        subprocess.run([args.laplace, "--version"], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_torch(args, server, w, q, backend, rnd, out, tmp, repeat=None):
    tag = f"{w}.{q}.{backend}.r{rnd}"
    summ = os.path.join(tmp, tag + ".json")
    req = dict(workload_dir=os.path.join(args.workload_dir, w), quantity=q, backend=backend,
               repeat=args.repeat if repeat is None else repeat, threads=args.threads,
               mem_limit_bytes=args.mem_limit, budget_s=args.budget, seed=0, out=out,
               summary=summ, log=os.path.join(tmp, tag + ".log"))
    if server is not None:
        status, maxrss_kb, wall, killed = server.run(req, args.timeout, args.mem_limit)
    else:
        rq = os.path.join(tmp, tag + ".req.json")
        with open(rq, "w") as fh:
            json.dump(req, fh)
        status, maxrss_kb, wall, killed = run_exec([args.python, CHILD, "--request", rq], args.torch_env,
                                                   req["log"], req["log"] + ".err", args.timeout,
                                                   args.mem_limit)
    rec = dict(workload=w, quantity=q, entrant=backend, round=rnd, wall_s=wall,
               wait4_maxrss_bytes=maxrss_kb * 1024, cls=CLASSES[KIND[q]][backend])
    summary = None
    if killed is None and os.path.exists(summ):
        with open(summ) as fh:
            summary = json.load(fh)
    if summary is not None and summary.get("ok"):
        rec.update(ok=True, times_s=summary["times_s"], median_s=summary["median_s"],
                   peak_rss_bytes=summary["peak_rss_bytes"],
                   baseline_rss_bytes=summary["baseline_rss_bytes"], warmup_s=summary["warmup_s"],
                   repeat_reduced_to=summary.get("repeat_reduced_to"))
        return rec
    if summary is not None:
        kind = summary.get("error_kind", "error")
        err = summary.get("error", "")
        reason = {"unsupported": "unsupported", "oom": "OOM"}.get(kind, "error")
        short = err.splitlines()[0] if err else ""
        if kind == "unsupported":
            reason, short = "unsupported", short
        if kind == "oom":
            m = re.search(r"allocate (\d+) bytes", err)
            short = (f"could not allocate {int(m.group(1)) / 2**30:.1f} GiB more under the "
                     f"{args.mem_limit / 2**30:g} GiB limit" if m else short[:80])
        reason = f"{reason}: {short[:120]}" if short else reason
        rec.update(ok=False, error_kind=kind, error=reason, traceback=summary.get("traceback"))
    else:
        kind, reason = describe_status(status, killed, args.timeout, args.mem_limit)
        rec.update(ok=False, error_kind=kind, error=reason,
                   stderr=read_text(req["log"], 2000) + read_text(req["log"] + ".err", 2000))
    return rec


# --------------------------------------------------------------------------- checks

def rel_fro(a, b):
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} vs {b.shape}")
    nb = np.linalg.norm(b.ravel())
    return float(np.linalg.norm((a - b).ravel()) / (nb if nb > 0 else 1.0))


def kron_blocks(d):
    blocks = {}
    for k, v in d.items():
        m = re.fullmatch(r"kron\.(\d+)\.(\d+)", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = np.asarray(v, np.float64)
    return [[blocks[b][f] for f in sorted(blocks[b])] for b in sorted(blocks)]


def kron_compare(a, b):
    """Per-block relative Frobenius error of the Kronecker products (never formed):
    ||⊗X - ⊗Y||² = Π<X,X> + Π<Y,Y> - 2 Π<X,Y>. Returns (overall, max over blocks)."""
    ka, kb = kron_blocks(a), kron_blocks(b)
    if len(ka) != len(kb):
        raise ValueError(f"{len(ka)} vs {len(kb)} Kronecker blocks")
    num = den = 0.0
    worst = 0.0
    for i, (fa, fb) in enumerate(zip(ka, kb)):
        # Compare the products, so factor counts may differ only if the product is
        # one scalar/matrix; collapse both to the same number of factors.
        if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
            raise ValueError(f"block {i}: factor shapes {[x.shape for x in fa]} vs {[y.shape for y in fb]}")
        aa = np.prod([np.vdot(x, x) for x in fa])
        bb = np.prod([np.vdot(y, y) for y in fb])
        ab = np.prod([np.vdot(x, y) for x, y in zip(fa, fb)])
        d2 = max(aa + bb - 2 * ab, 0.0)
        num += d2
        den += bb
        worst = max(worst, float(np.sqrt(d2 / bb)) if bb > 0 else float(np.sqrt(d2)))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num)), worst


def compare(q, ours, theirs, lik):
    """Errors of ours (scaled to laplace-torch's convention) against theirs: dict key -> err.
    For kron also 'kron_max_block'."""
    scale = 2.0 if (QUANTITIES[q].get("reg2") and lik == "regression") else 1.0
    errs = {}
    if "kron" in q:
        overall, worst = kron_compare(scale_kron(ours, scale) if scale != 1.0 else ours, theirs)
        errs["kron"], errs["kron_max_block"] = overall, worst
    else:
        main = {"jacobians": ["J", "f"], "gradients": ["G"]}.get(q, ["H"])
        for k in main:
            errs[k] = rel_fro(ours[k] * (scale if k in ("G", "H") else 1.0), theirs[k])
    if "loss" in ours and "loss" in theirs:
        lscale = scale if q == "gradients" else 1.0
        errs["loss"] = rel_fro(np.asarray(ours["loss"]).reshape(-1) * lscale,
                               np.asarray(theirs["loss"]).reshape(-1))
    return errs


def scale_kron(d, s):
    """Scale a Kronecker-factored result by s (on the first factor of each block)."""
    out = dict(d)
    for k in d:
        if re.fullmatch(r"kron\.\d+\.0", k):
            out[k] = d[k] * s
    return out


def main_error(q, errs):
    if "kron" in q:
        return errs["kron_max_block"]
    return max(v for k, v in errs.items())


# --------------------------------------------------------------------------- report

def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), usable_cpus=len(os.sched_getaffinity(0)),
                mem_gib=round(mem / 2**30, 1), kernel=platform.release(), python=platform.python_version())


def versions(args):
    v = {}
    for pkg in ["torch", "laplace-torch", "backpack-for-pytorch", "curvlinops-for-pytorch", "asdfghjkl",
                "numpy", "safetensors"]:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    try:
        v["laplace-rs"] = subprocess.run([args.laplace, "--version"], capture_output=True, text=True).stdout.strip()
        import hashlib
        with open(args.laplace, "rb") as fh:
            v["laplace binary sha256"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    except OSError:
        v["laplace-rs"] = None
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "crates", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
        v["laplace-rs git"] = head + (" (+ uncommitted changes under crates/)" if dirty else "")
    except OSError:
        pass
    return v


def fmt_s(t):
    if t is None:
        return "—"
    return f"{t:.3g} s" if t >= 0.1 else f"{t * 1e3:.3g} ms"


def fmt_mb(b):
    return "—" if b is None else f"{b / 1e6:.0f} MB" if b >= 1e7 else f"{b / 1e6:.1f} MB"


def aggregate(recs):
    ok = [r for r in recs if r.get("ok")]
    if not ok:
        last = recs[-1] if recs else None
        return dict(ok=False, error=last["error"] if last else "not run",
                    error_kind=last.get("error_kind") if last else None)
    times = [t for r in ok for t in r["times_s"]]
    base = [r["baseline_rss_bytes"] for r in ok if r.get("baseline_rss_bytes") is not None]
    agg = dict(ok=True, n_times=len(times), median_s=statistics.median(times) if times else None,
               min_s=min(times) if times else None, rounds=len(ok),
               peak_rss_bytes=max(r["peak_rss_bytes"] for r in ok),
               baseline_rss_bytes=statistics.median(base) if base else None,
               round_medians_s=[r["median_s"] for r in ok])
    whole = [t for r in ok for t in r.get("whole_s", [])]
    if whole:
        agg.update(whole_median_s=statistics.median(whole), whole_min_s=min(whole))
    whole_errors = [r["whole_error"] for r in ok if r.get("whole_error")]
    if whole_errors:
        agg["whole_error"] = whole_errors[0]
    failed = [r for r in recs if not r.get("ok")]
    if failed:
        agg["failed_rounds"] = [r["error"] for r in failed]
    if any(r.get("repeat_reduced_to") for r in ok):
        agg["repeat_reduced_to"] = min(r["repeat_reduced_to"] or 10**9 for r in ok)
    return agg


def short_error(agg, args):
    kind, err = agg.get("error_kind"), agg.get("error", "")
    if err.startswith("n/a"):
        return err if "not implemented" in err else "n/a"
    if kind == "unsupported":
        return "unsupported"
    if kind == "oom":
        return f"OOM (>{args.mem_limit / 2**30:g} GiB)"
    if kind == "timeout":
        return f"timeout (>{args.timeout:g} s)"
    return "error" if err.startswith("error") or not err else "error: " + err[:40]


def cell(agg, entrant, args, same=False):
    if agg is None:
        return "not run"
    if not agg["ok"]:
        return short_error(agg, args).replace("|", "\\|")
    s = fmt_s(agg["median_s"]) + " · " + fmt_mb(agg["peak_rss_bytes"])
    if agg.get("baseline_rss_bytes") is not None:
        s += f" (+{(agg['peak_rss_bytes'] - agg['baseline_rss_bytes']) / 1e6:.0f})"
    if agg.get("repeat_reduced_to"):
        s += f" [{agg['n_times']} runs]"
    if agg.get("failed_rounds"):
        s += " [some rounds failed]"
    return s + (" †" if same else "")


def whole_cell(agg):
    """Our whole-process time, and how much of it was outside the computation `laplace bench`
    timed (reading, start-up, first-touch of memory, writing, exit)."""
    if agg and agg.get("whole_error") and not agg.get("whole_median_s"):
        return "failed (see results.json)"
    if not agg or not agg.get("ok") or not agg.get("whole_median_s"):
        return "—"
    outside = agg["whole_median_s"] - agg["median_s"]
    return f"{fmt_s(agg['whole_median_s'])} ({outside * 1e3:+.0f} ms)"


def ratio_rows(results):
    """(workload, quantity, bench ratio, whole-process ratio, memory ratio vs the peer's increment,
    outside-the-computation seconds) for every cell with a laplace-torch peer whose check did not
    fail (unchecked graph cells included)."""
    rows = []
    for w, qres in results.items():
        for q, r in qres.items():
            ours, fb = r["agg"].get("ours"), r.get("fastest")
            if not (ours and ours["ok"] and fb) or r.get("check", {}).get("status") == "MISMATCH":
                continue
            fa = r["agg"][fb]
            inc = fa["peak_rss_bytes"] - (fa.get("baseline_rss_bytes") or 0)
            whole = ours.get("whole_median_s")
            rows.append(dict(w=w, q=q, peer=fb, bench=ours["median_s"] / fa["median_s"],
                             whole=whole / fa["median_s"] if whole else None,
                             mem=ours["peak_rss_bytes"] / inc if inc > 0 else None,
                             outside=whole - ours["median_s"] if whole else None))
    return rows


def distribution(results, meta):
    """The summary over every (workload, quantity): the distribution of our time ratios against
    the fastest laplace-torch backend, and the worst cells by name."""
    rows = ratio_rows(results)
    if not rows:
        return []
    L = ["## Distribution over all workloads and quantities\n"]
    spawn = meta.get("spawn_baseline_s")

    def dist(key, label, unit="×", scale=1.0):
        v = sorted(r[key] * scale for r in rows if r[key] is not None)
        if not v:
            return None
        q = lambda f: v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]  # noqa: E731
        return (f"| {label} | {len(v)} | {v[0]:.2g}{unit} | {q(0.25):.2g}{unit} | {statistics.median(v):.2g}{unit} "
                f"| {q(0.75):.2g}{unit} | {v[-1]:.2g}{unit} | {sum(x <= 0.5 for x in v) if unit == '×' else '—'} |")

    L.append("| measure | cells | best | 25 % | median | 75 % | worst | cells ≤ 0.5× |")
    L.append("|---|---|---|---|---|---|---|---|")
    for line in (dist("bench", "time, ours in-process (`laplace bench`) ÷ fastest"),
                 dist("whole", "time, ours whole process ÷ fastest in-process"),
                 dist("mem", "peak memory, ours whole process ÷ fastest's increment"),
                 dist("outside", "ours: whole process − in-process time", " ms", 1e3)):
        if line:
            L.append(line)
    L.append("")
    if spawn:
        L.append(f"Starting and ending a `laplace` process that does nothing (`laplace --version`, "
                 f"median of 21) takes {spawn * 1e3:.1f} ms here; it is part of every whole-process time.\n")
    worst = sorted((r for r in rows if r["whole"] is not None), key=lambda r: -r["whole"])[:10]
    if worst:
        L.append("Worst cells, whole process ÷ fastest:\n")
        L.append("| workload | quantity | fastest laplace-torch | in-process | whole process | outside |")
        L.append("|---|---|---|---|---|---|")
        for r in worst:
            L.append(f"| {r['w']} | {QUANTITIES[r['q']]['label']} | {BACKEND_LABEL[r['peer']]} | "
                     f"{r['bench']:.2g}× | {r['whole']:.2g}× | {r['outside'] * 1e3:.0f} ms |")
        L.append("")
    return L


def render(results, meta, args):
    bases = [a["baseline_rss_bytes"] for qres in results.values() for r in qres.values()
             for e, a in r["agg"].items() if e != "ours" and a.get("ok") and a.get("baseline_rss_bytes")]
    base_txt = f"≈ {statistics.median(bases) / 1e6:.0f} MB" if bases else "several hundred MB"
    L = []
    L.append("# laplace-rs vs laplace-torch: curvature benchmark\n")
    L.append(f"Generated by `bench/harness.py` on {meta['date']}. Method: see `bench/README.md`.\n")
    m = meta["machine"]
    L.append(f"- **Machine**: {m['cpu']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical), "
             f"{m['mem_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}. Load average at start "
             f"{meta['loadavg_start']}, at end {meta['loadavg_end']} (other jobs, e.g. compiles, may have run "
             f"at the same time; the interleaving spreads that noise over all columns).")
    L.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v))
    L.append(f"- **Command**: `{meta['command']}`")
    L.append(f"- **Settings**: float32; {args.threads} threads everywhere (`torch.set_num_threads`, "
             f"OMP/MKL_NUM_THREADS, `laplace bench --threads`); whole data set as one batch; 1 warm-up + "
             f"{args.repeat} timed runs per process, {args.rounds} rounds interleaved "
             f"(fewer timed runs where one run exceeds the {args.budget:g} s budget: marked [n runs]); "
             f"limits {args.mem_limit / 2**30:g} GiB (RLIMIT_AS + RSS watchdog) and {args.timeout:g} s per "
             f"process; OMP_WAIT_POLICY {'unset (libgomp default)' if args.omp_wait_policy == 'default' else args.omp_wait_policy}; "
             f"laplace-torch processes {'forked from a server that has imported torch + laplace (no computation before the fork)' if not args.no_fork_server else 'started as fresh interpreters'}.")
    L.append("")
    L.append(f"Cells: median time over all timed runs of all rounds · peak RSS of the process. For "
             "laplace-torch, `(+N)` is the peak minus the process's RSS after imports, model, data and "
             f"backend set-up (its baseline: {base_txt}, nearly all of it the torch/laplace interpreter). "
             "Ours has no such baseline column: its whole peak is shown. Ratios are ours ÷ the fastest "
             "laplace-torch backend that succeeded: time, peak memory, and our peak ÷ that backend's "
             "`+N` increment (conservative for us: it charges our whole process against only their "
             "computation). The time ratio is of medians, with the ratio of the fastest single runs in "
             "brackets (less sensitive to other load on the machine). `MISMATCH` = our result failed the numerical check (details below the table). "
             "† = this backend's method is inherited from laplace-torch's torch.func base interface "
             "(`GGNInterface.diag` / `EFInterface.diag` / `CurvatureInterface.jacobians` / `.gradients` for "
             "curvlinops; `GGNInterface.full` with `last_layer_jacobians` for BackPACK and ASDL last-layer), so it "
             "runs the same code as the torch.func column: the two columns' difference is noise. Failures "
             "(unsupported, OOM, timeout, error) are explained below each table.\n")
    if not args.skip_torch:
        L.extend(distribution(results, meta))
    for w, qres in results.items():
        wm = meta["workloads"].get(w, {})
        L.append(f"## {w}\n")
        if wm:
            loads = wm.get("loadavg_range")
            L.append(f"{wm.get('desc', '')} P = {wm.get('n_params')}, N = {wm.get('n_data')}, "
                     f"{wm.get('likelihood')}."
                     + (f" 1-minute load average before each measurement: {loads[0]:.1f} to {loads[1]:.1f} "
                        f"(about 2 of it is the measurement processes themselves)." if loads else "") + "\n")
        if wm.get("skipped"):
            L.append("Skipped: " + "; ".join(wm["skipped"]) + ".\n")
        cols = ["ours"] + ([] if args.skip_torch else BACKENDS)
        hdr = ["quantity"] + [BACKEND_LABEL[c] for c in cols[:1]] + ["ours, whole process"] \
            + [BACKEND_LABEL[c] for c in cols[1:]]
        if not args.skip_torch:
            hdr += ["fastest laplace-torch", "ours ÷ fastest: time", "whole process ÷ fastest", "peak mem",
                    "ours peak ÷ their +N"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        notes = []
        for q, r in qres.items():
            row = [QUANTITIES[q]["label"]]
            chk = r.get("check", {})
            for c in cols:
                agg = r["agg"].get(c)
                txt = cell(agg, c, args, (q, c) in SAME_AS_TORCHFUNC)
                if c == "ours" and agg and agg["ok"] and chk.get("status") == "MISMATCH":
                    e = chk.get("error")
                    txt = "MISMATCH" + (f" (error {e:.2g})" if isinstance(e, float) else "")
                row.append(txt)
                if c == "ours":
                    row.append(whole_cell(agg))
            if not args.skip_torch:
                fb = r.get("fastest")
                ours = r["agg"].get("ours")
                if fb:
                    fa = r["agg"][fb]
                    row.append(BACKEND_LABEL[fb])
                    if ours and ours["ok"] and chk.get("status") != "MISMATCH":
                        row.append(f"{ours['median_s'] / fa['median_s']:.2g}× "
                                   f"(min: {ours['min_s'] / fa['min_s']:.2g}×)")
                        row.append(f"{ours['whole_median_s'] / fa['median_s']:.2g}×"
                                   if ours.get("whole_median_s") else "—")
                        row.append(f"{ours['peak_rss_bytes'] / fa['peak_rss_bytes']:.2g}×")
                        inc = fa["peak_rss_bytes"] - (fa.get("baseline_rss_bytes") or 0)
                        row.append(f"{ours['peak_rss_bytes'] / inc:.2g}×" if inc > 0 else "—")
                    else:
                        row += ["—"] * 4
                else:
                    row += ["none succeeded", "—", "—", "—", "—"]
            L.append("| " + " | ".join(row) + " |")
            notes.extend(r.get("notes", []))
        L.append("")
        if notes:
            L.append("Checks and notes:\n")
            L.extend(f"- {n}" for n in notes)
            L.append("")
    L.append("## Raw numbers\n")
    L.append("Every measurement (each round, each process: all timed runs, peak and baseline RSS, "
             "errors) is in `bench/results.json`.\n")
    # The hand-written analysis (what limits each of our numbers) follows the tables.
    analysis = getattr(args, "analysis", None) or os.path.join(HERE, "ANALYSIS.md")
    if os.path.exists(analysis):
        L.append(open(analysis).read())
    return "\n".join(L)


# --------------------------------------------------------------------------- main

def workload_meta(wdir, w):
    spec = json.load(open(os.path.join(wdir, w, "model.json")))
    from safetensors.numpy import load_file as lf
    weights = lf(os.path.join(wdir, w, "weights.safetensors"))
    if "layers" in spec:
        layers = ", ".join(l["type"] + (f"({l.get('in_features', l.get('in_channels'))}→"
                                         f"{l.get('out_features', l.get('out_channels'))})"
                                         if l["type"] in ("Linear", "Conv2d") else "")
                           for l in spec["layers"])
        desc = f"input {spec['input_shape']}: {layers}."
        p = sum(v.size for v in weights.values())
        last = [l for l in spec["layers"] if l["type"] == "Linear"][-1]
        p_ll = (last["in_features"] + 1) * last["out_features"]
    else:  # a graph (docs/model-format.md): parameters in parameters() order, the head last
        ops = collections.Counter(nd["op"] for nd in spec["nodes"])
        shape = spec["inputs"][0]["shape"]
        desc = (f"graph model, input {shape}: {len(spec['nodes'])} nodes ("
                + ", ".join(f"{k} ×{v}" for k, v in ops.most_common()) + ").")
        p = sum(weights[k].size for k in spec["parameters"])
        p_ll = sum(weights[k].size for k in spec["parameters"][-2:])
    n = int(np.load(os.path.join(wdir, w, "data.npz"))["x"].shape[0])
    lik = open(os.path.join(wdir, w, "likelihood")).read().strip()
    return dict(desc=desc, n_params=int(p), n_data=n, likelihood=lik, n_last_layer=int(p_ll))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated workload names, or `sweep`: every workload that "
                         "`make_workloads.py --sweep` wrote into --workload-dir")
    ap.add_argument("--quantities", default=",".join(ORDER),
                    help="subset of: " + ", ".join(ORDER) + " (each workload runs those it has)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per (workload, quantity)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0, help="GiB per process")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed runs per process; fewer runs if a run is slower")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", type=int, default=None,
                    help="whole-process runs of our command per round (`laplace curvature ... --out`, "
                         "exec to exit; default: --repeat; 0: none)")
    ap.add_argument("--omp-wait-policy", choices=["default", "PASSIVE", "ACTIVE"], default="default",
                    help="OMP_WAIT_POLICY for the laplace-torch processes (default: leave unset, as users run it)")
    ap.add_argument("--skip-torch", action="store_true",
                    help="time ours only (one untimed reference run per quantity still checks it, "
                         "unless --no-check)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-fork-server", action="store_true",
                    help="start a fresh interpreter per laplace-torch measurement (slower: ~8 s of imports each)")
    ap.add_argument("--laplace", default=os.path.join(ROOT, "target", "release", "laplace"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--workload-dir", default=os.path.join(HERE, "workloads"))
    ap.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (outputs, logs)")
    ap.add_argument("--analysis", default=os.path.join(HERE, "ANALYSIS.md"),
                    help="hand-written analysis appended to --md (the sweep's: bench/SWEEP_ANALYSIS.md)")
    ap.add_argument("--render", metavar="RESULTS.json",
                    help="only rewrite --md from the results of an earlier run")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as fh:
            d = json.load(fh)
        st = d["meta"]["settings"]
        ra = argparse.Namespace(repeat=st["repeat"], rounds=st["rounds"], timeout=st["timeout_s"],
                                mem_limit=st["mem_limit_bytes"], threads=st["threads"], budget=st["budget_s"],
                                no_fork_server=not st["fork_server"], skip_torch=st.get("skip_torch", False),
                                omp_wait_policy=st.get("omp_wait_policy", "default"), analysis=args.analysis)
        md = render(d["results"], d["meta"], ra)
        with open(args.md, "w") as fh:
            fh.write(md + "\n")
        print(md)
        return
    if args.repeat < 1 or args.rounds < 1:
        ap.error("--repeat and --rounds must be at least 1")
    if args.whole is None:
        args.whole = args.repeat
    args.mem_limit = int(args.mem_limit_gb * 2**30)
    if args.workloads == "sweep":  # every workload of `make_workloads.py --sweep`, in grid order
        sys.path.insert(0, HERE)
        import sweep_models
        workloads = [w for w in sweep_models.CASES
                     if os.path.exists(os.path.join(args.workload_dir, w, "sweep_case"))]
        if not workloads:
            ap.error(f"no sweep workloads in {args.workload_dir}: run make_workloads.py --sweep")
    else:
        workloads = [w for w in args.workloads.split(",") if w]
    wanted = [q for q in args.quantities.split(",") if q]
    for q in wanted:
        if q not in QUANTITIES:
            ap.error(f"unknown quantity {q}")
    backends = [] if args.skip_torch else [b for b in args.backends.split(",") if b]
    if not os.path.exists(args.laplace):
        ap.error(f"{args.laplace} not found: run `cargo build --release`")

    tmp = tempfile.mkdtemp(prefix="laplace-bench-")
    # One build for the whole run, even if target/release is rebuilt meanwhile.
    src_laplace = args.laplace
    args.laplace = os.path.join(tmp, "laplace")
    shutil.copy2(src_laplace, args.laplace)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    args.torch_env = env
    need_torch = bool(backends) or not args.no_check
    server = TorchServer(args.python, env) if need_torch and not args.no_fork_server else None
    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), machine=machine(),
                versions=versions(args),
                command=shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                                    else sys.executable, os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                loadavg_start=" ".join(open("/proc/loadavg").read().split()[:3]),
                settings=dict(repeat=args.repeat, rounds=args.rounds, timeout_s=args.timeout,
                              mem_limit_bytes=args.mem_limit, threads=args.threads, budget_s=args.budget,
                              fork_server=not args.no_fork_server, skip_torch=args.skip_torch,
                              omp_wait_policy=args.omp_wait_policy, tol=TOL,
                              mc_bound=MC_BOUND),
                workloads={})
    meta["versions"]["laplace binary built"] = datetime.datetime.fromtimestamp(
        os.path.getmtime(src_laplace)).astimezone().isoformat(timespec="seconds")
    meta["spawn_baseline_s"] = spawn_baseline(args)
    records, results = [], {}
    t_start = time.monotonic()
    try:
        for w in workloads:
            meta["workloads"][w] = workload_meta(args.workload_dir, w)
            if meta["workloads"][w]["desc"].startswith("graph"):
                GRAPH_WORKLOADS.add(w)
            lik = meta["workloads"][w]["likelihood"]
            runs, skipped = quantities_of(w, meta["workloads"][w])
            meta["workloads"][w]["skipped"] = skipped
            qs = [q for q in ORDER if q in runs and q in wanted]
            results[w] = {}
            outs = {}  # (q, entrant) -> path of round-0 result
            for q in qs:
                entrants = ["ours"] + backends
                recs = {e: [] for e in entrants}
                dead = set()
                for e in entrants:
                    if (q, e) in STATIC_NA:
                        recs[e].append(dict(workload=w, quantity=q, entrant=e, round=0, ok=False,
                                            error_kind="unsupported", error=STATIC_NA[(q, e)]))
                        dead.add(e)
                for rnd in range(args.rounds):
                    order = entrants[rnd % len(entrants):] + entrants[:rnd % len(entrants)]
                    for e in order:
                        if e in dead:
                            continue
                        out = os.path.join(tmp, f"{w}.{q}.{e}.safetensors") if rnd == 0 else None
                        load_before = float(open("/proc/loadavg").read().split()[0])
                        if e == "ours":
                            rec = measure_ours(args, w, q, rnd, out, tmp)
                        else:
                            rec = measure_torch(args, server, w, q, e, rnd, out, tmp)
                        rec["loadavg_before"] = load_before
                        records.append(rec)
                        recs[e].append(rec)
                        status = (f"{fmt_s(rec['median_s'])}, peak {fmt_mb(rec['peak_rss_bytes'])}" if rec["ok"]
                                  else rec["error"])
                        print(f"[{time.monotonic() - t_start:7.1f} s] {w} {q} r{rnd} {e}: {status}", flush=True)
                        if rec["ok"] and out:
                            outs[(q, e)] = out
                        elif not rec["ok"] and rnd == 0:
                            dead.add(e)  # failures are not retried in later rounds
                agg = {e: aggregate(recs[e]) for e in entrants}
                for e in BACKENDS:
                    if e not in agg and not args.skip_torch:
                        agg[e] = dict(ok=False, error="not run (--backends)")
                ok_torch = [e for e in backends if agg[e]["ok"] and agg[e]["median_s"] is not None]
                fastest = min(ok_torch, key=lambda e: agg[e]["median_s"]) if ok_torch else None
                res = dict(agg=agg, fastest=fastest, notes=[])
                results[w][q] = res
                # failures: full reason in the notes
                for e in entrants:
                    if not agg[e]["ok"] and e != "ours":
                        full = next((r for r in recs[e] if not r.get("ok")), {})
                        res["notes"].append(f"{QUANTITIES[q]['label']}: {CLASSES[KIND[q]][e] or BACKEND_LABEL[e]} — "
                                            f"{agg[e]['error']}")
                if not agg["ours"]["ok"]:
                    res["notes"].append(f"{QUANTITIES[q]['label']}: ours — {agg['ours']['error']}")
                if not args.no_check and agg["ours"]["ok"]:
                    res["check"] = check(args, server, w, q, lik, outs, tmp, res)
                    print(f"          check {w} {q}: {res['check']['status']} {res['check'].get('summary', '')}",
                          flush=True)
                    # A backend whose result disagrees with ours, where ours matched the reference,
                    # computed something else (BackPACK's conv Kronecker factors, say): it is not a
                    # peer for the time ratio.
                    if res["check"]["status"] == "ok":
                        cls_of = {CLASSES[KIND[q]][e]: e for e in backends}
                        wrong = {cls_of[c]: v for c, v in res["check"].get("others", {}).items()
                                 if c in cls_of and not (isinstance(v, float) and v <= TOL)}
                        if wrong:
                            res["disagree"] = {e: (v if isinstance(v, float) else str(v)) for e, v in wrong.items()}
                            ok_peer = [e for e in ok_torch if e not in wrong]
                            res["fastest"] = min(ok_peer, key=lambda e: agg[e]["median_s"]) if ok_peer else None
                            res["notes"].append(f"{QUANTITIES[q]['label']}: not a peer for the time ratio (its "
                                                f"result differs from ours and the reference by more than {TOL:g}): "
                                                + ", ".join(CLASSES[KIND[q]][e] for e in wrong))
                elif agg["ours"]["ok"]:
                    res["check"] = dict(status="unchecked")
                loads = [r["loadavg_before"] for r in records if r["workload"] == w and "loadavg_before" in r]
                if loads:
                    meta["workloads"][w]["loadavg_range"] = [min(loads), max(loads)]
                # Free big outputs no longer needed (exact ones serve the MC checks).
                if q not in ("ggn_diag", "ggn_kron"):
                    for (qq, e), p in list(outs.items()):
                        if qq == q:
                            os.remove(p)
                            del outs[(qq, e)]
    finally:
        if server is not None:
            server.close()
        meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        meta["elapsed_s"] = time.monotonic() - t_start
        md = render(results, meta, args)
        with open(args.md, "w") as fh:
            fh.write(md + "\n")
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, results=results, measurements=records), fh, indent=1, default=str)
        print(md)
        if args.keep:
            print(f"scratch kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# Graph workloads (not nn.Sequential): BackPACK and ASDL see only the modules, not the functional
# ops and residual additions between them, so their numbers are not a reference there; the
# autodiff-based backends (torch.func, curvlinops) are.
GRAPH_WORKLOADS = set()


def reference_order(w, prefs):
    if w not in GRAPH_WORKLOADS:
        return prefs
    return [b for b in ("torchfunc", "curvlinops") if b in prefs]


def reference_out(args, server, w, q, outs, tmp, prefs):
    """A reference result for q: the first preferred backend that has a round-0 output, else an
    untimed run of the preferred backends until one succeeds. Returns (backend, path) or (None, reason)."""
    for b in prefs:
        if (q, b) in outs:
            return b, outs[(q, b)]
    reasons = []
    for b in prefs:
        out = os.path.join(tmp, f"{w}.{q}.{b}.safetensors")
        rec = measure_torch(args, server, w, q, b, "ref", out, tmp, repeat=0)
        if rec["ok"]:
            outs[(q, b)] = out
            return b, out
        reasons.append(f"{b}: {rec['error']}")
    return None, "; ".join(reasons)


def check(args, server, w, q, lik, outs, tmp, res):
    spec = QUANTITIES[q]
    label = spec["label"]
    ours = load_file(outs[(q, "ours")]) if (q, "ours") in outs else None
    if ours is None:
        return dict(status="unchecked", summary="no output of ours")
    try:
        if "exact" in spec:
            eq = spec["exact"]
            rb, rpath = reference_out(args, server, w, eq, outs, tmp, reference_order(w, QUANTITIES[eq]["ref"]))
            if rb is None:
                res["notes"].append(f"{label}: not checked (no exact reference: {rpath})")
                return dict(status="unchecked", summary=rpath)
            exact = load_file(rpath)
            e_ours = compare(q, ours, exact, lik)
            key = "kron" if "kron" in q else "H"
            err = e_ours[key]
            theirs = {}
            for b in BACKENDS:
                if (q, b) in outs:
                    theirs[CLASSES["ggn"][b]] = compare(q, load_file(outs[(q, b)]), exact, lik)[key]
            loss_err = e_ours.get("loss", 0.0)
            ok = err <= MC_BOUND and loss_err <= TOL
            ref_cls = CLASSES[KIND[eq]][rb]
            summ = (f"MC vs exact ({ref_cls}, {QUANTITIES[eq]['label']}): ours {err:.3g}"
                    + "".join(f", {k} {v:.3g}" for k, v in theirs.items())
                    + f"; loss {loss_err:.1e}")
            res["notes"].append(f"{label}: MC estimates cannot match sample by sample, so ours and each "
                                f"backend's are compared with the exact GGN (relative Frobenius error"
                                f"{', of the Kronecker products' if 'kron' in q else ''}; bound {MC_BOUND}): "
                                + summ + (" — ok" if ok else " — **MISMATCH**"))
            return dict(status="ok" if ok else "MISMATCH", error=err, loss_error=loss_err,
                        reference=ref_cls, backends=theirs, summary=summ)
        rb, rpath = reference_out(args, server, w, q, outs, tmp, reference_order(w, spec["ref"]))
        if rb is None:
            res["notes"].append(f"{label}: ours not checked (no reference backend succeeded: {rpath})")
            return dict(status="unchecked", summary=rpath)
        ref = load_file(rpath)
        errs = compare(q, ours, ref, lik)
        err = main_error(q, errs)
        ok = err <= TOL
        ref_cls = CLASSES[KIND[q]][rb]
        others = {}
        for b in BACKENDS:
            if b != rb and (q, b) in outs:
                try:
                    others[CLASSES[KIND[q]][b]] = main_error(q, compare(q, ours, load_file(outs[(q, b)]), lik))
                except ValueError as e:
                    others[CLASSES[KIND[q]][b]] = f"incomparable ({e})"
        fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else v  # noqa: E731
        scale_note = (" (laplace-torch's regression EF/gradients are 2× ours; compared as such)"
                      if spec.get("reg2") and lik == "regression" else "")
        summ = (f"ours vs {ref_cls}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                + f" (tol {TOL:g}{', max over Kronecker blocks' if 'kron' in q else ''})")
        note = f"{label}: {summ}{scale_note} — {'ok' if ok else '**MISMATCH**'}"
        if others:
            note += "; ours vs the other backends: " + ", ".join(f"{k} {fmt(v)}" for k, v in others.items())
        res["notes"].append(note)
        return dict(status="ok" if ok else "MISMATCH", error=err, errors=errs, reference=ref_cls,
                    others=others, summary=summ)
    except (ValueError, KeyError) as e:
        res["notes"].append(f"{label}: **MISMATCH**: ours cannot be compared ({type(e).__name__}: {e})")
        return dict(status="MISMATCH", summary=f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
