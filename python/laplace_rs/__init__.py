"""laplace-rs: curvature of neural-network losses and Laplace approximations, in Rust.

The numpy API mirrors the ``laplace`` command line::

    import numpy as np, laplace_rs
    model = laplace_rs.Model.load("model.json", "weights.safetensors")
    loss, diag = laplace_rs.curvature(model, x, y, "classification", curvature="ggn", structure="diag")
    J, f = laplace_rs.jacobians(model, x)

Shapes: N points, C outputs, P parameters (θ in the model's ``parameters()``
order). ``x`` is one array ``(N, *input_shape)`` or, for a model with several
inputs (a HuggingFace classifier), a dict of arrays by input name
(``{"input_ids": ..., "attention_mask": ...}``, int64 / int32 / bool).
``y``: int64 class indices ``(N,)`` (classification) or floats ``(N, C)``
(regression). ``subset``: ``None`` / ``"all"``, ``"last_layer"``, an array of θ
indices (a subnetwork, in any order), or a list of parameter-name globs
(``["classifier.*"]``). Every computation releases the GIL; Ctrl-C stops it
between batches (``KeyboardInterrupt``). ``progress``: ``False``, ``True`` (a
tqdm bar per pass over the data, or a plain one on stderr without tqdm) or a
callable ``progress(what, done, total)`` called before the first batch of
each pass and after every batch (an exception it raises stops the
computation and propagates). Errors raise :class:`Error` (a ``ValueError``)
with the same message as the CLI.

``Model.from_torch(module, example_input)`` exports a PyTorch module
(:mod:`laplace_rs.exporter`; needs torch), and :mod:`laplace_rs.torch` holds
the laplace-torch backends ``RustGGN``, ``RustEF`` and ``RustHessian``.
"""

import sys as _sys

from ._native import Error, Model, Posterior, curvature as _curvature, fit as _fit, gradients as _gradients, jacobians as _jacobians

__all__ = ["Error", "Model", "Posterior", "curvature", "jacobians", "gradients", "fit", "predict"]


class _Bar:
    """``progress=True``: a tqdm bar per pass (a plain stderr bar without tqdm)."""

    def __init__(self):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self._tqdm, self._bar, self._what = tqdm, None, None

    def __call__(self, what, done, total):
        if done == 0 or what != self._what:
            self.close()
            self._what = what
            if self._tqdm is not None:
                self._bar = self._tqdm(total=total, desc=what, unit="batch", leave=False)
            return
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        else:
            filled = done * 30 // max(total, 1)
            _sys.stderr.write(f"\r{what} [{'#' * filled}{'-' * (30 - filled)}] {done}/{total}")
            if done == total:
                _sys.stderr.write("\n")
        if done == total:
            self.close()

    def close(self):
        if self._bar is not None:
            self._bar.close()
        self._bar, self._what = None, None


def _progress(progress):
    if progress is True:
        return _Bar()
    if progress is False or progress is None:
        return None
    if not callable(progress):
        raise TypeError("progress must be a bool or a callable(what, done, total)")
    return progress


def curvature(model, x, y, likelihood, curvature="ggn", structure="diag", subset=None, n_data=None,
              kfac_approx="expand", samples=1, seed=0, batch_size=256, progress=False):
    """Curvature of the summed loss Σ_n ℓ_n over the data set.

    likelihood: "classification" or "regression".
    curvature: "ggn" (exact GGN), "fisher-mc" (Monte-Carlo Fisher with
    ``samples`` draws per point, seeded), "ef" (empirical Fisher), "hessian".
    structure: "full" → (loss, H (P, P)); "diag" → (loss, d (P,));
    "kron" → (loss, blocks): one list of factors per parameter tensor in θ
    order (``[B, A]`` for a Linear / Conv2d weight, ``[B]`` for a bias, a 1-D
    exact diagonal for other tensors), A normalized by ``n_data`` (default:
    the number of points), ``kfac_approx`` "expand" or "reduce".
    Batches of ``batch_size`` points; the result is their sum.
    """
    return _curvature(model, x, y, likelihood, curvature, structure, subset, n_data, kfac_approx, samples, seed,
                      batch_size, _progress(progress))


def jacobians(model, x, subset=None, batch_size=256, progress=False):
    """Jacobians J (N, C, P) of the outputs with respect to the selected parameters, and f (N, C)."""
    return _jacobians(model, x, subset, batch_size, _progress(progress))


def gradients(model, x, y, likelihood, subset=None, batch_size=256, progress=False):
    """Per-sample gradients G (N, P) of ℓ_n (the negative log-likelihood) and the loss Σ_n ℓ_n."""
    return _gradients(model, x, y, likelihood, subset, batch_size, _progress(progress))


def fit(model, x, y, likelihood, structure="kron", subset=None, curvature="ggn", rank=10, prior_precision=1.0,
        optimize_prior=None, optimize_sigma=False, sigma_noise=1.0, temperature=1.0, batch_size=256, progress=False):
    """Fit a Laplace posterior (laplace-torch's ``Laplace(...).fit``) and return a :class:`Posterior`.

    structure: "full", "diag", "kron" or "lowrank" (top-``rank`` eigenpairs);
    curvature: "ggn", "ef" or "fisher-mc"; ``prior_precision`` a scalar;
    ``optimize_prior="marglik"`` tunes it (and σ with ``optimize_sigma``) by the
    evidence, as laplace-torch's ``optimize_prior_precision(method="marglik")``.
    The posterior has ``log_marginal_likelihood()``, ``prior_precision``,
    ``sigma_noise``, ``predict(x, link="probit")`` → probabilities (N, C) (or
    mean, variance (N, C) for regression) and ``save(path)`` / ``Posterior.load``.
    """
    return _fit(model, x, y, likelihood, structure, subset, curvature, rank, prior_precision, optimize_prior,
                optimize_sigma, sigma_noise, temperature, batch_size, _progress(progress))


def predict(posterior, x, link="probit", samples=100, seed=0, batch_size=256, progress=False):
    """The GLM predictive of a fitted :class:`Posterior` (the CLI's ``predict``).

    Classification: probabilities (N, C) through ``link`` ("probit", "bridge",
    "bridge_norm", or "mc" with ``samples`` draws seeded by ``seed``).
    Regression: (mean (N, C), functional variance (N, C)); add σ² for the
    predictive variance of y.
    """
    return posterior.predict(x, link, samples, seed, batch_size, _progress(progress))
