"""Every registered method against the contract of :class:`fedrnd.algorithms.base.Algorithm`.

Each property is one test function parametrized over ``sorted(ALGORITHMS)``, so a newly
registered method is checked here without a line of its own. The federation is tiny: 8 ragged
clients in two groups whose inputs are shifted apart and whose labels are permuted (so the
clustered methods find something), a one-hidden-layer MLP, half of the clients on SGD and half
on momentum. Properties:

- ``init_template`` is ``init``'s structure and dtypes without its work (what a resumed run
  restores into); shapes agree except the slot axis of ``state["slots"]``, which ``init`` grows
  to the clusters it found (the checkpoint's shapes win on restore);
- ``round`` compiles once: the state it returns has the shapes and dtypes of the one it got;
- runs are deterministic in their key, and the round key matters;
- the communication ledger (``up/*``, ``down/*``: bytes per client) is finite, non-negative,
  zero for ``local`` and positive for every other method;
- resuming a run through the driver gives the bits of the uninterrupted run (slow);
- the client axis sharded over 8 host devices gives the single-device result (slow);
- ``models(state)`` gives slots and an assignment the driver can evaluate every client with;
- ``validate`` accepts the tiny federation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd import compilation_cache
from fedrnd.algorithms import ALGORITHMS, Algorithm, make_algorithm
from fedrnd.data import Dataset, FederatedData, Partition, build_federated
from fedrnd.engine import ClientMapper, Engine, LocalSpec, client_hparams, evaluate_clients
from fedrnd.models import make_model

ROOT = Path(__file__).resolve().parents[2]
METHODS = sorted(ALGORITHMS)

C, DIM, CLASSES = 8, 6, 3
HIDDEN = [8]
BATCH = 8
OPTIMIZER = {"sgd": 0.5, "momentum": 0.5}
LR = {"sgd": 0.1, "momentum": 0.05}

# Options that keep a method cheap on the tiny federation: few predictor steps for RND
# discovery, two clusters where a count is required, short distillation, a short NTK horizon
# on a degree-3 graph; periodic_dfl talks every 2nd round (default 5th) so that a 2-round run
# sends something. A method missing here runs with its defaults, so a new method is tested
# as soon as it is registered; add it here only when its defaults are slow or need a choice.
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "rnd": {"predictor_steps": 20, "predictor_min_steps": None},
    "rnd_dfl": {"predictor_steps": 20, "predictor_min_steps": None},
    "ifca": {"num_clusters": 2},
    "fesem": {"num_clusters": 2},
    "disue": {"num_clusters": 2, "distill_steps": 4, "noise_dim": 8, "generator_hidden": [16]},
    "ntk_dfl": {"graph": {"degree": 3}, "taus": [1, 2], "ode_steps": 2},
    "spark": {"graph": {"degree": 3}, "taus": [1, 2], "ode_steps": 2, "proj_dim": 8},
    "periodic_dfl": {"inter_every": 2},
}

# Options that make a method's host hook change the state within a 4-round run (the options
# above leave it idle): CFL splits every cluster of >= 3 clients after every round, RND
# re-discovers after every round. The resume property is checked across these hooks too.
HOOK_OPTIONS: dict[str, dict[str, Any]] = {
    "cfl": {"min_round": 1, "thresholds": "absolute", "eps1": 1e9, "eps2": 0.0,
            "gamma_max": None},
    "rnd": {**FAST_OPTIONS["rnd"], "tau": 1},
}

# (property, method) -> the bug that makes the method fail the property (strict xfail).
# Found by this suite and fixed: a finished run extended with allow_change=['rounds'] skipped
# the host hook of the round it had ended at (the checkpoint now says so: hook_pending), and
# NTK-DFL/SPARK closed over the pool inside a sharded client map.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


# Leaves compared with an absolute tolerance of their own in the sharded property (above
# rtol 1e-5): PACFL's proximity holds principal angles in degrees, arccos of cosines near 1,
# where a float32 rounding of 1e-7 in a cosine moves a 5-degree angle by ~1e-4 degrees (the
# clustering built on it, an integer leaf, still has to agree exactly).
SHARDED_ATOL: dict[tuple[str, str], float] = {("pacfl", "state['clients']['proximity']"): 1e-3}


def methods(prop: str, names=METHODS) -> list:
    """Every registered method (or ``names``), those with a known bug in ``prop`` as strict
    xfails."""
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[prop, n]))
            if (prop, n) in KNOWN_BUGS else n for n in names]


# ------------------------------------------------------------------------------ the federation
def tiny_federation(seed: int = 0) -> FederatedData:
    """8 clients with 12-30 training and 5-10 test rows; clients alternate between two groups
    whose inputs are shifted apart (distance 6) and whose labels are permuted."""
    rng = np.random.default_rng(seed)
    groups = np.arange(C, dtype=np.int32) % 2
    shift = rng.normal(size=(2, DIM))
    shift *= 3.0 / np.linalg.norm(shift, axis=1, keepdims=True)
    shift[1] = -shift[0]
    means = 2.0 * rng.normal(size=(CLASSES, DIM))
    perm = np.stack([np.arange(CLASSES), np.roll(np.arange(CLASSES), 1)])
    n_train, n_test = rng.integers(12, 31, C), rng.integers(5, 11, C)

    def draw(counts):
        g = np.repeat(groups, counts)
        y = rng.integers(0, CLASSES, counts.sum())
        x = means[perm[g, y]] + shift[g] + rng.normal(size=(counts.sum(), DIM))
        return x.astype(np.float32), y.astype(np.int32)

    (x_tr, y_tr), (x_te, y_te) = draw(n_train), draw(n_test)

    def split(counts):
        return np.split(np.arange(counts.sum()), np.cumsum(counts)[:-1])

    ds = Dataset(x_tr, y_tr, x_te, y_te, CLASSES, "conformance")
    return build_federated(ds, Partition(split(n_train), split(n_test), groups))


def build(name: str, mapper: ClientMapper | None = None) -> tuple[Algorithm, Any]:
    """The method with its fast options and the clients' hyperparameters ``hp``."""
    model = make_model("mlp", (DIM,), CLASSES, hidden=HIDDEN)
    opt, hp = client_hparams(C, optimizer=OPTIMIZER, lr=LR, seed=0)
    engine = Engine(model, LocalSpec(batch_size=BATCH), opt, mapper or ClientMapper())
    return make_algorithm(name, engine, **FAST_OPTIONS.get(name, {})), hp


