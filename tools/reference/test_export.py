#!/usr/bin/env python
"""Self-test of tools/laplace_export.py ``export`` (graph form) and graph_interp.py.

    venv/bin/python tools/reference/test_export.py

Round trips (module output == interpreter output, float64, rel <= 1e-12) for torchvision
resnet18 / mobilenet_v3_small (weights=None, random BN statistics, eval mode, 3x32x32),
the graph fixture models of make_graph_fixtures.py and small models exercising the
functional ops; then the refusals (unsupported op / module named with its module path,
training-mode BN / Dropout, a module called twice, training dropout) and the
interpreter's strictness.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import graph_interp  # noqa: E402
import make_graph_fixtures as mg  # noqa: E402
from laplace_export import ExportError, export  # noqa: E402

torch.set_default_dtype(torch.float64)
FAILS = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        FAILS.append(msg)


def roundtrip(name, model, x, output_key=None):
    with tempfile.TemporaryDirectory() as d:
        spec = export(model, x, d, output_key=output_key)
        g = graph_interp.GraphModel.load(d)
        with torch.no_grad():
            ref = model(x)
            if output_key is not None:
                ref = ref[output_key]
            out = g(x)
        e = float((out - ref).norm() / ref.norm())
        size = os.path.getsize(os.path.join(d, "weights.safetensors"))
    ops = sorted({n["op"] for n in spec["nodes"]})
    check(e <= 1e-12, f"{name}: interpreter vs module rel {e:.1e} ({len(spec['nodes'])} nodes, "
                      f"P={sum(p.numel() for p in model.parameters())}, weights {size} B, ops {ops})")
    check(spec["parameters"] == [n for n, p in model.named_parameters() if p.requires_grad],
          f"{name}: parameters list = named_parameters order")
    return spec


def raises(name, fn, *needles, exc=Exception):
    try:
        fn()
    except exc as e:  # noqa: BLE001
        msg = str(e)
        check(all(n in msg for n in needles), f"{name}: raised {type(e).__name__}: {msg[:160]}")
        return
    check(False, f"{name}: did not raise")


# ------------------------------------------------------------------ models
class Ops(nn.Module):
    """Functional ops: size()-based view, getitem slice/select, scalar reverse ops,
    transpose, sum, unsqueeze/squeeze, torch.add, dict input, dict output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, batch):
        x, z = batch["image"], batch["extra"]
        h = F.relu6(self.conv(x))                       # (M, 4, 5, 5)
        h = h[:, 1:4, ::2, -1]                          # (M, 3, 3)  slice, slice, select
        h = 1.0 - h.transpose(1, 2) / 2                 # reverse sub, div
        h = h.contiguous().view(h.size(0), -1)          # (M, 9)
        h = torch.add(h[..., :6], z).unsqueeze(1).squeeze(1)
        h = self.bn(F.leaky_relu(h, 0.2)) + torch.sigmoid(h).sum(-1, keepdim=True)
        return {"logits": self.fc(F.gelu(-h, approximate="tanh")), "aux": h}


class Interp(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 2, 3), Up())
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class Up(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class FDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.3))


def torchvision_models():
    import torchvision
    out = []
    for name, mk in (("resnet18", torchvision.models.resnet18),
                     ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small)):
        torch.manual_seed(0)
        m = mk(weights=None, num_classes=10)
        mg.randomize_bn_(m, 0.1)
        out.append((name, m.eval()))
    return out


def main():
    torch.manual_seed(0)
    x32 = torch.randn(2, 3, 32, 32)
    for name, m in torchvision_models():
        spec = roundtrip(name, m, x32)
        if name == "mobilenet_v3_small":
            ops = [n["op"] for n in spec["nodes"]]
            groups = [n["attrs"]["groups"] for n in spec["nodes"] if n["op"] == "Conv2d"]
            check(all(o in ops for o in ("Hardswish", "Hardsigmoid", "mul", "AdaptiveAvgPool2d",
                                         "Dropout", "Flatten")) and max(groups) > 1,
                  "mobilenet_v3_small: depthwise conv, Hardswish, Hardsigmoid, SE mul, pooling, "
                  "Dropout, flatten present")
    for name in mg.CASES:
        c = mg.build_case(name)
        roundtrip(f"fixture {name}", c["model"], c["x"])
    roundtrip("GroupedConvNoBN", mg.GroupedConvNoBN().eval(), torch.randn(3, 4, 6, 6))
    ops_model = Ops().eval()
    mg.randomize_bn_(ops_model)
    batch = {"image": torch.randn(3, 3, 5, 5), "extra": torch.randn(3, 6)}
    spec = roundtrip("functional ops, dict input, output_key", ops_model, batch, "logits")
    check([i["name"] for i in spec["inputs"]] == ["image", "extra"], "dict input names")

    # ---------------------------------------------------------- refusals
    d = tempfile.mkdtemp()
    raises("unsupported function", lambda: export(Interp().eval(), torch.randn(2, 3, 6, 6), d),
           "torch.nn.functional.interpolate", "body.1", exc=ExportError)
    raises("unsupported module", lambda: export(WithLSTM().eval(), torch.randn(2, 5, 4), d),
           "nn.LSTM", "rnn", exc=ExportError)
    c = mg.build_case("resnet_bn")
    raises("training-mode BatchNorm", lambda: export(c["model"].train(), c["x"], d),
           "training mode", "model.eval()", exc=ValueError)
    raises("training-mode Dropout", lambda: export(
        nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 2)), torch.randn(2, 3), d),
        "training mode", "model.eval()", exc=ValueError)
    raises("module called twice", lambda: export(Twice().eval(), torch.randn(2, 4), d),
           "called twice", "fc", exc=ExportError)
    raises("F.dropout(training=True)", lambda: export(FDropout().eval(), torch.randn(2, 4), d),
           "torch.nn.functional.dropout", "training=True", exc=ExportError)
    raises("dict output without output_key", lambda: export(ops_model, batch, d),
           "output_key", exc=ExportError)

    # ---------------------------------------------------------- interpreter strictness
    c = mg.build_case("graph_nobias")
    spec = export(c["model"], c["x"], d)
    tensors = graph_interp.GraphModel.load(d).tensors
    bad = json.loads(json.dumps(spec))
    bad["nodes"][1]["op"] = "Foo"
    raises("interp: unknown op", lambda: graph_interp.GraphModel(bad, tensors), "unknown op")
    bad = json.loads(json.dumps(spec))
    bad["nodes"][0]["attrs"]["foo"] = 1
    raises("interp: unknown attr", lambda: graph_interp.GraphModel(bad, tensors), "foo")
    raises("interp: unused tensor", lambda: graph_interp.GraphModel(
        spec, {**tensors, "extra": torch.zeros(1)}), "unused")
    bad = json.loads(json.dumps(spec))
    bad["nodes"][0]["inputs"] = ["relu"]
    raises("interp: read before written", lambda: graph_interp.GraphModel(bad, tensors),
           "before it is written")

    print(f"{len(FAILS)} failures")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
