"""Run directories that never lose a user's data, honest resume, and the status file.

Rules (docs/getting-started.md, "Run directories", says the same):

- A run directory is ``<out_dir>/<name>`` (or ``--run-dir``). ``name`` is one path component:
  not empty, not ``.`` or ``..``, no ``/`` or ``\\``.
- A new run refuses a directory that exists and is not empty. ``--resume`` continues it;
  ``--overwrite`` moves the earlier run aside to ``<name>.old-<n>`` (never deletes it). A
  directory with content that is not a fedrnd run (no ``config.json`` or ``status.json``) is
  refused even with ``--overwrite``: fedrnd never writes into it.
- Nothing is written before the whole config, the data and every method's options are
  validated (:func:`preflight` reads only; :func:`prepare` is the first write).
- ``--resume`` compares the resolved config with the stored ``config.json`` and refuses any
  difference that can change the computation, listing the fields. Fields in
  :data:`FREE_FIELDS` (logging, where outputs go) may always change; fields in
  :data:`ALLOWABLE_FIELDS` (evaluation cadence, chunking, extending ``rounds``) only with
  ``--allow-change FIELD``.
- ``status.json`` says ``running``, ``finished``, ``failed`` or ``interrupted``, with the
  method and round, the reason of a failure, and warnings; every result file is written to a
  temporary name and renamed (:func:`atomic_write`), so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

STATUS = "status.json"
STATES = ("running", "finished", "failed", "interrupted")

FREE_FIELDS = frozenset({"name", "out_dir", "progress", "tensorboard", "loggers",
                         "coordinator", "process_id", "plugins"})
"""Fields that never change what a run computes: a resume accepts new values silently.
(``plugins`` says where code is loaded from; what the run computes with it, the names and
options it registers, is in the other fields.)"""

ALLOWABLE_FIELDS = frozenset({"eval_every", "checkpoint_every", "eval_batch", "memory_limit",
                              "chunk_size", "autotune", "num_devices", "num_processes",
                              "finetune", "finetune_epochs", "rounds", "divergence.action"})
"""Fields a resume may change with ``--allow-change FIELD``: they change evaluation, logging,
how clients are laid out over chunks and devices (results do not depend on it: client keys are
``fold_in(key, client_id)``), or extend a run by more rounds (refused when the learning-rate
schedule depends on ``rounds``)."""


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (the CLI exits with code 2)."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; ``round`` is where ``--resume`` continues."""

    def __init__(self, run_dir: Path, method: str | None, round_: int, checkpointed: bool):
        self.run_dir, self.method, self.round, self.checkpointed = run_dir, method, round_, \
            checkpointed
        where = f" of {method}" if method else ""
        how = ("continue with --resume" if checkpointed else
               "no checkpoint to continue from (checkpoint_every = 0 or none written yet); "
               "--resume starts this method again")
        super().__init__(f"interrupted at round {round_}{where} ({run_dir}); {how}")


class Diverged(FloatingPointError):
    """Training diverged (``[divergence]``): the run stops with status ``failed``."""


# --------------------------------------------------------------------------------------------
# names and atomic writes
# --------------------------------------------------------------------------------------------


