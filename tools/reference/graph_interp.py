"""Reference interpreter of the laplace-rs graph model format (docs/model-format.md).

Independent of torch.fx: reads ``model.json`` + ``weights.safetensors`` and runs
the nodes with ``torch.nn.functional``. This is the executable definition of the
graph form::

    g = GraphModel.load("dir")               # or GraphModel(spec_dict, tensors)
    f = g(x)                                 # x: (M, *shape) or a dict {input name: tensor}
    f = g.forward_with({name: tensor}, x)    # with replaced tensors (torch.func friendly)

Every value is carried in the compute dtype (the weights' float dtype), integer
inputs included, as laplace-rs does: integer-valued results (comparisons, masks,
argmax) are 0 / 1 or integral floats; ops that index convert to int64 there.

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
CMP = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt,
       "ge": torch.ge}
BINARY = {**ARITH, **CMP}


def _align(*xs):
    """Batched tensors with their per-sample shapes right-aligned: axes of size 1 are
    inserted after the batch axis so that torch broadcasting acts per sample."""
    r = max(x.dim() for x in xs)
    return [x.reshape(x.shape[0], *([1] * (r - x.dim())), *x.shape[1:]) if x.dim() < r else x
            for x in xs]


def _nz(x):
    return x != 0


def _as_index(x, where):
    if not bool((x == torch.round(x)).all()):
        raise ValueError(f"{where}: index values are not integers")
    return x.to(torch.int64)


def _embedding(x, P, a):
    w = P["weight"]
    idx = _as_index(x, "Embedding")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
        raise ValueError(f"Embedding: index out of range [0, {w.shape[0]})")
    return F.embedding(idx, w, a.get("padding_idx"))


def _linear(x, P, a):
    w = P["weight"]
    if a.get("weight_layout", "out_in") == "in_out":
        w = w.t()
    elif a.get("weight_layout", "out_in") != "out_in":
        raise ValueError(f"Linear: weight_layout {a['weight_layout']!r}")
    return F.linear(x, w, P.get("bias"))


def _to(x, P, a):
    dt = a["dtype"]
    if dt == "float":
        return x
    if dt == "int":
        return torch.trunc(x)
    if dt == "bool":
        return _nz(x).to(x.dtype)
    raise ValueError(f"to: dtype {dt!r}")


def _expand(x, P, a):
    shape = list(a["shape"])
    x = _align(x, x.new_zeros((x.shape[0],) + (1,) * len(shape)))[0]
    return x.expand(x.shape[0], *shape)


def _repeat(x, P, a):
    reps = list(a["repeats"])
    x = _align(x, x.new_zeros((x.shape[0],) + (1,) * len(reps)))[0]
    return x.repeat(1, *reps)


def _argmax(x, P, a):
    return torch.argmax(x, dim=a["dim"], keepdim=a.get("keepdim", False)).to(x.dtype)


def _index(x, idx, a):
    d = a["dim"] % x.dim()
    if d == 0:
        raise ValueError("index: dim 0 is the batch axis")
    n = x.shape[d]
    i = _as_index(idx, "index")
    i = torch.where(i < 0, i + n, i)
    if i.numel() and (int(i.min()) < 0 or int(i.max()) >= n):
        raise ValueError(f"index: index out of range for an axis of length {n}")
    B, S = x.shape[0], tuple(i.shape[1:])
    pre, post = tuple(x.shape[1:d]), tuple(x.shape[d + 1:])
    xm = x.movedim(d, 1)                                        # (B, n, *pre, *post)
    bi = torch.arange(B).view(B, *([1] * len(S)))
    y = xm[bi, i]                                               # (B, *S, *pre, *post)
    s, p = len(S), len(pre)
    perm = [0] + [1 + s + k for k in range(p)] + [1 + k for k in range(s)] + \
        [1 + s + p + k for k in range(len(post))]
    return y.permute(perm)


def _gather(x, idx, a):
    return torch.gather(x, a["dim"], _as_index(idx, "gather"))


def _sdpa(xs, a):
    q, k, v = _align(*xs[:3])
    mask = xs[3] if len(xs) > 3 else None
    L, S = q.shape[-2], k.shape[-2]
    kind = a.get("mask")
    if mask is None and kind is not None:
        raise ValueError("scaled_dot_product_attention: attrs.mask without a mask input")
    if mask is not None:
        if kind not in ("bool", "additive"):
            raise ValueError(f"scaled_dot_product_attention: mask must be 'bool' or "
                             f"'additive', not {kind!r}")
        mask = _align(mask, q)[0]
        mask = _nz(mask) if kind == "bool" else mask
    causal = bool(a.get("is_causal", False))
    if causal and mask is not None:
        keep = torch.ones(L, S, dtype=torch.bool).tril()
        mask = (mask & keep) if mask.dtype == torch.bool else \
            mask.masked_fill(~keep, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=a.get("scale"))


def _constant(x, a, dtype):
    shape = tuple(a["shape"])
    data = a["data"]
    n = 1
    for s in shape:
        n *= s
    if len(data) != n:
        raise ValueError(f"constant: {len(data)} numbers for shape {list(shape)}")
    t = torch.tensor(data, dtype=dtype).reshape(shape)
    return t.expand(x.shape[0], *shape)


# op -> (allowed attrs, n inputs (min, max), fn(list of inputs, attrs, dtype))
MULTI = {
    "matmul": (set(), (2, 2), lambda xs, a, dt: torch.matmul(*_align(*xs))),
    "masked_fill": ({"value"}, (2, 2), lambda xs, a, dt: xs[0].masked_fill(
        _nz(_align(xs[1], xs[0])[0]), a["value"])),
    "logical_and": (set(), (2, 2), lambda xs, a, dt: (lambda p, q: (_nz(p) & _nz(q)).to(dt))(
        *_align(*xs))),
    "logical_or": (set(), (2, 2), lambda xs, a, dt: (lambda p, q: (_nz(p) | _nz(q)).to(dt))(
        *_align(*xs))),
    "index": ({"dim"}, (2, 2), lambda xs, a, dt: _index(xs[0], xs[1], a)),
    "gather": ({"dim"}, (2, 2), lambda xs, a, dt: _gather(xs[0], xs[1], a)),
    "scaled_dot_product_attention": ({"is_causal", "scale", "mask"}, (3, 4),
                                     lambda xs, a, dt: _sdpa(xs, a)),
    "constant": ({"shape", "data"}, (1, 1), lambda xs, a, dt: _constant(xs[0], a, dt)),
    "where": ({"a", "b"}, (1, 3), None),
}
UNARY.update({
    "Embedding": ({"num_embeddings", "embedding_dim", "padding_idx"}, {"weight"}, _embedding),
    "LayerNorm": ({"normalized_shape", "eps", "elementwise_affine", "bias"}, {"weight", "bias"},
                  lambda x, P, a: F.layer_norm(x, tuple(a["normalized_shape"]), P.get("weight"),
                                               P.get("bias"), a.get("eps", 1e-5))),
    "RMSNorm": ({"normalized_shape", "eps", "elementwise_affine"}, {"weight"},
                lambda x, P, a: F.rms_norm(x, tuple(a["normalized_shape"]), P.get("weight"),
                                           a.get("eps"))),
    "softmax": ({"dim"}, set(), lambda x, P, a: torch.softmax(x, a["dim"])),
    "log_softmax": ({"dim"}, set(), lambda x, P, a: torch.log_softmax(x, a["dim"])),
    "logical_not": (set(), set(), lambda x, P, a: (x == 0).to(x.dtype)),
    "to": ({"dtype"}, set(), _to),
    "pow": ({"exponent"}, set(), lambda x, P, a: torch.pow(x, a["exponent"])),
    "sqrt": (set(), set(), lambda x, P, a: torch.sqrt(x)),
    "rsqrt": (set(), set(), lambda x, P, a: torch.rsqrt(x)),
    "exp": (set(), set(), lambda x, P, a: torch.exp(x)),
    "log": (set(), set(), lambda x, P, a: torch.log(x)),
    "abs": (set(), set(), lambda x, P, a: torch.abs(x)),
    "cumsum": ({"dim"}, set(), lambda x, P, a: torch.cumsum(x, a["dim"])),
    "argmax": ({"dim", "keepdim"}, set(), _argmax),
    "expand": ({"shape"}, set(), _expand),
    "repeat": ({"repeats"}, set(), _repeat),
})
UNARY["Linear"] = ({"in_features", "out_features", "bias", "weight_layout"}, {"weight", "bias"},
                   _linear)
REQUIRED = {"reshape": {"shape"}, "permute": {"dims"}, "mean": {"dim"}, "sum": {"dim"},
            "slice": {"dim"}, "select": {"dim", "index"}, "softmax": {"dim"},
            "log_softmax": {"dim"}, "to": {"dtype"}, "pow": {"exponent"}, "cumsum": {"dim"},
            "argmax": {"dim"}, "expand": {"shape"}, "repeat": {"repeats"}, "index": {"dim"},
            "gather": {"dim"}, "masked_fill": {"value"}, "constant": {"shape", "data"},
            "cat": {"dim"}, "Embedding": {"num_embeddings", "embedding_dim"},
            "LayerNorm": {"normalized_shape"}, "RMSNorm": {"normalized_shape"},
            "Linear": {"in_features", "out_features"}}


def _param_shape(op, role, a):
    if op == "Linear":
        if role == "weight" and a.get("weight_layout", "out_in") == "in_out":
            return (a["in_features"], a["out_features"])
        return (a["out_features"], a["in_features"]) if role == "weight" else (a["out_features"],)
    if op == "Conv2d":
        if role == "weight":
            return (a["out_channels"], a["in_channels"] // a.get("groups", 1),
                    *_pair(a["kernel_size"]))
        return (a["out_channels"],)
    if op.startswith("BatchNorm"):
        return (a["num_features"],)
    if op == "Embedding":
        return (a["num_embeddings"], a["embedding_dim"])
    if op in ("LayerNorm", "RMSNorm"):
        return tuple(a["normalized_shape"])
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
            if op in BINARY:
                if len(nd["inputs"]) not in (1, 2):
                    raise ValueError(f"{where}: op {op} takes one or two inputs")
                allowed, roles = ({"scalar", "reverse"} if len(nd["inputs"]) == 1 else set()), set()
                if len(nd["inputs"]) == 1 and "scalar" not in attrs:
                    raise ValueError(f"{where}: op {op} with one input needs attrs.scalar")
            elif op == "cat":
                allowed, roles = {"dim"}, set()
                if not nd["inputs"]:
                    raise ValueError(f"{where}: cat of no inputs")
            elif op in MULTI:
                allowed, roles = MULTI[op][0], set()
                lo, hi = MULTI[op][1]
                if not lo <= len(nd["inputs"]) <= hi:
                    raise ValueError(f"{where}: op {op} takes {lo}..{hi} inputs, "
                                     f"got {len(nd['inputs'])}")
                if op == "where" and len(nd["inputs"]) + len(set(attrs) & {"a", "b"}) != 3:
                    raise ValueError(f"{where}: where needs cond and two operands (inputs or "
                                     "attrs a / b)")
            elif op in UNARY:
                allowed, roles = UNARY[op][0], UNARY[op][1]
                if len(nd["inputs"]) != 1:
                    raise ValueError(f"{where}: op {op} takes one input")
            else:
                raise ValueError(f"{where}: unknown op {op!r}")
            if set(attrs) - allowed:
                raise ValueError(f"{where}: unknown attrs {sorted(set(attrs) - allowed)}")
            if REQUIRED.get(op, set()) - set(attrs):
                raise ValueError(f"{where}: missing attrs {sorted(REQUIRED[op] - set(attrs))}")
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

    def compute_dtype(self, T, x=None):
        dts = {t.dtype for t in T.values() if t.is_floating_point()}
        if len(dts) == 1:
            return dts.pop()
        if len(dts) > 1:
            return torch.float64 if torch.float64 in dts else max(dts, key=lambda d: d.itemsize)
        for v in (x.values() if isinstance(x, dict) else [x]):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.dtype
        return torch.get_default_dtype()

    def read_inputs(self, x, dtype):
        ins = self.spec["inputs"]
        if isinstance(x, dict):
            src = dict(x)
            if len(ins) == 1 and ins[0]["name"] not in src and set(src) == {"x"}:
                src = {ins[0]["name"]: src["x"]}
        else:
            if len(ins) != 1:
                raise ValueError(f"the graph has {len(ins)} inputs: pass a dict by name")
            src = {ins[0]["name"]: x}
        env = {}
        for i in ins:
            name = i["name"]
            if name not in src:
                raise ValueError(f"input {name!r} missing")
            v = torch.as_tensor(src[name])
            if tuple(v.shape[1:]) != tuple(i["shape"]):
                raise ValueError(f"input {name!r}: shape {tuple(v.shape)} vs {i['shape']}")
            kind = i.get("dtype", "float")
            if kind == "int":
                if v.is_floating_point() or v.is_complex():
                    raise ValueError(f"input {name!r}: dtype int needs an integer or bool array")
                v = v.to(torch.int64)
                lim = 2 ** (53 if dtype == torch.float64 else 24)
                if v.numel() and int(v.abs().max()) >= lim:
                    raise ValueError(f"input {name!r}: integer {int(v.abs().max())} is not exact "
                                     f"in {dtype}")
                v = v.to(dtype)
            elif kind == "float":
                if not v.is_floating_point():
                    raise ValueError(f"input {name!r}: dtype float needs a float array")
            else:
                raise ValueError(f"input {name!r}: unknown dtype {kind!r}")
            env[name] = v
        return env

    def forward_with(self, override: dict, x, return_env=False):
        T = {**self.tensors, **override}
        dtype = self.compute_dtype(T, x)
        env = self.read_inputs(x, dtype)
        for nd in self.spec["nodes"]:
            op, a = nd["op"], nd.get("attrs", {})
            xs = [env[i] for i in nd["inputs"]]
            P = {r: T[t] for r, t in nd.get("params", {}).items()}
            if op in BINARY:
                f = BINARY[op]
                if len(xs) == 2:
                    y = f(*_align(xs[0], xs[1]))
                elif a.get("reverse", False):
                    y = f(torch.as_tensor(a["scalar"], dtype=xs[0].dtype), xs[0])
                else:
                    y = f(xs[0], a["scalar"])
                if op in CMP:
                    y = y.to(dtype)
            elif op == "cat":
                y = torch.cat(xs, a["dim"])
            elif op == "where":
                cond, rest = xs[0], list(xs[1:])
                ops = []
                for role in ("a", "b"):
                    if role in a:
                        ops.append(torch.as_tensor(a[role], dtype=dtype).expand(cond.shape[0]))
                    else:
                        ops.append(rest.pop(0))
                cond, p, q = _align(cond, *ops)
                y = torch.where(_nz(cond), p, q)
            elif op in MULTI:
                y = MULTI[op][2](xs, a, dtype)
            else:
                y = UNARY[op][2](xs[0], P, a)
            env[nd["name"]] = y
        return env if return_env else env[self.spec["output"]]
