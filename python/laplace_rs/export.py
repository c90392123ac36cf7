"""Export a PyTorch model to the laplace-rs model format (docs/model-format.md).

``export_sequential`` writes the Sequential form (below); ``export(model, example_input,
out_dir)`` the graph form for any ``nn.Module`` (torch.fx, or torch.export for
transformers and models with integer inputs: see ``export``).

Sequential form:

The format is two files:

* ``model.json``: ``{"input_shape": [...per-sample shape...], "layers": [...]}``
  where each layer is ``{"type": <torch.nn class name>, <constructor args>}``;
* ``weights.safetensors``: the model's ``state_dict()`` under its own names
  (``"0.weight"``, ``"0.bias"``, ...), in the dtype of the model.

Usage from Python::

    from laplace_rs.export import export_sequential   # or, in the repository: from laplace_export import ...
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


# ===========================================================================
# Graph form: any nn.Module, traced with torch.fx (docs/model-format.md)
# ===========================================================================

import math  # noqa: E402
import operator  # noqa: E402

import torch.nn.functional as F  # noqa: E402

GRAPH_FORMAT = "laplace-graph"
GRAPH_VERSION = 1

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.LeakyReLU,
                nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid)
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d) + _BN + _ACT_MODULES + (
    nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)

# functional / method activations written as their module op
_FUNC_ACTS = {
    F.relu: "ReLU", torch.relu: "ReLU", F.relu6: "ReLU6", torch.tanh: "Tanh", F.tanh: "Tanh",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", F.silu: "SiLU", F.hardswish: "Hardswish",
    F.hardsigmoid: "Hardsigmoid", F.gelu: "GELU", F.elu: "ELU", F.leaky_relu: "LeakyReLU",
    F.softplus: "Softplus",
}
_METHOD_ACTS = {"relu": "ReLU", "relu_": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}
_BINARY = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
}
_BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
                   "mul_": "mul", "div": "div", "div_": "div"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
_IDENTITY_METHODS = {"contiguous", "clone"}


class ExportError(ValueError):
    """A model that the graph form cannot express (message names op and module path)."""


def _module_op_name(m: nn.Module) -> str:
    cls = type(m)
    if cls.__module__.startswith("torch.nn"):
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _func_name(target) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    try:
        from torch.fx.node import _get_qualified_name
        return _get_qualified_name(target)
    except Exception:  # noqa: BLE001
        return getattr(target, "__name__", repr(target))


def _where(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        return str(node.target)
    if stack:
        path, (_, cls) = list(stack.items())[-1]
        return f"{path} ({getattr(cls, '__name__', cls)})"
    return "<top level>"


def _module_path(node):
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.keys())[-1] if stack else None


def _module_attrs(m: nn.Module, in_shape) -> dict:
    """Constructor attributes of a module op (as in the Sequential form)."""
    if isinstance(m, _BN):
        if not m.track_running_stats or m.running_mean is None:
            raise ExportError(f"{_module_op_name(m)} without running statistics "
                              "(track_running_stats=False) is not supported")
        return {"num_features": m.num_features, "eps": float(m.eps), "affine": bool(m.affine)}
    if isinstance(m, (nn.ReLU6, nn.Hardswish, nn.Hardsigmoid)):
        return {}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        os_ = _pair(m.output_size)
        return {"output_size": [int(in_shape[-2 + i]) if v is None else int(v)
                                for i, v in enumerate(os_)]}
    spec = layer_spec(m)
    spec.pop("type")
    return spec


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        if isinstance(m, SUPPORTED_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


class _ValueProp(torch.fx.passes.shape_prop.ShapeProp):
    """ShapeProp that also keeps every non-tensor value (sizes, shape arithmetic)."""

    def run_node(self, n):
        out = super().run_node(n)
        if not isinstance(out, torch.Tensor):
            n.meta["value"] = out
        return out


def _is_inplace(node, mod=None) -> bool:
    if node.op == "call_module":
        return bool(getattr(mod, "inplace", False))
    if node.op == "call_function":
        return node.target in (operator.iadd, operator.isub, operator.imul,
                               operator.itruediv) or bool(node.kwargs.get("inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    return False


def _forward_arity(model: nn.Module) -> int:
    """The number of parameters of ``model.forward`` (1: a dict input is passed as
    ``model(d)``, else as ``model(**d)``).

    A forward of only ``*args`` / ``**kwargs`` that passes everything through to a
    wrapped module (peft's ``PeftModel`` -> ``get_base_model()``, ``LoraModel`` ->
    ``.model``) counts as that module's forward, so a LoRA-wrapped ``forward(batch)``
    model is still called as ``model(d)``."""
    import inspect
    m = model
    for _ in range(8):
        ps = list(inspect.signature(m.forward).parameters.values())
        passthrough = bool(ps) and all(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps)
        if not passthrough:
            break
        inner = None
        gbm = getattr(type(m), "get_base_model", None)
        if callable(gbm):
            inner = m.get_base_model()
        elif isinstance(m._modules.get("model"), nn.Module):
            inner = m._modules["model"]
        if not isinstance(inner, nn.Module) or inner is m:
            break
        m = inner
    return len(inspect.signature(m.forward).parameters)


def export(model: nn.Module, example_input, out_dir: str, output_key=None,
           model_name: str = "model.json", weights_name: str = "weights.safetensors",
           tracer: str = "auto") -> dict:
    """Export any ``nn.Module`` to the graph form of docs/model-format.md.

    ``example_input``: a batched Tensor (``model(x)``; graph input ``"x"``) or a dict
    of batched Tensors (``model(d)`` if ``forward`` takes one argument, else
    ``model(**d)``; one graph input per key; integer tensors — token ids, attention
    masks — become ``"dtype": "int"`` inputs). Use a batch of at least 2 so that a
    reshape that would mix samples is detected. ``output_key`` picks the field of a
    dict / tuple / HF ``ModelOutput`` output. ``tracer``: ``"auto"`` (torch.export for
    models with integer inputs, e.g. transformers; torch.fx otherwise, retried with
    torch.export when torch.fx cannot trace the model or meets an op it lacks),
    ``"fx"`` or ``"export"``; see ``graph_spec``. Writes ``model.json`` and
    ``weights.safetensors`` into ``out_dir`` and returns the JSON dict.

    Transformers (torch.export path): ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``
    (and HF LlamaRMSNorm-style modules), ``nn.Linear`` over sequences, HF ``Conv1D``
    (``Linear`` with ``weight_layout: "in_out"``), ``nn.MultiheadAttention``
    (batch_first self-attention, written as the ops it computes),
    ``F.scaled_dot_product_attention``, HF BERT / GPT-2 / RoBERTa / DistilBERT / Llama
    style models. Values that depend on no input and no trainable parameter (arange,
    position ids, causal masks, ``finfo.min`` fills) are folded into ``constant``
    nodes; dtype casts between floats, ``contiguous`` and eval-mode dropout vanish.

    Frozen parameters (``requires_grad=False``) are constants: not in ``"parameters"``
    (θ = the trainable ones, in ``named_parameters()`` order); one read by a module op
    (Linear, Embedding, LayerNorm, ...) is still in ``weights.safetensors``, one read only
    at constant indices (a frozen position table) is folded into a ``constant`` node.
    peft LoRA models (``get_peft_model``: ``PeftModel.forward(*args, **kwargs)`` is called
    like the model it wraps; each adapted layer ``base_layer(x) + lora_B(lora_A(dropout(x)))
    * scaling`` becomes Linear (frozen base; HF Conv1D base: ``weight_layout "in_out"``),
    Linear (lora_A), Linear (lora_B), ``mul`` by the scalar, ``add``).
    """
    from safetensors.torch import save_file

    spec, state = graph_spec(model, example_input, output_key, tracer)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, model_name), "w") as fh:
        fh.write(graph_json(spec))
    save_file(state, os.path.join(out_dir, weights_name))
    return spec


def graph_json(spec: dict) -> str:
    """The JSON text of a graph spec: one line per input / node."""
    def line(o):
        return json.dumps(o, separators=(", ", ": "))
    parts = []
    for k, v in spec.items():
        if k in ("inputs", "nodes", "parameters"):
            body = ",\n".join("  " + line(i) for i in v)
            parts.append(f" {json.dumps(k)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(k)}: {line(v)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def graph_spec(model: nn.Module, example_input, output_key=None, tracer: str = "auto"):
    """Return (model.json dict, {state-dict name: tensor}) for ``model``.

    ``tracer``: ``"fx"`` (torch.fx symbolic tracing, the graph form's original path),
    ``"export"`` (``torch.export`` ATen graph with a dynamic batch axis: transformers,
    HuggingFace models, integer inputs) or ``"auto"``: ``"export"`` when an input is an
    integer tensor, else ``"fx"``, retried with ``"export"`` when torch.fx cannot trace
    the model or meets an op it does not know (the torch.fx error is the one raised
    when both fail, unless torch.fx could not trace at all).
    """
    if tracer == "fx":
        return _fx_graph_spec(model, example_input, output_key)
    if tracer == "export":
        return _aten_graph_spec(model, example_input, output_key)
    if tracer != "auto":
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', not {tracer!r}")
    leaves = list(example_input.values()) if isinstance(example_input, dict) else [example_input]
    if any(isinstance(v, torch.Tensor) and not v.is_floating_point() for v in leaves):
        return _aten_graph_spec(model, example_input, output_key)
    try:
        return _fx_graph_spec(model, example_input, output_key)
    except ExportError as e_fx:
        if not getattr(e_fx, "retry_with_export", False):
            raise
        try:
            return _aten_graph_spec(model, example_input, output_key)
        except ExportError as e_ex:
            if getattr(e_fx, "trace_failed", False):
                raise e_ex from None
            raise e_fx from None


def _check_model(model: nn.Module):
    """Refusals common to both tracers: training mode, shared parameters."""
    if model.training:
        bad = [n for n, m in model.named_modules() if isinstance(m, _BN + (nn.Dropout,))]
        if bad:
            raise ValueError(
                f"the model is in training mode and contains BatchNorm/Dropout ({bad[0]!r}"
                f"{' and others' if len(bad) > 1 else ''}); laplace-rs evaluates models in "
                "evaluation mode (BatchNorm with running statistics, no dropout): call "
                "model.eval() before exporting")
    for n, m in model.named_modules():
        if m.training and isinstance(m, _BN + (nn.Dropout,)):
            raise ValueError(f"module {n!r} ({_module_op_name(m)}) is in training mode: "
                             "call model.eval() before exporting")
    seen = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise ExportError(f"parameter {n!r} is the same tensor as {seen[id(p)]!r}: shared "
                              "parameters are not supported")
        seen[id(p)] = n


def _fx_graph_spec(model: nn.Module, example_input, output_key=None):
    """The torch.fx path of ``graph_spec``."""
    # ------------------------------------------------------------ refusals
    if model.training:
        bad = [n for n, m in model.named_modules() if isinstance(m, _BN + (nn.Dropout,))]
        if bad:
            raise ValueError(
                f"the model is in training mode and contains BatchNorm/Dropout ({bad[0]!r}"
                f"{' and others' if len(bad) > 1 else ''}); laplace-rs evaluates models in "
                "evaluation mode (BatchNorm with running statistics, no dropout): call "
                "model.eval() before exporting")
    for n, m in model.named_modules():
        if m.training and isinstance(m, _BN + (nn.Dropout,)):
            raise ValueError(f"module {n!r} ({_module_op_name(m)}) is in training mode: "
                             "call model.eval() before exporting")
    seen = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise ExportError(f"parameter {n!r} is the same tensor as {seen[id(p)]!r}: shared "
                              "parameters are not supported")
        seen[id(p)] = n

    # ------------------------------------------------------------ trace
    tracer = _Tracer()
    dict_input = isinstance(example_input, dict)
    nparams = _forward_arity(model)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001
        err = ExportError(f"torch.fx could not trace {type(model).__name__}: "
                          f"{type(e).__name__}: {e}")
        err.trace_failed = err.retry_with_export = True
        raise err from e
    gm = torch.fx.GraphModule(tracer.root, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    prop = _ValueProp(gm)
    with torch.no_grad():
        if not dict_input:
            inputs = {"x": example_input}
            prop.propagate(example_input)
            ph_alias = {placeholders[0].name: "x"}
        elif nparams == 1:
            inputs = dict(example_input)
            prop.propagate(example_input)
            ph_alias = {}
        else:
            inputs = dict(example_input)
            by_name = {p.target: p for p in placeholders}
            args = [example_input.get(p.target) for p in placeholders]
            prop.propagate(*args)
            ph_alias = {by_name[k].name: k for k in example_input}
    batch = None
    in_specs = []
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"input {k!r} is not a Tensor")
        if batch is None:
            batch = v.shape[0]
        elif v.shape[0] != batch:
            raise ExportError(f"input {k!r} has batch size {v.shape[0]} != {batch}")
        in_specs.append({"name": k, "shape": list(v.shape[1:]),
                         "dtype": "float" if v.is_floating_point() else "int"})

    modules = dict(model.named_modules())
    mod_of_param = {}
    for mn, m in modules.items():
        for pn, p in m.named_parameters(recurse=False):
            mod_of_param[id(p)] = mn
    sd = model.state_dict()

    # ------------------------------------------------------------ helpers
    alias = dict(ph_alias)       # fx node name -> value name in the graph form
    nodes_out, used_names = [], set(i["name"] for i in in_specs)
    referenced = []
    module_calls = {}
    dict_placeholder = placeholders[0].name if (dict_input and nparams == 1) else None

    def shape_of(n):
        tm = n.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            return None
        return tuple(tm.shape)

    def value(a, node, what="operand"):
        if isinstance(a, torch.fx.Node):
            if a.name in alias:
                return alias[a.name]
            if "value" in a.meta:
                return a.meta["value"]
            raise ExportError(f"{_func_name(node.target) if node.op != 'call_module' else node.target}:"
                              f" {what} {a.name!r} is not a value of the graph (node {node.name!r}, "
                              f"module {_where(node)})")
        return a

    def fresh_name(base):
        name, k = base, 0
        while name in used_names:
            k += 1
            name = f"{base}.{k}"
        used_names.add(name)
        return name

    def emit(node, op, ins, attrs=None, params=None, name=None):
        nm = fresh_name(name or node.name)
        d = {"name": nm, "op": op, "inputs": list(ins)}
        mp = _module_path(node)
        if mp is not None:
            d["module"] = mp
        if attrs:
            d["attrs"] = attrs
        if params:
            d["params"] = params
        nodes_out.append(d)
        return nm

    def unsupported(node, opname, why=""):
        err = ExportError(f"unsupported op {opname} (node {node.name!r}, from module "
                          f"{_where(node)}){': ' + why if why else ''}; laplace-rs graph form "
                          "supports the ops of docs/model-format.md")
        err.retry_with_export = True
        raise err

    def ndim(node_arg):
        return len(shape_of(node_arg))

    def norm_dim(d, nd, node, opname):
        d = int(d)
        dd = d + nd if d < 0 else d
        if not 0 <= dd < nd:
            unsupported(node, opname, f"dim {d} out of range")
        if dd == 0:
            unsupported(node, opname, "it acts on the batch axis 0")
        return dd

    def check_batch(node, opname):
        s = shape_of(node)
        if s is None or len(s) == 0 or s[0] != batch:
            unsupported(node, opname, f"its output {s} does not keep the batch axis")

    order = {n: i for i, n in enumerate(graph.nodes)}

    def check_inplace(node, mod=None):
        if not _is_inplace(node, mod):
            return
        a = node.args[0] if node.args else None
        if isinstance(a, torch.fx.Node):
            later = [u for u in a.users if order[u] > order[node]]
            if later:
                unsupported(node, _func_name(node.target) if node.op != "call_module"
                            else _module_op_name(mod),
                            f"it modifies {a.name!r} in place, which is read again by "
                            f"{later[0].name!r}")

    # ------------------------------------------------------------ nodes
    out_node = None
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out_node = node
            continue
        if node.op == "get_attr":
            unsupported(node, f"get_attr {node.target}",
                        "tensors used outside a supported module (a functional parameter "
                        "or constant tensor) are not supported")
        tgt = node.target
        shp = shape_of(node)
        if node.op == "call_module":
            m = modules[tgt]
            if not isinstance(m, SUPPORTED_MODULES):
                unsupported(node, _module_op_name(m))
            check_inplace(node, m)
            own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            if own:
                if tgt in module_calls:
                    raise ExportError(f"module {tgt!r} ({_module_op_name(m)}) is called twice "
                                      f"(nodes {module_calls[tgt]!r} and {node.name!r}): shared "
                                      "parameters are not supported")
                module_calls[tgt] = node.name
            if len(node.args) != 1 or node.kwargs:
                unsupported(node, _module_op_name(m), "a module op takes exactly one input")
            x = value(node.args[0], node, "input")
            in_shape = shape_of(node.args[0])
            attrs = _module_attrs(m, in_shape)
            params = {}
            for pn, p in m.named_parameters(recurse=False):
                if p is not None:
                    params[pn] = f"{tgt}.{pn}" if tgt else pn
            if isinstance(m, _BN):
                for bn in ("running_mean", "running_var"):
                    params[bn] = f"{tgt}.{bn}"
            referenced.extend(params.values())
            if isinstance(m, nn.Flatten):
                norm_dim(m.start_dim, len(in_shape), node, "nn.Flatten")
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                unsupported(node, _module_op_name(m), f"padding_mode={m.padding_mode!r}")
            check_batch(node, _module_op_name(m))
            alias[node.name] = emit(node, type(m).__name__, [x], attrs, params or None)
            continue

        # ---- call_function / call_method
        opname = _func_name(tgt)
        if shp is None:
            # not a tensor: a shape / size computation (x.size(0), x.shape, arithmetic on
            # them) is not emitted; anything that yields tensors in a container (chunk,
            # split, a tuple-returning function) is not supported.
            leaves = torch.utils._pytree.tree_leaves(node.meta.get("value"))
            if any(isinstance(v, torch.Tensor) for v in leaves):
                unsupported(node, opname, "it returns several tensors")
            if node.op == "call_function" and tgt is operator.getitem and \
                    dict_placeholder is not None and isinstance(node.args[0], torch.fx.Node) \
                    and node.args[0].name == dict_placeholder:
                alias[node.name] = node.args[1]
            continue
        if node.op == "call_function" and tgt is operator.getitem and \
                isinstance(node.args[0], torch.fx.Node) and node.args[0].name == dict_placeholder:
            alias[node.name] = str(node.args[1])
            continue
        check_inplace(node)
        args, kw = list(node.args), dict(node.kwargs)
        is_meth = node.op == "call_method"

        def tensor_arg(i=0):
            a = args[i]
            if not isinstance(a, torch.fx.Node) or a.name not in alias:
                unsupported(node, opname, f"argument {i} is not a tensor of the graph")
            return a

        # binary arithmetic
        bop = _BINARY.get(tgt) if not is_meth else _BINARY_METHODS.get(tgt)
        if bop is not None:
            if kw.get("alpha", 1) != 1 or kw.get("rounding_mode") is not None or \
                    set(kw) - {"alpha", "rounding_mode", "other"}:
                unsupported(node, opname, f"keyword arguments {sorted(kw)}")
            a = args[0]
            b = args[1] if len(args) > 1 else kw.get("other")
            a_t = isinstance(a, torch.fx.Node) and a.name in alias
            b_t = isinstance(b, torch.fx.Node) and b.name in alias
            if a_t and b_t:
                alias[node.name] = emit(node, bop, [alias[a.name], alias[b.name]])
            elif a_t or b_t:
                s = value(b if a_t else a, node)
                if isinstance(s, torch.Tensor):
                    if s.numel() != 1:
                        unsupported(node, opname, "a constant tensor operand")
                    s = s.item()
                if not isinstance(s, (int, float)) or isinstance(s, bool):
                    unsupported(node, opname, f"operand {s!r}")
                attrs = {"scalar": float(s)}
                if not a_t:
                    attrs["reverse"] = True
                alias[node.name] = emit(node, bop, [alias[(a if a_t else b).name]], attrs)
            else:
                unsupported(node, opname, "no tensor operand")
            continue
        if tgt in (operator.neg, torch.neg) or (is_meth and tgt == "neg"):
            alias[node.name] = emit(node, "neg", [alias[tensor_arg().name]])
            continue
        if is_meth and tgt in _IDENTITY_METHODS or (not is_meth and tgt is torch.clone):
            alias[node.name] = alias[tensor_arg().name]
            continue
        # activations
        act = _METHOD_ACTS.get(tgt) if is_meth else _FUNC_ACTS.get(tgt)
        if act is not None:
            x = alias[tensor_arg().name]
            attrs = {}
            extra = dict(zip({"GELU": [], "ELU": ["alpha"], "LeakyReLU": ["negative_slope"],
                              "Softplus": ["beta", "threshold"]}.get(act, []), args[1:]))
            extra.update({k: v for k, v in kw.items() if k != "inplace"})
            if act == "GELU":
                attrs["approximate"] = extra.pop("approximate", "none")
            elif act == "ELU":
                attrs["alpha"] = float(extra.pop("alpha", 1.0))
            elif act == "LeakyReLU":
                attrs["negative_slope"] = float(extra.pop("negative_slope", 0.01))
            elif act == "Softplus":
                attrs["beta"] = float(extra.pop("beta", 1.0))
                attrs["threshold"] = float(extra.pop("threshold", 20.0))
            if extra:
                unsupported(node, opname, f"arguments {sorted(extra)}")
            alias[node.name] = emit(node, act, [x], attrs or None)
            continue
        if tgt is F.adaptive_avg_pool2d:
            x = tensor_arg()
            os_ = args[1] if len(args) > 1 else kw["output_size"]
            s_in = shape_of(x)
            os_ = [int(s_in[-2 + i]) if v is None else int(v) for i, v in enumerate(_pair(os_))]
            alias[node.name] = emit(node, "AdaptiveAvgPool2d", [alias[x.name]],
                                    {"output_size": os_})
            continue
        if tgt is F.dropout or tgt is torch.dropout:
            names = ["input", "p", "training", "inplace"]
            a = dict(zip(names, args))
            a.update(kw)
            if a.get("training", tgt is F.dropout):
                unsupported(node, opname, "dropout with training=True")
            alias[node.name] = emit(node, "Dropout", [alias[tensor_arg().name]],
                                    {"p": float(a.get("p", 0.5))})
            continue
        if not is_meth and tgt is torch.flatten:
            x = tensor_arg()
            nd = ndim(x)
            sd_ = args[1] if len(args) > 1 else kw.get("start_dim", 0)
            ed = args[2] if len(args) > 2 else kw.get("end_dim", -1)
            norm_dim(sd_, nd, node, opname)
            check_batch(node, opname)
            alias[node.name] = emit(node, "Flatten", [alias[x.name]],
                                    {"start_dim": int(sd_), "end_dim": int(ed)})
            continue
        if (is_meth and tgt in _RESHAPE_METHODS) or (not is_meth and tgt in (
                torch.reshape, torch.unsqueeze, torch.squeeze)):
            x = tensor_arg()
            check_batch(node, opname)
            alias[node.name] = emit(node, "reshape", [alias[x.name]], {"shape": list(shp[1:])})
            continue
        if (is_meth and tgt in ("permute", "transpose")) or (not is_meth and tgt in (
                torch.permute, torch.transpose)):
            x = tensor_arg()
            nd = ndim(x)
            rest = [value(a, node) for a in args[1:]]
            if tgt in ("transpose", torch.transpose):
                d0 = rest[0] if rest else kw["dim0"]
                d1 = rest[1] if len(rest) > 1 else kw["dim1"]
                dims = list(range(nd))
                i0, i1 = norm_dim(d0, nd, node, opname), norm_dim(d1, nd, node, opname)
                dims[i0], dims[i1] = dims[i1], dims[i0]
            else:
                dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
                if not dims:
                    dims = kw["dims"]
                dims = [int(d) % nd for d in dims]
                if dims[0] != 0:
                    unsupported(node, opname, "it moves the batch axis")
            alias[node.name] = emit(node, "permute", [alias[x.name]], {"dims": dims})
            continue
        if (is_meth and tgt in ("mean", "sum")) or (not is_meth and tgt in (torch.mean, torch.sum)):
            x = tensor_arg()
            nd = ndim(x)
            dim = args[1] if len(args) > 1 else kw.get("dim")
            keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
            if set(kw) - {"dim", "keepdim"}:
                unsupported(node, opname, f"arguments {sorted(set(kw) - {'dim', 'keepdim'})}")
            if dim is None:
                unsupported(node, opname, "a reduction over all axes includes the batch axis")
            dims = [dim] if isinstance(dim, int) else list(dim)
            dims = [norm_dim(d, nd, node, opname) for d in dims]
            alias[node.name] = emit(node, "mean" if tgt in ("mean", torch.mean) else "sum",
                                    [alias[x.name]], {"dim": dims, "keepdim": bool(keep)})
            continue
        if not is_meth and tgt in (torch.cat, torch.concat, torch.concatenate):
            ts = args[0] if args else kw["tensors"]
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            ins = []
            for t in ts:
                if not (isinstance(t, torch.fx.Node) and t.name in alias):
                    unsupported(node, opname, "a non-graph tensor in the list")
                ins.append(alias[t.name])
            d = norm_dim(dim, ndim(ts[0]), node, opname)
            alias[node.name] = emit(node, "cat", ins, {"dim": d})
            continue
        if not is_meth and tgt is operator.getitem:
            x = tensor_arg()
            s_in = list(shape_of(x))
            idx = args[1]
            idx = idx if isinstance(idx, tuple) else (idx,)
            nd = len(s_in)
            if sum(1 for i in idx if i is Ellipsis) > 1:
                unsupported(node, opname, "more than one Ellipsis")
            items = []
            for i in idx:
                if i is Ellipsis:
                    items.extend([slice(None)] * (nd - (len(idx) - 1)))
                else:
                    items.append(value(i, node) if isinstance(i, torch.fx.Node) else i)
            ops, dim, cur = [], 0, list(s_in)
            for it in items:
                if isinstance(it, slice):
                    if dim == 0:
                        if it != slice(None):
                            unsupported(node, opname, "it slices the batch axis")
                    elif it != slice(None):
                        start, stop, step = it.indices(cur[dim])
                        if step <= 0:
                            unsupported(node, opname, "non-positive slice step")
                        stop = max(stop, start)
                        ops.append(("slice", {"dim": dim, "start": start, "end": stop,
                                              "step": step}))
                        cur[dim] = len(range(start, stop, step))
                    dim += 1
                elif isinstance(it, int) and not isinstance(it, bool):
                    if dim == 0:
                        unsupported(node, opname, "it indexes the batch axis")
                    ii = it + cur[dim] if it < 0 else it
                    if not 0 <= ii < cur[dim]:
                        unsupported(node, opname, f"index {it} out of range")
                    ops.append(("select", {"dim": dim, "index": ii}))
                    cur.pop(dim)
                else:
                    unsupported(node, opname, f"index {it!r} (None / tensor / advanced indexing)")
            cur_name = alias[x.name]
            if not ops:
                alias[node.name] = cur_name
                continue
            for k, (o, a) in enumerate(ops):
                cur_name = emit(node, o, [cur_name], a,
                                name=node.name if k == len(ops) - 1 else f"{node.name}.{k}")
            if list(shp) != [s_in[0]] + cur[1:] and tuple(shp) != tuple(cur):
                unsupported(node, opname, f"shape check failed {shp} vs {cur}")
            alias[node.name] = cur_name
            continue
        unsupported(node, opname)

    # ------------------------------------------------------------ output
    res = out_node.args[0]
    if isinstance(res, dict):
        if output_key is None:
            raise ExportError(f"the model returns a dict with keys {sorted(res)}: pass output_key")
        res = res[output_key]
    elif isinstance(res, (tuple, list)):
        if output_key is None:
            raise ExportError("the model returns a tuple: pass output_key (an index)")
        res = res[output_key]
    elif output_key is not None:
        # a ModelOutput-like object traced as a call: look for the field among its kwargs
        if isinstance(res, torch.fx.Node) and output_key in res.kwargs:
            res = res.kwargs[output_key]
        else:
            raise ExportError(f"output_key={output_key!r} given but the output is not a dict")
    if not (isinstance(res, torch.fx.Node) and res.name in alias):
        raise ExportError(f"the model output {res!r} is not a tensor of the graph")
    oshape = shape_of(res)
    if len(oshape) != 2 or oshape[0] != batch:
        raise ExportError(f"the model output has shape {tuple(oshape)}; laplace-rs needs "
                          "(batch, C)")

    # ------------------------------------------------------------ parameters / weights
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = {}
    for r in referenced:
        counts[r] = counts.get(r, 0) + 1
    for n in params:
        if counts.get(n, 0) == 0:
            raise ExportError(f"parameter {n!r} is not used by any node of the traced graph "
                              "(an unused module, or a parameter used functionally)")
    dtypes = {p.dtype for p in model.parameters()}
    state = {}
    for r in dict.fromkeys(referenced):
        t = sd[r].detach()
        if t.is_floating_point() and len(dtypes) == 1:
            t = t.to(next(iter(dtypes)))
        state[r] = t.contiguous().cpu()
    spec = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "inputs": in_specs,
            "parameters": params, "nodes": nodes_out, "output": alias[res.name]}
    return spec, state


# ===========================================================================
# torch.export path (ATen graph): transformers, HuggingFace models, integer
# inputs (docs/model-format.md, "Transformer ops and integer inputs")
# ===========================================================================
#
# The model is exported with torch.export (non-strict) with a dynamic batch axis:
# axis 0 of every input is one symbol, so the batch axis of every value is known
# exactly (a value is batched iff its axis 0 is that symbol; the symbol anywhere
# else means the op mixes samples). Values are
#
#   _Val    an emitted graph value; `bat`: its torch axis 0 is the batch axis, else
#           the torch tensor is the same for every sample (parameter-only values:
#           position embeddings of constant ids) and its per-sample shape is its
#           whole torch shape;
#   _Const  a value that depends on no input and no trainable parameter (arange,
#           position-id buffers, causal masks, finfo.min fills): evaluated here, on
#           the example, and written as a `constant` node when an emitted op reads
#           it (a batched constant must be the same for every sample);
#   _Param  a parameter (or a 2-D parameter transposed: HF Conv1D), read only by
#           module ops;
#   python values (sizes, dtypes, ...), and _Multi (split / chunk / unbind results).
#
# A few modules are traced through a replacement forward (restored afterwards):
# nn.MultiheadAttention (the ops it computes: Linear on in_proj_weight, slices,
# reshape / permute, scaled_dot_product_attention, Linear out_proj), HF Conv1D
# (F.linear on weight.t(): Linear with weight_layout "in_out") and HF
# NewGELUActivation / GELUTanh (F.gelu(approximate="tanh")).

import types  # noqa: E402

_aten = torch.ops.aten


class _Val:
    __slots__ = ("name", "bat", "shape", "dt")

    def __init__(self, name, bat, shape, dt):
        self.name, self.bat, self.shape, self.dt = name, bat, tuple(shape), dt

    @property
    def ps(self):
        return self.shape[1:] if self.bat else self.shape


class _Const:
    __slots__ = ("t", "bat", "origin", "sd")

    def __init__(self, t, bat, origin, sd=None):
        self.t, self.bat, self.origin, self.sd = t, bat, origin, sd

    @property
    def shape(self):
        return tuple(self.t.shape)

    @property
    def dt(self):
        return _dtkind(self.t.dtype)


class _Param:
    __slots__ = ("sd", "t", "transposed", "frozen")

    def __init__(self, sd, t, transposed=False, frozen=False):
        self.sd, self.t, self.transposed, self.frozen = sd, t, transposed, frozen


class _Multi:
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items


def _dtkind(dt):
    if dt == torch.bool:
        return "bool"
    return "float" if dt.is_floating_point else "int"


def _is_tensor_v(v):
    return isinstance(v, (_Val, _Const, _Param))


# ------------------------------------------------------------ replacement forwards
def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                 attn_mask=None, average_attn_weights=True, is_causal=False):
    where = f"nn.MultiheadAttention {getattr(self, '_laplace_path', '?')!r}"
    if not self.batch_first:
        raise ExportError(f"{where}: batch_first=False puts the batch on axis 1; "
                          "use batch_first=True")
    if not (query is key and key is value):
        raise ExportError(f"{where}: only self-attention (query is key is value) is supported: "
                          "cross-attention reads in_proj_weight in three Linear nodes")
    if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
        raise ExportError(f"{where}: kdim/vdim != embed_dim, add_bias_kv and add_zero_attn "
                          "are not supported")
    B, T, E = query.shape
    H = self.num_heads
    hd = E // H
    qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
    q = q.reshape(B, T, H, hd).transpose(1, 2)
    k = k.reshape(B, T, H, hd).transpose(1, 2)
    v = v.reshape(B, T, H, hd).transpose(1, 2)
    # MultiheadAttention masks: bool True = do not attend; float = added to the scores
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (B, 1, 1, T))):
        if m is None:
            continue
        if shape is not None:
            m = m.reshape(shape)
        elif m.dim() == 3:
            raise ExportError(f"{where}: a 3-D attn_mask (batch * heads, L, S) mixes the "
                              "batch with the heads; pass a 2-D one")
        if m.dtype == torch.bool:
            m = ~m
        if mask is None:
            mask = m
        elif mask.dtype == torch.bool and m.dtype == torch.bool:
            mask = mask & m
        else:
            lo = torch.finfo(query.dtype).min
            a = mask if mask.dtype != torch.bool else torch.where(mask, 0.0, lo)
            b = m if m.dtype != torch.bool else torch.where(m, 0.0, lo)
            mask = a + b
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = o.transpose(1, 2).reshape(B, T, E)
    return self.out_proj(o), None


def _conv1d_forward(self, x):
    return F.linear(x, self.weight.t(), self.bias)


def _gelu_tanh_forward(self, x):
    return F.gelu(x, approximate="tanh")


def _rmsnorm_forward(self, x):
    return F.rms_norm(x, tuple(self.weight.shape), self.weight, self.variance_epsilon)


def _is_llama_rmsnorm(m):
    """HF LlamaRMSNorm-style modules: weight * x / sqrt(mean(x^2) + variance_epsilon)
    (Llama, Mistral, Qwen2, ...; not Gemma's (1 + weight))."""
    w = getattr(m, "weight", None)
    if not (isinstance(w, nn.Parameter) and w.dim() == 1 and
            isinstance(getattr(m, "variance_epsilon", None), float)):
        return False
    import inspect
    try:
        src = inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return False
    src = "".join(src.split())
    return ("returnself.weight*hidden_states.to(input_dtype)" in src and
            "hidden_states*torch.rsqrt(variance+self.variance_epsilon)" in src and
            "pow(2).mean(-1,keepdim=True)" in src)


def _replacement_forward(m):
    if isinstance(m, nn.MultiheadAttention):
        return _mha_forward
    cls = type(m)
    if cls.__module__.startswith("transformers"):
        if cls.__name__ == "Conv1D" and getattr(m, "weight", None) is not None \
                and m.weight.dim() == 2:
            return _conv1d_forward
        if cls.__name__ in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
            return _gelu_tanh_forward
        if cls.__name__.endswith("RMSNorm") and _is_llama_rmsnorm(m):
            return _rmsnorm_forward
    return None


# ------------------------------------------------------------ the exporter
_IDENTITY_OPS = {"contiguous", "clone", "alias", "detach", "detach_", "lift_fresh_copy",
                 "lift_fresh", "_assert_tensor_metadata", "_assert_scalar", "dropout",
                 "feature_dropout", "alpha_dropout", "sym_constrain_range_for_size",
                 "sym_constrain_range", "_assert_async", "to", "_to_copy", "type_as",
                 "view_as_real"}
_META_ONLY = {"new_ones", "new_zeros", "new_full", "new_empty", "zeros_like", "ones_like",
              "full_like", "empty_like", "sym_size", "sym_numel", "sym_stride", "size",
              "sym_storage_offset", "new_tensor"}
_UNARY_FUNC = {"neg": "neg", "sqrt": "sqrt", "rsqrt": "rsqrt", "exp": "exp", "log": "log",
               "abs": "abs"}
_UNARY_ACT = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "silu": "SiLU",
              "hardswish": "Hardswish", "hardsigmoid": "Hardsigmoid", "gelu": "GELU",
              "elu": "ELU", "leaky_relu": "LeakyReLU", "softplus": "Softplus",
              "hardtanh": "ReLU6", "relu6": "ReLU6"}
_ARITH_OPS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "rsub": "sub"}
_CMP_OPS = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge"}
_LOGIC_OPS = {"logical_and": "logical_and", "logical_or": "logical_or",
              "__and__": "logical_and", "__or__": "logical_or", "bitwise_and": "logical_and",
              "bitwise_or": "logical_or", "mul": "logical_and"}
