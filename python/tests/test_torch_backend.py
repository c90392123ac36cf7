"""laplace_rs.torch (RustGGN / RustEF / RustHessian) against laplace-torch's own backends.

Needs torch, laplace-torch and curvlinops (skipped otherwise). Float64, CPU.
Every Laplace variant is fitted twice, with our backend and with laplace-torch's
(CurvlinopsGGN / CurvlinopsEF / CurvlinopsHessian, or where those fail or are
wrong a documented substitute), and compared: log marginal likelihood, posterior
precision, GLM predictive, and the prior precision found by
optimize_prior_precision(method="marglik") (and the evidence there), at 1e-6
relative.
"""

import copy
import math
import os
import sys
import warnings
import zlib
from collections import UserDict

import pytest

torch = pytest.importorskip("torch", reason="laplace_rs.torch needs torch")
pytest.importorskip("laplace", reason="laplace_rs.torch needs laplace-torch (pip install laplace-torch)")
pytest.importorskip("curvlinops", reason="the reference backends need curvlinops")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset, default_collate  # noqa: E402

from laplace import (  # noqa: E402
    DiagLaplace, DiagLLLaplace, DiagSubnetLaplace, FullLaplace, FullLLLaplace, FullSubnetLaplace,
    KronLaplace, KronLLLaplace, Laplace)
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian  # noqa: E402
from laplace.utils import Kron  # noqa: E402

from laplace_rs.torch import RustEF, RustGGN, RustHessian  # noqa: E402

warnings.filterwarnings("ignore")
TOL = 1e-6
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(autouse=True)
def _float64():
    """float64, and SDPA's math kernel (curvlinops' forward-mode AD has no CPU flash attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.set_default_dtype(old)


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = b.norm().item()
    return (a - b).norm().item() / (d if d > 0 else 1.0)


# ---------------------------------------------------------------------------------------
# reference backends where laplace-torch's own are missing or wrong
# ---------------------------------------------------------------------------------------

class DiagOfFullEF(CurvlinopsEF):
    """The diagonal of CurvlinopsEF.full: laplace-torch's EF diag is zeros for last_layer=True
    (EFInterface.gradients differentiates the FeatureExtractor w.r.t. parameters it does not
    use) and DiagLaplace refuses CurvlinopsEF on dict inputs."""

    def diag(self, x, y, **kw):
        loss, H = self.full(x, y, **kw)
        return loss, H.diagonal().clone()


class DiagOfFullHessian(CurvlinopsHessian):
    """CurvlinopsHessian has no diag: the diagonal of its full Hessian."""

    def diag(self, x, y, **kw):
        loss, H = self.full(x, y, **kw)
        return loss, H.diagonal().clone()


# ---------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = Block(4)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        h = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(self.pool(torch.relu(self.down(h))).flatten(1))


class BatchDict(dict):
    """A dict batch that laplace-torch's torch.func gradients can vmap over (see
    tools/reference/make_transformer_fixtures.py, laplace-torch bug 1 of README_transformer.md)."""

    def unsqueeze(self, dim):
        return BatchDict({k: v.unsqueeze(dim) for k, v in self.items()})


torch.utils._pytree.register_pytree_node(
    BatchDict, lambda d: (list(d.values()), list(d.keys())),
    lambda vals, keys: BatchDict(zip(keys, vals)), serialized_type_name="test_torch_backend.BatchDict")


class DictData(torch.utils.data.Dataset):
    def __init__(self, d):
        self.d = d

    def __len__(self):
        return len(self.d["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.d.items()}


def transformer_module():
    sys.path.insert(0, os.path.join(REPO, "tools", "reference"))
    try:
        import make_transformer_fixtures as mtf
    finally:
        sys.path.pop(0)
    torch.backends.mha.set_fastpath_enabled(False)
    return mtf


class Case:
    """model, loaders, test inputs, likelihood; frozen: a copy usable by curvlinops' KFAC."""

    def __init__(self, name, model, train, test_x, lik, subnet, kron_model=None, hess_model=None,
                 prior=1.0, hess_prior=1.0):
        self.name, self.model, self.train, self.test_x, self.lik = name, model, train, test_x, lik
        self.subnet = subnet
        self.kron_model = kron_model if kron_model is not None else model
        self.hess_model = hess_model if hess_model is not None else model
        self.prior, self.hess_prior = prior, hess_prior


