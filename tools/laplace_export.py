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


def export(model: nn.Module, example_input, out_dir: str, output_key=None,
           model_name: str = "model.json", weights_name: str = "weights.safetensors",
           tracer: str = "auto") -> dict:
    """Export any ``nn.Module`` to the graph form of docs/model-format.md.

    ``example_input``: a batched Tensor (``model(x)``; graph input ``"x"``) or a dict
    of batched Tensors (``model(d)`` if ``forward`` takes one argument, else
    ``model(**d)``; one graph input per key). Use a batch of at least 2 so that a
    reshape that would mix samples is detected. ``output_key`` picks the field of a
    dict / tuple output. Writes ``model.json`` and ``weights.safetensors`` into
    ``out_dir`` and returns the JSON dict.
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
    import inspect
    nparams = len(inspect.signature(model.forward).parameters)
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
