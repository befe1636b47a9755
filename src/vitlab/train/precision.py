"""Which precision to compute in: ``auto`` picks bf16 autocast where the hardware has native bf16, fp32 elsewhere.

bf16 autocast pays only where matrix units take bf16 directly: CUDA GPUs with bf16 (Ampere and later), and CPUs
with AMX (Intel Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, AMD Zen 4). Elsewhere every bf16 matmul is
emulated: on an AVX2-only AMD EPYC a 1024^3 matmul took 59 ms in fp32 and 6.7 s under bf16 autocast (one thread,
torch 2.13), so ``auto`` must not pick bf16 just because autocast accepts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vitlab.errors import VitlabError

PRECISIONS = ("auto", "fp32", "bf16")
RESOLVED = ("fp32", "bf16")  # what `auto` becomes on a device
# the /proc/cpuinfo flags of native bf16 matrix instructions, for a torch without the capability queries
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU, what says so): torch's own queries (the kernels it will dispatch to), else the
    CPU flags of /proc/cpuinfo."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512_bf16 is not None:
        found = [name for name, query in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if query()]
        capability = torch.backends.cpu.get_cpu_capability()
        if found:
            return True, f"the CPU has {' and '.join(found)}"
        return False, f"the CPU has no AMX or AVX512-BF16 (torch sees {capability}): bf16 would be emulated"
    flags = _cpuinfo_flags() & set(_BF16_CPU_FLAGS)
    if flags:
        return True, f"the CPU has {', '.join(sorted(flags))} (/proc/cpuinfo)"
    return False, "the CPU has no amx_bf16 or avx512_bf16 flag: bf16 would be emulated"


def cuda_bf16_support(device: torch.device) -> tuple[bool, str]:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return True, f"{name} has native bf16"
    return False, f"{name} has no native bf16"


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """The precision to run (``fp32`` or ``bf16``) for ``precision`` on ``device``, and a line saying why."""
    if precision not in PRECISIONS:
        raise VitlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision, "asked for"
    device = torch.device(device)
    native, why = cuda_bf16_support(device) if device.type == "cuda" else cpu_bf16_support()
    return ("bf16" if native else "fp32"), f"auto: {why}"


def run_precision(checkpoint_config: dict, run_dir: Path | None) -> tuple[str, str]:
    """The precision a run evaluated in, for evaluating its checkpoint again the same way, and a line saying where it
    was read: the checkpoint's ``precision`` (written by the trainer), else the run's summary.json, else its
    configuration; only a run that recorded nothing but ``auto`` is resolved here, for the CPU."""
    summary = run_dir / "summary.json" if run_dir is not None else None
    configured = checkpoint_config.get("train_config", {}).get("precision", "auto")
    if checkpoint_config.get("precision") in RESOLVED:
        precision, why = checkpoint_config["precision"], "the run's, recorded in the checkpoint"
    elif summary is not None and summary.is_file() and json.loads(summary.read_text()).get("precision") in RESOLVED:
        precision, why = json.loads(summary.read_text())["precision"], f"the run's, recorded in {summary}"
    elif configured != "auto":
        precision, why = resolve_precision(configured, "cpu")[0], "the run's configuration"
    else:
        precision, why = resolve_precision("auto", "cpu")
        return precision, f"{why}; the run recorded no resolved precision"
    if precision == "bf16" and not cpu_bf16_support()[0]:  # a GPU run's bf16, emulated here: right but slow
        why += "; this CPU emulates bf16, --precision fp32 is faster"
    return precision, why
