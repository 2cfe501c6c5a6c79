"""benchmarks/compare: the exported workload is fedrnd's own computation (a plain numpy FedAvg
on it reproduces fedrnd's model), the agreement check and ratio table, and each optional peer
where its framework is installed."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.compare import harness as H
from benchmarks.compare import peers as P
from benchmarks.compare.run import main

LR = 0.05


@pytest.fixture(scope="module")
def tiny():
    """6 clients x 32 examples, MLP 784-16-10, batch 8 (4 steps), 3 rounds; fedrnd's run."""
    setup = H.fedrnd_setup(6, 32, 4, 3, 8, seed=1, hidden=(16,))
    w = H.export_workload(*setup, LR, seed=1)
    ref = H.run_fedrnd(*setup, LR, path="general")
    ref.test_acc = H.accuracy(ref.layers, w.x_test, w.y_test)
    return setup, w, ref


def test_export_holds_fedrnd_data_and_initial_weights(tiny):
    (data, model, *_), w, _ = tiny
    assert w.x_train.shape == (6, 32, 784) and w.order.shape == (3, 6, 4, 8)
    idx = np.asarray(data.train_idx)
    np.testing.assert_array_equal(w.x_train[2], np.asarray(data.x)[idx[2]])
    np.testing.assert_array_equal(w.y_train[5], np.asarray(data.y)[idx[5]])
    # every round, each client's 4 batches of 8 are a permutation of its 32 examples
    for r in range(3):
        for c in range(6):
            np.testing.assert_array_equal(np.sort(w.order[r, c].ravel()), np.arange(32))
    assert not np.array_equal(w.order[0], w.order[1])  # a fresh order every round
    params = model.init(jax.random.key(1))
    np.testing.assert_array_equal(w.init[0][0], np.asarray(params["Dense_0"]["kernel"]))
    assert w.dims == (784, 16, 10)


def test_numpy_backprop_equals_jax_gradient():
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=7).astype(np.float32)),
              (rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))]
    x = rng.normal(size=(4, 5)).astype(np.float32)
    y = np.array([0, 2, 1, 2])

    def loss(ls):
        h = jnp.maximum(x @ ls[0][0] + ls[0][1], 0) @ ls[1][0] + ls[1][1]
        return -jnp.mean(jax.nn.log_softmax(h)[jnp.arange(4), y])

    want_loss, want = jax.value_and_grad(loss)([tuple(map(jnp.asarray, lb)) for lb in layers])
    got_loss, got = H.loss_and_grads(layers, x, y)
    assert got_loss == pytest.approx(float(want_loss), rel=1e-5)
    for (gk, gb), (wk, wb) in zip(got, want, strict=True):
        np.testing.assert_allclose(gk, wk, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gb, wb, rtol=1e-4, atol=1e-6)


def test_numpy_fedavg_on_the_export_reproduces_fedrnd(tiny):
    """Same data, start and batch order: only float rounding separates the two models."""
    _, w, ref = tiny
    layers, times, losses = H.numpy_fedavg(w)
    assert len(times) == 3 and losses[-1] < losses[0]
    assert H.relative_difference(layers, ref.layers) < 1e-5
    assert H.accuracy(layers, w.x_test, w.y_test) == ref.test_acc
    # the check can fail: the same run with round 2's batches in another order is far off
    shuffled = H.Workload(w.x_train, w.y_train, w.order[:, :, ::-1].copy(), w.x_test,
                          w.y_test, w.init, w.lr, w.batch)
    assert H.relative_difference(H.numpy_fedavg(shuffled)[0], ref.layers) > 1e-3


def test_lowrank_path_agrees_with_general(tiny):
    setup, _, ref = tiny
    fast = H.run_fedrnd(*setup, LR, path="lowrank")
    assert fast.name == "fedrnd (lowrank)" and ref.name == "fedrnd (general)"
    assert H.relative_difference(fast.layers, ref.layers) < 1e-5