def _train(model, loader, lik, steps):
    """A few full passes of Adam: near a minimum the Hessian is (nearly) positive semi-definite."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lossf = nn.CrossEntropyLoss() if lik == "classification" else nn.MSELoss()
    model.train()
    for _ in range(steps):
        for b in loader:
            x, y = (b, b["labels"]) if isinstance(b, dict) else b
            opt.zero_grad()
            lossf(model(x), y).backward()
            opt.step()
    return model.eval()


def _subnet(model, n, seed):
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(P, generator=g)[:n].to(torch.long)


def make_case(name):
    # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED), which
    # trained a different model in every run and made tolerance tests flaky
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    g = torch.Generator().manual_seed(7)
    if name == "mlp_cls":
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        X, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
        train = DataLoader(TensorDataset(X, y), batch_size=8)
        _train(model, train, "classification", 100)
        return Case(name, model.eval(), train, torch.randn(5, 4, generator=g), "classification",
                    _subnet(model, 25, 1), hess_prior=5.0)
    if name == "mlp_reg":
        model = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 2))
        X = torch.randn(25, 3, generator=g)
        y = torch.sin(X[:, :2]) + 0.1 * torch.randn(25, 2, generator=g)
        train = DataLoader(TensorDataset(X, y), batch_size=10)
        _train(model, train, "regression", 150)
        return Case(name, model.eval(), train, torch.randn(5, 3, generator=g), "regression",
                    _subnet(model, 20, 2), hess_prior=5.0)
    if name == "resnet_bn":
        model = SmallResNet()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.3, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)
                    m.weight.normal_(1, 0.3, generator=g)
                    m.bias.normal_(0, 0.2, generator=g)
        model.eval()
        X, y = torch.randn(14, 1, 6, 6, generator=g), torch.randint(0, 3, (14,), generator=g)
        train = DataLoader(TensorDataset(X, y), batch_size=5)
        # curvlinops' KFAC refuses BatchNorm parameters: KFAC variants run on a copy with BN frozen
        frozen = copy.deepcopy(model)
        for m in frozen.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)
        return Case(name, model, train, torch.randn(4, 1, 6, 6, generator=g), "classification",
                    _subnet(model, 30, 3), kron_model=frozen, hess_prior=20.0)
    if name == "transformer":
        mtf = transformer_module()
        torch.manual_seed(mtf.seed_of("encoder_mha"))
        model = mtf.EncoderMHA()
        mtf.randomize_(model)
        model.eval()
        ids, am = mtf.pad_batch(10, 6, 11, [6, 4, 6, 3, 5, 6, 2, 6, 5, 4])
        y = torch.randint(0, 3, (10,), generator=g)
        data = {"input_ids": ids, "attention_mask": am, "labels": y}
        train = DataLoader(DictData(data), batch_size=4, collate_fn=lambda b: BatchDict(default_collate(b)))
        _train(model, train, "classification", 60)
        tids, tam = mtf.pad_batch(4, 6, 11, [6, 3, 5, 6])
        # KFAC: curvlinops sees only the Linear modules that are called (fc1, fc2, classifier)
        frozen = copy.deepcopy(model)
        for n, p in frozen.named_parameters():
            p.requires_grad_(n.split(".")[0] in ("fc1", "fc2", "classifier"))
        # torch 2.15's vmapped LayerNorm backward is wrong (docs/conventions.md): the Hessian
        # reference runs on a copy with LayerNorm in elementary ops (same parameters)
        x0 = {"input_ids": ids[:4], "attention_mask": am[:4]}
        hess = mtf.elementary_layer_norm_copy(model, x0)
        return Case(name, model, train, {"input_ids": tids, "attention_mask": tam}, "classification",
                    _subnet(model, 40, 4), kron_model=frozen, hess_model=hess, hess_prior=10.0)
    raise KeyError(name)


_CASES = {}


def case(name):
    if name not in _CASES:
        _CASES[name] = make_case(name)
    return _CASES[name]


CASES = ["mlp_cls", "mlp_reg", "resnet_bn", "transformer"]

# (class, subset, hessian structure)
VARIANTS = [
    (FullLaplace, "all", "full"), (DiagLaplace, "all", "diag"), (KronLaplace, "all", "kron"),
    (FullLLLaplace, "last_layer", "full"), (DiagLLLaplace, "last_layer", "diag"),
    (KronLLLaplace, "last_layer", "kron"),
    (FullSubnetLaplace, "subnetwork", "full"), (DiagSubnetLaplace, "subnetwork", "diag"),
]


def reference(curv, cls, c):
    """laplace-torch's backend for (curvature, variant, case) and the model it runs on."""
    if curv == "ggn":
        return CurvlinopsGGN
    if curv == "ef":
        if cls is DiagLLLaplace or (issubclass(cls, DiagLaplace) and c.name == "transformer"):
            return DiagOfFullEF
        return CurvlinopsEF
    if cls in (DiagLaplace, DiagLLLaplace):
        return DiagOfFullHessian
    return CurvlinopsHessian


