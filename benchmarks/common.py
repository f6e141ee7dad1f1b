"""Helpers the benchmark scripts share (they run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import platform

import torch


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
