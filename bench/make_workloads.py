"""Generate the benchmark workloads of bench/README.md into bench/workloads/.

Each workload is a PyTorch ``nn.Sequential`` with random weights (fixed
seed), random inputs and uniform labels, exported with
``tools/laplace_export.py`` (model.json + weights.safetensors, float32) plus
``data.npz``. Run with the reference virtual environment:

    python bench/make_workloads.py [--out bench/workloads]            # the four of bench/README.md
    python bench/make_workloads.py --sweep [--out bench/workloads]    # the shape sweep (sweep_models.py)
"""

import argparse
import os
import sys
import zlib

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from laplace_export import export, export_sequential  # noqa: E402


def workloads():
    """name -> (model, input_shape, n, likelihood, n_outputs)"""
    torch.manual_seed(0)
    return {
        "mlp_mnist": (nn.Sequential(nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(),
                                    nn.Linear(100, 10)), (784,), 1000, "classification", 10),
        "cnn_mnist": (nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5),
                                    nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10)),
                      (1, 28, 28), 256, "classification", 10),
        "mlp_small": (nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 5)), (20,), 500,
                      "classification", 5),
        "reg_uci": (nn.Sequential(nn.Linear(13, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(),
                                  nn.Linear(50, 1)), (13,), 500, "regression", 1),
    }


def sweep_workloads():
    """name -> (model, input_shape, n, likelihood, n_outputs) of the shape sweep (sweep_models.py)."""
    import sweep_models
    out = {}
    for name in sweep_models.CASES:
        model, shape, n, c = sweep_models.build(name)
        out[name] = (model, shape, n, "regression" if c == 1 else "classification", c)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads"))
    ap.add_argument("--sweep", action="store_true",
                    help="write the shape sweep of sweep_models.py instead of the four standard workloads")
    args = ap.parse_args()
    for name, (model, shape, n, lik, c) in (sweep_workloads() if args.sweep else workloads()).items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        model = model.float().eval()
        x = torch.randn((n, *shape), generator=g)
        if lik == "classification":
            y = torch.randint(0, c, (n,), generator=g).numpy().astype(np.int64)
        else:
            y = torch.randn((n, c), generator=g).numpy().astype(np.float32)
        out = os.path.join(args.out, name)
        if isinstance(model, nn.Sequential):
            export_sequential(model, shape, out)
        else:
            export(model, x[:2], out)  # a graph model (docs/model-format.md)
        if args.sweep:
            # torch_child.py rebuilds the module from its name (graph models have no layer list).
            with open(os.path.join(out, "sweep_case"), "w") as fh:
                fh.write(name + "\n")
        np.savez(os.path.join(out, "data.npz"), x=x.numpy().astype(np.float32), y=y)
        with open(os.path.join(out, "likelihood"), "w") as fh:
            fh.write(lik + "\n")
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {n} points -> {out}")


if __name__ == "__main__":
    main()
