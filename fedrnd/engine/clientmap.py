"""The one place where per-client work is mapped over the client axis.

``client_map(fn, per_client, shared)`` runs ``fn(one_client, shared)`` for every client:
within a device, clients are processed in chunks of ``chunk_size`` (each chunk vmapped, chunks
in sequence with ``lax.map``), trading memory for batching; across devices the client axis is
split with ``shard_map`` over a mesh axis named ``"clients"``. Algorithms never decide either.

``client_sum`` maps and sums in the same pass, so a weighted FedAvg over ``C`` clients holds
one running sum instead of ``C`` stacked models.

Chunk size: on a CPU the batched products of a vmapped chunk become memory-bound when every
client has its own weights, so one client at a time is fastest there (``benchmarks/``); on an
accelerator large chunks fill the device. ``chunk_size=None`` picks the backend default.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedrnd.data.federated import FederatedData
from fedrnd.engine import multihost

PyTree = Any
CLIENT_AXIS = "clients"

# CPU 1: on the throughput workload (2-core EPYC, 2026-11-22) chunk 1 ran 2836 client updates/s,
# chunks 2/4/8/16/32 ran 1065/1135/611/772/304 and all 1000 in one vmap 214 (benchmarks/RESULTS.md).
# GPU 256: on one NVIDIA H200 (2026-12-04, benchmarks/results/device_h200_2026-12-04) chunks
# 16/64/256/1000 ran 41,468/74,965/112,803/125,846 updates/s: 256 is within 11% of running all
# 1,000 clients in one vmap and keeps a chunk's working set bounded for larger models (the
# memory planner lowers it where needed). TPU: not measured.
DEFAULT_CHUNK = {"cpu": 1, "gpu": 256, "cuda": 256, "rocm": 256, "tpu": 256}
"""Default clients per chunk by backend (measured on the throughput workload; see benchmarks)."""


def default_chunk_size() -> int:
    return DEFAULT_CHUNK.get(jax.default_backend(), 64)


@dataclasses.dataclass(frozen=True)
class ClientMapper:
    """How the client axis is executed: chunk size per device and an optional device mesh."""

    chunk_size: int | None = None
    mesh: Mesh | None = None

    @property
    def chunk(self) -> int:
        return self.chunk_size or default_chunk_size()

    @property
    def num_shards(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape[CLIENT_AXIS])

    def _local_map(self, fn, xs, shared):
        n = jax.tree.leaves(xs)[0].shape[0]
        if self.chunk >= n:
            return jax.vmap(lambda x: fn(x, shared))(xs)
        if self.chunk == 1:
            # One client per iteration, not a vmap of one (see _chunked_reduce).
            return jax.lax.map(lambda x: fn(x, shared), xs)
        return jax.lax.map(lambda x: fn(x, shared), xs, batch_size=self.chunk)

    def map(self, fn: Callable[[PyTree, PyTree], PyTree], per_client: PyTree,
            shared: PyTree = None) -> PyTree:
        """``[fn(per_client[c], shared) for c]`` stacked on a leading client axis."""
        if self.mesh is None:
            return self._local_map(fn, per_client, shared)
        self._check_divisible(per_client)
        return jax.shard_map(
            lambda xs, sh: self._local_map(fn, xs, sh), mesh=self.mesh,
            in_specs=(P(CLIENT_AXIS), P()), out_specs=P(CLIENT_AXIS),
            # Replicated inputs (a shared start model) become per-client scan carries, which
            # the varying-manual-axes check rejects; the client axis is embarrassingly parallel.
            check_vma=False,
        )(per_client, shared)

    def map_update(self, fn: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]],
                   per_client: PyTree, carried: PyTree, shared: PyTree = None
                   ) -> tuple[PyTree, PyTree]:
        """``fn(per_client[c], carried[c], shared) -> (new_carried_c, out_c)`` for every client;
        returns ``(new_carried, outs)``, both stacked on the client axis.

        Equal to :meth:`map` over ``(per_client, carried)``. At one client per step on one
        device, client ``c``'s new ``carried`` is written over its old one in a single buffer
        (a loop with in-place updates), so a jitted caller that donates ``carried`` (the
        per-node models of a decentralized round) holds it once instead of twice.
        """
        n = jax.tree.leaves(per_client)[0].shape[0]
        if self.mesh is not None or self.chunk != 1 or n <= 1:
            return self.map(lambda xc, sh: fn(xc[0], xc[1], sh), (per_client, carried), shared)
        one = jax.tree.map(lambda a: a[0], (per_client, carried))
        out_shape = jax.eval_shape(lambda xc: fn(xc[0], xc[1], shared)[1], one)
        outs = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), out_shape)

        def body(i, acc):
            cur, outs = acc
            new, out = fn(jax.tree.map(lambda a: a[i], per_client),
                          jax.tree.map(lambda a: a[i], cur), shared)
            put = functools.partial(jax.tree.map, lambda a, v: a.at[i].set(v))
            return put(cur, new), put(outs, out)

        return jax.lax.fori_loop(0, n, body, (carried, outs))

    def sum(self, fn: Callable[[PyTree, PyTree], PyTree], per_client: PyTree,
            shared: PyTree = None) -> PyTree:
        """``sum_c fn(per_client[c], shared)`` without stacking the per-client outputs."""
        return self._reduce(fn, per_client, shared, _SUM)

    def segment_sum(self, fn: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]],
                    per_client: PyTree, shared: PyTree = None, *,
                    num_segments: int) -> PyTree:
        """Per-segment sums of per-client outputs, without stacking them.

        ``fn(client, shared)`` returns ``(segment_id, tree)``; the result has leaves
        ``[num_segments, ...]``: leaf ``k`` is the sum of the trees of the clients whose id is
        ``k`` (ids outside ``[0, num_segments)`` are dropped). Clustered methods aggregate into
        ``K`` cluster slots this way while memory holds ``K`` models, not one per client.
        """
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        return self._reduce(fn, per_client, shared, _SegmentSum(int(num_segments)))

    def _reduce(self, fn, per_client, shared, red):
        def local(xs, sh):
            n = jax.tree.leaves(xs)[0].shape[0]
            chunk = min(self.chunk, n)
            if n % chunk:
                # Peel the remainder off with a vmap so the scan sees equal chunks.
                head = jax.tree.map(lambda a: a[: n - n % chunk], xs)
                tail = jax.tree.map(lambda a: a[n - n % chunk:], xs)
                out = jax.vmap(lambda x: fn(x, sh))(tail)
                tail_sum = red.add_batch(red.zero(jax.eval_shape(lambda x: fn(x, sh),
                                                                 jax.tree.map(lambda a: a[0],
                                                                              tail))), out)
                if n < chunk or n - n % chunk == 0:
                    return tail_sum
                return jax.tree.map(jnp.add, _chunked_reduce(fn, head, sh, chunk, red), tail_sum)
            return _chunked_reduce(fn, xs, sh, chunk, red)

        if self.mesh is None:
            return local(per_client, shared)
        self._check_divisible(per_client)

        def sharded(xs, sh):
            return jax.lax.psum(local(xs, sh), CLIENT_AXIS)

        return jax.shard_map(sharded, mesh=self.mesh, in_specs=(P(CLIENT_AXIS), P()),
                             out_specs=P(), check_vma=False)(per_client, shared)

    def _check_divisible(self, per_client):
        n = jax.tree.leaves(per_client)[0].shape[0]
        if n % self.num_shards:
            raise ValueError(
                f"{n} clients (or cohort size) cannot be split evenly over {self.num_shards} "
                f"devices; choose a client count or cohort size divisible by {self.num_shards}")

    def shard(self, tree: PyTree) -> PyTree:
        """Place a per-client pytree with its leading axis split over the mesh."""
        if self.mesh is None:
            return tree
        # multihost.put: on a mesh spanning processes each host places only its own shards.
        return multihost.put(tree, NamedSharding(self.mesh, P(CLIENT_AXIS)))

    def replicate(self, tree: PyTree) -> PyTree:
        """Place a pytree whole on every device of the mesh."""
        if self.mesh is None:
            return tree
        return multihost.put(tree, NamedSharding(self.mesh, P()))

    def place_data(self, data: FederatedData, pool: tuple[jax.Array, jax.Array] | None = None
                   ) -> FederatedData:
        """``data`` placed once where every round reads it: the example pool (``x``, ``y``)
        whole on each device of the mesh, the per-client arrays split over it (all on the
        first device without a mesh). Data left on one device while the clients are split
        over several is copied onto the mesh by every round instead. ``pool``: an already placed ``(x, y)`` to
        use instead of ``data``'s (the phases of drifting data share one pool)."""
        if pool is None:
            pool = (data.x, data.y)
            pool = (jax.device_put(pool, jax.devices()[0]) if self.mesh is None
                    else self.replicate(pool))
        clients = data.client_arrays()
        clients = (jax.device_put(clients, jax.devices()[0]) if self.mesh is None
                   else self.shard(clients))
        return data.replace(x=pool[0], y=pool[1], **clients)


