"""The precision axis of a sweep as data: how each precision is built and what a backend is asked to run.

Float precisions are built by their own builder (``fp32``: the export, ``fp16``: a float16 copy);
quantized ones by the cell's method (``ptq`` or ``qat``) at their weight/activation bit widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtool.registry import Registry


@dataclass(frozen=True)
class Precision:
    """One value of the precision axis.

    ``builder`` names the cell builder of a float precision; None means quantized (built by the
    cell's method). ``bench`` is the precision asked of the timing backend (sub-8-bit widths are
    emulated in int8 QDQ containers, so they run as int8).
    """

    name: str
    builder: str | None
    weight_bits: int | None
    activation_bits: int | None
    bench: str

    @property
    def quantized(self) -> bool:
        """True for the precisions built by PTQ or QAT."""
        return self.builder is None


PRECISIONS: Registry[Precision] = Registry("precision")
for _p in (
    Precision("fp32", "fp32", None, None, "fp32"),
    Precision("fp16", "fp16", None, None, "fp16"),
    Precision("int8", None, 8, 8, "int8"),
    Precision("int6", None, 6, 6, "int8"),
    Precision("int4", None, 4, 4, "int8"),
    Precision("w6a8", None, 6, 8, "int8"),
    Precision("w4a8", None, 4, 8, "int8"),
):
    PRECISIONS.add(_p.name, _p)
