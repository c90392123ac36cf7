"""Train the small CNN shipped with ``laplace demo`` and write ``examples/digits/``.

Data: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey-scale images,
10 classes). scikit-learn's DESCR says it is "a copy of the test set of the UCI
ML hand-written digits datasets", i.e. ``optdigits.tes`` of UCI dataset 80,
*Optical Recognition of Handwritten Digits*, E. Alpaydin and C. Kaynak (1998),
https://doi.org/10.24432/C50P49, licensed CC BY 4.0 by UCI.

Everything is deterministic: fixed seeds, ``torch.use_deterministic_algorithms``,
2 intra-op threads, a fixed stratified split and fixed mini-batch order.  (Bitwise
identical weights are only expected on the same CPU / torch build.)

Outputs (in ``--out``, default ``<repo>/examples/digits``):

* ``model.json`` + ``weights.safetensors`` (float32) via ``tools/laplace_export.py``;
* ``train.npz`` / ``test.npz`` (plain ``np.savez``): ``x`` float32 ``(N, 1, 8, 8)``
  in [0, 1], ``y`` int64 ``(N,)``;
* ``metrics.json``: MAP metrics of the exported float32 model;
* ``reference.json``: float64 curvature reference numbers from laplace-torch,
  computed from the *exported* files (so they describe exactly what laplace-rs
  reads), unless ``--skip-reference``;
* ``README.md``.

Usage::

    python tools/examples/train_digits.py                 # train + export + reference
    python tools/examples/train_digits.py --reference-only  # recompute reference.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from copy import deepcopy

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tools"))
from laplace_export import export_sequential  # noqa: E402

SEED = 0
SPLIT_SEED = 0
N_TEST = 360
EPOCHS = 150
BATCH_SIZE = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4
ECE_BINS = 15
INPUT_SHAPE = (1, 8, 8)


def set_determinism(seed: int = SEED) -> None:
    torch.set_num_threads(2)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def load_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, *INPUT_SHAPE)
    y = d.target.astype(np.int64)
    assert x.shape == (1797, 1, 8, 8) and x.min() == 0.0 and x.max() == 1.0
    idx = np.arange(len(y))
    idx_tr, idx_te = train_test_split(idx, test_size=N_TEST, stratify=y,
                                      random_state=SPLIT_SEED, shuffle=True)
    return (np.ascontiguousarray(x[idx_tr]), np.ascontiguousarray(y[idx_tr]),
            np.ascontiguousarray(x[idx_te]), np.ascontiguousarray(y[idx_te]))


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error, equal-width bins (lo, hi] on max-probability."""
    conf, pred = probs.max(dim=1)
    correct = (pred == y).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    total = torch.zeros((), dtype=probs.dtype)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.to(probs.dtype).mean() * (conf[m].mean() - correct[m].mean()).abs()
    return float(total)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    logits = model(x)
    probs = torch.softmax(logits, dim=1)
    return {
        "accuracy": float((logits.argmax(1) == y).to(torch.float64).mean()),
        "nll_mean": float(F.cross_entropy(logits, y, reduction="mean")),
        "nll_sum": float(F.cross_entropy(logits, y, reduction="sum")),
        "ece_15": ece(probs, y),
    }