def test_workload_save_load_and_bad_input(tiny, tmp_path):
    _, w, _ = tiny
    path = str(tmp_path / "w.npz")
    w.save(path)
    back = H.Workload.load(path)
    np.testing.assert_array_equal(back.x_train, w.x_train)
    np.testing.assert_array_equal(back.order, w.order)
    assert back.lr == w.lr and back.batch == w.batch and back.rounds == 3
    for (k, b), (k2, b2) in zip(back.init, w.init, strict=True):
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(b, b2)
    with pytest.raises(ValueError, match="positions outside"):
        H.Workload(w.x_train, w.y_train, w.order + 32, w.x_test, w.y_test, w.init, LR, 8)
    with pytest.raises(ValueError, match="x_train has shape"):
        H.Workload(w.x_train[:5], w.y_train, w.order, w.x_test, w.y_test, w.init, LR, 8)
    with pytest.raises(ValueError, match="lr must be"):
        H.Workload(w.x_train, w.y_train, w.order, w.x_test, w.y_test, w.init, 0.0, 8)
    with pytest.raises(ValueError, match="multiple of the batch"):
        H.fedrnd_setup(4, 30, 4, 3, 8)
    with pytest.raises(ValueError, match="rounds must be >= 2"):
        H.fedrnd_setup(4, 32, 4, 1, 8)


def _result(name, ups, layers=None, acc=0.5):
    return H.Result(name=name, version="v", clients=100, round_s=[9.0, 100 / ups, 100 / ups],
                    layers=layers, test_acc=acc)


def test_agreement_flags_models_and_accuracies_that_differ():
    rng = np.random.default_rng(0)
    base = [(rng.normal(size=(4, 3)), rng.normal(size=3))]
    near = [(base[0][0] * (1 + 1e-5), base[0][1])]
    far = [(base[0][0] + 0.1, base[0][1])]
    ref = _result("fedrnd (general)", 1000, base, 0.80)
    runs = [ref, _result("a", 100, near, 0.801), _result("b", 100, far, 0.80),
            _result("c", 100, near, 0.78), H.skipped("d", "not installed")]
    got = {a.name: a for a in H.agreement(runs, ref, acc_tol=0.005, param_tol=1e-3)}
    assert set(got) == {"fedrnd (general)", "a", "b", "c"}  # the skipped run is left out
    assert got["fedrnd (general)"].agrees and got["a"].agrees
    assert not got["b"].agrees and got["b"].param_diff > 1e-2
    assert not got["c"].agrees and got["c"].acc_diff == pytest.approx(0.02)
    assert got["a"].param_diff == pytest.approx(
        np.linalg.norm(base[0][0] * 1e-5) / np.linalg.norm(np.concatenate(
            [base[0][0].ravel(), base[0][1]])), rel=1e-6)
    with pytest.raises(ValueError, match="no final model"):
        H.agreement(runs, H.skipped("x", "gone"))
    with pytest.raises(ValueError, match="layer shapes differ"):
        H.relative_difference([(np.zeros((2, 2)), np.zeros(2))], [(np.zeros((3, 2)),
                                                                   np.zeros(2))])


def test_throughput_uses_rounds_after_the_first_and_ratios_divide_them():
    r = H.Result("x", clients=1000, round_s=[30.0, 2.0, 4.0, 2.5])
    assert r.median_round_s == 2.5 and r.updates_per_s == 400
    runs = [_result("fedrnd (general)", 2800), _result("fedrnd (lowrank)", 1400),
            _result("pytorch loop", 400), _result("flower", 50), H.skipped("pfl-research", "no")]
    rat = H.ratios(runs)
    assert set(rat) == {(a, b) for a in ("fedrnd (general)", "fedrnd (lowrank)")
                        for b in ("pytorch loop", "flower")}
    assert rat[("fedrnd (general)", "pytorch loop")] == pytest.approx(7.0)
    assert rat[("fedrnd (lowrank)", "flower")] == pytest.approx(28.0)
    table = H.ratio_table(runs)
    assert "| fedrnd (general) | 7.0x | 56.0x |" in table
    assert "pfl-research" not in table
    assert "no ratios" in H.ratio_table(runs[2:])
    rows = H.results_table(runs, [])
    assert "skipped: no" in rows and "| 2800 |" in rows
    with pytest.raises(ValueError, match="unknown rate"):
        H.ratios(runs, "updates_per_hour")