def round_key(seed: int, r: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), r)


class Method:
    """A method on the tiny federation with one jitted round that counts its traces."""

    def __init__(self, name: str, data: FederatedData):
        self.name, self.data = name, data
        self.alg, self.hp = build(name)
        self.traces = 0
        self.step = jax.jit(self._round)
        self._reference = None

    def _round(self, state, data, key):
        self.traces += 1  # runs only while tracing
        return self.alg.round(state, data, key)

    def run(self, init_seed: int = 0, round_seed: int = 1, rounds: int = 2):
        """``init`` then ``rounds`` rounds: ``([state_0, ..., state_rounds], [metrics...])``."""
        state = self.alg.init(jax.random.key(init_seed), self.data, self.hp)
        states, metrics = [state], []
        for r in range(rounds):
            state, m = self.step(state, self.data, round_key(round_seed, r))
            states.append(state)
            metrics.append(m)
        return states, metrics

    @property
    def reference(self):
        """The run every property starts from (seed 0, round seed 1, two rounds)."""
        if self._reference is None:
            self._reference = self.run()
        return self._reference


@pytest.fixture(scope="module")
def data() -> FederatedData:
    return tiny_federation()


@pytest.fixture(scope="module")
def lab(data):
    """``lab(name)``: the :class:`Method`, built once per module (and per xdist worker)."""
    cache: dict[str, Method] = {}

    def get(name: str) -> Method:
        if name not in cache:
            cache[name] = Method(name, data)
        return cache[name]

    return get


