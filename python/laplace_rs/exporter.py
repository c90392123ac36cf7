"""From a PyTorch module to a laplace-rs :class:`~laplace_rs.Model` (needs torch).

The exporter is :mod:`laplace_rs.export` (in the repository also reachable as
``tools/laplace_export.py``): ``export(model, example_input, out_dir,
output_key=None)`` writes ``model.json`` + ``weights.safetensors``
(docs/model-format.md). :func:`to_model` exports into a temporary directory,
loads the files and checks that the loaded model computes what the module
computes on the example input.
"""

from __future__ import annotations

import shutil
import tempfile

__all__ = ["export", "to_model"]


def export(model, example_input, out_dir, output_key=None, **kwargs):
    """Write ``model.json`` and ``weights.safetensors`` for ``model`` into ``out_dir``."""
    from . import export as _export

    return _export.export(model, example_input, out_dir, output_key=output_key, **kwargs)


def _numpy_inputs(x):
    if isinstance(x, dict) or hasattr(x, "keys"):
        return {k: v.detach().cpu().numpy() for k, v in x.items()}
    return x.detach().cpu().numpy()


def to_model(module, example_input, dtype=None, output_key=None, check=True):
    """Export ``module`` (an ``nn.Module``) and load it as a :class:`laplace_rs.Model`.

    ``example_input``: a tensor ``(N, *input_shape)`` or a dict of tensors
    (``input_ids``, ``attention_mask``, ...); N ≥ 2 (torch.export specializes
    a batch of one). ``dtype``: ``"float32"`` / ``"float64"``, default the
    parameters'. ``output_key``: the entry of a dict / ModelOutput result that
    holds the logits (default: ``logits`` for HuggingFace outputs). Tracing
    uses torch.fx and, if that fails, torch.export. With ``check``, the
    loaded model's outputs on ``example_input`` must equal the module's (1e-4
    relative in float32, 1e-9 in float64), else ``laplace_rs.Error``.
    """
    import torch

    import laplace_rs

    p0 = next(module.parameters(), None)
    if dtype is None:
        dtype = {torch.float32: "float32", torch.float64: "float64"}.get(getattr(p0, "dtype", None), "float32")
    tmp = tempfile.mkdtemp(prefix="laplace_rs_")
    try:
        with torch.no_grad():
            try:
                export(module, example_input, tmp, output_key=output_key)
            except Exception as e_fx:  # noqa: BLE001
                # torch.fx traces symbolically: a forward that branches on its input's
                # type or values takes the wrong branch there; torch.export runs it
                try:
                    export(module, example_input, tmp, output_key=output_key, tracer="export")
                except Exception:  # noqa: BLE001
                    raise e_fx from None
        model = laplace_rs.Model.load(f"{tmp}/model.json", f"{tmp}/weights.safetensors", dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if check:
        from . import export as _export

        with torch.no_grad():
            if isinstance(example_input, torch.Tensor) or _export._forward_arity(module) == 1:
                want = module(example_input)
            else:
                want = module(**example_input)
        if output_key is not None:
            want = want[output_key]
        elif not isinstance(want, torch.Tensor) and hasattr(want, "logits"):
            want = want.logits
        got = torch.from_numpy(model.forward(_numpy_inputs(example_input))).to(torch.float64)
        want = want.detach().cpu().to(torch.float64).reshape(got.shape)
        tol = 1e-4 if dtype == "float32" else 1e-9
        err = ((got - want).norm() / max(want.norm().item(), 1e-30)).item()
        if not err <= tol:
            raise laplace_rs.Error(f"the exported model disagrees with the module on the example input "
                                   f"(relative error {err:.2e} > {tol:g})")
    return model
