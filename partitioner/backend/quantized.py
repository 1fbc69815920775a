"""Bundles of plans whose stages run layers as int8 (QUANT): the back end's side.

A plan lists, per stage, the layers that run quantised (``Stage.quantized``). All of them
together are one variant of the model (:func:`partitioner.frontend.quantize.quantize_model`:
ONNX Runtime's quantiser, regrouped into the model's layers), and every stage file is
sliced from that variant by the one slicer, exactly as a float plan's stages are sliced
from the float model. Because a quantised layer keeps the ``QuantizeLinear`` of its
outputs and each reading layer holds a ``DequantizeLinear``, a quantised output that
crosses a stage boundary is cut between the two: the int8 tensor travels (the manifest's
dtype says ``int8``), a quarter of the float bytes.

Routing is recomputed on the variant's layer graph (the int8 tensors are the ones that
cross), keeping the plan's own estimate (the planner priced the variant). Verification
compares the chained stages with the *quantised* whole model, and reports the noise of
the bundle against the float model (QUANT's rho on the verification input).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from partitioner.errors import fail
from partitioner.ir import Plan

if TYPE_CHECKING:
    from partitioner.frontend import PreparedModel
    from partitioner.frontend.quantize import QuantizedModel

__all__ = ["quantized_layers", "check_quantized", "quantized_variant", "noise_entry"]

log = logging.getLogger("partitioner.backend")

# calibration samples drawn when none are given (noise figures then say little)
RANDOM_SAMPLES = 8


def quantized_layers(plan: Plan) -> tuple[int, ...]:
    """Every layer some stage of ``plan`` runs as int8, sorted."""
    return tuple(sorted({k for s in plan.stages for k in s.quantized}))


def check_quantized(plan: Plan, n_layers: int) -> None:
    """Each stage's ``quantized`` layers lie inside the stage."""
    for s in plan.stages:
        for k in s.quantized:
            if not s.first <= k <= s.last:
                fail(f"plan stage {s.id}: quantized layer {k} is not one of its layers "
                     f"{s.first}..{s.last}")
            if not 0 <= k < n_layers:
                fail(f"plan stage {s.id}: quantized layer {k} is not a layer of the model")


def quantized_variant(prepared: PreparedModel, plan: Plan,
                      calibration: Mapping[str, np.ndarray] | None
                      ) -> tuple[PreparedModel, Plan, QuantizedModel]:
    """The variant to slice for ``plan`` (its quantised layers), and the plan with its
    routes cleared (the back end routes it again on the variant's graph).

    Without ``calibration`` the variant is calibrated on seeded random inputs, with a
    warning: its noise then says little about real inputs.
    """
    from partitioner.frontend.quantize import quantize_model, random_calibration

    check_quantized(plan, len(prepared.graph.layers))
    if calibration is None:
        log.warning("quantized stages without --calibration: calibrating on %d seeded random "
                    "inputs; the noise figures are then meaningless for real inputs",
                    RANDOM_SAMPLES)
        calibration = random_calibration(prepared, RANDOM_SAMPLES, 0)
    variant = quantize_model(prepared, quantized_layers(plan), calibration)
    return variant.prepared, replace(plan, routes=()), variant


def noise_entry(variant: QuantizedModel, float_outputs: Mapping[str, np.ndarray],
                chained: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What the verification records beyond the comparison with the quantised model: the
    quantised layers, their int8 cut tensors, and rho of the chained stages against the
    float model on the verification input."""
    from partitioner.frontend.quantize import noise_of

    names = list(float_outputs)
    rho = noise_of([[float_outputs[n] for n in names]], [[chained[n] for n in names]])
    return {"reference": "quantized model", "quantized": list(variant.layers),
            "int8_tensors": sorted(variant.int8_of.values()), "noise": rho}
