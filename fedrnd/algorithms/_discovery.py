"""The options of RND discovery, declared once for every method that runs it.

:class:`DiscoveryOptions` (the predictors and the scores: every discovery) and
:class:`FederationOptions` (the server-side decision: criterion, test, rule, candidates) are
dataclass mixins: ``RNDClustered(FederationOptions, Algorithm)``,
``RNDDFL(DiscoveryOptions, Gossip)``. Their :attr:`~DiscoveryOptions.rnd_config` builds the
:class:`fedrnd.rnd.RNDConfig` through :func:`rnd_config`, which DisUE also uses for its
``rnd_*`` options (:func:`~fedrnd.algorithms._options.same_option` copies their declarations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedrnd.algorithms._options import option
from fedrnd.rnd.adversarial import AttackConfig
from fedrnd.rnd.config import DISCOVERY_CRITERIA, PROBE_CHOICES, RULES, SIGMAS, RNDConfig
from fedrnd.rnd.defences import STRICT, Defences
from fedrnd.rnd.networks import NETWORKS

DEFENCE_PRESETS: dict[str, Defences] = {"default": Defences(), "strict": STRICT,
                                        "off": Defences(robust="mean")}
"""``defences`` option -> :class:`~fedrnd.rnd.defences.Defences` (``off``: upload validation
only, which discovery always runs)."""

ATTACK_FIELDS = tuple(f.name for f in dataclasses.fields(AttackConfig))


class _Table(dict):
    """A table option that hashes by value (lists become tuples), so the frozen method stays
    hashable (``jax.jit`` hashes the bound ``round``, hence the method)."""

    def __init__(self, items: Mapping[str, Any]):
        super().__init__({k: tuple(v) if isinstance(v, list) else v for k, v in items.items()})

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

RND_CONFIG_FIELDS: dict[str, str] = {
    "network": "network", "input_pool": "input_pool", "rnd_seed": "seed",
    "predictor_epochs": "epochs", "predictor_steps": "steps",
    "predictor_min_steps": "min_steps", "predictor_batch": "batch_size", "predictor_lr": "lr",
    "probe": "probe", "probe_cap": "probe_cap", "eps": "eps", "sigma": "sigma", "rule": "rule",
    "criterion": "criterion", "alpha": "alpha", "min_effect": "min_effect",
    "within_ratio": "within_ratio", "candidates": "candidates", "random_peers": "random_peers"}
"""Discovery option name -> :class:`~fedrnd.rnd.RNDConfig` field."""


def rnd_config(options: Mapping[str, Any], **fixed: Any) -> RNDConfig:
    """The :class:`~fedrnd.rnd.RNDConfig` of discovery options given by their option names
    (:data:`RND_CONFIG_FIELDS`), plus ``fixed`` RNDConfig fields."""
    return RNDConfig(**{RND_CONFIG_FIELDS[k]: v for k, v in options.items()}, **fixed)


def discovery_names(cls: type) -> dict[str, str] | None:
    """The nested ``discovery`` block's keys -> option names of method class ``cls``
    (:func:`fedrnd.algorithms.expand_discovery`), or ``None`` when it runs no discovery: the
    same names for the :class:`DiscoveryOptions` methods, a class's own ``discovery_aliases``
    otherwise (DisUE: ``eps`` -> ``rnd_eps``, ...)."""
    aliases = getattr(cls, "discovery_aliases", None)
    if aliases is not None:
        return dict(aliases)
    if not (isinstance(cls, type) and issubclass(cls, DiscoveryOptions)):
        return None
    extra = ("attack", "defences") if issubclass(cls, FederationOptions) else ("attack",)
    return {k: k for k in (*cls.discovery_options, *extra)}


@dataclasses.dataclass(frozen=True)
class DiscoveryOptions:
    """RND's predictors and scores: the options every discovery shares."""

    discovery_options: ClassVar[tuple[str, ...]] = (
        "network", "input_pool", "predictor_epochs", "predictor_steps", "predictor_min_steps",
        "predictor_batch", "predictor_lr", "probe", "probe_cap", "rnd_seed", "eps", "sigma")
    """The options that make up :attr:`rnd_config`."""

    network: str = option("mlp", choices=("auto", *NETWORKS),
                          doc="RND pair: ``mlp`` (default, images pooled by ``input_pool``), "
                              "``conv`` (the authors' pair) or ``auto`` (conv for images, "
                              "else MLP).")
    input_pool: int | str = option(
        "auto", choices=("auto",), low=1,
        doc="Average-pool images by this factor first (1: full resolution; ``auto``: 2 for "
            "the MLP pair on images of 28 x 28 pixels or more, else 1).")
    predictor_epochs: int = option(10, low=1, doc="Predictor training epochs (Adam; the "
                                                  "paper's 10).")
    predictor_steps: int | None = option(None, low=1, doc="Predictor steps, replacing the "
                                                          "epochs when set.")
    predictor_min_steps: int | None = option(
        300, low=1, doc="At least this many predictor steps when the epochs come to fewer "
                        "(small clients; unset: the paper's schedule as is; see "
                        "``RNDConfig.min_steps``).")
    predictor_batch: int = option(128, low=1, doc="Predictor batch size (the paper's 128).")
    predictor_lr: float = option(1e-3, low=0, low_open=True, finite=True,
                                 doc="Predictor learning rate (Adam; the paper's 1e-3).")
    probe: str = option("auto", choices=PROBE_CHOICES,
                        doc="Examples a client scores predictors on: ``auto`` (``holdout`` "
                            "for the test criterion, ``train`` for ``eps``), ``train``, "
                            "``holdout`` or ``test``.")
    probe_cap: int | None = option(None, low=1, doc="At most this many probe examples per "
                                                    "client (unset: all).")
    rnd_seed: int = option(0, doc="The global seed of the frozen target.")
    eps: float | str = option("auto", choices=("auto",), low=0, finite=True,
                              doc="The ``eps`` rule's tolerance (Eq. 9), or ``auto`` "
                                  "(:func:`fedrnd.rnd.auto_eps`).")
    sigma: str = option("row", choices=SIGMAS,
                        doc="The ``eps`` rule's scale: ``row`` (std of the novelty row) or "
                            "``self``.")
    attack: dict[str, Any] | None = option(
        None, allow_none=True,
        doc="Adversarial clients in discovery (the threat model's harness, "
            "``docs/methods/threat-model.md``): a table of "
            ":class:`fedrnd.rnd.adversarial.AttackConfig` fields, e.g. ``{row = \"zeros\", "
            "fraction = 0.05}`` or ``{predictor = \"other_group\", target_group = 0, "
            "clients = [3, 7]}``; the named clients upload what the strategy says. The run's "
            "``attack.json`` says where each attacker was admitted. Unset: every client honest.")

    def __post_init__(self):
        if isinstance(self.attack, Mapping) and not isinstance(self.attack, _Table):
            object.__setattr__(self, "attack", _Table(self.attack))
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    @property
    def rnd_config(self) -> RNDConfig:
        """The :class:`~fedrnd.rnd.RNDConfig` of these options."""
        return rnd_config({k: getattr(self, k) for k in self.discovery_options})

    @property
    def attack_config(self) -> AttackConfig | None:
        """The :class:`~fedrnd.rnd.adversarial.AttackConfig` of ``attack`` (``None``: none)."""
        if self.attack is None:
            return None
        if not isinstance(self.attack, Mapping):
            raise ValueError(f"{self.name} attack must be a table of AttackConfig fields "  # type: ignore[attr-defined]
                             f"({list(ATTACK_FIELDS)}), got {self.attack!r}")
        bad = sorted(set(self.attack) - set(ATTACK_FIELDS))
        if bad:
            raise ValueError(f"{self.name} attack: unknown field(s) {bad}; allowed: "  # type: ignore[attr-defined]
                             f"{list(ATTACK_FIELDS)}")
        try:
            return AttackConfig(**self.attack)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name} attack: {e}") from None  # type: ignore[attr-defined]

    def attack_report(self, federation: np.ndarray, group: np.ndarray) -> dict[str, Any]:
        """Where the attackers of ``attack`` landed (``{}`` without attack): their ids, each
        one's federation, and :func:`fedrnd.rnd.adversarial.outcome` against the true
        groups (honest ARI, whether two groups merged, who was admitted to the target)."""
        from fedrnd.rnd.adversarial import outcome

        attack = self.attack_config
        if attack is None:
            return {}
        att = attack.attackers(np.asarray(group))
        fed = np.asarray(federation)
        res = outcome(fed, np.asarray(group), att, attack.target_group)
        return {"strategy": attack.name, "attackers": [int(a) for a in att],
                "federation_of": {str(int(a)): int(fed[a]) for a in att}, **res}

    def validate(self, data) -> None:
        super().validate(data)  # type: ignore[misc]
        self.rnd_config.pair(data.feature_shape)  # raises for a conv pair on vector data
        attack = self.attack_config
        if attack is not None:
            attack.attackers(np.asarray(data.group))  # ids in range, targets present