def named_leaves(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def host(x) -> np.ndarray:
    """A leaf as numpy (a PRNG key as its raw bits)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_trees_equal(a, b) -> None:
    """Same structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, u), v in zip(named_leaves(a).items(), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(host(u), host(v), err_msg=path)


# ------------------------------------------------------------------------------- (h) validate
@pytest.mark.parametrize("name", methods("validate"))
def test_validate_accepts_the_tiny_federation(name, data):
    alg, _ = build(name)
    assert alg.validate(data) is None


# -------------------------------------------------------------------------- (a) init_template
@pytest.mark.parametrize("name", methods("init_template"))
def test_init_template_has_the_structure_dtypes_and_shapes_of_init(name, lab):
    """What a resumed run restores its checkpoint into. Only the slot axis of
    ``state["slots"]`` may differ: ``init`` sizes it to the clusters it found, the template
    (which finds nothing) to one; a restore takes the checkpoint's shapes."""
    m = lab(name)
    template = m.alg.init_template(jax.random.key(0), m.data, m.hp)
    state = m.reference[0][0]
    assert jax.tree.structure(template) == jax.tree.structure(state)
    for (path, t), s in zip(named_leaves(template).items(), jax.tree.leaves(state), strict=True):
        assert isinstance(t, jax.ShapeDtypeStruct), f"{path}: computed, not abstract ({type(t)})"
        assert t.dtype == s.dtype, path
        if path.startswith("['slots']"):
            assert t.shape[1:] == s.shape[1:] and t.shape[0] >= 1, path
        else:
            assert t.shape == s.shape, path


@pytest.mark.parametrize("name", methods("restore"))
def test_checkpoint_of_a_later_round_restores_into_init_template(name, lab, tmp_path):
    """The driver's resume: the state after two rounds, saved, comes back bit for bit when
    restored into the template (slot counts from the checkpoint)."""
    from fedrnd.driver.checkpoint import Checkpointer

    m = lab(name)
    state = m.reference[0][-1]
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state, {"round": 2})
    restored, meta = ckpt.restore(m.alg.init_template(jax.random.key(0), m.data, m.hp))
    ckpt.close()
    assert meta == {"round": 2}
    assert_trees_equal(state, restored)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype


# ---------------------------------------------------------------------------- (b) one compile
@pytest.mark.parametrize("name", methods("compile_once"))
def test_round_compiles_once_for_the_states_it_returns(name, lab):
    """The driver scans ``round`` over blocks of rounds: the state a round returns must have
    the structure, shapes and dtypes (weak types included) of the state it was given, so the
    second round reuses the first round's program."""
    m = lab(name)
    states, _ = m.reference
    assert m.traces == 1
    avals = [jax.tree.map(jax.typeof, s) for s in states]
    for later in avals[1:]:
        assert jax.tree.structure(later) == jax.tree.structure(avals[0])
        for (path, a), b in zip(named_leaves(avals[0]).items(), jax.tree.leaves(later),
                                strict=True):
            assert a == b, f"{path}: {a} -> {b}"


# ---------------------------------------------------------------------------- (c) determinism
@pytest.mark.parametrize("name", methods("deterministic"))
def test_same_key_gives_the_same_bits(name, lab):
    m = lab(name)
    states, metrics = m.reference
    again_states, again_metrics = m.run()
    assert_trees_equal(states, again_states)
    assert_trees_equal(metrics, again_metrics)
    assert m.traces == 1


@pytest.mark.parametrize("name", methods("key_matters"))
def test_another_round_key_changes_the_state(name, lab):
    """Every method samples something per round (client batches, a graph, a generator's
    noise), so other round keys from the same initial state give other models. (No method
    is exempt today; one whose round is deterministic would be listed here with its reason.)"""
    m = lab(name)
    states, _ = m.reference
    other, _ = m.run(round_seed=2)
    assert_trees_equal(states[0], other[0])
    a, b = (jax.tree.leaves(m.alg.models(s[-1])[0]) for s in (states, other))
    assert any(not np.array_equal(u, v) for u, v in zip(a, b, strict=True))


