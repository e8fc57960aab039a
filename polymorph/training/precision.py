"""``trainer.precision: auto``: bf16 autocast where it is measurably faster, else fp32.

On a GPU ``auto`` is ``bf16-mixed`` (as published). On a CPU, bf16 autocast is only worth it
where the CPU has bf16 matrix instructions (``amx_bf16`` or ``avx512_bf16`` in
``/proc/cpuinfo``): elsewhere oneDNN emulates bf16 and it was measured ~60x slower than fp32.
Even with the flag, a short probe (matmuls of this model's shapes, a few ms) must confirm that
bf16 beats fp32 at the current thread count before it is chosen. Explicit values
(``32-true``, ``bf16-mixed``, ...) pass through untouched.

The choice, its reason and the probe timings are returned together so a run can record them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# (rows, inner, cols) of the Dyck model's matmuls for a batch of ~4k real tokens: QKV / output
# projections (64 x 64 per head group), the MLP in and out (64 <-> 256).
PROBE_SHAPES = ((4096, 64, 192), (4096, 64, 256), (4096, 256, 64), (4096, 64, 64))
# bf16 must beat fp32 by at least this factor: a tie is not worth the rounding.
MIN_SPEEDUP = 1.1


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str
    precision: str
    reason: str
    cpu_flags: list[str] = field(default_factory=list)
    probe_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The bf16 matrix flags the CPU reports (empty if there are none or no cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in BF16_FLAGS if f in flags]


def probe_matmul(repeats: int = 7, timer: Callable[[], float] = time.perf_counter
                 ) -> dict[str, float]:
    """Milliseconds per pass over ``PROBE_SHAPES`` in fp32 and in bf16 (best of ``repeats``).

    The two dtypes' passes alternate, so that a burst of load from another process (a second
    seed starting, a test worker) slows both alike instead of deciding the choice: timed one
    dtype after the other, load during the fp32 passes alone can make bf16 look faster on a CPU
    where it is slower."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen))
             for m, k, n in PROBE_SHAPES]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cast = {name: [(a.to(dtype), b.to(dtype)) for a, b in pairs] for name, dtype in dtypes.items()}
    for mats in cast.values():  # warm-up: the first call of a dtype picks and builds its kernels
        for a, b in mats:
            a @ b
    best = dict.fromkeys(dtypes, float("inf"))
    for _ in range(repeats):
        for name, mats in cast.items():
            start = timer()
            for a, b in mats:
                a @ b
            best[name] = min(best[name], timer() - start)
    return {name: round(seconds * 1e3, 4) for name, seconds in best.items()}


def choose_precision(
    requested: str,
    accelerator: str = "cpu",
    *,
    flags: list[str] | None = None,
    probe: Callable[[], dict[str, float]] | None = None,
) -> PrecisionChoice:
    """Resolve ``requested`` (``auto`` or an explicit Lightning precision) for ``accelerator``.

    ``flags`` and ``probe`` default to reading ``/proc/cpuinfo`` and ``probe_matmul``; tests
    pass their own.
    """
    requested = str(requested)
    if requested != "auto":
        return PrecisionChoice(requested, requested, "explicit")
    accelerator = str(accelerator)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        return PrecisionChoice(requested, "bf16-mixed", "GPU: bf16 autocast as published")
    if accelerator != "cpu":
        return PrecisionChoice(requested, "32-true", f"accelerator {accelerator}: fp32")
    flags = cpu_bf16_flags() if flags is None else list(flags)
    if not flags:
        return PrecisionChoice(requested, "32-true",
                               "CPU without amx_bf16/avx512_bf16: bf16 would be emulated")
    timings = (probe or probe_matmul)()
    speedup = timings["fp32"] / max(timings["bf16"], 1e-9)
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice(requested, "bf16-mixed",
                               f"CPU {'+'.join(flags)}: bf16 matmul probe {speedup:.2f}x faster",
                               flags, timings)
    return PrecisionChoice(requested, "32-true",
                           f"CPU {'+'.join(flags)}, but the bf16 probe was only {speedup:.2f}x "
                           f"fp32's speed (< {MIN_SPEEDUP})", flags, timings)
