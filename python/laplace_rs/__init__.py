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
(``["classifier.*"]``). Every computation releases the GIL. Errors raise
:class:`Error` (a ``ValueError``) with the same message as the CLI.
"""

from ._native import Error, Model, Posterior, curvature as _curvature, fit as _fit, gradients as _gradients, jacobians as _jacobians

__all__ = ["Error", "Model", "Posterior", "curvature", "jacobians", "gradients", "fit"]


def curvature(model, x, y, likelihood, curvature="ggn", structure="diag", subset=None, n_data=None,
              kfac_approx="expand", samples=1, seed=0, batch_size=256):
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
                      batch_size)


def jacobians(model, x, subset=None, batch_size=256):
    """Jacobians J (N, C, P) of the outputs with respect to the selected parameters, and f (N, C)."""
    return _jacobians(model, x, subset, batch_size)


def gradients(model, x, y, likelihood, subset=None, batch_size=256):
    """Per-sample gradients G (N, P) of ℓ_n (the negative log-likelihood) and the loss Σ_n ℓ_n."""
    return _gradients(model, x, y, likelihood, subset, batch_size)


def fit(model, x, y, likelihood, structure="kron", subset=None, curvature="ggn", rank=10, prior_precision=1.0,
        optimize_prior=None, optimize_sigma=False, sigma_noise=1.0, temperature=1.0, batch_size=256):
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
                optimize_sigma, sigma_noise, temperature, batch_size)
