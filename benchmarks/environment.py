"""What the run ran on: device, driver, library versions, git commit, date."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["collect_environment", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(
            cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return None


def collect_environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to read the numbers later; ``None`` where a value is unknown."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "manualbp_backend_env": os.environ.get("MANUALBP_BACKEND"),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
    }
    status = _run(["git", "status", "--porcelain"])
    if env["git_commit"] is not None:
        env["git_dirty"] = bool(status)
    try:
        import manualbp

        env["manualbp"] = manualbp.__version__
        env["manualbp_backend"] = manualbp.get_backend()
    except Exception as e:  # report, never fail the run on it
        env["manualbp"] = f"import failed: {type(e).__name__}: {e}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_bytes=int(props.total_memory),
            gpu_sm_count=int(props.multi_processor_count),
            driver_version=smi.splitlines()[0].strip() if smi else None,
        )
    else:
        env.update(gpu_name=None, driver_version=None, cpu_model=platform.processor() or None)
    return env
