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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
CLIENT_AXIS = "clients"

# CPU 1: on the throughput workload (2-core EPYC, 2026-11-22) chunk 1 ran 2836 client updates/s,
# chunks 2/4/8/16/32 ran 1065/1135/611/772/304 and all 1000 in one vmap 214 (benchmarks/RESULTS.md).
# The accelerator values are not yet measured.
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
            # One client per iteration, not a vmap of one (see _chunked_sum).
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

    def sum(self, fn: Callable[[PyTree, PyTree], PyTree], per_client: PyTree,
            shared: PyTree = None) -> PyTree:
        """``sum_c fn(per_client[c], shared)`` without stacking the per-client outputs."""

        def local_sum(xs, sh):
            n = jax.tree.leaves(xs)[0].shape[0]
            chunk = min(self.chunk, n)
            if n % chunk:
                # Peel the remainder off with a vmap so the scan sees equal chunks.
                head = jax.tree.map(lambda a: a[: n - n % chunk], xs)
                tail = jax.tree.map(lambda a: a[n - n % chunk:], xs)
                tail_sum = jax.tree.map(lambda a: jnp.sum(a, 0),
                                        jax.vmap(lambda x: fn(x, sh))(tail))
                if n < chunk or n - n % chunk == 0:
                    return tail_sum
                return jax.tree.map(jnp.add, _chunked_sum(fn, head, sh, chunk), tail_sum)
            return _chunked_sum(fn, xs, sh, chunk)

        if self.mesh is None:
            return local_sum(per_client, shared)
        self._check_divisible(per_client)

        def sharded(xs, sh):
            return jax.lax.psum(local_sum(xs, sh), CLIENT_AXIS)

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
        return jax.device_put(tree, NamedSharding(self.mesh, P(CLIENT_AXIS)))

    def replicate(self, tree: PyTree) -> PyTree:
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, P()))


def _chunked_sum(fn, xs, shared, chunk):
    if chunk == 1:
        # One client per scan step, not a vmap of one: per-client scalars then stay unbatched,
        # so a ``lax.cond`` in ``fn`` (e.g. skipping a zero proximal term in local training)
        # is a real branch instead of a select that computes both sides. Same sums.
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            jax.eval_shape(lambda x: fn(x, shared),
                                           jax.tree.map(lambda a: a[0], xs)))

        def body1(acc, x):
            return jax.tree.map(jnp.add, acc, fn(x, shared)), None

        acc, _ = jax.lax.scan(body1, zero, xs)
        return acc
    n = jax.tree.leaves(xs)[0].shape[0]
    blocks = jax.tree.map(lambda a: a.reshape(n // chunk, chunk, *a.shape[1:]), xs)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype),
                        jax.eval_shape(jax.vmap(lambda x: fn(x, shared)),
                                       jax.tree.map(lambda a: a[0], blocks)))

    def body(acc, block):
        out = jax.vmap(lambda x: fn(x, shared))(block)
        return jax.tree.map(lambda a, o: a + jnp.sum(o, 0), acc, out), None

    acc, _ = jax.lax.scan(body, zero, blocks)
    return acc


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` local devices (all by default), axis ``clients``."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} present")
        devices = devices[:num_devices]
    return Mesh(devices, (CLIENT_AXIS,))