# --------------------------------------------------------------------------------- (d) ledger
@pytest.mark.parametrize("name", methods("ledger"))
def test_ledger_is_finite_non_negative_bytes_per_client(name, lab):
    """``up/<kind>`` and ``down/<kind>``: bytes per client ``[C]`` this round; ``local``
    communicates nothing, every other method something."""
    _, metrics = lab(name).reference
    total = 0.0
    for m in metrics:
        ledger = {k: v for k, v in m.items() if k.startswith(("up/", "down/"))}
        assert ledger, "no up/* or down/* entries"
        for k, v in ledger.items():
            v = np.asarray(v)
            assert v.shape == (C,), k
            assert np.all(np.isfinite(v)) and np.all(v >= 0), (k, v)
            total += float(np.sum(v))
    if name == "local":
        assert total == 0.0
    else:
        assert total > 0.0


@pytest.mark.parametrize("name", methods("metrics"))
def test_other_metrics_are_finite_scalars(name, lab):
    """What the driver logs per round: every metric besides the ledger is a scalar."""
    _, metrics = lab(name).reference
    for m in metrics:
        for k, v in m.items():
            if not k.startswith(("up/", "down/")):
                assert np.ndim(v) == 0 and np.isfinite(v), (k, v)


# --------------------------------------------------------------------------------- (g) models
@pytest.mark.parametrize("name", methods("models"))
def test_models_give_every_client_a_model(name, lab):
    """``models(state)``: slots ``[K, ...]`` with ``assign [C]`` in ``[0, K)``, or per-client
    models ``[C, ...]`` with ``None``; the driver's evaluation scores every client with them."""
    m = lab(name)
    params = jax.eval_shape(m.alg.engine.model.init, jax.random.key(0))
    for state in m.reference[0]:
        slots, assign = m.alg.models(state)
        assert jax.tree.structure(slots) == jax.tree.structure(params)
        k = {leaf.shape[0] for leaf in jax.tree.leaves(slots)}
        assert len(k) == 1, k
        k = k.pop()
        for leaf, p in zip(jax.tree.leaves(slots), jax.tree.leaves(params), strict=True):
            assert leaf.shape[1:] == p.shape and leaf.dtype == p.dtype
        if assign is None:
            assert k == C and not m.alg.clusters_clients
        else:
            assign = np.asarray(assign)
            assert assign.shape == (C,) and np.issubdtype(assign.dtype, np.integer)
            assert np.all((assign >= 0) & (assign < k)), (assign, k)
    scores = evaluate_clients(m.alg.engine.model.apply, slots,
                              None if assign is None else jnp.asarray(assign), m.data,
                              m.alg.engine.mapper)
    assert scores["test_acc"].shape == (C,) and np.all(np.isfinite(scores["test_loss"]))


# --------------------------------------------------------------------------------- (e) resume
def run_config(name: str, rounds: int, options: dict[str, Any] | None = None):
    from fedrnd.driver import AlgorithmConfig, Config, ModelConfig
    from fedrnd.driver.config import LocalConfig

    options = FAST_OPTIONS.get(name, {}) if options is None else options
    return Config(name="conformance", rounds=rounds, eval_every=2, checkpoint_every=2,
                  progress=False, model=ModelConfig("mlp", {"hidden": HIDDEN}),
                  local=LocalConfig(batch_size=BATCH, optimizer=OPTIMIZER, lr=LR),
                  algorithms=[AlgorithmConfig(name, options)])


def assert_resume_equals_uninterrupted(name, options, data, tmp_path):
    from fedrnd.driver import simulate

    def go(rounds, where, **kw):
        return simulate(run_config(name, rounds, options), run_dir=tmp_path / where, data=data,
                        verbose=False, **kw).methods[name]

    full = go(4, "full")
    go(2, "cut")
    assert (tmp_path / "cut" / name / "checkpoints" / "2").is_dir()
    resumed = go(4, "cut", resume=True, allow_change=["rounds"])
    assert_trees_equal(full.state, resumed.state)
    np.testing.assert_array_equal(full.bytes_up, resumed.bytes_up)
    np.testing.assert_array_equal(full.bytes_down, resumed.bytes_down)
    assert [h.get("train_loss") for h in full.history] == \
        [h.get("train_loss") for h in resumed.history]
    assert full.final["test_acc/mean"] == resumed.final["test_acc/mean"]


