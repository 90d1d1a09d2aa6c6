"""Compute device selection, memory estimates and seeding.

``auto`` picks CUDA when a GPU is usable and the CPU otherwise; nothing in the library hard-codes
``cuda``.  Before heavy work a method estimates its memory and calls :func:`check_memory`, which
either says it fits, or raises :class:`InsufficientMemory` so the caller can fall back (coarser
grid, CPU) with a clear warning instead of crashing mid-way.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from .errors import DeviceError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:N`` into a torch device, with a clear error if unusable."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was requested but no usable CUDA GPU was found "
                              "(torch.cuda.is_available() is False); use --device auto or cpu")
        device = torch.device(choice)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{choice} was requested but only {torch.cuda.device_count()} GPU(s) exist")
        return device
    raise DeviceError(f"unknown device {choice!r}; use one of {', '.join(DEVICE_CHOICES)}")


class InsufficientMemory(DeviceError):
    """The estimated memory of a job exceeds what the device has free."""


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the system's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024 ** 3  # unknown platform: assume a modest machine


def check_memory(needed_bytes: int, device: torch.device, what: str = "this job", headroom: float = 0.8) -> None:
    """Raise :class:`InsufficientMemory` if ``needed_bytes`` exceeds ``headroom`` of the free memory."""
    free = available_memory_bytes(device)
    if needed_bytes > headroom * free:
        raise InsufficientMemory(
            f"{what} needs about {needed_bytes / 1024 ** 3:.1f} GiB but only {free / 1024 ** 3:.1f} GiB is free on "
            f"{device}; use a coarser grid, fewer starts, or another device")
    log.debug("%s: estimated %.2f GiB of %.2f GiB free on %s", what, needed_bytes / 1024 ** 3, free / 1024 ** 3, device)


def seed_everything(seed: int | None) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch generator seeded the same way.

    Every random choice in the library (global-search starts, training) goes through a seed.
    """
    seed = 0 if seed is None else int(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def native_bfloat16(device: torch.device) -> bool:
    """True on a CPU whose instruction set computes in bfloat16 (AVX512-BF16 or AMX-BF16).

    Why it matters: there, bfloat16 convolutions run about twice as fast as float32 ones; elsewhere
    oneDNN emulates bfloat16 and it is slower than float32.  CUDA devices answer False: the GPU
    paths keep float32 (they have not been measured in bfloat16).
    """
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch cannot say: assume not
        return False
    found = capabilities()
    return bool(found.get("avx512_bf16", False) or found.get("amx_bf16", False))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _nvidia_gpu_present() -> bool:
    """True when the operating system shows an NVIDIA GPU (whatever torch thinks of it)."""
    return os.path.isdir("/proc/driver/nvidia/gpus") and bool(os.listdir("/proc/driver/nvidia/gpus")) \
        or os.path.exists("/dev/nvidia0")


def device_report() -> tuple[str, str]:
    """(summary, explanation) of what ``auto`` will use, for a status line a clinician can act on.

    A GPU that the system has but torch cannot use is explained rather than silently ignored:
    a CPU-only torch build, or a driver too old for torch's CUDA version."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return (f"GPU: {props.name}, {total / 1024 ** 3:.1f} GiB ({free / 1024 ** 3:.1f} GiB free)",
                "auto uses this GPU")
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    if not _nvidia_gpu_present():
        return cpu, "no CUDA GPU found: everything runs on the CPU (slower, same results)"
    if torch.version.cuda is None:
        return cpu, (f"an NVIDIA GPU is present but this PyTorch ({torch.__version__}) is a CPU-only build; "
                     "install a CUDA build (in Slicer: the PyTorch extension picks the one matching your driver)")
    return cpu, (f"an NVIDIA GPU is present but PyTorch (CUDA {torch.version.cuda}) cannot use it: the NVIDIA driver "
                 "is probably older than this CUDA version needs; update the driver or install a PyTorch build "
                 "for an older CUDA")
