"""The search set, and the harness that builds and runs candidate quantized graphs on it.

Shared by map-aware calibration (a calibrator's ``refine``), mixed precision and the proxy metric.
The search set is normal calibration images (``normal_pool``: the categories in turn, held-out, then training normals,
never the test split) plus one synthetic anomaly made from each; fp32 outputs are computed once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from calibrators import SearchContext
from qtool.bias_correction import Biases, with_biases
from qtool.calib_data import normal_pool
from qtool.data import ImageTransform, Splits
from qtool.data.synth_anomalies import synthesize
from qtool.errors import CalibrationError
from qtool.evaluate import OnnxPredictor
from qtool.graph import QuantSpec, insert_qdq, node_tensors, subset
from qtool.proxy import MapDistortion, separation
from qtool.recipe import SearchConfig

log = logging.getLogger(__name__)
Outputs = tuple[np.ndarray, np.ndarray]
RUN_LEVEL = "ORT_ENABLE_BASIC"  # constant folding only: QDQ stays simulated in float


@dataclass
class SearchSet:
    """Normal images followed by the synthetic anomalies made from them, with masks and labels."""

    images: np.ndarray  # (2N, 3, S, S)
    masks: np.ndarray  # (2N, S, S), zeros for the normals
    labels: np.ndarray  # (2N,) 0 normal, 1 synthetic anomaly
    description: dict[str, Any] = field(default_factory=dict)

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """The images in batches of ``size`` (to stream them through a calibrator too)."""
        for i in range(0, len(self.images), size):
            yield self.images[i : i + size]


def search_set_from_arrays(normals: np.ndarray, kinds: Sequence[str], seed: int,
                           files: Sequence[str] | None = None) -> SearchSet:
    """Build a search set from preprocessed normal images (``files``: where each came from, for the report).

    Raises:
        DataError: no images or a bad shape. RegistryError: an unknown anomaly kind.
    """
    synth = synthesize(normals, kinds, seed)
    n = len(synth.images)
    names = list(files) if files is not None else [f"image {i}" for i in range(n)]
    records = [{**r, "base": names[r["base"]], **({"donor": names[r["donor"]]} if "donor" in r else {})}
               for r in synth.records]
    description = {
        "what": "normal calibration images plus synthetic anomalies made only from them (never the test split)",
        "normals": n, "anomalies": n, "kinds": list(kinds), "seed": seed, "files": names, "anomaly_records": records,
    }
    size = normals.shape[-1]
    return SearchSet(
        images=np.concatenate([np.asarray(normals, np.float32), synth.images]),
        masks=np.concatenate([np.zeros((n, size, size), np.float32), synth.masks]),
        labels=np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)]),
        description=description,
    )


def build_search_set(splits: Splits, transform: ImageTransform, cfg: SearchConfig) -> SearchSet:
    """The search set of a dataset: ``cfg.normals`` images of ``normal_pool`` (categories in turn; holdout, then train).

    Raises:
        CalibrationError: no held-out or training normals. DataError: an unreadable image.
    """
    return _pool_set(normal_pool(splits, cfg.normals), transform, cfg.kinds, cfg.seed,
                     "ptq calibration normal pool: the categories in turn, held-out normals, then training normals")


def build_check_set(splits: Splits, transform: ImageTransform, cfg: SearchConfig) -> SearchSet:
    """The check set: the ``cfg.check_normals`` normals of the pool after the search set's, anomalies of seed + 1.

    Its anomaly kinds are ``cfg.check_kinds`` (``cfg.kinds`` when null).

    Raises:
        CalibrationError: the pool holds fewer than two normals past the search set's. DataError: an unreadable image.
    """
    samples = normal_pool(splits, cfg.normals + cfg.check_normals)[cfg.normals:]
    if len(samples) < 2:
        raise CalibrationError(f"ptq.search.check_normals: the normal pool has {len(samples)} image(s) past the "
                               f"search set's {cfg.normals}; a check set needs at least 2")
    return _pool_set(samples, transform, cfg.check_kinds or cfg.kinds, cfg.seed + 1,
                     f"ptq calibration normal pool after the search set's {cfg.normals} images (disjoint from it): "
                     "the categories in turn, held-out normals, then training normals")


def _pool_set(samples: Sequence[Any], transform: ImageTransform, kinds: Sequence[str], seed: int,
              pool: str) -> SearchSet:
    """A search set of the pool ``samples`` (read and preprocessed), with ``pool`` saying where they came from."""
    normals = np.stack([transform.image(s.path) for s in samples])
    out = search_set_from_arrays(normals, kinds, seed, [str(s.path) for s in samples])
    out.description["pool"] = pool
    return out


class Harness:
    """Build QDQ candidates of one graph and spec, run them on a search set, compare with fp32.

    Args:
        model: the prepared fp32 graph; spec: its full QuantSpec.
        search: the search set; threads: ONNX Runtime intra-op threads.
        corrector: ``corrector(ranges)`` -> corrected biases for the full spec
            (:class:`qtool.bias_correction.BiasCorrector`); None when the pipeline does not correct biases.
        check: a check set disjoint from ``search`` (:func:`build_check_set`): its own harness, handed to a
            search calibrator as ``SearchContext.check``; None: none.
    """

    def __init__(self, model: onnx.ModelProto, spec: QuantSpec, search: SearchSet, threads: int = 2,
                 corrector: Callable[[Mapping[str, Any]], Biases] | None = None,
                 check: SearchSet | None = None) -> None:
        self.model, self.spec, self.search, self.threads = model, spec, search, threads
        self.corrector = corrector
        self.check = Harness(model, spec, check, threads, corrector) if check is not None else None
        self.needs = node_tensors(model, spec)
        self.runs = 0
        self.corrections = 0
        self.reference = self.run(model)
        self.reference_separation = self.separation(self.reference)
        self.distortion = MapDistortion(*self.reference, search.masks, search.labels)

    def run(self, model: onnx.ModelProto) -> Outputs:
        """Maps (N, H, W) and scores (N,) of ``model`` on the search images.

        ONNX Runtime CPU with Q/DQ kept as float arithmetic (the spec's simulation, independent of
        the CPU's integer kernels, e.g. u8s8 saturation without VNNI; ``qtool eval`` measures those).
        """
        self.runs += 1
        return OnnxPredictor(model.SerializeToString(), self.threads, RUN_LEVEL)(self.search.images)

    def separation(self, outputs: Outputs) -> dict[str, float]:
        """Image and pixel AUROC of outputs on the search set (synthetic anomalies vs normals)."""
        return separation(outputs[0], outputs[1], self.search.masks, self.search.labels)

    def proxy(self, outputs: Outputs) -> dict[str, float]:
        """Separation and the map distortion against fp32 (:class:`qtool.proxy.MapDistortion`, default weights)."""
        return {**self.separation(outputs), **self.distortion(*outputs)}

    def build_nodes(self, ranges: Mapping[str, Any], nodes: Collection[str] | None,
                    reason: str = "kept float", biases: Biases | None = None,
                    spec: QuantSpec | None = None) -> onnx.ModelProto:
        """QDQ model quantizing only ``nodes`` (all of the spec's when None), with ``biases`` on those it quantizes.

        ``spec``: another spec of the same graph to quantize with (default the harness's).
        """
        full = spec if spec is not None else self.spec
        spec = full if nodes is None else subset(self.model, full, nodes, reason)
        return insert_qdq(with_biases(self.model, biases or {}, spec.nodes), spec, ranges)

    def build(self, ranges: Mapping[str, Any], tensors: Collection[str] | None = None,
              biases: Biases | None = None) -> onnx.ModelProto:
        """QDQ model of the nodes whose Q/DQ use at least one of ``tensors`` (see ``SearchContext.build``)."""
        if tensors is None:
            return self.build_nodes(ranges, None, biases=biases)
        chosen = set(tensors)
        nodes = [n for n, need in self.needs.items() if not need or chosen.intersection(need)]
        return self.build_nodes(ranges, nodes, "not reached yet by the search", biases)

    def correct(self, ranges: Mapping[str, Any]) -> Biases:
        """The biases that bias correction gives the fully quantized graph with ``ranges`` (for :meth:`build`).

        Raises:
            CalibrationError: the harness has no corrector (bias correction off), or bias correction fails.
        """
        if self.corrector is None:
            raise CalibrationError("this search has no bias corrector (ptq.bias_correction is off)")
        self.corrections += 1
        return self.corrector(ranges)

    def context(self, progress: Callable[[int], None] | None = None) -> SearchContext:
        """The :class:`calibrators.SearchContext` a search calibrator's ``refine`` receives."""
        # a tensor quantized at another width (ptq.input_bits) keeps the range calibrated at that width
        return SearchContext(tensors=self.spec.tensors_at_activation_width(), build=self.build, run=self.run,
                             images=self.search.images, masks=self.search.masks, labels=self.search.labels,
                             reference=self.reference, model=self.model, spec=self.spec, progress=progress,
                             correct=self.correct if self.corrector is not None else None,
                             check=self.check.context() if self.check is not None else None)

    def latency_ms(self, model: onnx.ModelProto, iterations: int) -> float:
        """Median wall time (ms) of one forward pass of ``model`` on one input batch, ORT default optimisations."""
        predictor = OnnxPredictor(model.SerializeToString(), self.threads)
        x = self.search.images[: predictor.batch or 1]
        predictor(x)  # warm-up: first-run allocations
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            predictor(x)
            times.append(time.perf_counter() - t0)
        return 1000.0 * float(np.median(times))