def test_cpu_seconds_give_updates_per_cpu_second_and_their_ratios():
    a = H.Result("fedrnd (general)", clients=100, round_s=[5.0, 1.0, 1.0],
                 cpu_s=[9.0, 0.25, 0.5])
    b = H.Result("pytorch loop", clients=100, round_s=[1.0, 2.0, 2.0], cpu_s=[1.0, 1.0, 2.0])
    c = H.Result("flower", clients=100, round_s=[1.0, 4.0, 4.0])  # no CPU times measured
    # the first round (warm-up) is left out: median of [0.25, 0.5] and of [1, 2]
    assert a.median_cpu_s == 0.375 and b.median_cpu_s == 1.5
    assert a.updates_per_cpu_s == pytest.approx(100 / 0.375)
    assert math.isnan(c.median_cpu_s) and math.isnan(c.updates_per_cpu_s)
    rat = H.ratios([a, b, c], "updates_per_cpu_s")
    assert rat[("fedrnd (general)", "pytorch loop")] == pytest.approx(4.0)
    assert math.isnan(rat[("fedrnd (general)", "flower")])
    table = H.ratio_table([a, b, c], "updates_per_cpu_s")
    assert "| fedrnd ÷ (per CPU s) |" in table and "| fedrnd (general) | 4.0x | – |" in table
    for r in (a, b, c):
        r.test_acc = 0.5
    rows = H.results_table([a, b, c], [])
    assert "| 0.375 | 267 |" in rows and "| – | – |" in rows


def test_result_file_round_trip(tmp_path):
    r = _result("pytorch loop", 400, [(np.ones((3, 2), np.float32), np.zeros(2, np.float32))])
    r.loadavg = (1.5, 2.0)
    r.cpu_s = [3.0, 0.5, 0.25]
    H.save_result(r, str(tmp_path / "r.npz"))
    back = H.load_result(str(tmp_path / "r.npz"))
    assert back.summary() == r.summary()
    np.testing.assert_array_equal(back.layers[0][0], r.layers[0][0])
    H.save_result(H.skipped("flower", "flwr is not installed"), str(tmp_path / "s.npz"))
    s = H.load_result(str(tmp_path / "s.npz"))
    assert not s.ok and s.skipped == "flwr is not installed" and s.layers is None
    assert math.isnan(s.updates_per_s)


def test_isolated_numpy_peer_matches_in_process_run(tiny, tmp_path):
    _, w, ref = tiny
    path = str(tmp_path / "w.npz")
    w.save(path)
    r = P.run_isolated("numpy", path, log_dir=str(tmp_path))
    assert r.ok, r.skipped
    assert r.name == "numpy loop" and len(r.round_s) == 3 and r.clients == 6
    assert len(r.cpu_s) == 3 and all(c > 0 for c in r.cpu_s)  # measured in the peer process
    assert H.relative_difference(r.layers, H.numpy_fedavg(w)[0]) < 1e-6
    with pytest.raises(ValueError, match="unknown peer"):
        P.run_isolated("tensorflow", path)


def test_missing_framework_is_a_skip_with_a_message(tiny, monkeypatch):
    _, w, _ = tiny
    real = P.importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec",
                        lambda m, *a: None if m in ("torch", "flwr", "pfl") else real(m, *a))
    for run, name in ((P.run_torch, "pytorch loop"), (P.run_pfl, "pfl-research"),
                      (P.run_flower, "flower")):
        r = run(w)
        assert not r.ok and r.name == name and "torch is not installed" in r.skipped
        assert 'pip install -e ".[compare]"' in r.skipped


def test_end_to_end_run_agrees_and_prints_ratios(capsys):
    out = main(["--clients", "8", "--samples", "32", "--test-samples", "4", "--rounds", "2",
                "--hidden", "16", "--peers", "numpy"])
    assert out["all_agree"]
    names = [r["name"] for r in out["results"]]
    assert names == ["fedrnd (general)", "fedrnd (lowrank)", "numpy loop"]
    assert set(out["ratios"]) == {"fedrnd (general) / numpy loop",
                                  "fedrnd (lowrank) / numpy loop"}
    printed = capsys.readouterr().out
    assert "| fedrnd ÷ | numpy loop |" in printed and "load average at start" in printed
    with pytest.raises(SystemExit):
        main(["--peers", "tensorflow"])


