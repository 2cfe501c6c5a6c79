"""Every speed benchmark in one call: the script a lent GPU (or TPU) runs, results in one file.

Runs, each in its own process with its own time limit (a step that fails or runs out of time
is recorded as such and the suite goes on):

- ``env``: device name and memory, driver, jax / jaxlib / torch versions, CPU model, and the
  two ceilings every figure is read against, measured here: a large float32 matrix product
  through jax (at the default precision, which is TF32 on NVIDIA tensor cores, and at
  ``highest``) and a large device-to-device copy (bytes read plus written);
- ``main_job``: the README's default experiment (``fedrnd run experiments/default.toml``)
  end to end on the device;
- ``throughput``: FedAvg, 1,000 clients x 64 examples, MLP 784-200-200-10, on the low-rank and
  the general path (``benchmarks/throughput.py --path lowrank,general``);
- ``chunks``: the general path's chunk-size sweep (the accelerator default, 256, has never
  been measured) and ``clients10k``: the same workload at 10,000 clients;
- ``general_path``: the engine's general path on its four workloads at the backend's default
  chunk (``benchmarks/general_path.py --chunk auto``), CNN clients included;
- ``compare_mlp`` / ``compare_cnn``: the peer comparison (``benchmarks/compare/run.py``) with
  the PyTorch loop on the same device, on the MLP and on the RND paper's CNN;
- ``discovery_*``: RND federation discovery, 1,000 clients x 64 Fashion-MNIST images with the
  default MLP pair and the authors' conv pair, and 10,000 clients with the MLP pair in the
  two-stage mode the library uses at that scale (``--candidates 32``; the dense decision
  over 10^8 pairs runs on the host and took over 100 s there, 2026-12-04)
  (``benchmarks/discovery.py``);
- ``dfl``: one DFedAvg round on 10,000 nodes, with XLA's buffers, the device allocator's peak
  and the memory planner's estimate (``benchmarks/dfl_round.py``);
- ``tests``: the engine, RND and algorithm tests on the device (written for a CPU: a failure
  there is a lead to read, not a verdict).

Writes ``<out>/suite.json`` (every step: command, exit status, seconds, the step's own JSON
figures, the tail of its output) after every step, ``<out>/<step>.log`` per step, and prints a
short table last. ``--quick`` shrinks every workload so the whole suite runs in a few minutes
on a laptop CPU (the smoke test runs it on a subset of steps); the figures of a quick run are
not benchmarks.

Usage (on the device machine; see ``benchmarks/RESULTS.md`` for where its figures went)::

    python benchmarks/device_suite.py --out /tmp/suite --budget 420
    python benchmarks/device_suite.py --quick --only env,throughput --out /tmp/q
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

ENV_PROBE = r"""
import json, os, platform, subprocess, time
import jax, jax.numpy as jnp
import numpy as np
out = {"date": __import__("datetime").datetime.now().isoformat(timespec="seconds"),
       "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
       "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
       "python": platform.python_version(), "cpu_count": os.cpu_count(),
       "load_avg": os.getloadavg()}
try:
    import jaxlib; out["jaxlib"] = jaxlib.__version__
except Exception: pass
try:
    import torch; out["torch"] = torch.__version__; out["torch_cuda"] = torch.cuda.is_available()
