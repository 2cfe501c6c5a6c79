"""Sphinx extension of the fedrnd docs: the config reference from the code, repository links.

Directives (used in ``docs/reference/config.md``):

``{fedrnd-config-fields}``
    One table per config section (``Config``, ``DataConfig``, ...), from the dataclasses of
    :mod:`fedrnd.driver.config`: every field's TOML path, type and default as the code has
    them. A field's meaning is its ``metadata["doc"]`` when the code declares one, else the
    entry for its path in :data:`FIELD_DOCS` below. The build fails (a warning, and the docs
    build runs with ``-W``) when a field has no meaning or :data:`FIELD_DOCS` names a field the
    code no longer has, so the reference cannot drift from the code.

``{fedrnd-registry}`` with argument ``sources``, ``partitions``, ``models``, ``optimizers``
or ``algorithms``
    Every registered name with the first line of its docstring and its options with their
    defaults (:func:`fedrnd.driver.config.source_parameters` and friends, the same functions
    that validate a config). For algorithms the options come from
    :func:`fedrnd.driver.config.algorithm_parameters` and each option's meaning from its
    declaration (``fedrnd.algorithms.option(..., doc=...)``,
    :func:`fedrnd.algorithms.option_doc`); a plug-in's method without declarations falls back to an ``Options:`` block of its class
    docstrings. The build fails when an option has neither.

Links from a page to a repository file outside ``docs/`` (``[RESULTS](../experiments/...)``)
are kept as they are written, so they also work when the Markdown is read on a code host;
the HTML build turns them into links to ``fedrnd_repo_url/<path>`` when that is set, else
into links to a copy of the file under ``_repo/`` in the built site.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import typing
from pathlib import Path, PurePosixPath
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# Meanings of the config fields (used where the code's field has no metadata["doc"])
# ------------------------------------------------------------------------------------------

FIELD_DOCS: dict[str, str] = {
    "name": "Run name; outputs go to ``out_dir/name``. One path component.",
    "rounds": "Communication rounds (>= 1).",
    "seed": "Seeds the data split, the model initialisation (the same for every method) and "
            "every round's key.",
    "cohort_size": "Clients sampled per round (unset: all clients every round).",
    "eval_every": "Evaluate every this many rounds, and after the last.",
    "checkpoint_every": "Orbax checkpoint every this many rounds (0: never); ``--resume`` "
                        "continues from the last one.",
    "out_dir": "Output root; a run writes into ``out_dir/name``.",
    "chunk_size": "Clients per vmapped chunk on a device (unset: the backend default, "
                  "or the autotuned size with ``autotune = true``).",
    "num_devices": "Devices the client axis is sharded over (multi-host: always all).",
    "eval_batch": "Evaluate in batches of this many examples (0: a client's whole set at "
                  "once).",
    "tensorboard": "Also write TensorBoard logs (``pip install -e \".[tensorboard]\"``).",
    "progress": "Progress of rounds, RND discovery and compilation: a bar on a terminal, a "
                "timed line every 10 s in a log file (``--no-progress`` or ``false``: "
                "silent).",
    "finetune": "Also evaluate after every client fine-tunes its model (``_ft`` figures; "
                "the fine-tune protocol).",
    "finetune_epochs": "Local epochs of that fine-tuning.",
    "autotune": "Time chunk sizes on the first run of a workload and cache the fastest "
                "(only with ``chunk_size`` unset).",
    "memory_limit": "Bytes per device for the memory planner (``\"8GiB\"``, ``\"512MB\"``, an "
                    "integer, or ``\"off\"``); unset: the device's free memory.",
    "coordinator": "Multi-host: process 0's ``host:port``.",
    "num_processes": "Multi-host: number of processes (0: detect them from the cluster "
                     "environment).",
    "process_id": "Multi-host: this process's rank.",
    "data": "The ``[data]`` table below.",
    "model": "The ``[model]`` table below.",
    "local": "The ``[local]`` table below.",
    "divergence": "The ``[divergence]`` table below.",
    "algorithms": "The methods compared on the same data: ``[[algorithms]]`` tables (below) "
                  "or a list of names.",
    "data.source": "Data set: a registered source (list below) or ``tfds:<name>``.",
    "data.source_options": "Options of the source (list below), e.g. ``data_dir``.",
    "data.partition": "How the data is split over clients (list below).",
    "data.partition_options": "Options of the partition (list below).",
    "data.num_clients": "Number of clients.",
    "data.drift": "Optional ``[data.drift]`` table: clients switch group mid-run.",
    "data.drift.at_round": "Round (or list of rounds) after which clients move.",
    "data.drift.fraction": "Share of the clients that move.",
    "data.drift.clients": "Or the ids of the clients that move.",
    "data.drift.seed": "Seed of the drift's random choices (unset: the run's seed).",
    "model.name": "Task model (list below).",
    "model.options": "Options of the model (list below).",
    "local.batch_size": "Examples per local step.",
    "local.epochs": "Local epochs per round.",
    "local.steps": "If set, exactly this many local steps per round instead of epochs.",
    "local.optimizer": "One optimizer kind, a mix ``{sgd = 0.5, adam = 0.5}`` (shares of the "
                       "clients) or one kind per ground-truth group ``[\"sgd\", \"adam\"]``; "
                       "a kind may be ``\"optax:<name>\"``, any optax optimizer "
                       "(``\"optax:adamw\"``), or one registered with "
                       "``fedrnd.register_optimizer``.",
    "local.lr": "Learning rate: one value or one per optimizer kind.",
    "local.prox_mu": "Proximal weight of ``prox_sgd`` clients.",
    "local.optimizer_options": "Optimizer settings, e.g. ``{momentum = 0.9, weight_decay = "
                               "1e-4}``; ``clip_norm`` clips every kind's gradients to that "
                               "global norm.",
    "local.optax_options": "Keywords of the ``optax:<name>`` optimizers, e.g. "
                           "``{weight_decay = 1e-4}`` for all of them, or "
                           "``{\"optax:lion\" = {b1 = 0.95}}`` for one kind alone.",
    "local.schedule": "Learning-rate multiplier over rounds: ``constant``, ``exponential``, "
                      "``cosine``, ``step`` or ``\"optax:<name>\"``, any optax schedule "
                      "evaluated at the round index.",
    "local.schedule_options": "Options of the schedule (an optax schedule's keywords).",
    "local.path": "Local training path: ``auto`` (the exact low-rank fast path where it "
                  "applies and pays), ``general`` or ``lowrank`` (forced).",
    "local.loss": "Training loss of the clients: ``cross_entropy`` (softmax cross-entropy) or "
                  "``mse`` (squared error of the outputs against one-hot labels); any other "
                  "loss is a Python function, ``Engine(loss=...)``.",
    "divergence.action": "``stop`` (status ``failed``), ``warn`` or ``off``.",
    "divergence.loss_factor": "Diverged when the mean training loss exceeds this times "
                              "max(ln classes, 1).",
    "divergence.chance_margin": "Diverged when test accuracy falls back to within this of "
                                "chance after having been above it.",
    "algorithms.name": "A registered method (list below).",
    "algorithms.options": "The method's options (list below).",
    "algorithms.label": "Name of the method in outputs (default: ``name``); two entries of "
                        "one method need different labels.",
}

SECTIONS = (("", "Config"), ("data.", "DataConfig"), ("data.drift.", "DriftConfig"),
            ("model.", "ModelConfig"), ("local.", "LocalConfig"),
            ("divergence.", "DivergenceConfig"), ("algorithms.", "AlgorithmConfig"))
"""Config sections in the order they are listed: TOML prefix and dataclass name."""

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _type_text(hint: Any) -> str:
    text = inspect.formatannotation(hint)
    return re.sub(r"\b(?:fedrnd\.[\w.]+\.|typing\.)", "", text)


def _default_text(field: dataclasses.Field) -> str:
    from fedrnd.driver.config import toml_value

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        return "unset"
    if dataclasses.is_dataclass(value):
        return "table"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return ", ".join(toml_value(getattr(v, "name", str(v))) for v in value)
    try:
        return toml_value(value)
    except ValueError:
        return repr(value)


def _literal(text: str) -> str:
    return "``" + text.replace("`", "'") + "``" if text else ""


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    para = doc.split("\n\n")[0]
    return " ".join(para.split())


def _option_docs(cls: type) -> dict[str, str]:
    """Option name -> meaning, from ``Options`` blocks of the docstrings along the MRO (for
    methods that do not declare their options with ``fedrnd.algorithms.option``)."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        lines = inspect.cleandoc(klass.__dict__.get("__doc__") or "").splitlines()
        block = _options_block(lines)
        if block is None:
            continue
        for names, _, text in block[2]:
            for n in names:
                out.setdefault(n, text)
    return out


