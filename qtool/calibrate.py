"""The calibration driver: stream batches through an ONNX Runtime session, feed a calibrator.

The graph is copied with the tensors to calibrate added as outputs and run without graph
optimisations (so every named tensor exists). Models with a fixed batch dimension are fed image by
image; their outputs are buffered up to ``group`` images before one ``observe`` call per tensor,
so memory stays bounded by one group of activations whatever the calibration set's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx

from calibrators import Calibrator, TensorRange, get_calibrator
from qtool.errors import CalibrationError
from qtool.graph.policy import QuantSpec
from qtool.graph.probe import add_outputs, chunks, probe_session
from qtool.graph.profiles import TargetProfile
from qtool.recipe import PtqConfig

log = logging.getLogger(__name__)


def recipe_calibrator(cfg: PtqConfig, profile: TargetProfile, bits: int | None = None) -> Calibrator:
    """A fresh calibrator as ``cfg`` (the recipe's ptq section) names it, for ``profile``'s activations at ``bits``.

    ``bits`` defaults to ``cfg.activation_bits``; PTQ and QAT's initial ranges both build theirs here.
    """
    return get_calibrator(cfg.calib, symmetric=profile.activation_symmetric,
                          num_bits=cfg.activation_bits if bits is None else bits, **cfg.calib_options)


def probe_outputs(sess: Any, names: list[str], batch: np.ndarray) -> Iterator[list[np.ndarray]]:
    """``sess``'s outputs ``names`` on ``batch``, one list per chunk the model takes at once.

    A model with a fixed batch dimension gets chunks of that size (:func:`qtool.graph.probe.chunks`: the last is
    padded with copies of its last image), and the padding rows are dropped from the outputs (so no image is
    counted twice).
    """
    inp = sess.get_inputs()[0]
    for real, chunk in chunks([batch], inp.shape[0] if isinstance(inp.shape[0], int) else None):
        yield [arr[:real] for arr in sess.run(names, {inp.name: chunk})]


def calibrate(model: onnx.ModelProto, tensors: list[str], batches: Iterable[np.ndarray], calibrator: Calibrator,
              threads: int = 2, group: int = 8, progress: Callable[[int], None] | None = None,
              search_batches: Iterable[np.ndarray] | None = None) -> dict[str, TensorRange]:
    """Run ``batches`` through ``model`` and return ``calibrator``'s ranges for ``tensors``.

    Args:
        model: prepared float graph (static input shape).
        tensors: activation tensor names to observe.
        batches: preprocessed input batches (B,3,S,S) float32.
        calibrator: a fresh calibrator; ``observe`` is called per tensor per group, then ``compute``.
        group: images whose activations are concatenated before one ``observe`` call.
        search_batches: the search images a graph-searching calibrator also observes (None: none).
            Every calibration batch is observed first, then ``begin_search_images`` is called, then
            these; a group never mixes the two.
    Raises:
        CalibrationError: empty calibration set, non-finite inputs or activations (naming the tensor).
    """
    probed = add_outputs(model, tensors)
    sess = probe_session(probed, threads)
    names = list(tensors)
    buffers: dict[str, list[np.ndarray]] = {n: [] for n in names}
    buffered = 0

    def flush() -> None:
        nonlocal buffered
        for n in names:
            if buffers[n]:
                calibrator.observe(n, np.concatenate(buffers[n], axis=0))
                buffers[n].clear()
        buffered = 0

    def feed(stream: Iterable[np.ndarray], what: str) -> int:
        """Observe every batch of ``stream``, flushing the last group; returns the images seen."""
        nonlocal buffered
        count = 0
        for bi, batch in enumerate(stream):
            if not np.isfinite(batch).all():
                raise CalibrationError(f"{what} batch {bi} holds NaN or Inf input values")
            for outs in probe_outputs(sess, names, batch):
                for n, arr in zip(names, outs):
                    buffers[n].append(arr)
                buffered += len(outs[0])
                if buffered >= group:
                    flush()
            count += len(batch)
            if progress:
                progress(len(batch))
        flush()
        return count

    seen = feed(batches, "calibration")
    if seen == 0:
        raise CalibrationError("empty calibration set: no batches were given")
    if search_batches is not None:
        calibrator.begin_search_images()
        seen += feed(search_batches, "search")
    log.info("calibrated %d tensors on %d images", len(names), seen)
    return calibrator.compute()


def input_ranges(spec: QuantSpec, batches: Callable[[], Iterable[np.ndarray]],
                 calibrator_at: Callable[[int], Calibrator]) -> dict[str, TensorRange]:
    """Ranges of the graph input when ``spec`` quantizes it at another width than the activations (``ptq.input_bits``).

    A fresh calibrator at that width (``calibrator_at(bits)``) observes the input batches themselves (the graph's
    one input), so the input's range is what that calibrator chooses for the width it is quantized to; every other
    tensor keeps the range chosen at the activation width. Empty when the input has the activations' width.
    """
    names: dict[int, list[str]] = {}
    for t, a in spec.activations.items():
        if a.range_of == t and not a.constant and a.params.bits != spec.activation_bits:
            names.setdefault(a.params.bits, []).append(t)
    out: dict[str, TensorRange] = {}
    for bits, tensors in names.items():
        calibrator = calibrator_at(bits)
        for batch in batches():
            for t in tensors:
                calibrator.observe(t, batch)
        out.update({t: r for t, r in calibrator.compute().items() if t in tensors})
    return out
