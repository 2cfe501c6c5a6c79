"""The README and the documentation pages: links resolve, the opening commands stay the ones a
newcomer runs, and the main job's figures in the README are those of its results file.

These read Markdown only (no Sphinx); the site itself is built with warnings as errors by
``.ci/run``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md",
                *(p for p in DOCS.rglob("*.md")
                  if not {"_build", "notebooks"} & set(p.relative_to(DOCS).parts))])

# [text](target) and ![alt](target); a target may be followed by a "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _links(text: str) -> list[str]:
    text = FENCE.sub("", text)              # code blocks hold examples, not links
    text = re.sub(r"`[^`\n]*`", "", text)   # so do inline code spans
    return LINK.findall(text)


def test_pages_found():
    assert ROOT / "README.md" in PAGES and len(PAGES) > 10, PAGES


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_local_links_resolve(page):
    """Every relative link of a page points at a file or folder that exists."""
    missing = []
    for target in _links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def _shell_blocks(text: str) -> list[str]:
    # The same rule as the newcomer check: fenced blocks marked bash/sh/shell/console or bare.
    return re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_install_run_and_test_blocks():
    """The README's first shell block installs fedrnd and runs the main job; the second
    installs the test tools and runs the test suite."""
    blocks = _shell_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    first, second = blocks[0], blocks[1]
    assert "pip install -e" in first and "fedrnd run experiments/default.toml" in first
    assert ".[test]" not in first, "the user install line should not pull the test tools"
    assert 'pip install -e ".[test]"' in second and "pytest" in second


def test_readme_main_job_figures_match_their_results_file():
    """Each seed row of the README's main-job table carries the accuracies that
    docs/results/MAIN_JOB.md records for that seed."""
    readme = (ROOT / "README.md").read_text()
    results = (DOCS / "results" / "MAIN_JOB.md").read_text()
    recorded = {}
    for m in re.finditer(r"^\| seed (\d) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", results,
                         flags=re.M):
        recorded[m.group(1)] = m.groups()[1:]
    shown = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in re.finditer(
        r"^\| (\d) \| \d+ \([0-9.]+\) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", readme,
        flags=re.M)}
    assert shown, "the README's main-job table was not found"
    for seed, figures in shown.items():
        assert recorded.get(seed) == figures, (seed, figures, recorded.get(seed))


def test_readme_python_block_runs_and_logs_to_tensorboard_wandb_and_pandas(tmp_path,
                                                                           monkeypatch):
    """The README's Python block, executed as written at a small size (2 rounds, 6 clients,
    FedAvg, outputs in a temporary directory): TensorBoard event files, an offline wandb run
    and both pandas tables come out."""
    for module in ("tensorboardX", "wandb", "pandas"):
        pytest.importorskip(module)
    import fedrnd.driver

    block = re.search(r"^## Python\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(),
                      re.S | re.M).group(1)
    real = fedrnd.driver.load_config
    small = ["rounds=2", "eval_every=2", "checkpoint_every=0", "progress=false",
             "data.num_clients=6", 'algorithms=["fedavg"]', f'out_dir="{tmp_path}"']
    monkeypatch.setattr(fedrnd.driver, "load_config",
                        lambda path, overrides=(): real(path, [*overrides, *small]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    run = scope["res"].run_dir
    assert list((run / "fedavg" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "fedavg" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list(scope["per_round"]["round"].unique()) == [1, 2]
    assert set(scope["per_round"]["method"]) == {"fedavg"}
    assert list(scope["final"]["method"]) == ["fedavg"]
    assert 0 <= float(scope["final"]["test_acc/mean"].iloc[0]) <= 1
