"""The numpy API against the committed laplace-torch fixtures (float64).

Needs only numpy and pytest (no torch): `pip install ./python numpy pytest`,
then `pytest python/tests`.
"""

import json
import os
import struct

import numpy as np
import pytest

import laplace_rs

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "laplace", "tests", "fixtures")
TOL = 1e-8


def read_safetensors(path):
    """A safetensors file as a dict of numpy arrays (the format: u64 header length, JSON header, raw data)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    dtypes = {"F64": np.float64, "F32": np.float32, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtypes[v["dtype"]]).reshape(v["shape"])
    return out


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.linalg.norm(b)
    return np.linalg.norm(a - b) / (d if d > 0 else 1.0)


class Fixture:
    def __init__(self, name):
        self.dir = os.path.join(FIXTURES, name)
        self.model = laplace_rs.Model.load(os.path.join(self.dir, "model.json"), os.path.join(self.dir, "weights.safetensors"), "float64")
        data = dict(np.load(os.path.join(self.dir, "data.npz")))
        self.y = data.pop("y")
        self.x = data["x"] if list(data) == ["x"] else data
        self.exp = read_safetensors(os.path.join(self.dir, "expected.safetensors"))
        self.meta = json.load(open(os.path.join(self.dir, "meta.json")))
        sub = os.path.join(self.dir, "subnetwork.npy")
        self.subnetwork = np.load(sub) if os.path.exists(sub) else None


CASES = ["cls_cnn", "reg_multi", "graph/resnet_bn", "transformer/hf_bert", "transformer/hf_gpt2"]


@pytest.mark.parametrize("case", CASES)
def test_every_quantity_matches_laplace_torch(case):
    fx = Fixture(case)
    lik = fx.meta["likelihood"]
    subsets = [("", None), ("last_layer.", "last_layer")]
    if fx.subnetwork is not None:
        subsets.append(("subnetwork.", fx.subnetwork))
    glob = fx.meta.get("params_glob", {}).get("glob")
    if glob:
        subsets.append(("params_glob.", [glob]))
    for prefix, subset in subsets:
        j, f = laplace_rs.jacobians(fx.model, fx.x, subset=subset, batch_size=2)
        jkey = "last_layer_jacobians.J" if prefix == "last_layer." else prefix + "jacobians.J"
        assert rel(j, fx.exp[jkey]) < TOL, (case, jkey)
        assert rel(f, fx.exp["jacobians.f"]) < TOL
        if prefix != "last_layer.":
            g, loss = laplace_rs.gradients(fx.model, fx.x, fx.y, lik, subset=subset)
            assert rel(g, fx.exp[prefix + "gradients.G"]) < TOL, (case, prefix + "gradients.G")
            assert abs(loss - fx.exp["gradients.loss"][0]) <= TOL * abs(loss)
        for kind in ["ggn", "ef"]:
            for structure in ["full", "diag"]:
                key = f"{prefix}{kind}.{structure}"
                if key not in fx.exp:
                    continue
                loss, h = laplace_rs.curvature(fx.model, fx.x, fx.y, lik, curvature=kind, structure=structure, subset=subset, batch_size=3)
                assert rel(h, fx.exp[key]) < TOL, (case, key)
                assert abs(loss - fx.exp["loss"][0]) <= TOL * abs(loss)
        if prefix + "hessian.full" in fx.exp:
            _, h = laplace_rs.curvature(fx.model, fx.x, fx.y, lik, curvature="hessian", structure="full", subset=subset)
            assert rel(h, fx.exp[prefix + "hessian.full"]) < TOL, (case, prefix + "hessian.full")


def test_kron_blocks_match_the_reference_factors():
    name = "transformer/hf_gpt2"
    fx = Fixture(name)
    refs = read_safetensors(os.path.join(fx.dir, "kron.safetensors"))
    blocks_meta = json.load(open(os.path.join(fx.dir, "kron_meta.json")))["blocks"]
    for approx in ["expand", "reduce"]:
        _, blocks = laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", structure="kron", kfac_approx=approx)
        assert len(blocks) == len(blocks_meta)
        for b, (fs, meta) in enumerate(zip(blocks, blocks_meta)):
            dense = [np.diag(f) if f.ndim == 1 else f for f in fs]
            prod = dense[0] if len(dense) == 1 else np.kron(dense[0], dense[1])
            key = f"ggn.embed.{b}.product" if meta["layer"] == "Embedding" else f"ggn.{approx}.{b}.product"
            want = refs[key]
            if want.ndim == 1:
                prod = np.diag(prod)
            if np.abs(want).max() < 1e-20:
                assert np.abs(prod).max() < 1e-14
            else:
                assert rel(prod, want) < TOL, (approx, b, meta["param"])


def test_parameters_can_be_replaced_without_reloading():
    fx = Fixture("cls_cnn")
    theta = fx.model.parameter_vector()
    assert theta.shape == (fx.model.n_params,)
    _, d0 = laplace_rs.curvature(fx.model, fx.x, fx.y, "classification")
    fx.model.set_parameter_vector(theta * 1.5)
    _, d1 = laplace_rs.curvature(fx.model, fx.x, fx.y, "classification")
    assert rel(d0, d1) > 1e-3
    fx.model.set_parameter_vector(theta)
    _, d2 = laplace_rs.curvature(fx.model, fx.x, fx.y, "classification")
    assert rel(d0, d2) < 1e-15
    assert fx.model.parameter_names[0] == "0.weight"


def test_last_layer_indices_are_the_columns_of_the_last_layer():
    fx = Fixture("cls_cnn")
    names = fx.model.parameter_names
    assert names[-2:] == ["7.weight", "7.bias"]  # the final Linear (fixture cls_cnn)
    idx = fx.model.last_layer_indices()
    np.testing.assert_array_equal(idx, fx.model.param_indices(names[-2:]))
    j_ll, _ = laplace_rs.jacobians(fx.model, fx.x, subset="last_layer")
    j_ix, _ = laplace_rs.jacobians(fx.model, fx.x, subset=idx)
    assert rel(j_ll, j_ix) == 0.0


def test_bad_input_raises_laplace_rs_error():
    fx = Fixture("transformer/hf_bert")
    with pytest.raises(laplace_rs.Error, match="attention_mask"):
        laplace_rs.jacobians(fx.model, {"input_ids": fx.x["input_ids"]})
    with pytest.raises(laplace_rs.Error, match="no parameter"):
        laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", subset=["head.*"])
    with pytest.raises(ValueError, match="structure"):
        laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", structure="block")
    with pytest.raises(laplace_rs.Error, match="out of range"):
        laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", subset=np.array([10**6]))
    with pytest.raises(laplace_rs.Error, match="nope.json"):
        laplace_rs.Model.load("nope.json", "nope.safetensors")


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_posteriors_match_laplace_torch(structure, subset, tmp_path):
    fx = Fixture("cls_mlp")
    exp = read_safetensors(os.path.join(fx.dir, "posterior.safetensors"))
    test_x = np.load(os.path.join(fx.dir, "posterior_test.npz"))["x"]
    pre = f"{structure}.{subset}."
    post = laplace_rs.fit(fx.model, fx.x, fx.y, "classification", structure=structure, subset=subset, prior_precision=0.7, batch_size=3)
    assert abs(post.log_marginal_likelihood() - exp[pre + "log_marglik"][0]) <= TOL * abs(exp[pre + "log_marglik"][0])
    probs = post.predict(test_x, link="probit")
    assert rel(probs, exp[pre + "glm.probit.probs"]) < TOL
    post.save(str(tmp_path / "post.safetensors"))
    again = laplace_rs.Posterior.load(str(tmp_path / "post.safetensors"))
    assert rel(again.predict(test_x), probs) < 1e-15
    # The evidence-tuned prior is at least as good as laplace-torch's.
    tuned = laplace_rs.fit(fx.model, fx.x, fx.y, "classification", structure=structure, subset=subset, optimize_prior="marglik")
    assert tuned.log_marginal_likelihood() >= exp[pre + "optimized.log_marglik"][0] - 1e-6


def test_progress_callback_sees_every_batch_and_can_stop_the_pass():
    fx = Fixture("cls_cnn")
    n = len(fx.y)
    calls = []
    laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", structure="diag", batch_size=3,
                         progress=lambda what, done, total: calls.append((what, done, total)))
    batches = -(-n // 3)
    assert [c[1] for c in calls] == list(range(batches + 1))
    assert all(c[2] == batches for c in calls) and calls[0][0] == "curvature diagonal"
    # the same result in one batch, and with the plain bar
    a = laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", structure="diag", batch_size=3)[1]
    b = laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", structure="diag", batch_size=n, progress=True)[1]
    assert rel(a, b) < 1e-12

    class Stop(Exception):
        pass

    def stop_at_2(what, done, total):
        if done == 2:
            raise Stop(what)

    # an exception in the callback (as KeyboardInterrupt from Ctrl-C) stops the pass and propagates
    for f in (lambda: laplace_rs.curvature(fx.model, fx.x, fx.y, "classification", structure="full",
                                           batch_size=2, progress=stop_at_2),
              lambda: laplace_rs.jacobians(fx.model, fx.x, batch_size=2, progress=stop_at_2),
              lambda: laplace_rs.fit(fx.model, fx.x, fx.y, "classification", structure="diag", batch_size=2,
                                     progress=stop_at_2)):
        with pytest.raises(Stop):
            f()


def test_ctrl_c_interrupts_a_computation():
    """SIGINT during a long pass: KeyboardInterrupt after the current batch, not at the end.

    The signal comes from another thread once batch 3 is done, while the pass
    runs in Rust with the GIL released (no timing guesses: from batch 4 on the
    callback waits until the signal has been sent)."""
    import signal
    import threading

    fx = Fixture("cls_cnn")
    x = np.concatenate([fx.x] * 400)
    y = np.concatenate([fx.y] * 400)
    total = len(range(0, len(y), 8))
    done = []
    raiser = threading.Thread(target=lambda: signal.raise_signal(signal.SIGINT))

    def progress(what, d, t):
        done.append(d)
        if d == 3:
            raiser.start()
        elif d > 3:
            raiser.join()

    # Python installs its KeyboardInterrupt handler only where SIGINT was not
    # ignored at start-up, and a shell's background job (`cmd &`) starts with
    # it ignored: install the handler for this test, as an interactive
    # session has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            laplace_rs.curvature(fx.model, x, y, "classification", structure="diag", batch_size=8, progress=progress)
        raiser.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert 3 <= done[-1] < total, (done[-1], total)