OURS = {"ggn": RustGGN, "ef": RustEF, "hessian": RustHessian}


def build(cls, model, backend, c, prior):
    kw = dict(backend=backend, prior_precision=prior)
    if cls in (FullSubnetLaplace, DiagSubnetLaplace):
        return cls(model, c.lik, subnetwork_indices=c.subnet, **kw)
    return cls(model, c.lik, **kw)


def predictive(la, x):
    out = la(x, pred_type="glm")
    return list(out) if isinstance(out, tuple) else [out]


def posterior_precision(la):
    P = la.posterior_precision
    return P.to_matrix() if hasattr(P, "to_matrix") else P


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("curv", ["ggn", "ef", "hessian"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0].__name__)
def test_laplace_variant_matches_laplace_torch(case_name, curv, variant):
    cls, subset, structure = variant
    c = case(case_name)
    if curv == "hessian" and (structure == "kron" or subset == "subnetwork"):
        pytest.skip("laplace-torch has no Kronecker Hessian, and SubnetLaplace takes GGN / EF only")
    model = c.kron_model if structure == "kron" else (c.hess_model if curv == "hessian" else c.model)
    # ours always runs on the original module (the Hessian copy only swaps LayerNorm's code)
    ours_model = c.kron_model if structure == "kron" else c.model
    prior = c.hess_prior if curv == "hessian" else c.prior
    ref_cls = reference(curv, cls, c)
    la_ref = build(cls, model, ref_cls, c, prior)
    la_ref.fit(c.train)
    la = build(cls, ours_model, OURS[curv], c, prior)
    la.fit(c.train)
    assert isinstance(la.backend, OURS[curv])
    what = f"{case_name} {cls.__name__} {curv} vs {ref_cls.__name__}"
    assert rel(la.loss, la_ref.loss) < TOL, what
    if curv == "hessian" and structure == "full":
        # an indefinite Hessian: the case's prior must keep H + prior positive definite,
        # or both evidences are NaN (lowest eigenvalue here: 1.05 below prior 10 for resnet_bn)
        low = torch.linalg.eigvalsh(posterior_precision(la_ref).double())[0].item()
        assert low > 0, f"{what}: raise the case's hess_prior (precision eigenvalue {low:.3g})"
    assert rel(la.log_marginal_likelihood().detach(), la_ref.log_marginal_likelihood().detach()) < TOL, what
    assert rel(posterior_precision(la), posterior_precision(la_ref)) < TOL, what
    for a, b in zip(predictive(la, c.test_x), predictive(la_ref, c.test_x)):
        assert rel(a, b) < TOL, what
    if curv == "hessian":
        return  # an evidence-optimal prior of an indefinite Hessian need not keep P positive definite
    la.optimize_prior_precision(method="marglik", n_steps=30)
    la_ref.optimize_prior_precision(method="marglik", n_steps=30)
    assert rel(la.prior_precision, la_ref.prior_precision) < TOL, what
    assert rel(la.log_marginal_likelihood().detach(), la_ref.log_marginal_likelihood().detach()) < TOL, what


