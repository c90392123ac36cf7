"""One laplace-torch measurement, in a process of its own (used by bench/harness.py).

A measurement is a request (JSON): workload directory, quantity, backend, number
of timed runs, threads, memory limit, where to write the result. The process

1. limits its address space (RLIMIT_AS) to the memory limit;
2. sets torch (and OpenMP/MKL) to the requested number of threads;
3. loads the model (rebuilt from model.json + weights.safetensors, float32,
   eval mode) and the whole data set as one batch, builds the backend the way
   laplace-torch's Laplace classes do (and, for last-layer quantities, wraps
   the model in ``FeatureExtractor`` as ``LLLaplace`` does);
4. records the baseline peak RSS (``ru_maxrss``: interpreter, imports, model,
   data, backend);
5. runs the quantity once (warm-up), then ``repeat`` timed runs
   (``time.perf_counter`` around the call; fewer if the warm-up shows they
   would not fit in ``budget_s``), then records the peak RSS again;
6. writes the last result (float32 safetensors, same keys as
   ``laplace bench --out``) and a JSON summary.

Two ways to run it:

* ``python torch_child.py --request REQ.json``: a fresh interpreter per
  measurement (``harness.py --no-fork-server``);
* ``python torch_child.py --server``: imports torch and laplace once and then,
  for each request line on stdin, forks a child that does steps 1-6 and
  exits. The server itself never computes anything (no thread pool is
  started before the fork), so every child starts from the same state as a
  fresh interpreter after the imports, only without the ~8 s of importing.
  It answers ``{"pid": ...}`` when the child starts and
  ``{"pid", "status", "maxrss_kb"}`` when it has been reaped.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
import warnings

# Thread settings must precede the torch import (fresh-interpreter mode); in
# server mode the children set torch's thread count again explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import laplace.curvature as lc  # noqa: E402
from laplace.utils import FeatureExtractor  # noqa: E402

# Quantity -> (interface kind, method, stochastic, last_layer)
QUANTITIES = {
    "ggn_diag": ("ggn", "diag", False, False),
    "ggn_diag_mc": ("ggn", "diag", True, False),
    "ef_diag": ("ef", "diag", False, False),
    "gradients": ("grad", "gradients", False, False),
    "ggn_kron": ("ggn", "kron", False, False),
    "ggn_kron_mc": ("ggn", "kron", True, False),
    "ef_kron": ("ef", "kron", False, False),
    "ll_ggn_full": ("ggn", "full", False, True),
    "jacobians": ("jac", "jacobians", False, False),
    "ggn_full": ("ggn", "full", False, False),
    "ef_full": ("ef", "full", False, False),
    "hessian_full": ("hess", "full", False, False),
}

# (interface kind, backend) -> class name in laplace.curvature (None: laplace-torch has none).
# "torchfunc" is laplace-torch's base interface, whose jacobians/gradients use
# torch.func and whose GGN/EF full/diag are built from them.
CLASSES = {
    ("ggn", "backpack"): "BackPackGGN", ("ggn", "asdl"): "AsdlGGN",
    ("ggn", "curvlinops"): "CurvlinopsGGN", ("ggn", "torchfunc"): "GGNInterface",
    ("jac", "backpack"): "BackPackGGN", ("jac", "asdl"): "AsdlGGN",
    ("jac", "curvlinops"): "CurvlinopsGGN", ("jac", "torchfunc"): "CurvatureInterface",
    ("ef", "backpack"): "BackPackEF", ("ef", "asdl"): "AsdlEF",
    ("ef", "curvlinops"): "CurvlinopsEF", ("ef", "torchfunc"): "EFInterface",
    ("grad", "backpack"): "BackPackEF", ("grad", "asdl"): "AsdlEF",
    ("grad", "curvlinops"): "CurvlinopsEF", ("grad", "torchfunc"): "CurvatureInterface",
    ("hess", "backpack"): None, ("hess", "asdl"): "AsdlHessian",
    ("hess", "curvlinops"): "CurvlinopsHessian", ("hess", "torchfunc"): "CurvatureInterface",
}


def backend_class_name(quantity: str, backend: str) -> str | None:
    return CLASSES[(QUANTITIES[quantity][0], backend)]


def load_workload(wdir: str):
    from safetensors.torch import load_file

    case = os.path.join(wdir, "sweep_case")
    if os.path.exists(case):
        # A sweep workload (graph models included): the module make_workloads.py exported.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import sweep_models
        model = sweep_models.build(open(case).read().strip())[0]
    else:
        with open(os.path.join(wdir, "model.json")) as fh:
            spec = json.load(fh)
        layers = []
        for layer in spec["layers"]:
            args = {k: v for k, v in layer.items() if k != "type"}
            layers.append(getattr(nn, layer["type"])(**args))
        model = nn.Sequential(*layers)
    model.load_state_dict(load_file(os.path.join(wdir, "weights.safetensors")))
    model = model.float().eval()
    with open(os.path.join(wdir, "likelihood")) as fh:
        lik = fh.read().strip()
    d = np.load(os.path.join(wdir, "data.npz"))
    x = torch.from_numpy(np.ascontiguousarray(d["x"], dtype=np.float32))
    if lik == "classification":
        y = torch.from_numpy(np.ascontiguousarray(d["y"]).astype(np.int64))
    else:
        y = torch.from_numpy(np.ascontiguousarray(d["y"], dtype=np.float32))
    return model, lik, x, y


def build(req):
    """(callable computing the quantity once, returning a dict of tensors; class name)."""
    model, lik, x, y = load_workload(req["workload_dir"])
    n = x.shape[0]
    kind, method, stochastic, last_layer = QUANTITIES[req["quantity"]]
    cls_name = backend_class_name(req["quantity"], req["backend"])
    if cls_name is None:
        raise NotImplementedError(f"laplace-torch has no {req['backend']} backend for this quantity")
    cls = getattr(lc, cls_name)
    with torch.no_grad():
        n_out = model(x[:1]).shape[-1]
    kwargs = {}
    if stochastic:
        kwargs["stochastic"] = True  # num_samples / mc_samples: the default, 1
    if last_layer:
        # As LLLaplace: FeatureExtractor(deepcopy(model)), last layer found on the
        # first batch, backend built with last_layer=True.
        model = FeatureExtractor(model)
        with torch.no_grad():
            model.find_last_layer(x[:1])
        kwargs["last_layer"] = True
    # As BaseLaplace.fit: the model knows its output size (BackPACK/ASDL Jacobians use it).
    setattr(model, "output_size", n_out)
    backend = cls(model, lik, **kwargs)

    def as_np(t):
        return t.detach().to(torch.float32).cpu().contiguous().numpy()

    def run():
        model.zero_grad()  # as BaseLaplace.fit before each batch
        if method == "diag":
            loss, h = backend.diag(x, y, N=n)
            return {"loss": loss, "H": h}
        if method == "full":
            loss, h = backend.full(x, y, N=n)
            return {"loss": loss, "H": h}
        if method == "kron":
            loss, kron = backend.kron(x, y, N=n)
            out = {"loss": loss}
            for b, facs in enumerate(kron.kfacs):
                for f, t in enumerate(facs):
                    out[f"kron.{b}.{f}"] = t
            return out
        if method == "jacobians":
            j, f = backend.jacobians(x)
            return {"J": j, "f": f}
        if method == "gradients":
            g, loss = backend.gradients(x, y)
            return {"G": g, "loss": loss}
        raise ValueError(method)

    def to_np(res):
        out = {}
        for k, v in res.items():
            a = as_np(torch.as_tensor(v))
            out[k] = np.ascontiguousarray(a.reshape(1) if a.ndim == 0 else a)
        return out

    return run, to_np, cls_name


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(req) -> dict:
    """Steps 2-6 of the module docstring. Returns the summary (also on failure)."""
    summary = {"quantity": req["quantity"], "backend": req["backend"], "ok": False}
    try:
        threads = int(req.get("threads", 2))
        torch.set_num_threads(threads)
        torch.manual_seed(int(req.get("seed", 0)))
        run, to_np, cls_name = build(req)
        summary["class"] = cls_name
        summary["baseline_rss_bytes"] = maxrss_bytes()
        t0 = time.perf_counter()
        res = run()
        warm = time.perf_counter() - t0
        summary["warmup_s"] = warm
        repeat = int(req.get("repeat", 3))
        budget = float(req.get("budget_s", 120.0))
        if repeat > 0 and warm * repeat > budget:
            repeat = max(1, int(budget // max(warm, 1e-9)))
            summary["repeat_reduced_to"] = repeat
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            res = run()
            times.append(time.perf_counter() - t0)
        summary["peak_rss_bytes"] = maxrss_bytes()
        summary["times_s"] = times
        summary["median_s"] = statistics.median(times) if times else None
        summary["torch_threads"] = torch.get_num_threads()
        if req.get("out"):
            from safetensors.numpy import save_file
            arrs = to_np(res)
            save_file(arrs, req["out"])
            summary["shapes"] = {k: list(v.shape) for k, v in arrs.items()}
        summary["ok"] = True
    except NotImplementedError as e:
        summary["error_kind"] = "unsupported"
        where = f"{summary['class']}.{QUANTITIES[req['quantity']][1]}" if "class" in summary else "build"
        summary["error"] = f"{where} raises NotImplementedError" + (f": {e}" if str(e) else "")
        summary["traceback"] = traceback.format_exc()[-3000:]
    except MemoryError as e:
        summary["error_kind"] = "oom"
        summary["error"] = f"MemoryError: {e}"
        summary["traceback"] = traceback.format_exc()[-3000:]
    except Exception as e:  # noqa: BLE001 - any failure is a result
        msg = f"{type(e).__name__}: {e}"
        summary["error_kind"] = "oom" if "can't allocate memory" in msg or "out of memory" in msg.lower() else "error"
        summary["error"] = msg[:2000]
        summary["traceback"] = traceback.format_exc()[-3000:]
    return summary


def limit_memory(limit_bytes):
    if limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit_bytes), int(limit_bytes)))


def child_main(req) -> int:
    limit_memory(req.get("mem_limit_bytes"))
    summary = measure(req)
    with open(req["summary"] + ".tmp", "w") as fh:
        json.dump(summary, fh)
    os.replace(req["summary"] + ".tmp", req["summary"])
    return 0 if summary["ok"] else 3


def server_main() -> None:
    proto = sys.stdout
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        proto.flush()
        pid = os.fork()
        if pid == 0:  # the measurement
            code = 1
            try:
                os.setpgid(0, 0)
                log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                code = child_main(req)
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        proto.write(json.dumps({"pid": pid}) + "\n")
        proto.flush()
        _, status, ru = os.wait4(pid, 0)
        proto.write(json.dumps({"pid": pid, "status": status, "maxrss_kb": ru.ru_maxrss}) + "\n")
        proto.flush()


def main() -> None:
    if sys.argv[1:2] == ["--server"]:
        server_main()
    elif sys.argv[1:2] == ["--request"]:
        with open(sys.argv[2]) as fh:
            req = json.load(fh)
        sys.exit(child_main(req))
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