class _Sum:
    """Reduction of :meth:`ClientMapper.sum`: outputs are added up."""

    @staticmethod
    def zero(shape):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

    @staticmethod
    def add(acc, out):
        return jax.tree.map(jnp.add, acc, out)

    @staticmethod
    def add_batch(acc, out):
        return jax.tree.map(lambda a, o: a + jnp.sum(o, 0), acc, out)


@dataclasses.dataclass(frozen=True)
class _SegmentSum:
    """Reduction of :meth:`ClientMapper.segment_sum`: ``(id, tree)`` outputs, added at ``id``."""

    num_segments: int

    def zero(self, shape):
        _, tree = shape
        return jax.tree.map(lambda s: jnp.zeros((self.num_segments, *s.shape), s.dtype), tree)

    def add(self, acc, out):
        seg, tree = out
        # mode="drop": an id outside [0, K) contributes nothing (like jax.ops.segment_sum).
        return jax.tree.map(lambda a, o: a.at[seg].add(o, mode="drop"), acc, tree)

    def add_batch(self, acc, out):
        return self.add(acc, out)


_SUM = _Sum()


def _chunked_reduce(fn, xs, shared, chunk, red):
    one = jax.tree.map(lambda a: a[0], xs)
    if chunk == 1:
        # One client per scan step, not a vmap of one: per-client scalars then stay unbatched,
        # so a ``lax.cond`` in ``fn`` (e.g. skipping a zero proximal term in local training)
        # is a real branch instead of a select that computes both sides. Same sums.
        zero = red.zero(jax.eval_shape(lambda x: fn(x, shared), one))

        def body1(acc, x):
            return red.add(acc, fn(x, shared)), None

        acc, _ = jax.lax.scan(body1, zero, xs)
        return acc
    n = jax.tree.leaves(xs)[0].shape[0]
    blocks = jax.tree.map(lambda a: a.reshape(n // chunk, chunk, *a.shape[1:]), xs)
    zero = red.zero(jax.eval_shape(lambda x: fn(x, shared), one))

    def body(acc, block):
        return red.add_batch(acc, jax.vmap(lambda x: fn(x, shared))(block)), None

    acc, _ = jax.lax.scan(body, zero, blocks)
    return acc


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default), axis ``clients``.

    With ``jax.distributed`` initialised, ``jax.devices()`` lists the devices of every process,
    so the default mesh spans all hosts (the order groups each process's devices together).
    """
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            cpu = devices[0].platform == "cpu"
            hint = (f"; on a CPU, give JAX {num_devices} devices before its first "
                    f"computation: jax.config.update('jax_num_cpu_devices', {num_devices}) "
                    f"right after importing it, or XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={num_devices} (fedrnd run and "
                    f"fedrnd.simulate do this themselves in a fresh process)") if cpu else ""
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} present"
                             + hint)
        devices = devices[:num_devices]
    return Mesh(devices, (CLIENT_AXIS,))