@pytest.mark.slow
@pytest.mark.parametrize("name", methods("resume"))
def test_resumed_run_equals_the_uninterrupted_run(name, data, tmp_path):
    """4 rounds straight, against 2 rounds then a resume to 4 (from the round-2 checkpoint):
    the same state to the bit, the same ledger and losses."""
    assert_resume_equals_uninterrupted(name, None, data, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", methods("resume_hook", sorted(HOOK_OPTIONS)))
def test_resumed_run_equals_the_uninterrupted_run_across_host_hooks(name, data, tmp_path):
    """The same with a host hook that changes the state after every round (slots grow)."""
    assert_resume_equals_uninterrupted(name, HOOK_OPTIONS[name], data, tmp_path)


# -------------------------------------------------------------------------------- (f) sharded
def sharded_comparison(name: str, out: str) -> None:
    """In a process with 8 host devices: ``init`` and 2 rounds with every client on one device
    and with the client axis split over 8 (placed as the driver places them); writes both
    runs' state and metrics to ``out/runs.npz`` and the placement to ``out/info.json``."""
    assert jax.device_count() == 8, jax.devices()
    from fedrnd.engine import make_mesh

    data = tiny_federation()
    arrays, info = {}, {}
    for mode, mesh in (("one", None), ("eight", make_mesh(8))):
        mapper = ClientMapper(mesh=mesh)
        alg, hp = build(name, mapper)
        placed = data.replace(**mapper.shard(data.client_arrays()),
                              x=mapper.replicate(data.x), y=mapper.replicate(data.y))

        def place(state, mapper=mapper):
            rest = mapper.replicate({k: v for k, v in state.items() if k != "clients"})
            return {**rest, "clients": mapper.shard(state["clients"])}

        state = place(alg.init(jax.random.key(0), placed, mapper.shard(hp)))
        step = jax.jit(alg.round)
        for r in range(2):
            state, metrics = step(state, placed, round_key(1, r))
        info[mode] = sorted({len(x.sharding.device_set)
                             for x in jax.tree.leaves(state["clients"])})
        for part, tree in (("state", state), ("metrics", metrics)):
            for k, v in named_leaves(tree).items():
                arrays[f"{mode}/{part}{k}"] = host(v)
    np.savez(Path(out) / "runs.npz", **arrays)
    (Path(out) / "info.json").write_text(json.dumps(info))


@pytest.mark.slow
@pytest.mark.parametrize("name", methods("sharded"))
def test_clients_sharded_over_8_devices_give_the_single_device_result(name, tmp_path):
    """Reductions over the client axis add in another order on 8 devices, so leaves agree to
    float32 rounding (rtol 1e-5), not to the bit; integer leaves (cluster ids) exactly."""
    env = compilation_cache.subprocess_env()  # the child shares tests/conftest.py's cache
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
    code = ("import sys; from fedrnd import compilation_cache; compilation_cache.enable(); "
            "from tests.algorithms.test_conformance import sharded_comparison; "
            "sharded_comparison(*sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, name, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"one": [1], "eight": [8]}
    with np.load(tmp_path / "runs.npz") as z:
        runs = dict(z)
    one = {k[len("one/"):]: v for k, v in runs.items() if k.startswith("one/")}
    eight = {k[len("eight/"):]: v for k, v in runs.items() if k.startswith("eight/")}
    assert sorted(one) == sorted(eight)
    for k in sorted(one):
        a, b = one[k], eight[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        if np.issubdtype(a.dtype, np.floating):
            atol = SHARDED_ATOL.get((name, k), 1e-6)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(b, a, err_msg=k)
