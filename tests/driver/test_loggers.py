"""Metrics loggers, config checks of them, results loaded back as tables, the accuracy plot."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from fedrnd.driver import (
    AlgorithmConfig,
    Config,
    DataConfig,
    ModelConfig,
    from_dict,
    load_run,
    load_runs,
    outputs,
    simulate,
    validate,
)
from fedrnd.driver import loggers as loggers_mod


def _cfg(**kw) -> Config:
    base = dict(rounds=3, eval_every=1, checkpoint_every=0, progress=False,
                data=DataConfig(source="digits", partition="rotation",
                                partition_options={"num_groups": 2}, num_clients=8),
                model=ModelConfig("mlp", {"hidden": [8]}),
                algorithms=[AlgorithmConfig("fedavg")])
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny finished run (digits, 8 clients, 3 rounds, fedavg), shared by the tests."""
    d = tmp_path_factory.mktemp("run") / "tiny"
    return simulate(_cfg(), run_dir=d, verbose=False)


def test_jsonl_rows_equal_the_history(run):
    log = run.run_dir / "fedavg" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == run.methods["fedavg"].history
    assert [r["round"] for r in rows] == [1, 2, 3]


def test_metric_logger_is_the_jsonl_logger():
    assert outputs.MetricLogger is loggers_mod.JsonlLogger
    assert isinstance(loggers_mod.JsonlLogger.__new__(loggers_mod.JsonlLogger), loggers_mod.Logger)


def test_unknown_logger_is_a_config_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"loggers\.0 = 'tensorbord' is unknown \(did you mean "
                                         r"'tensorboard'\?\)"):
        validate(from_dict({"loggers": ["tensorbord"]}))


def test_default_and_tensorboard_flag_select_loggers():
    assert loggers_mod.selected(Config().loggers) == ["jsonl"]
    assert loggers_mod.selected([], tensorboard=True) == ["jsonl", "tensorboard"]
    assert loggers_mod.selected(["wandb", "jsonl", "wandb"]) == ["jsonl", "wandb"]