def check_name(name: str) -> None:
    """``name`` must be one path component, so a run stays inside ``out_dir``."""
    bad = (not isinstance(name, str) or not name.strip() or name in (".", "..")
           or any(c in name for c in "/\\\0") or os.path.isabs(name))
    if bad:
        raise RunDirError(
            f"config: name = {name!r} is not a usable run name; the run directory is "
            "out_dir/name, so name must be one non-empty path component (letters, digits, "
            "'-', '_', '.'; not '.', '..', and no '/' or '\\'), e.g. --set name=my-run")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kw: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    A crash or an exception leaves ``path`` as it was (the temporary file is removed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------------------------
# config fingerprints and differences
# --------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"local.lr": 0.1, "algorithms.0.name": "fedavg", ...}`` of nested plain data."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list | tuple) and tree and any(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = list(tree) if isinstance(tree, tuple) else tree
    return out


def computation_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without :data:`FREE_FIELDS` (what a run's results depend on)."""
    return {k: v for k, v in flatten(config).items() if k.split(".")[0] not in FREE_FIELDS}


def config_hash(config: dict[str, Any]) -> str:
    """A short fingerprint of :func:`computation_fields`, stored with every checkpoint."""
    text = json.dumps(computation_fields(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any],
                defaults: dict[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` for every computation field that differs.

    ``defaults``: a default config; a field the stored config lacks (written by an older
    fedrnd, before the field existed) counts as its default."""
    a, b = computation_fields(old), computation_fields(new)
    if defaults is not None:
        a = {**{k: v for k, v in computation_fields(defaults).items()
                if not k.startswith("algorithms.") and not _overlaps(k, a)}, **a}
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def _overlaps(key: str, flat: dict[str, Any]) -> bool:
    """Whether ``key`` or a field inside it or around it is in ``flat``."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in flat)


def _show(v: Any) -> str:
    return "(unset)" if v is None or type(v) is object else repr(v)


def _allowed(field: str, allow: set[str]) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow)


def check_resume(stored: dict[str, Any], new: dict[str, Any], allow: list[str] | tuple = (),
                 where: Path | None = None, defaults: dict[str, Any] | None = None
                 ) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose config changes the computation; return the accepted changes.

    ``allow``: fields the user allowed to change (each must be in :data:`ALLOWABLE_FIELDS`).
    """
    bad_allow = sorted(a for a in allow if a not in ALLOWABLE_FIELDS)
    if bad_allow:
        raise RunDirError(
            f"--allow-change {', '.join(bad_allow)}: only fields that cannot change what the "
            f"run computes may change on resume; allowed: {', '.join(sorted(ALLOWABLE_FIELDS))}")
    diff = config_diff(stored, new, defaults)
    refused = [d for d in diff if not _allowed(d[0], set(allow))]
    if "rounds" in allow and any(d[0] == "rounds" for d in diff):
        sched = new.get("local", {})
        name, opts = sched.get("schedule"), sched.get("schedule_options", {})
        follows = (name == "cosine" and "rounds" not in opts) or (isinstance(name, dict) and any(
            v == "cosine" and "rounds" not in opts.get(k, {}) for k, v in name.items()))
        if follows:
            refused.append(("rounds (the cosine schedule's length follows rounds)",
                            stored.get("rounds"), new.get("rounds")))
    if refused:
        shown = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in refused[:12])
        more = f" and {len(refused) - 12} more" if len(refused) > 12 else ""
        place = f" in {where}" if where is not None else ""
        raise RunDirError(
            f"--resume refused: the config differs from the run{place} in field(s) that change "
            f"the computation ({shown}{more}). Resume with the run's own config (its "
            "config.json), start a new run with another name (--set name=NEW), or replace it "
            "with --overwrite (the old run is moved aside, not deleted). Fields that only "
            "change evaluation, logging or layout can be allowed with --allow-change FIELD: "
            f"{', '.join(sorted(ALLOWABLE_FIELDS))}.")
    return diff


# --------------------------------------------------------------------------------------------
# the directory itself
# --------------------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / STATUS).is_file()


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _alive(status: dict[str, Any]) -> bool:
    """Whether the process that wrote a ``running`` status is still running on this host."""
    if status.get("state") != "running" or status.get("host") != socket.gethostname():
        return False
    pid = status.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def preflight(path: Path, *, resume: bool, overwrite: bool, config: dict[str, Any],
              allow_change: list[str] | tuple = (), defaults: dict[str, Any] | None = None
              ) -> tuple[str, list[tuple[str, Any, Any]]]:
    """Decide what to do with ``path`` without writing anything.

    Returns ``(decision, changes)``: ``"new"`` (absent or empty), ``"resume"`` or
    ``"overwrite"``, and on resume the accepted config changes; raises :class:`RunDirError`
    with the way out when the directory cannot be used as asked.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the "
                          "run in its directory, --overwrite moves it aside and starts afresh")
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "run directory" if p == path else "out_dir (or --out)"
            raise RunDirError(f"{what} {p} is an existing file, not a directory; choose another "
                              "--out, --run-dir or name")
    if allow_change and not resume:
        raise RunDirError("--allow-change only applies with --resume")
    empty = not path.exists() or not any(path.iterdir())
    if empty:
        return "new", []
    if not is_run_dir(path):
        raise RunDirError(
            f"run directory {path} is not empty and holds no fedrnd run (no config.json or "
            f"{STATUS}); fedrnd never writes into or moves a directory with other content. "
            "Choose another --run-dir, or another name with --set name=NEW")
    status = read_status(path) or {}
    if _alive(status):
        raise RunDirError(f"run directory {path} is in use by process {status['pid']} (status "
                          "running); wait for it or stop it before resuming or replacing it")
    state = status.get("state", "unknown")
    if resume:
        stored_file = path / "config.json"
        changes: list[tuple[str, Any, Any]] = []
        if stored_file.is_file():
            try:
                stored = json.loads(stored_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RunDirError(f"--resume: cannot read {stored_file}: {e}") from None
            changes = check_resume(stored, config, allow_change, path, defaults)
        return "resume", changes
    if overwrite:
        return "overwrite", []
    raise RunDirError(
        f"run directory {path} already holds a run (status: {state}); fedrnd does not replace "
        "it silently. Continue it with --resume, choose another name with --set name=NEW (or "
        "--run-dir), or replace it with --overwrite (the earlier run is moved to "
        f"{aside_name(path).name}, never deleted)")


def aside_name(path: Path) -> Path:
    """The first free ``<name>.old-<n>`` beside ``path``."""
    n = 1
    while (path.parent / f"{path.name}.old-{n}").exists():
        n += 1
    return path.parent / f"{path.name}.old-{n}"


def prepare(path: Path, decision: str) -> Path | None:
    """Make ``path`` ready (the first write of a run); returns where an old run was moved."""
    moved = None
    if decision == "overwrite" and path.exists():
        moved = aside_name(path)
        os.replace(path, moved)
    path.mkdir(parents=True, exist_ok=True)
    return moved


class Status:
    """``status.json`` of one run, rewritten atomically on every change."""

    def __init__(self, run_dir: Path, config: dict[str, Any], *, resumed: bool = False,
                 changes: list[tuple[str, Any, Any]] | None = None, moved: Path | None = None):
        self.path = Path(run_dir) / STATUS
        old = read_status(run_dir) if resumed else None
        now = _now()
        self.info: dict[str, Any] = {
            "state": "running", "method": None, "round": 0, "rounds": config.get("rounds"),
            "reason": None, "warnings": [], "config_hash": config_hash(config),
            "started": (old or {}).get("started", now), "updated": now,
            "pid": os.getpid(), "host": socket.gethostname(),
            "attempts": [*(old or {}).get("attempts", []),
                         {"started": now, "resumed": resumed,
                          "changed": {k: [a, b] for k, a, b in (changes or [])} or None}],
        }
        if moved is not None:
            self.info["replaced_run_moved_to"] = str(moved)

    def update(self, **kw: Any) -> None:
        self.info.update(kw, updated=_now())
        write_json(self.path, self.info)

    def warn(self, message: str) -> None:
        self.info["warnings"].append(message)
        self.update()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
