"""On a GPU: forward and backward of a model of each kind on CUDA, a bf16 autocast step, the trainer for a few
steps, and an NCCL all_reduce under torchrun. Marked ``cuda`` (``pytest -m cuda``; benchmarks/gpu_check.sh runs
them) and skipped where CUDA is absent, so the CPU suite collects them and says why they did not run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import input_for, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# a plain ViT, shifted windows with masks, convolutional projections, a CNN with BatchNorm
MODELS = ["vit_tiny_patch4_28", "swin_tiny_patch2_window7_28", "cvt_7_28", "resnet18_28"]


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_backward_on_cuda(name) -> None:
    torch.manual_seed(0)
    model = tiny_model(name).cuda()
    x = input_for(model, batch=4).cuda()
    out = model(x)  # (B, classes)
    assert out.device.type == "cuda" and out.shape == (4, model.num_classes) and out.isfinite().all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.device.type == "cuda" and g.isfinite().all() for g in grads)
    # the same weights on the CPU give the same logits, with TF32 off (cuDNN convolutions default to it)
    cpu = tiny_model(name).eval()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            torch.testing.assert_close(model.eval()(x).cpu(), cpu(x.cpu()), atol=1e-4, rtol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def test_a_bf16_autocast_step_on_cuda() -> None:
    torch.manual_seed(0)
    model = tiny_model("vit_tiny_patch4_28").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = input_for(model, batch=8).cuda(), torch.randint(0, model.num_classes, (8,), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16 and loss.isfinite()
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trainer_runs_a_few_steps_on_cuda(precision, tmp_path) -> None:
    from click.testing import CliRunner

    from vitlab import from_pretrained
    from vitlab.cli import cli

    model_args = json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2})
    args = ["train", "--data", "digits", "--model", "vit_tiny_patch7_28", "--epochs", "1", "--max-steps", "6"]
    args += ["--device", "cuda", "--precision", precision, "--set", f"model_args={model_args}"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["precision"] == precision
    assert 0 <= summary["test_accuracy"] <= 1
    model = from_pretrained(tmp_path / "run" / "checkpoints" / "best")
    assert all(p.isfinite().all() for p in model.parameters())


NCCL_SCRIPT = """
import os
import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
t = torch.arange(4, dtype=torch.float32, device="cuda") * (rank + 1)
dist.all_reduce(t)
world = dist.get_world_size()
expected = torch.arange(4, dtype=torch.float32, device="cuda") * world * (world + 1) / 2
assert torch.equal(t, expected), (t, expected)
dist.barrier()
if rank == 0:
    print("NCCL OK", dist.get_backend(), world)
dist.destroy_process_group()
"""


def test_nccl_all_reduce_under_torchrun(tmp_path) -> None:
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    script = tmp_path / "nccl_check.py"
    script.write_text(textwrap.dedent(NCCL_SCRIPT))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "1", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "NCCL OK nccl 1" in r.stdout