@pytest.mark.parametrize(("raw", "needle"), [
    ({"loggers": ["jsonl", "tensorboard"]}, "fedrnd[tensorboard]"),
    ({"tensorboard": True}, "fedrnd[tensorboard]"),
    ({"loggers": ["wandb"]}, "fedrnd[wandb]"),
])
def test_missing_package_fails_validation_before_any_write(tmp_path, monkeypatch, raw, needle):
    for module in ("tensorboardX", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, installed or not
    with pytest.raises(ValueError, match="cannot be imported") as e:
        validate(from_dict(raw))
    assert needle in str(e.value)
    # Through simulate: refused before the run directory (or anything in it) exists.
    cfg = _cfg(**raw)
    with pytest.raises(ValueError, match="cannot be imported"):
        simulate(cfg, run_dir=tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()


def test_loggers_is_a_free_field():
    from fedrnd.driver import rundir

    assert "loggers" in rundir.FREE_FIELDS


def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    lg = loggers_mod.TensorBoardLogger(tmp_path)
    lg.log({"round": 1, "test_acc/mean": 0.5, "note": "x"})
    lg.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _tensorboard_scalars(directory) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in the event files under ``directory``: the
    TFRecord framing (length, crc, data, crc) read by hand, the records by tensorboardX's
    own protos, so no TensorBoard install is needed to check what it would show."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(directory.glob("events.out.tfevents.*")):
        b, i = f.read_bytes(), 0
        while i < len(b):
            (n,) = struct.unpack("<Q", b[i:i + 8])
            event = event_pb2.Event.FromString(b[i + 12:i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def _logged_run(tmp_path, monkeypatch, loggers):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    simulate(_cfg(name="logged", loggers=loggers), run_dir=tmp_path / "logged", verbose=False)
    out = tmp_path / "logged" / "fedavg"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return out, rows


def test_tensorboard_holds_every_number_of_metrics_jsonl_at_its_round(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    out, rows = _logged_run(tmp_path, monkeypatch, ["tensorboard"])
    got = {(step, tag): v for step, tag, v in _tensorboard_scalars(out / "tensorboard")}
    want = {(r["round"], k): v for r in rows for k, v in loggers_mod._scalars(r).items()}
    assert set(got) == set(want) and len(rows) == 3
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6)


def test_wandb_logger_calls_wandb_as_documented(tmp_path, monkeypatch):
    """With a stand-in ``wandb`` module: project, run name, group, config, offline mode and
    one ``log`` per round at step = round, numbers only; ``finish`` on close."""
    import types

    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    lg = loggers_mod.WandbLogger(tmp_path, name="exp", method="fedavg", config={"rounds": 3})
    lg.log({"round": 2, "test_acc/mean": 0.5, "note": "x", "flag": True})
    lg.close()
    assert calls == [
        ("init", {"project": "proj", "name": "exp/fedavg", "group": "exp",
                  "config": {"rounds": 3}, "dir": str(tmp_path), "reinit": True,
                  "mode": "offline"}),
        ("log", {"test_acc/mean": 0.5}, 2), ("finish",)]


def test_wandb_offline_run_is_written_beside_the_metrics(tmp_path, monkeypatch):
    """The real wandb in offline mode (no network, no account): one offline run per method
    in the method's directory, holding the run's name and its metric keys."""
    pytest.importorskip("wandb")
    out, rows = _logged_run(tmp_path, monkeypatch, ["wandb"])
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    assert b"logged/fedavg" in blob
    assert all(k.encode() in blob for k in loggers_mod._scalars(rows[-1]))


def test_open_loggers_fans_out_and_closes_all(tmp_path):
    seen = []

    class Fake:
        def __init__(self, out, **kw):
            seen.append(("open", kw["method"]))

        def log(self, row):
            seen.append(("log", row["round"]))

        def close(self):
            seen.append(("close", None))

    cfg = _cfg(loggers=["jsonl", "wandb"])
    mp = pytest.MonkeyPatch()
    mp.setitem(loggers_mod.LOGGERS, "wandb", (Fake, None, ""))
    try:
        lg = loggers_mod.open_loggers(cfg, tmp_path, "fedavg")
        lg.log({"round": 1, "x": 1.0})
        lg.close()
    finally:
        mp.undo()
    assert seen == [("open", "fedavg"), ("log", 1), ("close", None)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"round": 1, "x": 1.0}


def test_results_round_trip(run):
    res = load_run(run.run_dir)
    assert res.config["name"] == run.config.name
    assert res.status["state"] == "finished"
    assert list(res.methods) == ["fedavg"]
    hist = res.history()
    assert [{k: v for k, v in r.items() if k != "method"} for r in hist] == \
        run.methods["fedavg"].history
    assert {r["method"] for r in hist} == {"fedavg"}
    assert res.history("fedavg") == hist
    with pytest.raises(KeyError, match="no method 'nope'"):
        res.history("nope")
    (final,) = res.final()
    assert final["method"] == "fedavg"
    assert final["test_acc/mean"] == pytest.approx(run.methods["fedavg"].final["test_acc/mean"])


def test_load_runs_adds_a_run_column(run):
    both = load_runs([run.run_dir, str(run.run_dir.parent / "ti*")])
    assert [r.run for r in both.runs] == ["tiny"]  # the same directory once
    rows = both.history()
    assert rows and all(r["run"] == "tiny" and r["method"] == "fedavg" for r in rows)
    with pytest.raises(FileNotFoundError, match="holds no fedrnd run"):
        load_run(run.run_dir / "fedavg")


def test_to_pandas(run):
    pd = pytest.importorskip("pandas")
    df = load_run(run.run_dir).to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert list(df["round"]) == [1, 2, 3] and set(df["method"]) == {"fedavg"}
    assert len(load_runs([run.run_dir]).to_pandas("final")) == 1


def test_to_pandas_without_pandas_says_how_to_install(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        load_run(run.run_dir).to_pandas()


def test_accuracy_plot_has_integer_round_ticks_distinct_styles_and_worst10_bands(run):
    two = {"a": run.methods["fedavg"], "b": run.methods["fedavg"]}
    fig = outputs.accuracy_figure(two, title="t")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)
    lines = ax.get_lines()
    assert len({(ln.get_linestyle(), ln.get_marker()) for ln in lines}) == 2
    assert ax.get_legend() is not None
    # A band per method from the worst 10% of clients up to the mean, in the line's colour.
    bands = ax.collections
    assert len(bands) == 2
    rows = [r for r in run.methods["fedavg"].history if "test_acc/worst10" in r]
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(min(r["test_acc/worst10"] for r in rows))
    assert max(ys) == pytest.approx(max(r["test_acc/mean"] for r in rows))
    assert (run.run_dir / "accuracy.png").is_file()


def test_driver_lines_go_to_the_fedrnd_logger(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fedrnd"):
        simulate(_cfg(rounds=1), run_dir=tmp_path / "r", verbose=False)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "fedrnd")
    assert "data: " in text and "compilation" in text and f"outputs: {tmp_path / 'r'}" in text


def test_console_prints_info_lines_once_and_only_when_verbose(capsys, monkeypatch):
    root = logging.getLogger()
    # A root handler as orbax installs one: the line must not also appear on stderr.
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(sys.stderr)])
    with loggers_mod.console(True):
        loggers_mod.log.info("hello")
    with loggers_mod.console(False):
        loggers_mod.log.info("quiet")
    assert capsys.readouterr() == ("hello\n", "")
    assert not loggers_mod.log.handlers and loggers_mod.log.propagate


def test_console_keeps_a_level_the_user_set(capsys):
    loggers_mod.log.setLevel(logging.WARNING)  # setLevel: the logger caches its level checks
    try:
        with loggers_mod.console(True):
            loggers_mod.log.info("hidden")
    finally:
        loggers_mod.log.setLevel(logging.NOTSET)
    assert capsys.readouterr().out == ""
