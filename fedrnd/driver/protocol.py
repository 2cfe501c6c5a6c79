"""The evaluation protocol the driver applies to every method at the end of a run.

Besides the plain evaluation (each client scored with the model ``Algorithm.models`` gives it),
a run with ``finetune = true`` also reports every figure after a final local fine-tuning step
(:mod:`fedrnd.engine.finetune`): each client trains its evaluated model for
``finetune_epochs`` epochs with its own optimizer and learning rate, then is scored. Keys carry
an ``_ft`` suffix on the metric name (``test_acc_ft/mean``, ``test_acc_ft/worst10``, ...), so
"FedAvg + fine-tune" is the ``fedavg`` run's ``test_acc_ft`` figures. The fine-tuning key is
the same for every method of a seed (:func:`fedrnd.engine.finetune_key`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from fedrnd.data.federated import FederatedData
from fedrnd.engine import ClientHParams, finetune_evaluate, finetune_key, summarize
from fedrnd.engine.multihost import to_host


def finetune_results(cfg: Any, alg: Any, state: Any, data: FederatedData, hp: ClientHParams
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``(per_client, summary)`` of the fine-tune evaluation, both empty when it is off.

    ``per_client``: ``{train,test}_{loss,acc}_ft`` ``[C]``; ``summary``: the same
    aggregates as the plain evaluation with ``_ft`` names, plus ``finetune_time`` (seconds,
    compilation included).
    """
    if not getattr(cfg, "finetune", False):
        return {}, {}
    epochs = int(cfg.finetune_epochs)
    engine = alg.engine
    fn = jax.jit(lambda s, d, h, k: finetune_evaluate(engine, *alg.models(s), d, h, k, epochs,
                                                      cfg.eval_batch))
    t0 = time.perf_counter()
    # to_host: scores and counts may be spread over several processes (multi-host runs).
    scores = {k: np.asarray(v) for k, v in
              to_host(fn(state, data, hp, finetune_key(cfg.seed))).items()}
    seconds = time.perf_counter() - t0
    summary = summarize(scores, to_host(data.train_count), to_host(data.test_count),
                        to_host(data.group))
    summary = {k.replace("/", "_ft/", 1): v for k, v in summary.items()}
    summary["finetune_time"] = seconds
    return {f"{k}_ft": v for k, v in scores.items()}, summary
