"""Reference interpreter of the laplace-rs graph model format (docs/model-format.md).

Independent of torch.fx: reads ``model.json`` + ``weights.safetensors`` and runs
the nodes with ``torch.nn.functional``. This is the executable definition of the
graph form::

    g = GraphModel.load("dir")               # or GraphModel(spec_dict, tensors)
    f = g(x)                                 # x: (M, *shape) or a dict {input name: tensor}
    f = g.forward_with({name: tensor}, x)    # with replaced tensors (torch.func friendly)

Strict: unknown keys / ops / attributes, missing or mis-shaped tensors, unused
tensors and values read before they are written raise, naming node and key.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

NODE_KEYS = {"name", "op", "inputs", "attrs", "params", "module"}
TOP_KEYS = {"format", "version", "inputs", "parameters", "nodes", "output"}


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _conv(x, P, a):
    pad = a.get("padding", 0)
    pad = pad if isinstance(pad, str) else _pair(pad)
    return F.conv2d(x, P["weight"], P.get("bias"), _pair(a.get("stride", 1)), pad,
                    _pair(a.get("dilation", 1)), a.get("groups", 1))


def _bn(x, P, a):
    return F.batch_norm(x, P["running_mean"], P["running_var"], P.get("weight"), P.get("bias"),
                        False, 0.0, a.get("eps", 1e-5))


def _maxpool(x, P, a):
    k = _pair(a["kernel_size"])
    return F.max_pool2d(x, k, _pair(a.get("stride") or k), _pair(a.get("padding", 0)),
                        _pair(a.get("dilation", 1)), a.get("ceil_mode", False))


def _avgpool(x, P, a):
    k = _pair(a["kernel_size"])
    return F.avg_pool2d(x, k, _pair(a.get("stride") or k), _pair(a.get("padding", 0)),
                        a.get("ceil_mode", False), a.get("count_include_pad", True),
                        a.get("divisor_override"))


# op -> (allowed attrs, allowed param roles, fn(x, params, attrs))
UNARY = {
    "Linear": ({"in_features", "out_features", "bias"}, {"weight", "bias"},
               lambda x, P, a: F.linear(x, P["weight"], P.get("bias"))),
    "Conv2d": ({"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups", "bias", "padding_mode"}, {"weight", "bias"}, _conv),
    "BatchNorm1d": ({"num_features", "eps", "affine"},
                    {"weight", "bias", "running_mean", "running_var"}, _bn),
    "BatchNorm2d": ({"num_features", "eps", "affine"},
                    {"weight", "bias", "running_mean", "running_var"}, _bn),
    "ReLU": (set(), set(), lambda x, P, a: F.relu(x)),
    "ReLU6": (set(), set(), lambda x, P, a: F.relu6(x)),
    "Tanh": (set(), set(), lambda x, P, a: torch.tanh(x)),
    "Sigmoid": (set(), set(), lambda x, P, a: torch.sigmoid(x)),
    "Softplus": ({"beta", "threshold"}, set(),
                 lambda x, P, a: F.softplus(x, a.get("beta", 1.0), a.get("threshold", 20.0))),
    "ELU": ({"alpha"}, set(), lambda x, P, a: F.elu(x, a.get("alpha", 1.0))),
    "LeakyReLU": ({"negative_slope"}, set(),
                  lambda x, P, a: F.leaky_relu(x, a.get("negative_slope", 0.01))),
    "GELU": ({"approximate"}, set(),
             lambda x, P, a: F.gelu(x, approximate=a.get("approximate", "none"))),
    "SiLU": (set(), set(), lambda x, P, a: F.silu(x)),
    "Hardswish": (set(), set(), lambda x, P, a: F.hardswish(x)),
    "Hardsigmoid": (set(), set(), lambda x, P, a: F.hardsigmoid(x)),
    "Identity": (set(), set(), lambda x, P, a: x),
    "Dropout": ({"p"}, set(), lambda x, P, a: x),
    "Flatten": ({"start_dim", "end_dim"}, set(),
                lambda x, P, a: torch.flatten(x, a.get("start_dim", 1), a.get("end_dim", -1))),
    "MaxPool2d": ({"kernel_size", "stride", "padding", "dilation", "ceil_mode"}, set(), _maxpool),
    "AvgPool2d": ({"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"}, set(), _avgpool),
    "AdaptiveAvgPool2d": ({"output_size"}, set(),
                          lambda x, P, a: F.adaptive_avg_pool2d(x, _pair(a["output_size"]))),
    "neg": (set(), set(), lambda x, P, a: -x),
    "reshape": ({"shape"}, set(), lambda x, P, a: x.reshape(x.shape[0], *a["shape"])),
    "permute": ({"dims"}, set(), lambda x, P, a: x.permute(*a["dims"])),
    "mean": ({"dim", "keepdim"}, set(),
             lambda x, P, a: x.mean(dim=a["dim"], keepdim=a.get("keepdim", False))),
    "sum": ({"dim", "keepdim"}, set(),
            lambda x, P, a: x.sum(dim=a["dim"], keepdim=a.get("keepdim", False))),
    "slice": ({"dim", "start", "end", "step"}, set(),
              lambda x, P, a: x[
                  (slice(None),) * (a["dim"] % x.ndim)
                  + (slice(a.get("start"), a.get("end"), a.get("step", 1)),)]),
    "select": ({"dim", "index"}, set(), lambda x, P, a: x.select(a["dim"], a["index"])),
}
ARITH = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}


def _param_shape(op, role, a):
    if op == "Linear":
        return (a["out_features"], a["in_features"]) if role == "weight" else (a["out_features"],)
    if op == "Conv2d":
        if role == "weight":
            return (a["out_channels"], a["in_channels"] // a.get("groups", 1),
                    *_pair(a["kernel_size"]))
        return (a["out_channels"],)
    if op.startswith("BatchNorm"):
        return (a["num_features"],)
    return None


class GraphModel:
    def __init__(self, spec: dict, tensors: dict):
        bad = set(spec) - TOP_KEYS
        if bad or spec.get("format") != "laplace-graph" or spec.get("version") != 1:
            raise ValueError(f"not a laplace-graph v1 spec (unknown keys {sorted(bad)})")
        self.spec, self.tensors = spec, dict(tensors)
        used = set()
        defined = {i["name"] for i in spec["inputs"]}
        for nd in spec["nodes"]:
            where = f"node {nd.get('name')!r}"
            if set(nd) - NODE_KEYS:
                raise ValueError(f"{where}: unknown keys {sorted(set(nd) - NODE_KEYS)}")
            op, attrs, params = nd["op"], nd.get("attrs", {}), nd.get("params", {})
            if op in ARITH:
                allowed, roles = ({"scalar", "reverse"} if len(nd["inputs"]) == 1 else set()), set()
            elif op == "cat":
                allowed, roles = {"dim"}, set()
            elif op in UNARY:
                allowed, roles = UNARY[op][0], UNARY[op][1]
                if len(nd["inputs"]) != 1:
                    raise ValueError(f"{where}: op {op} takes one input")
            else:
                raise ValueError(f"{where}: unknown op {op!r}")
            if set(attrs) - allowed:
                raise ValueError(f"{where}: unknown attrs {sorted(set(attrs) - allowed)}")
            if set(params) - roles:
                raise ValueError(f"{where}: unknown params {sorted(set(params) - roles)}")
            for i in nd["inputs"]:
                if i not in defined:
                    raise ValueError(f"{where}: input {i!r} read before it is written")
            for r, t in params.items():
                if t not in self.tensors:
                    raise ValueError(f"{where}: params.{r}: tensor {t!r} missing")
                used.add(t)
                want = _param_shape(op, r, attrs)
                if want is not None and tuple(self.tensors[t].shape) != want:
                    raise ValueError(f"{where}: params.{r}: tensor {t!r} has shape "
                                     f"{tuple(self.tensors[t].shape)}, expected {want}")
            if nd["name"] in defined:
                raise ValueError(f"{where}: name defined twice")
            defined.add(nd["name"])
        if set(self.tensors) - used:
            raise ValueError(f"unused tensors {sorted(set(self.tensors) - used)}")
        owners = [t for nd in spec["nodes"] for t in nd.get("params", {}).values()]
        for p in spec["parameters"]:
            if owners.count(p) != 1:
                raise ValueError(f"parameter {p!r} belongs to {owners.count(p)} nodes (need 1)")
        if spec["output"] not in defined:
            raise ValueError(f"output {spec['output']!r} is not a value")

    @classmethod
    def load(cls, d, model_name="model.json", weights_name="weights.safetensors"):
        from safetensors.torch import load_file
        with open(os.path.join(d, model_name)) as fh:
            spec = json.load(fh)
        return cls(spec, load_file(os.path.join(d, weights_name)))

    @property
    def parameters(self):
        return self.spec["parameters"]

    def __call__(self, x):
        return self.forward_with({}, x)

    def forward_with(self, override: dict, x, return_env=False):
        T = {**self.tensors, **override}
        ins = self.spec["inputs"]
        env = dict(x) if isinstance(x, dict) else {ins[0]["name"]: x}
        for i in ins:
            v = env[i["name"]]
            if tuple(v.shape[1:]) != tuple(i["shape"]):
                raise ValueError(f"input {i['name']!r}: shape {tuple(v.shape)} vs {i['shape']}")
        for nd in self.spec["nodes"]:
            op, a = nd["op"], nd.get("attrs", {})
            xs = [env[i] for i in nd["inputs"]]
            P = {r: T[t] for r, t in nd.get("params", {}).items()}
            if op in ARITH:
                if len(xs) == 2:
                    y = ARITH[op](xs[0], xs[1])
                elif a.get("reverse", False):
                    y = ARITH[op](torch.as_tensor(a["scalar"], dtype=xs[0].dtype), xs[0])
                else:
                    y = ARITH[op](xs[0], a["scalar"])
            elif op == "cat":
                y = torch.cat(xs, a["dim"])
            else:
                y = UNARY[op][2](xs[0], P, a)
            env[nd["name"]] = y
        return env if return_env else env[self.spec["output"]]
