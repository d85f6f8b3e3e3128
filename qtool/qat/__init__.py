"""QAT on torch.fx: the QuantSpec lowered to fake-quant modules, quantization-aware distillation, QDQ export.

The same spec PTQ lowers to Q/DQ pairs (``qtool.graph``) is placed on the fx graphs of the model's
parts (:mod:`~qtool.qat.spec_map`), BatchNorm folded (:mod:`~qtool.qat.fold`), fake-quant inserted
(:mod:`~qtool.qat.insert`), trained with the model's KD loss (:mod:`~qtool.qat.train`) and lowered
back to PTQ's QDQ graph (:mod:`~qtool.qat.export`). ``run_qat`` (:mod:`~qtool.qat.run`) is ``qtool qat``.
Heavy imports stay inside the submodules.
"""

from qtool.qat.trace import QatError, SpecMapError

__all__ = ["QatError", "SpecMapError"]