def _mentioned(opt: str, docs: dict[str, str]) -> str:
    """The clause ``opt (...): text;`` inside another option's text, for options documented
    in passing (``probe_cap: at most ...`` within ``probe``)."""
    for text in docs.values():
        m = re.search(rf"\b{re.escape(opt)}\b(?:\s*\([^)]*\))?:\s*([^;]*)", text)
        if m:
            return m.group(1).strip().rstrip(".") + "."
    return ""


def _table(header: list[str], rows: list[list[str]], widths: list[int]) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1",
             "   :widths: " + " ".join(str(w) for w in widths), ""]
    for row in [header, *rows]:
        for i, cell in enumerate(row):
            lead = "   * - " if i == 0 else "     - "
            lines.append(lead + (cell if cell else "\\ "))
    return lines + [""]


# ------------------------------------------------------------------------------------------
# directives
# ------------------------------------------------------------------------------------------


class _RstDirective(SphinxDirective):
    def render(self, lines: list[str]) -> list[nodes.Node]:
        """Parse generated reST; inside a MyST page, through MyST's ``eval-rst``."""
        if type(self.state).__module__.startswith("myst_parser"):
            lines = ["````{eval-rst}", *lines, "````"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]),
                                self.content_offset, container)
        return container.children


class ConfigFields(_RstDirective):
    """Tables of every config field: path, type, default, meaning."""

    def run(self) -> list[nodes.Node]:
        from fedrnd.driver import config as config_mod

        lines: list[str] = []
        seen: set[str] = set()
        for prefix, cls_name in SECTIONS:
            cls = getattr(config_mod, cls_name)
            hints = typing.get_type_hints(cls)
            title = {"": "Top level", "algorithms.": "[[algorithms]]"}.get(
                prefix, f"[{prefix.rstrip('.')}]")
            lines += [f".. rubric:: {title} (``{cls_name}``)", ""]
            doc = inspect.getdoc(cls) or ""
            if doc:
                lines += [*doc.splitlines(), ""]
            rows = []
            for f in dataclasses.fields(cls):
                path = prefix + f.name
                seen.add(path)
                meaning = f.metadata.get("doc") or FIELD_DOCS.get(path)
                if not meaning:
                    logger.warning(f"fedrnd config reference: field {path!r} has no meaning: "
                                   "give it metadata['doc'] in fedrnd/driver/config.py or an "
                                   "entry in FIELD_DOCS (docs/_ext/fedrnd_reference.py)",
                                   location=self.get_location())
                    meaning = ""
                rows.append([_literal(path), _literal(_type_text(hints.get(f.name, Any))),
                             _literal(_default_text(f)), meaning])
            lines += _table(["field", "type", "default", "meaning"], rows, [22, 22, 16, 40])
        stale = sorted(set(FIELD_DOCS) - seen)
        if stale:
            logger.warning(f"fedrnd config reference: FIELD_DOCS names fields the code does not "
                           f"have: {stale}", location=self.get_location())
        return self.render(lines)