@pytest.mark.parametrize("case_name", ["mlp_cls", "mlp_reg"])
def test_hessian_laplace_optimizes_the_same_prior(case_name):
    c = case(case_name)
    las = []
    for be in (RustHessian, CurvlinopsHessian):
        la = FullLaplace(c.model, c.lik, backend=be, prior_precision=c.hess_prior)
        la.fit(c.train)
        la.optimize_prior_precision(method="marglik", n_steps=10, init_prior_prec=c.hess_prior, lr=1e-2)
        las.append(la)
    assert rel(las[0].prior_precision, las[1].prior_precision) < TOL
    assert rel(las[0].log_marginal_likelihood().detach(), las[1].log_marginal_likelihood().detach()) < TOL


def test_laplace_string_api_and_default_last_layer_kron():
    c = case("mlp_cls")
    a = Laplace(c.model, c.lik, backend=RustGGN)  # last layer, kron
    b = Laplace(c.model, c.lik, backend=CurvlinopsGGN)
    a.fit(c.train)
    b.fit(c.train)
    assert rel(a.log_marginal_likelihood().detach(), b.log_marginal_likelihood().detach()) < TOL
    assert rel(a(c.test_x, pred_type="glm"), b(c.test_x, pred_type="glm")) < TOL


# ---------------------------------------------------------------------------------------
# the backend interface itself
# ---------------------------------------------------------------------------------------

def first_batch(c):
    b = next(iter(c.train))
    return (b, b["labels"]) if isinstance(b, dict) else b


@pytest.mark.parametrize("case_name", ["mlp_cls", "mlp_reg", "resnet_bn"])
def test_jacobians_gradients_full_diag(case_name):
    c = case(case_name)
    x, y = first_batch(c)
    for ours, ref in [(RustGGN, CurvlinopsGGN), (RustEF, CurvlinopsEF)]:
        a, b = ours(c.model, c.lik), ref(c.model, c.lik)
        for fa, fb in zip(a.jacobians(x), b.jacobians(x)):
            assert rel(fa, fb) < 1e-10
        ga, la_ = a.gradients(x, y)
        gb, lb = b.gradients(x, y)  # regression: MSELoss(sum)'s, 2 × the NLL's
        assert rel(ga, gb) < 1e-10 and rel(la_, lb) < 1e-10
        for meth in ("full", "diag"):
            (l1, h1), (l2, h2) = getattr(a, meth)(x, y, N=30), getattr(b, meth)(x, y, N=30)
            assert rel(l1, l2) < 1e-10 and rel(h1, h2) < 1e-10, (ours.__name__, meth)


@pytest.mark.parametrize("lik", ["classification", "regression"])
@pytest.mark.parametrize("curv", ["ggn", "ef"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_factors_equal_curvlinops_factor_by_factor(lik, curv, approx):
    """Each factor (not only the products): block order, M/N rescaling, the regression √factor split,
    the merged [B·A · N/M] of a bias-free 1 × 1 weight, conv expand / reduce."""
    g = torch.Generator().manual_seed(3)
    C = 3 if lik == "classification" else 1
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 1, bias=False), nn.Flatten(),
                          nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 1, bias=False), nn.Tanh(),
                          nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, C))
    x = torch.randn(6, 2, 4, 4, generator=g)
    y = torch.randint(0, C, (6,), generator=g) if lik == "classification" else torch.randn(6, 1, generator=g)
    ours = {"ggn": RustGGN, "ef": RustEF}[curv](model, lik)
    ref = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF}[curv](model, lik)
    N = 21
    la, ka = ours.kron(x, y, N=N, kfac_approx=approx)
    lb, kb = ref.kron(x, y, N=N, kfac_approx=approx)
    assert rel(la, lb) < 1e-12
    assert len(ka.kfacs) == len(kb.kfacs) == len(list(model.parameters()))
    for i, (fa, fb) in enumerate(zip(ka.kfacs, kb.kfacs)):
        if len(fb) == 2 and fb[0].numel() == 1 and fb[1].numel() == 1:  # a 1 × 1 weight with bias
            assert rel(fa[0] * fa[1], fb[0] * fb[1]) < 1e-12, i
            continue
        assert len(fa) == len(fb), i
        for a, b in zip(fa, fb):
            assert rel(a, b) < 1e-12, (i, a.shape)


