"""The peer comparison's framework-free parts: the shared workload, results, checks, tables.

One workload is built once by fedrnd and exported to numpy, so that every framework trains
from the same arrays. The MLP workload is ``benchmarks/throughput.py``'s (Gaussian-means data,
IID clients, MLP 784-200-200-10); the CNN workloads (``model="cnn"``) run fedrnd's built-in
``cnn`` (conv 'same' + ReLU + 2x2 max pool 'same' per block, NHWC flatten, a ReLU dense layer
and the output layer) on 28x28x1 images: Fashion-MNIST IID over clients, or the MLP's
synthetic examples reshaped to 28x28x1. Both use plain SGD clients and FedAvg with server lr 1.

- ``x_train [C, N, *feature_shape]``, ``y_train [C, N]``: each client's own examples;
- ``order [R, C, T, B]``: which of its examples client ``c`` uses at local step ``t`` of round
  ``r``, i.e. fedrnd's own batch schedule (:func:`fedrnd.engine.local.batch_schedule` with
  FedAvg's per-client keys), so every framework sees the same batches in the same order;
- ``init``: fedrnd's initial weights, ``(kernel, bias)`` per layer: convolutions first
  (kernel ``[k, k, in, out]``, flax's HWIO), then dense layers (kernel ``[in, out]``);
  ``model`` (``"mlp"`` or ``"cnn"``) and these shapes define the architecture;
- ``x_test``, ``y_test``: the test examples every framework's final model is scored on, by one
  numpy forward pass (:func:`accuracy`), so evaluation code cannot differ either.

Same data, same start, same batches: the frameworks differ only in floating-point summation
order, so their final models must agree within float tolerance (:func:`agreement`), and the
throughput ratios (:func:`ratio_table`) compare equal work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

Layers = list[tuple[np.ndarray, np.ndarray]]
"""Layers ``[(kernel, bias [out]), ...]``: for an MLP dense kernels ``[in, out]`` with ReLU
between layers; for a CNN first its convolutions (kernel ``[k, k, in, out]``, HWIO), then its
dense layers (see :func:`forward`)."""

MODELS = ("mlp", "cnn")
"""Model families a :class:`Workload` can hold."""

CNN_PRESETS = {"cnn": {"channels": (8, 16), "dense": 64, "kernel": 5},
               "lenet": {"channels": (6, 16), "dense": 120, "kernel": 5}}
"""fedrnd ``cnn`` options of the CNN workloads (``run.py --model``). ``cnn``: the RND paper's
task CNN (conv 5x5 8, conv 5x5 16, dense 64). ``lenet``: LeNet-5's size as far as fedrnd's
``cnn`` factory goes (conv 5x5 6, conv 5x5 16, dense 120; differences in the README)."""

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    """The comparison workload as plain numpy arrays (see the module docstring).

    ``model``: ``"mlp"`` (``init`` is dense layers, inputs ``[F]``) or ``"cnn"`` (``init`` is
    convolutions then dense layers, inputs ``[H, W, C]``); ``data``: what the examples are
    (fedrnd's data set and partition name).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    order: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    init: Layers
    lr: float
    batch: int
    seed: int = 0
    model: str = "mlp"
    data: str = ""

    def __post_init__(self):
        c, n = self.y_train.shape
        if self.x_train.shape[:2] != (c, n):
            raise ValueError(f"x_train has shape {self.x_train.shape}, expected ({c}, {n}, F)")
        if self.order.ndim != 4 or self.order.shape[1] != c:
            raise ValueError(f"order has shape {self.order.shape}, expected (R, {c}, T, B)")
        if self.order.size and (self.order.min() < 0 or self.order.max() >= n):
            raise ValueError(f"order holds positions outside a client's {n} examples")
        if self.rounds < 1:
            raise ValueError("the workload has no rounds (order has R = 0)")
        if not self.init:
            raise ValueError("init has no layers")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        ndims = [np.ndim(k) for k, _ in self.init]
        if self.model == "mlp" and any(d != 2 for d in ndims):
            raise ValueError(f"an MLP workload holds dense kernels [in, out] only; kernel "
                             f"ranks {ndims}")
        if self.model == "cnn":
            convs = self.convs
            if (self.x_train.ndim != 5 or not convs or ndims[:convs] != [4] * convs
                    or any(d != 2 for d in ndims[convs:]) or len(ndims) == convs):
                raise ValueError(f"a CNN workload needs images x_train [C, N, H, W, C_in] (got "
                                 f"{self.x_train.shape}) and conv kernels [k, k, in, out] "
                                 f"before dense kernels [in, out] (kernel ranks {ndims})")
            h, w, ch = self.flat_shape
            if self.init[convs][0].shape[0] != h * w * ch:
                raise ValueError(f"the first dense kernel takes {self.init[convs][0].shape[0]} "
                                 f"inputs; the convolutions give {h}x{w}x{ch}")

    @property
    def clients(self) -> int:
        return self.y_train.shape[0]

    @property
    def rounds(self) -> int:
        return self.order.shape[0]

    @property
    def steps(self) -> int:
        return self.order.shape[2]

    @property
    def num_classes(self) -> int:
        return self.init[-1][0].shape[1]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[2:])

    @property
    def convs(self) -> int:
        """How many of ``init``'s layers are convolutions (the leading 4-d kernels)."""
        n = 0
        while n < len(self.init) and np.ndim(self.init[n][0]) == 4:
            n += 1
        return n

    @property
    def flat_shape(self) -> tuple[int, int, int]:
        """``(h, w, c)`` of a CNN's last pooled activations, flattened in this (NHWC) order
        for its first dense layer."""
        h, w = self.feature_shape[:2]
        for _ in range(self.convs):
            h, w = -(-h // 2), -(-w // 2)  # 2x2 max pool, stride 2, 'same' (ceil)
        return h, w, int(self.init[self.convs - 1][0].shape[-1])

    @property
    def dims(self) -> tuple[int, ...]:
        """Widths of the dense layers, input first (for a CNN: from the flattened features)."""
        dense = self.init[self.convs:]
        return (dense[0][0].shape[0], *(k.shape[1] for k, _ in dense))

    @property
    def architecture(self) -> str:
        """E.g. ``"MLP 784-200-200-10"`` or ``"CNN 28x28x1: conv5x5x8+pool, conv5x5x16+pool,
        dense 784-64-10"``."""
        dims = "-".join(map(str, self.dims))
        if self.model == "mlp":
            return f"MLP {dims}"
        convs = ", ".join(f"conv{k.shape[0]}x{k.shape[1]}x{k.shape[3]}+pool"
                          for k, _ in self.init[:self.convs])
        return f"CNN {'x'.join(map(str, self.feature_shape))}: {convs}, dense {dims}"

    @property
    def param_shapes(self) -> list[tuple[list[int], list[int]]]:
        """``[(kernel shape, bias shape), ...]`` of ``init``."""
        return [(list(np.shape(k)), list(np.shape(b))) for k, b in self.init]

    def batch_of(self, r: int, c: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``c``'s batch at local step ``t`` of round ``r``: ``(x [B, ...], y [B])``."""
        pos = self.order[r, c, t]
        return self.x_train[c, pos], self.y_train[c, pos]

    def save(self, path: str) -> None:
        """Write the arrays to one ``.npz`` (uncompressed, so :meth:`load` can memory-map it)."""
        arrays = {"x_train": self.x_train, "y_train": self.y_train, "order": self.order,
                  "x_test": self.x_test, "y_test": self.y_test,
                  "lr": np.float64(self.lr), "batch": np.int64(self.batch),
                  "seed": np.int64(self.seed), "layers": np.int64(len(self.init)),
                  "model": np.array(self.model), "data": np.array(self.data)}
        for i, (k, b) in enumerate(self.init):
            arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = k, b
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> Workload:
        z = np.load(path, mmap_mode="r" if mmap else None)
        init = [(np.asarray(z[f"kernel_{i}"]), np.asarray(z[f"bias_{i}"]))
                for i in range(int(z["layers"]))]
        # Files written before the CNN workloads hold no model / data entry: an MLP.
        model = str(z["model"]) if "model" in z.files else "mlp"
        data = str(z["data"]) if "data" in z.files else ""
        return cls(z["x_train"], z["y_train"], np.asarray(z["order"]), z["x_test"],
                   z["y_test"], init, float(z["lr"]), int(z["batch"]), int(z["seed"]),
                   model, data)


def image_dataset(clients: int, samples: int, test_samples: int, seed: int = 0,
                  data: str = "auto"):
    """28x28x1 images for the CNN workloads: ``(Dataset, Partition)``.

    ``data="fashion"``: Fashion-MNIST (:func:`fedrnd.data.fashion_mnist`, from
    :data:`FASHION_DIR` or ``$FEDRND_FASHION_MNIST_DIR``), IID over clients: client ``c``
    gets ``samples`` images of a seeded shuffle of the 60,000 training images, a second
    shuffle following the first when ``clients x samples`` exceeds them (1000 x 64 = 64,000:
    4,000 images serve two clients); test examples are the 10,000 test images, ``test_samples``
    per client in turn (cycling when there are more than 10,000; :func:`export_workload`
    keeps each once). ``"synthetic"``: the MLP workload's Gaussian-means examples
    (``benchmarks/throughput.py``) reshaped to 28x28x1, IID. ``"auto"``: Fashion-MNIST when
    its files are there, else synthetic.
    """
    from benchmarks.throughput import iid_partition, synthetic_dataset
    from fedrnd.data.federated import Dataset, Partition

    if data not in ("auto", "fashion", "synthetic"):
        raise ValueError(f"data must be 'auto', 'fashion' or 'synthetic', got {data!r}")
    if data != "synthetic":
        from fedrnd.data import fashion_mnist

        try:
            ds = fashion_mnist()
        except FileNotFoundError:
            if data == "fashion":
                raise
        else:
            rng = np.random.default_rng(seed)
            n_tr, n_te = len(ds.y_train), len(ds.y_test)
            need = clients * samples
            rows = np.concatenate([rng.permutation(n_tr) for _ in range(-(-need // n_tr))])
            train = [rows[c * samples:(c + 1) * samples] for c in range(clients)]
            test = [(c * test_samples + np.arange(test_samples)) % n_te
                    for c in range(clients)]
            reuse = (f"; {need - n_tr} images serve two clients" if need > n_tr else "")
            part = Partition(train, test, np.zeros(clients, np.int32), None,
                             f"iid({samples} per client from {n_tr} training images{reuse})")
            return ds, part
    ds = synthetic_dataset(clients, samples, test_samples, seed=seed)
    img = Dataset(ds.x_train.reshape(-1, 28, 28, 1), ds.y_train,
                  ds.x_test.reshape(-1, 28, 28, 1), ds.y_test, ds.num_classes,
                  f"{ds.name} as 28x28x1")
    return img, iid_partition(clients, samples, test_samples)


def fedrnd_setup(clients: int = 1000, samples: int = 64, test_samples: int = 16,
                 rounds: int = 6, batch: int = 16, seed: int = 0,
                 hidden: Sequence[int] = (200, 200), model: str = "mlp", data: str = "auto"):
    """Build the workload in fedrnd: ``(data, model, spec, init_key, round_keys)``.

    ``model="mlp"``: ``benchmarks/throughput.py``'s workload (MLP with ``hidden`` widths on
    its synthetic data; ``data`` is not used). ``model="cnn"`` or ``"lenet"``: fedrnd's ``cnn``
    with :data:`CNN_PRESETS`'s options on 28x28x1 images (:func:`image_dataset` with
    ``data``). The keys are those of ``benchmarks/throughput.py`` (model init ``key(seed)``,
    rounds ``split(key(seed + 1), rounds)``).
    """
    import jax

    from benchmarks.throughput import FEATURES, iid_partition, synthetic_dataset
    from fedrnd.data.federated import build_federated
    from fedrnd.engine import LocalSpec
    from fedrnd.models import make_model

    if model != "mlp" and model not in CNN_PRESETS:
        raise ValueError(f"model must be 'mlp' or one of {tuple(CNN_PRESETS)}, got {model!r}")
    if clients < 1 or samples < 1 or test_samples < 1:
        raise ValueError(f"clients, samples and test samples must be >= 1, got "
                         f"{clients}, {samples}, {test_samples}")
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (one warm-up round, then timed ones), "
                         f"got {rounds}")
    if batch < 1 or samples % batch:
        raise ValueError(f"samples per client ({samples}) must be a multiple of the batch "
                         f"size ({batch}): every framework then runs the same full batches")
    if model == "mlp":
        ds = synthetic_dataset(clients, samples, test_samples, seed=seed)
        part = iid_partition(clients, samples, test_samples)
        net = make_model("mlp", (FEATURES,), ds.num_classes, hidden=list(hidden))
    else:
        ds, part = image_dataset(clients, samples, test_samples, seed, data)
        opts = CNN_PRESETS[model]
        net = make_model("cnn", ds.x_train.shape[1:], ds.num_classes,
                         channels=list(opts["channels"]), dense=opts["dense"],
                         kernel=opts["kernel"])
    fed = build_federated(ds, part)
    spec = LocalSpec(batch_size=batch, epochs=1)
    keys = jax.random.split(jax.random.key(seed + 1), rounds)
    return fed, net, spec, jax.random.key(seed), keys


def batch_order(data, spec, round_keys) -> np.ndarray:
    """``[R, C, T, B]`` positions into each client's index row: FedAvg's batches in fedrnd.

    ``FedAvg.round`` splits its round key into ``(cohort, train)`` keys; client ``c`` trains
    with ``fold_in(train, c)`` (:func:`fedrnd.engine.client_keys`), from which
    :func:`fedrnd.engine.local.batch_schedule` draws its batches. Clients with a partial last
    batch are refused (every peer would need fedrnd's masking).
    """
    import jax
    import jax.numpy as jnp

    from fedrnd.engine import client_keys
    from fedrnd.engine.local import batch_schedule

    n_max = data.train_idx.shape[1]

    @jax.jit
    def one_round(key):
        k_train = jax.random.split(key)[1]
        keys = client_keys(k_train, jnp.arange(data.num_clients))
        pos, valid, active, _ = jax.vmap(
            lambda c, k: batch_schedule(spec, n_max, c, k))(data.train_count, keys)
        return pos, valid, active

    out = []
    for key in round_keys:
        pos, valid, active = one_round(key)
        if not (bool(jnp.all(valid)) and bool(jnp.all(active))):
            raise ValueError("some client has a partial or masked batch; the comparison needs "
                             "equal client sizes that are multiples of the batch size")
        out.append(np.asarray(pos, np.int32))
    return np.stack(out)


def layer_names(model, params) -> list[str]:
    """The weight layers of a fedrnd MLP (its ``DenseStack``) or built-in CNN (``Conv_i``,
    then ``Dense_i``), in :data:`Layers` order; ``ValueError`` for any other model."""
    if model.dense is not None:
        return list(model.dense.layers)
    names = list(params)
    convs = sorted((n for n in names if n.startswith("Conv_")), key=lambda n: int(n[5:]))
    dense = sorted((n for n in names if n.startswith("Dense_")), key=lambda n: int(n[6:]))
    if model.name != "cnn" or not convs or len(convs) + len(dense) != len(names):
        raise ValueError(f"model {model.name!r} is neither a stack of dense layers nor "
                         "fedrnd's built-in cnn; the peers rebuild only those")
    return convs + dense


def export_workload(data, model, spec, init_key, round_keys, lr: float, seed: int = 0
                    ) -> Workload:
    """fedrnd's data, initial weights and batch schedule as a numpy :class:`Workload`.

    Test examples that several clients share (Fashion-MNIST's test set cycled over more
    clients than it has images) are kept once, in first-seen order.
    """
    params = model.init(init_key)
    init = [(np.asarray(params[n]["kernel"], np.float32), np.asarray(params[n]["bias"],
                                                                      np.float32))
            for n in layer_names(model, params)]
    idx = np.asarray(data.train_idx)
    x, y = np.asarray(data.x), np.asarray(data.y)
    te = np.asarray(data.test_idx).reshape(-1)
    _, first = np.unique(te, return_index=True)
    if len(first) < len(te):
        te = te[np.sort(first)]
    return Workload(x_train=x[idx], y_train=y[idx].astype(np.int64),
                    order=batch_order(data, spec, round_keys), x_test=x[te],
                    y_test=y[te].astype(np.int64), init=init, lr=lr, batch=spec.batch_size,
                    seed=seed, model="mlp" if model.dense is not None else "cnn",
                    data=str(getattr(data, "name", "")))


def params_to_layers(params, layer_names: Sequence[str]) -> Layers:
    """A fedrnd params tree as :data:`Layers` (the layers named, in that order)."""
    return [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"]))
            for n in layer_names]


def run_fedrnd(data, model, spec, init_key, round_keys, lr: float, *, path: str = "general",
               chunk_size: int | None = None, devices: int = 1) -> Result:
    """FedAvg in fedrnd exactly as ``benchmarks/throughput.py`` runs it; one round per key.

    ``setup_s`` is ``alg.init`` plus lowering and compiling the jitted round; every round is
    then a call of the compiled executable. ``devices > 1`` splits the client axis over that
    many devices (a :func:`fedrnd.engine.make_mesh`; on a CPU, host devices made by
    ``--xla_force_host_platform_device_count``). ``path="lowrank"`` on a model that is not a stack
    of dense layers (a CNN) is a skip: the exact low-rank path applies to dense stacks only.
    """
    import jax

    import fedrnd
    from fedrnd.algorithms import FedAvg
    from fedrnd.engine import ClientMapper, Engine, client_hparams, make_mesh

    if path == "lowrank" and model.dense is None:
        return skipped("fedrnd (lowrank)", f"the low-rank path applies to stacks of dense "
                                           f"layers (MLP) only, not to model {model.name!r}")
    opt, hp = client_hparams(data.num_clients, optimizer="sgd", lr=lr)
    mapper = ClientMapper(chunk_size=chunk_size, mesh=make_mesh(devices) if devices > 1 else None)
    hp = mapper.shard(hp)
    data = mapper.place_data(data)  # as the driver does: the pool on every device, once
    engine = Engine(model=model, local=spec, optimizer=opt, mapper=mapper, path=path)
    fast = engine.use_lowrank(data)
    alg = FedAvg(engine=engine, server_opt="sgd", server_lr=1.0)
    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    state = alg.init(init_key, data, hp)
    compiled = jax.jit(alg.round).lower(state, data, round_keys[0]).compile()
    setup_s = time.perf_counter() - t0
    times, cpu = [], []
    for key in round_keys:
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, data, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    label = "low-rank path" if fast else f"general path, chunk {engine.mapper.chunk}"
    if devices > 1:
        label += f", client axis over {devices} {jax.default_backend()} devices"
    if model.reference_apply is not None:  # the built-in CNN on a CPU
        label += ", banded-matrix convolutions"
    return Result(name=f"fedrnd ({'lowrank' if fast else 'general'})",
                  version=f"{fedrnd.__version__}, jax {jax.__version__}",
                  clients=data.num_clients, round_s=times, cpu_s=cpu,
                  layers=params_to_layers(state["params"], layer_names(model, state["params"])),
                  setup_s=setup_s, note=f"{label}; setup = init + compile",
                  loadavg=(before, os.getloadavg()[0]))


# --------------------------------------------------------------------------------------------
# The plain numpy reference (forward, backward, FedAvg)
# --------------------------------------------------------------------------------------------
def conv_count(layers: Layers) -> int:
    """How many leading layers of ``layers`` are convolutions (4-d kernels)."""
    n = 0
    while n < len(layers) and np.ndim(layers[n][0]) == 4:
        n += 1
    return n


def im2col(a: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """``[B, H, W, C] -> [B, H, W, kh kw C]``: each pixel's ``kh x kw`` window with 'same'
    zero padding (``(k - 1) // 2`` before, the rest after, as flax and XLA pad), in the order
    ``(dy, dx, c)`` of an HWIO kernel flattened to ``[kh kw C, out]``."""
    b, h, w, _ = a.shape
    lh, lw = (kh - 1) // 2, (kw - 1) // 2
    ap = np.pad(a, ((0, 0), (lh, kh - 1 - lh), (lw, kw - 1 - lw), (0, 0)))
    return np.concatenate([ap[:, dy:dy + h, dx:dx + w] for dy in range(kh)
                           for dx in range(kw)], axis=-1)


def col2im(d: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """The adjoint of :func:`im2col`: ``[B, H, W, kh kw C] -> [B, H, W, C]`` (window
    gradients summed back onto the pixels they came from)."""
    b, h, w, kc = d.shape
    c = kc // (kh * kw)
    lh, lw = (kh - 1) // 2, (kw - 1) // 2
    out = np.zeros((b, h + kh - 1, w + kw - 1, c), d.dtype)
    for i, (dy, dx) in enumerate((dy, dx) for dy in range(kh) for dx in range(kw)):
        out[:, dy:dy + h, dx:dx + w] += d[..., i * c:(i + 1) * c]
    return out[:, lh:lh + h, lw:lw + w]


def max_pool(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max pool, stride 2, 'same' padding (an odd last row or column pools alone, as
    flax's ``max_pool(padding="SAME")`` pads with -inf): ``(pooled [B, ceil(H/2), ceil(W/2),
    C], argmax [same shape] in 0..3 within each window)``."""
    b, h, w, c = a.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    if (h, w) != (2 * h2, 2 * w2):
        ap = np.full((b, 2 * h2, 2 * w2, c), -np.inf, a.dtype)
        ap[:, :h, :w] = a
        a = ap
    win = a.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h2, w2, c, 4)
    arg = win.argmax(-1)
    return np.take_along_axis(win, arg[..., None], -1)[..., 0], arg


def max_unpool(d: np.ndarray, arg: np.ndarray, h: int, w: int) -> np.ndarray:
    """The gradient of :func:`max_pool`: ``d`` goes to each window's maximum (the first on
    ties), zero elsewhere; ``[B, H, W, C]`` for the pool's input of height ``h``, width ``w``."""
    b, h2, w2, c = d.shape
    win = np.zeros((b, h2, w2, c, 4), d.dtype)
    np.put_along_axis(win, arg[..., None], d[..., None], -1)
    full = win.reshape(b, h2, w2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return full.reshape(b, 2 * h2, 2 * w2, c)[:, :h, :w]


def _conv_forward(layers: Layers, x: np.ndarray, cache: list | None = None) -> np.ndarray:
    """fedrnd's CNN blocks (conv 'same' + bias, ReLU, 2x2 max pool 'same') on ``x [B, H, W,
    C]``, flattened in NHWC order ``(h, w, c)`` as flax's ``reshape`` does; the input as is
    when there are no convolutions."""
    a = x
    for k, b in layers[:conv_count(layers)]:
        kh, kw, _, co = k.shape
        cols = im2col(a, kh, kw)
        z = cols @ k.reshape(-1, co) + b
        a_next, arg = max_pool(np.maximum(z, 0.0))
        if cache is not None:
            cache.append((cols, z, arg))
        a = a_next
    return a.reshape(len(a), -1) if conv_count(layers) else a


def forward(layers: Layers, x: np.ndarray) -> np.ndarray:
    """Logits of ``layers`` on ``x``: the ReLU MLP on ``x [B, F]``, or the CNN (its
    convolution blocks, NHWC flatten, then the ReLU dense layers) on ``x [B, H, W, C]``."""
    convs = conv_count(layers)
    a = _conv_forward(layers, x)
    dense = layers[convs:]
    for i, (k, b) in enumerate(dense):
        a = a @ k + b
        if i < len(dense) - 1:
            a = np.maximum(a, 0.0)
    return a


def accuracy(layers: Layers, x: np.ndarray, y: np.ndarray, chunk: int | None = None) -> float:
    """Share of ``x`` whose argmax logit is its label ``y`` (numpy, ``chunk`` examples at a
    time: 4096, or 256 for a CNN, whose im2col copies each pixel ``k * k`` times)."""
    chunk = chunk or (256 if conv_count(layers) else 4096)
    hits = 0
    for s in range(0, len(y), chunk):
        hits += int(np.sum(np.argmax(forward(layers, x[s:s + chunk]), -1) == y[s:s + chunk]))
    return hits / max(len(y), 1)


def loss_and_grads(layers: Layers, x: np.ndarray, y: np.ndarray) -> tuple[float, Layers]:
    """Mean softmax cross-entropy over the batch and its gradient per layer (backprop; for a
    CNN through the convolutions by im2col, the pools by their argmax)."""
    convs = conv_count(layers)
    cache: list = []
    a = _conv_forward(layers, x, cache)
    dense = layers[convs:]
    acts = [a]
    for i, (k, b) in enumerate(dense):
        a = a @ k + b
        if i < len(dense) - 1:
            a = np.maximum(a, 0.0)
        acts.append(a)
    logits = acts[-1]
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    n = len(y)
    loss = float(-np.mean(np.log(p[np.arange(n), y] + 1e-30)))
    d = p
    d[np.arange(n), y] -= 1.0
    d /= n
    grads: Layers = [None] * len(layers)  # type: ignore[list-item]
    for i in range(len(dense) - 1, -1, -1):
        k, _ = dense[i]
        grads[convs + i] = (acts[i].T @ d, d.sum(0))
        if i:
            d = (d @ k.T) * (acts[i] > 0)
        elif convs:
            d = d @ k.T
    for j in range(convs - 1, -1, -1):
        k, _ = layers[j]
        kh, kw, _, co = k.shape
        cols, z, arg = cache[j]
        h, w = z.shape[1:3]
        d = max_unpool(d.reshape(arg.shape), arg, h, w) * (z > 0)
        grads[j] = ((cols.reshape(-1, cols.shape[-1]).T @ d.reshape(-1, co)).reshape(k.shape),
                    d.sum((0, 1, 2)))
        if j:
            d = col2im(d @ k.reshape(-1, co).T, kh, kw)
    return loss, grads


def numpy_fedavg(w: Workload, rounds: int | None = None, clock=time.perf_counter,
                 cpu: list[float] | None = None) -> tuple[Layers, list[float], list[float]]:
    """FedAvg by plain numpy loops: ``(final layers, round seconds, mean train loss per round)``.

    Every client starts from the global model, runs its ``T`` SGD steps on the batches of
    ``w.order``, and the server takes the sample-weighted mean of the client models. Each
    round's process CPU seconds are appended to ``cpu`` when given.
    """
    layers = [(k.astype(np.float32).copy(), b.astype(np.float32).copy()) for k, b in w.init]
    n = float(w.y_train.shape[1])
    times, losses = [], []
    for r in range(w.rounds if rounds is None else rounds):
        t0, c0 = clock(), time.process_time()
        acc = [(np.zeros_like(k), np.zeros_like(b)) for k, b in layers]
        total, loss_sum = 0.0, 0.0
        for c in range(w.clients):
            p = [(k.copy(), b.copy()) for k, b in layers]
            for t in range(w.steps):
                loss, g = loss_and_grads(p, *w.batch_of(r, c, t))
                loss_sum += loss * n / w.steps
                for (k, b), (gk, gb) in zip(p, g, strict=True):
                    k -= np.float32(w.lr) * gk.astype(np.float32)
                    b -= np.float32(w.lr) * gb.astype(np.float32)
            for (sk, sb), (k, b) in zip(acc, p, strict=True):
                sk += n * k
                sb += n * b
            total += n
        layers = [(sk / total, sb / total) for sk, sb in acc]
        times.append(clock() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
        losses.append(loss_sum / total)
    return layers, times, losses


# --------------------------------------------------------------------------------------------
# Results, agreement, ratios
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One framework's run of the workload (or why it was skipped).

    ``round_s`` holds every round's wall time, the first included; throughput is measured on
    the rounds after the first (warm-up: compilation, worker start-up, caches). ``cpu_s`` holds
    every round's CPU seconds (user + system, all threads) of the processes doing the work,
    where the runner measures them: on a shared machine wall time counts other people's work
    too, CPU time mostly does not (see :attr:`updates_per_cpu_s`).
    """

    name: str
    version: str = ""
    clients: int = 0
    round_s: list[float] = dataclasses.field(default_factory=list)
    layers: Layers | None = None
    test_acc: float | None = None
    setup_s: float = 0.0
    note: str = ""
    skipped: str | None = None
    loadavg: tuple[float, float] | None = None
    cpu_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.skipped is None

    @property
    def timed(self) -> list[float]:
        return self.round_s[1:] if len(self.round_s) > 1 else list(self.round_s)

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.timed) if self.timed else math.nan

    @property
    def updates_per_s(self) -> float:
        s = self.median_round_s
        return self.clients / s if s and s > 0 else math.nan

    @property
    def median_cpu_s(self) -> float:
        """Median CPU seconds of the rounds after the first (NaN when not measured)."""
        timed = self.cpu_s[1:] if len(self.cpu_s) > 1 else list(self.cpu_s)
        return statistics.median(timed) if timed else math.nan

    @property
    def updates_per_cpu_s(self) -> float:
        """Client updates per CPU second: throughput with the machine's other load mostly
        taken out (threads that spin while waiting still count)."""
        s = self.median_cpu_s
        return self.clients / s if s and s > 0 else math.nan

    def summary(self) -> dict:
        return {"name": self.name, "version": self.version, "clients": self.clients,
                "round_s": self.round_s, "median_round_s": self.median_round_s,
                "updates_per_s": self.updates_per_s, "cpu_s": self.cpu_s,
                "median_cpu_s": self.median_cpu_s,
                "updates_per_cpu_s": self.updates_per_cpu_s, "test_acc": self.test_acc,
                "setup_s": self.setup_s, "note": self.note, "skipped": self.skipped,
                "loadavg": self.loadavg}


def save_result(r: Result, path: str) -> None:
    """Write ``r`` to ``path`` (``.npz``: its layers and its summary as JSON)."""
    import json

    arrays = {"summary": np.array(json.dumps(r.summary(), default=float))}
    for i, (k, b) in enumerate(r.layers or []):
        arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = np.asarray(k), np.asarray(b)
    np.savez(path, **arrays)


def load_result(path: str) -> Result:
    """Read back what :func:`save_result` wrote."""
    import json

    z = np.load(path)
    s = json.loads(str(z["summary"]))
    n = sum(1 for k in z.files if k.startswith("kernel_"))
    layers = [(z[f"kernel_{i}"], z[f"bias_{i}"]) for i in range(n)] or None
    return Result(name=s["name"], version=s["version"], clients=s["clients"],
                  round_s=list(s["round_s"]), layers=layers, test_acc=s["test_acc"],
                  setup_s=s["setup_s"], note=s["note"], skipped=s["skipped"],
                  loadavg=tuple(s["loadavg"]) if s["loadavg"] else None,
                  cpu_s=list(s.get("cpu_s", [])))


def skipped(name: str, reason: str) -> Result:
    return Result(name=name, skipped=reason)


def timed_run(name: str, version: str, clients: int, fn, note: str = "") -> Result:
    """Run ``fn() -> (layers, round_s, setup_s)`` with the load average around it."""
    before = os.getloadavg()[0]
    layers, round_s, setup_s = fn()
    return Result(name=name, version=version, clients=clients, round_s=list(round_s),
                  layers=layers, setup_s=setup_s, note=note,
                  loadavg=(before, os.getloadavg()[0]))


def relative_difference(a: Layers, b: Layers) -> float:
    """``||a - b|| / ||b||`` over all kernels and biases together (global L2).

    Global, not per layer: a hidden unit whose pre-activation sits within float rounding of
    ReLU's kink (it happens: ~1e-6 of 200 x 64 values per step) flips its gradient for one
    example in one implementation and not the other, which moves that client's small bias
    vector by up to ~1e-2 relative while the whole model moves by ~1e-5.
    """
    if len(a) != len(b):
        raise ValueError(f"models have {len(a)} and {len(b)} layers")
    num = den = 0.0
    for (ka, ba), (kb, bb) in zip(a, b, strict=True):
        for u, v in ((ka, kb), (ba, bb)):
            u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
            if u.shape != v.shape:
                raise ValueError(f"layer shapes differ: {u.shape} and {v.shape}")
            num += float(np.sum((u - v) ** 2))
            den += float(np.sum(v ** 2))
    return float(np.sqrt(num / max(den, 1e-300)))


@dataclasses.dataclass(frozen=True)
class Agreement:
    name: str
    acc_diff: float
    param_diff: float
    agrees: bool


def agreement(results: Sequence[Result], reference: Result, acc_tol: float = 0.005,
              param_tol: float = 1e-3) -> list[Agreement]:
    """Whether each run's final model matches ``reference``'s.

    Same data, initial weights and batches leave only floating-point summation order to differ,
    so the final parameters must agree to ``param_tol`` (relative L2 difference of all
    parameters, :func:`relative_difference`) and test accuracy to ``acc_tol`` (absolute). Skipped runs are left out.
    """
    if not reference.ok or reference.layers is None or reference.test_acc is None:
        raise ValueError(f"reference {reference.name!r} has no final model to compare with")
    out = []
    for r in results:
        if not r.ok:
            continue
        if r.layers is None or r.test_acc is None:
            raise ValueError(f"{r.name!r} finished without a final model or test accuracy")
        da = abs(r.test_acc - reference.test_acc)
        dp = relative_difference(r.layers, reference.layers)
        out.append(Agreement(r.name, da, dp, da <= acc_tol and dp <= param_tol))
    return out


def is_fedrnd(r: Result) -> bool:
    return r.name.startswith("fedrnd")


RATE_KEYS = ("updates_per_s", "updates_per_cpu_s")


def ratios(results: Sequence[Result], key: str = "updates_per_s"
           ) -> dict[tuple[str, str], float]:
    """``{(fedrnd run, peer): fedrnd rate / peer rate}`` over runs that finished; the rate is
    client updates per wall second (``key="updates_per_s"``) or per CPU second
    (``"updates_per_cpu_s"``, NaN where a run has no CPU times)."""
    if key not in RATE_KEYS:
        raise ValueError(f"unknown rate {key!r}; allowed: {', '.join(RATE_KEYS)}")
    ours = [r for r in results if r.ok and is_fedrnd(r)]
    peers = [r for r in results if r.ok and not is_fedrnd(r)]
    return {(a.name, b.name): getattr(a, key) / getattr(b, key) for a in ours for b in peers}


def results_table(results: Sequence[Result], agree: Sequence[Agreement]) -> str:
    """Markdown table: throughput, accuracy and agreement of each run, skips with reasons."""
    by_name = {a.name: a for a in agree}
    lines = ["| framework | version | client updates/s | round s (median) | first round s | "
             "CPU s / round | updates / CPU s | test acc | Δacc | rel. param diff | agrees |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.name} | – | skipped: {r.skipped} | | | | | | | | |")
            continue
        cpu = (f"{r.median_cpu_s:.3f} | {r.updates_per_cpu_s:.0f}"
               if not math.isnan(r.median_cpu_s) else "– | –")
        a = by_name.get(r.name)
        agrees = "–" if a is None else ("yes" if a.agrees else "**NO**")
        lines.append(
            f"| {r.name} | {r.version} | {r.updates_per_s:.0f} | {r.median_round_s:.3f} | "
            f"{r.round_s[0]:.3f} | {cpu} | {r.test_acc:.4f} | "
            f"{'–' if a is None else f'{a.acc_diff:.4f}'} | "
            f"{'–' if a is None else f'{a.param_diff:.1e}'} | {agrees} |")
    return "\n".join(lines)


def ratio_table(results: Sequence[Result], key: str = "updates_per_s") -> str:
    """Markdown table of fedrnd's client updates per wall (or CPU, ``key``) second over each
    peer's (rows: fedrnd runs)."""
    rat = ratios(results, key)
    ours = [r.name for r in results if r.ok and is_fedrnd(r)]
    peers = [r.name for r in results if r.ok and not is_fedrnd(r)]
    if not ours or not peers:
        return "(no ratios: need a finished fedrnd run and a finished peer)"
    head = "fedrnd ÷" if key == "updates_per_s" else "fedrnd ÷ (per CPU s)"
    lines = [f"| {head} | " + " | ".join(peers) + " |",
             "|---|" + "---:|" * len(peers)]
    for a in ours:
        lines.append(f"| {a} | " + " | ".join(
            "–" if math.isnan(rat[(a, b)]) else f"{rat[(a, b)]:.1f}x" for b in peers) + " |")
    return "\n".join(lines)
