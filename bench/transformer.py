#!/usr/bin/env python
"""Transformer benchmark: laplace-rs (`laplace` CLI) against laplace-torch on a BERT classifier.

    venv/bin/python bench/transformer.py                 # ~20 min on 2 idle cores; writes
                                                         # bench/TRANSFORMER.md, bench/transformer_results.json
    venv/bin/python bench/transformer.py --quiet-wait 300   # on a shared machine: wait for idle cores
    venv/bin/python bench/transformer.py --tasks llkron --merge bench/transformer_results.json   # redo one task
    venv/bin/python bench/transformer.py --rounds 3 --tasks diag --backends torchfunc,asdl
    venv/bin/python bench/transformer.py --render bench/transformer_results.json   # only rewrite the .md

Model: transformers.BertForSequenceClassification(BertConfig(hidden_size=256,
num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=30522,
max_position_embeddings=128, num_labels=2, attn_implementation='eager')), random init
(torch.manual_seed(0)), eval mode, float32, wrapped as forward(batch) ->
self.m(input_ids=..., attention_mask=...).logits. Data: N = 256 sequences of T = 64
random token ids (numpy seed 0), attention_mask with random lengths 16..64 (padded at
the end with id 0), labels in {0, 1}. Everything is regenerated deterministically into
bench/workloads/bert_transformer/ (export with tools/laplace_export.py).

Tasks (each entrant is one process; rounds interleaved; limits per process):

1. ``diag``: exact GGN diagonal over all weights. Ours: ``laplace curvature ... --curvature
   ggn --structure diag --batch-size 32``. laplace-torch: ``GGNInterface`` (torch.func),
   ``CurvlinopsGGN``, ``AsdlGGN``, ``BackPackGGN``, each ``.diag(x, y, N=N)`` on dict batches
   (``dict_key_x='input_ids'``), summed over batches of 32, halved after an out-of-memory
   failure until it fits (the batch size used is reported).
2. ``llkron``: last-layer KFAC Laplace, prior precision tuned by the evidence. Ours:
   ``laplace fit ... --subset last-layer --structure kron --optimize-prior marglik
   --batch-size 32``. laplace-torch: ``Laplace(model, 'classification',
   subset_of_weights='last_layer', hessian_structure='kron', backend=B,
   dict_key_x='input_ids', dict_key_y='labels')``, ``.fit(loader)`` (DataLoader of dicts,
   batch 32), ``.optimize_prior_precision(method='marglik')`` (its defaults).

Times are wall times of the whole process (`/usr/bin/time -v`: start-up, imports, model
and data loading included); laplace-torch children also report the time of the
computation alone. Peak memory is the process's maximum RSS (`/usr/bin/time -v`).
Internal: ``--prepare DIR`` writes the workload, ``--child REQ.json`` runs one
laplace-torch measurement.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# --------------------------------------------------------------------------- configuration

CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              vocab_size=30522, max_position_embeddings=128, num_labels=2,
              attn_implementation="eager")
N_DATA, SEQ_LEN, MIN_LEN = 256, 64, 16
MODEL_SEED, DATA_SEED = 0, 0

BACKENDS = ["torchfunc", "curvlinops", "asdl", "backpack"]
CLASS = {"torchfunc": "GGNInterface", "curvlinops": "CurvlinopsGGN", "asdl": "AsdlGGN",
         "backpack": "BackPackGGN"}
LABEL = {"ours": "ours (laplace-rs CLI)", "torchfunc": "laplace-torch GGNInterface (torch.func)",
         "curvlinops": "laplace-torch CurvlinopsGGN", "asdl": "laplace-torch AsdlGGN",
         "backpack": "laplace-torch BackPackGGN"}
TASKS = {"diag": "GGN diagonal, all weights", "llkron": "last-layer KFAC Laplace + marglik prior"}
# CurvlinopsGGN inherits diag() and jacobians() from laplace-torch's torch.func base
# interface (the child reports the implementing functions): its batch-size search starts
# where GGNInterface's ended instead of repeating the out-of-memory attempts.
SAME_DIAG_CODE = {"curvlinops": "torchfunc"}
TOL = 1e-4            # float32: relative Frobenius error of the diagonal
LML_TOL = 1e-5        # relative tolerance on log marginal likelihoods (float32 sums)


# --------------------------------------------------------------------------- shared model code

def build_model(weights=None):
    """The wrapped classifier; random init from MODEL_SEED, or the exported weights."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import BertConfig, BertForSequenceClassification

    class Classifier(torch.nn.Module):
        """forward(batch dict) -> logits, as a HuggingFace classifier is used on dict batches."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, batch):
            return self.m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    torch.manual_seed(MODEL_SEED)
    model = Classifier(BertForSequenceClassification(BertConfig(**CONFIG))).float().eval()
    if weights is not None:
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        pnames = {n for n, _ in model.named_parameters()}
        assert not (set(missing) & pnames) and not unexpected, (missing, unexpected)
    return model


def make_data(n_data=N_DATA):
    import numpy as np
    rng = np.random.default_rng(DATA_SEED)
    ids = rng.integers(1, CONFIG["vocab_size"], (n_data, SEQ_LEN))
    mask = np.ones_like(ids)
    for row, n in enumerate(rng.integers(MIN_LEN, SEQ_LEN + 1, n_data)):
        ids[row, n:], mask[row, n:] = 0, 0          # padded at the end with id 0
    y = rng.integers(0, 2, n_data)
    return ids.astype(np.int64), mask.astype(np.int64), y.astype(np.int64)


def prepare(out_dir, n_data=N_DATA):
    """Write model.json, weights.safetensors, data.npz and workload.json into out_dir."""
    import numpy as np
    import torch
    torch.set_num_threads(2)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from laplace_export import export
    model = build_model()
    ids, mask, y = make_data(n_data)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    export(model, {"input_ids": torch.from_numpy(ids[:2]), "attention_mask": torch.from_numpy(mask[:2])},
           out_dir)
    t_export = time.perf_counter() - t0
    np.savez(os.path.join(out_dir, "data.npz"), input_ids=ids, attention_mask=mask, y=y)
    # the exported weights reproduce the module
    re_model = build_model(os.path.join(out_dir, "weights.safetensors"))
    x = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        f0, f1 = model(x), re_model(x)
    layout = [[n, int(p.numel())] for n, p in model.named_parameters()]
    meta = dict(config=CONFIG, n_data=n_data, seq_len=SEQ_LEN, lengths=[MIN_LEN, SEQ_LEN],
                model_seed=MODEL_SEED, data_seed=DATA_SEED, n_params=sum(k for _, k in layout),
                n_tokens=int(mask.sum()), label_counts=[int((y == c).sum()) for c in (0, 1)],
                last_layer=[n for n, _ in model.named_parameters() if n.startswith("m.classifier.")],
                n_last_layer=sum(k for n, k in layout if n.startswith("m.classifier.")),
                logits_abs_max=float(f0.abs().max()), reload_max_abs_diff=float((f0 - f1).abs().max()),
                export_s=t_export, parameters=layout)
    with open(os.path.join(out_dir, "workload.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    print(json.dumps({k: v for k, v in meta.items() if k != "parameters"}))


# --------------------------------------------------------------------------- laplace-torch child

def child(req_path):
    """One laplace-torch measurement (fresh interpreter). Writes a JSON summary."""
    t_proc = time.perf_counter()
    with open(req_path) as fh:
        req = json.load(fh)
    summary = dict(task=req["task"], backend=req["backend"], ok=False, batch_size=req["batch_size"])

    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def dump():
        with open(req["summary"] + ".tmp", "w") as fh:
            json.dump(summary, fh)
        os.replace(req["summary"] + ".tmp", req["summary"])

    import traceback
    import warnings
    warnings.filterwarnings("ignore")
    try:
        import numpy as np
        import torch
        torch.set_num_threads(int(req["threads"]))
        import laplace.curvature as lc
        from laplace import Laplace
        summary["import_s"] = time.perf_counter() - t_proc
        t0 = time.perf_counter()
        wdir = req["workload_dir"]
        model = build_model(os.path.join(wdir, "weights.safetensors"))
        d = np.load(os.path.join(wdir, "data.npz"))
        ids = torch.from_numpy(d["input_ids"])
        mask = torch.from_numpy(d["attention_mask"])
        y = torch.from_numpy(d["y"])
        n, bs = ids.shape[0], int(req["batch_size"])
        cls = getattr(lc, CLASS[req["backend"]])
        summary["class"] = cls.__name__
        if req["task"] == "diag":
            model.output_size = 2  # as BaseLaplace.fit sets it
            be = cls(model, "classification", dict_key_x="input_ids", dict_key_y="labels")
            summary["impl"] = {m: f"{getattr(type(be), m).__module__}.{getattr(type(be), m).__qualname__}"
                               for m in ("diag", "jacobians")}
            summary["setup_s"] = time.perf_counter() - t0
            summary["baseline_rss_bytes"] = maxrss()
            t0 = time.perf_counter()
            H, loss, batch_s = None, 0.0, []
            for o in range(0, n, bs):
                tb = time.perf_counter()
                xb = {"input_ids": ids[o:o + bs], "attention_mask": mask[o:o + bs]}
                model.zero_grad()  # as BaseLaplace.fit before each batch
                lb, hb = be.diag(xb, y[o:o + bs], N=n)
                H = hb.detach().clone() if H is None else H.add_(hb.detach())
                loss += float(lb)
                batch_s.append(time.perf_counter() - tb)
                del hb
            summary["compute_s"] = time.perf_counter() - t0
            summary["batch_s"] = batch_s
            summary["loss"] = loss
            summary["n_params"] = int(H.numel())
            if req.get("out"):
                np.save(req["out"], H.to(torch.float32).numpy())
        else:
            class DictData(torch.utils.data.Dataset):
                def __len__(self):
                    return n

                def __getitem__(self, i):
                    return {"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]}

            loader = torch.utils.data.DataLoader(DictData(), batch_size=bs, shuffle=False)
            la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                         backend=cls, dict_key_x="input_ids", dict_key_y="labels")
            summary["laplace_class"] = type(la).__name__
            summary["setup_s"] = time.perf_counter() - t0
            summary["baseline_rss_bytes"] = maxrss()
            t0 = time.perf_counter()
            la.fit(loader)
            t1 = time.perf_counter()
            la.optimize_prior_precision(method="marglik")
            lml = float(la.log_marginal_likelihood())
            t2 = time.perf_counter()
            summary.update(compute_s=t2 - t0, fit_s=t1 - t0, optimize_s=t2 - t1, log_marglik=lml,
                           prior_precision=[float(v) for v in torch.as_tensor(la.prior_precision).reshape(-1)],
                           n_params=int(la.n_params), last_layer_name=la.model._last_layer_name,
                           loss=float(la.loss))
            # untimed: laplace-torch's evidence at our optimum (same function?)
            if req.get("ours_prior_precision") is not None:
                pp = torch.tensor([float(req["ours_prior_precision"])])
                summary["log_marglik_at_ours_prior"] = float(la.log_marginal_likelihood(prior_precision=pp))
        summary["peak_rss_bytes"] = maxrss()
        summary["ok"] = True
    except NotImplementedError as e:
        summary.update(error_kind="unsupported", error=f"NotImplementedError{': ' + str(e) if str(e) else ''}",
                       traceback=traceback.format_exc()[-3000:])
    except MemoryError as e:
        summary.update(error_kind="oom", error=f"MemoryError: {e}", traceback=traceback.format_exc()[-3000:])
    except Exception as e:  # noqa: BLE001 - any failure is a result
        msg = f"{type(e).__name__}: {e}"
        oom = "can't allocate memory" in msg or "out of memory" in msg.lower()
        summary.update(error_kind="oom" if oom else "error", error=msg[:2000],
                       traceback=traceback.format_exc()[-3000:])
    dump()
    return 0 if summary["ok"] else 3


# --------------------------------------------------------------------------- processes

def tree_rss(pid):
    """RSS (bytes) of pid plus its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            pass
    return total


