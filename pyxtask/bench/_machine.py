"""What a benchmark's numbers were measured on (saved beside them)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

import pyxtask

__all__ = ["machine_info"]


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "pyxtask": pyxtask.__version__,
        "build_info": pyxtask.build_info(),
        "cpu_model": cpu,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes on the cores skew multithreaded timings badly; this shows it.
        "loadavg_1min_at_end": os.getloadavg()[0],
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
