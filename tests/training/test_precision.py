"""trainer.precision=auto: bf16 only where the CPU has bf16 matrix support and a probe says so."""

from __future__ import annotations

import pytest

from polymorph.training import precision as precision_module
from polymorph.training.precision import choose_precision, cpu_bf16_flags


def _probe(fp32_ms: float, bf16_ms: float):
    calls = []

    def probe():
        calls.append(1)
        return {"fp32": fp32_ms, "bf16": bf16_ms}

    return probe, calls


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
def test_explicit_values_pass_through_without_probing(explicit):
    probe, calls = _probe(1.0, 1.0)
    choice = choose_precision(explicit, "cpu", flags=["avx512_bf16"], probe=probe)
    assert choice.precision == explicit and choice.reason == "explicit" and not calls


def test_cpu_with_bf16_flag_and_a_faster_probe_chooses_bf16():
    probe, calls = _probe(2.0, 1.0)
    choice = choose_precision("auto", "cpu", flags=["avx512_bf16"], probe=probe)
    assert choice.precision == "bf16-mixed" and calls == [1]
    assert choice.probe_ms == {"fp32": 2.0, "bf16": 1.0}
    assert choice.to_dict()["cpu_flags"] == ["avx512_bf16"]


def test_cpu_with_bf16_flag_but_a_slow_probe_stays_fp32():
    probe, _ = _probe(1.0, 1.0)  # a tie: not worth the rounding
    assert choose_precision("auto", "cpu", flags=["amx_bf16"], probe=probe).precision == "32-true"
    probe, _ = _probe(1.0, 60.0)  # emulated bf16
    assert choose_precision("auto", "cpu", flags=["amx_bf16"], probe=probe).precision == "32-true"


def test_cpu_without_bf16_flags_never_probes():
    probe, calls = _probe(100.0, 1.0)
    choice = choose_precision("auto", "cpu", flags=[], probe=probe)
    assert choice.precision == "32-true" and not calls and "emulated" in choice.reason


def test_gpu_auto_is_bf16_mixed():
    probe, calls = _probe(1.0, 2.0)
    assert choose_precision("auto", "gpu", flags=[], probe=probe).precision == "bf16-mixed"
    assert not calls


def test_cpuinfo_flags_are_parsed(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n")
    assert cpu_bf16_flags(info) == ["avx512_bf16"]
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags(info) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []


def test_default_probe_reads_cpuinfo_and_times_both_dtypes(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    choice = choose_precision("auto", "cpu")
    assert set(choice.probe_ms) == {"fp32", "bf16"} and all(v > 0 for v in choice.probe_ms.values())
    assert choice.precision in ("bf16-mixed", "32-true")


def test_a_burst_of_load_during_the_probe_slows_both_dtypes_alike():
    """The first five timed passes run on a loaded machine (10 ms), the rest on a quiet one
    (1 ms). Timed one dtype after the other, the burst would fall on fp32 alone and bf16 would
    look 10x faster; alternated, each dtype's best pass is a quiet one."""
    clock = {"now": 0.0, "calls": 0}

    def timer():
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:  # the end of a timed pass
            clock["now"] += 0.010 if clock["calls"] <= 10 else 0.001
        return clock["now"]

    timings = precision_module.probe_matmul(repeats=7, timer=timer)
    assert timings == {"fp32": 1.0, "bf16": 1.0}
    assert clock["calls"] == 2 * 2 * 7  # both dtypes, every repeat
