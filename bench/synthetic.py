"""Synthetic dense workloads for the standard-library benchmark scripts
(mpi_scaling.py, yardstick.py): a safetensors writer and a tanh MLP with
random weights, inputs and labels. No numpy, no torch."""

import json
import os
import random
import struct


def write_safetensors(path, arrays):
    """arrays: name -> (dtype 'F32'/'I64', shape, flat list)"""
    fmt = {"F32": "f", "I64": "q"}
    header, blobs, at = {}, [], 0
    for name, (dtype, shape, values) in arrays.items():
        blob = struct.pack("<%d%s" % (len(values), fmt[dtype]), *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(blob)]}
        blobs.append(blob)
        at += len(blob)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def mlp(out, d_in, width, depth, c, n, seed=0):
    rng = random.Random(seed)
    sizes = [d_in] + [width] * depth + [c]
    layers, weights = [], {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append({"type": "Linear", "in_features": a, "out_features": b})
        idx = len(layers) - 1
        if i < len(sizes) - 2:
            layers.append({"type": "Tanh"})
        bound = 1 / a ** 0.5
        weights[f"{idx}.weight"] = ("F32", [b, a], [rng.uniform(-bound, bound) for _ in range(a * b)])
        weights[f"{idx}.bias"] = ("F32", [b], [rng.uniform(-bound, bound) for _ in range(b)])
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"input_shape": [d_in], "layers": layers}, f)
    write_safetensors(os.path.join(out, "weights.safetensors"), weights)
    x = [rng.gauss(0, 1) for _ in range(n * d_in)]
    # One output: regression (y float (N, 1)); more: classification.
    y = ("F32", [n, 1], [rng.gauss(0, 1) for _ in range(n)]) if c == 1 else ("I64", [n], [rng.randrange(c) for _ in range(n)])
    write_safetensors(os.path.join(out, "data.safetensors"), {"x": ("F32", [n, d_in], x), "y": y})
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))
