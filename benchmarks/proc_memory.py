"""What the benchmarks measure memory with (Linux): the process's resident set from
/proc/self/status, its peak reset through /proc/self/clear_refs, and tensor bytes by storage."""

from __future__ import annotations

import torch


def status(key: str) -> int:
    """Bytes of /proc/self/status's ``key`` (VmRSS: resident now; VmHWM: the most since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> None:
    """Restart VmHWM from the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    return status("VmHWM")


def storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of the distinct storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out
