"""Bad user input: exit code 2, one ``fedrnd: error:`` paragraph naming the config path, no
traceback, and an earlier run of the same name left byte-for-byte as it was.

Every case fails before any training; most in ``load_config`` (before a run directory is even
looked at), the rest (a corrupt data file, a partition or model the data cannot take) while
the data is built, which is still before the first write of the run.
"""

from __future__ import annotations

import gzip
import inspect
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedrnd.cli.main import main
from fedrnd.driver.config import from_dict, load_config

REPO = Path(__file__).parents[2]


def _idx(arr: np.ndarray) -> bytes:
    """An IDX file (unsigned bytes) holding ``arr``."""
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _fashion_dir(root: Path, train_images: bytes) -> Path:
    """A Fashion-MNIST directory of tiny valid files, with the given train-images file."""
    d = root / "fmnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    (d / "train-images-idx3-ubyte.gz").write_bytes(train_images)
    (d / "train-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, 40)))
    (d / "t10k-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (10, 28, 28))))
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, 10)))
    return d


def _truncated_gz(root: Path) -> list[str]:
    good = gzip.compress(_idx(np.zeros((40, 28, 28), np.uint8)))
    d = _fashion_dir(root, good[: len(good) // 2])
    return ["--set", "data.source=fashion_mnist",
            "--set", f'data.source_options.data_dir="{d}"']


def _corrupt_gz(root: Path) -> list[str]:
    d = _fashion_dir(root, b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    return ["--set", "data.source=fashion_mnist",
            "--set", f'data.source_options.data_dir="{d}"']


def _existing_file_as_out(root: Path) -> list[str]:
    f = root / "a-file"
    f.write_text("not a directory")
    return ["--out", str(f)]


def _missing_config(root: Path) -> list[str]:
    return [str(root / "missing.toml")]


def _bad_toml(root: Path) -> list[str]:
    f = root / "bad.toml"
    f.write_text("rounds = [\n")
    return [str(f)]


def _typo_in_file(root: Path) -> list[str]:
    f = root / "typo.toml"
    f.write_text('[data]\npartiton = "dirichlet"\n')
    return [str(f)]


def _tfrecord_without_tensorflow(root: Path, monkeypatch) -> list[str]:
    """A tfds set prepared as TFRecord (no random access) on a machine without TensorFlow."""
    from types import SimpleNamespace

    import fedrnd.data.sources as sources

    class Builder:
        name, data_dir = "mnist", str(root / "tfds")
        info = SimpleNamespace(features={"image": None, "label": SimpleNamespace(num_classes=10)})

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            raise NotImplementedError("TFRecord has no random access")

    monkeypatch.setattr(sources, "_import_tfds",
                        lambda: SimpleNamespace(builder=lambda name, **kw: Builder()))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails
    return ["--set", "data.source=tfds:mnist"]


def _s(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# (id, argv after `run` (or a function of tmp_path making it), text the message must contain)
CASES = [
    ("source-typo", _s("data.source=digts"), ["data.source", "did you mean 'digits'"]),
    ("tfds-unknown", _s("data.source=tfds:imagenet"), ["data.source", "mnist"]),
    ("source-option-typo", _s("data.source_options.test_fractoin=0.3"),
     ["data.source_options.test_fractoin", "did you mean 'test_fraction'"]),
    ("test-fraction", _s("data.source_options.test_fraction=1.5"),
     ["data.source_options.test_fraction", "(0, 1)"]),
    ("partition-typo", _s("data.partition=dirichlt"),
     ["data.partition", "did you mean 'dirichlet'"]),
    ("partition-option-typo", _s("data.partition=dirichlet", "data.partition_options.alpah=0.3"),
     ["data.partition_options.alpah", "did you mean 'alpha'"]),
    ("alpha-zero", _s("data.partition=dirichlet", "data.partition_options.alpha=0"),
     ["data.partition_options.alpha", "> 0"]),
    ("alpha-missing", _s("data.partition=dirichlet"), ["data.partition_options.alpha", "required"]),
    ("alpha-for-rotation", _s("data.partition_options.alpha=0.3"),
     ["data.partition_options.alpha", "data.partition=dirichlet"]),
    ("rotation-groups", _s("data.partition_options.num_groups=9"),
     ["data.partition_options.num_groups", "[1, 4]"]),
    ("within-typo", _s("data.partition_options.within=dirichlt"),
     ["data.partition_options.within", "did you mean 'dirichlet'"]),
    ("shards-k-zero", _s("data.partition=shards", "data.partition_options.k=0"),
     ["data.partition_options.k"]),
    ("shards-k-above-classes", _s("data.partition=shards", "data.partition_options.k=11"),
     ["data.partition_options.k", "num_classes=10"]),
    ("model-typo", _s("model.name=mpl"), ["model.name", "did you mean 'mlp'"]),
    ("model-option-typo", _s("model.options.hiden=[8]"),
     ["model.options.hiden", "did you mean 'hidden'"]),
    ("negative-width", _s("model.options.hidden=[-5]"), ["model.options.hidden", ">= 1"]),
    ("width-wrong-type", _s('model.options.hidden=["wide"]'), ["model.options.hidden"]),
    ("cnn-on-vectors", _s("data.source=gaussian_mixture", "data.partition=iid",
                          "model.name=cnn"), ["model.name", "image"]),
    ("algorithm-typo", _s('algorithms=["fedavgg"]'),
     ["algorithms.0.name", "did you mean 'fedavg'"]),
    ("algorithm-option-typo", _s("algorithms.0.options.predictor_step=10"),
     ["algorithms.0.options.predictor_step", "did you mean 'predictor_steps'"]),
    ("rnd-negative-eps", _s('algorithms=[{name="rnd", options={eps=-1.0}}]'),
     ["algorithms.0.options.eps", ">= 0"]),
    ("ifca-zero-clusters", _s('algorithms=[{name="ifca", options={num_clusters=0}}]'),
     ["algorithms.0.options.num_clusters"]),
    ("algorithm-not-a-table", _s("algorithms=[5]"), ["algorithms.0"]),
    ("duplicate-labels", _s('algorithms=["fedavg", "fedavg"]'), ["algorithms", "distinct"]),
    ("optimizer-typo", _s("local.optimizer=adma"), ["local.optimizer", "did you mean 'adam'"]),
    ("optimizer-setting-typo", _s("local.optimizer_options.momentun=0.9"),
     ["local.optimizer_options.momentun", "did you mean 'momentum'"]),
    ("schedule-typo", _s("local.schedule=cosin"), ["local.schedule", "did you mean 'cosine'"]),
    ("negative-lr", _s("local.lr=-0.1"), ["local.lr", "> 0"]),
    ("loss-typo", _s("local.loss=mes"), ["local.loss", "did you mean 'mse'", "cross_entropy"]),
    ("seed-negative", _s("seed=-1"), ["config: seed must be an integer >= 0"]),
    ("seed-float", _s("seed=1.5"), ["config: seed must be an integer >= 0"]),
    ("rounds-string", _s('rounds="ten"'), ["rounds", "an integer"]),
    ("top-level-typo", _s("roudns=5"), ["roudns", "did you mean rounds"]),
    ("section-typo", _s("local.batchsize=8"), ["local.batchsize", "did you mean local.batch_size"]),
    ("cohort-too-big", _s("cohort_size=100"), ["cohort_size"]),
    ("drift-round", _s("data.drift.at_round=100", "data.drift.fraction=0.5"),
     ["data.drift.at_round"]),
    ("divergence-typo", _s("divergence.action=wran"), ["divergence.action", "did you mean 'warn'"]),
    ("path-name", _s('name="../elsewhere"'), ["name"]),
    ("set-through-scalar", _s("rounds.x=1"), ["rounds", "not a table"]),
    ("set-index-out-of-range", _s("algorithms.5.name=x"), ["algorithms.5", "indices 0 to 2"]),
    ("set-index-not-integer", _s("algorithms.first.name=x"), ["algorithms.first"]),
    ("set-missing-equals", _s("rounds"), ["KEY=VALUE", "'rounds'"]),
    ("set-empty-key", _s("=3"), ["dotted path"]),
    ("set-broken-table", _s("data.partition_options={alpha=0.3"),
     ["data.partition_options", "not a valid TOML value"]),
    ("out-is-a-file", _existing_file_as_out, ["out_dir", "--out", "a-file"]),
    ("config-missing", _missing_config, ["missing.toml", "does not exist"]),
    ("config-bad-toml", _bad_toml, ["bad.toml", "not valid TOML"]),
    ("config-typo", _typo_in_file, ["data.partiton", "did you mean data.partition"]),
    ("gz-truncated", _truncated_gz, ["data.source", "train-images-idx3-ubyte.gz", "truncated"]),
    ("gz-corrupt", _corrupt_gz, ["data.source", "train-images-idx3-ubyte.gz", "corrupt"]),
    ("tfrecord-no-tensorflow", _tfrecord_without_tensorflow, ["data.source", "TensorFlow"]),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def _earlier_run(runs: Path, name: str = "default") -> None:
    """A finished run of the same name, as a previous ``fedrnd run`` left it."""
    d = runs / name
    (d / "fedavg").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"name": name, "rounds": 2}))
    (d / "status.json").write_text(json.dumps({"state": "finished"}))
    (d / "fedavg" / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (d / "accuracy.png").write_bytes(bytes(range(256)))


def _one_paragraph(err: str) -> None:
    assert err.startswith("fedrnd: error:"), err
    assert "Traceback" not in err, err
    assert "\n" not in err.strip(), err


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_paragraph_naming_the_path(argv, expected, tmp_path,
                                                             capsys, monkeypatch):
    runs = tmp_path / "runs"
    _earlier_run(runs)
    before = _snapshot(runs)
    if callable(argv):
        argv = (argv(tmp_path, monkeypatch) if len(inspect.signature(argv).parameters) == 2
                else argv(tmp_path))
    config = [a for a in argv[:1] if not a.startswith("-")]
    rest = argv[len(config):]
    # --overwrite: even allowed to replace the earlier run, bad input must not touch it.
    rc = main(["run", *config, "--out", str(runs), "--overwrite", "--no-progress", *rest])
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_paragraph(err)
    for text in expected:
        assert text in err, (text, err)
    assert _snapshot(runs) == before, "the earlier run directory changed"


@pytest.mark.parametrize("argv, expected", [
    (["run", "--set", "data.source=digts"], "data.source"),
    (["run", "--set", "rounds.x=1"], "rounds"),
])
def test_no_traceback_reaches_the_terminal(argv, expected, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedrnd", *argv, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2, out.stderr
    _one_paragraph(out.stderr)
    assert expected in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_one_line_too(capsys):
    assert main(["run", "--bogus"]) == 2
    err = capsys.readouterr().err
    _one_paragraph(err)
    assert "--bogus" in err


def test_version(capsys):
    import fedrnd

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedrnd {fedrnd.__version__}"
    out = subprocess.run([sys.executable, "-m", "fedrnd", "--version"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"fedrnd {fedrnd.__version__}"


def test_print_config_round_trips_and_touches_nothing(tmp_path, capsys):
    over = ["rounds=7", "data.partition=dirichlet", "data.partition_options.alpha=0.3",
            'algorithms=[{name="rnd", options={eps=0.5}, label="r"}, "fedavg"]',
            "data.drift.at_round=3", "data.drift.fraction=0.25", "local.steps=4",
            'name="quote\\" ünï"']
    argv = ["run", "experiments/default.toml", "--out", str(tmp_path / "runs"), "--print-config"]
    assert main([*argv, *(a for o in over for a in ("--set", o))]) == 0
    text = capsys.readouterr().out
    want = load_config(REPO / "experiments" / "default.toml",
                       [*over, f'out_dir="{tmp_path / "runs"}"'])
    assert from_dict(tomllib.loads(text)) == want
    assert want.data.partition_options == {"alpha": 0.3} and want.algorithms[0].label == "r"
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the output root


def test_list_shows_no_internal_reprs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for bad in ("<function", "object at 0x", "None", "<factory>", "Config("):
        assert bad not in out, bad
    assert "alpha (required)" in out and "hidden = [200, 200]" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_report_only_refuses_an_empty_cache(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    shutil.copyfile(REPO / "experiments" / "RESULTS.md", results)
    before = results.read_bytes()
    cache = tmp_path / "empty-cache"
    rc = main(["compare", str(REPO / "experiments" / "compare.toml"), "--report-only",
               "--cache-dir", str(cache), "--results", str(results)])
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_paragraph(err)
    assert str(cache) in err and "left untouched" in err
    assert results.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]
