#!/usr/bin/env python
"""Exact-Hessian reference fixtures of laplace-rs, from laplace-torch.

Run with the reference virtual environment (torch 2.15 CPU, laplace-torch 0.3,
curvlinops-for-pytorch 3.0.1, asdfghjkl/asdl 0.1a4)::

    venv/bin/python tools/reference/make_hessian_fixtures.py

Steps:

1. (Re)generates the fixture case ``hess_smooth_cnn`` -- a CNN that is smooth
   everywhere (Softplus below its threshold, GELU, Sigmoid, AvgPool) -- with
   ``make_fixtures.process``, so it is a full member of the conformance suite
   (model.json, weights.safetensors, data.npz, subnetwork.npy, meta.json,
   expected.safetensors exactly as ``make_fixtures.py`` writes them).
2. For every case directory in ``crates/laplace/tests/fixtures/`` it loads
   model.json + weights.safetensors + data.npz (+ subnetwork.npy), rebuilds the
   torch model and checks that its outputs equal the stored ``jacobians.f``.
3. It computes the Hessian of L(theta) = sum_n l_n (regression
   l = 1/2 ||y - f||^2, classification l = -log softmax(f)_y) from the
   definition with ``torch.func.hessian`` (whole network, last layer only,
   subnetwork coordinates only), a Hessian-vector product with
   ``torch.func.jvp(grad(L))`` and a central finite-difference Hessian, and
   the same quantities with laplace-torch ``CurvlinopsHessian`` and
   ``AsdlHessian`` (constructor modes full / ``last_layer=True`` on a
   ``FeatureExtractor`` / ``subnetwork_indices=``) and end to end with
   ``laplace.Laplace(..., hessian_structure="full", backend=...)``.
4. It writes ``<case>/hessian.safetensors`` and ``<case>/hessian_meta.json``.

Written keys (float64): ``hessian.full`` (P,P), ``hessian.loss`` [1],
``hessian.diag`` (P,), ``last_layer.hessian.full`` (P_ll,P_ll),
``subnetwork.hessian.full`` (S,S) (cases with subnetwork.npy, in the order of
the indices as given), ``hvp.v`` (P,), ``hvp.Hv`` (P,).

The script exits non-zero if a written value is not backed by a laplace-torch
result that agrees with the definition (hvp.* are torch.func by design).
See ``tools/reference/README_hessian.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402  (sets float64 default, imports laplace)

torch.set_default_dtype(torch.float64)

from laplace import Laplace  # noqa: E402
from laplace.curvature import AsdlHessian, CurvlinopsHessian  # noqa: E402
from laplace.utils import FeatureExtractor  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

OUT_ROOT = mf.OUT_ROOT
RTOL = mf.RTOL
NEW_CASE = "hess_smooth_cnn"
BACKENDS = {"curvlinops": CurvlinopsHessian, "ASDL": AsdlHessian}
PRIORITY = ["curvlinops", "ASDL"]
FD_STEP = 1e-5


def r3(e: float) -> float:
    """Round an error to 3 significant digits (stable, readable JSON)."""
    return float(f"{e:.3e}")


# --------------------------------------------------------------------------
# the new case (built with make_fixtures.process)
# --------------------------------------------------------------------------

def _seed(name):
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % (2**31)


def build_smooth_cnn():
    name = NEW_CASE
    seed = _seed(name)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),      # (1,7,7) -> (2,7,7)
        nn.Softplus(beta=1.3),              # threshold 20: never reached (checked)
        nn.AvgPool2d(2),                    # -> (2,3,3)
        nn.Conv2d(2, 3, 2),                 # -> (3,2,2)
        nn.GELU(),
        nn.Flatten(),                       # -> 12
        nn.Linear(12, 8),
        nn.Sigmoid(),
        nn.Linear(8, 3),
    )
    mf.scale_(model, {0: 2.0, 3: 3.0, 6: 3.0, 8: 4.0})
    model = model.eval()
    N, ishape, C = 8, (1, 7, 7), 3
    x = torch.randn(N, *ishape)
    y = torch.randint(0, C, (N,), dtype=torch.long)
    assert sorted(set(y.tolist())) == list(range(C)), y  # every class is a label
    desc = ("smooth CNN (1,7,7): Conv2d(1,2,3,padding=1) -> Softplus(beta=1.3) -> AvgPool2d(2) "
            "-> Conv2d(2,3,2) -> GELU -> Flatten -> Linear(12,8) -> Sigmoid -> Linear(8,3), "
            "classification; twice differentiable everywhere at these inputs (Softplus never "
            "reaches its linear branch)")
    return dict(model=model, x=x, y=y, likelihood="classification", C=C, input_shape=ishape,
                subnet=True, description=desc, seed=seed)


def smooth_ranges(model, x):
    """Range check for the smooth case: curved regime, Softplus below threshold."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, (mod, i[0].detach())))
             for k, m in enumerate(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for k, (m, z) in sorted(seen.items()):
        if isinstance(m, nn.Softplus):
            bz = m.beta * z
            s = (f"layer {k} Softplus: beta*x in [{bz.min():.2f}, {bz.max():.2f}] "
                 f"(threshold {m.threshold:g}), frac |beta*x|<3: {float((bz.abs() < 3).double().mean()):.2f}")
            assert float(bz.max()) < m.threshold, s
            assert float((bz.abs() < 3).double().mean()) > 0.5, s
        elif isinstance(m, nn.GELU):
            fp = float((z > 0).double().mean())
            s = f"layer {k} GELU: pre-act in [{z.min():.2f}, {z.max():.2f}], frac>0 {fp:.2f}"
            assert 0.15 < fp < 0.85 and float(z.abs().max()) > 1.0, s
        elif isinstance(m, nn.Sigmoid):
            fp = float((z > 0).double().mean())
            s = f"layer {k} Sigmoid: pre-act in [{z.min():.2f}, {z.max():.2f}], frac>0 {fp:.2f}"
            assert float(z.abs().max()) > 1.0 and 0.15 < fp < 0.85, s
        else:
            continue
        out.append(s)
    return out


def make_new_case():
    """Write hess_smooth_cnn with make_fixtures.process (patched in memory only)."""
    orig_build, orig_ranges = mf.build_case, mf.check_activation_ranges

    def build(name):
        return build_smooth_cnn() if name == NEW_CASE else orig_build(name)

    def ranges(model, x):
        return smooth_ranges(model, x)

    mf.build_case, mf.check_activation_ranges = build, ranges
    try:
        lines: list[str] = []
        ok = mf.process(NEW_CASE, lines)
    finally:
        mf.build_case, mf.check_activation_ranges = orig_build, orig_ranges
    return ok, lines


# --------------------------------------------------------------------------
# loading a case from its files
# --------------------------------------------------------------------------

def layer_from_spec(s):
    t = s["type"]
    if t == "Linear":
        return nn.Linear(s["in_features"], s["out_features"], bias=s["bias"])
    if t == "Conv2d":
        pad = s["padding"] if isinstance(s["padding"], str) else tuple(s["padding"])
        return nn.Conv2d(s["in_channels"], s["out_channels"], tuple(s["kernel_size"]),
                         stride=tuple(s["stride"]), padding=pad, dilation=tuple(s["dilation"]),
                         groups=s["groups"], bias=s["bias"], padding_mode=s["padding_mode"])
    if t == "Flatten":
        return nn.Flatten(s["start_dim"], s["end_dim"])
    if t in ("ReLU", "Tanh", "Sigmoid", "SiLU", "Identity"):
        return getattr(nn, t)()
    if t == "Softplus":
        return nn.Softplus(beta=s["beta"], threshold=s["threshold"])
    if t == "ELU":
        return nn.ELU(alpha=s["alpha"])
    if t == "LeakyReLU":
        return nn.LeakyReLU(negative_slope=s["negative_slope"])
    if t == "GELU":
        return nn.GELU(approximate=s["approximate"])
    if t == "Dropout":
        return nn.Dropout(p=s["p"])
    if t == "MaxPool2d":
        return nn.MaxPool2d(tuple(s["kernel_size"]), stride=tuple(s["stride"]),
                            padding=tuple(s["padding"]), dilation=tuple(s["dilation"]),
                            ceil_mode=s["ceil_mode"])
    if t == "AvgPool2d":
        return nn.AvgPool2d(tuple(s["kernel_size"]), stride=tuple(s["stride"]),
                            padding=tuple(s["padding"]), ceil_mode=s["ceil_mode"],
                            count_include_pad=s["count_include_pad"],
                            divisor_override=s["divisor_override"])
    raise ValueError(f"unknown layer type {t}")


def load_case(name):
    d = os.path.join(OUT_ROOT, name)
    with open(os.path.join(d, "model.json")) as fh:
        spec = json.load(fh)
    with open(os.path.join(d, "meta.json")) as fh:
        meta = json.load(fh)
    model = nn.Sequential(*[layer_from_spec(s) for s in spec["layers"]])
    model.load_state_dict(load_file(os.path.join(d, "weights.safetensors")), strict=True)
    model = model.eval()
    data = np.load(os.path.join(d, "data.npz"))
    x = torch.from_numpy(data["x"]).to(torch.float64)
    lik = meta["likelihood"]
    y = torch.from_numpy(data["y"])
    y = y.long() if lik == "classification" else y.to(torch.float64)
    sub = os.path.join(d, "subnetwork.npy")
    idx = np.load(sub).astype(np.int64) if os.path.exists(sub) else None
    expected = load_file(os.path.join(d, "expected.safetensors"))
    return dict(name=name, dir=d, model=model, x=x, y=y, likelihood=lik, C=meta["n_outputs"],
                subnet_idx=idx, expected=expected, meta=meta)


# --------------------------------------------------------------------------
# definition (torch.func)
# --------------------------------------------------------------------------

def definition(case):
    model, x, y, lik = case["model"], case["x"], case["y"], case["likelihood"]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].reshape(-1) for n in names])
    P = theta.numel()

    def unflat(t):
        return {n: c.reshape(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}

    def L(t):
        f = functional_call(model, unflat(t), (x,))
        if lik == "regression":
            return 0.5 * ((y - f) ** 2).sum()
        return -torch.log_softmax(f, -1).gather(-1, y.reshape(-1, 1)).sum()

    # the loss as a sum of make_fixtures' per-point nll (same definition as the other fixtures)
    with torch.no_grad():
        f = model(x)
        loss_pp = sum(mf.nll_single(f[n], y[n], lik) for n in range(x.shape[0]))
    loss = L(theta).detach()
    assert mf.rel(loss, loss_pp) < 1e-14, (loss, loss_pp)

    H = torch.func.hessian(L)(theta).detach()
    sym_err = mf.rel(H, H.T)

    # last layer (the final Linear is the last module, so its parameters are the tail of theta)
    last_idx = len(model) - 1
    assert isinstance(model[last_idx], nn.Linear)
    ll_names = [n for n in names if n.startswith(f"{last_idx}.")]
    P_ll = sum(params[n].numel() for n in ll_names)
    lo = P - P_ll
    H_ll = torch.func.hessian(lambda t: L(torch.cat([theta[:lo], t])))(theta[lo:]).detach()

    # subnetwork: Hessian with respect to the S coordinates only (not by slicing H)
    H_sub = None
    idx = case["subnet_idx"]
    if idx is not None:
        it = torch.as_tensor(idx)
        H_sub = torch.func.hessian(lambda dl: L(theta.index_add(0, it, dl)))(
            torch.zeros(len(idx))).detach()

    # Hessian-vector product: forward-over-reverse, never forms H
    rng = np.random.default_rng(_seed(case["name"]) + 2)
    v = torch.from_numpy(rng.standard_normal(P))
    _, Hv = jvp(grad(L), (theta,), (v,))
    Hv = Hv.detach()

    # central finite differences of the gradient (column i = (g(t + h e_i) - g(t - h e_i)) / 2h)
    g = grad(L)
    E = torch.eye(P) * FD_STEP
    H_fd = (torch.func.vmap(g)(theta + E) - torch.func.vmap(g)(theta - E)).T / (2 * FD_STEP)
    Hv_fd = (g(theta + FD_STEP * v) - g(theta - FD_STEP * v)) / (2 * FD_STEP)

    info = dict(P=P, P_ll=P_ll, lo=lo, last_idx=last_idx, ll_names=ll_names, names=names,
                sizes=sizes, theta=theta, L=L, sym_err=sym_err, H_fd=H_fd.detach(),
                Hv_fd=Hv_fd.detach())
    return dict(loss=loss, H=H, H_ll=H_ll, H_sub=H_sub, v=v, Hv=Hv), info


# --------------------------------------------------------------------------
# laplace-torch
# --------------------------------------------------------------------------

def run_backends(case, info):
    """Records (key, label, value-or-None, error-or-None, loss-or-None)."""
    model, x, y, lik, C = case["model"], case["x"], case["y"], case["likelihood"], case["C"]
    recs = []

    def fresh(last_layer=False):
        m = copy.deepcopy(model)
        m.output_size = C
        if last_layer:
            m = FeatureExtractor(m, last_layer_name=str(info["last_idx"]))
            m.output_size = C
        return m

    def attempt(key, label, make):
        try:
            loss, H = make().full(x, y)
            recs.append((key, label, H.detach().clone(), None, loss.detach().reshape(1).clone()))
        except Exception as e:  # noqa: BLE001 - record everything
            recs.append((key, label, None, mf.short_err(e), None))

    for bname, cls in BACKENDS.items():
        attempt("hessian.full", f"{bname}:{cls.__name__}.full",
                lambda: cls(fresh(), lik))
        attempt("last_layer.hessian.full", f"{bname}:{cls.__name__}.full(last_layer=True)",
                lambda: cls(fresh(True), lik, last_layer=True))
        if case["subnet_idx"] is not None:
            it = torch.as_tensor(case["subnet_idx"])
            attempt("subnetwork.hessian.full", f"{bname}:{cls.__name__}.full(subnetwork_indices=)",
                    lambda: cls(fresh(), lik, subnetwork_indices=it))

            # as SubnetLaplace does it: attribute set after construction
            def attr(cls=cls, it=it):
                b = cls(fresh(), lik)
                b.subnetwork_indices = it
                return b
            attempt("subnetwork.hessian.full", f"{bname}(attr):{cls.__name__}.full", attr)
    return recs


def run_laplace_level(case):
    """End to end: Laplace(..., hessian_structure='full', backend=...).fit(); la.H."""
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y, lik = case["model"], case["x"], case["y"], case["likelihood"]
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    subsets = {"all": "hessian.full", "last_layer": "last_layer.hessian.full"}
    if case["subnet_idx"] is not None:
        subsets["subnetwork"] = "subnetwork.hessian.full"
    recs = []
    for bname, cls in BACKENDS.items():
        for subset, key in subsets.items():
            label = f"{bname}:Laplace({subset},full,{cls.__name__}).H"
            try:
                kw = {}
                if subset == "subnetwork":
                    kw["subnetwork_indices"] = torch.as_tensor(case["subnet_idx"])
                la = Laplace(copy.deepcopy(model), lik, subset_of_weights=subset,
                             hessian_structure="full", backend=cls, **kw)
                la.fit(loader)
                recs.append((key, label, la.H.detach().clone(), None, la.loss.detach().reshape(1).clone()))
            except Exception as e:  # noqa: BLE001
                recs.append((key, label, None, mf.short_err(e), None))
    return recs


# --------------------------------------------------------------------------
# Hessian vs GGN
# --------------------------------------------------------------------------

def block_analysis(H, GGN, info):
    """Where does H - GGN live?  Per pair of parameter tensors, relative to ||H||."""
    names, sizes = info["names"], info["sizes"]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    D = H - GGN
    nH = float(torch.linalg.norm(H))
    within, cross, nonzero_pairs = 0.0, 0.0, []
    for a in range(len(names)):
        for b in range(len(names)):
            blk = D[offs[a]:offs[a + 1], offs[b]:offs[b + 1]]
            nb = float(torch.linalg.norm(blk))
            la, lb = names[a].split(".")[0], names[b].split(".")[0]
            if la == lb:
                within = max(within, nb / nH)
            else:
                cross = max(cross, nb / nH)
            if nb / nH > 1e-12 and a <= b:
                nonzero_pairs.append(f"({names[a]}, {names[b]}): {r3(nb / nH)}")
    return {
        "rel_frobenius_H_minus_GGN": r3(mf.rel(GGN, H)),
        "rel_diag_H_minus_GGN": r3(mf.rel(torch.diagonal(GGN), torch.diagonal(H))),
        "max_rel_block_same_layer": r3(within),
        "max_rel_block_different_layers": r3(cross),
        "blocks_with_rel_norm_of_H_minus_GGN_above_1e-12": nonzero_pairs,
    }


def piecewise_linear_residual(case, info, H, GGN):
    """Closed form of H - GGN for Linear -> act -> Linear with a piecewise-linear act.

    H = GGN + sum_n sum_c r_nc d^2 f_c / dtheta^2, r = dl/df.  With sigma'' = 0 a.e. the
    only non-zero second derivatives of f_c are the bilinear cross terms
    d^2 f_c / dW2[c,j] dW1[j,k] = sigma'(z_j) x_k and d^2 f_c / dW2[c,j] db1[j] = sigma'(z_j).
    """
    model, x, y, lik = case["model"], case["x"], case["y"], case["likelihood"]
    lin1, act, lin2 = model[0], model[1], model[2]
    with torch.no_grad():
        z = lin1(x)
        f = model(x)
        if isinstance(act, nn.ReLU):
            sp = (z > 0).double()
        elif isinstance(act, nn.LeakyReLU):
            sp = torch.where(z > 0, 1.0, act.negative_slope)
        elif isinstance(act, nn.Identity):
            sp = torch.ones_like(z)
        else:
            raise TypeError(act)
        r = torch.softmax(f, -1) - nn.functional.one_hot(y, f.shape[1]).double() \
            if lik == "classification" else f - y
    Hh, Din = lin1.weight.shape
    C = lin2.weight.shape[0]
    P = info["P"]
    R = torch.zeros(P, P)
    o_w1, o_b1, o_w2 = 0, Hh * Din, Hh * Din + Hh
    # W2[c,j] x W1[j,k]
    blk = torch.einsum("nc,nj,nk->cjk", r, sp, x)
    for c in range(C):
        for j in range(Hh):
            row = o_w2 + c * Hh + j
            R[row, o_w1 + j * Din:o_w1 + (j + 1) * Din] = blk[c, j]
            R[row, o_b1 + j] = (r[:, c] * sp[:, j]).sum()
    R = R + R.T
    return dict(
        closed_form_residual_vs_H_minus_GGN=r3(mf.rel(GGN + R, H)),
        rel_norm_residual=r3(float(torch.linalg.norm(R) / torch.linalg.norm(H))),
        min_abs_preactivation=r3(float(z.abs().min())),
    )


# --------------------------------------------------------------------------
# main per case
# --------------------------------------------------------------------------

def process_case(name, extra=None):
    case = load_case(name)
    model, x = case["model"], case["x"]
    with torch.no_grad():
        f = model(x)
    f_err = mf.rel(f, case["expected"]["jacobians.f"])
    assert f_err < 1e-13, f"{name}: rebuilt model outputs differ from jacobians.f ({f_err})"

    d, info = definition(case)
    recs = run_backends(case, info) + run_laplace_level(case)
    idx = case["subnet_idx"]

    refs = {"hessian.full": d["H"], "last_layer.hessian.full": d["H_ll"]}
    if idx is not None:
        refs["subnetwork.hessian.full"] = d["H_sub"]
    out, keys_meta, ok = {}, {}, True
    backend_losses = []
    for key, ref in refs.items():
        agree, disagree, failed = [], {}, {}
        for k, label, val, err, loss in recs:
            if k != key:
                continue
            if err is not None:
                failed[label] = err
                continue
            if loss is not None:
                backend_losses.append((label, loss))
            if tuple(val.shape) != tuple(ref.shape):
                disagree[label] = f"shape {tuple(val.shape)} != expected {tuple(ref.shape)}"
                continue
            e = mf.rel(val, ref)
            if e <= RTOL:
                agree.append((label, e, val, loss))
            else:
                ratio = float((val * ref).sum() / (ref * ref).sum())
                disagree[label] = (f"rel err {e:.1e}; best-fit ratio {ratio:.6g} "
                                   f"(residual {mf.rel(val, ratio * ref):.1e})")
        direct = [a for a in agree if "Laplace(" not in a[0] and "(attr)" not in a[0]]
        direct.sort(key=lambda a: PRIORITY.index(a[0].split(":")[0]))
        entry = {}
        if direct:
            chosen = direct[0]
            out[key] = chosen[2].contiguous()
            entry["source"] = f"laplace-torch {chosen[0]}"
            if key == "hessian.full":
                out["hessian.loss"] = chosen[3].contiguous()
                keys_meta["hessian.loss"] = {"source": f"laplace-torch {chosen[0]} (returned loss)"}
        elif key == "subnetwork.hessian.full":
            # laplace-torch has no subnetwork Hessian: the laplace-torch full Hessian,
            # restricted to the indices (in the order given), is written instead
            it = torch.as_tensor(idx)
            Hf = out["hessian.full"]
            val = Hf[it][:, it].contiguous()
            e = mf.rel(val, ref)
            src = keys_meta["hessian.full"]["source"]
            if e <= RTOL:
                out[key] = val
                entry["source"] = (f"{src}, restricted to the subnetwork indices in the given order "
                                   "(H[idx][:, idx]); no laplace-torch Hessian backend supports "
                                   "subnetwork_indices")
                agree.append((f"{src}[idx][:, idx]", e, val, None))
            else:
                ok = False
                out[key] = ref.contiguous()
                entry["source"] = "torch.func definition (NO laplace-torch value agreed)"
        else:
            ok = False
            out[key] = ref.contiguous()
            entry["source"] = "torch.func definition (NO laplace-torch value agreed)"
        entry["agree_rel_frobenius_vs_definition"] = {a[0]: r3(a[1]) for a in agree}
        entry["disagree"] = disagree
        entry["failed"] = failed
        keys_meta[key] = entry

    # the loss
    loss_errs = {lbl: r3(mf.rel(lv, d["loss"].reshape(1))) for lbl, lv in backend_losses}
    loss_ok = all(e <= RTOL for e in loss_errs.values())
    if "hessian.loss" not in out:
        out["hessian.loss"] = d["loss"].reshape(1).clone()
        keys_meta["hessian.loss"] = {"source": "torch.func definition (no backend)"}
        ok = False
    keys_meta["hessian.loss"].update(
        agree_rel_vs_definition_sum_l=r3(mf.rel(out["hessian.loss"], d["loss"].reshape(1))),
        rel_vs_expected_loss=r3(mf.rel(out["hessian.loss"], case["expected"]["loss"])),
        every_backend_loss_rel_vs_definition=loss_errs,
    )
    ok &= loss_ok and keys_meta["hessian.loss"]["rel_vs_expected_loss"] <= RTOL

    out["hessian.diag"] = torch.diagonal(out["hessian.full"]).clone().contiguous()
    keys_meta["hessian.diag"] = {
        "source": f"diagonal of hessian.full ({keys_meta['hessian.full']['source']})",
        "agree_rel_vs_definition_diagonal": r3(mf.rel(out["hessian.diag"], torch.diagonal(d["H"]))),
    }
    out["hvp.v"] = d["v"].contiguous()
    out["hvp.Hv"] = d["Hv"].contiguous()
    hv_vs_full = mf.rel(d["Hv"], d["H"] @ d["v"])
    hv_vs_written = mf.rel(d["Hv"], out["hessian.full"] @ d["v"])
    keys_meta["hvp.v"] = {"source": "numpy default_rng(seed(case) + 2).standard_normal(P), "
                                    "seed(case) = sha256(name)[:8] mod 2^31 as in make_fixtures.py"}
    keys_meta["hvp.Hv"] = {
        "source": "torch.func jvp(grad(L), (theta,), (v,)) (forward-over-reverse; H never formed)",
        "rel_vs_definition_H_at_v": r3(hv_vs_full),
        "rel_vs_written_hessian_full_at_v": r3(hv_vs_written),
        "rel_vs_finite_difference_of_gradient": r3(mf.rel(info["Hv_fd"], d["Hv"])),
    }
    ok &= hv_vs_written <= RTOL

    # consistency checks
    H = d["H"]
    lo = info["lo"]
    GGN = case["expected"]["ggn.full"]
    checks = {
        "rebuilt_model_outputs_vs_expected_jacobians.f": r3(f_err),
        "definition_symmetry_rel_H_minus_HT": r3(info["sym_err"]),
        "last_layer_definition_vs_H_tail_block": r3(mf.rel(d["H_ll"], H[lo:, lo:])),
        "last_layer_hessian_vs_expected_last_layer.ggn.full": r3(
            mf.rel(out["last_layer.hessian.full"], case["expected"]["last_layer.ggn.full"])),
        "finite_difference_vs_definition": r3(mf.rel(info["H_fd"], H)),
        "finite_difference_step": FD_STEP,
    }
    if idx is not None:
        it = torch.as_tensor(idx)
        checks["subnetwork_definition_vs_H_idx_idx"] = r3(mf.rel(d["H_sub"], H[it][:, it]))
    ok &= checks["last_layer_definition_vs_H_tail_block"] <= RTOL
    ev = torch.linalg.eigvalsh(out["hessian.full"])
    scale = float(ev.abs().max())
    checks["eigenvalues_of_hessian.full"] = {
        "min": r3(float(ev.min())), "max": r3(float(ev.max())),
        "n_below_minus_1e-10_max_abs": int((ev < -1e-10 * scale).sum()),
        "n_above_1e-10_max_abs": int((ev > 1e-10 * scale).sum()),
    }
    hvg = block_analysis(out["hessian.full"], GGN, info)
    if name in ("act_relu", "act_leakyrelu", "act_identity"):
        hvg["piecewise_linear_closed_form"] = piecewise_linear_residual(case, info, H, GGN)

    for k, v in out.items():
        assert v.dtype == torch.float64 and torch.isfinite(v).all(), k
    save_file(out, os.path.join(case["dir"], "hessian.safetensors"))
    meta = {
        "case": name,
        "likelihood": case["likelihood"],
        "n_params": info["P"],
        "n_params_last_layer": info["P_ll"],
        "n_subnetwork": None if idx is None else int(len(idx)),
        "definition": ("H = torch.func.hessian of L(theta) = sum_n l_n, l = 1/2||y-f||^2 "
                       "(regression) or -log softmax(f)_y (classification); last layer: Hessian "
                       "w.r.t. the final Linear's parameters only; subnetwork: Hessian w.r.t. the "
                       "given coordinates only (theta.index_add(0, idx, delta) at delta = 0)"),
        "scaling": ("laplace-torch returns factor * Hessian(lossfunc) with MSELoss(sum), factor "
                    "0.5 (regression) / CrossEntropyLoss(sum), factor 1 (classification): this "
                    "is exactly the Hessian of sum_n l_n, so nothing is converted (best-fit ratio "
                    "1 in every agreeing call)"),
        "keys": keys_meta,
        "checks": checks,
        "hessian_vs_ggn": hvg,
    }
    if extra:
        meta.update(extra)
    with open(os.path.join(case["dir"], "hessian_meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    for fn in ("hessian.safetensors", "hessian_meta.json"):
        os.chmod(os.path.join(case["dir"], fn), 0o644)
    n_agree = sum(len(v.get("agree_rel_frobenius_vs_definition", {})) for v in keys_meta.values())
    n_fail = sum(len(v.get("failed", {})) for v in keys_meta.values())
    n_dis = sum(len(v.get("disagree", {})) for v in keys_meta.values())
    print(f"{name}: P={info['P']} agree={n_agree} disagree={n_dis} failed={n_fail} "
          f"|H-GGN|/|H|={hvg['rel_frobenius_H_minus_GGN']:.2e} "
          f"fd={checks['finite_difference_vs_definition']:.1e} ok={ok}", flush=True)
    return ok


def main():
    ok, lines = make_new_case()
    if not ok:
        print(f"{NEW_CASE}: make_fixtures.process reported a value not tied to laplace-torch",
              file=sys.stderr)
    cases = sorted(c for c in os.listdir(OUT_ROOT)
                   if os.path.exists(os.path.join(OUT_ROOT, c, "meta.json")))
    all_ok = ok
    extra = {NEW_CASE: {"make_fixtures_crosscheck_of_expected.safetensors": [
        ln for ln in "\n".join(lines).split("\n") if ln.strip()]}}
    for name in cases:
        all_ok &= process_case(name, extra.get(name))
    total = 0
    for c in cases:
        for fn in ("hessian.safetensors", "hessian_meta.json"):
            total += os.path.getsize(os.path.join(OUT_ROOT, c, fn))
    new = sum(os.path.getsize(os.path.join(OUT_ROOT, NEW_CASE, f))
              for f in os.listdir(os.path.join(OUT_ROOT, NEW_CASE)))
    print(f"hessian files: {total} bytes; {NEW_CASE} directory: {new} bytes "
          f"(overlap: its hessian files)")
    if not all_ok:
        print("SOME WRITTEN VALUES ARE NOT TIED TO A LAPLACE-TORCH RESULT", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
