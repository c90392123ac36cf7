#!/usr/bin/env python
"""Reference fixtures of laplace-rs for LARGE graph models (torchvision resnet18 and
mobilenet_v3_small) with synthetic, formula-generated weights.

    venv/bin/python tools/reference/make_large_graph_fixtures.py                 # both cases
    venv/bin/python tools/reference/make_large_graph_fixtures.py mobilenet_v3_small

Written to ``crates/laplace/tests/fixtures/graph_large/<case>/``: ``model.json`` (from
``laplace_export.export``; the exported ``weights.safetensors`` is checked bit-for-bit
against the formula and then DELETED: 45-90 MB), ``data.npz``, ``subnetwork.npy``,
``last_layer_block.npy``, ``meta.json``, ``expected.safetensors``.

Weights and inputs: ``synthetic.py`` (formula ``synthetic-sin-v2``); the Rust test
regenerates them. Float64, eval mode, classification, C = 3, M = 2.

Every value comes from a laplace-torch call (GGNInterface / EFInterface, torch.func
backends, with ``subnetwork_indices`` or ``FeatureExtractor`` + ``last_layer=True``) and is
compared with this file's own definition at rel 1e-10 (whole network: autograd, one
backward per output / per point; subnetwork and last layer: torch.func over the
selected coordinates only, as make_graph_fixtures.py). The subnetwork Hessian is the
torch.func forward-over-reverse Hessian (``jvp`` of ``grad``, vmapped over the S unit
vectors in chunks, i.e. ``torch.func.hessian`` = jacfwd(jacrev) column by column)
w.r.t. the S coordinates only, cross-checked with reverse-over-reverse autograd.
The script exits non-zero on any disagreement. See README_graph.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, HERE)
from laplace_export import export  # noqa: E402
import graph_interp  # noqa: E402
from make_graph_fixtures import (fmt, lambda_of, last_linear, layout, nll_vec, rel,  # noqa: E402
                                 round3, twice_differentiable, write_json)
import synthetic  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.set_num_threads(max(1, os.cpu_count() or 1))

OUT_ROOT = os.path.join(REPO, "crates", "laplace", "tests", "fixtures", "graph_large")
RTOL = 1e-10
CASES = ["resnet18", "mobilenet_v3_small"]
M, C, LIK = 2, 3, "classification"
N_SUB_TENSORS, N_SUB = 40, 100
N_LL_BLOCK = 43                   # per output row: weight entries in the last-layer block
HESS_CHUNK = 20


def seed_of(name):
    return int(hashlib.sha256(("graph_large/" + name).encode()).hexdigest()[:8], 16) % (2**31)


def build_case(name):
    import torchvision
    mk = {"resnet18": torchvision.models.resnet18,
          "mobilenet_v3_small": torchvision.models.mobilenet_v3_small}[name]
    model = mk(weights=None, num_classes=C).to(torch.float64).eval()
    synthetic.synthetic_state_dict(model)
    x, y = synthetic.synthetic_inputs(M, C)
    desc = {"resnet18": "torchvision.models.resnet18(weights=None, num_classes=3)",
            "mobilenet_v3_small": "torchvision.models.mobilenet_v3_small(weights=None, "
                                  "num_classes=3) (Hardswish, SE with ReLU/Hardsigmoid, "
                                  "Dropout inactive in eval)"}[name]
    return dict(name=name, model=model, x=x, y=y, seed=seed_of(name),
                description=desc + ", float64, eval mode, synthetic weights "
                f"({synthetic.FORMULA}, tools/reference/synthetic.py), input (3,32,32)")


def make_subnet(model, ll, seed, alive):
    """~N_SUB unsorted indices over N_SUB_TENSORS tensors spread over theta (BN weights
    and biases included) plus the whole final Linear (weight and bias). Only coordinates
    with a nonzero Jacobian column (``alive``; dead ReLU channels give exact zeros) are
    drawn, from tensors with at least 2 such coordinates."""
    rng = np.random.default_rng(seed)
    lay, P = layout(model)
    names = [n for n, *_ in lay]
    ll_t = [i for i, n in enumerate(names) if n.rsplit(".", 1)[0] == ll]
    others = [i for i in range(len(lay)) if i not in ll_t
              and alive[lay[i][1]:lay[i][1] + lay[i][2]].sum() >= 2]
    pick = sorted(set(np.round(np.linspace(0, len(others) - 1, N_SUB_TENSORS - len(ll_t)))
                      .astype(int).tolist()))
    chosen = [others[i] for i in pick] + ll_t
    counts = {t: min(lay[t][2], 2) for t in chosen}
    # the rest to the final Linear weight (all its bias entries already: C <= 3)
    for t in ll_t:
        counts[t] = min(lay[t][2], 3)
    counts[ll_t[0]] += N_SUB - sum(counts.values())
    picks = [lay[t][1] + rng.choice(np.nonzero(alive[lay[t][1]:lay[t][1] + lay[t][2]])[0],
                                    size=counts[t], replace=False) for t in chosen]
    idx = rng.permutation(np.concatenate(picks))
    while np.all(np.diff(idx) > 0):
        idx = rng.permutation(idx)
    assert len(np.unique(idx)) == len(idx)
    return idx.astype(np.int64)


# --------------------------------------------------------------------------
# definitions
# --------------------------------------------------------------------------

def whole_definition(model, x, y, lay):
    """Whole-network J (M,C,P), per-point gradients G (M,P) by plain autograd (one backward
    per output / per point); GGN and EF diagonals."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    f = m(x)
    rows = []
    for n in range(M):
        for c in range(C):
            g = torch.autograd.grad(f[n, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    J = torch.stack(rows).reshape(M, C, -1)
    del rows
    Lam = lambda_of(f.detach(), LIK)
    ggn_diag = torch.einsum("ncp,nck,nkp->p", J, Lam, J)
    lv = nll_vec(f, y, LIK)
    G = torch.stack([torch.cat([t.reshape(-1) for t in
                                torch.autograd.grad(lv[n], params, retain_graph=n < M - 1)])
                     for n in range(M)])
    ef_diag = (G * G).sum(0)
    return dict(f=f.detach(), loss=lv.sum().detach().reshape(1), J=J, G=G,
                ggn_diag=ggn_diag, ef_diag=ef_diag)


def per_tensor(diag, lay):
    return torch.stack([diag[o:o + k].sum() for n, o, k, s in lay])


class Coords:
    """theta as a function of a free vector u over some coordinates of theta (u0 = 0:
    theta + scatter(u)); only the touched tensors depend on u."""

    def __init__(self, model, idx):
        self.model = model
        self.base = {n: p.detach() for n, p in model.named_parameters()}
        lay, _ = layout(model)
        idx = np.asarray(idx)
        self.parts = []   # (name, positions in u, local flat indices)
        for n, o, k, s in lay:
            pos = np.nonzero((idx >= o) & (idx < o + k))[0]
            if len(pos):
                self.parts.append((n, torch.as_tensor(pos), torch.as_tensor(idx[pos] - o)))
        self.S = len(idx)

    def params(self, u):
        d = dict(self.base)
        for n, pos, loc in self.parts:
            p = self.base[n]
            d[n] = p.reshape(-1).index_add(0, loc, u[pos]).reshape(p.shape)
        return d

    def fwd(self, u, x):
        return functional_call(self.model, self.params(u), (x,))


def coords_definition(model, x, y, idx, hessian):
    co = Coords(model, idx)
    u0 = torch.zeros(co.S)
    f = co.fwd(u0, x).detach()
    J = jacrev(lambda u: co.fwd(u, x))(u0).detach()
    G = jacrev(lambda u: nll_vec(co.fwd(u, x), y, LIK))(u0).detach()
    Lam = lambda_of(f, LIK)
    out = dict(J=J, G=G, ggn=torch.einsum("ncp,nck,nkq->pq", J, Lam, J), ef=G.T @ G)
    if hessian:
        def L(u):
            return nll_vec(co.fwd(u, x), y, LIK).sum()
        E = torch.eye(co.S)
        cols = []
        with twice_differentiable():
            gL = grad(L)
            for a in range(0, co.S, HESS_CHUNK):
                cols.append(vmap(lambda v: jvp(gL, (u0,), (v,))[1])(E[a:a + HESS_CHUNK])
                            .detach())
        out["H"] = torch.cat(cols)            # row a = H e_a (H symmetric)
        # cross-check: reverse-over-reverse, plain autograd
        u = torch.zeros(co.S, requires_grad=True)
        with twice_differentiable():
            g1 = torch.autograd.grad(L(u), u, create_graph=True)[0]
            H2 = torch.stack([torch.autograd.grad(g1[a], u, retain_graph=a < co.S - 1)[0]
                              for a in range(co.S)])
        out["H_ror"] = H2.detach()
    return out


# --------------------------------------------------------------------------
# non-differentiable points
# --------------------------------------------------------------------------

def kink_margins(model, x):
    """Smallest distance of a ReLU input to 0, Hardswish / Hardsigmoid input to +-3, and
    of max-pool windows' top-2 gap (ties make the derivative ambiguous)."""
    res = {"relu_to_0": float("inf"), "hardswish_to_pm3": float("inf"),
           "hardsigmoid_to_pm3": float("inf"), "maxpool_top2_gap": float("inf")}
    hooks = []

    def upd(k, v):
        res[k] = min(res[k], float(v))

    for n, mod in model.named_modules():
        if isinstance(mod, nn.ReLU):
            hooks.append(mod.register_forward_pre_hook(
                lambda m_, i: upd("relu_to_0", i[0].abs().min())))
        elif isinstance(mod, nn.Hardswish):
            hooks.append(mod.register_forward_pre_hook(
                lambda m_, i: upd("hardswish_to_pm3", (i[0].abs() - 3).abs().min())))
        elif isinstance(mod, nn.Hardsigmoid):
            hooks.append(mod.register_forward_pre_hook(
                lambda m_, i: upd("hardsigmoid_to_pm3", (i[0].abs() - 3).abs().min())))
        elif isinstance(mod, nn.MaxPool2d):
            def mp(m_, i):
                u = F.unfold(i[0], m_.kernel_size, padding=m_.padding, stride=m_.stride)
                # unfold pads with 0 (torch's max-pool with -inf): only windows with a
                # positive maximum count (a ReLU-zero maximum has derivative 0 either way)
                t = torch.topk(u.reshape(i[0].shape[0], i[0].shape[1], -1, u.shape[-1]),
                               2, dim=2).values
                gap = (t[:, :, 0] - t[:, :, 1])[t[:, :, 0] > 0]
                if gap.numel():
                    upd("maxpool_top2_gap", gap.min())
            hooks.append(mod.register_forward_pre_hook(mp))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {k: v for k, v in res.items() if v != float("inf")}


def activation_report(model, x):
    """BN input batch statistics vs running statistics, output spread."""
    stats = []

    def hook(mod, inp, out, n):
        a = inp[0]
        stats.append(dict(bn=n, var_ratio=float(a.var((0, 2, 3)).mean() / mod.running_var.mean()),
                          in_std=float(a.std()), out_std=float(out.std())))
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
             for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    with torch.no_grad():
        f = model(x)
    for h in hooks:
        h.remove()
    vr = [s["var_ratio"] for s in stats]
    return dict(
        finite=bool(torch.isfinite(f).all()),
        f_std_over_classes=float(f.std(1).mean()),
        f_sample_difference=float((f[0] - f[1]).abs().max()),
        f_abs_max=float(f.abs().max()),
        n_bn=len(stats),
        bn_input_var_over_running_var={"min": min(vr), "median": float(np.median(vr)),
                                       "max": max(vr), "first": vr[0], "last": vr[-1]},
    )


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def process(name):
    from laplace.curvature import EFInterface, GGNInterface
    from laplace.utils import FeatureExtractor
    from safetensors.torch import load_file, save_file
    t0 = time.time()
    case = build_case(name)
    model, x, y = case["model"], case["x"], case["y"]
    lay, P = layout(model)
    ll = last_linear(model, x)
    ll_names = [n for n, *_ in lay if n.rsplit(".", 1)[0] == ll]
    ll_idx = np.concatenate([np.arange(o, o + k) for n, o, k, s in lay if n in ll_names])
    P_ll = len(ll_idx)
    D_ll = dict(model.named_modules())[ll].in_features
    blk = np.concatenate([c * D_ll + np.round(np.linspace(0, D_ll - 1, N_LL_BLOCK)).astype(int)
                          for c in range(C)] + [np.arange(C * D_ll, C * D_ll + C)]).astype(np.int64)
    act = activation_report(model, x)
    kinks = kink_margins(model, x)
    print(f"{name}: P={P} P_ll={P_ll} last layer={ll}", flush=True)
    print(f"  activations: {act}", flush=True)
    print(f"  kink margins: {kinks}", flush=True)
    assert act["finite"]

    out = os.path.join(OUT_ROOT, name)
    os.makedirs(out, exist_ok=True)
    for fn in os.listdir(out):
        os.remove(os.path.join(out, fn))
    spec = export(model, x, out)
    wpath = os.path.join(out, "weights.safetensors")
    g = graph_interp.GraphModel.load(out)
    with torch.no_grad():
        f_mod, f_int = model(x), g(x)
    e_int = rel(f_int, f_mod)
    assert e_int <= 1e-12, f"{name}: interpreter vs module rel {e_int}"
    W = load_file(wpath)
    n_bad = sum(int((W[k] != torch.from_numpy(synthetic.synthetic_tensor(k, W[k].shape))).sum())
                for k in W)
    assert n_bad == 0, f"{name}: exported weights differ from the formula at {n_bad} elements"
    assert set(W) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    n_weights, w_bytes = len(W), os.path.getsize(wpath)
    del W, g
    os.remove(wpath)
    print(f"  export: {len(spec['nodes'])} nodes, interpreter rel {fmt(e_int)}; weights "
          f"({n_weights} tensors, {w_bytes} bytes) == formula, deleted  [{time.time()-t0:.0f}s]",
          flush=True)

    checks, sources, problems, expected = {}, {}, [], {}

    def put(key, val, ref, label, extra=""):
        e = rel(val, ref)
        checks[key] = e
        if e > RTOL or tuple(val.shape) != tuple(ref.shape):
            problems.append(f"{key}: {label} vs definition rel {e:.2e}, shapes "
                            f"{tuple(val.shape)} / {tuple(ref.shape)}")
        expected[key] = val.detach().clone().contiguous()
        sources[key] = f"laplace-torch {label}; agrees with the definition (rel {fmt(e)}).{extra}"

    def fresh(last=False):
        m = copy.deepcopy(model)
        m.output_size = C
        if last:
            m = FeatureExtractor(m, last_layer_name=ll)
            m.output_size = C
        return m

    # ---- whole network
    d = whole_definition(model, x, y, lay)
    print(f"  whole-network definition  [{time.time()-t0:.0f}s]", flush=True)
    alive = (d["J"].abs().amax((0, 1)) > 0).numpy()
    idx = make_subnet(model, ll, case["seed"], alive)
    touched = [n for n, o, k, s in lay if np.any((idx >= o) & (idx < o + k))]
    assert len(touched) >= 30
    assert any(n.endswith(".bias") and n.rsplit(".", 1)[0] != ll for n in touched)
    checks["fraction of theta with a zero Jacobian column (dead units)"] = float(1 - alive.mean())
    print(f"  subnetwork: S={len(idx)} over {len(touched)} tensors; zero-Jacobian fraction of "
          f"theta {1 - alive.mean():.3f}", flush=True)
    Jl, fl = GGNInterface(fresh(), LIK).jacobians(x)
    checks["whole.jacobians.J (not stored)"] = rel(Jl, d["J"])
    if checks["whole.jacobians.J (not stored)"] > RTOL:
        problems.append(f"whole J rel {checks['whole.jacobians.J (not stored)']:.2e}")
    put("jacobians.f", fl, d["f"], "GGNInterface(model).jacobians(x)[1]")
    del Jl
    loss_g, Dg = GGNInterface(fresh(), LIK).diag(x, y)
    checks["whole.ggn.diag (not stored)"] = rel(Dg, d["ggn_diag"])
    put("loss", loss_g.reshape(1), d["loss"], "GGNInterface(model).diag(x, y)[0] "
        "(CrossEntropyLoss(reduction='sum'))")
    put("ggn.diag.per_tensor", per_tensor(Dg, lay), per_tensor(d["ggn_diag"], lay),
        "GGNInterface(model).diag(x, y)[1] summed over each tensor of named_parameters()",
        f" Elementwise (P={P}) agreement of the whole diagonal: rel "
        f"{fmt(checks['whole.ggn.diag (not stored)'])}.")
    sub_ggn_diag_from_whole = Dg[torch.as_tensor(idx)].clone()
    del Dg
    loss_e, De = EFInterface(fresh(), LIK).diag(x, y)
    checks["whole.ef.diag (not stored)"] = rel(De, d["ef_diag"])
    checks["loss[ef.diag]"] = rel(loss_e.reshape(1), d["loss"])
    put("ef.diag.per_tensor", per_tensor(De, lay), per_tensor(d["ef_diag"], lay),
        "EFInterface(model).diag(x, y)[1] summed over each tensor of named_parameters()",
        f" Elementwise (P={P}) agreement of the whole diagonal: rel "
        f"{fmt(checks['whole.ef.diag (not stored)'])}.")
    sub_ef_diag_from_whole = De[torch.as_tensor(idx)].clone()
    del De
    for k in ("whole.ggn.diag (not stored)", "whole.ef.diag (not stored)", "loss[ef.diag]"):
        if checks[k] > RTOL:
            problems.append(f"{k}: rel {checks[k]:.2e}")
    del d
    print(f"  whole-network laplace-torch  [{time.time()-t0:.0f}s]", flush=True)

    # ---- subnetwork
    it = torch.as_tensor(idx)
    ds = coords_definition(model, x, y, idx, hessian=True)
    print(f"  subnetwork definition + Hessian  [{time.time()-t0:.0f}s]", flush=True)
    Js, _ = GGNInterface(fresh(), LIK, subnetwork_indices=it).jacobians(x)
    put("subnetwork.jacobians.J", Js, ds["J"],
        "GGNInterface(model, subnetwork_indices=idx).jacobians(x)[0]")
    Gs, _ = EFInterface(fresh(), LIK, subnetwork_indices=it).gradients(x, y)
    put("subnetwork.gradients.G", Gs, ds["G"],
        "EFInterface(model, subnetwork_indices=idx).gradients(x, y)[0]")
    for kind, cls in (("ggn", GGNInterface), ("ef", EFInterface)):
        for shape in ("full", "diag"):
            loss, H = getattr(cls(fresh(), LIK, subnetwork_indices=it), shape)(x, y)
            checks[f"loss[subnetwork.{kind}.{shape}]"] = rel(loss.reshape(1), expected["loss"])
            ref = ds[kind] if shape == "full" else ds[kind].diagonal().clone()
            put(f"subnetwork.{kind}.{shape}", H, ref,
                f"{cls.__name__}(model, subnetwork_indices=idx).{shape}(x, y)[1]")
    checks["subnetwork.ggn.diag vs whole ggn.diag[idx]"] = rel(expected["subnetwork.ggn.diag"],
                                                               sub_ggn_diag_from_whole)
    checks["subnetwork.ef.diag vs whole ef.diag[idx]"] = rel(expected["subnetwork.ef.diag"],
                                                             sub_ef_diag_from_whole)
    H, H2 = ds["H"], ds["H_ror"]
    e_h = rel(H, H2)
    e_sym = rel(H, H.T)
    checks["subnetwork.hessian.full vs reverse-over-reverse"] = e_h
    checks["subnetwork.hessian.full symmetry"] = e_sym
    if e_h > RTOL or e_sym > RTOL:
        problems.append(f"subnetwork.hessian.full: ror rel {e_h:.2e}, symmetry {e_sym:.2e}")
    expected["subnetwork.hessian.full"] = H.contiguous()
    sources["subnetwork.hessian.full"] = (
        "torch.func forward-over-reverse Hessian of sum_n CE w.r.t. the S subnetwork "
        "coordinates only (functional_call on theta + scatter(u); vmap of jvp(grad(L)) over "
        f"the unit vectors in chunks of {HESS_CHUNK}, = torch.func.hessian column by column); "
        "laplace-torch has no subnetwork Hessian and the full P x P Hessian is out of reach. "
        f"Cross-check: reverse-over-reverse torch.autograd (double backward) rel {fmt(e_h)}; "
        f"symmetry rel {fmt(e_sym)}."
        + (" Hardsigmoid: F.hardsigmoid replaced by the identical clamp(x/6 + 1/2, 0, 1) for "
           "this key (torch cannot differentiate hardsigmoid_backward)."
           if name == "mobilenet_v3_small" else ""))
    if name == "mobilenet_v3_small":
        # size of torch's float32 1/6 in hardsigmoid_backward on first derivatives
        with twice_differentiable():
            ds2 = coords_definition(model, x, y, idx, hessian=False)
        checks["hardsigmoid: subnetwork J (torch hardsigmoid) vs clamp form"] = rel(ds["J"],
                                                                                   ds2["J"])
        checks["hardsigmoid: subnetwork ggn.full (torch hardsigmoid) vs clamp form"] = rel(
            ds["ggn"], ds2["ggn"])
    del ds
    print(f"  subnetwork laplace-torch  [{time.time()-t0:.0f}s]", flush=True)

    # ---- last layer
    dl = coords_definition(model, x, y, ll_idx, hessian=False)
    Jll, fll = GGNInterface(fresh(True), LIK, last_layer=True).last_layer_jacobians(x)
    lbl = f"GGNInterface(FeatureExtractor(model, last_layer_name={ll!r}), last_layer=True)"
    put("last_layer_jacobians.J", Jll, dl["J"], lbl + ".last_layer_jacobians(x)[0]")
    checks["last_layer_jacobians.f vs jacobians.f"] = rel(fll, expected["jacobians.f"])
    loss, Hll = GGNInterface(fresh(True), LIK, last_layer=True).full(x, y)
    e_ll = rel(Hll, dl["ggn"])
    checks["last_layer.ggn.full (whole matrix, not stored)"] = e_ll
    if e_ll > RTOL:
        problems.append(f"last_layer.ggn.full rel {e_ll:.2e}")
    # dense P_ll x P_ll is 19 / 76 MB: stored as diag, a principal block and an exact factor
    bt = torch.as_tensor(blk)
    put("last_layer.ggn.diag", Hll.diagonal().clone(), dl["ggn"].diagonal().clone(),
        lbl + ".full(x, y)[1].diagonal()")
    put("last_layer.ggn.block", Hll[bt][:, bt], dl["ggn"][bt][:, bt],
        lbl + ".full(x, y)[1][blk][:, blk], blk = last_layer_block.npy",
        f" Whole {P_ll}x{P_ll} matrix: rel {fmt(e_ll)}.")
    p = torch.softmax(expected["jacobians.f"], -1)
    Sq = torch.diag_embed(p.sqrt()) - torch.einsum("nc,nk->nck", p, p.sqrt())   # S S^T = Lambda
    Fct = torch.einsum("nck,ncp->nkp", Sq, Jll).reshape(M * C, P_ll)
    e_f = rel(Fct.T @ Fct, Hll)
    checks["last_layer.ggn.factor^T factor vs laplace-torch full"] = e_f
    if e_f > RTOL:
        problems.append(f"last_layer.ggn.factor rel {e_f:.2e}")
    expected["last_layer.ggn.factor"] = Fct.contiguous()
    sources["last_layer.ggn.factor"] = (
        f"(M*C, P_ll) matrix F with F^T F = last_layer.ggn.full: row n*C+k = sum_c S_n[c,k] "
        f"J_n[c,:], S_n = diag(sqrt p_n) - p_n sqrt(p_n)^T (S_n S_n^T = Lambda_n), J = "
        f"last_layer_jacobians.J; F^T F vs {lbl}.full(x, y)[1]: rel {fmt(e_f)}.")
    del dl, Hll
    print(f"  last layer  [{time.time()-t0:.0f}s]", flush=True)

    # ---- write
    for k, v in expected.items():
        assert v.dtype == torch.float64 and torch.isfinite(v).all(), k
    save_file(expected, os.path.join(out, "expected.safetensors"))
    np.savez(os.path.join(out, "data.npz"), x=x.numpy(), y=y.numpy().astype(np.int64))
    np.save(os.path.join(out, "subnetwork.npy"), idx)
    np.save(os.path.join(out, "last_layer_block.npy"), blk)
    meta = {
        "likelihood": LIK, "n_outputs": C, "n_params": P, "n_data": M,
        "input_shape": [3, 32, 32],
        "description": case["description"] + (
            f"; last layer = module '{ll}' ({P_ll} params: {', '.join(ll_names)}); "
            f"subnetwork: {len(idx)} indices, unsorted, over {len(touched)} tensors, drawn "
            f"among coordinates with a nonzero Jacobian; "
            f"seed {case['seed']}"),
        "weights": {
            "formula": synthetic.FORMULA, "module": "tools/reference/synthetic.py",
            "definition": (
                "every state-dict tensor except num_batches_tracked; k = (sum of UTF-8 bytes "
                "of name) % 97; s_i = sin(0.37*i + k) (float64, i row-major); .running_var: "
                "1 + 0.5*s_i^2; .running_mean: 0.1*s_i; .bias: 0.1 + 0.05*s_i; 1-D .weight: "
                "1 + 0.2*s_i; other .weight: sqrt(3/fan_in)*s_i, fan_in = numel/shape[0]"),
            "inputs": "x (M,3,32,32), x.flat[j] = sin(0.11*j); y[j] = j % C (int64)",
            "not_committed": f"weights.safetensors ({n_weights} tensors, {w_bytes} bytes) "
                             "checked bit-for-bit against the formula, then deleted",
        },
        "parameters": [{"name": n, "shape": list(s), "offset": o, "numel": k}
                       for n, o, k, s in lay],
        "last_layer": {"module": ll, "params": ll_names, "n_params": P_ll,
                       "in_features": D_ll, "theta_offset": int(ll_idx[0])},
        "subnetwork_tensors": touched,
        "last_layer_block": (f"last_layer_block.npy: {len(blk)} int64 indices into the "
                             "last-layer coordinates (weight row-major, then bias): "
                             f"{N_LL_BLOCK} evenly spaced weight entries per output row "
                             "and the whole bias"),
        "export_check": f"graph_interp(model.json, weights.safetensors) vs module output: rel "
                        f"{fmt(e_int)}",
        "activations": round3(act),
        "kink_margins": round3(kinks),
        "checks": round3(checks),
        "sources": sources,
        "keys": {
            "jacobians.f": "(M, C)", "loss": "[1], sum of cross-entropy",
            "ggn.diag.per_tensor": "(n_tensors,), whole GGN diagonal summed per tensor, "
                                   "named_parameters() order (meta.parameters)",
            "ef.diag.per_tensor": "(n_tensors,), same for the EF",
            "subnetwork.jacobians.J": "(M, C, S)", "subnetwork.gradients.G": "(M, S)",
            "subnetwork.{ggn,ef}.full": "(S, S)", "subnetwork.{ggn,ef}.diag": "(S,)",
            "subnetwork.hessian.full": "(S, S), Hessian w.r.t. the S coordinates",
            "last_layer_jacobians.J": f"(M, C, {P_ll})",
            "last_layer.ggn.diag": f"({P_ll},)",
            "last_layer.ggn.block": f"({len(blk)}, {len(blk)}) = full[blk][:, blk]",
            "last_layer.ggn.factor": f"({M * C}, {P_ll}), factor^T factor = last_layer.ggn.full",
        },
        "problems": problems,
    }
    for fn in os.listdir(out):
        os.chmod(os.path.join(out, fn), 0o644)
    write_json(os.path.join(out, "meta.json"), meta)
    os.chmod(os.path.join(out, "meta.json"), 0o644)
    assert not os.path.exists(wpath)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: P={P} keys={len(expected)} size={size} problems={len(problems)} "
          f"time={time.time()-t0:.0f}s", flush=True)
    for k, v in checks.items():
        print(f"    {k}: {v:.2e}")
    for pr in problems:
        print("  PROBLEM:", pr, flush=True)
    return not problems


def main(argv):
    names = argv or CASES
    t = time.time()
    bad = synthetic.check_sin()
    print(f"np.sin vs math.sin (libm) mismatches on the formula's arguments: {bad}", flush=True)
    ok = bad == 0
    for n in names:
        ok &= process(n)
    print(f"total {time.time()-t:.0f}s")
    if not ok:
        print("SOME CHECKS FAILED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
