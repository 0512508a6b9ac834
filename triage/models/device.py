"""Where and in what precision models run: device resolution, CPU capabilities, precision.

Precision is chosen by what the hardware computes natively, as torch (oneDNN's CPU
detection) reports it, never by the CPU's brand: bf16 on a CPU with AVX512-BF16 or AMX tiles
(on the project's AMD EPYC with AVX512-BF16, member 7 of BLAST-CT on the real head CT took
21.6 s in bf16 against 49.5 s in fp32 with the same volumes to 0.001 ml; docs/benchmarks.md),
fp32 elsewhere (bf16 emulated in software is slower than fp32).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_bf16_native", "cpu_info", "default_precision", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda[:N]"`` as given.

    Raises:
        ValueError: CUDA was asked for but is not available, or the device is unknown.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'")
    return dev


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:  # pragma: no cover - a build without the probe's backend
        return False


@functools.cache
def cpu_bf16_native() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), as torch's
    CPU feature detection (the one oneDNN dispatches on) reports it."""
    return _probe("_is_amx_tile_supported") or _probe("_is_avx512_bf16_supported")


@functools.cache
def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the features that decide precision (for benchmarks and
    ``triage models``)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "model": model,
        "amx": _probe("_is_amx_tile_supported"),
        "avx512_bf16": _probe("_is_avx512_bf16_supported"),
        "threads": torch.get_num_threads(),
    }


def default_precision(device: str | torch.device = "auto") -> str:
    """Compute precision used when ``precision="auto"``.

    CPU: ``bf16`` where the CPU computes it natively (:func:`cpu_bf16_native`), else
    ``fp32``. CUDA: ``bf16`` where supported (wide exponent range, no overflow risk), else
    ``fp16``.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_native() else "fp32"
