"""laplace-torch curvature backends computed by laplace-rs.

    from laplace import Laplace
    from laplace_rs.torch import RustGGN, RustEF, RustHessian

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                 backend=RustGGN)
    la.fit(train_loader)

``RustGGN`` / ``RustEF`` / ``RustHessian`` subclass laplace-torch's
``GGNInterface`` / ``EFInterface`` / ``CurvatureInterface`` and take the same
constructor arguments (``model, likelihood, last_layer=False,
subnetwork_indices=None, dict_key_x="input_ids", dict_key_y="labels"``; RustGGN
also ``stochastic``, ``num_samples``; RustHessian ``low_rank``), plus
``batch_size`` (points per laplace-rs batch inside one call, default 256).

Every quantity is returned in laplace-torch 0.3's own conventions, i.e. as its
curvlinops backend would return it:

* regression ``gradients`` (and their loss) and the EF (``full``, ``diag``,
  ``kron``) are those of ``MSELoss(reduction="sum")``: 2 × laplace-rs's, which
  are those of the negative log-likelihood;
* ``kron`` is a ``laplace.utils.Kron`` with one block per parameter tensor in
  ``parameters()`` order: ``[B, A]`` for a Linear / Conv2d weight (A normalized
  by N, after curvlinops' M/N rescaling; for regression each factor carries
  √factor of laplace-torch's ``kron *= factor``: B·√2, A·√½ for the GGN), ``[B]``
  for a bias, ``[B·A · N/M]`` for a 1 × 1 weight without bias (laplace-torch
  merges it and skips the rescaling), ``[B·A, 1]`` for a 1 × 1 weight with a
  bias (laplace-torch keeps B and A apart; only their product is known here, so
  only ``damping=True`` would tell), a dense ``diag(d)`` for every other tensor
  (BatchNorm / LayerNorm: d is the exact curvature diagonal; curvlinops
  refuses such models), ``[diag(a), B]`` for an ``nn.Embedding`` table and
  ``[A, B]`` for a HuggingFace ``Conv1D`` weight (stored ``(in, out)``).

The module is exported on the first call of the first backend object that
sees it, with the first few points of that call's batch as example input
(``laplace_rs.exporter.to_model``), shared by later backend objects of the same
module (laplace-torch makes one per ``Laplace`` object), and re-exported if its buffers (e.g.
BatchNorm statistics) or its train / eval mode change. On every call θ is
refreshed from the module's current trainable parameters
(``Model.set_parameter_vector``), so backends stay valid while laplace-torch
changes them (``marglik_training``). For ``last_layer=True`` (laplace-torch's
``FeatureExtractor``) the wrapped model is exported and the quantities are those
of its last layer's parameters (``FeatureExtractor.last_layer``).

CPU only; float32 and float64 models (the compute dtype is the parameters');
inputs may be tensors or dict-likes (dict / UserDict / BatchEncoding) of
tensors, of which the model's graph inputs are passed (``dict_key_y`` is left
out of the exported graph). ``enable_backprop=True`` Jacobians (gradients
through them w.r.t. the input) fall back to laplace-torch's torch.func
implementation.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
from torch import nn

from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Kron
from laplace.utils.feature_extractor import FeatureExtractor

import laplace_rs

from . import exporter

__all__ = ["RustGGN", "RustEF", "RustHessian", "RustInterface", "tune_process"]


def tune_process() -> bool:
    """Apply the ``laplace`` command's process settings to this Python process (opt-in).

    * glibc malloc keeps what it frees (``mallopt``: no ``mmap`` for large blocks,
      no trimming, 64 MiB top pad): laplace-rs allocates large temporaries per
      batch, and returning them to the system makes every call page-fault them
      in again (cnn_mnist GGN KFAC: 0.27 → 0.12 s on 2 cores). Process-wide and
      irreversible: the process's resident memory no longer shrinks after a peak
      (torch's allocations included).
    * ``CANDLE_NUM_THREADS=1`` unless set (candle's elementwise kernels run on a
      spin-barrier pool that costs more than it saves on small machines; matrix
      products keep ``RAYON_NUM_THREADS``). Effective only before laplace-rs's
      first computation in the process.

    Also applied on import when ``LAPLACE_RS_TUNE_PROCESS=1``. Returns whether
    mallopt was applied (glibc only).
    """
    import os

    os.environ.setdefault("CANDLE_NUM_THREADS", "1")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
        ok &= libc.mallopt(M_TOP_PAD, 64 << 20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _tune_from_env():
    import os

    if os.environ.get("LAPLACE_RS_TUNE_PROCESS") == "1":
        tune_process()


_tune_from_env()

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}

# Points of the first batch that the module is exported with (RustInterface._example):
# at least 2, so that a reshape that mixes samples shows up in the export's check.
EXAMPLE_POINTS = 4

# module → (structure key, fingerprint, exported laplace_rs.Model); see RustInterface._cached_export
_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _same_fingerprint(old, fp) -> bool:
    """Same buffers (names, shapes, values) and train / eval modes."""
    if old is None or old[1] != fp[1] or len(old[0]) != len(fp[0]):
        return False
    return all(k1 == k2 and b1.shape == b2.shape and torch.equal(b1, b2)
               for (k1, b1), (k2, b2) in zip(old[0], fp[0]))


def _lik_name(likelihood) -> str:
    v = getattr(likelihood, "value", likelihood)
    if v == "reward_modeling":
        return "classification"
    return str(v)


class RustInterface(CurvatureInterface):
    """Shared machinery of the laplace-rs backends (export, θ refresh, conversions)."""

    _rs_curvature = "ggn"

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        batch_size: int = 256,
        output_key=None,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self.batch_size = int(batch_size)
        self.output_key = output_key
        self._rs_model = None
        self._rs_net = None
        self._rs_fingerprint = None
        self._rs_ll_subset = None
        self._rs_params = None
        self._rs_input_names = None

    # ------------------------------------------------------------------ model

    @property
    def _net(self) -> nn.Module:
        """The module laplace-rs computes with: the wrapped model of a FeatureExtractor."""
        return self.model.model if isinstance(self.model, FeatureExtractor) else self.model

    def _fingerprint(self, net):
        bufs = tuple((k, b.detach().clone()) for k, b in net.named_buffers())
        modes = tuple(m.training for m in net.modules())
        return bufs, modes

    def _fingerprint_same(self, fp):
        return _same_fingerprint(self._rs_fingerprint, fp)

    def _example(self, x):
        """The export's example input: the first ``EXAMPLE_POINTS`` points of the batch ``x``.

        Tracing, shape propagation and the export's output check each run the
        module on the example; on the whole first batch they cost more than the
        export itself (cnn_mnist, a batch of 256: 40 ms against 16 ms for 4
        points). A point alone is repeated: torch.export specializes a batch of one.
        """
        def head(v):
            v = v.detach().cpu()[:EXAMPLE_POINTS]
            return torch.cat([v, v]) if v.shape[0] == 1 else v

        if isinstance(x, Mapping):
            return {k: head(v) for k, v in x.items() if isinstance(v, torch.Tensor) and k != self.dict_key_y}
        return head(x)

    def _export(self, net, x):
        p0 = next(net.parameters())
        if p0.dtype not in _DTYPES:
            raise ValueError(f"laplace_rs.torch: parameters must be float32 or float64, not {p0.dtype}")
        dtype = _DTYPES[p0.dtype]
        ex = self._example(x)
        m = self._cached_export(net, ex, dtype)
        named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
        names = [k for k, _ in named]
        if list(m.parameter_names) != names:
            raise ValueError("laplace_rs.torch: the exported model's parameters "
                             f"{list(m.parameter_names)[:5]}... are not the trainable parameters {names[:5]}...")
        self._rs_params = [p for _, p in named]
        self._rs_input_names = list(m.input_names)
        self._rs_model = m
        self._rs_net = net
        # the last layer: laplace-rs's (the last Linear executed) if it is FeatureExtractor's, else by name
        self._rs_ll_subset = None
        if isinstance(self.model, FeatureExtractor) and self.model.last_layer is not None:
            ll = self.model.last_layer
            ll_ids = {id(p) for p in ll.parameters() if p.requires_grad}
            idx, off = [], 0
            for p in self._rs_params:
                if id(p) in ll_ids:
                    idx.extend(range(off, off + p.numel()))
                off += p.numel()
            idx = np.asarray(idx, dtype=np.int64)
            try:  # laplace-rs's last layer selects the same columns: its own (faster) path
                same = np.array_equal(m.last_layer_indices(), idx)
            except laplace_rs.Error:  # laplace-rs finds no last layer: the columns by index
                same = False
            self._rs_ll_subset = "last_layer" if same else idx

    def _cached_export(self, net, ex, dtype):
        """The exported model of ``net``, shared by every backend object of the same module.

        laplace-torch builds a new backend for every ``Laplace`` object (and
        ``marglik_training`` one per epoch); re-exporting (tracing, writing and
        reading the files) each time would cost more than a fit of a small
        model. An export is reused while the module's submodules (names and
        types), parameter names, shapes, dtypes and trainability, its buffers
        and its train / eval modes are unchanged; θ itself is set on every call
        anyway. (A forward method replaced in place is not seen: build a new
        module, or clear ``laplace_rs.torch._EXPORTS``.)
        """
        key = (dtype, self.output_key,
               tuple((k, tuple(p.shape), p.dtype, p.requires_grad) for k, p in net.named_parameters()),
               tuple((k, type(m)) for k, m in net.named_modules()))
        fp = self._fingerprint(net)
        hit = _EXPORTS.get(net)
        if hit is not None and hit[0] == key and _same_fingerprint(hit[1], fp):
            return hit[2]
        # exported with the module's current θ; to_model checks the outputs agree
        m = exporter.to_model(net, ex, dtype=dtype, output_key=self.output_key)
        _EXPORTS[net] = (key, fp, m)
        return m

    def _rust(self, x):
        """The laplace-rs model, exported on first use, with θ set to the module's parameters."""
        net = self._net
        fp = self._fingerprint(net)
        if self._rs_model is None or self._rs_net is not net or not self._fingerprint_same(fp):
            self._export(net, x)
            self._rs_fingerprint = fp
        # also after an export: one shared from the cache holds the θ it was last given
        # (marglik_training trains the module between fits, each with a new backend object)
        self._set_theta()
        return self._rs_model

    def _set_theta(self):
        with torch.no_grad():
            theta = torch.cat([p.detach().reshape(-1) for p in self._rs_params])
        self._rs_model.set_parameter_vector(theta.cpu().numpy())

    # ------------------------------------------------------------ conversions

    @property
    def _pdtype(self):
        return next(self._net.parameters()).dtype

    @property
    def _pdevice(self):
        return next(self._net.parameters()).device

    def _np_x(self, x):
        if isinstance(x, Mapping):
            names = self._rs_input_names or list(x)
            out = {}
            for k in names:
                if k not in x:
                    raise ValueError(f"laplace_rs.torch: the input dict lacks {k!r} (model inputs: {names})")
                out[k] = x[k].detach().cpu().numpy()
            return out
        return x.detach().cpu().numpy()

    def _np_y(self, y):
        y = y.detach().cpu()
        if _lik_name(self.likelihood) == "classification":
            return y.reshape(-1).to(torch.int64).numpy()
        return y.to(self._pdtype).numpy()

    def _t(self, a):
        return torch.as_tensor(np.asarray(a)).to(device=self._pdevice, dtype=self._pdtype)

    def _scalar(self, v):
        return torch.as_tensor(float(v), device=self._pdevice, dtype=self._pdtype)

    def _subset(self):
        if self.last_layer:
            return self._rs_ll_subset
        if self.subnetwork_indices is not None:
            return np.asarray(torch.as_tensor(self.subnetwork_indices).cpu().numpy(), dtype=np.int64)
        return None

    @property
    def _lik(self) -> str:
        return _lik_name(self.likelihood)

    def _kind(self, samples=None):
        """(laplace-rs curvature name, samples, seed)."""
        return self._rs_curvature, 1, 0

    def _curv(self, x, y, structure, samples=None, **kw):
        m = self._rust(x)
        kind, samples, seed = self._kind(samples)
        return laplace_rs.curvature(m, self._np_x(x), self._np_y(y), self._lik, curvature=kind,
                                    structure=structure, subset=self._subset(), samples=samples,
                                    seed=seed, batch_size=self.batch_size, **kw)

    # laplace-torch's quantity scale relative to ours: 2 for regression EF / gradients
    def _scale(self) -> float:
        return 2.0 if (self._lik == "regression" and self._rs_curvature == "ef") else 1.0

    # ------------------------------------------------------------- quantities

    def jacobians(self, x, enable_backprop: bool = False):
        """Jacobians ``(batch, outputs, parameters)`` and outputs ``(batch, outputs)``."""
        if self.last_layer:
            return self.last_layer_jacobians(x, enable_backprop)
        if enable_backprop:
            return CurvatureInterface.jacobians(self, x, enable_backprop=True)
        m = self._rust(x)
        J, f = laplace_rs.jacobians(m, self._np_x(x), subset=self._subset(), batch_size=self.batch_size)
        return self._t(J), self._f(x, f)

    def _f(self, x, f):
        """The outputs: in float32 the module's own forward pass (f_mu == model(x) exactly, as with
        laplace-torch's backends; ours differ by float32 rounding), in float64 laplace-rs's."""
        f = self._t(f)
        if self._pdtype != torch.float32:
            return f
        with torch.no_grad():
            out = self.model(x)
            if self.output_key is not None:
                out = out[self.output_key]
        return out.detach().reshape(f.shape)

    def last_layer_jacobians(self, x, enable_backprop: bool = False):
        """Jacobians w.r.t. the last layer ``(batch, outputs, C·D [+ C])`` and outputs."""
        if enable_backprop:
            return CurvatureInterface.last_layer_jacobians(self, x, enable_backprop=True)
        m = self._rust(x)
        sub = self._rs_ll_subset if self._rs_ll_subset is not None else "last_layer"
        J, f = laplace_rs.jacobians(m, self._np_x(x), subset=sub, batch_size=self.batch_size)
        return self._t(J), self._f(x, f)

    def functorch_jacobians(self, x, enable_backprop: bool = False):
        """laplace-torch's torch.func Jacobians (differentiable), as its base class computes them."""
        if self.last_layer:
            return CurvatureInterface.last_layer_jacobians(self, x, enable_backprop)
        return CurvatureInterface.jacobians(self, x, enable_backprop)

    def selected_output_jacobians(self, x, outputs: torch.Tensor, enable_backprop: bool = False):
        if enable_backprop:
            return CurvatureInterface.selected_output_jacobians(self, x, outputs, enable_backprop)
        J, f = self.jacobians(x)
        if outputs.ndim == 1:
            outputs = outputs[:, None]
        if outputs.shape[0] != J.shape[0]:
            raise ValueError("Output selectors must match the input batch size.")
        idx = outputs.to(J.device, dtype=torch.long).unsqueeze(-1).expand(-1, -1, J.shape[-1])
        return torch.gather(J, 1, idx), f

    def gradients(self, x, y):
        """Per-sample gradients ``(batch, parameters)`` of laplace-torch's loss and its sum.

        Regression: gradients of ``MSELoss(reduction="sum")`` (laplace-torch's
        convention), 2 × those of the negative log-likelihood.
        """
        m = self._rust(x)
        G, loss = laplace_rs.gradients(m, self._np_x(x), self._np_y(y), self._lik,
                                       subset=self._subset(), batch_size=self.batch_size)
        s = 2.0 if self._lik == "regression" else 1.0
        return self._t(G) * s, self._scalar(loss * s)

    def full(self, x, y, **kwargs):
        loss, H = self._curv(x, y, "full")
        return self._scalar(loss), self._t(H) * self._scale()

    def diag(self, x, y, **kwargs):
        loss, d = self._curv(x, y, "diag")
        return self._scalar(loss), self._t(d) * self._scale()

    def kron(self, x, y, N: int, **kwargs):
        if self._rs_curvature == "hessian":
            raise NotImplementedError("laplace_rs: no Kronecker-factored Hessian (as in laplace-torch)")
        approx = kwargs.get("kfac_approx", "expand")
        samples = kwargs.get("mc_samples")  # curvlinops' name, passed via asdl_fisher_kwargs
        loss, blocks = self._curv(x, y, "kron", samples=samples, n_data=int(N), kfac_approx=approx)
        return self._scalar(loss), self._to_kron(blocks, M=len(y), N=int(N))

    def _kron_params(self):
        """(parameter, owning module) of each Kron block, in θ order."""
        owner = {}
        for mod in self._net.modules():
            for p in mod._parameters.values():
                if p is not None and id(p) not in owner:
                    owner[id(p)] = mod
        sub = self._subset()
        params = self._rs_params
        if isinstance(sub, str):  # the last layer
            ll = {id(p) for p in self.model.last_layer.parameters()}
            params = [p for p in params if id(p) in ll]
        elif sub is not None:
            mask = np.zeros(sum(p.numel() for p in params), dtype=bool)
            mask[np.asarray(sub, dtype=np.int64)] = True
            off, keep = 0, []
            for p in params:
                if mask[off:off + p.numel()].any():
                    keep.append(p)
                off += p.numel()
            params = keep
        return [(p, owner.get(id(p))) for p in params]

    def _to_kron(self, blocks, M: int, N: int) -> Kron:
        regression = self._lik == "regression"
        ef = self._rs_curvature == "ef"
        # laplace-torch: curvlinops' factors of MSELoss(sum) (Λ = 2I; EF gradients 2(f − y)),
        # then `kron *= 0.5`, which multiplies each factor of a 2-factor block by √½
        s_one = (2.0 if ef else 1.0) if regression else 1.0
        s_b = (2.0 * math.sqrt(2.0) if ef else math.sqrt(2.0)) if regression else 1.0
        s_a = math.sqrt(0.5) if regression else 1.0
        owners = self._kron_params()
        if len(owners) != len(blocks):
            raise ValueError(f"laplace_rs.torch: {len(blocks)} Kron blocks for {len(owners)} parameter tensors")
        kfacs = []
        for fs, (p, mod) in zip(blocks, owners):
            fs = [self._t(f) for f in fs]
            if len(fs) == 2:
                a_first = fs[0].ndim == 1 or isinstance(mod, nn.Embedding) or type(mod).__name__ == "Conv1D"
                f0, f1 = (torch.diag(f) if f.ndim == 1 else f for f in fs)
                kfacs.append([f0 * s_a, f1 * s_b] if a_first else [f0 * s_b, f1 * s_a])
                continue
            (f,) = fs
            if f.ndim == 1:
                f = torch.diag(f)
            if p.ndim >= 2 and p.numel() == 1:
                bias = getattr(mod, "bias", None)
                if bias is None:  # laplace-torch merges [B·A] and skips its N/M rescaling
                    kfacs.append([f * (s_one * N / M)])
                else:  # laplace-torch keeps [B, A] of 1 × 1 factors
                    kfacs.append([f * s_one, torch.ones_like(f)])
                continue
            kfacs.append([f * s_one])
        return Kron(kfacs)