def kill_group(pid):
    for f in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            f()
        except OSError:
            pass


def parse_time_v(path):
    """Fields of /usr/bin/time -v output: maxrss_kb, wall_s, exit / signal."""
    out = {}
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return out
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["maxrss_kb"] = int(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall_s"] = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        out["exit"] = int(m.group(1))
    m = re.search(r"Command terminated by signal (\d+)", text)
    if m:
        out["signal"] = int(m.group(1))
    return out


def cpu_busy_s():
    """CPU seconds all processes have been busy since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def foreign_load(window=3.0):
    """Cores other processes keep busy, measured over `window` seconds while we sleep."""
    b0, t0 = cpu_busy_s(), time.monotonic()
    time.sleep(window)
    return (cpu_busy_s() - b0) / (time.monotonic() - t0)


def loaded(rec, args):
    """Did other processes use a noticeable share of the cores during this measurement?"""
    return rec.get("foreign_load") is not None and rec["foreign_load"] > max(0.5, args.quiet_below)


def wait_quiet(args, log):
    """Wait (at most args.quiet_wait s) until other processes use < args.quiet_below cores."""
    if args.quiet_wait <= 0:
        return None
    t0, load = time.monotonic(), foreign_load()
    while load >= args.quiet_below and time.monotonic() - t0 < args.quiet_wait:
        load = foreign_load(10.0)
    waited = time.monotonic() - t0
    if waited > 5:
        log(f"waited {waited:.0f} s for a quiet machine (other processes: {load:.2f} cores)")
    return dict(waited_s=waited, foreign_load_before=load)


def run_process(argv, env, tag, tmp, timeout, mem_limit):
    """Run argv under /usr/bin/time -v with RLIMIT_AS = mem_limit, an RSS watchdog and a
    timeout. Returns a dict: wall_s, maxrss_bytes, status, killed_for, stdout, stderr."""
    tfile, lo, le = (os.path.join(tmp, tag + s) for s in (".time", ".out", ".err"))

    def pre():
        os.setpgid(0, 0)
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    with open(lo, "w") as fo, open(le, "w") as fe:
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", tfile] + argv, stdout=fo, stderr=fe, env=env,
                             cwd=ROOT, preexec_fn=pre)
    t0, busy0 = time.monotonic(), cpu_busy_s()
    killed_for, peak_seen = None, 0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = status
            break
        time.sleep(0.1)
        rss = tree_rss(p.pid)
        peak_seen = max(peak_seen, rss)
        if killed_for is None:
            if time.monotonic() - t0 > timeout:
                killed_for = "timeout"
                kill_group(p.pid)
            elif mem_limit and rss > mem_limit:
                killed_for = "oom-watchdog"
                kill_group(p.pid)
    wall = time.monotonic() - t0
    # cores busy with other processes meanwhile (ours: the measured process tree; the
    # harness's own polling is negligible)
    own = ru.ru_utime + ru.ru_stime
    other = max(0.0, (cpu_busy_s() - busy0 - own) / wall)
    tv = parse_time_v(tfile)
    return dict(wall_s=tv.get("wall_s", wall), wall_monotonic_s=wall, cpu_s=own, foreign_load=other,
                maxrss_bytes=(tv.get("maxrss_kb", ru.ru_maxrss)) * 1024, wait4_maxrss_bytes=ru.ru_maxrss * 1024,
                polled_peak_rss_bytes=peak_seen, exit=tv.get("exit"), signal=tv.get("signal"),
                killed_for=killed_for, stdout=open(lo, errors="replace").read()[-20000:],
                stderr=open(le, errors="replace").read()[-4000:])


def failure(r, args):
    """(error_kind, message) of a failed process."""
    if r["killed_for"] == "timeout":
        return "timeout", f"timeout (> {args.timeout:g} s)"
    if r["killed_for"] == "oom-watchdog":
        return "oom", f"OOM (RSS > {args.mem_limit / 2**30:g} GiB, killed)"
    if r.get("signal"):
        return ("oom" if r["signal"] == 9 else "error"), f"killed by signal {r['signal']}"
    err = r["stderr"].strip()
    if "memory allocation" in err or "out of memory" in err.lower():
        return "oom", "OOM: " + err.splitlines()[-1][:150]
    return "error", (err.splitlines()[-1][:200] if err else f"exit status {r.get('exit')}")


# --------------------------------------------------------------------------- measurements

def thread_env(args):
    t = str(args.threads)
    return dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, RAYON_NUM_THREADS=t)


def measure_ours(args, task, rnd, tmp, extra=None, tag=None):
    w = args.workload_dir
    base = [args.laplace, None, "--model", os.path.join(w, "model.json"),
            "--weights", os.path.join(w, "weights.safetensors"), "--data", os.path.join(w, "data.npz"),
            "--likelihood", "classification"]
    out = os.path.join(tmp, f"ours.{task}.r{rnd}.safetensors" if tag is None else f"ours.{tag}.safetensors")
    if task == "diag":
        base[1] = "curvature"
        argv = base + ["--curvature", "ggn", "--structure", "diag", "--batch-size", str(args.batch_size),
                       "--out", out]
    else:
        base[1] = "fit"
        argv = base + ["--subset", "last-layer", "--structure", "kron"] + (
            extra if extra is not None else ["--optimize-prior", "marglik"]) + [
            "--batch-size", str(args.batch_size), "--out", out, "--json"]
    r = run_process(argv, thread_env(args), tag or f"ours.{task}.r{rnd}", tmp, args.timeout, args.mem_limit)
    rec = dict(task=task, entrant="ours", round=rnd, batch_size=args.batch_size, wall_s=r["wall_s"],
               cpu_s=r["cpu_s"], foreign_load=r["foreign_load"],
               peak_rss_bytes=r["maxrss_bytes"], wait4_maxrss_bytes=r["wait4_maxrss_bytes"],
               command=shlex.join([os.path.relpath(a, ROOT) if a and a.startswith(ROOT) else a for a in argv]))
    if r["exit"] == 0 and r["killed_for"] is None:
        rec.update(ok=True, out=out)
        if task == "llkron":
            js = [ln for ln in r["stdout"].splitlines() if ln.startswith("{")]
            d = json.loads(js[-1])
            rec.update(log_marglik=d["log_marginal_likelihood"], prior_precision=d["prior_precision"],
                       n_params=d["n_params"])
        return rec
    kind, msg = failure(r, args)
    rec.update(ok=False, error_kind=kind, error=msg, stderr=r["stderr"][-2000:])
    return rec


def measure_torch(args, task, backend, rnd, tmp, bs, out=None, ours_pp=None):
    tag = f"{backend}.{task}.b{bs}.r{rnd}"
    req = dict(task=task, backend=backend, batch_size=bs, threads=args.threads, workload_dir=args.workload_dir,
               summary=os.path.join(tmp, tag + ".json"), out=out,
               ours_prior_precision=ours_pp)
    rq = os.path.join(tmp, tag + ".req.json")
    with open(rq, "w") as fh:
        json.dump(req, fh)
    argv = [args.python, os.path.abspath(__file__), "--child", rq]
    r = run_process(argv, thread_env(args), tag, tmp, args.timeout, args.mem_limit)
    rec = dict(task=task, entrant=backend, round=rnd, batch_size=bs, wall_s=r["wall_s"],
               cpu_s=r["cpu_s"], foreign_load=r["foreign_load"],
               peak_rss_bytes=r["maxrss_bytes"], wait4_maxrss_bytes=r["wait4_maxrss_bytes"], cls=CLASS[backend])
    summ = None
    if r["killed_for"] is None and os.path.exists(req["summary"]):
        with open(req["summary"]) as fh:
            summ = json.load(fh)
    if summ is not None and summ.get("ok"):
        rec.update(ok=True, out=out, **{k: v for k, v in summ.items()
                                        if k not in ("ok", "task", "backend", "batch_size", "peak_rss_bytes")})
        rec["child_peak_rss_bytes"] = summ["peak_rss_bytes"]
        return rec
    if summ is not None:
        kind, err = summ.get("error_kind", "error"), summ.get("error", "")
        if kind == "oom":
            m = re.search(r"allocate (\d+) bytes", err)
            err = (f"OOM: could not allocate {int(m.group(1)) / 2**20:.0f} MiB more under the "
                   f"{args.mem_limit / 2**30:g} GiB limit" if m else "OOM: " + err[:150])
        rec.update(ok=False, error_kind=kind, error=err[:400], traceback=summ.get("traceback"),
                   impl=summ.get("impl"))
    else:
        kind, msg = failure(r, args)
        rec.update(ok=False, error_kind=kind, error=msg, stderr=r["stderr"][-2000:])
    return rec


# --------------------------------------------------------------------------- checks

def rel_fro(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def per_tensor(a, b, layout, k=4):
    """Per tensor (rel. error of a vs b, name, size, norm of b): the k largest among the
    tensors whose reference is not zero up to rounding (BERT's key biases have zero
    gradient: softmax ignores a shift shared by all keys), and all of them."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    floor = 1e-10 * float(np.linalg.norm(b))
    errs, o = [], 0
    for name, n in layout:
        errs.append((rel_fro(a[o:o + n], b[o:o + n]), name, n, float(np.linalg.norm(b[o:o + n]))))
        o += n
    return sorted((e for e in errs if e[3] > floor), reverse=True)[:k], errs


def check_diag(args, res, layout):
    import numpy as np
    from safetensors.numpy import load_file
    ok_out = {e: r for e, r in res["last_ok"].items() if r.get("out") and os.path.exists(r["out"])}
    chk = dict(tol=TOL)
    if "ours" not in ok_out:
        return dict(status="not checked (ours failed)")
    d = load_file(ok_out["ours"]["out"])
    ours, ours_loss = d["H"], float(d["loss"][0])
    vals = {e: np.load(r["out"]) for e, r in ok_out.items() if e != "ours"}
    # The exact GGN diagonal is laplace-torch's torch.func definition (J^T Λ J from
    # jacrev Jacobians); a backend is exact if it agrees with it (or, if that failed,
    # with curvlinops, the same code).
    defn = next((e for e in ("torchfunc", "curvlinops") if e in vals), None)
    exact = {e for e in vals if defn and rel_fro(vals[e], vals[defn]) <= TOL}
    chk["definition"] = defn
    chk["vs_definition"] = {e: rel_fro(vals[e], vals[defn]) for e in vals} if defn else {}
    chk["exact_backends"] = sorted(exact)
    chk["loss"] = {"ours": ours_loss, **{e: ok_out[e].get("loss") for e in vals}}
    cand = [e for e in exact if res["agg"][e]["ok"]]
    ref = min(cand, key=lambda e: res["agg"][e]["median_wall_s"]) if cand else None
    chk["reference"] = ref
    if ref is None:
        chk["status"] = "no exact laplace-torch result to compare with"
        return chk
    e = rel_fro(ours, vals[ref])
    worst, _ = per_tensor(ours, vals[ref], layout, 3)
    chk.update(ours_vs_reference=e, ours_loss_rel=abs(ours_loss - chk["loss"][ref]) / abs(chk["loss"][ref]),
               ours_worst_tensors=[dict(name=n, size=k, rel=r, ref_norm=nb) for r, n, k, nb in worst],
               status="OK" if e <= TOL else "MISMATCH")
    chk["ours_vs"] = {b: rel_fro(ours, v) for b, v in vals.items()}
    for b in vals:
        if b not in exact:
            worst, allt = per_tensor(vals[b], vals[ref], layout, 6)
            chk.setdefault("inexact", {})[b] = dict(
                rel=rel_fro(vals[b], vals[ref]),
                worst_tensors=[dict(name=n, size=k, rel=r, ref_norm=nb) for r, n, k, nb in worst],
                agreeing=[n for r, n, *_ in allt if r <= 1e-3], n_tensors=len(allt),
                per_tensor={n: r for r, n, *_ in allt})
    return chk


def check_llkron(args, res, tmp):
    ours = res["last_ok"].get("ours")
    if ours is None:
        return dict(status="not checked (ours failed)")
    chk = dict(ours=dict(log_marglik=ours["log_marglik"], prior_precision=ours["prior_precision"][0]),
               backends={}, tol=LML_TOL)
    pps = {}
    for e, r in res["last_ok"].items():
        if e == "ours":
            continue
        chk["backends"][e] = dict(log_marglik=r["log_marglik"], prior_precision=r["prior_precision"][0],
                                  log_marglik_at_ours_prior=r.get("log_marglik_at_ours_prior"),
                                  n_params=r["n_params"], last_layer_name=r.get("last_layer_name"))
        pps.setdefault(round(r["prior_precision"][0], 6), e)
    # our evidence at laplace-torch's optimum (untimed, no optimization)
    for pp, e in pps.items():
        rec = measure_ours(args, "llkron", 0, tmp, extra=["--prior-precision", repr(float(pp))],
                           tag=f"llkron.at_{e}")
        if rec["ok"]:
            chk["backends"][e]["ours_log_marglik_at_their_prior"] = rec["log_marglik"]
            for b, v in chk["backends"].items():
                if round(v["prior_precision"], 6) == pp:
                    v["ours_log_marglik_at_their_prior"] = rec["log_marglik"]
            chk.setdefault("ours_fixed_prior_runs", []).append(dict(prior_precision=pp, wall_s=rec["wall_s"],
                                                                    peak_rss_bytes=rec["peak_rss_bytes"]))
    problems = []
    lo = ours["log_marglik"]
    for e, v in chk["backends"].items():
        scale = max(abs(lo), 1.0)
        if lo < v["log_marglik"] - LML_TOL * scale:
            problems.append(f"{e}: ours {lo:.6f} < theirs {v['log_marglik']:.6f}")
        a = v.get("log_marglik_at_ours_prior")
        if a is not None and abs(a - lo) > LML_TOL * scale:
            problems.append(f"{e}: evidence at our prior precision {a:.6f} vs ours {lo:.6f}")
        b = v.get("ours_log_marglik_at_their_prior")
        if b is not None and abs(b - v["log_marglik"]) > LML_TOL * scale:
            problems.append(f"{e}: our evidence at their prior precision {b:.6f} vs theirs {v['log_marglik']:.6f}")
    chk["problems"] = problems
    chk["status"] = ("OK" if not problems else "MISMATCH") if chk["backends"] else "no laplace-torch result"
    return chk


# --------------------------------------------------------------------------- aggregation

def aggregate(recs):
    ok = [r for r in recs if r.get("ok")]
    if not ok:
        last = recs[-1] if recs else {}
        return dict(ok=False, error=last.get("error", "not run"), error_kind=last.get("error_kind"),
                    batch_size=last.get("batch_size"))
    walls = [r["wall_s"] for r in ok]
    agg = dict(ok=True, rounds=len(ok), median_wall_s=statistics.median(walls), min_wall_s=min(walls),
               wall_s=walls, peak_rss_bytes=max(r["peak_rss_bytes"] for r in ok),
               peak_rss_rounds=[r["peak_rss_bytes"] for r in ok], batch_size=ok[-1]["batch_size"],
               foreign_load=[r.get("foreign_load") for r in ok])
    if "compute_s" in ok[0]:
        agg["median_compute_s"] = statistics.median(r["compute_s"] for r in ok)
        agg["median_import_s"] = statistics.median(r["import_s"] for r in ok)
        agg["baseline_rss_bytes"] = statistics.median(r["baseline_rss_bytes"] for r in ok)
    failed = [r for r in recs if not r.get("ok")]
    if failed:
        agg["failed_attempts"] = [f"batch {r['batch_size']}, round {r['round'] + 1}: {r['error']}" for r in failed]
    return agg


# --------------------------------------------------------------------------- report

def machine():
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), usable_cpus=len(os.sched_getaffinity(0)),
                mem_gib=round(mem / 2**30, 1), kernel=platform.release(), python=platform.python_version())