def test_kron_with_batchnorm_blocks():
    """Trainable BatchNorm: curvlinops refuses the model; conv / linear blocks equal its factors on
    the BN-frozen copy, BN blocks are dense diag(exact GGN diagonal)."""
    c = case("resnet_bn")
    x, y = first_batch(c)
    _, ka = RustGGN(c.model, c.lik).kron(x, y, N=14)
    _, kb = CurvlinopsGGN(c.kron_model, c.lik).kron(x, y, N=14)
    _, d = CurvlinopsGGN(c.model, c.lik).diag(x, y)
    params = list(c.model.named_parameters())
    assert len(ka.kfacs) == len(params)
    it, off = iter(kb.kfacs), 0
    for (name, p), fa in zip(params, ka.kfacs):
        if ".bn" in f".{name}" or name.startswith("bn"):
            assert len(fa) == 1
            assert rel(fa[0], torch.diag(d[off:off + p.numel()])) < 1e-12, name
        else:
            fb = next(it)
            assert len(fa) == len(fb) and all(rel(a, b) < 1e-12 for a, b in zip(fa, fb)), name
        off += p.numel()


def test_parameters_are_refreshed_on_every_call():
    c = case("mlp_cls")
    model = copy.deepcopy(c.model)
    x, y = first_batch(c)
    ours, ref = RustGGN(model, c.lik), CurvlinopsGGN(model, c.lik)
    ours.diag(x, y)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3).add_(0.05)
    (_, a), (_, b) = ours.diag(x, y), ref.diag(x, y)
    assert rel(a, b) < 1e-10
    # buffers (BatchNorm statistics) changed: re-exported
    m2 = copy.deepcopy(case("resnet_bn").model)
    x2, y2 = first_batch(case("resnet_bn"))
    ours2 = RustGGN(m2, "classification")
    ours2.diag(x2, y2)
    with torch.no_grad():
        m2.bn.running_mean.add_(0.2)
    (_, a), (_, b) = ours2.diag(x2, y2), CurvlinopsGGN(m2, "classification").diag(x2, y2)
    assert rel(a, b) < 1e-10


def test_marglik_training_matches():
    """laplace-torch's marglik_training changes θ and the prior between fits."""
    from laplace.marglik_training import marglik_training
    c = case("mlp_reg")
    out = []
    for be in (RustGGN, CurvlinopsGGN):
        torch.manual_seed(0)
        model = copy.deepcopy(c.model)
        la, model, margliks, _ = marglik_training(model, c.train, likelihood="regression", hessian_structure="kron",
                                                  backend=be, n_epochs=4, n_epochs_burnin=1,
                                                  marglik_frequency=1, n_hypersteps=5, optimizer_kwargs={"lr": 1e-2})
        out.append((la, torch.nn.utils.parameters_to_vector(model.parameters()).detach(), margliks))
    (la_a, th_a, m_a), (la_b, th_b, m_b) = out
    assert rel(th_a, th_b) < TOL
    assert rel(torch.tensor(m_a), torch.tensor(m_b)) < TOL
    assert rel(la_a.prior_precision, la_b.prior_precision) < TOL
    assert rel(la_a.sigma_noise, la_b.sigma_noise) < TOL


def test_float32():
    c = case("mlp_cls")
    model = copy.deepcopy(c.model).float()
    train = DataLoader(TensorDataset(*[t.float() if t.is_floating_point() else t for t in c.train.dataset.tensors]),
                       batch_size=8)
    res = []
    for be in (RustGGN, CurvlinopsGGN):
        la = KronLaplace(model, c.lik, backend=be)
        la.fit(train)
        res.append((la.log_marginal_likelihood().detach(), la(c.test_x.float(), pred_type="glm")))
    assert res[0][1].dtype == torch.float32
    assert rel(res[0][0], res[1][0]) < 1e-5 and rel(res[0][1], res[1][1]) < 1e-5


def test_dict_like_inputs():
    c = case("transformer")
    x, y = first_batch(c)
    ref = CurvlinopsGGN(c.model, c.lik).full(dict(x), y)
    for wrap in (dict, UserDict):
        loss, H = RustGGN(c.model, c.lik).full(wrap(x), y)
        assert rel(H, ref[1]) < 1e-10 and rel(loss, ref[0]) < 1e-10
    try:
        from transformers import BatchEncoding
    except ImportError:
        return
    loss, H = RustGGN(c.model, c.lik).full(BatchEncoding(dict(x)), y)
    assert rel(H, ref[1]) < 1e-10