@dataclasses.dataclass(frozen=True)
class FederationOptions(DiscoveryOptions):
    """Server-side discovery: the compatibility criterion and how federations are formed."""

    discovery_options: ClassVar[tuple[str, ...]] = (
        *DiscoveryOptions.discovery_options, "criterion", "alpha", "min_effect", "within_ratio",
        "candidates", "random_peers", "rule")

    criterion: str = option(
        "test", choices=DISCOVERY_CRITERIA,
        doc="``test`` (the paired held-out test with Benjamini-Hochberg and average-linkage "
            "federations, :class:`fedrnd.rnd.RNDConfig`) or ``eps`` (the paper's rule, Eq. 9, "
            "with ``eps``, ``sigma`` and ``rule``).")
    alpha: float = option(0.05, low=0, high=1, low_open=True, high_open=True,
                          doc="The test's level.")
    min_effect: float = option(0.025, low=0, finite=True,
                               doc="The smallest log novelty ratio that counts as a "
                                   "difference (test).")
    within_ratio: float = option(0.3, low=0, low_open=True,
                                 doc="The homogeneity a split must reach (test; ``inf``: no "
                                     "check).")
    candidates: int | None = option(
        None, low=1, doc="Two-stage discovery for large populations: each client scores only "
                         "its ``candidates`` nearest peers by fingerprint plus "
                         "``random_peers`` random ones (unset: every pair).")
    random_peers: int = option(4, low=0, doc="Random extra candidates per client (two-stage "
                                             "discovery).")
    rule: str = option("mutual", choices=RULES,
                       doc="Federations under the ``eps`` criterion: ``mutual``, ``one_sided`` "
                           "or ``leader``.")
    defences: str = option("default", choices=tuple(DEFENCE_PRESETS),
                           doc="Discovery's defences against lying clients: ``default`` "
                               "(validation and the per-direction clip), ``strict`` (also "
                               "replay detection and majority consent, dense discovery) or "
                               "``off`` (validation only).")

    @property
    def discovery_defences(self) -> Defences:
        """The :class:`~fedrnd.rnd.defences.Defences` of ``defences``."""
        return DEFENCE_PRESETS[self.defences]