def versions(args, src):
    v = {}
    for pkg in ["torch", "transformers", "laplace-torch", "curvlinops-for-pytorch", "backpack-for-pytorch",
                "asdfghjkl", "numpy"]:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    v["laplace-rs"] = subprocess.run([args.laplace, "--version"], capture_output=True, text=True).stdout.strip()
    with open(args.laplace, "rb") as fh:
        v["laplace binary sha256"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    v["laplace binary built"] = datetime.datetime.fromtimestamp(os.path.getmtime(src)).astimezone().isoformat(
        timespec="seconds")
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "crates", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
        v["laplace-rs git"] = head + (" (+ uncommitted changes under crates/)" if dirty else "")
    except OSError:
        pass
    return v


def fs(t):
    return "—" if t is None else f"{t:.3g} s"


def fmb(b):
    return "—" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def short(name):
    return re.sub(r"^m\.", "", re.sub(r"^m\.bert\.", "", re.sub(r"^m\.bert\.encoder\.layer\.", "L", name)))


def ratio(a, b):
    r = a / b
    return f"**{r:.2f}×** = 1/{1 / r:.1f}" if r < 1 else f"**{r:.2f}×**"


def render(data):
    meta = data["meta"]
    results = {t: data["results"][t] for t in TASKS if t in data["results"]}  # fixed order
    st, wl, m = meta["settings"], meta["workload"], meta["machine"]
    loads = [r["loadavg_before"] for r in data.get("records", []) if "loadavg_before" in r]
    runs = {}
    for t, r in results.items():
        rm = r.get("run") or dict(date=meta["date"], command=meta["command"], elapsed_s=meta["elapsed_s"])
        runs.setdefault(rm["date"], dict(rm, tasks_here=[]))["tasks_here"].append(TASKS[t])
    gen = "; ".join(f"{' + '.join(v['tasks_here'])}: {d} in {v.get('elapsed_s', 0) / 60:.1f} min (`{v['command']}`)"
                    for d, v in sorted(runs.items()))
    shas = {v.get("binary_sha256") for v in runs.values() if v.get("binary_sha256")}
    L = ["# laplace-rs vs laplace-torch: a BERT classifier (dict inputs)\n",
         f"Generated by `bench/transformer.py` — {gen}. Raw numbers: `bench/transformer_results.json`."
         + (" The runs used different `laplace` binaries (sha256 " + ", ".join(sorted(shas)) + ")."
            if len(shas) > 1 else "") + "\n",
         "## Setup\n",
         f"- **Model**: `transformers.BertForSequenceClassification(BertConfig(hidden_size=256, "
         f"num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=30522, "
         f"max_position_embeddings=128, num_labels=2, attn_implementation='eager'))`, random init "
         f"(`torch.manual_seed({wl['model_seed']})`), eval mode, float32, wrapped as `forward(batch) -> "
         f"self.m(input_ids=..., attention_mask=...).logits`. **P = {wl['n_params']:,}** parameters "
         f"(last layer `classifier`: {wl['n_last_layer']}). Logits of the random model are small "
         f"(max |f| = {wl['logits_abs_max']:.3f}).",
         f"- **Data**: N = {wl['n_data']} sequences × T = {wl['seq_len']} random token ids (numpy seed "
         f"{wl['data_seed']}), `attention_mask` with random lengths {wl['lengths'][0]}..{wl['lengths'][1]} "
         f"padded at the end with id 0 ({wl['n_tokens']} real tokens), labels in {{0, 1}} "
         f"({wl['label_counts'][0]} / {wl['label_counts'][1]}); `data.npz` with `input_ids`, "
         f"`attention_mask` (int64), `y` (int64). Exported with `tools/laplace_export.py export(wrapper, "
         f"example_dict, dir)` to `bench/workloads/bert_transformer/` (regenerated by every run).",
         f"- **Machine**: {m['cpu']}, {m['usable_cpus']} usable cores, {m['mem_gib']} GiB RAM, Linux "
         f"{m['kernel']}, Python {m['python']}. Load average {meta['loadavg_start']} at the start, "
         f"{meta['loadavg_end']} at the end; 1-minute load before each measurement "
         + (f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded")
         + " (the measured process itself accounts for up to 2).",
         f"- **Threads**: {st['threads']} everywhere (`torch.set_num_threads`, `OMP_NUM_THREADS`, "
         f"`MKL_NUM_THREADS`, `RAYON_NUM_THREADS`). **dtype**: float32 on both sides.",
         "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
         f"- **Method**: every measurement is one process: ours the `laplace` CLI (a copy of "
         f"`target/release/laplace`), laplace-torch a fresh `venv/bin/python` interpreter that imports torch, "
         f"transformers and laplace, rebuilds the model from the exported weights, loads the data and runs "
         f"the task. **Time** = wall time of the whole process and **peak memory** = its maximum RSS, both from "
         f"`/usr/bin/time -v`; the median over {st['rounds']} rounds (maximum for memory), the tools "
         f"interleaved within each round (order reversed every other round). laplace-torch processes also "
         f"time their computation alone (`time.perf_counter` around the `.diag` loop / `.fit` + "
         f"`.optimize_prior_precision` + `.log_marginal_likelihood`): column *computing*. Limits per process: "
         f"{st['mem_limit_bytes'] / 2**30:g} GiB (`RLIMIT_AS` and an RSS watchdog) and {st['timeout_s']:g} s. "
         f"laplace-torch backends that fail with an error are not retried in later rounds; one that runs "
         f"out of memory is rerun at half the batch size."
         + (f" Before each measurement the harness waited (up to {st['quiet_wait_s']:g} s) until other processes "
            f"used less than {st['quiet_below_cores']:g} cores." if st.get("quiet_wait_s") else "")
         + (f" A measurement during which other processes used more than "
            f"{max(0.5, st['quiet_below_cores']):g} cores was discarded and repeated (at most "
            f"{st['retry_loaded']} times; the discarded ones are in the JSON)." if st.get("retry_loaded") else ""),
         ""]
    L.append("## Results\n")
    show_other = any(r.get("foreign_load") is not None for r in data.get("records", []))
    L.append("| task | tool | batch | time (median) | computing | peak RSS |" + (" other load |" if show_other else "")
             + " result |")
    L.append("|---|---|---|---|---|---|" + ("---|" if show_other else "") + "---|")
    ratio_rows, notes = [], []
    for task, res in results.items():
        for e in ["ours"] + [b for b in BACKENDS if b in res["agg"]]:
            a = res["agg"][e]
            chk = res.get("check", {})
            if a["ok"]:
                rounds = " / ".join(f"{w:.3g}" for w in a["wall_s"])
                cell_t = f"**{fs(a['median_wall_s'])}** ({rounds})"
                comp = fs(a.get("median_compute_s")) if e != "ours" else "—"
                mem = fmb(a["peak_rss_bytes"])
                if task == "diag":
                    if e == "ours":
                        r = (f"rel. err. {chk['ours_vs_reference']:.1e} vs {CLASS[chk['reference']]}"
                             if chk.get("reference") else chk.get("status", ""))
                    elif e in chk.get("exact_backends", []):
                        r = "exact" + (" (the definition)" if e == chk.get("definition") else
                                       f" (rel. {chk['vs_definition'][e]:.1e} vs {CLASS[chk['definition']]})")
                    elif e in chk.get("inexact", {}):
                        r = f"**not the GGN diagonal**: rel. err. {chk['inexact'][e]['rel']:.2g} vs the exact one"
                    else:
                        r = ""
                else:
                    v = chk.get("ours") if e == "ours" else chk.get("backends", {}).get(e)
                    r = (f"log ML {v['log_marglik']:.5f} at prior precision {v['prior_precision']:.4g}"
                         if v else "")
                fl = [x for x in a.get("foreign_load", []) if x is not None]
                other = " / ".join(f"{x:.2f}" for x in fl) if fl else "—"
            else:
                cell_t, comp, mem, other = "—", "—", "—", "—"
                r = a["error"].replace("|", "\\|")
                if len(r) > 160:
                    r = r[:157] + "..."
            fa = [x for x in a.get("failed_attempts", [])] if a["ok"] else []
            if fa:
                r += "; earlier: " + "; ".join(x.replace("|", "\\|")[:120] for x in fa)
            L.append(f"| {TASKS[task]} | {LABEL[e]} | {a.get('batch_size') or '—'} | {cell_t} | {comp} | {mem} "
                     + (f"| {other} " if show_other else "") + f"| {r} |")
        ratio_rows.append((task, res))
    L.append("")
    L.append("Time: median wall time of the whole process, each round's in brackets. Computing: laplace-torch's "
             "computation alone (no interpreter start, imports, model or data loading). Peak RSS: the "
             "maximum over rounds."
             + (" Other load: CPU cores that other processes on the machine kept busy during each round's "
                "measurement (all CPU time in /proc/stat minus the measured process's; 2 cores in all). In trial "
                "runs laplace-torch slowed down far more than its lost share of the cores when other processes "
                "were busy, so rounds with other load well above 0 are pessimistic for it." if show_other else "")
             + "\n")
    if meta.get("notes"):
        L.append("**Conditions of this run** (notes added to `transformer_results.json` after the run):\n")
        L.extend(f"- {n}" for n in meta["notes"])
        L.append("")
    L.append("### Ours ÷ the fastest laplace-torch backend that succeeded\n")
    L.append("| task | fastest laplace-torch | time (whole process) | time (ours whole ÷ their computing) "
             "| peak memory |")
    L.append("|---|---|---|---|---|")
    for task, res in ratio_rows:
        o = res["agg"].get("ours", {})
        for label, key in (("", "fastest"), (" (inexact result)", "fastest_any")):
            fb = res.get(key)
            if not fb or (key == "fastest_any" and fb == res.get("fastest")):
                continue
            f = res["agg"][fb]
            if o.get("ok"):
                L.append(f"| {TASKS[task]} | {CLASS[fb]}{label}, batch {f['batch_size']} | "
                         f"{ratio(o['median_wall_s'], f['median_wall_s'])} ({fs(o['median_wall_s'])} vs "
                         f"{fs(f['median_wall_s'])}); fastest runs {o['min_wall_s'] / f['min_wall_s']:.2f}× "
                         f"({fs(o['min_wall_s'])} vs {fs(f['min_wall_s'])}) | {ratio(o['median_wall_s'], f['median_compute_s'])} "
                         f"({fs(o['median_wall_s'])} vs {fs(f['median_compute_s'])}) | "
                         f"{ratio(o['peak_rss_bytes'], f['peak_rss_bytes'])} ({fmb(o['peak_rss_bytes'])} vs "
                         f"{fmb(f['peak_rss_bytes'])}) |")
        if not res.get("fastest"):
            L.append(f"| {TASKS[task]} | none succeeded | — | — | — |")
    L.append("")
    L.append("## Numerical checks\n")
    for task, res in results.items():
        chk = res.get("check", {})
        if task == "diag":
            L.append(f"**GGN diagonal** ({chk.get('status', 'not run')}; tolerance: relative Frobenius error "
                     f"≤ {TOL:g}, float32).")
            if chk.get("reference"):
                L.append(f"- Ours vs {CLASS[chk['reference']]} (the fastest laplace-torch backend whose result is "
                         f"the exact GGN diagonal): relative error **{chk['ours_vs_reference']:.2e}** over all "
                         f"{wl['n_params']:,} entries; loss (Σ NLL) {chk['loss']['ours']:.6f} vs "
                         f"{chk['loss'][chk['reference']]:.6f} (rel. {chk['ours_loss_rel']:.1e}). Largest "
                         "per-tensor errors: " + ", ".join(
                             f"`{short(t['name'])}` {t['rel']:.1e}" for t in chk["ours_worst_tensors"])
                         + " (tensors whose exact diagonal is zero up to rounding — the attention key biases, "
                         "whose gradient vanishes because softmax ignores a shift shared by all keys — left out).")
                others = {b: v for b, v in chk.get("ours_vs", {}).items() if b != chk["reference"]}
                if others:
                    L.append("- Ours vs the other backends: " + ", ".join(
                        f"{CLASS[b]} {v:.2e}" for b, v in others.items()) + ".")
                if chk.get("definition") and len(chk.get("exact_backends", [])) > 1:
                    L.append("- laplace-torch backends vs " + CLASS[chk["definition"]] + ": " + ", ".join(
                        f"{CLASS[b]} {v:.1e}" for b, v in chk["vs_definition"].items() if b != chk["definition"])
                             + ".")
            for b, v in chk.get("inexact", {}).items():
                L.append(f"- **{CLASS[b]} does not compute the GGN diagonal of this model**: relative error "
                         f"{v['rel']:.2g} against the exact one (and {chk['ours_vs'][b]:.2g} against ours). "
                         f"{len(v['agreeing'])} of {v['n_tensors']} tensors agree within 1e-3: "
                         + ", ".join(f"`{short(n)}`" for n in v["agreeing"]) + "; the worst: "
                         + ", ".join(f"`{short(t['name'])}` {t['rel']:.2g}" for t in v["worst_tensors"]) + ". "
                         + (ASDL_NOTE if b == "asdl" else ""))
            L.append("")
        else:
            L.append(f"**Last-layer KFAC evidence** ({chk.get('status', 'not run')}; tolerance {LML_TOL:g} relative).")
            if "ours" in chk:
                o = chk["ours"]
                L.append(f"- Ours: log marginal likelihood **{o['log_marglik']:.6f}** at prior precision "
                         f"{o['prior_precision']:.6g} (Adam as laplace-torch, then a fixed-point iteration and "
                         "gradient ascent; the best point is kept).")
            for b, v in chk.get("backends", {}).items():
                s = (f"- {CLASS[b]} (`{v['last_layer_name']}`, {v['n_params']} parameters): "
                     f"**{v['log_marglik']:.6f}** at prior precision {v['prior_precision']:.6g}; ours minus "
                     f"theirs {chk['ours']['log_marglik'] - v['log_marglik']:+.2e}.")
                if v.get("log_marglik_at_ours_prior") is not None:
                    s += (f" Same evidence function: laplace-torch's at our prior precision "
                          f"{v['log_marglik_at_ours_prior']:.6f} (ours {chk['ours']['log_marglik']:.6f})")
                if v.get("ours_log_marglik_at_their_prior") is not None:
                    s += (f"; ours at their prior precision (`laplace fit --prior-precision`, no optimization) "
                          f"{v['ours_log_marglik_at_their_prior']:.6f} (theirs {v['log_marglik']:.6f}).")
                L.append(s)
            for p in chk.get("problems", []):
                L.append(f"- PROBLEM: {p}")
            runs = chk.get("ours_fixed_prior_runs")
            if runs:
                o = res["agg"].get("ours", {})
                opt = [r["optimize_s"] for r in data.get("records", []) if r.get("task") == task
                       and r.get("ok") and r.get("optimize_s") is not None]
                L.append(f"- The same `laplace fit` without `--optimize-prior` (fixed prior precision, untimed "
                         f"check run) took {fs(runs[0]['wall_s'])}, peak {fmb(runs[0]['peak_rss_bytes'])}"
                         + (f": about {o['median_wall_s'] - runs[0]['wall_s']:.2g} s of our "
                            f"{fs(o['median_wall_s'])} is the evidence optimization (Adam, fixed point, gradient "
                            "ascent)" if o.get("ok") else "")
                         + (f"; laplace-torch's `optimize_prior_precision` (100 Adam steps) took "
                            f"{min(opt):.2g} to {max(opt):.2g} s" if opt else "") + ".")
            L.append("")
    L.append("## Failures and notes\n")
    for task, res in results.items():
        for e in BACKENDS:
            a = res["agg"].get(e)
            if a is None:
                continue
            if not a["ok"]:
                why = FAILURE_NOTES.get((task, e), "")
                L.append(f"- {TASKS[task]}, {CLASS[e]}: {a['error']}." + (f" {why}" if why else ""))
            elif a.get("failed_attempts"):
                L.append(f"- {TASKS[task]}, {CLASS[e]}: " + "; ".join(a["failed_attempts"]) +
                         f"; measured at batch {a['batch_size']}." + (
                             " " + FAILURE_NOTES[(task, e, "oom")] if (task, e, "oom") in FAILURE_NOTES else ""))
    for task, res in results.items():
        if task == "diag":
            impl = res.get("impl", {})
            if impl.get("curvlinops") and impl.get("torchfunc") and impl["curvlinops"] == impl["torchfunc"]:
                L.append(f"- CurvlinopsGGN runs the same code as GGNInterface here (`diag` = "
                         f"`{impl['curvlinops']['diag']}`, `jacobians` = `{impl['curvlinops']['jacobians']}`): "
                         "the two rows differ only by noise; its batch size search started at GGNInterface's.")
        if task == "llkron":
            L.append("- laplace-torch's default backend for this `Laplace(...)` call is CurvlinopsGGN.")
    L.append("")
    L.append("## How to rerun\n")
    L.append("```sh\ncargo build --release -p laplace-cli     # target/release/laplace (copied to /tmp/laplace-bench/ "
             "before use)\nvenv/bin/python bench/transformer.py       # ~20 min on 2 idle cores; --help for options\n"
             "venv/bin/python bench/transformer.py --quiet-wait 300     # shared machine: wait for idle cores before "
             "each measurement\nvenv/bin/python bench/transformer.py --tasks llkron --merge bench/transformer_results.json"
             "   # redo one task (~2 min)\nvenv/bin/python bench/transformer.py --render bench/transformer_results.json"
             "   # only rewrite this file\n```\n")
    L.append("Options: `--rounds` (default 2), `--tasks diag,llkron`, `--backends torchfunc,curvlinops,asdl,backpack`, "
             "`--batch-size` (32), `--timeout` (600 s), `--mem-limit-gb` (16), `--threads` (2), `--quiet-wait` / "
             "`--quiet-below` / `--retry-loaded` (0 s / 0.3 cores / 0), `--merge`, `--keep` (keep the scratch directory with every log and "
             "result). Time on idle cores: ~8 min per round of the diagonal (the two torch.func-based backends ~3.3 min "
             "each, plus a ~1 min out-of-memory attempt at batch 32 in round 1), ~1 min per round of the "
             "last-layer task; more when other processes share the cores.")
    return "\n".join(L) + "\n"


ASDL_NOTE = ("(L<i> = `bert.encoder.layer.<i>`.) ASDL agrees where each entry's gradient comes from one "
             "position of one sequence (the word embeddings: random ids seldom repeat within a sequence; in the "
             "last encoder layer the query projection and everything after the attention, where only the [CLS] "
             "position reaches the output; the pooler and the classifier) and nowhere else. That is consistent with ASDL squaring per-position "
             "contributions (the T positions of a sequence taken as separate examples; for the position "
             "embeddings, looked up with one (1, T) `position_ids` for the whole batch, the batch taken as one "
             "example) instead of each sequence's summed gradient: an approximation, not the exact GGN diagonal. "
             "Ours and laplace-torch's Jacobian-based torch.func result agree with each other.")

FAILURE_NOTES = {
    ("diag", "backpack"): ("BackPACK's forward hook stores each module's output as `module.output`, which "
                           "collides with BERT's submodules named `output` (`BertOutput`, `BertSelfOutput`): "
                           "the model cannot even run a forward pass under BackPACK."),
    ("llkron", "backpack"): "laplace-torch's `fit` refuses BackPACK for dict (non-tensor) batches.",
    ("llkron", "torchfunc"): "laplace-torch's torch.func base interface has no KFAC (`kron`).",
    ("diag", "torchfunc", "oom"): ("`GGNInterface.diag` forms the full Jacobian (batch × 2 × P floats, "
                                   "via `jacrev` over all parameters) plus the per-output backward "
                                   "intermediates; at batch 32 that exceeds the limit."),
    ("diag", "curvlinops", "oom"): "Same code as GGNInterface.",
}


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tasks", default="diag,llkron")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0, help="GiB per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-data", type=int, default=N_DATA, help="sequences (256; fewer only for trial runs)")
    ap.add_argument("--laplace", default=os.path.join(ROOT, "target", "release", "laplace"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--workload-dir", default=os.path.join(HERE, "workloads", "bert_transformer"))
    ap.add_argument("--md", default=os.path.join(HERE, "TRANSFORMER.md"))
    ap.add_argument("--json", default=os.path.join(HERE, "transformer_results.json"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S s until other processes use less than "
                         "--quiet-below cores (for shared machines; default: no waiting)")
    ap.add_argument("--quiet-below", type=float, default=0.3, metavar="CORES")
    ap.add_argument("--retry-loaded", type=int, default=0, metavar="N",
                    help="measure again (up to N times) when other processes used more than max(0.5, "
                         "--quiet-below) cores during a measurement; the discarded one stays in the JSON")
    ap.add_argument("--merge", metavar="RESULTS.json",
                    help="start from these results: the tasks run now replace theirs, the others are kept")
    ap.add_argument("--render", metavar="RESULTS.json", help="only rewrite --md from earlier results")
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--child", metavar="REQ.json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.exit(child(args.child))
    if args.prepare:
        prepare(args.prepare, args.n_data)
        return
    if args.render:
        with open(args.render) as fh:
            data = json.load(fh)
        with open(args.md, "w") as fh:
            fh.write(render(data))
        return
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    tasks = [t for t in args.tasks.split(",") if t]
    backends = [b for b in args.backends.split(",") if b]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t}")
    for b in backends:
        if b not in CLASS:
            ap.error(f"unknown backend {b}")
    if not os.path.exists(args.laplace):
        ap.error(f"{args.laplace} not found: run `cargo build --release -p laplace-cli`")
    if not os.path.exists("/usr/bin/time"):
        ap.error("/usr/bin/time not found (apt-get install time)")
    args.mem_limit = int(args.mem_limit_gb * 2**30)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = tempfile.mkdtemp(prefix="laplace-transformer-")
    # One copy of the binary for the whole run, even if target/release is rebuilt meanwhile.
    src = args.laplace
    os.makedirs("/tmp/laplace-bench", exist_ok=True)
    args.laplace = os.path.join("/tmp/laplace-bench", f"laplace-transformer-{os.getpid()}")
    shutil.copy2(src, args.laplace)
    t_start = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t_start:7.1f} s] {msg}", flush=True)

    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), machine=machine(),
                versions=versions(args, src),
                command=shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                                    else sys.executable, os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)]
                                   + sys.argv[1:]),
                loadavg_start=" ".join(open("/proc/loadavg").read().split()[:3]),
                settings=dict(rounds=args.rounds, timeout_s=args.timeout, mem_limit_bytes=args.mem_limit,
                              threads=args.threads, batch_size=args.batch_size, n_data=args.n_data, tol=TOL, lml_tol=LML_TOL,
                              tasks=tasks, backends=backends, quiet_wait_s=args.quiet_wait,
                              quiet_below_cores=args.quiet_below, retry_loaded=args.retry_loaded))
    records, results = [], {}
    if args.merge:
        with open(args.merge) as fh:
            old = json.load(fh)
        om = old["meta"]
        for t, r in old["results"].items():
            if t not in tasks:
                r.setdefault("run", dict(date=om["date"], command=om["command"], elapsed_s=om.get("elapsed_s", 0),
                                         binary_sha256=om["versions"].get("laplace binary sha256")))
                results[t] = r
        records += [r for r in old["records"] if r["task"] not in tasks]
    run_meta = {k: meta[k] for k in ("date", "command", "loadavg_start")}
    run_meta.update(binary_sha256=meta["versions"]["laplace binary sha256"], tasks=tasks)
    data = dict(meta=meta, results=results, records=records)
    try:
        log(f"writing the workload to {os.path.relpath(args.workload_dir, ROOT)}")
        p = subprocess.run([args.python, os.path.abspath(__file__), "--prepare", args.workload_dir,
                            "--n-data", str(args.n_data)],
                           env=thread_env(args), capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit("prepare failed:\n" + p.stderr[-3000:])
        with open(os.path.join(args.workload_dir, "workload.json")) as fh:
            wl = json.load(fh)
        meta["workload"] = {k: v for k, v in wl.items() if k != "parameters"}
        layout = wl["parameters"]
        log(f"P = {wl['n_params']}, reload check max |Δf| = {wl['reload_max_abs_diff']:.1e}")

        for task in tasks:
            entrants = ["ours"] + backends
            recs = {e: [] for e in entrants}
            last_ok, dead, bsz, impl = {}, set(), {e: args.batch_size for e in backends}, {}
            retries = {}
            for rnd in range(args.rounds):
                order = entrants if rnd % 2 == 0 else entrants[::-1]
                for e in order:
                    if e in dead:
                        continue
                    if e == "ours":
                        ours_ok = last_ok.get("ours")
                        for attempt in range(args.retry_loaded + 1):
                            q = wait_quiet(args, log)
                            load = float(open("/proc/loadavg").read().split()[0])
                            rec = measure_ours(args, task, rnd, tmp)
                            rec["loadavg_before"] = load
                            if q:
                                rec.update(q)
                            records.append(rec)
                            log(f"{task} r{rnd + 1} ours: " + (f"{rec['wall_s']:.2f} s, {fmb(rec['peak_rss_bytes'])}"
                                                               if rec["ok"] else rec["error"])
                                + f" [other processes: {rec['foreign_load']:.2f} cores]")
                            if not (rec["ok"] and loaded(rec, args) and attempt < args.retry_loaded):
                                break
                            rec["discarded"] = f"other processes used {rec['foreign_load']:.2f} cores; measured again"
                        recs[e].append(rec)
                        if rec["ok"]:
                            if ours_ok and ours_ok.get("out") and os.path.exists(ours_ok["out"]):
                                os.remove(ours_ok["out"])
                            last_ok["ours"] = rec
                        continue
                    if rnd == 0 and e in SAME_DIAG_CODE and task == "diag" and SAME_DIAG_CODE[e] in bsz:
                        bsz[e] = min(bsz[e], bsz[SAME_DIAG_CODE[e]])
                    while True:
                        bs = bsz[e]
                        out = os.path.join(tmp, f"{e}.{task}.H.npy") if task == "diag" else None
                        ours_pp = (last_ok["ours"]["prior_precision"][0]
                                   if task == "llkron" and "ours" in last_ok else None)
                        q = wait_quiet(args, log)
                        load = float(open("/proc/loadavg").read().split()[0])
                        rec = measure_torch(args, task, e, rnd, tmp, bs, out=out, ours_pp=ours_pp)
                        rec["loadavg_before"] = load
                        if q:
                            rec.update(q)
                        records.append(rec)
                        if rec.get("impl"):
                            impl[e] = rec["impl"]
                        log(f"{task} r{rnd + 1} {e} (batch {bs}): " + (
                            f"{rec['wall_s']:.2f} s (computing {rec['compute_s']:.2f} s), "
                            f"{fmb(rec['peak_rss_bytes'])}" if rec["ok"] else rec["error"][:200])
                            + f" [other processes: {rec['foreign_load']:.2f} cores]")
                        if rec["ok"] and loaded(rec, args) and retries.get((e, rnd), 0) < args.retry_loaded:
                            retries[(e, rnd)] = retries.get((e, rnd), 0) + 1
                            rec["discarded"] = f"other processes used {rec['foreign_load']:.2f} cores; measured again"
                            continue
                        recs[e].append(rec)
                        if rec["ok"]:
                            last_ok[e] = rec
                            break
                        if rec["error_kind"] == "oom" and bs > 1:
                            bsz[e] = bs // 2
                            continue
                        if rec["error_kind"] in ("unsupported", "error"):
                            dead.add(e)  # deterministic: not retried in later rounds
                        break
            agg = {e: aggregate(recs[e]) for e in entrants}
            res = dict(agg=agg, impl=impl, last_ok=last_ok, run=run_meta)
            results[task] = res
            if task == "diag":
                res["check"] = check_diag(args, res, layout)
                exact = set(res["check"].get("exact_backends", []))
                ok = [e for e in backends if agg[e]["ok"] and e in exact]
            else:
                res["check"] = check_llkron(args, res, tmp)
                ok = [e for e in backends if agg[e]["ok"]]
            any_ok = [e for e in backends if agg[e]["ok"]]
            res["fastest"] = min(ok, key=lambda e: agg[e]["median_wall_s"]) if ok else None
            res["fastest_any"] = min(any_ok, key=lambda e: agg[e]["median_wall_s"]) if any_ok else None
            log(f"{task} check: {res['check'].get('status')}")
            for e, r in last_ok.items():  # results are no longer needed
                if r.get("out") and os.path.exists(r["out"]):
                    os.remove(r["out"])
            res["last_ok"] = {e: {k: v for k, v in r.items() if k != "out"} for e, r in last_ok.items()}
    finally:
        meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        meta["elapsed_s"] = run_meta["elapsed_s"] = time.monotonic() - t_start
        if results and "workload" in meta:
            with open(args.json, "w") as fh:
                json.dump(data, fh, indent=1, default=str)
                fh.write("\n")
            with open(args.md, "w") as fh:
                fh.write(render(data))
            log(f"wrote {os.path.relpath(args.md, ROOT)} and {os.path.relpath(args.json, ROOT)}")
        if os.path.exists(args.laplace):
            os.remove(args.laplace)
        if args.keep:
            print(f"scratch directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
