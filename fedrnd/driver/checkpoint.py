"""Checkpoints with orbax: the method's whole state plus the driver's host-side counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of one method's run in ``directory``."""

    def __init__(self, directory: Path, max_to_keep: int = 2):
        self._mgr = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            # Declared up front so a new process can read a checkpoint's metadata (shapes).
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
        self._mgr.wait_until_finished()

    def restore(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the latest checkpoint into the structure of ``like``.

        ``like`` holds arrays or ``jax.ShapeDtypeStruct`` leaves (an abstract state such as
        :meth:`Algorithm.init_template`, so nothing has to be computed to resume); its pytree
        structure and dtypes are used, and its shardings where it has them (otherwise the
        arrays land on the default device and the caller places them). Shapes come from the
        checkpoint, not from ``like``: a method whose host hook grew its cluster slots mid-run
        restores with the grown shapes.
        """
        step = self._mgr.latest_step()
        if step is None:
            raise FileNotFoundError("no checkpoint to resume from")
        stored = _leaves_by_path(self._mgr.item_metadata(step)["state"])
        named, treedef = jax.tree_util.tree_flatten_with_path(like)
        leaves = [x for _, x in named]
        names = [_path_name(p) for p, _ in named]
        if sorted(names) == sorted(stored):
            # Pair by path: the stored tree holds named tuples (a Graph, ClientHParams) as
            # dicts whose leaves come in key order, not in field order.
            stored = [stored[n] for n in names]
        else:
            stored = list(stored.values())
        if len(stored) != len(leaves):
            raise ValueError("the checkpoint does not match this method's state; was the config "
                             "changed since the run was interrupted?")
        abstract = jax.tree.unflatten(treedef, [
            ocp.utils.to_shape_dtype_struct(x) if tuple(m.shape) == tuple(x.shape)
            else jax.ShapeDtypeStruct(tuple(m.shape), x.dtype)
            for m, x in zip(stored, leaves, strict=True)])
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self._mgr.close()


def _path_name(path: tuple) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """``{dotted path: leaf}`` in flattening order."""
    return {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
