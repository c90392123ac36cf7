#!/usr/bin/env python
"""Independent consistency check of the written fixtures.

Rebuilds every model from ``model.json`` + ``weights.safetensors`` alone (no
laplace-torch), recomputes the quantities from their definitions and checks the
files against them and against each other (EF = G^T G, diag = diagonal of full,
last-layer = trailing block of the full quantity, subnetwork = full quantity
indexed with ``subnetwork.npy`` in its stored order, ...).

    venv/bin/python tools/reference/verify_fixtures.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

torch.set_default_dtype(torch.float64)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "crates", "laplace", "tests", "fixtures"))
TOL = 1e-10


def build(spec):
    layers = []
    for L in spec["layers"]:
        t = L["type"]
        a = {k: v for k, v in L.items() if k != "type"}
        if t == "Linear":
            layers.append(nn.Linear(a["in_features"], a["out_features"], bias=a["bias"]))
        elif t == "Conv2d":
            layers.append(nn.Conv2d(a["in_channels"], a["out_channels"], tuple(a["kernel_size"]),
                                    stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                                    dilation=tuple(a["dilation"]), groups=a["groups"],
                                    bias=a["bias"], padding_mode=a["padding_mode"]))
        elif t in ("MaxPool2d",):
            layers.append(nn.MaxPool2d(tuple(a["kernel_size"]), tuple(a["stride"]),
                                       tuple(a["padding"]), tuple(a["dilation"]),
                                       ceil_mode=a["ceil_mode"]))
        elif t in ("AvgPool2d",):
            layers.append(nn.AvgPool2d(tuple(a["kernel_size"]), tuple(a["stride"]),
                                       tuple(a["padding"]), ceil_mode=a["ceil_mode"],
                                       count_include_pad=a["count_include_pad"],
                                       divisor_override=a["divisor_override"]))
        else:
            layers.append(getattr(nn, t)(**a))
    return nn.Sequential(*layers).eval()


def rel(a, b):
    nb = torch.linalg.norm(b.reshape(-1))
    return float(torch.linalg.norm((a - b).reshape(-1)) / (nb if nb > 0 else 1.0))


def check_case(d):
    spec = json.load(open(os.path.join(d, "model.json")))
    meta = json.load(open(os.path.join(d, "meta.json")))
    model = build(spec)
    w = load_file(os.path.join(d, "weights.safetensors"))
    assert all(v.dtype == torch.float64 for v in w.values())
    model.load_state_dict(w, strict=True)
    data = np.load(os.path.join(d, "data.npz"))
    x = torch.from_numpy(data["x"])
    y = torch.from_numpy(data["y"])
    E = load_file(os.path.join(d, "expected.safetensors"))
    lik, C, N, P = meta["likelihood"], meta["n_outputs"], meta["n_data"], meta["n_params"]
    assert x.dtype == torch.float64 and tuple(x.shape[1:]) == tuple(spec["input_shape"])
    if lik == "classification":
        assert y.dtype == torch.int64 and y.shape == (N,)
    else:
        assert y.dtype == torch.float64 and y.shape == (N, C)
    assert set(E) == set(meta["sources"]), set(E) ^ set(meta["sources"])
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert sum(v.numel() for v in params.values()) == P

    def fwd(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def nll(p, xi, yi):
        o = fwd(p, xi)
        if lik == "regression":
            return 0.5 * ((yi - o) ** 2).sum()
        return torch.logsumexp(o, -1) - o.gather(-1, yi.reshape(1)).squeeze(-1)

    f = vmap(fwd, (None, 0))(params, x)
    J = torch.cat([v.reshape(N, C, -1) for v in vmap(jacrev(fwd), (None, 0))(params, x).values()], -1)
    G = torch.cat([v.reshape(N, -1) for v in vmap(grad(nll), (None, 0, 0))(params, x, y).values()], -1)
    loss = vmap(nll, (None, 0, 0))(params, x, y).sum()
    if lik == "regression":
        Lam = torch.eye(C).expand(N, C, C)
    else:
        p = torch.softmax(f, -1)
        Lam = torch.diag_embed(p) - torch.einsum("nc,nk->nck", p, p)
    GGN = torch.einsum("ncp,nck,nkq->pq", J, Lam, J)
    EF = G.T @ G
    last = model[len(model) - 1]
    Pll = sum(p.numel() for p in last.parameters())
    ll = slice(P - Pll, P)
    checks = {
        "loss": (E["loss"], loss.reshape(1)),
        "gradients.loss": (E["gradients.loss"], loss.reshape(1)),
        "jacobians.J": (E["jacobians.J"], J), "jacobians.f": (E["jacobians.f"], f),
        "last_layer_jacobians.J": (E["last_layer_jacobians.J"], J[:, :, ll]),
        "last_layer_jacobians.f": (E["last_layer_jacobians.f"], f),
        "gradients.G": (E["gradients.G"], G),
        "ggn.full": (E["ggn.full"], GGN), "ggn.diag": (E["ggn.diag"], torch.diagonal(GGN)),
        "ef.full": (E["ef.full"], EF), "ef.diag": (E["ef.diag"], torch.diagonal(EF)),
        "last_layer.ggn.full": (E["last_layer.ggn.full"], GGN[ll, ll]),
        "last_layer.ggn.diag": (E["last_layer.ggn.diag"], torch.diagonal(GGN)[ll]),
        "last_layer.ef.full": (E["last_layer.ef.full"], EF[ll, ll]),
        "last_layer.ef.diag": (E["last_layer.ef.diag"], torch.diagonal(EF)[ll]),
        # internal consistency of the written files
        "ef.full == G^T G (files)": (E["ef.full"], E["gradients.G"].T @ E["gradients.G"]),
        "ggn.diag == diag(ggn.full) (files)": (E["ggn.diag"], torch.diagonal(E["ggn.full"])),
    }
    sp = os.path.join(d, "subnetwork.npy")
    if os.path.exists(sp):
        idx = np.load(sp)
        assert idx.dtype == np.int64 and idx.ndim == 1 and len(np.unique(idx)) == len(idx)
        assert not np.all(np.diff(idx) > 0), "subnetwork indices should be unsorted"
        it = torch.from_numpy(idx)
        checks.update({
            "subnetwork.jacobians.J": (E["subnetwork.jacobians.J"], J[:, :, it]),
            "subnetwork.gradients.G": (E["subnetwork.gradients.G"], G[:, it]),
            "subnetwork.ggn.full": (E["subnetwork.ggn.full"], GGN[it][:, it]),
            "subnetwork.ggn.diag": (E["subnetwork.ggn.diag"], torch.diagonal(GGN)[it]),
            "subnetwork.ef.full": (E["subnetwork.ef.full"], EF[it][:, it]),
            "subnetwork.ef.diag": (E["subnetwork.ef.diag"], torch.diagonal(EF)[it]),
        })
    bad = []
    for k, (a, b) in checks.items():
        if a.dtype != torch.float64 or tuple(a.shape) != tuple(b.shape) or rel(a, b) > TOL:
            bad.append(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}, rel {rel(a, b) if a.shape == b.shape else 'n/a'}")
    return bad, len(checks)


def main():
    fails = 0
    total = 0
    for case in sorted(os.listdir(ROOT)):
        d = os.path.join(ROOT, case)
        if not os.path.isdir(d):
            continue
        bad, n = check_case(d)
        total += sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{case}: {n - len(bad)}/{n} checks ok" + ("" if not bad else "\n  " + "\n  ".join(bad)))
        fails += len(bad)
    print(f"total size of case directories: {total} bytes")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
