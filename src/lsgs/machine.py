"""Facts about the machine: printed by every benchmark beside its figures and recorded in each stage's done.json."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo where available (platform.processor() is often just the architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
