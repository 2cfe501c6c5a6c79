"""LEAF natural federated data (FEMNIST by writer, Shakespeare by role) and the text model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrnd.data import build_federated, make_partition
from fedrnd.data.leaf import (
    SHAKESPEARE_OOV,
    SHAKESPEARE_VOCAB,
    femnist,
    leaf_users,
    shakespeare,
    shakespeare_tokens,
)
from fedrnd.models import make_model

# ---------------------------------------------------------------------------------- fixtures


def _write(root: Path, name: str, split: str, users: dict, files: int = 1) -> None:
    """LEAF JSON files for ``users`` ({user: (x, y)}), spread round-robin over ``files``."""
    d = root / name / "data" / split
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(users)
    for f in range(files):
        mine = names[f::files]
        blob = {"users": mine, "num_samples": [len(users[u][1]) for u in mine],
                "user_data": {u: {"x": users[u][0], "y": users[u][1]} for u in mine}}
        (d / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(blob))


# Writers (train count, test count): f0003 has 2 examples in all, f0007 only test examples.
_FEMNIST = {"f0001": (4, 2), "f0000": (3, 1), "f0002": (5, 2), "f0003": (1, 1),
            "f0007": (0, 2)}


def _femnist_users(seed: int = 0) -> dict[str, dict[str, tuple[list, list]]]:
    rng = np.random.default_rng(seed)
    out = {"train": {}, "test": {}}
    for u, counts in _FEMNIST.items():
        for split, n in zip(("train", "test"), counts, strict=True):
            if n:
                x = np.round(rng.random((n, 784)), 3).tolist()
                out[split][u] = (x, rng.integers(0, 62, n).tolist())
    return out


@pytest.fixture()
def femnist_dir(tmp_path):
    users = _femnist_users()
    _write(tmp_path, "femnist", "train", users["train"], files=2)
    _write(tmp_path, "femnist", "test", users["test"])
    return tmp_path, users


_LINE = "To be, or not to be: that is the question. Whether 'tis nobler in the mind to suff"
_ROLES = {"THE_TEMPEST_PROSPERO": (5, 2), "HAMLET_HAMLET": (4, 1), "KING_LEAR_FOOL": (2, 1)}


def _shakespeare_users() -> dict[str, dict[str, tuple[list, list]]]:
    out = {"train": {}, "test": {}}
    text = _LINE * 3 + "\u00e9~"  # two characters outside LEAF's vocabulary at the end
    k = 0
    for u, counts in _ROLES.items():
        for split, n in zip(("train", "test"), counts, strict=True):
            xs, ys = [], []
            for _ in range(n):
                start = k % (len(text) - 81)
                xs.append(text[start:start + 80])
                ys.append(text[start + 80])
                k += 7
            out[split][u] = (xs, ys)
    # One example whose input and target hold the unknown characters.
    out["train"]["KING_LEAR_FOOL"][0].append(text[-81:-1])
    out["train"]["KING_LEAR_FOOL"][1].append(text[-1])
    return out


@pytest.fixture()
def shakespeare_dir(tmp_path):
    users = _shakespeare_users()
    _write(tmp_path, "shakespeare", "train", users["train"])
    _write(tmp_path, "shakespeare", "test", users["test"], files=2)
    return tmp_path, users


# ------------------------------------------------------------------------------------ FEMNIST


def test_femnist_users_are_clients_with_exactly_their_examples(femnist_dir):
    root, users = femnist_dir
    d = femnist(data_dir=root)
    kept = ["f0000", "f0001", "f0002", "f0003"]  # f0007 has no training example
    assert leaf_users("femnist", data_dir=root) == kept
    assert d.num_classes == 62 and d.name == "femnist"
    assert d.x_train.shape == (13, 28, 28, 1) and d.x_train.dtype == np.float32
    assert d.x_test.shape == (6, 28, 28, 1) and d.y_train.dtype == np.int32
    part = make_partition("natural", d, None, seed=0)
    assert part.num_clients == 4
    for c, u in enumerate(kept):
        for split, rows in (("train", part.train[c]), ("test", part.test[c])):
            x, y = users[split][u]
            assert len(rows) == len(y) == _FEMNIST[u][split == "test"]
            xs = getattr(d, f"x_{split}")[rows]
            np.testing.assert_array_equal(xs, np.asarray(x, np.float32).reshape(-1, 28, 28, 1))
            np.testing.assert_array_equal(getattr(d, f"y_{split}")[rows], y)
    # Row-major: pixel (r, c) is entry 28 r + c of LEAF's flat vector.
    x0 = users["train"]["f0000"][0][0]
    assert d.x_train[part.train[0][0], 2, 5, 0] == np.float32(x0[2 * 28 + 5])
    inv = femnist(data_dir=root, invert=True)
    np.testing.assert_allclose(inv.x_train, 1.0 - d.x_train)
    with pytest.raises(ValueError):  # cached arrays are read-only
        d.x_train[0, 0, 0, 0] = 0.5


def test_femnist_num_clients_min_samples_and_select(femnist_dir):
    root, _ = femnist_dir
    assert leaf_users("femnist", root, num_clients=2) == ["f0000", "f0001"]
    d = femnist(data_dir=root, num_clients=2)
    assert np.bincount(d.train_client).tolist() == [3, 4]
    assert np.bincount(d.test_client).tolist() == [1, 2]
    # min_samples counts train and test together (LEAF's -k): f0003 has 2.
    assert leaf_users("femnist", root, min_samples=3) == ["f0000", "f0001", "f0002"]
    assert femnist(data_dir=root, min_samples=3).x_train.shape[0] == 12
    picked = leaf_users("femnist", root, num_clients=2, select="random", seed=3)
    assert len(picked) == 2 and picked == sorted(picked)
    assert picked == leaf_users("femnist", root, num_clients=2, select="random", seed=3)
    assert {tuple(leaf_users("femnist", root, num_clients=2, select="random", seed=s))
            for s in range(10)} != {tuple(picked)}
    with pytest.raises(ValueError, match="leave no LEAF femnist user"):
        femnist(data_dir=root, min_samples=100)
    for bad, match in [({"num_clients": 0}, "num_clients"), ({"min_samples": 0}, "min_samples"),
                       ({"select": "best"}, "select"), ({"invert": 1}, "invert")]:
        with pytest.raises(ValueError, match=match):
            femnist(data_dir=root, **bad)


def test_data_dir_may_name_the_data_set_directory_and_env_var(femnist_dir, monkeypatch):
    root, _ = femnist_dir
    n = femnist(data_dir=root).x_train.shape[0]
    assert femnist(data_dir=root / "femnist").x_train.shape[0] == n
    assert femnist(data_dir=root / "femnist" / "data").x_train.shape[0] == n
    monkeypatch.setenv("FEDRND_LEAF_DIR", str(root))
    assert femnist().x_train.shape[0] == n


def test_missing_data_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDRND_LEAF_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        femnist()
    msg = str(e.value)
    assert "data_dir is not set" in msg and "FEDRND_LEAF_DIR" in msg
    assert "femnist/data/train/*.json" in msg and "never downloads" in msg
    assert "preprocess.sh" in msg and "TalwalkarLab/leaf" in msg
    with pytest.raises(FileNotFoundError, match=f"no train/ and test/ directories under "
                                                f"{tmp_path / 'none'}"):
        shakespeare(data_dir=tmp_path / "none")
    (tmp_path / "shakespeare" / "data" / "train").mkdir(parents=True)
    (tmp_path / "shakespeare" / "data" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="no user with examples in"):
        shakespeare(data_dir=tmp_path)
    (tmp_path / "shakespeare" / "data" / "train" / "a.json").write_text('{"users": [')
    with pytest.raises(ValueError, match="a.json: cannot read this LEAF JSON file"):
        shakespeare(data_dir=tmp_path)


def test_split_by_user_is_refused(tmp_path):
    users = _femnist_users()
    _write(tmp_path, "femnist", "train", {"a": users["train"]["f0000"]})
    _write(tmp_path, "femnist", "test", {"b": users["test"]["f0000"]})
    with pytest.raises(ValueError, match="-t sample"):
        femnist(data_dir=tmp_path)


# -------------------------------------------------------------------------------- Shakespeare


def test_shakespeare_vocabulary_is_leafs():
    assert len(SHAKESPEARE_VOCAB) == 80 == SHAKESPEARE_OOV
    assert len(set(SHAKESPEARE_VOCAB)) == 80
    assert SHAKESPEARE_VOCAB[:2] == "\n " and SHAKESPEARE_VOCAB[-1] == "}"
    # Hand-computed: '\n'=0, ' '=1, '!'=2, '"'=3, '&'=4, "'"=5, '('=6, ')'=7, ','=8, '-'=9,
    # '.'=10, '0'..'9'=11..20, ':'=21, ';'=22, '>'=23, '?'=24, 'A'..'Z'=25..50, '['=51,
    # ']'=52, 'a'..'z'=53..78, '}'=79; anything else 80.
    assert shakespeare_tokens("To be, 0?").tolist() == [44, 67, 1, 54, 57, 8, 1, 11, 24]
    assert shakespeare_tokens("[a]\n}\u00e9~").tolist() == [51, 53, 52, 0, 79, 80, 80]


def test_shakespeare_roles_are_clients_with_token_ids(shakespeare_dir):
    root, users = shakespeare_dir
    d = shakespeare(data_dir=root)
    kept = sorted(_ROLES)
    assert leaf_users("shakespeare", root) == kept
    assert d.num_classes == 81 and d.x_train.dtype == np.int32
    assert d.x_train.shape == (12, 80) and d.x_test.shape == (4, 80)
    part = make_partition("natural", d, None, seed=0)
    assert part.num_clients == 3
    for c, u in enumerate(kept):
        for split, rows in (("train", part.train[c]), ("test", part.test[c])):
            x, y = users[split][u]
            assert len(rows) == len(x)
            want_x = [[SHAKESPEARE_VOCAB.find(ch) if ch in SHAKESPEARE_VOCAB else 80
                       for ch in s] for s in x]
            np.testing.assert_array_equal(getattr(d, f"x_{split}")[rows], want_x)
            np.testing.assert_array_equal(getattr(d, f"y_{split}")[rows],
                                          [SHAKESPEARE_VOCAB.find(ch) if ch in
                                           SHAKESPEARE_VOCAB else 80 for ch in y])
    last = part.train[kept.index("KING_LEAR_FOOL")][-1]
    assert d.x_train[last, -1] == 80 and d.y_train[last] == 80
    assert leaf_users("shakespeare", root, num_clients=1) == ["HAMLET_HAMLET"]
    assert leaf_users("shakespeare", root, min_samples=6) == ["THE_TEMPEST_PROSPERO"]


def test_shakespeare_ragged_strings_are_refused(tmp_path):
    _write(tmp_path, "shakespeare", "train", {"R": (["abc", "ab"], ["d", "c"])})
    _write(tmp_path, "shakespeare", "test", {"R": (["abc"], ["d"])})
    with pytest.raises(ValueError, match="same length"):
        shakespeare(data_dir=tmp_path)


# ------------------------------------------------------------------------------------ model


def test_char_lstm_shapes_float_ids_and_options():
    m = make_model("char_lstm", (80,), 81)
    # LEAF's Shakespeare model: embedding 8, two LSTM(256), dense to the vocabulary.
    lstm = 4 * (8 * 256 + 256 * 256 + 256) + 4 * (256 * 256 + 256 * 256 + 256)
    assert m.num_params() == 81 * 8 + lstm + 256 * 81 + 81
    small = make_model("char_lstm", (80,), 81, hidden=[16], cell="gru")
    p = small.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (3, 80), 0, 81)
    out = small.apply(p, ids)
    assert out.shape == (3, 81)
    np.testing.assert_allclose(small.apply(p, ids.astype(jnp.float32)), out, rtol=1e-6)
    with pytest.raises(ValueError, match=r"token ids \[B, L\].*\(28, 28, 1\)"):
        make_model("char_lstm", (28, 28, 1), 62, hidden=[4]).init(jax.random.key(0))
    for bad, match in [({"hidden": []}, "hidden"), ({"cell": "rnn"}, "cell"),
                       ({"embed": 0}, "embed"), ({"vocab_size": 0}, "vocab_size")]:
        with pytest.raises(ValueError, match=match):
            make_model("char_lstm", (80,), 81, **bad)


# ------------------------------------------------------------------------------ simulations


def _run(tmp_path, source: str, root: Path, model: str, options: dict, clients: int):
    from fedrnd.driver import AlgorithmConfig, Config, DataConfig, ModelConfig, simulate

    cfg = Config(rounds=2, eval_every=1, checkpoint_every=0, progress=False,
                 data=DataConfig(source=source, source_options={"data_dir": str(root)},
                                 partition="natural", partition_options={},
                                 num_clients=clients),
                 model=ModelConfig(model, options),
                 algorithms=[AlgorithmConfig("fedavg")])
    return simulate(cfg, run_dir=tmp_path / "run", verbose=False)


@pytest.mark.parametrize("source,model,options,clients", [
    ("shakespeare", "char_lstm", {"hidden": [16], "embed": 4}, 3),
    ("femnist", "cnn", {"channels": [4], "dense": 16}, 4),
])
def test_fedavg_on_natural_data(source, model, options, clients, request, tmp_path):
    root, _ = request.getfixturevalue(f"{source}_dir")
    res = _run(tmp_path, source, root, model, options, clients)
    final = res.methods["fedavg"].final
    loss = [v for k, v in final.items() if "loss" in k]
    assert loss and all(math.isfinite(v) for v in loss)
    assert 0.0 <= final["test_acc/mean"] <= 1.0


def test_natural_data_through_build_federated_keeps_token_ids(shakespeare_dir):
    root, _ = shakespeare_dir
    d = shakespeare(data_dir=root)
    fed = build_federated(d, make_partition("natural", d, None, seed=0))
    assert fed.num_clients == 3 and fed.feature_shape == (80,)
    x = np.asarray(fed.x)
    np.testing.assert_array_equal(x, np.round(x))
    assert sorted(np.asarray(fed.train_count).tolist()) == [3, 4, 5]  # FOOL: 2 + the OOV one


def _argv(tmp_path, *overrides: str) -> list[str]:
    argv = ["run", "--no-progress", "--out", str(tmp_path / "out"),
            "--set", 'data.source="femnist"', "--set", 'data.partition="natural"',
            "--set", "data.partition_options={}"]
    return argv + [a for o in overrides for a in ("--set", o)]


def test_cli_errors_exit_2_with_one_paragraph(femnist_dir, tmp_path, capsys):
    from fedrnd.cli.main import main

    root, _ = femnist_dir
    cases = [
        ((f'data.source_options.data_dir="{tmp_path / "none"}"',),
         "config: data.source = 'femnist': LEAF femnist data not found"),
        ((f'data.source_options.data_dir="{root}"', "data.num_clients=10"),
         r"num_clients must be in [1, 4]"),
        ((f'data.source_options.data_dir="{root}"', 'data.source_options.selct="random"'),
         "data.source_options.selct is not an option of data.source = 'femnist' (did you "
         "mean 'select'?)"),
        ((f'data.source_options.data_dir="{root}"', "data.source_options.min_samples=0"),
         "config: data.source_options.min_samples must be an integer >= 1"),
    ]
    for overrides, expected in cases:
        assert main(_argv(tmp_path, *overrides)) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedrnd: error:") and expected in err
        assert err.count("\n") == 1  # one paragraph


def test_shakespeare_next_character_run_from_the_command_line(tmp_path, capsys):
    """A config file, ``fedrnd run``, four roles of a periodic text: the char LSTM under FedAvg
    reports per-round test accuracy and learns the next character well above chance
    (1/80) and above always answering the most common character."""
    from fedrnd.cli.main import main

    text = "to be or not to be that is the question " * 12
    rng = np.random.default_rng(0)
    users = {"train": {}, "test": {}}
    for r in range(4):
        for split, n in (("train", 24), ("test", 8)):
            starts = rng.integers(0, len(text) - 81, n)
            users[split][f"PLAY_ROLE{r}"] = ([text[s:s + 80] for s in starts],
                                             [text[s + 80] for s in starts])
    for split in ("train", "test"):
        _write(tmp_path, "shakespeare", split, users[split])
    targets = [c for x, y in users["test"].values() for c in y]
    majority = max(targets.count(c) for c in set(targets)) / len(targets)
    cfg = tmp_path / "shakespeare.toml"
    cfg.write_text(f"""
name = "shakespeare_small"
rounds = 6
eval_every = 3
checkpoint_every = 0

[data]
source = "shakespeare"
source_options = {{ data_dir = "{tmp_path}" }}
partition = "natural"
partition_options = {{}}
num_clients = 4

[model]
name = "char_lstm"
options = {{ embed = 8, hidden = [32] }}

[local]
batch_size = 8
epochs = 2
optimizer = "adam"
lr = 0.01

[[algorithms]]
name = "fedavg"
""")
    assert main(["run", str(cfg), "--no-progress", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"mean client test accuracy: fedavg ([0-9.]+)", out).group(1))
    assert acc > majority + 0.05, (acc, majority)  # 0.41 vs 0.28 (always " ") at seed 0
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "shakespeare_small" / "fedavg" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows if "test_acc/mean" in r] == [3, 6]
