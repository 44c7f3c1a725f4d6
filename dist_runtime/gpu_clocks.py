"""The GPU's SM clock and power draw, sampled while a benchmark runs, through NVML (the library
nvidia-smi reads; the `nvidia-ml-py` package). A GPU held at its power limit clocks itself
down, and every figure measured then moves with it: an H200 running Llama-3-8B fp8 at full load
draws 695 of its 700 W at about 1,470 MHz instead of 1,980, and prefill attention takes 700 us
between GEMMs against 540 alone (BENCHMARKS.md). Two GPUs of one kind
settle at different clocks, which is part of why the same command gives different figures on
different machines."""

from __future__ import annotations

import statistics
import threading
from contextlib import nullcontext

import torch

SW_POWER_CAP = 0x4  # NVML's clock event reasons (nvmlClocksEventReason*)
THERMAL = 0x20 | 0x40  # software and hardware thermal slowdown


class GpuClocks:
    """A thread that reads the GPU's clock, power and slowdown reasons every `interval_s`
    inside a `with` block; summary() describes that window."""

    def __init__(self, device_index: int, interval_s: float = 0.1) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        # named "throttle reasons" before NVML 12.6 (nvidia-ml-py keeps both)
        self._reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                         or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        self.interval_s = interval_s
        self.samples: list[tuple[int, float, int]] = []  # (SM MHz, watts, reasons)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-clocks", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM),
                                 self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3, self._reasons(self.handle)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuClocks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _share(self, reasons: int) -> float:
        return sum(bool(s[2] & reasons) for s in self.samples) / max(1, len(self.samples))

    def summary(self) -> dict:
        clocks = [s[0] for s in self.samples] or [0]
        watts = [s[1] for s in self.samples] or [0.0]
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return {
            "gpu": name.decode() if isinstance(name, bytes) else name,
            "sm_clock_mhz": {"mean": statistics.fmean(clocks), "min": min(clocks), "max": max(clocks)},
            "max_sm_clock_mhz": self.nvml.nvmlDeviceGetMaxClockInfo(self.handle, self.nvml.NVML_CLOCK_SM),
            "power_w": {"mean": statistics.fmean(watts), "max": max(watts)},
            "power_limit_w": self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1e3,
            "power_capped_share": self._share(SW_POWER_CAP),  # of the samples, those slowed by the power limit
            "thermal_slowdown_share": self._share(THERMAL),
            "samples": len(self.samples),
        }


def gpu_clocks(device: str) -> GpuClocks | nullcontext:
    """A sampler of this process's GPU for a `with` block, or a context of None: on the CPU,
    without NVML's Python binding (`pip install nvidia-ml-py`), or where NVML cannot be loaded
    (no driver library)."""
    if device == "cpu":
        return nullcontext()
    try:
        import pynvml
    except ImportError:
        return nullcontext()
    try:
        return GpuClocks(torch.cuda.current_device())
    except pynvml.NVMLError:
        return nullcontext()