class Registry(_RstDirective):
    """Every registered source, partition, model or algorithm with its options."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from fedrnd.driver import config as cfg

        kind = self.arguments[0]
        lines: list[str] = []
        if kind == "sources":
            from fedrnd.data.sources import SOURCES, tfds_source

            entries = [(n, f, cfg.source_parameters(n)) for n, f in SOURCES.items()]
            entries.append(("tfds:<name>", tfds_source, cfg.source_parameters("tfds:x")))
        elif kind == "partitions":
            from fedrnd.data.partition import PARTITIONS

            entries = [(n, f, cfg.partition_parameters(n)) for n, f in PARTITIONS.items()]
        elif kind == "models":
            from fedrnd.models import MODELS

            entries = [(n, f, cfg.model_parameters(n)) for n, f in MODELS.items()]
        elif kind == "algorithms":
            return self.render(self._algorithms())
        elif kind == "optimizers":
            return self.render(self._optimizers())
        else:
            raise self.error(f"unknown registry {kind!r}: sources, partitions, models, "
                             "optimizers or algorithms")
        rows = [[_literal(name), _first_line(fn),
                 ", ".join(_literal(o) for o in cfg.option_items(params)) or "none"]
                for name, fn, params in entries]
        lines += _table(["name", "what", "options (defaults)"], rows, [16, 50, 34])
        return self.render(lines)

    def _optimizers(self) -> list[str]:
        from fedrnd.driver.config import OPTIMIZER_OPTIONS, SCHEDULE_OPTIONS
        from fedrnd.engine import OPTIMIZERS, SERVER_OPTIMIZERS
        from fedrnd.engine.optim import optax_optimizers, optax_schedules

        def names(xs) -> str:
            return ", ".join(_literal(x) for x in xs)

        schedules = "; ".join(f"``{k}``" + (f" ({names(v)})" if v else "")
                              for k, v in SCHEDULE_OPTIONS.items())
        return [f"* ``local.optimizer`` kinds: {names(OPTIMIZERS)}, or ``optax:<name>`` for "
                f"{names(optax_optimizers())} (keywords in ``local.optax_options``).",
                f"* ``local.optimizer_options`` keys: {names(OPTIMIZER_OPTIONS)}.",
                f"* ``local.schedule`` (its ``local.schedule_options``): {schedules}; or "
                f"``optax:<name>`` for {names(optax_schedules())}.",
                f"* FedAvg's ``server_opt``: {names(SERVER_OPTIMIZERS)}.", ""]

    def _algorithms(self) -> list[str]:
        from fedrnd.algorithms import ALGORITHMS, option_doc
        from fedrnd.driver.config import algorithm_parameters, toml_value

        lines: list[str] = []
        for name, cls in ALGORITHMS.items():
            docs = _option_docs(cls)
            lines += [f".. rubric:: ``{name}``", "", _first_line(cls) + f" (``{cls.__module__}."
                      f"{cls.__qualname__}``)", ""]
            rows = []
            for opt, p in algorithm_parameters(name).items():
                if p.default is inspect.Parameter.empty:
                    default = "(required)"
                elif p.default is None:
                    default = "unset"
                else:
                    try:
                        default = toml_value(p.default)
                    except ValueError:
                        default = repr(p.default)
                meaning = option_doc(cls, opt) or docs.get(opt, "") or _mentioned(opt, docs)
                if not meaning:
                    logger.warning(f"fedrnd config reference: option {opt!r} of algorithm "
                                   f"{name!r} has no meaning: declare it with "
                                   f"fedrnd.algorithms.option(..., doc=...)",
                                   location=self.get_location())
                rows.append([_literal(opt), _literal(_type_text(p.annotation)),
                             _literal(default), meaning])
            if rows:
                lines += _table(["option", "type", "default", "meaning"], rows, [18, 20, 14, 48])
            else:
                lines += ["No options.", ""]
        return lines


# ------------------------------------------------------------------------------------------
# links to repository files
# ------------------------------------------------------------------------------------------


def _repo_target(app: Sphinx, docname: str, target: str) -> str | None:
    """The repository path a page's relative link points at, when it is a file outside
    the docs folder that exists; else ``None``."""
    if not target or "://" in target or target.startswith(("#", "mailto:")):
        return None
    path = target.split("#")[0]
    if not path:
        return None
    srcdir = Path(app.srcdir).resolve()
    root = srcdir.parent
    if path.startswith("/"):
        # MyST resolves a link to a Markdown file outside the docs to an absolute path
        # without its suffix.
        found = [Path(path + s) for s in (".md", ".ipynb", ".rst", "") if Path(path + s).exists()]
        if not found:
            return None
        full = found[0].resolve()
    else:
        full = ((srcdir / docname).parent / path).resolve()
    try:
        full.relative_to(srcdir)
        return None  # inside the docs: Sphinx handles it
    except ValueError:
        pass
    try:
        rel = full.relative_to(root)
    except ValueError:
        return None
    if not full.is_file():
        return None  # a missing file or a folder: left to Sphinx, which warns
    return PurePosixPath(rel).as_posix()


def _rendered_page(app: Sphinx, rel: str) -> str | None:
    """The site page built from a repository file, for the notebooks copied into the docs."""
    path = PurePosixPath(rel)
    if path.parts[:1] == ("notebooks",) and path.suffix == ".ipynb":
        docname = f"notebooks/{path.stem}"
        if docname in app.env.found_docs:
            return docname
    return None


def _rewrite_repo_links(app: Sphinx, doctree: nodes.document) -> None:
    from sphinx import addnodes

    docname = app.env.docname
    found = app.env.fedrnd_repo_files if hasattr(app.env, "fedrnd_repo_files") else set()
    for node in list(doctree.findall(lambda n: isinstance(
            n, addnodes.pending_xref | addnodes.download_reference))):
        target = node.get("reftarget", "")
        rel = _repo_target(app, docname, target)
        if rel is None:
            continue
        anchor = (target.split("#", 1)[1] if "#" in target else "") or node.get("reftargetid") or ""
        repo = app.config.fedrnd_repo_url.rstrip("/")
        page = _rendered_page(app, rel)
        if page is not None:
            # A notebook of notebooks/ is also a page of the site (rendered with its outputs).
            uri = app.builder.get_relative_uri(docname, page)
        elif repo:
            uri = f"{repo}/{rel}"
        else:
            depth = docname.count("/")
            uri = "../" * depth + "_repo/" + rel
            found.add(rel)
        if anchor:
            uri += "#" + anchor
        ref = nodes.reference("", "", *node.children, refuri=uri, internal=False,
                              classes=["fedrnd-repo-link"])
        node.replace_self(ref)
    app.env.fedrnd_repo_files = found


def _copy_repo_files(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html" or app.config.fedrnd_repo_url:
        return
    root = Path(app.srcdir).resolve().parent
    for rel in sorted(getattr(app.env, "fedrnd_repo_files", ())):
        src = root / rel
        dst = Path(app.outdir) / "_repo" / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def _merge_repo_files(app, env, docnames, other) -> None:
    env.fedrnd_repo_files = getattr(env, "fedrnd_repo_files", set()) | getattr(
        other, "fedrnd_repo_files", set())


# ------------------------------------------------------------------------------------------
# docstrings: the "Options" blocks of the algorithm classes
# ------------------------------------------------------------------------------------------


_ITEM = re.compile(r"\s*([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)*)((?:\s*\([^)]*\))?):\s*(.*)$")


def _options_block(lines: list[str]) -> tuple[int, int, list[tuple[list[str], str, str]]] | None:
    """Find an ``Options ... :`` header (it may span two lines) and its items.

    Returns ``(first, end, items)``: the block's items are on lines ``first:end`` (after the
    header); each item is ``(names, parenthetical, text)``, continuation lines joined.
    """
    header = None
    for i, line in enumerate(lines):
        if re.search(r"\bOptions\b", line):
            for j in range(i, min(i + 3, len(lines))):
                if not lines[j].strip():
                    break
                if lines[j].rstrip().endswith(":"):
                    header = j
                    break
        if header is not None:
            break
    if header is None:
        return None
    body = header + 1
    while body < len(lines) and not lines[body].strip():
        body += 1
    if body >= len(lines) or not _ITEM.match(lines[body]):
        return None
    indent = len(lines[body]) - len(lines[body].lstrip())
    items: list[tuple[list[str], str, str]] = []
    end = body
    while end < len(lines):
        line = lines[end]
        if not line.strip():
            end += 1
            continue
        width = len(line) - len(line.lstrip())
        if width < indent:
            break
        m = _ITEM.match(line)
        if width == indent and m:
            items.append(([n.strip() for n in m.group(1).split(",")], m.group(2),
                          m.group(3).strip()))
        elif items:
            names, extra, text = items[-1]
            items[-1] = (names, extra, (text + " " + line.strip()).strip())
        else:
            return None
        end += 1
    return header + 1, end, items


def _escape_literal_suffix(line: str) -> str:
    """``X``s -> ``X``\\ s: an inline literal directly followed by a letter is not closed in
    reST unless an escaped space separates them."""
    out, pos = [], 0
    for m in re.finditer(r"``[^`]+?``", line):
        out.append(line[pos:m.end()])
        pos = m.end()
        if pos < len(line) and line[pos].isalpha():
            out.append("\\ ")
    return "".join(out) + line[pos:]


def _append_declared_options(what: str, obj: Any, lines: list[str]) -> None:
    """A method class's own declared options (``fedrnd.algorithms.option``) as a list at the
    end of its API entry, so the options' meanings live in one place, the declarations."""
    from fedrnd.algorithms import Algorithm, declared_options

    if what != "class" or not (isinstance(obj, type) and issubclass(obj, Algorithm)):
        return
    own = vars(obj).get("__annotations__", {})
    items = [f"* ``{n}``: {_escape_literal_suffix(spec.doc)}"
             for n, (spec, _) in declared_options(obj).items()
             if spec is not None and spec.doc and n in own]
    if items:
        lines += ["", "The options this class declares (all of them: the config reference):",
                  "", *items, ""]


def _rewrite_options(app, what, name, obj, options, lines: list[str]) -> None:
    """Turn an ``Options:`` block (``name: text`` items with deeper-indented continuation
    lines, plain text in the code) into a bullet list, so reST does not read the
    continuation lines as unexpected indentation."""
    lines[:] = [_escape_literal_suffix(line) for line in lines]
    _append_declared_options(what, obj, lines)
    block = _options_block(lines)
    if block is None:
        return
    first, end, items = block
    bullets = [f"* {', '.join(f'``{n}``' for n in names)}{extra}: {text}"
               for names, extra, text in items]
    lines[first:end] = ["", *bullets, ""]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("fedrnd_repo_url", "", "html")
    app.add_directive("fedrnd-config-fields", ConfigFields)
    app.add_directive("fedrnd-registry", Registry)
    app.connect("doctree-read", _rewrite_repo_links, priority=400)
    app.connect("autodoc-process-docstring", _rewrite_options)
    app.connect("env-merge-info", _merge_repo_files)
    app.connect("build-finished", _copy_repo_files)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
