"""Export a PyTorch ``nn.Sequential`` to the laplace-rs model format.

The format is two files:

* ``model.json``: ``{"input_shape": [...per-sample shape...], "layers": [...]}``
  where each layer is ``{"type": <torch.nn class name>, <constructor args>}``;
* ``weights.safetensors``: the model's ``state_dict()`` under its own names
  (``"0.weight"``, ``"0.bias"``, ...), in the dtype of the model.

Usage from Python::

    from laplace_export import export_sequential
    export_sequential(model, input_shape=(1, 28, 28), out_dir="my_model")

Only the layers laplace-rs knows are accepted; anything else raises, so a
model never exports silently wrong.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def layer_spec(m: nn.Module) -> dict:
    """The JSON description of one layer: class name plus constructor args."""
    t = type(m).__name__
    if isinstance(m, nn.Linear):
        return {"type": t, "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if isinstance(m, nn.Conv2d):
        padding = m.padding if isinstance(m.padding, str) else _pair(m.padding)
        return {"type": t, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride),
                "padding": padding, "dilation": _pair(m.dilation), "groups": m.groups,
                "bias": m.bias is not None, "padding_mode": m.padding_mode}
    if isinstance(m, nn.Flatten):
        return {"type": t, "start_dim": m.start_dim, "end_dim": m.end_dim}
    if isinstance(m, (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Identity)):
        return {"type": t}
    if isinstance(m, nn.Softplus):
        return {"type": t, "beta": float(m.beta), "threshold": float(m.threshold)}
    if isinstance(m, nn.ELU):
        return {"type": t, "alpha": float(m.alpha)}
    if isinstance(m, nn.LeakyReLU):
        return {"type": t, "negative_slope": float(m.negative_slope)}
    if isinstance(m, nn.GELU):
        return {"type": t, "approximate": m.approximate}
    if isinstance(m, nn.Dropout):
        return {"type": t, "p": float(m.p)}
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ValueError("MaxPool2d(return_indices=True) is not supported")
        return {"type": t, "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride if m.stride is not None else m.kernel_size),
                "padding": _pair(m.padding), "dilation": _pair(m.dilation),
                "ceil_mode": bool(m.ceil_mode)}
    if isinstance(m, nn.AvgPool2d):
        return {"type": t, "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride if m.stride is not None else m.kernel_size),
                "padding": _pair(m.padding), "ceil_mode": bool(m.ceil_mode),
                "count_include_pad": bool(m.count_include_pad),
                "divisor_override": m.divisor_override}
    raise ValueError(f"layer type {t} is not supported by laplace-rs")


def model_spec(model: nn.Sequential, input_shape) -> dict:
    if not isinstance(model, nn.Sequential):
        raise TypeError("export_sequential needs an nn.Sequential")
    return {"input_shape": list(input_shape), "layers": [layer_spec(m) for m in model]}


def export_sequential(model: nn.Sequential, input_shape, out_dir: str,
                      model_name: str = "model.json",
                      weights_name: str = "weights.safetensors") -> None:
    """Write ``model.json`` and ``weights.safetensors`` for ``model`` into ``out_dir``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    spec = model_spec(model, input_shape)
    with open(os.path.join(out_dir, model_name), "w") as fh:
        json.dump(spec, fh, indent=1)
        fh.write("\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, weights_name))
