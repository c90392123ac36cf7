#!/usr/bin/env python
"""Reference fixtures of laplace-rs for GRAPH models (docs/model-format.md, graph form).

    venv/bin/python tools/reference/make_graph_fixtures.py            # all cases
    venv/bin/python tools/reference/make_graph_fixtures.py resnet_bn  # some cases

Cases (float64, seeded, eval mode), written to
``crates/laplace/tests/fixtures/graph/<case>/``:

* ``resnet_bn``       conv-BN-ReLU stem, two torchvision ``BasicBlock``s (the second
                      with stride 2 and a 1x1-conv+BN downsample), AdaptiveAvgPool2d(1)
                      + flatten, Linear head; random BN statistics; classification C=3;
* ``mobilenet_block`` grouped conv (groups=2) stem, MobileNetV3-style inverted residual
                      (1x1 expand, BN, Hardswish, depthwise 3x3, BN, squeeze-excitation
                      with ReLU/Hardsigmoid and multiply, 1x1 project, BN, residual add),
                      mean pooling, Linear head; classification C=3;
* ``graph_nobias``    no BN, no biases: residual add, cat of two branches, mul by a
                      constant, permute + reshape, mean, Linear; regression C=2.

For each case: ``export`` (tools/laplace_export.py) writes model.json + weights.safetensors;
the export is checked against ``graph_interp.GraphModel`` (rel <= 1e-12). Every value of
expected.safetensors comes from a laplace-torch call (GGNInterface / EFInterface, the
torch.func backends that work for any module; CurvlinopsHessian for the Hessian) and is
compared with this file's own torch.func definition (jacrev / hessian over a flat theta)
at rel 1e-10; the script exits non-zero on any disagreement. KFAC factors
(kron.safetensors) come from the hook-based definition below and are cross-checked with
laplace-torch ``CurvlinopsGGN/CurvlinopsEF.kron`` where curvlinops accepts the model
(graph_nobias; the BN models with their BN parameters frozen; a BN-free grouped-conv model).

Conventions (shared/spec/curvature-conventions.md): losses are sums; regression
gradients / gradients.loss / EF (full, diag, last layer, subnetwork, kron) are HALVED with
respect to laplace-torch (negative log-likelihood 1/2||y-f||^2). See README_graph.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, HERE)
from laplace_export import export  # noqa: E402
import graph_interp  # noqa: E402

torch.set_default_dtype(torch.float64)

OUT_ROOT = os.path.join(REPO, "crates", "laplace", "tests", "fixtures", "graph")
RTOL = 1e-10
CASES = ["resnet_bn", "mobilenet_block", "graph_nobias"]


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------

def seed_of(name):
    return int(hashlib.sha256(("graph/" + name).encode()).hexdigest()[:8], 16) % (2**31)


def randomize_bn_(model, scale=1.0):
    """Non-trivial BN weight / bias / running statistics (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.3 * scale * torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.exp(0.5 * torch.randn_like(m.running_var)))
                m.num_batches_tracked.fill_(7)