# ---- optional frameworks (pip install -e ".[compare]") -------------------------------------
def test_pytorch_loop_reaches_fedrnds_model(tiny):
    pytest.importorskip("torch")
    _, w, ref = tiny
    r = P.run_torch(w)
    assert r.ok, r.skipped
    assert H.relative_difference(r.layers, ref.layers) < 1e-4
    assert len(r.cpu_s) == 3 and all(c > 0 for c in r.cpu_s)
    layers = P.torch_layers(P.torch_mlp(w.init))
    assert H.relative_difference(layers, w.init) == 0.0  # kernels round-trip transposed


def test_pfl_reaches_fedrnds_model(tiny):
    pytest.importorskip("torch")
    pytest.importorskip("pfl")
    _, w, ref = tiny
    r = P.run_pfl(w)
    assert r.ok, r.skipped
    assert len(r.round_s) == 3 and len(r.cpu_s) == 3 and all(c > 0 for c in r.cpu_s)
    assert H.relative_difference(r.layers, ref.layers) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["tiny", "tiny_cnn"])
def test_flower_reaches_fedrnds_model(workload, request, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    _, w, ref = request.getfixturevalue(workload)
    path = str(tmp_path / "w.npz")
    w.save(path)
    r = P.run_isolated("flower", path, log_dir=str(tmp_path), timeout=600)
    assert r.ok, r.skipped
    assert len(r.round_s) == w.rounds and all(c > 0 for c in r.cpu_s)
    assert H.relative_difference(r.layers, ref.layers) < 1e-4


# ---- the CNN workloads ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cnn():
    """4 clients x 32 synthetic 28x28x1 images, fedrnd's cnn conv8-conv16-dense64, batch 8
    (4 steps), 2 rounds; fedrnd's run."""
    setup = H.fedrnd_setup(4, 32, 4, 2, 8, seed=1, model="cnn", data="synthetic")
    w = H.export_workload(*setup, LR, seed=1)
    ref = H.run_fedrnd(*setup, LR, path="general")
    ref.test_acc = H.accuracy(ref.layers, w.x_test, w.y_test)
    return setup, w, ref


def _odd_cnn():
    """fedrnd's cnn on 10x9x2 inputs with three 3x3 convolutions: odd sizes at every pool."""
    from fedrnd.models import make_model

    model = make_model("cnn", (10, 9, 2), 3, channels=[3, 4, 5], dense=6, kernel=3)
    params = model.init(jax.random.key(0))
    layers = H.params_to_layers(params, H.layer_names(model, params))
    x = np.random.default_rng(0).normal(size=(5, 10, 9, 2)).astype(np.float32)
    return model, params, layers, x


def test_cnn_export_carries_the_architecture(tiny_cnn, tmp_path):
    (data, model, *_), w, ref = tiny_cnn
    assert w.model == "cnn" and w.x_train.shape == (4, 32, 28, 28, 1)
    assert w.order.shape == (2, 4, 4, 8) and w.convs == 2 and w.flat_shape == (7, 7, 16)
    assert w.param_shapes == [([5, 5, 1, 8], [8]), ([5, 5, 8, 16], [16]),
                              ([784, 64], [64]), ([64, 10], [10])]
    assert w.architecture == ("CNN 28x28x1: conv5x5x8+pool, conv5x5x16+pool, "
                              "dense 784-64-10")
    assert w.data.startswith("gaussian-means as 28x28x1")
    params = model.init(jax.random.key(1))
    np.testing.assert_array_equal(w.init[1][0], np.asarray(params["Conv_1"]["kernel"]))
    np.testing.assert_array_equal(w.init[2][0], np.asarray(params["Dense_0"]["kernel"]))
    idx = np.asarray(data.train_idx)
    np.testing.assert_array_equal(w.x_train[3], np.asarray(data.x)[idx[3]])
    assert ref.name == "fedrnd (general)" and [k.shape for k, _ in ref.layers] == [
        k.shape for k, _ in w.init]
    path = str(tmp_path / "cnn.npz")
    w.save(path)
    back = H.Workload.load(path)
    assert back.model == "cnn" and back.data == w.data and back.param_shapes == w.param_shapes
    # the low-rank path is a skip for a CNN, with its reason
    low = H.run_fedrnd(*tiny_cnn[0], LR, path="lowrank")
    assert not low.ok and "dense layers" in low.skipped
    with pytest.raises(ValueError, match="CNN workload needs images"):
        H.Workload(w.x_train.reshape(4, 32, -1), w.y_train, w.order, w.x_test, w.y_test,
                   w.init, LR, 8, model="cnn")
    with pytest.raises(ValueError, match="dense kernels"):
        H.Workload(w.x_train, w.y_train, w.order, w.x_test, w.y_test, w.init, LR, 8)
    with pytest.raises(ValueError, match="model must be"):
        H.fedrnd_setup(4, 32, 4, 2, 8, model="vgg")


def test_mlp_workload_file_without_model_entry_loads_as_mlp(tiny, tmp_path):
    _, w, _ = tiny
    path = str(tmp_path / "old.npz")
    w.save(path)
    z = dict(np.load(path))
    del z["model"], z["data"]
    np.savez(path, **z)
    back = H.Workload.load(path)
    assert back.model == "mlp" and back.architecture == "MLP 784-16-10"


def test_numpy_cnn_forward_equals_fedrnds_apply(tiny_cnn):
    (_, model, _, init_key, _), w, _ = tiny_cnn
    params = model.init(init_key)
    assert model.reference_apply is not None  # on a CPU, apply is the banded re-expression
    x = w.x_test[:8]
    got = H.forward(w.init, x)
    for fn in (model.apply, model.reference_apply):
        np.testing.assert_allclose(got, np.asarray(fn(params, jnp.asarray(x))), rtol=1e-5,
                                   atol=1e-5)
    model, params, layers, x = _odd_cnn()
    np.testing.assert_allclose(H.forward(layers, x), np.asarray(model.apply(params, x)),
                               rtol=1e-5, atol=1e-6)


def test_numpy_cnn_backprop_equals_jax_gradient():
    model, params, layers, x = _odd_cnn()
    y = np.array([0, 1, 2, 1, 0])

    def loss(p):
        return -jnp.mean(jax.nn.log_softmax(model.reference_apply(p, x))[jnp.arange(5), y])

    want_loss, want = jax.value_and_grad(loss)(params)
    got_loss, got = H.loss_and_grads(layers, x, y)
    assert got_loss == pytest.approx(float(want_loss), rel=1e-5)
    for name, (gk, gb) in zip(H.layer_names(model, params), got, strict=True):
        np.testing.assert_allclose(gk, want[name]["kernel"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gb, want[name]["bias"], rtol=1e-4, atol=1e-6)


def test_numpy_cnn_fedavg_reproduces_fedrnd(tiny_cnn):
    _, w, ref = tiny_cnn
    layers, times, _ = H.numpy_fedavg(w)
    assert len(times) == 2
    assert H.relative_difference(layers, ref.layers) < 1e-5
    assert H.accuracy(layers, w.x_test, w.y_test) == ref.test_acc
    shuffled = H.Workload(w.x_train, w.y_train, w.order[:, :, ::-1].copy(), w.x_test,
                          w.y_test, w.init, w.lr, w.batch, model="cnn")
    assert H.relative_difference(H.numpy_fedavg(shuffled)[0], ref.layers) > 1e-3


def test_cnn_on_fashion_mnist_when_installed():
    if not os.path.isdir(H.FASHION_DIR):
        pytest.skip(f"Fashion-MNIST is not at {H.FASHION_DIR}")
    ds, part = H.image_dataset(3, 16, 4, seed=0, data="fashion")
    assert ds.name == "fashion_mnist" and ds.x_train.shape[1:] == (28, 28, 1)
    assert [len(t) for t in part.train] == [16, 16, 16]
    assert len(np.unique(np.concatenate(part.train))) == 48  # IID draws, no repeats here
    _, big = H.image_dataset(1000, 64, 16, seed=0, data="fashion")
    rows = np.concatenate(big.train)
    assert np.bincount(rows).max() == 2 and "4000 images serve two clients" in big.name


def test_end_to_end_cnn_run_with_numpy_peer():
    out = main(["--model", "cnn", "--data", "synthetic", "--clients", "3", "--samples", "16",
                "--test-samples", "4", "--rounds", "2", "--peers", "numpy"])
    assert out["all_agree"]
    assert [r["name"] for r in out["results"]] == ["fedrnd (general)", "fedrnd (lowrank)",
                                                   "numpy loop"]
    assert out["results"][1]["skipped"] and out["workload"]["model"] == "cnn"
    assert out["precision"] == "float32" and out["torch_device"] == "cpu"
    assert list(out["workload"]["param_shapes"][0]) == [[5, 5, 1, 8], [8]]
    with pytest.raises(SystemExit):
        main(["--model", "lenet", "--fedrnd", "lowrank"])


def test_lenet_preset_is_fedrnds_cnn_at_lenet_size():
    setup = H.fedrnd_setup(2, 16, 2, 2, 16, model="lenet", data="synthetic")
    w = H.export_workload(*setup, LR)
    assert w.architecture == ("CNN 28x28x1: conv5x5x6+pool, conv5x5x16+pool, "
                              "dense 784-120-10")


# ---- the CNN in PyTorch (optional) ---------------------------------------------------------
def test_torch_cnn_forward_equals_fedrnds(tiny_cnn):
    torch = pytest.importorskip("torch")
    (_, model, _, init_key, _), w, _ = tiny_cnn
    params = model.init(init_key)
    net = P.torch_net(w)
    x = w.x_test[:8]
    with torch.no_grad():
        got = net(torch.from_numpy(np.array(x))).numpy()
    np.testing.assert_allclose(got, np.asarray(model.apply(params, jnp.asarray(x))),
                               rtol=1e-5, atol=1e-5)
    assert H.relative_difference(P.torch_layers(net), w.init) == 0.0  # OIHW, flatten: round trip
    model, params, layers, x = _odd_cnn()  # 'same' padding and ceil pooling at odd sizes
    net = P.torch_cnn(layers, (10, 9, 2))
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.asarray(model.apply(params, x)), rtol=1e-5, atol=1e-6)
    assert H.relative_difference(P.torch_layers(net), layers) == 0.0


def test_torch_and_pfl_reach_fedrnds_cnn_model(tiny_cnn):
    torch = pytest.importorskip("torch")
    _, w, ref = tiny_cnn
    r = P.run_torch(w)
    assert r.ok, r.skipped
    assert H.relative_difference(r.layers, ref.layers) < 1e-4
    assert H.accuracy(r.layers, w.x_test, w.y_test) == ref.test_acc
    if not torch.cuda.is_available():  # --torch-device cuda without a GPU: a skip, named
        r = P.run_torch(w, device="cuda")
        assert not r.ok and r.name == "pytorch loop (cuda)" and "no CUDA" in r.skipped
    if P.missing("pfl") is None:
        r = P.run_pfl(w)
        assert r.ok, r.skipped
        assert H.relative_difference(r.layers, ref.layers) < 1e-4


def test_isolated_torch_cnn_peer_matches(tiny_cnn, tmp_path):
    pytest.importorskip("torch")
    _, w, ref = tiny_cnn
    path = str(tmp_path / "w.npz")
    w.save(path)
    r = P.run_isolated("torch", path, log_dir=str(tmp_path), torch_device="cpu")
    assert r.ok, r.skipped
    assert r.name == "pytorch loop" and "1 thread(s)" in r.note
    assert H.relative_difference(r.layers, ref.layers) < 1e-4



def test_devices_split_the_client_axis_and_agree(tmp_path):
    """--devices 2 (two host devices made before JAX starts, in a fresh process) trains the
    same model as the numpy reference; a count that does not divide the clients is refused."""
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "benchmarks", "compare", "run.py")
    out = tmp_path / "d2.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, script, "--clients", "8", "--samples", "32",
                           "--test-samples", "4", "--rounds", "2", "--model", "cnn", "--data",
                           "synthetic", "--peers", "numpy", "--devices", "2", "--json",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["all_agree"] and rec["fedrnd_devices"] == 2
    fed = next(r for r in rec["results"] if r["name"] == "fedrnd (general)")
    assert "client axis over 2 cpu devices" in fed["note"]
    # In this process JAX already runs with one CPU device: asking for two is an error.
    with pytest.raises(SystemExit):
        main(["--clients", "8", "--devices", "3"])  # does not divide 8
    if len(jax.devices()) < 2:
        with pytest.raises(SystemExit):
            main(["--clients", "8", "--samples", "32", "--devices", "2", "--peers", "numpy"])