def train(xtr, ytr, xte, yte) -> tuple[nn.Sequential, list]:
    set_determinism(SEED)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    # Cosine decay to 0 over all steps: training ends at a mode of the
    # regularized loss (where a Laplace approximation is taken), not
    # bouncing around one as with a constant learning rate.
    steps = EPOCHS * math.ceil(len(ytr) / BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(SEED)
    n = len(ytr)
    log = []
    for epoch in range(1, EPOCHS + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH_SIZE):
            b = perm[i:i + BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 25 == 0 or epoch == EPOCHS:
            tr, te = evaluate(model, xtr, ytr), evaluate(model, xte, yte)
            log.append((epoch, tr["accuracy"], tr["nll_mean"], te["accuracy"], te["nll_mean"]))
            print(f"epoch {epoch:3d}  train acc {tr['accuracy']:.4f} nll {tr['nll_mean']:.4f}"
                  f"  test acc {te['accuracy']:.4f} nll {te['nll_mean']:.4f}", flush=True)
    model.eval()
    return model, log


def load_exported(out_dir: str, dtype=torch.float64) -> nn.Sequential:
    """Rebuild the model from the exported files (checks model.json matches)."""
    from safetensors.torch import load_file
    from laplace_export import model_spec

    model = make_model()
    with open(os.path.join(out_dir, "model.json")) as fh:
        spec = json.load(fh)
    assert spec == json.loads(json.dumps(model_spec(model, INPUT_SHAPE))), "model.json mismatch"
    state = load_file(os.path.join(out_dir, "weights.safetensors"))
    model.load_state_dict(state)
    return model.to(dtype).eval()


def load_npz(out_dir: str, name: str, dtype=torch.float64):
    with np.load(os.path.join(out_dir, name)) as z:
        return torch.from_numpy(z["x"]).to(dtype), torch.from_numpy(z["y"])


# ---------------------------------------------------------------------------
# float64 reference numbers with laplace-torch
# ---------------------------------------------------------------------------

def _batched(x, y, bs):
    for i in range(0, len(y), bs):
        yield x[i:i + bs], y[i:i + bs]


def _per_tensor(model: nn.Module, vec: torch.Tensor) -> dict:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = float(vec[i:i + p.numel()].sum())
        i += p.numel()
    assert i == vec.numel()
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def compute_reference(out_dir: str) -> dict:
    import laplace
    from laplace import Laplace
    from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN
    from laplace.utils import FeatureExtractor
    from curvlinops import GGNLinearOperator

    set_determinism(SEED)
    model = load_exported(out_dir, torch.float64)
    x, y = load_npz(out_dir, "train.npz", torch.float64)
    n_params = sum(p.numel() for p in model.parameters())
    checks = {}

    # Σ_n CE(f(x_n), y_n), full batch, float64
    with torch.no_grad():
        loss_sum = float(F.cross_entropy(model(x), y, reduction="sum"))

    # --- exact diagonal GGN, all weights -----------------------------------
    # BackPACK DiagGGNExact, full batch (the per-point sum is additive anyway)
    m = deepcopy(model)
    loss_bp, dggn = BackPackGGN(m, "classification").diag(x, y)
    # CurvlinopsGGN.diag falls back to laplace's torch.func Jacobian GGN; batched
    m = deepcopy(model)
    be = CurvlinopsGGN(m, "classification")
    dggn_cl, loss_cl = torch.zeros(n_params, dtype=torch.float64), 0.0
    for xb, yb in _batched(x, y, 128):
        lb, hb = be.diag(xb, yb)
        dggn_cl += hb
        loss_cl += float(lb)
    checks["diag_ggn_backpack_vs_curvlinops_maxrel"] = float(
        ((dggn - dggn_cl).abs().max() / dggn.abs().max()))
    checks["loss_backpack_vs_direct_rel"] = _rel(float(loss_bp), loss_sum)
    checks["loss_curvlinops_vs_direct_rel"] = _rel(loss_cl, loss_sum)

    # --- EF diagonal, all weights ------------------------------------------
    m = deepcopy(model)
    loss_ef, def_bp = BackPackEF(m, "classification").diag(x, y)   # SumGradSquared
    m = deepcopy(model)
    be = CurvlinopsEF(m, "classification")   # EFInterface.diag via torch.func per-sample grads
    def_cl = torch.zeros(n_params, dtype=torch.float64)
    for xb, yb in _batched(x, y, 256):
        def_cl += be.diag(xb, yb)[1]
    checks["diag_ef_backpack_vs_curvlinops_maxrel"] = float(
        ((def_bp - def_cl).abs().max() / def_bp.abs().max()))

    # --- last-layer full GGN, as Laplace(subset_of_weights='last_layer') ---
    # Primary: BackPackGGN (GGNInterface.full on laplace's FeatureExtractor wrapper).
    # NB: with the default backend CurvlinopsGGN, laplace-torch 0.3's
    # CurvlinopsInterface.full builds H as `linop @ torch.eye(P)` with a float32
    # identity, so curvlinops evaluates in float32 and H is only float32-accurate
    # (~1e-8 relative) even for a float64 model; it is kept as a cross-check only.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=256, shuffle=False)
    la = Laplace(deepcopy(model), "classification", subset_of_weights="last_layer",
                 hessian_structure="full", backend=BackPackGGN)
    la.fit(loader)
    H_ll = la.H.detach()
    assert H_ll.dtype == torch.float64 and H_ll.shape == (330, 330), (H_ll.dtype, H_ll.shape)
    checks["ll_laplace_loss_vs_direct_rel"] = _rel(float(la.loss), loss_sum)
    la_cl = Laplace(deepcopy(model), "classification", subset_of_weights="last_layer",
                    hessian_structure="full", backend=CurvlinopsGGN)
    la_cl.fit(loader)
    checks["ll_ggn_laplace_default_curvlinops_vs_backpack_maxrel"] = \
        float((la_cl.H - H_ll).abs().max() / H_ll.abs().max())
    # the same thing by hand: backend(last_layer=True) on a FeatureExtractor
    fe = FeatureExtractor(deepcopy(model), last_layer_name="8")
    be = CurvlinopsGGN(fe, "classification", last_layer=True)
    lin = GGNLinearOperator(fe, be.lossfunc, be.params, [(x, y)], check_deterministic=False)
    H_lin = lin @ torch.eye(330, dtype=torch.float64)
    checks["ll_ggn_curvlinops_float64_eye_vs_laplace_maxrel"] = float(
        (H_lin - H_ll).abs().max() / H_ll.abs().max())
    # and from scratch: sum_n (diag p - p p^T) kron phi~ phi~^T with phi~ = [phi; 1]
    # (weight row-major then bias)
    with torch.no_grad():
        phi = model[:-1](x)
        p = torch.softmax(model(x), dim=1)
    G = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    Hw = torch.einsum("nij,na,nb->iajb", G, phi, phi).reshape(320, 320)
    Hwb = torch.einsum("nij,na->iaj", G, phi).reshape(320, 10)
    Hb = G.sum(0)
    H_man = torch.cat([torch.cat([Hw, Hwb], 1), torch.cat([Hwb.T, Hb], 1)], 0)
    checks["ll_ggn_manual_vs_laplace_maxrel"] = float(
        (H_man - H_ll).abs().max() / H_ll.abs().max())
    evals = torch.linalg.eigvalsh(H_ll)  # ascending
    ll_ef = la.model.last_layer

    ref = {
        "description": (
            "float64 reference numbers for examples/digits, computed with laplace-torch on the "
            "TRAIN set (train.npz, N=1437) from the exported float32 weights cast to float64. "
            "Curvatures are sums over data points (no 1/N), likelihood = categorical/softmax, "
            "no prior term. Parameter order = model.state_dict() order, each tensor row-major."),
        "dtype": "float64",
        "n_train": int(len(y)),
        "n_params": int(n_params),
        "n_params_last_layer": int(sum(q.numel() for q in ll_ef.parameters())),
        "loss_sum": loss_sum,
        "diag_ggn_exact": {
            "sum": float(dggn.sum()),
            "per_tensor_sum": _per_tensor(model, dggn),
            "max": float(dggn.max()),
            "backend": "laplace.curvature.BackPackGGN(stochastic=False).diag (DiagGGNExact)",
        },
        "diag_ef": {
            "sum": float(def_bp.sum()),
            "per_tensor_sum": _per_tensor(model, def_bp),
            "backend": "laplace.curvature.BackPackEF.diag (SumGradSquared)",
        },
        "last_layer_ggn_full": {
            "layer": "8 (Linear(32, 10)): weight (10x32 row-major) then bias (10)",
            "trace": float(torch.trace(H_ll)),
            "top5_eigenvalues": [float(v) for v in evals.flip(0)[:5]],
            "min_eigenvalue": float(evals[0]),
            "frobenius_norm": float(torch.linalg.norm(H_ll)),
            "backend": ("laplace.Laplace(model, 'classification', subset_of_weights='last_layer', "
                        "hessian_structure='full', backend=BackPackGGN).fit(...).H"),
        },
        "cross_checks_relative_differences": checks,
        "versions": {
            "laplace-torch": getattr(laplace, "__version__", None) or _dist_version("laplace-torch"),
            "torch": torch.__version__,
            "backpack-for-pytorch": _dist_version("backpack-for-pytorch"),
            "curvlinops-for-pytorch": _dist_version("curvlinops-for-pytorch"),
        },
    }
    return ref


def _dist_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


# ---------------------------------------------------------------------------

def file_sizes(out_dir: str) -> dict:
    return {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}


def write_readme(out_dir: str, metrics: dict, ref: dict | None) -> None:
    m = metrics
    tr, te = m["map_float32"]["train"], m["map_float32"]["test"]
    # sizes: README itself is written twice so its own size is listed correctly
    for _ in range(3):
        sizes = file_sizes(out_dir)
        rows = "\n".join(f"| `{k}` | {v:,} |" for k, v in sizes.items())
        total = sum(sizes.values())
        text = README_TEMPLATE.format(
            epochs=EPOCHS, bs=BATCH_SIZE, lr=LR, wd=WEIGHT_DECAY, seed=SEED,
            split_seed=SPLIT_SEED, prior=WEIGHT_DECAY * m["n_train"],
            n_params=m["n_params"], tr_acc=tr["accuracy"], te_acc=te["accuracy"],
            tr_nll=tr["nll_mean"], te_nll=te["nll_mean"], te_ece=te["ece_15"],
            tr_ece=tr["ece_15"],
            n_te_err=round((1 - te["accuracy"]) * m["n_test"]),
            loss32=m["train_loss_sum_float32"], loss64=m["train_loss_sum_float64"],
            rows=rows, total=total,
            torch=torch.__version__,
            ref=_ref_section(ref),
        )
        with open(os.path.join(out_dir, "README.md"), "w") as fh:
            fh.write(text)
    assert total < 1.5e6, total


def _ref_section(ref: dict | None) -> str:
    if ref is None:
        return "`reference.json` was not computed (`--skip-reference`).\n"
    ll = ref["last_layer_ggn_full"]
    eig = ", ".join(f"{v:.10g}" for v in ll["top5_eigenvalues"])
    return (
        f"| quantity (float64, train set, sums over the {ref['n_train']} points) | value |\n"
        f"|---|---|\n"
        f"| Σ_n CE(f(x_n), y_n) | {ref['loss_sum']:.12g} |\n"
        f"| Σ diag of the exact GGN, all {ref['n_params']} weights | {ref['diag_ggn_exact']['sum']:.12g} |\n"
        f"| Σ diag of the empirical Fisher, all weights | {ref['diag_ef']['sum']:.12g} |\n"
        f"| trace of the last-layer ({ref['n_params_last_layer']} weights) full GGN | {ll['trace']:.12g} |\n"
        f"| 5 largest eigenvalues of the last-layer GGN | {eig} |\n\n"
        f"Backends: {ref['diag_ggn_exact']['backend']}; {ref['diag_ef']['backend']}; "
        f"{ll['backend']}. Each was cross-checked against a second backend / a hand-written "
        f"formula (relative differences in `cross_checks_relative_differences`). "
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in ref["versions"].items()) + ".\n\n"
        "Caveat: the last-layer GGN is taken from the BackPACK backend on purpose. With "
        "laplace-torch 0.3's default backend (`CurvlinopsGGN`), `CurvlinopsInterface.full` "
        "forms H as `linop @ torch.eye(P)` with a float32 identity, so even for a float64 "
        "model H is only float32-accurate (relative error "
        f"{ref['cross_checks_relative_differences']['ll_ggn_laplace_default_curvlinops_vs_backpack_maxrel']:.1e} "
        "here, and slightly negative eigenvalues). Multiplying the same curvlinops "
        "operator by a float64 identity agrees with BackPACK and with the closed form "
        "Σ_n (diag p − p pᵀ) ⊗ φ̃φ̃ᵀ to ~1e-15.\n"
    )


README_TEMPLATE = """\
# `examples/digits`: the model and data behind `laplace demo`

A small CNN trained on scikit-learn's copy of the UCI handwritten-digits data,
exported in the laplace-rs model format, with its train/test data and
float64 reference numbers from laplace-torch. Everything here is written by
[`tools/examples/train_digits.py`](../../tools/examples/train_digits.py); rerun it to
reproduce (deterministic; bitwise identical weights are only expected with the
same CPU and torch build, here torch {torch}).

## Data: provenance and license

* Source: `sklearn.datasets.load_digits()` (scikit-learn's bundled
  `digits.csv.gz`). scikit-learn's own description says it "is a copy of the
  **test set** of the UCI ML hand-written digits datasets", i.e. the 1,797
  images of `optdigits.tes` (written by 13 people; UCI's full data set has
  5,620 images, the other 3,823 from 30 different writers are not used here).
* Original data set: E. Alpaydin and C. Kaynak, *Optical Recognition of
  Handwritten Digits*, UCI Machine Learning Repository, 1998.
  <https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits>,
  DOI [10.24432/C50P49](https://doi.org/10.24432/C50P49).
* License: UCI distributes the data set under
  [Creative Commons Attribution 4.0 International (CC BY 4.0)](https://creativecommons.org/licenses/by/4.0/).
  The files `train.npz` / `test.npz` are a redistribution of these data with
  changes: pixel counts 0..16 divided by 16 (float32 in [0, 1]), reshaped to
  `(N, 1, 8, 8)`, and split into train/test as below.
* Preprocessing by the original authors: NIST's preprocessing programs
  extracted normalised 32x32 bitmaps from a preprinted form; the 8x8 images
  count the set pixels in non-overlapping 4x4 blocks (M. D. Garris et al.,
  *NIST Form-Based Handprint Recognition System*, NISTIR 5469, 1994).

Please cite: Alpaydin, E. and Kaynak, C. (1998). *Optical Recognition of
Handwritten Digits* [Dataset]. UCI Machine Learning Repository.
https://doi.org/10.24432/C50P49.

## Files

| file | bytes |
|---|---|
{rows}

Total: {total:,} bytes.

* `train.npz`, `test.npz` (`np.savez`, uncompressed): `x` float32
  `(N, 1, 8, 8)` in [0, 1], `y` int64 `(N,)`. Stratified split with
  `sklearn.model_selection.train_test_split(test_size=360, stratify=y,
  random_state={split_seed})`: 1,437 train / 360 test images.
* `model.json` + `weights.safetensors`: the network, written by
  `export_sequential(model, input_shape=(1, 8, 8), ...)` from
  `tools/laplace_export.py`; weights are float32 under their
  `state_dict()` names (`0.weight`, `0.bias`, `3.weight`, ..., `8.bias`).
* `metrics.json`: the MAP numbers below at full precision.
* `reference.json`: the float64 laplace-torch reference numbers below.

## Architecture ({n_params:,} parameters)

```
nn.Sequential(
  (0) Conv2d(1, 8, 3, padding=1)    # 1x8x8  -> 8x8x8
  (1) ReLU
  (2) MaxPool2d(2)                  # -> 8x4x4
  (3) Conv2d(8, 16, 3, padding=1)   # -> 16x4x4
  (4) ReLU
  (5) Flatten                       # -> 256
  (6) Linear(256, 32)
  (7) Tanh
  (8) Linear(32, 10)                # logits
)
```

PyTorch default initialisation, exported in eval mode (it has no
train/eval-dependent layers).

## Training recipe

* Loss: mean cross-entropy; Adam (lr {lr:g}, betas (0.9, 0.999)),
  `weight_decay={wd:g}` (coupled L2, i.e. the gradient of
  `mean CE + {wd:g}/2 * |θ|²`); the matching Gaussian prior precision on the
  summed log likelihood is N · {wd:g} = {prior:.4g} (N = 1,437).
* {epochs} epochs, mini-batches of {bs}, reshuffled each epoch by a
  `torch.Generator` seeded with {seed}; the learning rate decays to 0 on a
  cosine schedule over all steps (`CosineAnnealingLR`), so training ends at
  a mode of the regularized loss; no augmentation, no early stopping.
* Trained on purpose to near-zero training loss, as real networks are: the
  MAP network is overconfident, on held-out digits and above all on inputs
  unlike any digit, which is what `laplace demo` shows a Laplace posterior
  correcting (and where it overcorrects).
* `torch.manual_seed({seed})`, `torch.use_deterministic_algorithms(True)`,
  `torch.set_num_threads(2)`. Training takes about 40 s on 2 idle CPU threads
  (more on a loaded machine; the script prints the time but does not record it, so
  that reruns give identical files).

## MAP model results (exported float32 weights)

| | train (1,437) | test (360) |
|---|---|---|
| accuracy | {tr_acc:.4f} | {te_acc:.4f} ({n_te_err} errors) |
| NLL, mean per point | {tr_nll:.6f} | {te_nll:.6f} |
| ECE, 15 equal-width bins | {tr_ece:.6f} | {te_ece:.6f} |

Total training loss Σ_n CE(f(x_n), y_n) over the 1,437 training points (a sum,
not a mean; no prior term):

* float32 model and data: {loss32:.9g}
* float64 (model and data cast to float64): {loss64:.15g}

ECE: confidence = max softmax probability, bins (k/15, (k+1)/15],
ECE = Σ_bins (n_bin / N) · |accuracy_bin − mean confidence_bin|.

## laplace-torch reference numbers (`reference.json`)

{ref}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "examples", "digits"))
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--reference-only", action="store_true",
                    help="recompute reference.json and README.md from the existing files")
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)

    if not args.reference_only:
        xtr_np, ytr_np, xte_np, yte_np = load_split()
        np.savez(os.path.join(out, "train.npz"), x=xtr_np, y=ytr_np)
        np.savez(os.path.join(out, "test.npz"), x=xte_np, y=yte_np)
        xtr, ytr = torch.from_numpy(xtr_np), torch.from_numpy(ytr_np)
        xte, yte = torch.from_numpy(xte_np), torch.from_numpy(yte_np)
        print(f"train {tuple(xtr.shape)} test {tuple(xte.shape)}; train class counts "
              f"{np.bincount(ytr_np).tolist()} test {np.bincount(yte_np).tolist()}")

        t0 = time.perf_counter()
        model, log = train(xtr, ytr, xte, yte)
        train_s = time.perf_counter() - t0
        model = model.float().eval()
        export_sequential(model, input_shape=INPUT_SHAPE, out_dir=out)

        # evaluate what was exported, read back from disk
        m32 = load_exported(out, torch.float32)
        x32, y32 = load_npz(out, "train.npz", torch.float32)
        xt32, yt32 = load_npz(out, "test.npz", torch.float32)
        m64 = load_exported(out, torch.float64)
        with torch.no_grad():
            loss64 = float(F.cross_entropy(m64(x32.double()), y32, reduction="sum"))
        tr, te = evaluate(m32, x32, y32), evaluate(m32, xt32, yt32)
        metrics = {
            "n_train": len(y32), "n_test": len(yt32),
            "n_params": sum(p.numel() for p in m32.parameters()),
            "map_float32": {"train": tr, "test": te},
            "map_float64": {"train": evaluate(m64, x32.double(), y32),
                            "test": evaluate(m64, xt32.double(), yt32)},
            "train_loss_sum_float32": tr["nll_sum"],
            "train_loss_sum_float64": loss64,
            "training_log": [dict(zip(["epoch", "train_acc", "train_nll", "test_acc",
                                       "test_nll"], r)) for r in log],
            "recipe": {"optimizer": "Adam", "lr": LR, "weight_decay": WEIGHT_DECAY,
                       "epochs": EPOCHS, "batch_size": BATCH_SIZE, "seed": SEED,
                       "split_seed": SPLIT_SEED, "ece_bins": ECE_BINS},
        }
        with open(os.path.join(out, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=1)
            fh.write("\n")
        print(f"trained in {train_s:.1f} s")
        print(f"MAP train acc {tr['accuracy']:.4f}  test acc {te['accuracy']:.4f}  "
              f"test NLL {te['nll_mean']:.6f}  test ECE(15) {te['ece_15']:.6f}")
        print(f"train loss sum: float32 {tr['nll_sum']:.9g}  float64 {loss64:.15g}")
    else:
        with open(os.path.join(out, "metrics.json")) as fh:
            metrics = json.load(fh)

    ref = None
    ref_path = os.path.join(out, "reference.json")
    if not args.skip_reference:
        ref = compute_reference(out)
        with open(ref_path, "w") as fh:
            json.dump(ref, fh, indent=1)
            fh.write("\n")
        print(json.dumps(ref, indent=1))
    elif os.path.exists(ref_path):
        with open(ref_path) as fh:
            ref = json.load(fh)
    write_readme(out, metrics, ref)
    print("sizes:", file_sizes(out), "total", sum(file_sizes(out).values()))


if __name__ == "__main__":
    main()
