"""Multi-node torchrun, tested on one machine: two torchrun agents started as two nodes (one process each, gloo on
the CPU) meet through a c10d rendezvous on 127.0.0.1 and train as one process with the same global batch does.
What this cannot test (NCCL between machines, a real network) is listed in docs/scaling.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from click.testing import CliRunner

from test_resume_ddp import free_port
from test_train import cli_args, weights
from vitlab.cli import cli

TIMEOUT_S = 120  # both nodes together; the test takes ~20 s on two shared cores


def torchrun_node(node: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's torchrun agent with one process, meeting the other node at 127.0.0.1:``port`` (node 0 hosts the
    rendezvous store, as the first machine of a real job would)."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node)),
        *("--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"),
        *("--rdzv_id", "vitlab-loopback", "--rdzv_conf", f"is_host={int(node == 0)},join_timeout=60"),
        *("--local_addr", "127.0.0.1", "--max_restarts", "0", "-m", "vitlab", *args),
    ]
    # a session of its own: on failure the agent and its worker are killed together
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    """Every process's (exit code, output); all of them killed when one fails or the time runs out, so no node is
    left waiting for a peer that died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return [(p.wait(), p.stdout.read()) for p in procs]


def test_two_torchrun_nodes_on_loopback_train_as_one_process(tmp_path) -> None:
    """Two nodes with batch 16 each take the steps one process with batch 32 takes (digits, tiny ViT, 4 steps)."""
    common = ("--max-steps", "4", "--set", "warmup_epochs=0", "--lr", "1e-3")
    one, two = tmp_path / "one", tmp_path / "two"
    r = CliRunner().invoke(cli, cli_args(one, "--batch-size", "32", *common))
    assert r.exit_code == 0, r.output
    port = free_port()
    nodes = [torchrun_node(node, port, cli_args(two, "--batch-size", "16", *common)) for node in (0, 1)]
    results = wait_all(nodes, TIMEOUT_S)
    for node, (code, out) in enumerate(results):
        assert code == 0, f"node {node} exited with {code}:\n{out[-3000:]}"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
