"""Multi-node torchrun, tested on one machine: two torchrun agents started as two nodes (one process each, gloo on
the CPU) meet through a c10d rendezvous on 127.0.0.1 and train as one process with the same global batch does.
What this cannot test (NCCL between machines, a real network) is listed in docs/scaling.md."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner

from test_resume_ddp import free_port
from test_train import cli_args, weights
from vitlab.cli import cli
from vitlab.data.shards import write_dataset_shards

TIMEOUT_S = 120  # both nodes together; the test takes ~20 s on two shared cores


def torchrun_node(node: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One node's torchrun agent with one process, meeting the other node at 127.0.0.1:``port`` (node 0 hosts the
    rendezvous store, as the first machine of a real job would); its output goes to ``log``."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node)),
        *("--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"),
        *("--rdzv_id", "vitlab-loopback", "--rdzv_conf", f"is_host={int(node == 0)},join_timeout=60"),
        *("--local_addr", "127.0.0.1", "--max_restarts", "0", "-m", "vitlab", *args),
    ]
    with open(log, "w") as out:  # a file, not a pipe: a pipe nobody reads would block a chatty process
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc). torchrun starts its workers in sessions of their own, so killing
    the agent's process group would leave a worker hung in a collective behind."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # a process that ended while we looked
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, ppid in parent.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[tuple[int | None, str]]:
    """Every agent's (exit code, output); all of them and all their processes killed when one fails or the time
    runs out, so that no node is left waiting for a peer that died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for pid in [q for p in procs if p.poll() is None for q in [p.pid, *descendants(p.pid)]]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [(p.wait(), log.read_text()) for p, log in zip(procs, logs)]


def run_two_nodes(args: list[str], folder: Path) -> None:
    """``vitlab ARGS`` on two loopback nodes; fails with a node's output when one does not finish cleanly."""
    port = free_port()
    logs = [folder / f"node{node}.log" for node in (0, 1)]
    results = wait_all([torchrun_node(node, port, args, log) for node, log in enumerate(logs)], logs, TIMEOUT_S)
    for node, (code, out) in enumerate(results):
        assert code == 0, f"node {node} exited with {code}:\n{out[-3000:]}"


def test_two_torchrun_nodes_on_loopback_train_as_one_process(tmp_path) -> None:
    """Two nodes with batch 16 each take the steps one process with batch 32 takes (digits, tiny ViT, 4 steps)."""
    common = ("--max-steps", "4", "--set", "warmup_epochs=0", "--lr", "1e-3")
    one, two = tmp_path / "one", tmp_path / "two"
    r = CliRunner().invoke(cli, cli_args(one, "--batch-size", "32", *common))
    assert r.exit_code == 0, r.output
    run_two_nodes(cli_args(two, "--batch-size", "16", *common), tmp_path)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)


def test_two_nodes_stream_shards_in_step(tmp_path) -> None:
    """Two nodes training from `wds:` shards with 2 DataLoader workers each: every rank takes the same number of
    steps (one short, and the other would wait in a collective until the timeout) and the run finishes."""
    write_dataset_shards("digits", tmp_path / "shards", shard_size=100)
    args = cli_args(tmp_path / "run", "--data", f"wds:{tmp_path / 'shards'}", "--batch-size", "64", "--epochs", "1")
    args += ["--set", "num_workers=2"]
    run_two_nodes(args, tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["train_images"] == 1437
    assert summary["steps"] == 1437 // 2 // 64  # an epoch: each rank's share of 718 or 719 in batches of 64