def test_eig_lowrank_is_the_top_of_the_hessian_spectrum():
    c = case("mlp_cls")
    be = RustHessian(c.model, c.lik, low_rank=5)
    U, lam, loss = be.eig_lowrank(c.train)
    H = sum(CurvlinopsHessian(c.model, c.lik).full(x, y)[1] for x, y in c.train)
    ev = torch.linalg.eigvalsh(H).flip(0)[:5]
    ev = ev[ev > 1e-6]
    assert rel(lam, ev) < 1e-10
    assert rel(U @ torch.diag(lam) @ U.T @ U, U @ torch.diag(lam)) < 1e-8


def test_float32_regression_kron_and_ef():
    c = case("mlp_reg")
    model = copy.deepcopy(c.model).float()
    x, y = (t.float() for t in first_batch(c))
    for ours, ref in [(RustGGN, CurvlinopsGGN), (RustEF, CurvlinopsEF)]:
        (la, ka), (lb, kb) = ours(model, c.lik).kron(x, y, N=25), ref(model, c.lik).kron(x, y, N=25)
        assert ka.kfacs[0][0].dtype == torch.float32
        assert rel(la, lb) < 1e-5 and rel(ka.to_matrix(), kb.to_matrix()) < 1e-5
        (la, ha), (lb, hb) = ours(model, c.lik).diag(x, y), ref(model, c.lik).diag(x, y)
        assert rel(ha, hb) < 1e-5


def test_stochastic_ggn_is_an_unbiased_estimate():
    """MC Fisher diagonal → GGN diagonal, checked as a statistician would: over R
    independent estimates of S samples each, (1) the mean squared error falls as 1/S,
    and (2) the mean of the R estimates lies within a few of its own standard errors
    (estimated from the R replicates) of the exact diagonal: no bias. One draw's error
    is too noisy for either (8 points: a few entries dominate the norm)."""
    c = case("mlp_cls")
    x, y = first_batch(c)
    _, exact = RustGGN(c.model, c.lik).diag(x, y)
    R = 16
    mse, bias2, se2 = {}, {}, {}
    for s in (100, 6400):
        draws = []
        for r in range(R):
            torch.manual_seed(r)
            draws.append(RustGGN(c.model, c.lik, stochastic=True, num_samples=s).diag(x, y)[1])
        d = torch.stack(draws).double()
        mean = d.mean(0)
        mse[s] = ((d - exact.double()) ** 2).sum(1).mean().item()
        bias2[s] = ((mean - exact.double()) ** 2).sum().item()
        se2[s] = ((d - mean) ** 2).sum(1).sum().item() / (R - 1) / R  # E‖mean − exact‖² if unbiased
    # 64× the samples: 64× smaller mean squared error; a mean of 16 draws is within 3× of it
    assert 64 / 3 < mse[100] / mse[6400] < 64 * 3, mse
    for s in (100, 6400):
        assert bias2[s] < 16 * se2[s], (s, bias2[s], se2[s])
    be = RustGGN(c.model, c.lik, stochastic=True, num_samples=100)
    torch.manual_seed(1)
    _, mc = be.diag(x, y)
    _, mc2 = be.diag(x, y)  # a new seed from torch's generator on every call
    assert rel(mc2, mc) > 0
    torch.manual_seed(1)
    _, mc3 = RustGGN(c.model, c.lik, stochastic=True, num_samples=100).diag(x, y)
    assert rel(mc3, mc) == 0


def test_readme_laplace_torch_example_runs_and_matches_the_default_backend():
    """The README's one-argument swap, executed as written, then with CurvlinopsGGN."""
    import re
    text = open(os.path.join(REPO, "README.md")).read()
    marker = text.index("<!-- laplace-torch example")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    torch.set_default_dtype(torch.float32)
    ours = {}
    exec(compile(block, "README.md", "exec"), ours)
    assert isinstance(ours["la"].backend, RustGGN)
    ref = {"CurvlinopsGGN": CurvlinopsGGN}
    exec(compile(block.replace("from laplace_rs.torch import RustGGN", "")
                 .replace("backend=RustGGN", "backend=CurvlinopsGGN"), "README.md", "exec"), ref)
    assert rel(ours["la"].log_marginal_likelihood().detach(), ref["la"].log_marginal_likelihood().detach()) < 1e-5
    assert rel(ours["probs"], ref["probs"]) < 1e-5