class RustGGN(RustInterface, GGNInterface):
    """The GGN (``stochastic=False``) or Monte-Carlo Fisher (``stochastic=True``, ``num_samples``
    draws per point, seeded from torch's global generator) by laplace-rs."""

    _rs_curvature = "ggn"

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        batch_size: int = 256,
        output_key=None,
    ) -> None:
        RustInterface.__init__(self, model, likelihood, last_layer, subnetwork_indices, dict_key_x,
                               dict_key_y, batch_size=batch_size, output_key=output_key)
        # after GGNInterface.__init__ (reached through RustInterface), which resets them
        self.stochastic = stochastic
        self.num_samples = num_samples

    def _kind(self, samples=None):
        if self.stochastic:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            return "fisher-mc", int(samples or self.num_samples), seed
        return "ggn", 1, 0


class RustEF(RustInterface, EFInterface):
    """The empirical Fisher by laplace-rs (regression: laplace-torch's, 2 × the NLL's)."""

    _rs_curvature = "ef"


class RustHessian(RustInterface):
    """The exact Hessian by laplace-rs: ``full``, ``diag`` (exact diagonal) and, for
    ``LowRankLaplace``, ``eig_lowrank`` (top ``low_rank`` eigenpairs of the full Hessian)."""

    _rs_curvature = "hessian"

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        low_rank: int = 10,
        batch_size: int = 256,
        output_key=None,
    ) -> None:
        self.low_rank = low_rank
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         batch_size=batch_size, output_key=output_key)

    def eig_lowrank(self, data_loader):
        """Top ``low_rank`` eigenpairs (eigenvalues > 1e-6) of the Hessian over the loader, and the loss.

        As laplace-torch's AsdfghjklHessian (eigenvalues and loss in its scale: those of the
        log-likelihood), but from the exact (P, P) Hessian (a symmetric eigendecomposition),
        not power iteration: for models whose P × P Hessian fits in memory.
        """
        H, loss = None, 0.0
        for batch in data_loader:
            if isinstance(batch, MutableMapping):
                x, y = batch, batch[self.dict_key_y]
            else:
                x, y = batch
            lb, Hb = self.full(x, y)
            H = Hb if H is None else H + Hb
            loss = loss + lb
        evals, evecs = torch.linalg.eigh(H)
        order = torch.argsort(evals, descending=True)[: self.low_rank]
        evals, evecs = evals[order], evecs[:, order]
        mask = evals > 1e-6
        return evecs[:, mask], evals[mask], loss