_VIEW_OPS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten",
             "slice", "select", "transpose", "permute", "t", "expand", "alias", "split",
             "split_with_sizes", "chunk", "unbind", "narrow", "as_strided", "diagonal",
             "view_as", "unfold", "numpy_T", "detach"}
_RESHAPE_OPS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten",
                "unflatten", "view_as", "reshape_as"}


def _aten_graph_spec(model: nn.Module, example_input, output_key=None):
    _check_model(model)
    return _AtenExporter(model, example_input, output_key).run()


class _AtenExporter:
    def __init__(self, model, example_input, output_key):
        self.model, self.example, self.output_key = model, example_input, output_key

    # ---------------------------------------------------------------- helpers
    def fail(self, node, what, why=""):
        raise ExportError(f"unsupported op {what} (node {node.name!r}, from module "
                          f"{self.where(node)}){': ' + why if why else ''}; laplace-rs graph "
                          "form supports the ops of docs/model-format.md")

    @staticmethod
    def _stack(node):
        st = node.meta.get("nn_module_stack") or {}
        out = []
        for v in st.values():
            path, cls = v if isinstance(v, tuple) else (v, "")
            path = str(path)
            if path.startswith("L['self']."):
                path = path[len("L['self']."):]
            out.append((path, cls))
        return out

    def module_path(self, node):
        st = [p for p, _ in self._stack(node) if p]
        return st[-1] if st else None

    def where(self, node):
        st = [(p, c) for p, c in self._stack(node) if p]
        if not st:
            return "<top level>"
        p, c = st[-1]
        c = getattr(c, "__name__", str(c)).split(".")[-1]
        return f"{p} ({c})"

    def opname(self, node):
        t = node.target
        name = str(t) if isinstance(t, torch._ops.OpOverload) else _func_name(t)
        fn = node.meta.get("torch_fn")
        if fn and isinstance(fn, tuple) and len(fn) == 2:
            src = str(fn[1]).split(".")[-1]
            mod = {"function": "torch.nn.functional", "builtin_function_or_method": "torch",
                   "method_descriptor": "Tensor"}.get(str(fn[1]).split(".")[0])
            if mod:
                name += f" ({mod}.{src})"
        return name

    def cz(self, s):
        """Concrete int of a (symbolic) size, at the example's batch size."""
        if isinstance(s, torch.SymInt):
            e = s.node.expr
            if self.bsym is not None:
                import sympy
                e = sympy.sympify(e).xreplace({self.bsym: sympy.Integer(self.B)})
            if getattr(e, "free_symbols", None):
                raise ExportError(f"size {s} depends on a data-dependent symbol")
            return int(e)
        if isinstance(s, (torch.SymFloat, torch.SymBool)):
            import sympy
            e = sympy.sympify(s.node.expr).xreplace({self.bsym: sympy.Integer(self.B)})
            return float(e) if isinstance(s, torch.SymFloat) else bool(e)
        return s

    def is_b(self, s):
        return isinstance(s, torch.SymInt) and self.bsym is not None and \
            s.node.expr == self.bsym

    def has_b(self, s):
        return isinstance(s, torch.SymInt) and self.bsym is not None and \
            self.bsym in s.node.expr.free_symbols

    def meta(self, node):
        """(concrete shape, batched?, dtype kind) of a node's tensor value."""
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            return None
        shape = list(v.shape)
        bat = len(shape) > 0 and self.is_b(shape[0])
        for i, s in enumerate(shape):
            if (i > 0 or not bat) and self.has_b(s):
                self.fail(node, self.opname(node),
                          f"its output shape {tuple(shape)} mixes the batch axis with other "
                          "axes (the batch axis must stay axis 0 of every value)")
        return tuple(self.cz(s) for s in shape), bat, _dtkind(v.dtype)

    def fresh(self, base):
        name, k = base, 0
        while name in self.used_names:
            k += 1
            name = f"{base}.{k}"
        self.used_names.add(name)
        return name

    def emit(self, node, op, ins, attrs=None, params=None, name=None, shape=None, bat=None,
             dt=None):
        nm = self.fresh(name or node.name)
        d = {"name": nm, "op": op, "inputs": list(ins)}
        mp = self.module_path(node)
        if mp:
            d["module"] = mp
        if attrs:
            d["attrs"] = attrs
        if params:
            d["params"] = params
            for r, t in params.items():
                self.ref_param(node, t)
        self.nodes.append(d)
        if shape is None:
            shape, bat, dt = self.meta(node)
        return _Val(nm, bat, shape, dt)

    def ref_param(self, node, sd):
        if sd in self.param_users:
            other = self.param_users[sd]
            raise ExportError(f"tensor {sd!r} is read by two module ops (nodes {other!r} and "
                              f"{node.name!r}, module {self.where(node)}): a module called "
                              "twice (shared parameters) is not supported")
        self.param_users[sd] = node.name
        self.referenced.append(sd)

    def use(self, v, node):
        """The graph value name of an operand (a constant is emitted on first use)."""
        if isinstance(v, _Val):
            return v.name
        if isinstance(v, _Param):
            if v.frozen:
                return self.use(_Const(v.t.detach().t() if v.transposed else v.t.detach(),
                                       False, v.sd), node)
            self.fail(node, self.opname(node),
                      f"parameter {v.sd!r} is used outside a module op (Linear, Embedding, "
                      "LayerNorm, ...): functional use of parameters is not supported")
        if isinstance(v, _Const):
            key = id(v)
            if key in self.const_names:
                return self.const_names[key][0]
            t = v.t
            if v.bat:
                if t.shape[0] != self.B or not torch.equal(t, t[:1].expand_as(t)):
                    self.fail(node, self.opname(node),
                              f"constant {v.origin!r} differs between samples (it depends on "
                              "the sample index, e.g. arange(batch)); only x[arange(batch), "
                              "idx] is supported")
                t = t[0]
            t = t.detach()
            if t.is_floating_point():
                if bool(torch.isnan(t).any()):
                    self.fail(node, self.opname(node), f"constant {v.origin!r} holds NaN")
                # +-inf (additive masks) -> +-finfo.max: JSON numbers are finite
                big = float(torch.finfo(self.fdtype()).max)
                data = [float(a) for a in t.reshape(-1).clamp(-big, big).tolist()]
            else:
                data = [int(a) for a in t.reshape(-1).to(torch.int64).tolist()]
            nm = self.fresh(f"{v.origin}")
            d = {"name": nm, "op": "constant", "inputs": [self.first_input],
                 "attrs": {"shape": list(t.shape), "data": data}}
            self.nodes.append(d)
            self.const_names[key] = (nm, v)
            return nm
        raise ExportError(f"node {node.name!r}: operand {v!r} is not a tensor")

    def ps_of(self, v):
        if isinstance(v, _Const):
            return tuple(v.t.shape[1:]) if v.bat else tuple(v.t.shape)
        return v.ps

    def gdim(self, v, d, node, allow_batch=False):
        r = len(v.shape if not isinstance(v, _Param) else v.t.shape)
        d = int(d)
        dd = d + r if d < 0 else d
        if not 0 <= dd < max(r, 1):
            self.fail(node, self.opname(node), f"dim {d} out of range")
        if getattr(v, "bat", False):
            if dd == 0 and not allow_batch:
                self.fail(node, self.opname(node), "it acts on the batch axis 0")
            return dd
        return dd + 1

    def squeeze0(self, v, node):
        """An unbatched value whose torch axis 0 lines up with the batch axis (size 1)."""
        if v.shape[0] != 1:
            self.fail(node, self.opname(node),
                      f"an operand of shape {tuple(v.shape)} that is the same for every sample "
                      "has a leading axis that lines up with the batch axis")
        if isinstance(v, _Const):
            return _Const(v.t[0], False, v.origin)
        nm = self.fresh(f"{v.name}.squeeze")
        d = {"name": nm, "op": "reshape", "inputs": [v.name],
             "attrs": {"shape": list(v.shape[1:])}}
        mp = self.module_path(node)
        if mp:
            d["module"] = mp
        self.nodes.append(d)
        return _Val(nm, False, v.shape[1:], v.dt)

    def align(self, vs, node, out_bat, out_rank):
        """Operands of a broadcasting op with a batched output: unbatched operands that
        reach the batch axis lose it (size 1); batched ones must have the output's rank."""
        out = []
        for v in vs:
            if _is_tensor_v(v) and not isinstance(v, _Param) and out_bat:
                r = len(v.shape)
                if v.bat and r != out_rank:
                    self.fail(node, self.opname(node),
                              "a batched operand of lower rank broadcasts against the batch "
                              "axis")
                if not v.bat and r == out_rank:
                    v = self.squeeze0(v, node)
            out.append(v)
        return out

    def fill_value(self, node, s):
        """A fill value for masked_fill / where: +-inf becomes +-finfo(dtype).max (JSON
        numbers are finite; softmax gives the same result unless a whole row is masked)."""
        s = float(s)
        if math.isnan(s):
            self.fail(node, self.opname(node), "a NaN fill value")
        if math.isinf(s):
            big = float(torch.finfo(self.fdtype()).max)
            return -big if s < 0 else big
        return s

    @staticmethod
    def scalar_of(v):
        """A python number for a python scalar or a 0-d constant, else None."""
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)):
            return v
        if isinstance(v, _Const) and v.t.dim() == 0:
            return v.t.item()
        return None

    # ---------------------------------------------------------------- trace
    def trace(self):
        model, ex = self.model, self.example
        nparams = _forward_arity(model)
        if isinstance(ex, dict):
            if nparams == 1:
                args, kwargs = (ex,), {}
            else:
                args, kwargs = (), dict(ex)
        else:
            args, kwargs = (ex,), {}
        flat, _ = torch.utils._pytree.tree_flatten_with_path((args, kwargs))
        names = []
        for path, leaf in flat:
            if not isinstance(leaf, torch.Tensor):
                raise ExportError(f"input {torch.utils._pytree.keystr(path)} is not a Tensor")
            key = path[-1]
            nm = getattr(key, "key", None)
            names.append("x" if not isinstance(ex, dict) else str(nm))
        batch = {t.shape[0] for _, t in flat}
        if len(batch) != 1:
            raise ExportError(f"the inputs have different batch sizes {sorted(batch)}")
        self.B = batch.pop()
        if self.B < 2:
            raise ExportError("use an example batch of at least 2 samples")
        bdim = torch.export.Dim("batch", min=2)
        if kwargs:
            dyn = {k: {0: bdim} for k in kwargs}
        else:
            dyn = torch.utils._pytree.tree_map(lambda t: {0: bdim}, args)
            import inspect
            ps = list(inspect.signature(model.forward).parameters.values())
            if ps and ps[0].kind == ps[0].VAR_POSITIONAL:
                dyn = (dyn,)        # forward(*args): the shapes of the one tuple `args`
        patched, caches = [], []
        for m in model.modules():
            # HF models return their key/value cache (not a tensor output) unless told not to
            cfg = getattr(m, "config", None)
            if getattr(cfg, "use_cache", False) is True and all(c is not cfg for c in caches):
                cfg.use_cache = False
                caches.append(cfg)
        for path, m in model.named_modules():
            fwd = _replacement_forward(m)
            if fwd is not None:
                m._laplace_path = path
                m.forward = types.MethodType(fwd, m)
                patched.append(m)
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            raise ExportError(f"torch.export could not trace {type(model).__name__} "
                              f"(with a dynamic batch axis): {type(e).__name__}: "
                              f"{' '.join(msg[:6])[:1200]}") from e
        finally:
            for m in patched:
                del m.forward
                del m._laplace_path
            for cfg in caches:
                cfg.use_cache = True
        return ep, flat, names

    # ---------------------------------------------------------------- main
    def run(self):
        ep, flat, in_names = self.trace()
        model = self.model
        sig = ep.graph_signature
        self.nodes, self.used_names, self.referenced = [], set(in_names), []
        self.param_users, self.const_names = {}, {}
        self.first_input = in_names[0]
        self.bsym = None
        env = {}
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        user_i = 0
        in_specs = []
        from torch.export.graph_signature import InputKind
        spec_of = {s.arg.name: s for s in sig.input_specs}
        for node in ep.graph.nodes:
            if node.op != "placeholder":
                continue
            s = spec_of[node.name]
            if s.kind == InputKind.PARAMETER:
                p = params[s.target]
                env[node.name] = _Param(s.target, p, frozen=not p.requires_grad)
            elif s.kind == InputKind.BUFFER:
                env[node.name] = _Const(buffers[s.target].detach(), False, node.name, s.target)
            elif s.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                t = ep.constants[s.target]
                if not isinstance(t, torch.Tensor):
                    self.fail(node, f"custom object {s.target}")
                env[node.name] = _Const(t.detach(), False, node.name)
            elif s.kind == InputKind.USER_INPUT:
                t = flat[user_i][1]
                nm = in_names[user_i]
                user_i += 1
                v = node.meta.get("val")
                if self.bsym is None:
                    self.bsym = v.shape[0].node.expr if isinstance(v.shape[0], torch.SymInt) \
                        else None
                    if self.bsym is None:
                        raise ExportError("torch.export did not keep the batch axis dynamic")
                env[node.name] = _Val(nm, True, tuple(t.shape), _dtkind(t.dtype))
                in_specs.append({"name": nm, "shape": list(t.shape[1:]),
                                 "dtype": "float" if t.is_floating_point() else "int"})
            else:
                self.fail(node, f"graph input of kind {s.kind}")
        out_node = None
        self.order = {n: i for i, n in enumerate(ep.graph.nodes)}
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out_node = node
                continue
            if node.op != "call_function":
                self.fail(node, f"{node.op} {node.target}")
            env[node.name] = self.map_node(node, env)

        # ------------------------------------------------------------ output
        outs = out_node.args[0]
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        out_spec = ep.module_call_graph[0].signature.out_spec if ep.module_call_graph and \
            ep.module_call_graph[0].signature is not None else ep.call_spec.out_spec
        res = torch.utils._pytree.tree_unflatten(outs, out_spec)
        key = self.output_key
        if isinstance(res, torch.fx.Node):
            if key is not None:
                raise ExportError(f"output_key={key!r} given but the model returns one tensor")
        else:
            if key is None:
                raise ExportError(f"the model returns a {type(res).__name__}: pass output_key")
            try:
                res = res[key]
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"output_key={key!r}: {type(e).__name__}: {e}") from e
        v = env.get(res.name) if isinstance(res, torch.fx.Node) else None
        if isinstance(v, _Const) or not isinstance(v, _Val):
            raise ExportError("the model output does not depend on the inputs or is not a tensor")
        if not v.bat or len(v.shape) != 2:
            raise ExportError(f"the model output has shape {tuple(v.shape)}"
                              f"{'' if v.bat else ' without the batch axis'}; laplace-rs needs "
                              "(batch, C)")
        if v.dt != "float":
            raise ExportError("the model output is not a float tensor")

        # ------------------------------------------------------------ parameters / weights
        plist = [n for n, p in model.named_parameters() if p.requires_grad]
        used = set(self.referenced)
        for n in plist:
            if n not in used:
                raise ExportError(f"parameter {n!r} is not used by any node of the exported "
                                  "graph (an unused module, or a parameter used functionally)")
        sd = model.state_dict(keep_vars=True)
        dtypes = {p.dtype for p in model.parameters()}
        state = {}
        for r in dict.fromkeys(self.referenced):
            t = (sd[r] if r in sd else params.get(r, buffers.get(r))).detach()
            if t.is_floating_point() and len(dtypes) == 1:
                t = t.to(next(iter(dtypes)))
            state[r] = t.contiguous().cpu()
        spec = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "inputs": in_specs,
                "parameters": plist, "nodes": self.nodes, "output": v.name}
        return spec, state

    # ---------------------------------------------------------------- one node
    def bind(self, node, env):
        """{argument name: value} from the op schema (defaults filled in)."""
        def conv(a):
            if isinstance(a, torch.fx.Node):
                return env[a.name]
            return a
        args = torch.fx.node.map_aggregate(node.args, conv)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, conv)
        tgt = node.target
        if not isinstance(tgt, torch._ops.OpOverload):
            return None, args, kwargs
        out = {}
        schema = tgt._schema.arguments
        for i, a in enumerate(schema):
            if i < len(args) and not a.kwarg_only:
                out[a.name] = args[i]
            elif a.name in kwargs:
                out[a.name] = kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                out[a.name] = None
        return out, args, kwargs

    def concrete(self, v, node):
        if isinstance(v, _Const):
            return v.t.clone()
        if isinstance(v, _Param):
            return v.t.detach().t() if v.transposed else v.t.detach()
        if isinstance(v, _Val):
            return torch.zeros(v.shape, dtype={"float": self.fdtype(), "int": torch.int64,
                                               "bool": torch.bool}[v.dt])
        if isinstance(v, _Multi):
            self.fail(node, self.opname(node), "a multi-output value used as an operand")
        return v

    def fdtype(self):
        if getattr(self, "_fdtype", None) is None:
            dts = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
            self._fdtype = dts.pop() if len(dts) == 1 else torch.get_default_dtype()
        return self._fdtype

    def evaluate(self, node, args, kwargs):
        cargs = torch.fx.node.map_aggregate(args, lambda a: self.concrete(a, node))
        ckw = torch.fx.node.map_aggregate(kwargs, lambda a: self.concrete(a, node))
        cargs = torch.fx.node.map_aggregate(cargs, self.cz)
        ckw = torch.fx.node.map_aggregate(ckw, self.cz)
        with torch.no_grad():
            try:
                r = node.target(*cargs, **ckw)
            except Exception as e:  # noqa: BLE001
                self.fail(node, self.opname(node), f"folding it failed: {type(e).__name__}: {e}")
        return self.wrap_result(node, r)

    def wrap_result(self, node, r):
        val = node.meta.get("val")
        if isinstance(r, torch.Tensor):
            bat = r.dim() > 0 and isinstance(val, torch.Tensor) and self.is_b(val.shape[0])
            return _Const(r, bat, node.name)
        if isinstance(r, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in r):
            vals = val if isinstance(val, (list, tuple)) else [None] * len(r)
            return _Multi([_Const(x, x.dim() > 0 and isinstance(m, torch.Tensor)
                                  and self.is_b(m.shape[0]), f"{node.name}.{i}")
                           for i, (x, m) in enumerate(zip(r, vals))])
        return r

    def map_node(self, node, env):
        tgt = node.target
        b, args, kwargs = self.bind(node, env)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        has_val = any(isinstance(a, _Val) for a in leaves)
        has_param = any(isinstance(a, _Param) and not a.frozen for a in leaves)
        if tgt is operator.getitem:
            src, i = args[0], args[1]
            if isinstance(src, _Multi):
                it = src.items[i]
                return it(node) if callable(it) else it
            if has_val or has_param:
                self.fail(node, "getitem", "indexing a tensor value")
            return src[i] if not isinstance(src, _Const) else self.evaluate(node, args, kwargs)
        if not isinstance(tgt, torch._ops.OpOverload):
            # python arithmetic on sizes (SymInt), math functions, ...
            if has_val or has_param:
                self.fail(node, _func_name(tgt))
            return self.evaluate(node, args, kwargs)
        op = tgt.overloadpacket.__name__
        if op.endswith("_") and not op.endswith("__") and op not in ("detach_",):
            # in-place op (training IR keeps them): the functional op, and the mutated
            # input reads as the result afterwards; refused when a view of it exists
            base = op[:-1]
            src = node.args[0] if node.args else None
            if isinstance(src, torch.fx.Node):
                order = self.order
                for u in src.users:
                    if u is not node and order[u] < order[node] and \
                            isinstance(u.target, torch._ops.OpOverload) and \
                            u.target.overloadpacket.__name__ in _VIEW_OPS:
                        self.fail(node, self.opname(node),
                                  f"it modifies {src.name!r} in place, which has a view "
                                  f"{u.name!r}")
            r = self.dispatch(node, base, b, args, kwargs, has_val, has_param)
            if isinstance(src, torch.fx.Node):
                env[src.name] = r
            return r
        return self.dispatch(node, op, b, args, kwargs, has_val, has_param)

    def dispatch(self, node, op, b, args, kwargs, has_val, has_param):
        # ---- a frozen 2-D parameter transposed (peft LoRA on HF Conv1D: the frozen
        #      base_layer's F.linear(x, weight.t())): stays a (frozen, transposed) parameter
        #      for the module op that reads it, as a trainable one does
        if not has_val and not has_param and self.frozen_swap(op, b):
            return getattr(self, f"op_{op}")(node, b)
        # ---- no input value, no trainable parameter: fold
        if not has_val and not has_param:
            if op in ("dropout", "feature_dropout", "alpha_dropout") and b.get("train"):
                self.fail(node, self.opname(node), "dropout with training=True")
            return self.evaluate(node, args, kwargs)
        if op in _META_ONLY:
            # depends on shapes / dtypes only (new_ones, zeros_like, sym_size, ...)
            return self.evaluate(node, args, kwargs)
        h = getattr(self, f"op_{op}", None)
        if h is not None:
            return h(node, b)
        if op in _IDENTITY_OPS:
            return self.identity_op(node, op, b)
        if op in _ARITH_OPS or op in _CMP_OPS or op in _LOGIC_OPS:
            return self.binary(node, op, b)
        if op in _UNARY_FUNC:
            return self.unary(node, _UNARY_FUNC[op], b["self"])
        if op in _UNARY_ACT:
            return self.activation(node, op, b)
        if op in _RESHAPE_OPS:
            return self.reshape(node, b["self"])
        self.fail(node, self.opname(node))

    @staticmethod
    def frozen_swap(op, b):
        """op swaps the two axes of a frozen 2-D parameter (t, .T, transpose, permute)."""
        x = b.get("self") if isinstance(b, dict) else None
        if not (isinstance(x, _Param) and x.frozen and x.t.dim() == 2):
            return False
        if op in ("t", "numpy_T"):
            return True
        if op == "transpose":
            return {int(b["dim0"]) % 2, int(b["dim1"]) % 2} == {0, 1}
        if op == "permute":
            return [int(d) % 2 for d in b["dims"]] == [1, 0]
        return False

    # ---------------------------------------------------------------- op handlers
    def operand(self, node, v, what="input"):
        if isinstance(v, _Param) and not v.frozen:
            self.fail(node, self.opname(node), f"parameter {v.sd!r} is used outside a module op "
                      "(functional use of parameters is not supported)")
        if isinstance(v, _Param):
            return _Const(v.t.detach().t() if v.transposed else v.t.detach(), False, v.sd)
        if not isinstance(v, (_Val, _Const)):
            self.fail(node, self.opname(node), f"{what} is not a tensor")
        return v

    def identity_op(self, node, op, b):
        if op.startswith("_assert") or op.startswith("sym_constrain"):
            return None
        x = self.operand(node, next(iter(b.values())))
        if op in ("dropout", "feature_dropout", "alpha_dropout") and b.get("train"):
            self.fail(node, self.opname(node), "dropout with training=True")
        if op in ("to", "_to_copy", "type_as"):
            val = node.meta.get("val")
            dst = _dtkind(val.dtype)
            src = x.dt
            if dst == "float" or dst == src or (dst == "int" and src == "bool"):
                return self.retype(x, dst)
            y = self.emit(node, "to", [self.use(x, node)], {"dtype": dst})
            return y
        return x

    @staticmethod
    def retype(x, dt):
        if isinstance(x, _Val):
            return _Val(x.name, x.bat, x.shape, dt)
        return x

    def unary(self, node, op, x, attrs=None):
        x = self.operand(node, x)
        return self.emit(node, op, [self.use(x, node)], attrs)

    def activation(self, node, op, b):
        x = b["self"] if "self" in b else b["input"]
        name = _UNARY_ACT[op]
        attrs = {}
        if op == "gelu":
            attrs["approximate"] = b.get("approximate") or "none"
        elif op == "elu":
            if b.get("scale", 1) != 1 or b.get("input_scale", 1) != 1:
                self.fail(node, self.opname(node), "scale / input_scale != 1")
            attrs["alpha"] = float(b.get("alpha", 1.0))
        elif op == "leaky_relu":
            attrs["negative_slope"] = float(b.get("negative_slope", 0.01))
        elif op == "softplus":
            attrs["beta"] = float(b.get("beta", 1.0))
            attrs["threshold"] = float(b.get("threshold", 20.0))
        elif op == "hardtanh":
            if (b.get("min_val"), b.get("max_val")) != (0.0, 6.0) and \
                    (b.get("min_val"), b.get("max_val")) != (0, 6):
                self.fail(node, self.opname(node), "hardtanh other than relu6")
        return self.unary(node, name, x, attrs or None)

    def binary(self, node, op, b):
        a = b["self"]
        c = b.get("other")
        if op in _ARITH_OPS:
            if b.get("alpha", 1) != 1:
                self.fail(node, self.opname(node), "alpha != 1")
            if b.get("rounding_mode") is not None:
                self.fail(node, self.opname(node), f"rounding_mode={b['rounding_mode']!r}")
        out_shape, out_bat, out_dt = self.meta(node)
        if op in ("add", "mul") and out_dt == "bool":
            gop = "logical_or" if op == "add" else "logical_and"
        elif op in _LOGIC_OPS and op != "mul":
            if out_dt != "bool":
                self.fail(node, self.opname(node), "bitwise ops on integers")
            gop = _LOGIC_OPS[op]
        else:
            gop = _ARITH_OPS.get(op) or _CMP_OPS.get(op)
        reverse = op == "rsub"
        sa, sc = self.scalar_of(a), self.scalar_of(c)
        if sa is not None and sc is not None:
            self.fail(node, self.opname(node), "no tensor operand")
        if sa is not None or sc is not None:
            if gop in ("logical_and", "logical_or"):
                self.fail(node, self.opname(node), "a scalar operand of a logical op")
            x = c if sa is not None else a
            s = sa if sa is not None else sc
            if sa is not None:
                reverse = not reverse
            x = self.operand(node, x)
            x, = self.align([x], node, out_bat, len(out_shape))
            attrs = {"scalar": float(s) if not isinstance(s, bool) else float(int(s))}
            if reverse:
                attrs["reverse"] = True
            return self.emit(node, gop, [self.use(x, node)], attrs)
        x, y = self.operand(node, a), self.operand(node, c)
        if reverse:
            x, y = y, x
        x, y = self.align([x, y], node, out_bat, len(out_shape))
        return self.emit(node, gop, [self.use(x, node), self.use(y, node)])

    def op_pow(self, node, b):
        x = b.get("self")
        e = b.get("exponent")
        se = self.scalar_of(e)
        if not _is_tensor_v(x) or se is None:
            self.fail(node, self.opname(node), "only tensor ** number")
        return self.unary(node, "pow", x, {"exponent": float(se)})

    def op_square(self, node, b):
        return self.unary(node, "pow", b["self"], {"exponent": 2.0})

    def op_logical_not(self, node, b):
        return self.unary(node, "logical_not", b["self"])

    def op_bitwise_not(self, node, b):
        x = self.operand(node, b["self"])
        if x.dt != "bool":
            self.fail(node, self.opname(node), "bitwise not of integers")
        return self.unary(node, "logical_not", x)

    def op_where(self, node, b):
        if "condition" not in b or b.get("self") is None and b.get("other") is None:
            self.fail(node, self.opname(node), "where(cond) (nonzero) is not supported")
        cond = self.operand(node, b["condition"], "condition")
        out_shape, out_bat, _ = self.meta(node)
        ins, attrs, vals = [], {}, []
        for key, role in (("self", "a"), ("other", "b")):
            v = b[key]
            s = self.scalar_of(v)
            if s is not None:
                attrs[role] = self.fill_value(node, s)
            else:
                vals.append(self.operand(node, v))
        cond, *vals = self.align([cond] + vals, node, out_bat, len(out_shape))
        ins = [self.use(cond, node)] + [self.use(v, node) for v in vals]
        return self.emit(node, "where", ins, attrs or None)

    def op_masked_fill(self, node, b):
        x = self.operand(node, b["self"])
        mask = self.operand(node, b["mask"], "mask")
        s = self.scalar_of(b["value"])
        if s is None:
            self.fail(node, self.opname(node), "a tensor fill value")
        out_shape, out_bat, _ = self.meta(node)
        if out_bat and not x.bat:
            # the mask brings the batch axis: where(mask, value, x)
            mask, x = self.align([mask, x], node, out_bat, len(out_shape))
            return self.emit(node, "where", [self.use(mask, node), self.use(x, node)],
                             {"a": self.fill_value(node, s)})
        x, mask = self.align([x, mask], node, out_bat, len(out_shape))
        return self.emit(node, "masked_fill", [self.use(x, node), self.use(mask, node)],
                         {"value": self.fill_value(node, s)})

    # ---- module ops
    def module_param(self, node, v, role):
        if v is None:
            return None
        if isinstance(v, _Param):
            return v
        if isinstance(v, _Const) and v.sd is not None:
            return v
        self.fail(node, self.opname(node), f"its {role} is not a parameter or buffer of a module")

    def op_linear(self, node, b):
        x = self.operand(node, b["input"])
        w = self.module_param(node, b["weight"], "weight")
        bias = self.module_param(node, b.get("bias"), "bias")
        transposed = getattr(w, "transposed", False)
        t = w.t
        if t.dim() != 2:
            self.fail(node, self.opname(node), "weight is not 2-D")
        out_f, in_f = (t.shape[1], t.shape[0]) if transposed else (t.shape[0], t.shape[1])
        attrs = {"in_features": int(in_f), "out_features": int(out_f), "bias": bias is not None}
        if transposed:
            attrs["weight_layout"] = "in_out"
        params = {"weight": w.sd}
        if bias is not None:
            params["bias"] = bias.sd
        return self.emit(node, "Linear", [self.use(x, node)], attrs, params)

    def op_t(self, node, b):
        return self.transpose_like(node, b["self"], 0, 1, two_d=True)

    def op_numpy_T(self, node, b):
        return self.transpose_like(node, b["self"], 0, 1, two_d=True)

    def op_transpose(self, node, b):
        return self.transpose_like(node, b["self"], b["dim0"], b["dim1"])

    def transpose_like(self, node, x, d0, d1, two_d=False):
        if isinstance(x, _Param):
            if x.t.dim() == 2 and {int(d0) % 2, int(d1) % 2} == {0, 1}:
                return _Param(x.sd, x.t, not x.transposed, x.frozen)
            self.operand(node, x)
        x = self.operand(node, x)
        r = len(x.shape)
        dims = list(range(r))
        i0, i1 = int(d0) % max(r, 1), int(d1) % max(r, 1)
        dims[i0], dims[i1] = dims[i1], dims[i0]
        return self.permute(node, x, dims)

    def op_permute(self, node, b):
        x = b["self"]
        dims = [int(d) for d in b["dims"]]
        if isinstance(x, _Param) and x.t.dim() == 2 and [d % 2 for d in dims] == [1, 0]:
            return _Param(x.sd, x.t, not x.transposed, x.frozen)
        x = self.operand(node, x)
        return self.permute(node, x, [d % len(x.shape) for d in dims])

    def permute(self, node, x, dims):
        if dims == sorted(dims):
            return x
        if x.bat:
            if dims[0] != 0:
                self.fail(node, self.opname(node), "it moves the batch axis")
            gd = dims
        else:
            gd = [0] + [d + 1 for d in dims]
        return self.emit(node, "permute", [self.use(x, node)], {"dims": gd})

    def op_embedding(self, node, b):
        w = self.module_param(node, b["weight"], "weight")
        idx = self.operand(node, b["indices"], "indices")
        if b.get("scale_grad_by_freq") or b.get("sparse"):
            self.fail(node, self.opname(node), "scale_grad_by_freq / sparse")
        if getattr(w, "transposed", False) or w.t.dim() != 2:
            self.fail(node, self.opname(node), "weight is not a 2-D table")
        pad = b.get("padding_idx", -1)
        pad = None if pad is None or int(pad) < 0 else int(pad)
        attrs = {"num_embeddings": int(w.t.shape[0]), "embedding_dim": int(w.t.shape[1]),
                 "padding_idx": pad}
        return self.emit(node, "Embedding", [self.use(idx, node)], attrs, {"weight": w.sd})

    def op_layer_norm(self, node, b):
        x = self.operand(node, b["input"])
        w = self.module_param(node, b.get("weight"), "weight")
        bias = self.module_param(node, b.get("bias"), "bias")
        ns = [int(s) for s in b["normalized_shape"]]
        if w is None and bias is not None:
            self.fail(node, self.opname(node), "a bias without a weight")
        attrs = {"normalized_shape": ns, "eps": float(b.get("eps", 1e-5)),
                 "elementwise_affine": w is not None, "bias": bias is not None}
        params = {}
        if w is not None:
            params["weight"] = w.sd
        if bias is not None:
            params["bias"] = bias.sd
        return self.emit(node, "LayerNorm", [self.use(x, node)], attrs, params or None)

    def op_rms_norm(self, node, b):
        x = self.operand(node, b["input"])
        w = self.module_param(node, b.get("weight"), "weight")
        ns = [int(s) for s in b["normalized_shape"]]
        eps = b.get("eps")
        attrs = {"normalized_shape": ns, "eps": None if eps is None else float(eps),
                 "elementwise_affine": w is not None}
        return self.emit(node, "RMSNorm", [self.use(x, node)], attrs,
                         {"weight": w.sd} if w is not None else None)

    # ---- attention, matmul
    def op_scaled_dot_product_attention(self, node, b):
        if float(b.get("dropout_p") or 0.0) != 0.0:
            self.fail(node, self.opname(node), "dropout_p != 0 (call model.eval())")
        if b.get("enable_gqa"):
            self.fail(node, self.opname(node), "enable_gqa=True")
        out_shape, out_bat, _ = self.meta(node)
        q, k, v = (self.operand(node, b[n]) for n in ("query", "key", "value"))
        m = b.get("attn_mask")
        vals = [q, k, v] + ([self.operand(node, m, "attn_mask")] if m is not None else [])
        vals = self.align(vals, node, out_bat, len(out_shape))
        attrs = {"is_causal": bool(b.get("is_causal", False)),
                 "scale": None if b.get("scale") is None else float(b["scale"])}
        if m is not None:
            attrs["mask"] = "bool" if vals[3].dt == "bool" else "additive"
        return self.emit(node, "scaled_dot_product_attention",
                         [self.use(x, node) for x in vals], attrs)

    def op_matmul(self, node, b):
        x, y = self.operand(node, b["self"]), self.operand(node, b["other"])
        for v in (x, y):
            if len(self.ps_of(v)) < 2:
                self.fail(node, self.opname(node), "an operand of per-sample rank < 2")
        if not (x.bat or y.bat):
            self.fail(node, self.opname(node), "no batched operand")
        return self.emit(node, "matmul", [self.use(x, node), self.use(y, node)])

    def op_bmm(self, node, b):
        x, y = self.operand(node, b["self"]), self.operand(node, b["mat2"])
        if not (x.bat and y.bat):
            self.fail(node, self.opname(node), "bmm over a batch of matrices that is not the "
                      "sample batch")
        return self.emit(node, "matmul", [self.use(x, node), self.use(y, node)])

    # ---- reductions, softmax
    def reduce(self, node, op, b):
        x = self.operand(node, b["self"])
        dim = b.get("dim")
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            self.fail(node, self.opname(node), "a reduction over all axes includes the batch "
                      "axis")
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = sorted(self.gdim(x, d, node) for d in dims)
        return self.emit(node, op, [self.use(x, node)],
                         {"dim": dims, "keepdim": bool(b.get("keepdim", False))})

    def op_mean(self, node, b):
        return self.reduce(node, "mean", b)

    def op_sum(self, node, b):
        return self.reduce(node, "sum", b)

    def softmax(self, node, op, b):
        x = self.operand(node, b["self"])
        return self.emit(node, op, [self.use(x, node)], {"dim": self.gdim(x, b["dim"], node)})

    def op_softmax(self, node, b):
        return self.softmax(node, "softmax", b)

    def op__softmax(self, node, b):
        return self.softmax(node, "softmax", b)

    def op_log_softmax(self, node, b):
        return self.softmax(node, "log_softmax", b)

    def op__log_softmax(self, node, b):
        return self.softmax(node, "log_softmax", b)

    def op_cumsum(self, node, b):
        x = self.operand(node, b["self"])
        return self.emit(node, "cumsum", [self.use(x, node)], {"dim": self.gdim(x, b["dim"], node)})

    def op_argmax(self, node, b):
        x = self.operand(node, b["self"])
        if b.get("dim") is None:
            self.fail(node, self.opname(node), "argmax over all axes")
        return self.emit(node, "argmax", [self.use(x, node)],
                         {"dim": self.gdim(x, b["dim"], node),
                          "keepdim": bool(b.get("keepdim", False))})

    # ---- shapes
    def reshape(self, node, x):
        x = self.operand(node, x)
        out_shape, out_bat, _ = self.meta(node)
        if x.bat and not out_bat:
            self.fail(node, self.opname(node), "it merges or moves the batch axis")
        if not x.bat and out_bat:
            self.fail(node, self.opname(node), "a reshape that creates the batch axis")
        ps = list(out_shape[1:]) if out_bat else list(out_shape)
        if tuple(ps) == tuple(self.ps_of(x)):
            return x
        return self.emit(node, "reshape", [self.use(x, node)], {"shape": ps})

    def op_expand(self, node, b):
        x = self.operand(node, b["self"])
        out_shape, out_bat, _ = self.meta(node)
        if x.bat and len(out_shape) != len(x.shape):
            self.fail(node, self.opname(node), "it adds axes before the batch axis")
        if out_bat and not x.bat and len(x.shape) == len(out_shape):
            x = self.squeeze0(x, node)
        ps = list(out_shape[1:]) if out_bat else list(out_shape)
        if tuple(ps) == tuple(self.ps_of(x)):
            return x
        return self.emit(node, "expand", [self.use(x, node)], {"shape": ps})

    def op_repeat(self, node, b):
        x = self.operand(node, b["self"])
        reps = [self.cz(r) for r in b["repeats"]]
        if x.bat:
            if len(reps) != len(x.shape) or reps[0] != 1:
                self.fail(node, self.opname(node), "it repeats along (or before) the batch axis")
            reps = reps[1:]
        return self.emit(node, "repeat", [self.use(x, node)], {"repeats": reps})

    def op_slice(self, node, b):
        x = self.operand(node, b["self"])
        d = self.gdim(x, b.get("dim", 0), node, allow_batch=True)
        td = d if x.bat else d - 1
        n = x.shape[td]
        start = self.cz(b.get("start"))
        end = self.cz(b.get("end"))
        step = int(self.cz(b.get("step", 1)) or 1)
        start, end, step = slice(start, end, step).indices(n)
        end = max(end, start)
        if (start, end, step) == (0, n, 1):
            return x
        if x.bat and td == 0:
            self.fail(node, self.opname(node), "it slices the batch axis")
        return self.emit(node, "slice", [self.use(x, node)],
                         {"dim": d, "start": start, "end": end, "step": step})

    def op_select(self, node, b):
        x = self.operand(node, b["self"])
        d = self.gdim(x, b["dim"], node)
        td = d if x.bat else d - 1
        i = int(self.cz(b["index"]))
        n = x.shape[td]
        ii = i + n if i < 0 else i
        if not 0 <= ii < n:
            self.fail(node, self.opname(node), f"index {i} out of range")
        return self.emit(node, "select", [self.use(x, node)], {"dim": d, "index": ii})

    def op_cat(self, node, b):
        ts = [self.operand(node, t) for t in b["tensors"]]
        ts = [t for t in ts if not (len(t.shape) == 1 and t.shape[0] == 0)]
        out_shape, out_bat, _ = self.meta(node)
        d = int(b.get("dim", 0))
        r = len(out_shape)
        d = d + r if d < 0 else d
        ts = [t for t in ts if t.shape[d] != 0]
        if len(ts) == 1:
            return ts[0]
        if out_bat and d == 0:
            self.fail(node, self.opname(node), "it concatenates along the batch axis")
        if out_bat and not all(t.bat for t in ts):
            self.fail(node, self.opname(node), "mixed batched / unbatched operands")
        return self.emit(node, "cat", [self.use(t, node) for t in ts],
                         {"dim": d if out_bat else d + 1})

    def split_parts(self, node, x, bounds, d):
        x = self.operand(node, x)

        def part(s, e):
            def make(gnode):
                return self.op_slice(gnode, {"self": x, "dim": d, "start": s, "end": e,
                                             "step": 1})
            return make
        return _Multi([part(s, e) for s, e in bounds])

    def op_split(self, node, b):
        x = self.operand(node, b["self"])
        d = int(b.get("dim", 0))
        n = x.shape[d]
        size = int(self.cz(b["split_size"]))
        bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        return self.split_parts(node, x, bounds, d)

    def op_split_with_sizes(self, node, b):
        x = self.operand(node, b["self"])
        d = int(b.get("dim", 0))
        bounds, s = [], 0
        for k in b["split_sizes"]:
            k = int(self.cz(k))
            bounds.append((s, s + k))
            s += k
        return self.split_parts(node, x, bounds, d)

    def op_chunk(self, node, b):
        x = self.operand(node, b["self"])
        d = int(b.get("dim", 0))
        n = x.shape[d]
        c = int(b["chunks"])
        size = -(-n // c)
        bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        return self.split_parts(node, x, bounds, d)

    def op_unbind(self, node, b):
        x = self.operand(node, b["self"])
        d = int(b.get("dim", 0))

        def part(i):
            def make(gnode):
                return self.op_select(gnode, {"self": x, "dim": d, "index": i})
            return make
        return _Multi([part(i) for i in range(x.shape[d])])

    # ---- indexing
    def batch_index(self, v):
        """True for arange(batch) shaped (B, 1, ..., 1) (possibly broadcast)."""
        if not (isinstance(v, _Const) and v.bat):
            return False
        t = v.t
        ref = torch.arange(self.B).view(self.B, *([1] * (t.dim() - 1))).expand_as(t)
        return torch.equal(t.to(torch.int64), ref)

    def idx_operand(self, node, idx, S, bat_target):
        """An index tensor broadcast to per-sample shape S."""
        if isinstance(idx, _Const):
            t = idx.t
            if idx.bat:
                t = t[0]
            t = t.broadcast_to(S) if tuple(t.shape) != tuple(S) else t
            return _Const(t.contiguous(), False, idx.origin)
        if isinstance(idx, _Val):
            if not idx.bat:
                self.fail(node, self.opname(node), "an index computed from parameters only")
            if tuple(idx.ps) != tuple(S):
                nm = self.fresh(f"{node.name}.idx")
                d = {"name": nm, "op": "expand", "inputs": [idx.name], "attrs": {"shape": list(S)}}
                self.nodes.append(d)
                return _Val(nm, True, (idx.shape[0],) + tuple(S), idx.dt)
            return idx
        self.fail(node, self.opname(node), "an index that is not a tensor")

    def op_index(self, node, b):
        x = self.operand(node, b["self"])
        idx = list(b["indices"])
        while idx and idx[-1] is None:
            idx.pop()
        tens = [(i, v) for i, v in enumerate(idx) if v is not None]
        for _, v in tens:
            if getattr(v, "dt", "int") == "bool" or (isinstance(v, _Const) and
                                                     v.t.dtype == torch.bool):
                self.fail(node, self.opname(node), "boolean-mask indexing")
        if not x.bat:
            # table[idx]: a constant (or parameter-only) table indexed by per-sample indices
            if len(tens) != 1 or tens[0][0] != 0 or not getattr(tens[0][1], "bat", False):
                self.fail(node, self.opname(node), "indexing a value that is the same for "
                          "every sample other than table[per-sample idx]")
            iv = self.operand(node, tens[0][1], "index")
            return self.emit(node, "index", [self.use(x, node), self.use(iv, node)], {"dim": 1})
        if tens and tens[0][0] == 0:
            # x[arange(B)..., idx]: per-sample indexing along axis 1
            if not self.batch_index(tens[0][1]) or len(tens) != 2 or tens[1][0] != 1:
                self.fail(node, self.opname(node), "advanced indexing of the batch axis other "
                          "than x[arange(batch), idx]")
            i0, i1 = tens[0][1], tens[1][1]
            full = torch.broadcast_shapes(tuple(i0.shape), tuple(i1.shape))
            S = tuple(full[1:])
            if isinstance(i1, _Val) and i1.bat is False:
                self.fail(node, self.opname(node), "an index computed from parameters only")
            if isinstance(i1, (_Val, _Const)) and i1.bat is False and len(i1.shape) == len(full):
                i1 = self.squeeze0(i1, node)
            iv = self.idx_operand(node, i1, S, True)
            return self.emit(node, "index", [self.use(x, node), self.use(iv, node)], {"dim": 1})
        if len(tens) != 1:
            self.fail(node, self.opname(node), "several index tensors")
        d, iv = tens[0]
        if isinstance(iv, _Val) and iv.bat:
            self.fail(node, self.opname(node), "x[:, idx] with a per-sample idx (use "
                      "x[arange(batch), idx] or gather)")
        iv = self.idx_operand(node, iv, tuple(iv.shape), False)
        return self.emit(node, "index", [self.use(x, node), self.use(iv, node)],
                         {"dim": self.gdim(x, d, node)})

    def op_index_select(self, node, b):
        x = self.operand(node, b["self"])
        iv = self.operand(node, b["index"], "index")
        if isinstance(iv, _Val) and iv.bat:
            self.fail(node, self.opname(node), "a per-sample index (use gather)")
        iv = self.idx_operand(node, iv, tuple(iv.shape), False)
        return self.emit(node, "index", [self.use(x, node), self.use(iv, node)],
                         {"dim": self.gdim(x, b["dim"], node)})

    def op_gather(self, node, b):
        x = self.operand(node, b["self"])
        iv = self.operand(node, b["index"], "index")
        if not (x.bat and getattr(iv, "bat", False)):
            self.fail(node, self.opname(node), "gather needs a batched input and index")
        return self.emit(node, "gather", [self.use(x, node), self.use(iv, node)],
                         {"dim": self.gdim(x, b["dim"], node)})

    # ---- convolutional module ops (the graph form's original ops, for models that
    # only torch.export can trace)
    def op_conv2d(self, node, b):
        x = self.operand(node, b["input"])
        w = self.module_param(node, b["weight"], "weight")
        bias = self.module_param(node, b.get("bias"), "bias")
        if not x.bat or len(x.shape) != 4:
            self.fail(node, self.opname(node), "Conv2d needs a batched (N, C, H, W) input")
        g = int(b.get("groups", 1))
        t = w.t
        pad = b.get("padding", 0)
        pad = pad if isinstance(pad, str) else _pair([int(p) for p in pad] if
                                                      isinstance(pad, (list, tuple)) else pad)
        attrs = {"in_channels": int(t.shape[1]) * g, "out_channels": int(t.shape[0]),
                 "kernel_size": [int(k) for k in t.shape[2:]],
                 "stride": _pair([int(v) for v in b.get("stride", 1)] if
                                 isinstance(b.get("stride", 1), (list, tuple)) else b["stride"]),
                 "padding": pad,
                 "dilation": _pair([int(v) for v in b.get("dilation", 1)] if
                                   isinstance(b.get("dilation", 1), (list, tuple))
                                   else b["dilation"]),
                 "groups": g, "bias": bias is not None, "padding_mode": "zeros"}
        attrs["stride"] = _pair(attrs["stride"]) if len(attrs["stride"]) == 1 else attrs["stride"]
        attrs["dilation"] = _pair(attrs["dilation"]) if len(attrs["dilation"]) == 1 \
            else attrs["dilation"]
        if isinstance(attrs["padding"], list) and len(attrs["padding"]) == 1:
            attrs["padding"] = _pair(attrs["padding"][0])
        params = {"weight": w.sd}
        if bias is not None:
            params["bias"] = bias.sd
        return self.emit(node, "Conv2d", [self.use(x, node)], attrs, params)

    def op_batch_norm(self, node, b):
        if b.get("training"):
            self.fail(node, self.opname(node), "BatchNorm in training mode (call model.eval())")
        return self.bn(node, b["input"], b.get("weight"), b.get("bias"), b.get("running_mean"),
                       b.get("running_var"), b.get("eps", 1e-5))

    def op__native_batch_norm_legit_no_training(self, node, b):
        r = self.bn(node, b["input"], b.get("weight"), b.get("bias"), b.get("running_mean"),
                    b.get("running_var"), b.get("eps", 1e-5))
        return _Multi([r, None, None])

    def bn(self, node, x, w, bias, rm, rv, eps):
        x = self.operand(node, x)
        w = self.module_param(node, w, "weight")
        bias = self.module_param(node, bias, "bias")
        if rm is None or rv is None:
            self.fail(node, self.opname(node), "BatchNorm without running statistics")
        rm = self.module_param(node, rm, "running_mean")
        rv = self.module_param(node, rv, "running_var")
        if not x.bat or len(x.shape) not in (2, 3, 4):
            self.fail(node, self.opname(node), "BatchNorm of an input that is not (N, C, ...)")
        if (w is None) != (bias is None):
            self.fail(node, self.opname(node), "BatchNorm with only one of weight / bias")
        op = "BatchNorm2d" if len(x.shape) == 4 else "BatchNorm1d"
        attrs = {"num_features": int(x.shape[1]), "eps": float(eps), "affine": w is not None}
        params = {}
        if w is not None:
            params.update(weight=w.sd, bias=bias.sd)
        params.update(running_mean=rm.sd, running_var=rv.sd)
        return self.emit(node, op, [self.use(x, node)], attrs, params)

    def pool_args(self, b, names):
        out = {}
        for n in names:
            v = b.get(n)
            if isinstance(v, (list, tuple)):
                v = [int(a) for a in v]
                v = _pair(v[0]) if len(v) == 1 else v
            out[n] = v
        return out

    def op_max_pool2d(self, node, b):
        x = self.operand(node, b["self"])
        a = self.pool_args(b, ["kernel_size", "stride", "padding", "dilation"])
        k = _pair(a["kernel_size"])
        attrs = {"kernel_size": k, "stride": _pair(a["stride"]) if a["stride"] else k,
                 "padding": _pair(a["padding"]), "dilation": _pair(a["dilation"]),
                 "ceil_mode": bool(b.get("ceil_mode", False))}
        return self.emit(node, "MaxPool2d", [self.use(x, node)], attrs)

    def op_max_pool2d_with_indices(self, node, b):
        r = self.op_max_pool2d(node, b)
        return _Multi([r, None])

    def op_avg_pool2d(self, node, b):
        x = self.operand(node, b["self"])
        a = self.pool_args(b, ["kernel_size", "stride", "padding"])
        k = _pair(a["kernel_size"])
        attrs = {"kernel_size": k, "stride": _pair(a["stride"]) if a["stride"] else k,
                 "padding": _pair(a["padding"]), "ceil_mode": bool(b.get("ceil_mode", False)),
                 "count_include_pad": bool(b.get("count_include_pad", True)),
                 "divisor_override": b.get("divisor_override")}
        return self.emit(node, "AvgPool2d", [self.use(x, node)], attrs)

    def op_adaptive_avg_pool2d(self, node, b):
        x = self.operand(node, b["self"])
        os_ = [int(v) for v in b["output_size"]]
        return self.emit(node, "AdaptiveAvgPool2d", [self.use(x, node)],
                         {"output_size": _pair(os_[0]) if len(os_) == 1 else os_})
