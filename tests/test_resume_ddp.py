"""The promises a run makes when it is scaled out or stopped: collectives on the process group's device, ranks that
draw their own random numbers and agree where they must, exact resume after SIGKILL on every dataset kind, and a
resume that refuses to change the run."""

from __future__ import annotations

import socket

import torch

from test_train import tiny_cfg
from vitlab.train import distributed, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_one_process_group(monkeypatch) -> None:
    """The environment `torchrun --nproc_per_node 1` gives its process: the trainer joins a (gloo) group of one."""
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_every_collective_runs_on_the_process_group_device(tmp_path, monkeypatch) -> None:
    """NCCL takes only CUDA tensors. With the group's device pretended to be another one ('meta'), every tensor the
    loop hands to a collective (training accumulators, the budget probe's vote, the evaluation's sums, the stop
    flag) must already be there."""
    join_one_process_group(monkeypatch)
    seen: list[tuple[str, torch.device]] = []

    def recorder(name: str):
        def collective(t: torch.Tensor, *args, **kwargs) -> None:
            seen.append((name, t.device))

        return collective

    monkeypatch.setattr(torch.distributed, "all_reduce", recorder("all_reduce"))
    monkeypatch.setattr(torch.distributed, "broadcast", recorder("broadcast"))
    monkeypatch.setattr(distributed, "group_device", lambda: torch.device("meta"))
    copy = torch.Tensor.copy_

    def copy_back(t: torch.Tensor, src: torch.Tensor, **kwargs) -> torch.Tensor:
        # a meta tensor holds no data: the (one-process) result is the input, already in place
        return t if src.device.type == "meta" else copy(t, src, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_back)
    summary = train(tiny_cfg(tmp_path / "run", max_steps=6, budget_s=20, eval_every=3, time_budget_s=600))
    assert summary["steps"] == 6
    assert {name for name, _ in seen} >= {"all_reduce"}
    assert all(device.type == "meta" for _, device in seen), sorted(set(seen))