def test_an_export_is_shared_by_backends_of_the_same_module(monkeypatch):
    import laplace_rs.torch as lrt
    calls = []
    real = lrt.exporter.to_model
    monkeypatch.setattr(lrt.exporter, "to_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = case("mlp_cls")
    model = copy.deepcopy(c.model)
    x, y = first_batch(c)
    d1 = RustGGN(model, c.lik).diag(x, y)[1]
    d2 = RustEF(model, c.lik).diag(x, y)[1]  # another backend object: no new export
    assert len(calls) == 1
    assert rel(d2, CurvlinopsEF(model, c.lik).diag(x, y)[1]) < 1e-10
    model[0] = nn.Linear(4, 8)  # a new submodule (same shapes): exported again
    with torch.no_grad():
        model[0].weight.copy_(c.model[0].weight)
        model[0].bias.copy_(c.model[0].bias)
    assert rel(RustGGN(model, c.lik).diag(x, y)[1], d1) < 1e-12
    assert len(calls) == 2
    model.train()  # another mode: exported again
    RustGGN(model, c.lik).diag(x, y)
    assert len(calls) == 3


def test_a_shared_export_gets_the_modules_current_parameters():
    """A new backend object that reuses an export sets θ first (as marglik_training needs:
    it trains the module between fits, each fit with a new backend)."""
    c = case("mlp_cls")
    model = copy.deepcopy(c.model)
    x, y = first_batch(c)
    RustGGN(model, c.lik).diag(x, y)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    got = RustGGN(model, c.lik).diag(x, y)[1]
    assert rel(got, CurvlinopsGGN(model, c.lik).diag(x, y)[1]) < 1e-10


def test_the_export_traces_a_few_points_of_a_large_batch(monkeypatch):
    """The export's example is the batch's first EXAMPLE_POINTS points, not the whole batch;
    the curvature is still that of the whole batch."""
    import laplace_rs.torch as lrt
    seen = []
    real = lrt.exporter.to_model
    monkeypatch.setattr(lrt.exporter, "to_model", lambda net, ex, **k: seen.append(ex.shape[0]) or real(net, ex, **k))
    c = case("mlp_cls")
    model = copy.deepcopy(c.model)
    x, y = first_batch(c)
    x, y = torch.cat([x] * 4), torch.cat([y] * 4)
    assert x.shape[0] > lrt.EXAMPLE_POINTS
    got = RustGGN(model, c.lik).diag(x, y)[1]
    assert seen == [lrt.EXAMPLE_POINTS]
    assert rel(got, CurvlinopsGGN(model, c.lik).diag(x, y)[1]) < 1e-10
    one = RustGGN(copy.deepcopy(c.model), c.lik).diag(x[:1], y[:1])[1]  # a batch of one: repeated
    assert seen[-1] == 2
    assert rel(one, CurvlinopsGGN(model, c.lik).diag(x[:1], y[:1])[1]) < 1e-10


class _HeadRegisteredFirst(nn.Module):
    """laplace-torch's FeatureExtractor takes the last *registered* leaf (``body``) as the
    last layer; laplace-rs's last layer is the last Linear *executed* (``head``)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_the_last_layer_is_matched_by_parameter_indices():
    from laplace.utils.feature_extractor import FeatureExtractor
    c = case("mlp_cls")
    x, y = first_batch(c)
    model = copy.deepcopy(c.model)
    last = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    b = RustGGN(FeatureExtractor(model, last_layer_name=last), c.lik, last_layer=True)
    b.diag(x, y)
    assert b._rs_ll_subset == "last_layer"  # the same layer: laplace-rs's own last-layer path
    torch.manual_seed(0)
    net = _HeadRegisteredFirst().double()
    fe = FeatureExtractor(net, last_layer_name="body")
    b = RustGGN(fe, c.lik, last_layer=True)
    b.diag(x, y)
    n_head = sum(p.numel() for p in net.head.parameters())
    assert list(b._rs_ll_subset) == list(range(n_head, n_head + 4 * 6 + 6))  # body's θ indices
