"""`precision: auto` picks bf16 only where the hardware computes bf16 natively (capabilities monkeypatched)."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.train import TrainConfig
from vitlab.train import precision as P


def _cpu(monkeypatch, *, amx: bool, avx512_bf16: bool, capability: str = "AVX512") -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected", "named"),
    [
        (True, True, "bf16", "AMX and AVX512-BF16"),
        (False, True, "bf16", "AVX512-BF16"),
        (False, False, "fp32", "no AMX or AVX512-BF16 (torch sees AVX2)"),
    ],
)
def test_auto_on_cpu_follows_the_bf16_instructions(monkeypatch, amx, avx512_bf16, expected, named) -> None:
    _cpu(monkeypatch, amx=amx, avx512_bf16=avx512_bf16, capability="AVX2" if expected == "fp32" else "AVX512")
    precision, why = P.resolve_precision("auto", "cpu")
    assert precision == expected and why.startswith("auto: ") and named in why


def test_auto_falls_back_to_cpuinfo_flags_without_torch_queries(monkeypatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert P.resolve_precision("auto", "cpu") == ("bf16", "auto: the CPU has avx512_bf16 (/proc/cpuinfo)")
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"fpu", "avx2"})
    assert P.resolve_precision("auto", "cpu")[0] == "fp32"


@pytest.mark.parametrize(("supported", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_asks_the_device(monkeypatch, supported, expected) -> None:
    _cpu(monkeypatch, amx=not supported, avx512_bf16=not supported)  # the CPU must not decide for the GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    precision, why = P.resolve_precision("auto", torch.device("cuda", 0))
    assert precision == expected and "Some GPU" in why


def test_explicit_precisions_are_kept_and_auto_is_the_default(monkeypatch) -> None:
    _cpu(monkeypatch, amx=False, avx512_bf16=False)
    assert P.resolve_precision("bf16", "cpu") == ("bf16", "asked for")
    assert P.resolve_precision("fp32", "cpu") == ("fp32", "asked for")
    assert TrainConfig().precision == "auto"
    with pytest.raises(vitlab.VitlabError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        TrainConfig(precision="fp16").validate()