class ResNetBN(nn.Module):
    def __init__(self, cin=2, c=2, num_classes=3):
        from torchvision.models.resnet import BasicBlock
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(c, c)
        self.layer2 = BasicBlock(c, c, stride=2, downsample=nn.Sequential(
            nn.Conv2d(c, c, 1, stride=2, bias=False), nn.BatchNorm2d(c)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return s * x


class InvertedResidual(nn.Module):
    def __init__(self, c, e, r):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.act = nn.Hardswish()
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.se = SqueezeExcite(e, r)
        self.project = nn.Conv2d(e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = self.act(self.bn1(self.expand(x)))
        h = self.act(self.bn2(self.dw(h)))
        h = self.bn3(self.project(self.se(h)))
        return h + x


class MobileNetBlock(nn.Module):
    def __init__(self, cin=4, c=4, e=6, r=2, num_classes=3):
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 2, groups=2)          # grouped conv, 1 < groups < c
        self.block = InvertedResidual(c, e, r)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        h = self.block(F.hardswish(self.stem(x)))
        return self.head(h.mean((2, 3)))


class GraphNoBias(nn.Module):
    def __init__(self, cin=2, c=3, out=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1, bias=False)
        self.branch_a = nn.Conv2d(c, 2, 1, bias=False)
        self.branch_b = nn.Conv2d(c, 2, 3, padding=1, bias=False)
        self.mix = nn.Conv2d(4, c, 1, bias=False)
        self.head = nn.Linear(c, out, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        b = torch.cat([F.relu(self.branch_a(h)), torch.sigmoid(self.branch_b(h))], dim=1)
        h = (self.mix(b) + h) * 0.5
        h = h.permute(0, 2, 3, 1)
        h = h.reshape(h.size(0), -1, h.size(3))            # (M, H*W, c)
        return self.head(h.mean(1))


class GroupedConvNoBN(nn.Module):
    """Cross-check model for curvlinops: grouped + depthwise conv, no BN."""

    def __init__(self):
        super().__init__()
        self.g = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, groups=6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.dw(torch.tanh(self.g(x)))).mean((2, 3)))


def build_case(name):
    seed = seed_of(name)
    torch.manual_seed(seed)
    if name == "resnet_bn":
        model, ishape, C, lik, M = ResNetBN(cin=1), (1, 6, 6), 3, "classification", 5
        randomize_bn_(model)
        with torch.no_grad():
            model.conv1.weight.mul_(2.0)
            model.fc.weight.mul_(8.0)
        desc = ("ResNet-style CNN (1,6,6): Conv2d(1,2,3,p=1,nobias)-BN-ReLU stem, torchvision "
                "BasicBlock(2,2), BasicBlock(2,2,stride=2, downsample=Conv2d 1x1 s2 + BN), "
                "AdaptiveAvgPool2d(1), torch.flatten, Linear(2,3); random BN affine and running "
                "statistics; classification")
    elif name == "mobilenet_block":
        model, ishape, C, lik, M = MobileNetBlock(e=5), (4, 5, 5), 3, "classification", 5
        randomize_bn_(model)
        with torch.no_grad():
            model.stem.weight.mul_(2.5)
            model.head.weight.mul_(3.0)
            model.block.se.fc2.bias.add_(0.5)
        desc = ("MobileNetV3-style (4,5,5): Conv2d(4,4,2,groups=2) + F.hardswish stem; inverted "
                "residual: Conv2d 1x1 4->5 (nobias), BN, Hardswish, depthwise Conv2d(5,5,3,p=1,"
                "groups=5), BN, Hardswish, squeeze-excitation (F.adaptive_avg_pool2d(1), Conv2d "
                "1x1 5->2, F.relu, Conv2d 1x1 2->5, F.hardsigmoid, mul), Conv2d 1x1 5->4, BN, "
                "residual add; mean over (2,3); Linear(4,3); classification")
    elif name == "graph_nobias":
        model, ishape, C, lik, M = GraphNoBias(), (2, 4, 4), 2, "regression", 6
        with torch.no_grad():
            model.conv1.weight.mul_(1.5)
            model.head.weight.mul_(2.0)
        desc = ("bias-free graph (2,4,4): Conv2d(2,3,3,p=1)+tanh; cat(relu(Conv2d 1x1 3->2), "
                "sigmoid(Conv2d 3x3 3->2)); Conv2d 1x1 4->3; residual add; *0.5; permute(0,2,3,1); "
                "reshape(M,16,3); mean(1); Linear(3,2,nobias); regression")
    else:
        raise KeyError(name)
    model = model.eval()
    x = torch.randn(M, *ishape)
    y = torch.randn(M, C) if lik == "regression" else torch.randint(0, C, (M,))
    return dict(name=name, model=model, x=x, y=y, likelihood=lik, C=C, input_shape=ishape,
                description=desc, seed=seed)


# --------------------------------------------------------------------------
# definition (torch.func over a flat theta)
# --------------------------------------------------------------------------

def layout(model):
    out, off = [], 0
    for n, p in model.named_parameters():
        out.append((n, off, p.numel(), tuple(p.shape)))
        off += p.numel()
    return out, off


def last_linear(model, x):
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return order[-1]


def nll_vec(f, y, lik):
    if lik == "regression":
        return 0.5 * ((y - f) ** 2).sum(-1)
    return -torch.log_softmax(f, -1).gather(-1, y.reshape(-1, 1)).squeeze(-1)


def lambda_of(f, lik):
    M, C = f.shape
    if lik == "regression":
        return torch.eye(C).expand(M, C, C).clone()
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - torch.einsum("nc,nk->nck", p, p)


class twice_differentiable:
    """Replace F.hardsigmoid by the identical clamp(x/6 + 1/2, 0, 1) while active.

    torch has no derivative of ``hardsigmoid_backward``, so no Hessian (forward- or
    reverse-over-reverse, torch.func or curvlinops) runs through F.hardsigmoid /
    nn.Hardsigmoid. The clamp form is the same function (piecewise linear, second
    derivative 0 off the kinks at +-3); it is used for the Hessian keys only.
    """

    def __enter__(self):
        self.orig = F.hardsigmoid
        F.hardsigmoid = lambda x, inplace=False: torch.clamp(x / 6 + 0.5, 0.0, 1.0)
        return self

    def __exit__(self, *exc):
        F.hardsigmoid = self.orig
        return False


def definition(case):
    model, x, y, lik = case["model"], case["x"], case["y"], case["likelihood"]
    lay, P = layout(model)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        return {n: t[o:o + k].reshape(s) for n, o, k, s in lay}

    def fwd(t):
        return functional_call(model, unflat(t), (x,))

    def losses(t):
        return nll_vec(fwd(t), y, lik)

    d, info = {}, {"P": P}
    with torch.no_grad():
        f = fwd(theta)
    Lam = lambda_of(f, lik)

    def quantities(pre, g_of):
        """g_of: map from a free vector u (at u0) to theta."""
        u0, to_theta = g_of
        J = jacrev(lambda u: fwd(to_theta(u)))(u0).detach()
        G = jacrev(lambda u: losses(to_theta(u)))(u0).detach()
        # reverse-over-reverse: hardsigmoid_backward has no forward-mode AD
        with twice_differentiable():
            H = jacrev(jacrev(lambda u: losses(to_theta(u)).sum()))(u0).detach()
        ggn = torch.einsum("ncp,nck,nkq->pq", J, Lam, J)
        ef = G.T @ G
        return J, G, ggn, ef, H

    J, G, ggn, ef, H = quantities("", (theta, lambda t: t))
    d.update({"loss": losses(theta).sum().detach().reshape(1), "jacobians.J": J,
              "jacobians.f": f, "gradients.G": G,
              "gradients.loss": losses(theta).sum().detach().reshape(1),
              "ggn.full": ggn, "ggn.diag": ggn.diagonal().clone(), "ef.full": ef,
              "ef.diag": ef.diagonal().clone(), "hessian.full": H,
              "hessian.diag": H.diagonal().clone()})
    # last layer
    ll = last_linear(model, x)
    ll_names = [n for n, *_ in lay if n.rsplit(".", 1)[0] == ll]
    ll_idx = torch.cat([torch.arange(o, o + k) for n, o, k, s in lay if n in ll_names])
    J, G, ggn, ef, H = quantities("last_layer.", (theta[ll_idx].clone(),
                                                  lambda u: theta.index_copy(0, ll_idx, u)))
    d.update({"last_layer_jacobians.J": J, "last_layer_jacobians.f": f,
              "last_layer.ggn.full": ggn, "last_layer.ggn.diag": ggn.diagonal().clone(),
              "last_layer.ef.full": ef, "last_layer.ef.diag": ef.diagonal().clone(),
              "last_layer.hessian.full": H, "last_layer.gradients.G": G})
    # subnetwork (w.r.t. the S coordinates only, in the given order)
    idx = torch.as_tensor(case["subnet"])
    J, G, ggn, ef, H = quantities("subnetwork.", (torch.zeros(len(idx)),
                                                  lambda u: theta.index_add(0, idx, u)))
    d.update({"subnetwork.jacobians.J": J, "subnetwork.gradients.G": G,
              "subnetwork.ggn.full": ggn, "subnetwork.ggn.diag": ggn.diagonal().clone(),
              "subnetwork.ef.full": ef, "subnetwork.ef.diag": ef.diagonal().clone(),
              "subnetwork.hessian.full": H})
    info.update(ll=ll, ll_names=ll_names, P_ll=len(ll_idx), layout=lay)
    return d, info


def make_subnet(model, seed, n_target=40):
    rng = np.random.default_rng(seed + 1)
    lay, P = layout(model)
    frac = n_target / P
    picks = []
    for n, off, k, s in lay:
        m = min(k, max(1, int(round(frac * k))))
        picks.append(off + rng.choice(k, size=m, replace=False))
    idx = rng.permutation(np.concatenate(picks))
    while np.all(np.diff(idx) > 0):
        idx = rng.permutation(idx)
    assert len(np.unique(idx)) == len(idx)
    return idx.astype(np.int64)


# --------------------------------------------------------------------------
# laplace-torch
# --------------------------------------------------------------------------

def rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    nb = torch.linalg.norm(b.reshape(-1))
    diff = torch.linalg.norm((a - b).reshape(-1))
    return float(diff / nb) if nb > 0 else float(diff)


def fmt(e):
    return f"{e:.1e}"


def laplace_values(case, info):
    """{key: (label, value in the laplace-torch convention, expected factor vs definition)}."""
    from laplace.curvature import (AsdlEF, BackPackEF, CurvlinopsEF, CurvlinopsHessian,
                                   EFInterface, GGNInterface)
    from laplace.utils import FeatureExtractor
    model, x, y, lik, C = case["model"], case["x"], case["y"], case["likelihood"], case["C"]
    reg = lik == "regression"
    two = 2.0 if reg else 1.0
    idx = torch.as_tensor(case["subnet"])

    def fresh(ll=False):
        m = copy.deepcopy(model)
        m.output_size = C
        if ll:
            m = FeatureExtractor(m, last_layer_name=info["ll"])
            m.output_size = C
        return m

    out = {}
    J, f = GGNInterface(fresh(), lik).jacobians(x)
    out["jacobians.J"] = ("GGNInterface(model).jacobians(x)[0]", J, 1.0)
    out["jacobians.f"] = ("GGNInterface(model).jacobians(x)[1]", f, 1.0)
    G, L = EFInterface(fresh(), lik).gradients(x, y)
    out["gradients.G"] = ("EFInterface(model).gradients(x, y)[0]", G, two)
    out["gradients.loss"] = ("EFInterface(model).gradients(x, y)[1]", L.reshape(1), two)
    for kind, cls in (("ggn", GGNInterface), ("ef", EFInterface)):
        fac = two if kind == "ef" else 1.0
        for shape in ("full", "diag"):
            loss, H = getattr(cls(fresh(), lik), shape)(x, y)
            out[f"{kind}.{shape}"] = (f"{cls.__name__}(model).{shape}(x, y)[1]", H, fac)
            out[f"loss[{kind}.{shape}]"] = (f"{cls.__name__}(model).{shape}(x, y)[0]",
                                            loss.reshape(1), 1.0)
            # laplace-torch 0.3's EFInterface returns zeros with last_layer=True (it
            # differentiates w.r.t. the wrong parameters); the other backends are tried next
            cands = [cls] + ([] if kind == "ggn" else
                             [CurvlinopsEF, BackPackEF] if shape == "full" else [BackPackEF, AsdlEF])
            out[f"last_layer.{kind}.{shape}"] = []
            for c2 in cands:
                lbl = (f"{c2.__name__}(FeatureExtractor(model, last_layer_name={info['ll']!r}), "
                       f"last_layer=True).{shape}(x, y)[1]")
                try:
                    loss, H = getattr(c2(fresh(True), lik, last_layer=True), shape)(x, y)
                except Exception as e:  # noqa: BLE001
                    H = f"{type(e).__name__}: {str(e)[:120]}"
                out[f"last_layer.{kind}.{shape}"].append((lbl, H, fac))
            loss, H = getattr(cls(fresh(), lik, subnetwork_indices=idx), shape)(x, y)
            out[f"subnetwork.{kind}.{shape}"] = (
                f"{cls.__name__}(model, subnetwork_indices=idx).{shape}(x, y)[1]", H, fac)
    Jl, fl = GGNInterface(fresh(True), lik, last_layer=True).last_layer_jacobians(x)
    lbl = (f"GGNInterface(FeatureExtractor(model, last_layer_name={info['ll']!r}), "
           "last_layer=True).last_layer_jacobians(x)")
    out["last_layer_jacobians.J"] = (lbl + "[0]", Jl, 1.0)
    out["last_layer_jacobians.f"] = (lbl + "[1]", fl, 1.0)
    Js, _ = GGNInterface(fresh(), lik, subnetwork_indices=idx).jacobians(x)
    out["subnetwork.jacobians.J"] = ("GGNInterface(model, subnetwork_indices=idx).jacobians(x)[0]",
                                     Js, 1.0)
    Gs, _ = EFInterface(fresh(), lik, subnetwork_indices=idx).gradients(x, y)
    out["subnetwork.gradients.G"] = (
        "EFInterface(model, subnetwork_indices=idx).gradients(x, y)[0]", Gs, two)
    out["loss"] = out.pop("loss[ggn.full]")
    # Hessian (curvlinops' HessianLinearOperator: autodiff, works for any module)
    with twice_differentiable():
        loss, H = CurvlinopsHessian(fresh(), lik).full(x, y)
        loss, Hl = CurvlinopsHessian(fresh(True), lik, last_layer=True).full(x, y)
    out["hessian.full"] = ("CurvlinopsHessian(model).full(x, y)[1]", H, 1.0)
    out["hessian.diag"] = ("diagonal of CurvlinopsHessian(model).full(x, y)[1]",
                           H.diagonal().clone(), 1.0)
    out["subnetwork.hessian.full"] = (
        "CurvlinopsHessian(model).full(x, y)[1][idx][:, idx] (laplace-torch has no subnetwork "
        "Hessian)", H[idx][:, idx], 1.0)
    out["last_layer.hessian.full"] = (
        f"CurvlinopsHessian(FeatureExtractor(model, last_layer_name={info['ll']!r}), "
        "last_layer=True).full(x, y)[1]", Hl, 1.0)
    return {k: [(a, b.detach().clone() if torch.is_tensor(b) else b, c)
                for a, b, c in (v if isinstance(v, list) else [v])] for k, v in out.items()}


EXPECTED_KEYS = [
    "loss", "jacobians.J", "jacobians.f", "last_layer_jacobians.J", "last_layer_jacobians.f",
    "gradients.G", "gradients.loss", "ggn.full", "ggn.diag", "ef.full", "ef.diag",
    "last_layer.ggn.full", "last_layer.ggn.diag", "last_layer.ef.full", "last_layer.ef.diag",
    "subnetwork.jacobians.J", "subnetwork.gradients.G", "subnetwork.ggn.full",
    "subnetwork.ggn.diag", "subnetwork.ef.full", "subnetwork.ef.diag",
    "hessian.full", "hessian.diag", "last_layer.hessian.full", "subnetwork.hessian.full",
]


# --------------------------------------------------------------------------
# KFAC definition (hooks + autograd), project convention
# --------------------------------------------------------------------------

def kfac_records(model, x, y, lik, curv):
    """Per trainable Linear/Conv2d module: patches a (M, R, D) and output vectors g (K, M, R, O)."""
    model = copy.deepcopy(model)
    recs, hooks = {}, []
    for mn, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and any(
                p.requires_grad for p in m.parameters(recurse=False)):
            def hook(mod, inp, out, mn=mn):
                assert mn not in recs, f"{mn} called twice"
                recs[mn] = dict(module=mod, inp=inp[0].detach(), out=out)
            hooks.append(m.register_forward_hook(hook))
    f = model(x)
    for h in hooks:
        h.remove()
    M, C = f.shape
    fd = f.detach()
    if curv == "ggn":
        if lik == "regression":
            S = torch.eye(C).expand(M, C, C)
        else:
            p = torch.softmax(fd, -1)
            # S S^T = diag(p) - p p^T with S = diag(sqrt p) - p sqrt(p)^T; column k = vector k
            S = torch.diag_embed(p.sqrt()) - torch.einsum("nc,nk->nck", p, p.sqrt())
            assert rel(S @ S.transpose(1, 2), lambda_of(fd, lik)) < 1e-13
        V = [S[:, :, k] for k in range(C)]
    else:
        dl = fd - y if lik == "regression" else torch.softmax(fd, -1) - F.one_hot(y, C).to(fd)
        V = [dl]
    names = list(recs)
    outs = [recs[n]["out"] for n in names]
    gs = {n: [] for n in names}
    for k, v in enumerate(V):
        grads = torch.autograd.grad((f * v).sum(), outs, retain_graph=k < len(V) - 1)
        for n, g in zip(names, grads):
            gs[n].append(g.detach())
    res = {}
    for n in names:
        m, a_in = recs[n]["module"], recs[n]["inp"]
        g = torch.stack(gs[n])
        if isinstance(m, nn.Conv2d):
            assert m.padding_mode == "zeros"
            xg = a_in.reshape(M, m.groups, -1, *a_in.shape[2:]).mean(1)   # average groups
            a = F.unfold(xg, m.kernel_size, dilation=m.dilation, padding=m.padding,
                         stride=m.stride).transpose(1, 2)                  # (M, R, D)
            g = g.flatten(3).transpose(2, 3)                               # (K, M, R, O)
        else:
            a = a_in.reshape(M, -1, a_in.shape[-1])
            g = g.reshape(g.shape[0], M, -1, g.shape[-1])
        assert a.shape[1] == g.shape[2]
        res[n] = (a, g)
    return res


def kfac_blocks(model, x, y, lik, curv, approx, N, diag):
    """Blocks in theta order: [B, A] weights, [B] biases, [diag] other tensors."""
    recs = kfac_records(model, x, y, lik, curv)
    lay, _ = layout(model)
    blocks, meta = [], []
    owner = {f"{mn}.{pn}" if mn else pn: (mn, m, pn) for mn, m in model.named_modules()
             for pn, _ in m.named_parameters(recurse=False)}
    for n, off, k, s in lay:
        mn, m, pn = owner[n]
        if mn in recs:
            a, g = recs[mn]
            R = a.shape[1]
            if approx == "expand":
                A = torch.einsum("nri,nrj->ij", a, a) / (N * R)
                B = torch.einsum("knri,knrj->ij", g, g)
            else:
                am, gsum = a.mean(1), g.sum(2)
                A = torch.einsum("ni,nj->ij", am, am) / N
                B = torch.einsum("kni,knj->ij", gsum, gsum)
            if pn == "weight":
                blk = [B * A] if (B.numel() == 1 and A.numel() == 1) else [B, A]
            else:
                blk = [B]
            kind = type(m).__name__ + ("" if pn == "weight" else " bias")
        else:
            blk = [diag[off:off + k].clone()]
            kind = f"{type(m).__name__} {pn}: exact {curv} diagonal"
        blocks.append(blk)
        meta.append(dict(index=len(meta), param=n, shape=list(s), offset=off, numel=k,
                         module=mn, layer=type(m).__name__, block=kind,
                         factor_shapes=[list(t.shape) for t in blk]))
    return blocks, meta


def dense(block):
    mats = [torch.diag(t) if t.ndim == 1 else t for t in block]
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def curvlinops_products(model, x, y, lik, C, curv, approx, N):
    """laplace-torch CurvlinopsGGN/EF.kron products for the trainable tensors, project
    convention (regression EF / 2)."""
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
    m = copy.deepcopy(model)
    m.output_size = C
    be = CurvlinopsGGN(m, lik, stochastic=False) if curv == "ggn" else CurvlinopsEF(m, lik)
    loss, kron = be.kron(x, y, N=N, kfac_approx=approx)
    fac = 2.0 if (curv == "ef" and lik == "regression") else 1.0
    return [dense([t.detach() for t in blk]) / fac for blk in kron.kfacs]


def kron_case(case, d, out_dir):
    model, x, y, lik, C = case["model"], case["x"], case["y"], case["likelihood"], case["C"]
    N = x.shape[0]
    tensors, meta_blocks, checks, problems = {}, None, {}, []
    for curv in ("ggn", "ef"):
        for approx in ("expand", "reduce"):
            blocks, meta = kfac_blocks(model, x, y, lik, curv, approx, N, d[f"{curv}.diag"])
            meta_blocks = meta
            for b, blk in enumerate(blocks):
                for fi, t in enumerate(blk):
                    tensors[f"{curv}.{approx}.{b}.{fi}"] = t.contiguous()
                tensors[f"{curv}.{approx}.{b}.product"] = dense(blk).clone()
            # sanity: one point, N = 1: the Kronecker diagonal is not checked (conv);
            # trace of GGN-diag blocks equals the diagonal by construction.
    tensors["n_data"] = torch.tensor([float(N)])

    # ---- curvlinops cross-checks
    lay, _ = layout(model)
    has_other = any(mb["layer"] not in ("Linear", "Conv2d") for mb in meta_blocks)
    from laplace.curvature import CurvlinopsGGN
    if has_other:
        try:
            m = copy.deepcopy(model)
            m.output_size = C
            CurvlinopsGGN(m, lik, stochastic=False).kron(x, y, N=N)
            checks["curvlinops_on_full_model"] = "accepted (unexpected)"
        except Exception as e:  # noqa: BLE001
            checks["curvlinops_on_full_model"] = f"refused: {type(e).__name__}: {str(e)[:150]}"
        # freeze the non-Linear/Conv tensors so curvlinops accepts the model; the Linear /
        # Conv2d blocks do not depend on which other tensors are trainable
        frozen = copy.deepcopy(model)
        keep = [mb["index"] for mb in meta_blocks if mb["layer"] in ("Linear", "Conv2d")]
        for mb in meta_blocks:
            if mb["layer"] not in ("Linear", "Conv2d"):
                frozen.get_parameter(mb["param"]).requires_grad_(False)
        target, label = frozen, ("laplace-torch Curvlinops{GGN,EF}.kron on a copy with the "
                                 "BatchNorm parameters frozen (requires_grad=False), compared "
                                 "on the Linear/Conv2d blocks")
    else:
        keep = list(range(len(meta_blocks)))
        target, label = model, "laplace-torch Curvlinops{GGN,EF}.kron on the model"
    res = {}
    for curv in ("ggn", "ef"):
        for approx in ("expand", "reduce"):
            prods = curvlinops_products(target, x, y, lik, C, curv, approx, N)
            assert len(prods) == len(keep), (len(prods), len(keep))
            errs = [rel(tensors[f"{curv}.{approx}.{b}.product"], pr) for b, pr in zip(keep, prods)]
            res[f"{curv}.{approx}"] = {"max_rel_err_product": max(errs),
                                       "per_block": {meta_blocks[b]["param"]: e
                                                     for b, e in zip(keep, errs)}}
            if max(errs) > RTOL:
                problems.append(f"curvlinops {curv}.{approx}: max rel err {max(errs):.2e}")
    checks["curvlinops"] = {"call": label + f"; N={N}; kfac_approx='expand'|'reduce'; "
                            "products compared after laplace-torch's regression EF / 2",
                            "results": res}
    return tensors, meta_blocks, checks, problems


def grouped_conv_check():
    """BN-free grouped/depthwise conv model: definition vs laplace-torch CurvlinopsGGN/EF."""
    torch.manual_seed(1234)
    model = GroupedConvNoBN().eval()
    x, y = torch.randn(4, 4, 6, 6), torch.randint(0, 3, (4,))
    out = {}
    for curv in ("ggn", "ef"):
        for approx in ("expand", "reduce"):
            blocks, meta = kfac_blocks(model, x, y, "classification", curv, approx, 4, None)
            prods = curvlinops_products(model, x, y, "classification", 3, curv, approx, 4)
            out[f"{curv}.{approx}"] = max(rel(dense(b), p) for b, p in zip(blocks, prods))
    return {"model": "Conv2d(4,6,3,p=1,groups=2) - tanh - Conv2d(6,6,3,s=2,groups=6) - tanh - "
                     "mean(2,3) - Linear(6,3); 4 points, classification, N=4",
            "max_rel_err_product_vs_curvlinops": out}


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def round3(o):
    if isinstance(o, float):
        return o if not math.isfinite(o) else float(f"{o:.3g}")
    if isinstance(o, dict):
        return {k: round3(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [round3(v) for v in o]
    return o


def write_json(path, o):
    with open(path, "w") as fh:
        json.dump(o, fh, indent=1)
        fh.write("\n")


def process(name, gc_check):
    from safetensors.torch import save_file
    case = build_case(name)
    model, x, y, lik = case["model"], case["x"], case["y"], case["likelihood"]
    case["subnet"] = make_subnet(model, case["seed"])
    out = os.path.join(OUT_ROOT, name)
    os.makedirs(out, exist_ok=True)
    spec = export(model, x, out)
    g = graph_interp.GraphModel.load(out)
    with torch.no_grad():
        f_mod, f_int = model(x), g(x)
    e_int = rel(f_int, f_mod)
    assert e_int <= 1e-12, f"{name}: interpreter vs module rel {e_int}"

    d, info = definition(case)
    lt = laplace_values(case, info)
    problems, sources, expected = [], {}, {}
    for key in EXPECTED_KEYS:
        ref, bad, chosen = d[key], [], None
        for label, val, fac in lt[key]:
            if isinstance(val, str):
                bad.append(f"{label} raised {val}")
                continue
            if tuple(val.shape) != tuple(ref.shape):
                bad.append(f"{label}: shape {tuple(val.shape)} vs {tuple(ref.shape)}")
                continue
            e = rel(val, fac * ref)
            if e > RTOL:
                bad.append(f"{label}: rel {e:.1e} vs {fac:g} x definition")
                continue
            chosen = (label, val, fac, e)
            break
        if chosen is None:
            problems.append(f"{key}: no laplace-torch call agrees: " + "; ".join(bad))
            continue
        label, val, fac, e = chosen
        expected[key] = (val / fac).contiguous()
        conv = (f" Converted: laplace-torch returns {fac:g}x the NLL convention; written = "
                f"laplace-torch / {fac:g}.") if fac != 1.0 else ""
        sources[key] = (f"laplace-torch {label}; agrees with the torch.func definition "
                        f"(rel {fmt(e)}).{conv}"
                        + (" Disagreeing / failing calls tried first: " + "; ".join(bad) + "."
                           if bad else ""))
    for k in ("loss[ggn.diag]", "loss[ef.full]", "loss[ef.diag]"):
        e = rel(lt[k][0][1], d["loss"])
        if e > RTOL:
            problems.append(f"{k}: rel {e:.2e}")
    assert len(case["subnet"]) >= 30
    # subnetwork touches BN
    touched = sorted({n for n, o, k, s in info["layout"]
                      if np.any((case["subnet"] >= o) & (case["subnet"] < o + k))})

    tensors, kmeta, checks, kprob = kron_case(case, d, out)
    problems += kprob
    if gc_check is not None:
        checks["grouped_conv_model"] = gc_check
        if max(gc_check["max_rel_err_product_vs_curvlinops"].values()) > RTOL:
            problems.append("grouped conv check vs curvlinops failed")

    # ---- write
    np.savez(os.path.join(out, "data.npz"), x=x.numpy(),
             y=y.numpy().astype(np.int64 if lik == "classification" else np.float64))
    np.save(os.path.join(out, "subnetwork.npy"), case["subnet"])
    for k, v in expected.items():
        assert v.dtype == torch.float64 and torch.isfinite(v).all(), k
    save_file(expected, os.path.join(out, "expected.safetensors"))
    blocks_names = json.dumps([[mb["param"]] for mb in kmeta])
    save_file(tensors, os.path.join(out, "kron.safetensors"), metadata={"kron_blocks": blocks_names})
    meta = {
        "likelihood": lik, "n_outputs": case["C"], "n_params": info["P"], "n_data": int(x.shape[0]),
        "input_shape": list(case["input_shape"]),
        "description": case["description"] + (
            f"; last layer = module '{info['ll']}' ({info['P_ll']} params: "
            f"{', '.join(info['ll_names'])}); subnetwork: {len(case['subnet'])} indices, "
            f"unsorted, touching {', '.join(touched)}; seed {case['seed']}"),
        "export_check": f"graph_interp(model.json, weights.safetensors) vs module output: rel "
                        f"{fmt(e_int)}",
        "sources": sources,
    }
    write_json(os.path.join(out, "meta.json"), meta)
    kmeta_out = {
        "case": name, "likelihood": lik, "n_data": int(x.shape[0]),
        "definition": ("tools/reference/make_graph_fixtures.py kfac_blocks: forward hooks on every "
                       "trainable Linear/Conv2d, one autograd backward per vector; GGN vectors = "
                       "columns of S = diag(sqrt p) - p sqrt(p)^T (S S^T = Lambda; I for "
                       "regression), EF vector = dl_n/df (f - y: regression EF in the NLL "
                       "convention); Conv2d patches from the input averaged over the channel "
                       "groups, F.unfold; expand A = sum aa^T/(N R), B = sum gg^T; reduce A = "
                       "sum abar abar^T / N (mean over R), B = sum gsum gsum^T (sum over R); "
                       "other tensors: 1-D factor = exact diagonal (expected.safetensors "
                       "ggn.diag / ef.diag) of that tensor"),
        "keys": ("'<ggn|ef>.<expand|reduce>.<b>.<f>': factor f of block b (project convention); "
                 "'<...>.<b>.product': dense first (x) second on the row-major flattened tensor "
                 "(a 1-D factor is a diagonal); 'n_data' [1] = N; safetensors metadata "
                 "'kron_blocks' = JSON list of lists of parameter names per block"),
        "blocks": kmeta,
        "checks": round3(checks),
        "problems": problems,
    }
    write_json(os.path.join(out, "kron_meta.json"), kmeta_out)
    for fn in os.listdir(out):
        os.chmod(os.path.join(out, fn), 0o644)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: P={info['P']} nodes={len(spec['nodes'])} keys={len(expected)} "
          f"kron keys={len(tensors)} size={size} problems={len(problems)}", flush=True)
    for p in problems:
        print("  PROBLEM:", p, flush=True)
    return not problems


def main(argv):
    names = argv or CASES
    gc = grouped_conv_check()
    print("grouped conv check:", gc["max_rel_err_product_vs_curvlinops"], flush=True)
    ok = True
    for n in names:
        ok &= process(n, gc if n == "mobilenet_block" else None)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT_ROOT) for f in fs)
    print(f"total size of {OUT_ROOT}: {total} bytes")
    if not ok:
        print("SOME CHECKS FAILED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
