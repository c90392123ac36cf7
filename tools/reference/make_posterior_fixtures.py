#!/usr/bin/env python
"""Reference fixtures for Laplace posteriors, from laplace-torch's own classes.

Run with the reference virtual environment (torch 2.15 CPU, laplace-torch 0.3,
curvlinops-for-pytorch 3.0.1)::

    venv/bin/python tools/reference/make_posterior_fixtures.py            # all cases
    venv/bin/python tools/reference/make_posterior_fixtures.py cls_mlp    # some cases

Everything is float64 (``torch.set_default_dtype(torch.float64)``) and seeded.
For each case ``reg_multi``, ``reg_single``, ``cls_mlp``, ``cls_cnn`` of
``crates/laplace/tests/fixtures/<case>/`` the script

1. rebuilds the ``nn.Sequential`` from ``model.json`` (``getattr(nn, type)(**args)``)
   and ``weights.safetensors`` (strict ``load_state_dict``), reads ``data.npz`` (the
   training set) and checks that the model reproduces ``jacobians.f`` of
   ``expected.safetensors`` bit for bit;
2. writes a test set ``posterior_test.npz`` (5 points, ``x`` ~ N(0, 1) float64 with the
   case's input shape, ``y`` ~ N(0, 1) float64 ``(5, C)`` for regression, uniform int64
   labels for classification; numpy ``default_rng`` seeded from the case name);
3. fits laplace-torch's ``FullLaplace``, ``DiagLaplace``, ``KronLaplace``,
   ``LowRankLaplace`` (see below), ``FullLLLaplace``, ``DiagLLLaplace``,
   ``KronLLLaplace``, ``FullSubnetLaplace`` and ``DiagSubnetLaplace`` (indices from
   ``subnetwork.npy`` where present) on the training set with ONE DataLoader batch of
   all points, with the default backend (``CurvlinopsGGN``, ``stochastic=False``:
   exact GGN; its ``diag`` and its subnetwork ``full`` fall back to the torch.func
   ``GGNInterface``), prior precision 0.7, prior mean 0, sigma_noise 0.6 (regression)
   or 1 (classification), temperature 1;
4. records marginal likelihoods (and their pieces), posterior precision / covariance /
   variance, GLM and NN predictions on the test set, and the prior precision that
   ``optimize_prior_precision`` reaches (marglik, scalar and layer-wise; gridsearch);
5. checks every deterministic laplace-torch number against an independent dense
   evaluation of the formulas written in ``tools/reference/README_posterior.md``
   (curvature from ``expected.safetensors`` / ``kron.safetensors``, Jacobians from
   torch.func ``jacrev``), relative tolerance 1e-9, and refits everything with
   DataLoader batch size 3 to check that nothing depends on the batching;
6. writes ``posterior.safetensors`` and ``posterior_meta.json`` per case.

LowRankLaplace cannot be constructed with laplace-torch 0.3 in this environment (its
constructor raises ImportError unless ``find_spec("asdfghjkl")`` finds the *old*
asdfghjkl module, which the installed ``asdfghjkl 0.1a4`` distribution does not provide;
it ships the module ``asdl`` with a different API). The script therefore builds
laplace-torch's own ``LowRankLaplace`` with that import check patched out for the
duration of the constructor only, and gives it a backend (``LowRankGGN``, a
``CurvlinopsGGN`` subclass) whose ``eig_lowrank`` returns the top-10 eigenpairs of the
exact GGN (``torch.linalg.eigh``), with AsdfghjklHessian's conventions (keep eigenvalues
> 1e-6, eigenvalues and loss times ``factor``). Everything downstream (fit, marglik,
predictive, sampling, prior optimization) is laplace-torch's LowRankLaplace code.

The script exits non-zero if a check fails.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
import traceback
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

warnings.filterwarnings("ignore")
torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # tiny problems: one thread is fastest, and thread-count independent

import laplace  # noqa: E402
import laplace.baselaplace as baselaplace  # noqa: E402
import scipy.optimize  # noqa: E402
import torchmetrics  # noqa: E402
from laplace import (  # noqa: E402
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    KronLaplace,
    KronLLLaplace,
    LowRankLaplace,
)
from laplace.curvature import CurvlinopsGGN  # noqa: E402
from laplace.utils import validate  # noqa: E402
from laplace.utils.metrics import RunningNLLMetric  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.nn.utils import parameters_to_vector  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
FIX = os.path.join(REPO, "crates", "laplace", "tests", "fixtures")

CASES = ["reg_multi", "reg_single", "cls_mlp", "cls_cnn"]

# hyperparameters
DELTA = 0.7            # prior precision (scalar)
PRIOR_MEAN = 0.0
SIGMA_REG = 0.6        # regression sigma_noise (classification: 1)
TEMPERATURE = 1.0
AT_PRIOR = 1.9         # log_marglik_at
AT_SIGMA = 0.45
PRIOR_MEAN_ALT = 0.1   # log_marglik_prior_mean
N_TEST = 5
MC_GLM = 100_000       # glm.mc samples
MC_NN = 20_000         # nn samples
LOW_RANK = 10          # AsdfghjklHessian's default low_rank
LOW_RANK_EPS = 1e-6    # AsdfghjklHessian's EPS
BATCH_CHECK = 3        # second fit with this DataLoader batch size
MAX_DENSE_P = 128      # full posterior_precision / _covariance are written only up to this size
RTOL = 1e-9

# optimize_prior_precision defaults of ParametricLaplace (laplace-torch 0.3)
OPT_DEFAULTS = dict(pred_type="glm", n_steps=100, lr=0.1, init_prior_prec=1.0,
                    prior_structure="scalar", optimizer="torch.optim.Adam on log(prior_prec)")
GRID_DEFAULTS = dict(pred_type="glm", link_approx="probit", n_samples=100,
                     log_prior_prec_min=-4, log_prior_prec_max=4, grid_size=100,
                     log_prior_prec_base=10.0)


def layerwise_values(n):
    return torch.tensor([0.3 + 0.2 * i for i in range(n)])


def diagonal_values(n):
    # one value per parameter, in (0.4, 1.0]
    return 0.4 + 0.6 * ((torch.arange(n) * 7) % 11).double() / 10.0


def case_seed(tag, name):
    return int(hashlib.sha256(f"{tag}:{name}".encode()).hexdigest()[:8], 16) % (2**31)


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    nb = torch.linalg.norm(b.reshape(-1))
    d = torch.linalg.norm((a - b).reshape(-1))
    return float(d / nb) if nb > 0 else float(d)


class CheckFailed(Exception):
    pass


# --------------------------------------------------------------------------
# the low-rank backend (see module docstring)
# --------------------------------------------------------------------------

class LowRankGGN(CurvlinopsGGN):
    """CurvlinopsGGN plus the ``eig_lowrank`` method that ``LowRankLaplace.fit`` calls.

    Top-``LOW_RANK`` eigenpairs of the exact GGN summed over the loader (dense
    ``CurvlinopsGGN.full`` then ``torch.linalg.eigh``), eigenvalues > ``LOW_RANK_EPS``
    kept, like ``AsdfghjklHessian.eig_lowrank`` (which would use Hessian eigenpairs from
    asdfghjkl's power iteration). Eigenvalues and loss include laplace-torch's ``factor``
    (the ``full`` output already does). Each eigenvector's sign is fixed so that its
    entry of largest magnitude is positive.
    """

    last_spectrum = None

    def eig_lowrank(self, data_loader):
        H, loss = None, 0.0
        for X, y in data_loader:
            l, h = self.full(X, y)
            H = h if H is None else H + h
            loss = loss + l
        evals, evecs = torch.linalg.eigh(H)
        order = torch.argsort(evals, descending=True)
        LowRankGGN.last_spectrum = evals[order].clone()
        order = order[:LOW_RANK]
        evals, evecs = evals[order], evecs[:, order]
        mask = evals > LOW_RANK_EPS
        evals, evecs = evals[mask], evecs[:, mask]
        idx = evecs.abs().argmax(0)
        signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
        evecs = evecs * signs
        return evecs.contiguous(), evals.contiguous(), loss


def make_lowrank(model, lik, **kw):
    orig = baselaplace.find_spec
    baselaplace.find_spec = lambda name, *a: (object() if name == "asdfghjkl" else orig(name, *a))
    try:
        return LowRankLaplace(model, lik, backend=LowRankGGN, **kw)
    finally:
        baselaplace.find_spec = orig


def lowrank_import_error():
    try:
        LowRankLaplace(nn.Sequential(nn.Linear(2, 2)), "regression")
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


# structure, subset, class
STRUCTS = [
    ("full", "all", FullLaplace),
    ("diag", "all", DiagLaplace),
    ("kron", "all", KronLaplace),
    ("lowrank", "all", LowRankLaplace),
    ("full", "last_layer", FullLLLaplace),
    ("diag", "last_layer", DiagLLLaplace),
    ("kron", "last_layer", KronLLLaplace),
    ("full", "subnetwork", FullSubnetLaplace),
    ("diag", "subnetwork", DiagSubnetLaplace),
]


# --------------------------------------------------------------------------
# case loading
# --------------------------------------------------------------------------

def build_model(spec):
    layers = []
    for layer in spec["layers"]:
        args = {k: v for k, v in layer.items() if k != "type"}
        for k in ("kernel_size", "stride", "padding", "dilation"):
            if isinstance(args.get(k), list):
                args[k] = tuple(args[k])
        layers.append(getattr(nn, layer["type"])(**args))
    return nn.Sequential(*layers)


def load_case(name):
    d = os.path.join(FIX, name)
    with open(os.path.join(d, "model.json")) as fh:
        spec = json.load(fh)
    with open(os.path.join(d, "meta.json")) as fh:
        meta = json.load(fh)
    model = build_model(spec)
    w = load_file(os.path.join(d, "weights.safetensors"))
    for k, v in w.items():
        assert v.dtype == torch.float64, k
    model.load_state_dict(w, strict=True)
    model.eval()
    data = np.load(os.path.join(d, "data.npz"))
    x = torch.from_numpy(data["x"]).clone()
    y = torch.from_numpy(data["y"]).clone()
    exp = load_file(os.path.join(d, "expected.safetensors"))
    kron = load_file(os.path.join(d, "kron.safetensors"))
    with torch.no_grad():
        f = model(x)
    if not torch.equal(f, exp["jacobians.f"]):
        raise CheckFailed(f"{name}: model output differs from jacobians.f "
                          f"(rel {rel(f, exp['jacobians.f']):.1e})")
    lik = meta["likelihood"]
    idx_path = os.path.join(d, "subnetwork.npy")
    subnet = torch.from_numpy(np.load(idx_path)) if os.path.exists(idx_path) else None
    C = f.shape[1]
    # test set
    seed = case_seed("posterior_test", name)
    rng = np.random.default_rng(seed)
    xt = rng.standard_normal((N_TEST, *spec["input_shape"]))
    if lik == "regression":
        yt = rng.standard_normal((N_TEST, C))
    else:
        yt = rng.integers(0, C, size=N_TEST).astype(np.int64)
    np.savez(os.path.join(d, "posterior_test.npz"), x=xt, y=yt)
    chk = np.load(os.path.join(d, "posterior_test.npz"))
    assert chk["x"].dtype == np.float64 and chk["y"].dtype == (np.float64 if lik == "regression" else np.int64)
    names = [n for n, _ in model.named_parameters()]
    layout, off = [], 0
    for n, p in model.named_parameters():
        layout.append(dict(name=n, shape=list(p.shape), offset=off, numel=p.numel()))
        off += p.numel()
    last_idx = len(model) - 1
    assert isinstance(model[last_idx], nn.Linear)
    ll_names = [n for n in names if n.startswith(f"{last_idx}.")]
    P_ll = sum(l["numel"] for l in layout if l["name"] in ll_names)
    return dict(name=name, dir=d, spec=spec, meta=meta, model=model, x=x, y=y,
                xt=torch.from_numpy(xt), yt=torch.from_numpy(yt), exp=exp, kron=kron,
                lik=lik, C=C, N=x.shape[0], P=off, P_ll=P_ll, layout=layout,
                ll_names=ll_names, subnet=subnet, test_seed=seed,
                sigma=SIGMA_REG if lik == "regression" else 1.0,
                seed=case_seed("posterior_mc", name))


# --------------------------------------------------------------------------
# the independent dense evaluation of the formulas
# --------------------------------------------------------------------------

def jacobians_def(model, x):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fwd(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    Jd = vmap(jacrev(fwd), in_dims=(None, 0))(params, x)
    f = vmap(fwd, in_dims=(None, 0))(params, x)
    n, c = f.shape
    return torch.cat([Jd[k].reshape(n, c, -1) for k in params], -1), f


class Ref:
    """Dense reference of one structure/subset: curvature, parameters, Jacobians."""

    def __init__(self, case, struct, subset, la):
        self.case, self.struct, self.subset = case, struct, subset
        P, P_ll = case["P"], case["P_ll"]
        theta = parameters_to_vector(case["model"].parameters()).detach()
        J, _ = jacobians_def(case["model"], case["xt"])
        if subset == "all":
            sl = torch.arange(P)
            self.tensor_sizes = [l["numel"] for l in case["layout"]]
        elif subset == "last_layer":
            sl = torch.arange(P - P_ll, P)
            self.tensor_sizes = [l["numel"] for l in case["layout"] if l["name"] in case["ll_names"]]
        else:
            sl = case["subnet"]
            self.tensor_sizes = None
        self.theta, self.J = theta[sl], J[:, :, sl]
        self.n = len(sl)
        exp = case["exp"]
        pre = {"all": "", "last_layer": "last_layer.", "subnetwork": "subnetwork."}[subset]
        if struct == "full":
            self.H = exp[f"{pre}ggn.full"]
        elif struct == "diag":
            self.H = torch.diag(exp[f"{pre}ggn.diag"])
        elif struct == "kron":
            nb = len([k for k in case["kron"] if k.startswith("ggn.expand.") and k.endswith(".product")])
            blocks = [case["kron"][f"ggn.expand.{b}.product"] for b in range(nb)]
            if subset == "last_layer":
                blocks = blocks[-len(case["ll_names"]):]
            self.H = torch.block_diag(*blocks)
            self.block_sizes = [b.shape[0] for b in blocks]
        elif struct == "lowrank":
            ev, U = torch.linalg.eigh(exp["ggn.full"])
            o = torch.argsort(ev, descending=True)[:LOW_RANK]
            ev, U = ev[o], U[:, o]
            m = ev > LOW_RANK_EPS
            self.H = U[:, m] @ torch.diag(ev[m]) @ U[:, m].T
        self.loss = exp["loss"][0]
        self.f_train = exp["jacobians.f"]

    def prior_diag(self, prior):
        prior = torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
        if len(prior) == 1:
            return prior * torch.ones(self.n)
        if len(prior) == self.n:
            return prior
        assert self.tensor_sizes is not None and len(prior) == len(self.tensor_sizes)
        return torch.cat([v * torch.ones(k) for v, k in zip(prior, self.tensor_sizes)])

    def evidence(self, prior, sigma, prior_mean=0.0, T=TEMPERATURE):
        case = self.case
        p0 = self.prior_diag(prior)
        hf = 1.0 / (sigma ** 2) / T
        Ppost = hf * self.H + torch.diag(p0)
        if case["lik"] == "regression":
            loglik = -hf * self.loss - case["N"] * case["C"] * math.log(sigma * math.sqrt(2 * math.pi))
        else:
            loglik = -self.loss / T
        d = self.theta - prior_mean
        scatter = (d * p0) @ d
        ld_prior = p0.log().sum()
        ld_post = torch.linalg.slogdet(Ppost)[1]
        lml = loglik - 0.5 * (ld_post - ld_prior + scatter)
        return dict(log_marglik=lml, log_likelihood=loglik, scatter=scatter,
                    log_det_prior_precision=ld_prior, log_det_posterior_precision=ld_post,
                    log_det_ratio=ld_post - ld_prior, Ppost=Ppost)

    def predictive(self, prior, sigma):
        Ppost = self.evidence(prior, sigma)["Ppost"]
        Sigma = torch.linalg.inv(Ppost)
        Sigma = 0.5 * (Sigma + Sigma.T)
        f_var = torch.einsum("ncp,pq,nkq->nck", self.J, Sigma, self.J)
        return Sigma, f_var


def probit_ref(f_mu, f_var):
    kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(f_var, dim1=1, dim2=2))
    return torch.softmax(kappa * f_mu, -1)


def bridge_ref(f_mu, f_var, norm):
    out = []
    for mu, V in zip(f_mu, f_var):
        K = mu.shape[0]
        s = V.sum()
        r = V.sum(1)
        mu = mu - r * mu.sum() / s
        V = V - torch.outer(r, V.sum(0)) / s
        d = torch.diagonal(V).clone()
        if norm:
            c = d.mean() / math.sqrt(K / 2)
            mu = mu / math.sqrt(c)
            d = d / c
        alpha = (1 - 2 / K + torch.exp(mu) / K**2 * torch.exp(-mu).sum()) / d
        out.append(torch.nan_to_num(alpha / alpha.sum(), nan=1.0))
    return torch.stack(out)


# --------------------------------------------------------------------------
# laplace-torch runs
# --------------------------------------------------------------------------

def make_la(case, struct, subset, cls):
    model = copy.deepcopy(case["model"])
    kw = dict(sigma_noise=case["sigma"], prior_precision=DELTA, prior_mean=PRIOR_MEAN,
              temperature=TEMPERATURE)
    if struct == "lowrank":
        return make_lowrank(model, case["lik"], **kw)
    if subset == "subnetwork":
        kw["subnetwork_indices"] = torch.LongTensor(case["subnet"])
    return cls(model, case["lik"], **kw)


def fit_la(case, struct, subset, cls, batch_size):
    la = make_la(case, struct, subset, cls)
    loader = DataLoader(TensorDataset(case["x"], case["y"]), batch_size=batch_size, shuffle=False)
    la.fit(loader)
    return la


def reset(la, case):
    la.prior_precision = DELTA
    la.prior_mean = PRIOR_MEAN
    la.sigma_noise = case["sigma"]


def t1(v):
    return torch.as_tensor(v).detach().reshape(-1).clone().double()


def dense_H(la, struct):
    if struct == "full":
        return la.H.detach().clone()
    if struct == "diag":
        return torch.diag(la.H.detach())
    if struct == "kron":
        return la.H_facs.to_matrix()
    if struct == "lowrank":
        U, lam = la.H
        return U @ torch.diag(lam) @ U.T


def deterministic_values(la, case, struct, subset, calls, errors):
    """Everything that does not involve sampling or optimisation."""
    lik = case["lik"]
    v = {}

    def rec(key, call, fn):
        try:
            val = fn()
        except Exception as e:  # noqa: BLE001
            errors[key] = f"{call}: {type(e).__name__}: {e}"
            return None
        finally:
            reset(la, case)
        if val is not None:
            v[key] = val
            calls[key] = call
        return val

    rec("log_marglik", "la.log_marginal_likelihood()", lambda: t1(la.log_marginal_likelihood()))
    for attr in ("log_likelihood", "log_det_ratio", "scatter", "log_det_prior_precision",
                 "log_det_posterior_precision"):
        rec(attr, f"la.{attr}", lambda attr=attr: t1(getattr(la, attr)))
    if lik == "regression":
        rec("log_marglik_at",
            f"la.log_marginal_likelihood(prior_precision=torch.tensor([{AT_PRIOR}]), "
            f"sigma_noise=torch.tensor([{AT_SIGMA}]))  (mutates la; reset afterwards)",
            lambda: t1(la.log_marginal_likelihood(prior_precision=torch.tensor([AT_PRIOR]),
                                                  sigma_noise=torch.tensor([AT_SIGMA]))))
    else:
        rec("log_marglik_at",
            f"la.log_marginal_likelihood(prior_precision=torch.tensor([{AT_PRIOR}]))  "
            "(mutates la; reset afterwards)",
            lambda: t1(la.log_marginal_likelihood(prior_precision=torch.tensor([AT_PRIOR]))))
    nl = la.n_layers
    rec("log_marglik_layerwise",
        f"la.log_marginal_likelihood(prior_precision=0.3 + 0.2 * torch.arange(la.n_layers={nl}))",
        lambda: t1(la.log_marginal_likelihood(prior_precision=layerwise_values(nl))))
    n_sub = case["P"] if subset == "all" else (case["P_ll"] if subset == "last_layer" else len(case["subnet"]))
    rec("log_marglik_diagonal_prior",
        f"la.log_marginal_likelihood(prior_precision=diagonal_values({n_sub}))",
        lambda: t1(la.log_marginal_likelihood(prior_precision=diagonal_values(n_sub))))
    if subset == "subnetwork":
        # the other length one might try: one value per parameter of the whole model
        try:
            la.log_marginal_likelihood(prior_precision=diagonal_values(case["P"]))
            errors["log_marglik_diagonal_prior(len P)"] = "unexpectedly succeeded"
        except Exception as e:  # noqa: BLE001
            errors["log_marglik_diagonal_prior(len P)"] = (
                f"la.log_marginal_likelihood(prior_precision=diagonal_values(P={case['P']})): "
                f"{type(e).__name__}: {e}")
        reset(la, case)

    def pm():
        la.prior_mean = PRIOR_MEAN_ALT
        return t1(la.log_marginal_likelihood())
    rec("log_marglik_prior_mean", f"la.prior_mean = {PRIOR_MEAN_ALT}; la.log_marginal_likelihood()", pm)

    # posterior
    if struct == "full":
        v["posterior_precision"] = la.posterior_precision.detach().clone()
        calls["posterior_precision"] = "la.posterior_precision"
        v["posterior_covariance"] = la.posterior_covariance.detach().clone()
        calls["posterior_covariance"] = "la.posterior_covariance (= scale @ scale.T, scale = la.posterior_scale)"
        v["posterior_variance"] = torch.diagonal(v["posterior_covariance"]).clone()
        calls["posterior_variance"] = "torch.diagonal(la.posterior_covariance) (FullLaplace has no posterior_variance)"
    elif struct == "diag":
        v["posterior_precision"] = la.posterior_precision.detach().clone()
        calls["posterior_precision"] = "la.posterior_precision"
        v["posterior_variance"] = la.posterior_variance.detach().clone()
        calls["posterior_variance"] = "la.posterior_variance"
    elif struct == "kron":
        M = la.posterior_precision.to_matrix()
        v["posterior_precision_dense"] = M
        calls["posterior_precision_dense"] = "la.posterior_precision.to_matrix()  (KronDecomposed incl. prior)"
        off = 0
        for b, ls in enumerate(la.posterior_precision.eigenvalues):
            k = int(np.prod([len(l) for l in ls]))
            v[f"posterior_precision_block.{b}"] = M[off:off + k, off:off + k].clone()
            calls[f"posterior_precision_block.{b}"] = f"diagonal block {b} of la.posterior_precision.to_matrix()"
            off += k
        v["posterior_variance"] = la.posterior_precision.diag(exponent=-1).detach().clone()
        calls["posterior_variance"] = "la.posterior_precision.diag(exponent=-1)"
    elif struct == "lowrank":
        U, lam = la.H
        v["eigenvectors"] = U.detach().clone()
        calls["eigenvectors"] = "la.H[0] (LowRankGGN.eig_lowrank: top-k GGN eigenvectors, sign-normalised)"
        v["eigenvalues"] = lam.detach().clone()
        calls["eigenvalues"] = "la.H[1] (GGN eigenvalues incl. factor, before 1/(sigma^2 T))"
        V, Kinv = la.V, la.Kinv
        v["posterior_variance"] = (1.0 / la.prior_precision_diag
                                   - torch.einsum("pl,lm,pm->p", V, Kinv, V)).detach().clone()
        calls["posterior_variance"] = "1/la.prior_precision_diag - diag(la.V @ la.Kinv @ la.V.T)"

    # GLM predictive
    xt = case["xt"]
    f_mu, f_var = la._glm_predictive_distribution(xt)
    v["glm.f_mu"], v["glm.f_var"] = f_mu.clone(), f_var.clone()
    calls["glm.f_mu"] = calls["glm.f_var"] = "la._glm_predictive_distribution(x_test)"
    if lik == "classification":
        for link in ("probit", "bridge", "bridge_norm"):
            v[f"glm.{link}.probs"] = la(xt, pred_type="glm", link_approx=link).detach().clone()
            calls[f"glm.{link}.probs"] = f"la(x_test, pred_type='glm', link_approx='{link}')"
    else:
        mu2, var2 = la(xt, pred_type="glm")
        assert torch.equal(mu2, f_mu) and torch.equal(var2, f_var)
        v["glm.pred_cov"] = (f_var + case["sigma"] ** 2 * torch.eye(case["C"])).clone()
        calls["glm.pred_cov"] = ("glm.f_var + sigma_noise^2 * I  (computed by this script: "
                                 "la(x, pred_type='glm') returns (f_mu, f_var) WITHOUT sigma^2)")
        _, jc = la(xt, pred_type="glm", joint=True)
        v["glm.joint_f_cov"] = jc.detach().clone()
        calls["glm.joint_f_cov"] = "la(x_test, pred_type='glm', joint=True)[1]  ((N*C, N*C), row n*C + c)"
    return v


def check_against_ref(v, la, ref, case, struct, subset, checks):
    """Compare laplace-torch values with the dense evaluation; return max rel error."""
    worst = 0.0

    def c(name, a, b, tol=RTOL):
        nonlocal worst
        e = rel(a, b)
        checks[name] = e
        worst = max(worst, e)
        if not e <= tol:
            raise CheckFailed(f"{case['name']} {struct}.{subset} {name}: rel {e:.2e}")

    sig = case["sigma"]
    c("H vs expected/kron fixture", dense_H(la, struct), ref.H)
    ev = ref.evidence(DELTA, sig)
    for k in ("log_marglik", "log_likelihood", "scatter", "log_det_prior_precision",
              "log_det_posterior_precision", "log_det_ratio"):
        c(k, v[k], ev[k].reshape(1))
    ev_at = ref.evidence(AT_PRIOR, AT_SIGMA if case["lik"] == "regression" else 1.0)
    c("log_marglik_at", v["log_marglik_at"], ev_at["log_marglik"].reshape(1))
    if "log_marglik_layerwise" in v:
        c("log_marglik_layerwise", v["log_marglik_layerwise"],
          ref.evidence(layerwise_values(la.n_layers), sig)["log_marglik"].reshape(1))
    if "log_marglik_diagonal_prior" in v:
        c("log_marglik_diagonal_prior", v["log_marglik_diagonal_prior"],
          ref.evidence(diagonal_values(ref.n), sig)["log_marglik"].reshape(1))
    c("log_marglik_prior_mean", v["log_marglik_prior_mean"],
      ref.evidence(DELTA, sig, prior_mean=PRIOR_MEAN_ALT)["log_marglik"].reshape(1))
    Sigma, f_var = ref.predictive(DELTA, sig)
    if struct == "full":
        c("posterior_precision", v["posterior_precision"], ev["Ppost"])
        c("posterior_covariance", v["posterior_covariance"], Sigma)
    if struct == "diag":
        c("posterior_precision", v["posterior_precision"], torch.diagonal(ev["Ppost"]))
    if struct == "kron":
        c("posterior_precision_dense", v["posterior_precision_dense"], ev["Ppost"])
    c("posterior_variance", v["posterior_variance"], torch.diagonal(Sigma))
    with torch.no_grad():
        f_mu = case["model"](case["xt"])
    c("glm.f_mu", v["glm.f_mu"], f_mu)
    c("glm.f_var", v["glm.f_var"], f_var)
    if case["lik"] == "classification":
        c("glm.probit.probs", v["glm.probit.probs"], probit_ref(f_mu, f_var))
        c("glm.bridge.probs", v["glm.bridge.probs"], bridge_ref(f_mu, f_var, False))
        c("glm.bridge_norm.probs", v["glm.bridge_norm.probs"], bridge_ref(f_mu, f_var, True))
    else:
        Jf = ref.J.reshape(-1, ref.n)
        c("glm.joint_f_cov", v["glm.joint_f_cov"], Jf @ Sigma @ Jf.T)
    return worst


def sampling_values(la, case, struct, subset, calls, seed):
    lik, xt = case["lik"], case["xt"]
    v = {}
    if lik == "classification":
        torch.manual_seed(seed)
        p = la(xt, pred_type="glm", link_approx="mc", n_samples=MC_GLM)
        torch.manual_seed(seed)
        s = la.predictive_samples(xt, pred_type="glm", n_samples=MC_GLM)
        assert rel(s.mean(0), p) < 1e-12, rel(s.mean(0), p)
        v["glm.mc.probs"] = p.detach().clone()
        v["glm.mc.probs_se"] = (s.std(0) / math.sqrt(MC_GLM)).detach().clone()
        calls["glm.mc.probs"] = (f"torch.manual_seed({seed}); la(x_test, pred_type='glm', "
                                 f"link_approx='mc', n_samples={MC_GLM})")
        calls["glm.mc.probs_se"] = ("std/sqrt(n) of la.predictive_samples(x_test, pred_type='glm', "
                                    f"n_samples={MC_GLM}) under the same seed (same draws)")
        torch.manual_seed(seed + 1)
        p = la(xt, pred_type="nn", link_approx="mc", n_samples=MC_NN)
        torch.manual_seed(seed + 1)
        s = la.predictive_samples(xt, pred_type="nn", n_samples=MC_NN)
        assert rel(s.mean(0), p) < 1e-12, rel(s.mean(0), p)
        v["nn.probs"] = p.detach().clone()
        v["nn.probs_se"] = (s.std(0) / math.sqrt(MC_NN)).detach().clone()
        calls["nn.probs"] = (f"torch.manual_seed({seed + 1}); la(x_test, pred_type='nn', "
                             f"link_approx='mc', n_samples={MC_NN})")
        calls["nn.probs_se"] = ("std/sqrt(n) of la.predictive_samples(x_test, pred_type='nn', "
                                f"n_samples={MC_NN}) under the same seed (same draws)")
    else:
        torch.manual_seed(seed + 1)
        # link_approx='mc' is required even for regression (the default 'probit' raises)
        m, var = la(xt, pred_type="nn", link_approx="mc", n_samples=MC_NN)
        v["nn.f_mean"], v["nn.f_var"] = m.detach().clone(), var.detach().clone()
        calls["nn.f_mean"] = calls["nn.f_var"] = (
            f"torch.manual_seed({seed + 1}); la(x_test, pred_type='nn', link_approx='mc', n_samples={MC_NN}) "
            "-> (samples.mean(0), samples.var(0)) of f, (N, C), unbiased var, no sigma^2")
    return v


def argmax_scalar(ref, sigma):
    """The exact maximiser of the evidence over a scalar prior precision (Brent on log)."""
    fun = lambda t: -float(ref.evidence(math.exp(t), sigma)["log_marglik"])  # noqa: E731
    r = scipy.optimize.minimize_scalar(fun, bounds=(-12.0, 12.0), method="bounded",
                                       options=dict(xatol=1e-10, maxiter=500))
    return math.exp(r.x), -r.fun


def grad_log_prior(ref, prior, sigma):
    t = torch.as_tensor(prior).double().reshape(-1).log().clone().requires_grad_(True)
    lml = ref.evidence(t.exp() if len(t) > 1 else t.exp()[0], sigma)["log_marglik"]
    (g,) = torch.autograd.grad(lml, t)
    return g.detach()


def optimisation_values(case, struct, subset, cls, ref, calls, errors, info, test_loader):
    v = {}
    sig = case["sigma"]
    # marglik, scalar (laplace-torch's defaults)
    la = fit_la(case, struct, subset, cls, case["N"])
    la.optimize_prior_precision(method="marglik")
    v["optimized.prior_precision"] = t1(la.prior_precision)
    v["optimized.log_marglik"] = t1(la.log_marginal_likelihood())
    calls["optimized.prior_precision"] = calls["optimized.log_marglik"] = (
        "la.optimize_prior_precision(method='marglik')  [defaults: pred_type='glm', n_steps=100, "
        "lr=0.1, init_prior_prec=1.0, prior_structure='scalar'; Adam on log prior_prec]; "
        "then la.prior_precision, la.log_marginal_likelihood()")
    e = rel(v["optimized.log_marglik"], ref.evidence(v["optimized.prior_precision"], sig)["log_marglik"].reshape(1))
    if not e <= RTOL:
        raise CheckFailed(f"{case['name']} {struct}.{subset} optimized.log_marglik rel {e:.1e}")
    d_star, lml_star = argmax_scalar(ref, sig)
    info["optimized"] = dict(
        prior_precision=float(v["optimized.prior_precision"][0]),
        log_marglik=float(v["optimized.log_marglik"][0]),
        dlogML_dlogprior_at_result=float(grad_log_prior(ref, v["optimized.prior_precision"], sig)[0]),
        exact_argmax_prior_precision=d_star, exact_max_log_marglik=lml_star,
        evidence_gap_to_exact_max=lml_star - float(v["optimized.log_marglik"][0]))
    # marglik, layer-wise
    la = fit_la(case, struct, subset, cls, case["N"])
    call = "la.optimize_prior_precision(method='marglik', prior_structure='layerwise')"
    try:
        la.optimize_prior_precision(method="marglik", prior_structure="layerwise")
        v["optimized_layerwise.prior_precision"] = t1(la.prior_precision)
        v["optimized_layerwise.log_marglik"] = t1(la.log_marginal_likelihood())
        calls["optimized_layerwise.prior_precision"] = calls["optimized_layerwise.log_marglik"] = (
            call + " [other defaults as above]; then la.prior_precision (one per parameter tensor), "
            "la.log_marginal_likelihood()")
        e = rel(v["optimized_layerwise.log_marglik"],
                ref.evidence(v["optimized_layerwise.prior_precision"], sig)["log_marglik"].reshape(1))
        if not e <= RTOL:
            raise CheckFailed(f"{case['name']} {struct}.{subset} optimized_layerwise rel {e:.1e}")
        g = grad_log_prior(ref, v["optimized_layerwise.prior_precision"], sig)
        info["optimized_layerwise"] = dict(
            prior_precision=v["optimized_layerwise.prior_precision"].tolist(),
            log_marglik=float(v["optimized_layerwise.log_marglik"][0]),
            max_abs_dlogML_dlogprior_at_result=float(g.abs().max()))
    except CheckFailed:
        raise
    except Exception as ex:  # noqa: BLE001
        errors["optimized_layerwise"] = f"{call}: {type(ex).__name__}: {ex}"
    # gridsearch
    la = fit_la(case, struct, subset, cls, case["N"])
    la.optimize_prior_precision(method="gridsearch", val_loader=test_loader)
    v["gridsearch.prior_precision"] = t1(la.prior_precision)
    v["gridsearch.log_marglik"] = t1(la.log_marginal_likelihood())
    metric = ("torchmetrics.MeanSquaredError(num_outputs=C)" if case["lik"] == "regression"
              else "laplace.utils.metrics.RunningNLLMetric()")
    calls["gridsearch.prior_precision"] = calls["gridsearch.log_marglik"] = (
        "la.optimize_prior_precision(method='gridsearch', val_loader=DataLoader(test set, "
        "batch_size=5))  [defaults: pred_type='glm', link_approx='probit', grid = "
        f"torch.logspace(-4, 4, 100), loss = {metric}]; then la.prior_precision, "
        "la.log_marginal_likelihood()")
    # the per-grid validation losses, fresh metric each, and the running (un-reset) metric
    # that laplace-torch's _gridsearch actually compares
    grid = torch.logspace(-4, 4, 100, base=10.0)

    def new_metric():
        return (torchmetrics.MeanSquaredError(num_outputs=case["C"]) if case["lik"] == "regression"
                else RunningNLLMetric())
    shared = new_metric()
    fresh, cum = [], []
    for p in grid:
        la.prior_precision = p
        fresh.append(validate(la, test_loader, new_metric(), pred_type="glm", link_approx="probit"))
        cum.append(validate(la, test_loader, shared, pred_type="glm", link_approx="probit"))
    fresh, cum = torch.tensor(fresh), torch.tensor(cum)
    chosen_cum = grid[int(np.argmin(cum.numpy()))]
    chosen_fresh = grid[int(np.argmin(fresh.numpy()))]
    if not torch.equal(chosen_cum.reshape(1), v["gridsearch.prior_precision"]):
        raise CheckFailed(f"{case['name']} {struct}.{subset}: gridsearch choice "
                          f"{float(v['gridsearch.prior_precision'][0])} != argmin of running metric "
                          f"{float(chosen_cum)}")
    v["gridsearch.val_loss"] = fresh
    v["gridsearch.val_loss_running"] = cum
    calls["gridsearch.val_loss"] = (
        "laplace.utils.validate(la, test_loader, <fresh metric>, pred_type='glm', "
        "link_approx='probit') for each grid value (the loss at each grid point)")
    calls["gridsearch.val_loss_running"] = (
        "laplace.utils.validate with ONE metric object over the grid, as _gridsearch does "
        "(never reset: value k = loss averaged over grid points 0..k); "
        "gridsearch.prior_precision = grid[argmin(this)]")
    info["gridsearch"] = dict(
        chosen=float(v["gridsearch.prior_precision"][0]),
        argmin_of_per_grid_loss=float(chosen_fresh),
        per_grid_loss_at_chosen=float(fresh[int(np.argmin(cum.numpy()))]),
        per_grid_loss_min=float(fresh.min()),
        n_distinct_per_grid_losses=int(len(torch.unique(fresh))))
    return v


def run_structure(case, struct, subset, cls, test_loader, ref_cache):
    calls, errors, checks, info = {}, {}, {}, {}
    la = fit_la(case, struct, subset, cls, case["N"])
    be = la.backend
    assert isinstance(be, CurvlinopsGGN) and not be.stochastic
    info["class"] = type(la).__name__
    info["backend"] = (f"{type(be).__name__}(stochastic=False)"
                       + (" (laplace-torch default)" if struct != "lowrank" else
                          " (CurvlinopsGGN subclass with eig_lowrank; see README_posterior.md)"))
    info["n_params"] = int(la.n_params if subset != "subnetwork" else la.n_params_subnet)
    info["n_layers"] = la.n_layers
    info["la.n_params"] = la.n_params
    if struct == "kron":
        info["damping"] = la.damping
    if struct == "lowrank":
        sp = LowRankGGN.last_spectrum
        info["lowrank"] = dict(k=int(la.H[1].numel()), eigenvalues=la.H[1].tolist(),
                               next_eigenvalue=float(sp[LOW_RANK]) if len(sp) > LOW_RANK else None,
                               relative_gap_k=float((sp[LOW_RANK - 1] - sp[LOW_RANK]) / sp[LOW_RANK - 1]))
    v = deterministic_values(la, case, struct, subset, calls, errors)
    ref = Ref(case, struct, subset, la)
    ref_cache[(struct, subset)] = ref
    info["max_rel_err_vs_dense_formulas"] = check_against_ref(v, la, ref, case, struct, subset, checks)
    # batch-size independence
    la3 = fit_la(case, struct, subset, cls, BATCH_CHECK)
    v3 = deterministic_values(la3, case, struct, subset, {}, {})
    diffs = {k: rel(v3[k], v[k]) for k in v if k in v3}
    info["batch_size_3_max_rel_diff"] = max(diffs.values())
    info["batch_size_3_worst_key"] = max(diffs, key=diffs.get)
    if info["batch_size_3_max_rel_diff"] > RTOL:
        raise CheckFailed(f"{case['name']} {struct}.{subset}: batch size 3 differs "
                          f"({info['batch_size_3_worst_key']}: {info['batch_size_3_max_rel_diff']:.1e})")
    # sampling
    sidx = STRUCTS.index(next(s for s in STRUCTS if s[0] == struct and s[1] == subset))
    v.update(sampling_values(la, case, struct, subset, calls, case["seed"] + 10 * sidx))
    # optimisation
    v.update(optimisation_values(case, struct, subset, cls, ref, calls, errors, info, test_loader))
    info["checks_rel_err"] = checks
    return v, calls, errors, info


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

FORMULAS = {
    "notation": (
        "theta: the Laplace subset's MAP parameters (all: parameters_to_vector(model.parameters()); "
        "last_layer: the final Linear's weight (C, D) row-major then bias; subnetwork: theta_all[idx] in "
        "the given order). n = their number. H: laplace-torch's curvature = the GGN of the per-point NLL "
        "in the spec's convention (regression: sum_n J_n^T J_n; classification: sum_n J_n^T (diag p_n - "
        "p_n p_n^T) J_n), i.e. la.H (full: (n, n); diag: (n,); kron: Kron factors; lowrank: (U, lam)). "
        "p0: the prior precision expanded to n entries (see prior_precision). mu0: prior mean. sigma: "
        "sigma_noise. T: temperature. N: len(train_loader.dataset). C: number of outputs. "
        "h = 1 / (sigma^2 T) (la._H_factor)."),
    "loss": (
        "la.loss = sum over batches of factor * lossfunc(f, y): regression factor 0.5, MSELoss(reduction="
        "'sum') -> 0.5 sum_n ||y_n - f_n||^2; classification factor 1, CrossEntropyLoss(reduction='sum') "
        "-> sum_n -log softmax(f_n)_{y_n}. Always the whole network's output f, also for last_layer and "
        "subnetwork. Equals expected.safetensors 'loss'."),
    "log_likelihood": (
        "regression: -h * loss - N * C * log(sigma * sqrt(2 pi)) = -1/(2 sigma^2 T) sum_n ||y_n - f_n||^2 "
        "- N C log(sigma sqrt(2 pi)) (the normaliser is not tempered); classification: -loss / T "
        "(sigma is 1)."),
    "scatter": "(theta - mu0)^T diag(p0) (theta - mu0); subnetwork: theta = theta_all[idx].",
    "log_det_prior_precision": "sum(log p0) over the subset's n parameters.",
    "log_det_posterior_precision": (
        "full: logdet(h H + diag(p0)); diag: sum log(h H + p0); kron: per block b (= parameter tensor) "
        "with prior delta_b: two-factor block [B, A] (B: out x out, A: in x in; conv: in_c*kh*kw): eigh of "
        "each factor, eigenvalues clamped at >= 0, each factor's eigenvalues times sqrt(h) "
        "(KronDecomposed.__mul__ distributes h as h^(1/#factors)): sum log(outer(lB sqrt(h), lA sqrt(h)) "
        "+ delta_b); one-factor block (bias): sum log(h l + delta_b); damping=False (default). With "
        "damping=True it would be sum log(outer(lB sqrt(h) + sqrt(delta_b), lA sqrt(h) + sqrt(delta_b))). "
        "lowrank: with lam' = h lam, D = diag(p0), V = D^-1 U, Kinv = (diag(1/lam') + U^T V)^-1: "
        "sum log lam' + sum log p0 - logdet(Kinv) = logdet(U diag(lam') U^T + D)."),
    "log_det_ratio": "log_det_posterior_precision - log_det_prior_precision",
    "log_marglik": (
        "log_likelihood - 0.5 * (log_det_ratio + scatter). No n/2 log(2 pi) terms and no explicit "
        "n_params anywhere (they cancel). log_marginal_likelihood(prior_precision=..., sigma_noise=...) "
        "first ASSIGNS la.prior_precision / la.sigma_noise (permanently) and then evaluates this."),
    "posterior_precision": (
        "full: h H + diag(p0) (n, n); diag: h H + p0 (n,); kron: KronDecomposed = la.H (decomposed "
        "la.H_facs) * h + prior (deltas per block), to_matrix() gives the block-diagonal dense matrix; "
        "lowrank: ((U, h lam), p0) meaning U diag(h lam) U^T + diag(p0)."),
    "posterior_covariance": (
        "full: scale @ scale.T with scale = la.posterior_scale = torch.distributions.multivariate_normal."
        "_precision_to_scale_tril(posterior_precision) (lower-triangular L with L L^T = P^-1). "
        "posterior_variance: full: its diagonal (no property); diag: 1 / posterior_precision; kron: "
        "la.posterior_precision.diag(exponent=-1) = per block sum_pq Q1[m,p]^2 Q2[k,q]^2 / "
        "(outer(l1', l2') + delta)[p,q]; lowrank: 1/p0 - diag(V Kinv V^T)."),
    "prior_precision": (
        "Accepted shapes (setter): scalar / length 1, length la.n_layers, length la.n_params. "
        "la.n_layers = number of parameter TENSORS in la.params (model.parameters() with requires_grad, "
        "in order; each weight and each bias counts: not modules). ParametricLaplace.prior_precision_diag "
        "tests length 1, then n_params (diagonal), then n_layers (layer-wise: value i repeated numel("
        "params[i]) times). Kron: only scalar or layer-wise (setter raises otherwise); block i of the "
        "KronDecomposed is parameter tensor i (Kron.init_from_model(la.params): one block per weight, one "
        "per bias), so layer-wise value i is the delta of block i; a scalar is broadcast to every block. "
        "LLLaplace: la.n_layers = 2 (weight, bias) and the setter accepts length 2, but LLLaplace."
        "prior_precision_diag only knows scalar and diagonal (length P_ll) and raises 'Mismatch of prior "
        "and model' -> layer-wise marglik and prior_structure='layerwise' fail for all last-layer classes "
        "(KronLLLaplace too, in scatter). SubnetLaplace: la.n_params = P of the WHOLE model, "
        "la.n_layers = its tensors; the setter accepts 1, n_layers or P, but SubnetLaplace."
        "prior_precision_diag accepts 1 or S (= len(idx)) -> only a scalar prior works (a length-S "
        "diagonal is rejected by the setter, length P or n_layers by prior_precision_diag)."),
    "prior_mean": (
        "Enters only the scatter (theta - mu0). The posterior mean stays theta_MAP and the predictive does "
        "not change. Last layer: mu0 applies to the last-layer parameters (scalar or length P_ll). "
        "Subnetwork: mu0 is subtracted from theta_all[idx]; the setter allows length 1 or P (whole model) "
        "but length P then fails in scatter (shape S vs P)."),
    "glm_f_mu_f_var": (
        "la._glm_predictive_distribution(x): f_mu = model output at theta_MAP (N_test, C); f_var[m] = J_m "
        "Sigma J_m^T (N_test, C, C), J from backend.jacobians (torch.func jacrev of the whole model; "
        "subnetwork: columns idx) or, for last_layer, backend.last_layer_jacobians (J[m, c, c*D + d] = "
        "phi_m[d], J[m, c, C*D + c] = 1 for the bias). full: einsum('ncp,pq,nkq->nck', J, "
        "posterior_covariance, J); diag: einsum('ncp,p,nkp->nck', J, 1/posterior_precision, J); kron: "
        "posterior_precision.inv_square_form(J) = J (per block Q (1/(outer(l1',l2') + delta)) Q^T) J^T; "
        "lowrank: J D^-1 J^T - (J V) Kinv (J V)^T."),
    "regression_predictive": (
        "la(x, pred_type='glm') returns (f_mu (N, C), f_var (N, C, C)): the FUNCTIONAL variance, sigma^2 "
        "is NOT added (the predictive covariance is f_var + sigma^2 I, key glm.pred_cov, computed by the "
        "script). joint=True returns (f_mu.flatten(), J Sigma J^T (N*C, N*C)), row n*C + c. "
        "pred_type='nn' requires link_approx='mc' even for regression and returns (mean, unbiased var) "
        "over samples of f, again without sigma^2."),
    "probit": "kappa = 1 / sqrt(1 + pi/8 * diag(f_var)); probs = softmax(kappa * f_mu).",
    "bridge": (
        "with V = f_var[m], mu = f_mu[m], K = C, s = sum_ij V_ij, r_i = sum_j V_ij, c_j = sum_i V_ij: "
        "mu' = mu - r * sum_k mu_k / s; V' = V - outer(r, c) / s; d = diag(V'); alpha_i = (1 - 2/K + "
        "exp(mu'_i) / K^2 * sum_j exp(-mu'_j)) / d_i; probs = alpha / sum(alpha), then torch.nan_to_num("
        "nan=1.0) (a NaN row becomes 1.0 entries, unnormalised)."),
    "bridge_norm": (
        "as bridge, but after the zero-mean correction: cbar = mean(d) / sqrt(K/2); mu'' = mu' / sqrt("
        "cbar); d'' = d / cbar; alpha from mu'', d''."),
    "glm_mc": (
        "f_s = f_mu[m] + L_m eps_s, L_m = cholesky(f_var[m]), eps_s ~ N(0, I_C) from the GLOBAL torch RNG "
        "(normal_samples draws randn(C, S) once and uses the same eps_s for every test point; "
        "la(x, generator=g) validates g but does not pass it on); probs = mean_s softmax(f_s)."),
    "nn": (
        "theta_s = la.sample(S) (full: theta + eps @ posterior_scale.T; diag: theta + eps / sqrt(p); "
        "kron: theta + posterior_precision.bmm(eps, exponent=-0.5); lowrank: Woodbury square root; "
        "last_layer: only the last-layer parameters are sampled, features cached; subnetwork: only idx "
        "sampled, other parameters at the MAP); probs = (1/S) sum_s softmax(f(x; theta_s)). Global RNG."),
    "optimize_marglik": (
        "ParametricLaplace.optimize_prior_precision(method='marglik') defaults: pred_type='glm', n_steps=100, "
        "lr=0.1, init_prior_prec=1.0 (restarts from 1.0, NOT from the current prior precision), "
        "prior_structure='scalar' (BaseLaplace's own default would be 'diag'); log_prior_prec = "
        "log(init) (expanded to n_layers for 'layerwise', n_params for 'diag'), torch.optim.Adam([log_prior_prec], "
        "lr); each step: loss = -la.log_marginal_likelihood(prior_precision=exp(log_prior_prec)), backward, "
        "step; finally la.prior_precision = exp(log_prior_prec). sigma_noise is not optimised (no "
        "post-hoc sigma optimisation exists on the object; laplace.marglik_training trains the network)."),
    "optimize_gridsearch": (
        "method='gridsearch': grid = torch.logspace(-4, 4, 100) (base 10); for each value g: la.prior_"
        "precision = g; result = laplace.utils.validate(la, val_loader, loss, pred_type='glm', "
        "link_approx='probit', n_samples=100) with loss = RunningNLLMetric() (classification: mean NLL of "
        "the probit probs) or torchmetrics.MeanSquaredError(num_outputs=C) (regression; validate calls "
        "loss.update(f_mu, f_var, y), gets TypeError and falls back to update(f_mu, y), so only the "
        "mean, which does not depend on the prior, is scored; the result is MSE summed over outputs). "
        "The SAME metric object is used for every grid value and never reset, so result k is the "
        "loss averaged over grid values 0..k. Chosen: grid[argmin(results)]."),
}


def process(name, lowrank_err):
    t0 = time.time()
    case = load_case(name)
    test_loader = DataLoader(TensorDataset(case["xt"], case["yt"]), batch_size=N_TEST, shuffle=False)
    out, meta_structs = {}, {}
    ref_cache = {}
    for struct, subset, cls in STRUCTS:
        if subset == "subnetwork" and case["subnet"] is None:
            continue
        key = f"{struct}.{subset}"
        v, calls, errors, info = run_structure(case, struct, subset, cls, test_loader, ref_cache)
        n = info["n_params"]
        for k, val in v.items():
            if struct == "kron" and k == "posterior_precision_dense":
                info.setdefault("not_written", []).append(
                    f"{key}.{k} ({n}x{n}): = block_diag(posterior_precision_block.0, .1, ...) "
                    "(checked before writing)")
                calls.pop(k, None)
                continue
            if struct == "full" and k in ("posterior_precision", "posterior_covariance") and n > MAX_DENSE_P:
                info.setdefault("not_written", []).append(
                    f"{key}.{k} ({n}x{n}; n > {MAX_DENSE_P}, to save space; checked before writing"
                    + ("; = h * H + diag(p0) with H = expected.safetensors ggn.full)"
                       if k == "posterior_precision" else "; = inverse of that)"))
                calls.pop(k, None)
                continue
            out[f"{key}.{k}"] = v[k].contiguous()
        info["calls"] = calls
        info["unsupported"] = errors
        meta_structs[key] = info
        print(f"  {name} {key}: log_marglik {float(v['log_marglik'][0]):.10g} "
              f"optimized {float(v['optimized.prior_precision'][0]):.6g} -> "
              f"{float(v['optimized.log_marglik'][0]):.10g}; checks <= "
              f"{info['max_rel_err_vs_dense_formulas']:.1e}; bs3 {info['batch_size_3_max_rel_diff']:.1e}; "
              f"{len(errors)} unsupported", flush=True)
    # inputs
    out["inputs.layerwise_prior_precision.all"] = layerwise_values(len(case["layout"]))
    out["inputs.diagonal_prior_precision.all"] = diagonal_values(case["P"])
    out["inputs.diagonal_prior_precision.last_layer"] = diagonal_values(case["P_ll"])
    out["inputs.gridsearch_grid"] = torch.logspace(-4, 4, 100, base=10.0)
    for k, t in out.items():
        assert t.dtype == torch.float64 and torch.isfinite(t).all(), k
    save_file(out, os.path.join(case["dir"], "posterior.safetensors"))
    formulas = FORMULAS
    meta = dict(
        case=name, likelihood=case["lik"], n_data=case["N"], n_test=N_TEST, n_outputs=case["C"],
        n_params=case["P"], n_params_last_layer=case["P_ll"],
        n_params_subnetwork=None if case["subnet"] is None else len(case["subnet"]),
        param_tensors=case["layout"], last_layer_tensors=case["ll_names"],
        model_check="model.json + weights.safetensors rebuilt with getattr(nn, type)(**args); "
                    "output on data.npz x equals expected.safetensors jacobians.f exactly",
        test_set=dict(file="posterior_test.npz", seed=case["test_seed"],
                      how="rng = numpy.random.default_rng(seed); x = rng.standard_normal((5, *input_shape)); "
                          + ("y = rng.standard_normal((5, C))" if case["lik"] == "regression"
                             else "y = rng.integers(0, C, size=5) (int64)"),
                      seed_from="int(sha256('posterior_test:<case>').hexdigest()[:8], 16) % 2**31"),
        hyperparameters=dict(
            prior_precision=DELTA, prior_mean=PRIOR_MEAN, sigma_noise=case["sigma"],
            temperature=TEMPERATURE,
            log_marglik_at=dict(prior_precision=AT_PRIOR,
                                sigma_noise=AT_SIGMA if case["lik"] == "regression" else None),
            log_marglik_layerwise="prior_precision[i] = 0.3 + 0.2 * i, i over la.n_layers "
                                  "(= parameter tensors of the Laplace subset); written as "
                                  "inputs.layerwise_prior_precision.all",
            log_marglik_diagonal_prior="prior_precision[p] = 0.4 + 0.6 * ((7 p) mod 11) / 10, "
                                       "p over the subset's parameters; inputs.diagonal_prior_precision.*",
            log_marglik_prior_mean=PRIOR_MEAN_ALT),
        fit=dict(train_loader="DataLoader(TensorDataset(x, y), batch_size=N (one batch), shuffle=False)",
                 batch_size_check=f"every structure refitted with batch_size={BATCH_CHECK}; all "
                                  "deterministic keys agree (max rel diff per structure below)",
                 backend="CurvlinopsGGN(stochastic=False), laplace-torch's default (backend=None)",
                 keys_prefix="<structure>.<subset>. with structure in full|diag|kron|lowrank, "
                             "subset in all|last_layer|subnetwork"),
        sampling=dict(glm_mc_samples=MC_GLM, nn_samples=MC_NN, base_seed=case["seed"],
                      seeds="glm.mc: torch.manual_seed(base + 10 * s); nn: base + 10 * s + 1; s = index "
                            "of the structure in [full.all, diag.all, kron.all, lowrank.all, "
                            "full.last_layer, diag.last_layer, kron.last_layer, full.subnetwork, "
                            "diag.subnetwork]",
                      note="statistical references: compare within a few *_se"),
        optimize_prior_precision=dict(marglik=OPT_DEFAULTS, gridsearch=GRID_DEFAULTS),
        lowrank=dict(laplace_torch_error=lowrank_err,
                     workaround="LowRankLaplace built with baselaplace.find_spec patched for the "
                                "constructor only, backend=LowRankGGN (top-10 exact-GGN eigenpairs)"),
        max_dense_p=MAX_DENSE_P,
        keys={k: list(t.shape) for k, t in sorted(out.items())},
        structures=meta_structs,
        formulas=formulas,
    )
    with open(os.path.join(case["dir"], "posterior_meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    for fn in ("posterior.safetensors", "posterior_meta.json", "posterior_test.npz"):
        os.chmod(os.path.join(case["dir"], fn), 0o644)
    sz = sum(os.path.getsize(os.path.join(case["dir"], f))
             for f in ("posterior.safetensors", "posterior_meta.json", "posterior_test.npz"))
    print(f"{name}: {len(out)} keys, {sz} bytes, {time.time() - t0:.0f} s", flush=True)
    return sz


def main():
    names = sys.argv[1:] or CASES
    lowrank_err = lowrank_import_error()
    print(f"LowRankLaplace without workaround: {lowrank_err}")
    total, ok = 0, True
    for name in names:
        try:
            total += process(name, lowrank_err)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
    print(f"total added size: {total} bytes")
    if not ok:
        print("FAILED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
