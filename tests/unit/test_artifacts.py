"""The manifest's machine facts: the CPU's vector ISA, which decides whether a seeded training reproduces."""

from __future__ import annotations

import platform

import pytest

from qtool.artifacts import ISA_PINS, cpu_isa, isa_pins

AVX2 = "fpu vme sse sse2 ssse3 fma avx avx2 bmi2"


@pytest.mark.parametrize(("flags", "isa"), [(AVX2 + " avx512f avx512bw avx512_vnni", "avx512"), (AVX2, "avx2"),
                                            ("fpu sse sse2", "sse")])
def test_cpu_isa_names_the_widest_vector_isa_in_the_flags(tmp_path, flags, isa):
    info = tmp_path / "cpuinfo"
    cpu = "processor\t: {}\nmodel name\t: AMD EPYC\nflags\t\t: {}\n"
    info.write_text(cpu.format(0, flags) + "\n" + cpu.format(1, flags))
    assert cpu_isa(info) == isa


def test_cpu_isa_without_cpuinfo_or_x86_flags_is_the_architecture(tmp_path):
    assert cpu_isa(tmp_path / "missing") == platform.machine()
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm\n")
    assert cpu_isa(tmp_path / "arm") == platform.machine()


def test_isa_pins_are_the_kernel_isa_caps_set_in_the_environment(monkeypatch):
    for k in ISA_PINS:
        monkeypatch.delenv(k, raising=False)
    assert isa_pins() == {}
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    assert isa_pins() == {"MKL_CBWR": "AVX2"}