except Exception: out["torch"] = None
try:
    out["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception: out["nvidia_smi"] = None
try:
    with open("/proc/cpuinfo") as f:
        out["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
except Exception: out["cpu"] = platform.processor()
stats = jax.devices()[0].memory_stats() or {}
out["bytes_limit"] = stats.get("bytes_limit")
n = int(os.environ.get("SUITE_MATMUL_N", "8192"))
k1, k2 = jax.random.split(jax.random.key(0))
a = jax.random.normal(k1, (n, n), jnp.float32); b = jax.random.normal(k2, (n, n), jnp.float32)
for prec in ("default", "highest"):
    f = jax.jit(lambda x, y, p=prec: jnp.matmul(x, y, precision=p))
    f(a, b).block_until_ready()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t0)
    out[f"matmul_fp32_{prec}_tflops"] = 2 * n**3 / sorted(ts)[len(ts) // 2] / 1e12
m = int(os.environ.get("SUITE_COPY_MIB", "2048")) * 2**20 // 4
x = jax.random.normal(k1, (m,), jnp.float32)
g = jax.jit(lambda v: v * 1.0001)
g(x).block_until_ready()
ts = []
for _ in range(5):
    t0 = time.perf_counter(); g(x).block_until_ready(); ts.append(time.perf_counter() - t0)
out["copy_gb_s"] = 2 * m * 4 / sorted(ts)[len(ts) // 2] / 1e9
out["matmul_n"], out["copy_mib"] = n, m * 4 // 2**20
print(json.dumps(out))
"""


def steps(quick: bool) -> list[dict]:
    """The suite: name, argv (after the interpreter), time limit in seconds, JSON it writes."""
    py = [sys.executable]
    c1k = "200" if quick else "1000"
    c10k = "400" if quick else "10000"
    rounds = "2" if quick else "5"
    torch_device = "cpu" if quick else "cuda"
    d_steps = ["--steps", "20"] if quick else []
    return [
        dict(name="env", argv=py + ["-c", ENV_PROBE], limit=120, env=(
            {"SUITE_MATMUL_N": "512", "SUITE_COPY_MIB": "16"} if quick else {})),
        dict(name="main_job", argv=py + ["-m", "fedrnd.cli.main", "run",
                                         str(ROOT / "experiments" / "default.toml"), "--out",
                                         "{dir}", "--no-progress",
                                         *(["--set", "rounds=2"] if quick else [])],
             limit=180),
        dict(name="throughput", argv=py + [str(BENCH / "throughput.py"), "--clients", c1k,
                                           "--rounds", rounds, "--path", "lowrank,general",
                                           "--json", "{json}"], limit=150),
        dict(name="chunks", argv=py + [str(BENCH / "throughput.py"), "--clients", c1k,
                                       "--rounds", "3", "--path", "general", "--sweep",
                                       "4,16" if quick else "16,64,256,1000", "--json",
                                       "{json}"], limit=180),
        dict(name="compare_cnn", argv=py + [str(BENCH / "compare" / "run.py"), "--model",
                                            "cnn", "--fedrnd", "general", "--peers", "torch",
                                            "--torch-device", torch_device, "--clients", c1k,
                                            "--json", "{json}"], limit=180),
        dict(name="compare_mlp", argv=py + [str(BENCH / "compare" / "run.py"), "--model",
                                            "mlp", "--peers", "torch", "--torch-device",
                                            torch_device, "--clients", c1k, "--json", "{json}"],
             limit=150),
        dict(name="discovery_mlp", argv=py + [str(BENCH / "discovery.py"), "--clients", c1k,
                                              "--network", "mlp", "--input-pool", "2",
                                              "--repeat", "2", *d_steps, "--json", "{json}"],
             limit=150),
        dict(name="discovery_conv", argv=py + [str(BENCH / "discovery.py"), "--clients", c1k,
                                               "--network", "conv", "--input-pool", "2",
                                               "--repeat", "2", *d_steps, "--json", "{json}"],
             limit=150),
        dict(name="dfl", argv=py + [str(BENCH / "dfl_round.py"), "--nodes", c10k, "--repeats",
                                    "2", "--data", "synthetic", "--json", "{json}"], limit=180),
        dict(name="discovery_10k", argv=py + [str(BENCH / "discovery.py"), "--clients", c10k,
                                              "--network", "mlp", "--input-pool", "2",
                                              "--candidates", "32", "--repeat", "1", *d_steps,
                                              "--json", "{json}"], limit=240),
        dict(name="general_path", argv=py + [str(BENCH / "general_path.py"), "cnn", "mlp",
                                             "small", "ragged", "--chunk", "auto", "--repeats",
                                             "3", "--json", "{json}"], limit=150),
        dict(name="clients10k", argv=py + [str(BENCH / "throughput.py"), "--clients",
                                           c10k, "--rounds", "3", "--path", "lowrank,general",
                                           "--json", "{json}"], limit=180),
        dict(name="tests", argv=py + ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                      "-n", "4", *(["tests/engine/test_core.py"] if quick else
                                                   ["tests/engine", "tests/rnd",
                                                    "tests/algorithms"])],
             limit=600),
    ]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_step(step: dict, out: Path, limit: float) -> dict:
    """Run one step in its own process; its figures, exit status and output tail."""
    json_path = out / f"{step['name']}.json"
    step_dir = out / step["name"]
    argv = [a.replace("{json}", str(json_path)).replace("{dir}", str(step_dir))
            for a in step["argv"]]
    if "{dir}" in " ".join(step["argv"]):
        step_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.get("env", {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log = out / f"{step['name']}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    figures = _read_json(json_path)
    if figures is None and step["name"] == "env":
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        figures = json.loads(lines[-1]) if lines else None
    if figures is None and step_dir.is_dir():
        figures = {p.name: _read_json(p) for p in sorted(step_dir.glob("*.json"))} or None
    return {"name": step["name"], "argv": argv, "rc": rc, "wall_s": round(wall, 2),
            "limit_s": limit, "figures": figures, "tail": text[-3000:]}


def summary(record: dict) -> str:
    """One line per step: status and the headline figure where there is one."""
    lines = [f"suite on {record.get('device', '?')} ({record['date']}), "
             f"{sum(s['wall_s'] for s in record['steps']):.0f} s"]
    for s in record["steps"]:
        lines.append(f"  {s['name']:<15} rc={s['rc']!s:<8} {s['wall_s']:7.1f} s  "
                     f"{headline(s)}")
    return "\n".join(lines)


def headline(s: dict) -> str:
    f = s.get("figures")
    try:
        if s["name"] == "env":
            return (f"{f['device_kind']}; fp32 matmul {f['matmul_fp32_default_tflops']:.1f} "
                    f"(highest {f['matmul_fp32_highest_tflops']:.1f}) TFLOP/s; copy "
                    f"{f['copy_gb_s']:.0f} GB/s")
        if s["name"] in ("throughput", "chunks", "clients10k"):
            return "; ".join(f"{r.get('path', '')} chunk {r.get('effective_chunk')}: "
                             f"{r['updates_per_s']:.0f} upd/s" for r in f["results"])
        if s["name"].startswith("discovery"):
            return (f"first {f['first_s']:.1f} s, warm {f['whole_s']:.1f} s, "
                    f"ARI {f.get('ari')}")
        if s["name"] == "dfl":
            return (f"round {f['round_s']:.2f} s; XLA temp "
                    f"{f['xla_round_bytes'].get('temp_size_in_bytes', 0) / 2**20:.0f} MiB; "
                    f"planner {f['planner']['total'] / 2**20:.0f} MiB")
        if s["name"].startswith("compare"):
            return "; ".join(f"{r['name']}: {r['updates_per_s']:.0f} upd/s"
                             for r in f["results"] if not r.get("skipped")) + (
                f"; agree {f['all_agree']}")
        if s["name"] in ("main_job", "tests"):
            keys = ("mean client test accuracy", "passed", "failed", "error")
            hits = [ln for ln in s["tail"].splitlines() if any(k in ln for k in keys)]
            return hits[-1].strip()[:140] if hits else ""
        if s["name"] == "general_path":
            return "; ".join(f"{r['workload']} {r['wall_s']:.3f} s" for r in f)
    except (KeyError, TypeError, IndexError, ValueError):
        pass
    return "" if s["rc"] == 0 else s["tail"].strip().splitlines()[-1][:120] if s["tail"] else ""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/suite",
                   help="folder for suite.json and the logs (created; must be empty or new)")
    p.add_argument("--only", default="", help="comma list of step names (default: all)")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds for the whole suite: a step starts only with time left, and "
                        "its limit shrinks to what is left (0: no budget)")
    p.add_argument("--quick", action="store_true", help="tiny workloads (a smoke run)")
    a = p.parse_args(argv)
    all_steps = steps(a.quick)
    names = [s["name"] for s in all_steps]
    only = [n for n in a.only.split(",") if n]
    bad = sorted(set(only) - set(names))
    if bad:
        print(f"device_suite: --only names unknown steps {bad}; allowed: {names}",
              file=sys.stderr)
        raise SystemExit(2)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"device_suite: --out {out} is not empty; give a new or empty folder (nothing "
              "is overwritten)", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "host": platform.node(), "quick": a.quick, "budget_s": a.budget,
              "command": " ".join([sys.executable, *sys.argv]), "steps": []}
    start = time.perf_counter()
    for step in all_steps:
        if only and step["name"] not in only:
            continue
        limit = step["limit"]
        if a.budget:
            left = a.budget - (time.perf_counter() - start)
            if left < 20:
                record["steps"].append({"name": step["name"], "rc": "skipped (budget)",
                                        "wall_s": 0.0, "figures": None, "tail": ""})
                continue
            limit = min(limit, left)
        r = run_step(step, out, limit)
        if step["name"] == "env" and isinstance(r["figures"], dict):
            record["device"] = r["figures"].get("device_kind")
        record["steps"].append(r)
        (out / "suite.json").write_text(json.dumps(record, indent=1, default=str))
        print(f"[{time.perf_counter() - start:6.0f} s] {step['name']}: rc={r['rc']} "
              f"{r['wall_s']:.0f} s", flush=True)
    (out / "suite.json").write_text(json.dumps(record, indent=1, default=str))
    print(summary(record))
    return record


if __name__ == "__main__":
    main()
