"""The extension points: the four registries, plug-in loading, and the worked example.

Properties: a name cannot be registered twice by accident; entries registered from outside
fedrnd are validated, listed and run exactly like the built-ins (errors name the config path);
plug-ins load from a config (relative to its file), from ``--plugin`` and from entry points,
once each; a broken plug-in is one paragraph of error and exit code 2, and leaves the tables
as they were; ``examples/plugins`` runs from the command line (its config naming the plug-in,
or ``--import`` naming a model and a method) and what it adds learns.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

import fedrnd
from fedrnd.algorithms import ALGORITHMS, Algorithm, FedAvg
from fedrnd.cli.main import main
from fedrnd.data import partition as partition_mod
from fedrnd.data import sources as sources_mod
from fedrnd.driver import plugins
from fedrnd.driver.config import load_config
from fedrnd.models import _core as models_mod

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugins"


@pytest.fixture(autouse=True)
def clean_tables():
    """Every test leaves the registries and the plug-in caches as it found them (other test
    modules, e.g. the conformance tests, iterate over ALGORITHMS)."""
    tables = [ALGORITHMS, models_mod.MODELS, models_mod._IMAGE_MODELS, partition_mod.PARTITIONS,
              partition_mod.PARTITION_INFO, sources_mod.SOURCES, sources_mod._CHECKS,
              plugins._LOADED, plugins._ORIGIN, plugins._ENTRY_POINTS]
    saved = [t.copy() for t in tables]
    before = set(sys.modules)
    yield
    for t, s in zip(tables, saved, strict=True):
        t.clear()
        t.update(s)
    for name in set(sys.modules) - before:
        if name.startswith("_fedrnd_plugin_") or name.startswith("fedrnd_test_plugin"):
            del sys.modules[name]


def _method(name: str = "toy", **extra):
    """A small registered-able method class (FedAvg's round under another name)."""
    ns = {"__annotations__": {"name": ClassVar[str], "momentum": float}, "name": name,
          "momentum": 0.9, **extra}

    def validate(self, data):
        FedAvg.validate(self, data)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    ns.setdefault("validate", validate)
    return dataclasses.dataclass(frozen=True)(type(f"Toy_{name}", (FedAvg,), ns))


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------
# The registries
# ------------------------------------------------------------------------------------------


def test_builtins_are_in_the_public_registries():
    """The built-ins entered the tables through the register functions: registering one of
    them again is a no-op, registering anything else under its name is refused."""
    assert list(ALGORITHMS)[:3] == ["fedavg", "fedprox", "local"]
    assert fedrnd.register_algorithm(FedAvg) is FedAvg
    fn = sources_mod.SOURCES["digits"]
    assert fedrnd.register_source("digits", fn) is fn
    assert partition_mod.partition_info("label_permutation").labels_only
    assert partition_mod.partition_info("rotation").grouped
    assert not partition_mod.partition_info("dirichlet").grouped


def test_duplicate_names_are_refused_unless_replace():
    toy = _method("fedavg")
    with pytest.raises(ValueError, match="'fedavg' is already registered.*replace=True"):
        fedrnd.register_algorithm(toy)
    assert fedrnd.register_algorithm(toy, replace=True) is toy and ALGORITHMS["fedavg"] is toy

    def digits(test_fraction: float = 0.25):
        raise AssertionError

    with pytest.raises(ValueError, match="data source 'digits' is already registered"):
        fedrnd.register_source(digits)
    with pytest.raises(ValueError, match="partition 'iid' is already registered"):
        fedrnd.register_partition("iid", lambda dataset, num_clients, *, seed: None)
    with pytest.raises(ValueError, match="model 'mlp' is already registered"):
        fedrnd.register_model("mlp", lambda num_classes: None)
    fedrnd.register_model("mlp", lambda num_classes: None, replace=True)


def test_register_refuses_what_the_run_could_not_call():
    class NotFrozen(Algorithm):
        name: ClassVar[str] = "nf"

    with pytest.raises(TypeError, match="dataclass\\(frozen=True\\)"):
        fedrnd.register_algorithm(NotFrozen)
    with pytest.raises(ValueError, match="needs a name of its own"):
        fedrnd.register_algorithm(dataclasses.dataclass(frozen=True)(
            type("Nameless", (Algorithm,), {})))
    with pytest.raises(TypeError, match="subclass of fedrnd.algorithms.Algorithm"):
        fedrnd.register_algorithm(int)
    with pytest.raises(TypeError, match="must take \\(dataset, num_clients, \\*, seed"):
        fedrnd.register_partition("p", lambda ds, *, rng: None)
    with pytest.raises(TypeError, match="must take \\(num_classes"):
        fedrnd.register_model("m", lambda classes: None)
    with pytest.raises(ValueError, match="name must be"):
        fedrnd.register_source("tfds:mine", lambda: None)


def test_decorators_register_under_the_function_name():
    @fedrnd.register_source
    def my_data(n: int = 10):
        """My data."""

    @fedrnd.register_partition(grouped=True)
    def my_split(dataset, num_clients, *, seed, k: int = 2):
        """My split."""

    assert sources_mod.SOURCES["my_data"] is my_data
    assert partition_mod.PARTITIONS["my_split"] is my_split
    assert partition_mod.partition_info("my_split").grouped


def _config(tmp_path: Path, body: str) -> Path:
    return _write(tmp_path / "cfg.toml", body)


def test_plugin_entries_are_validated_like_builtins(tmp_path):
    """Option names, types, required options and the entries' own checks of registered
    sources, partitions, models and methods give config errors that name the config path."""

    def _check(n: int = 10, **_):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")

    fedrnd.register_source("my_data", lambda n=10: None, check=_check)
    fedrnd.register_partition("my_split", lambda dataset, num_clients, *, seed, share: None)

    def my_net(num_classes: int, width: int = 8):
        """Building it is free: validation builds it once."""

    fedrnd.register_model(my_net)
    fedrnd.register_algorithm(_method("toy"))

    def err(over: list[str]) -> str:
        with pytest.raises(ValueError) as e:
            load_config(None, over)
        return str(e.value)

    assert "data.source_options.m is not an option of data.source = 'my_data'" in err(
        ["data.source=my_data", "data.source_options.m=3"])
    assert "data.source_options.n must be >= 1" in err(
        ["data.source=my_data", "data.source_options.n=0"])
    assert "data.partition_options.share is required by data.partition = 'my_split'" in err(
        ["data.partition=my_split"])
    assert "data.partition_options.shar is not an option" in err(
        ["data.partition=my_split", "data.partition_options.share=1",
         "data.partition_options.shar=1"])
    assert "model.options.width = \"x\" must be an integer" in err(
        ["model.name=my_net", "model.options.width=\"x\""])
    msg = err(['algorithms=[{name="toy", options={momentun=0.5}}]'])
    assert "algorithms.0.options.momentun" in msg and "did you mean 'momentum'" in msg
    assert "algorithms.0.options.momentum must be in [0, 1)" in err(
        ['algorithms=[{name="toy", options={momentum=1.5}}]'])
    assert "algorithms.0.options.momentum = \"a\" must be a number" in err(
        ['algorithms=[{name="toy", options={momentum="a"}}]'])
    cfg = load_config(None, ['algorithms=[{name="toy", options={momentum=0.5}}]'])
    assert cfg.algorithms[0].options == {"momentum": 0.5}


# ------------------------------------------------------------------------------------------
# Loading plug-ins
# ------------------------------------------------------------------------------------------

PLUGIN = """
    import dataclasses
    from typing import ClassVar

    import fedrnd
    from fedrnd.algorithms import FedAvg


    @fedrnd.register_algorithm
    @dataclasses.dataclass(frozen=True)
    class Mine(FedAvg):
        \"\"\"My method: FedAvg under another name.\"\"\"

        name: ClassVar[str] = "mine"
        beta: float = 0.5
"""


def test_config_plugins_load_relative_to_the_config_file_once(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "mine.py", PLUGIN)
    cfg_path = _config(tmp_path / "sub", """
        plugins = ["mine.py"]
        [[algorithms]]
        name = "mine"
        options = { beta = 0.25 }
    """)
    monkeypatch.chdir(tmp_path)  # not the config's directory
    cfg = load_config(cfg_path)
    assert cfg.plugins == [str(tmp_path / "sub" / "mine.py")]  # absolute: config.json too
    assert ALGORITHMS["mine"].__doc__.startswith("My method")
    load_config(cfg_path)  # validated again: the file is not executed twice
    assert len([m for m in sys.modules if m.startswith("_fedrnd_plugin_mine_")]) == 1
    assert plugins.origin(ALGORITHMS["mine"]) == str(tmp_path / "sub" / "mine.py")
    assert plugins.origin(FedAvg) is None


def test_module_plugins_and_the_plugin_flag(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "fedrnd_test_plugin_mod.py", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["list", "--plugin", "fedrnd_test_plugin_mod"]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "My method: FedAvg under another name." in out
    assert "[plug-in: fedrnd_test_plugin_mod]" in out and "beta = 0.5" in out
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('rounds = 1\n[[algorithms]]\nname = "mine"\n')
    assert main(["run", str(cfg), "--plugin", "fedrnd_test_plugin_mod", "--print-config"]) == 0
    assert 'plugins = ["fedrnd_test_plugin_mod"]' in capsys.readouterr().out


def test_entry_points_load_on_demand(tmp_path, monkeypatch):
    _write(tmp_path / "fedrnd_test_plugin_ep.py", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="mine", value="fedrnd_test_plugin_ep",
                                       group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "_entry_points", lambda: [ep])
    load_config(None)  # names nothing unknown: installed plug-ins stay unloaded
    assert "mine" not in ALGORITHMS
    cfg = load_config(None, ['algorithms=["mine"]'])
    assert cfg.algorithms[0].name == "mine" and "mine" in ALGORITHMS
    assert plugins.load_entry_points() == []  # once


def test_a_broken_plugin_leaves_the_tables_as_they_were(tmp_path):
    bad = _write(tmp_path / "half.py", """
        import fedrnd

        fedrnd.register_source("half_data", lambda: None)
        raise RuntimeError("not today")
    """)
    with pytest.raises(plugins.PluginError) as e:
        plugins.load_plugins([str(bad)])
    assert str(e.value) == (f"plugins[0] = '{bad}' could not be loaded: RuntimeError: not "
                            f"today (at {bad} line 5)")
    assert "half_data" not in sources_mod.SOURCES
    bad.write_text("import fedrnd\n\nfedrnd.register_source('half_data', lambda: None)\n")
    plugins.load_plugins([str(bad)])  # fixed: loads, its name is free
    assert "half_data" in sources_mod.SOURCES


@pytest.mark.parametrize("body,words", [
    ("import fedrnd\n\nx = 1 / 0\n", ["ZeroDivisionError", "broken.py line 3"]),
    ("def f(:\n", ["SyntaxError", "broken.py line 1"]),
    ("import fedrnd_no_such_module_xyz\n", ["ModuleNotFoundError", "fedrnd_no_such_module_xyz"]),
])
def test_broken_plugin_file_exits_2_with_one_paragraph(tmp_path, body, words):
    (tmp_path / "broken.py").write_text(body)
    cfg = _config(tmp_path, 'plugins = ["broken.py"]\nrounds = 1\n')
    out = subprocess.run([sys.executable, "-m", "fedrnd", "run", str(cfg), "--out",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("fedrnd: error: config: plugins[0] = ") and "could not be loaded" in err
    assert all(w in err for w in words), err
    assert not (tmp_path / "runs").exists()


def test_missing_plugin_file_names_where_it_was_looked_for(tmp_path):
    cfg = _config(tmp_path, 'plugins = ["nowhere.py"]\n')
    where = tmp_path / "nowhere.py"  # the config's directory, not the working directory
    with pytest.raises(ValueError, match=f"^config: plugins\\[0\\] = '{where}': no such file$"):
        load_config(cfg)
    with pytest.raises(ValueError, match=f"^--plugin 'nowhere.py': no such file {Path.cwd()}"):
        plugins.load_plugin("nowhere.py", where="--plugin")


def test_version_stays_lazy():
    """``fedrnd --version`` and the registry names on the package import no jax."""
    code = ("import sys; from fedrnd.cli.main import main; import fedrnd; "
            "assert main(['--version']) == 0; "
            "assert 'register_algorithm' in dir(fedrnd); "
            "assert 'jax' not in sys.modules, 'jax imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_compare_reads_plugin_metadata_not_names(tmp_path):
    """A grid over a plug-in partition and a plug-in method: whether the scenario has groups,
    is a negative control, and how the method's rows are marked come from their metadata
    (``fedrnd compare`` holds no names), and the grid's plug-ins load from its directory."""
    from fedrnd.driver.compare import load_grid

    _write(tmp_path / "pieces.py", """
        import dataclasses
        from typing import ClassVar

        import fedrnd
        from fedrnd.algorithms import FedAvg
        from fedrnd.data import label_permutation


        @fedrnd.register_partition(grouped=True, labels_only=True)
        def relabel(dataset, num_clients, *, seed, num_groups: int = 3):
            return label_permutation(dataset, num_clients, seed=seed, num_groups=num_groups)


        @fedrnd.register_algorithm
        @dataclasses.dataclass(frozen=True)
        class Blind(FedAvg):
            name: ClassVar[str] = "blind"
            input_only: ClassVar[bool] = True
            finetune_baseline: ClassVar[bool] = False
            clusters_in_round: ClassVar[bool] = True
            num_clusters: int = 1
    """)
    _write(tmp_path / "grid.toml", f"""
        name = "g"
        cache_dir = "{tmp_path / 'cache'}"
        [config]
        plugins = ["pieces.py"]
        rounds = 1
        model = {{ name = "logreg", options = {{}} }}
        data = {{ num_clients = 6 }}
        [[scenarios]]
        name = "relabel"
        partition = "relabel"
        [[scenarios]]
        name = "iid"
        partition = "iid"
        [[methods]]
        name = "blind"
        options = {{ num_clusters = "K" }}
        [[methods]]
        name = "fedavg"
    """)
    grid = load_grid(tmp_path / "grid.toml")
    relabel, iid_ = grid.scenarios
    assert (relabel.groups, relabel.has_groups, relabel.negative_control) == (3, True, True)
    assert (iid_.groups, iid_.has_groups, iid_.negative_control) == (1, False, False)
    blind, fedavg = grid.methods
    assert (blind.input_only, blind.in_round, blind.ft_row) == (True, True, False)
    assert (fedavg.input_only, fedavg.in_round, fedavg.ft_row) == (False, False, True)
    assert {c.resolved["num_clusters"] for c in grid.cells() if c.method is blind} == {1, 3}


# ------------------------------------------------------------------------------------------
# The worked example (docs/extending.md shows this very file)
# ------------------------------------------------------------------------------------------


def test_example_plugin_runs_from_the_command_line(tmp_path):
    """``fedrnd run examples/plugins/config.toml`` with no edit to fedrnd: the plug-in's
    method finishes, learns, and matches FedAvg with the built-in server momentum."""
    out = subprocess.run([sys.executable, "-m", "fedrnd", "run",
                          str(EXAMPLE / "config.toml"), "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)  # not the repository: the config finds its plug-in
    assert out.returncode == 0, out.stderr[-3000:]
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    final = {d.name: json.loads((d / "final.json").read_text())
             for d in run.iterdir() if (d / "final.json").is_file()}
    assert set(final) == {"fedavg", "fedavg_momentum", "fedavg_server_momentum"}
    mine, plain = final["fedavg_momentum"], final["fedavg"]
    ref = final["fedavg_server_momentum"]
    assert mine["test_acc/mean"] > 0.5  # 10 classes: chance is 0.1
    assert mine["test_acc/mean"] > plain["test_acc/mean"] - 0.1
    # The same update as the built-in server optimizer, written from engine primitives.
    assert abs(mine["test_acc/mean"] - ref["test_acc/mean"]) <= 0.02
    assert mine["velocity_norm"] > 0


def test_example_model_and_method_run_from_the_command_line_with_import(tmp_path):
    """``fedrnd run examples/plugins/nnx_momentum.toml --import ... --import ...``: a config
    that names no plug-in runs an NNX model (BatchNorm and dropout) and a method both defined
    outside fedrnd, loaded by ``--import`` (the alias of ``--plugin``); both learn, and the
    run's config records the plug-ins so ``--resume`` finds them again."""
    model, method = EXAMPLE / "my_nnx_mlp.py", EXAMPLE / "my_fedavg_momentum.py"
    out = subprocess.run([sys.executable, "-m", "fedrnd", "run",
                          str(EXAMPLE / "nnx_momentum.toml"), "--out", str(tmp_path),
                          "--no-progress", "--import", str(model), "--import", str(method)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    final = {d.name: json.loads((d / "final.json").read_text())
             for d in run.iterdir() if (d / "final.json").is_file()}
    assert set(final) == {"fedavg", "fedavg_momentum"}
    for name, f in final.items():
        assert f["test_acc/mean"] > 0.6, (name, f["test_acc/mean"])  # chance is 0.1
    assert json.loads((run / "config.json").read_text())["plugins"] == [str(model), str(method)]
    # Without the flags the config's model is unknown: the plug-ins came from --import.
    bare = subprocess.run([sys.executable, "-m", "fedrnd", "run",
                           str(EXAMPLE / "nnx_momentum.toml"), "--out", str(tmp_path / "bare"),
                           "--no-progress"], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert bare.returncode == 2 and "nnx_bn_mlp" in bare.stderr


def test_extending_page_snippets_register_working_pieces(tmp_path):
    """The Python blocks of docs/extending.md, saved as the plug-in the page says, give a
    data set, a partition, a model and a local optimizer that its config blocks validate and
    build."""
    import tomllib

    import jax
    import numpy as np

    from fedrnd.driver.config import from_dict
    from fedrnd.driver.setup import build_data, build_engine
    from fedrnd.models import make_model

    page = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    assert len(blocks) == 5
    (tmp_path / "my_pieces.py").write_text("\n\n".join(blocks))
    toml = next(b for b in re.findall(r"^```toml\n(.*?)^```", page, flags=re.S | re.M)
                if b.startswith('plugins = ["my_pieces.py"]'))
    cfg = load_config(_config(tmp_path, "rounds = 1\n" + toml))
    assert (cfg.data.source, cfg.data.partition, cfg.model.name) == (
        "blobs", "sign_flip", "gelu_mlp")
    data = build_data(cfg)[0]
    assert data.num_clients == cfg.data.num_clients and data.feature_shape == (16,)
    group = np.asarray(data.group)
    assert sorted(np.unique(group)) == [0, 1]
    model = make_model(cfg.model.name, data.feature_shape, data.num_classes, **cfg.model.options)
    params = model.init(jax.random.key(0))
    assert model.apply(params, np.zeros((5, 16), np.float32)).shape == (5, 3)
    # The stateful models of "Models with state": linen dropout + BatchNorm, and NNX.
    x = np.zeros((5, 16), np.float32)
    for name, state in (("dropout_bn_net", "batch_stats"), ("nnx_net", "state")):
        m = make_model(name, (16,), 3, width=8)
        p = m.init(jax.random.key(0))
        assert m.stateful and set(p) == {"params", state}
        assert m.apply(p, x).shape == (5, 3)
        assert m.train_apply(p, x, jax.random.key(1))[0].shape == (5, 3)
    with pytest.raises(ValueError, match="data.source_options.n must be >= 2"):
        load_config(None, ["data.source=blobs", "data.source_options.n=1"])
    with pytest.raises(ValueError, match="model.options.width must be >= 1"):
        load_config(None, ["model.name=gelu_mlp", "model.options.width=0"])
    # The optimizer blocks: the optax one needs no plug-in, the other the page's "signum".
    local = [b for b in re.findall(r"^```toml\n(.*?)^```", page, flags=re.S | re.M)
             if b.startswith("[local]")]
    assert len(local) == 2
    for block in local:
        on = load_config(_config(tmp_path, f'plugins = ["my_pieces.py"]\nrounds = 1\n{block}'))
        assert on.local == from_dict({"local": tomllib.loads(block)["local"]}).local
    engine = build_engine(on, data)[0]
    assert engine.optimizer.kinds == ("momentum", "signum")
