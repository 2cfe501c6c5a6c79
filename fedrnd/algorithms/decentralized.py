"""Decentralized FL on a communication graph: D-PSGD, DFedAvg, DFedAvgM.

No server: every node keeps its own model (``state["clients"]["params"]``, leaves ``[C, ...]``)
and, each round, trains locally with its own optimizer (the engine's per-client kinds and
learning rates) and averages with its graph neighbours by gossip ``x_i <- sum_j W_ij x_j``
(:mod:`fedrnd.graphs`; ``W`` uniform or Metropolis-Hastings, chunked over edges).

- **D-PSGD** (Lian et al., NeurIPS 2017, Algorithm 1): one stochastic gradient step per round,
  computed at the node's own model and applied to the neighbour average,
  ``x_i <- sum_j W_ij x_j - lr g_i(x_i)``. ``step_then_gossip = true`` gossips the stepped
  models instead, ``x <- W (x - lr g(x))`` (adapt-then-combine).
- **DFedAvg** (Sun, Li, Wang, IEEE TPAMI 2022): the configured local work (``local.epochs`` or
  ``local.steps``) from the node's model, then gossip of the trained models.
- **DFedAvgM** (same paper): as DFedAvg with heavy-ball local steps
  ``y <- y - lr g(y) + theta (y - y_prev)``, momentum reset at the start of every round
  (every node uses momentum ``theta``, at its own learning rate).

Each node keeps its optimizer state across rounds (``state["clients"]["opt"]``) unless
``reset_opt`` (DFedAvgM's default). The graph is static (drawn once in ``init`` from the seed,
checked connected, kept in ``state["graph"]``) or, with ``redraw``, drawn afresh from every
round's key inside the jitted round (a fixed number of edge slots).

Metrics: ``consensus_distance`` (mean over nodes of ``||x_i - mean x||^2`` after the round),
``links`` (undirected links used), ``bytes_per_link`` (both directions, per round) and the
ledger: every gossip step a node sends its model to each neighbour and receives one from each
(``up/model``, ``down/model`` = degree x model bytes x ``gossip_steps``).

The shared machinery is :class:`fedrnd.algorithms._gossip.Gossip` (also the base of RND-DFL
and SSD-FL); each method here only says how its local work and its gossip combine.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from fedrnd.algorithms._gossip import Gossip
from fedrnd.algorithms.base import option
from fedrnd.engine import ClientOptimizer, Engine, LocalSpec


@dataclasses.dataclass(frozen=True)
class DPSGD(Gossip):
    """D-PSGD (Lian et al. 2017): one local SGD step (each node's own optimizer), gossip."""

    name: ClassVar[str] = "dpsgd"
    step_then_gossip: bool = option(False, doc="``x <- W (x - lr g)`` instead of the paper's "
                                               "``W x - lr g``.")

    @property
    def local_engine(self) -> Engine:
        return dataclasses.replace(self.engine,
                                   local=LocalSpec(self.engine.local.batch_size, steps=1))

    def combine(self, start, trained, gossip_fn):
        if self.step_then_gossip:
            return gossip_fn(trained)
        # Gradient at the own model, applied to the neighbour average (the paper's order).
        return jax.tree.map(lambda w, z, s: w + (z - s), gossip_fn(start), trained, start)


@dataclasses.dataclass(frozen=True)
class DFedAvg(Gossip):
    """DFedAvg (Sun et al. 2022): the configured local epochs/steps, then gossip."""

    name: ClassVar[str] = "dfedavg"


@dataclasses.dataclass(frozen=True)
class DFedAvgM(Gossip):
    """DFedAvgM (Sun et al. 2022): local heavy-ball steps (``momentum``), then gossip.

    Every node runs momentum SGD at its own learning rate; the momentum restarts from zero
    every round (``reset_opt = true``), as in the paper. Proximal terms of ``prox_sgd`` nodes
    are dropped with their optimizer.
    """

    name: ClassVar[str] = "dfedavgm"
    momentum: float = option(0.9, low=0, high=1, high_open=True,
                             doc="Heavy-ball momentum ``theta`` of every node.")
    reset_opt: bool = True

    @property
    def local_engine(self) -> Engine:
        settings = {**dict(self.engine.optimizer.settings), "momentum": float(self.momentum)}
        return dataclasses.replace(self.engine, optimizer=ClientOptimizer(
            ("momentum",), tuple(sorted(settings.items()))))

    @property
    def local_prox_mu(self) -> float:
        # Every node runs momentum SGD: a prox_sgd node's proximal term goes with its optimizer.
        return 0.0
