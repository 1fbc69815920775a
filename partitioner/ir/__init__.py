"""The intermediate representation that the compiler stages hand each other.

Frozen dataclasses with no dependency beyond the standard library (and numpy for the
columnar bundle prices), one module per stage boundary (``graph``, ``system``, ``costs``,
``plan``, ``prices``) and every name importable from here:

* the front end produces a :class:`LayerGraph` (major layers and the cuts between them);
* the system file loader produces a :class:`System` (devices, links, application);
* the analysis stage turns both (plus optional profiles) into a :class:`CostTable`, priced
  over an *extended chain* of :class:`Position` objects (pseudo layers plus model layers);
* the solver turns a :class:`CostTable` and an :class:`Objective` into a :class:`Plan`;
* the back end turns a :class:`Plan` into a deployment bundle.

Index conventions (see docs/INTERFACES.md): model layers are 0-based positions in the
topological order that ``partitioner inspect`` prints. ``LayerGraph.layers[k].cut_bytes`` is
the size of every tensor live across the cut *after* layer ``k`` (for the last layer, the
model outputs). Positions of the extended chain are numbered separately (0 is the source
pseudo layer when there is one); ``Position.layer`` maps back to the model layer index.
"""

from partitioner.ir.costs import (
    BundleCost,
    CostTable,
    NoiseTerm,
    Position,
    PositionKind,
    TransferCost,
    VariantCosts,
)
from partitioner.ir.graph import (
    Cut,
    Layer,
    LayerGraph,
    RowOp,
    TensorInfo,
)
from partitioner.ir.plan import (
    Estimate,
    ExitHead,
    Objective,
    ObjectiveKind,
    Part,
    Plan,
    PlanStatus,
    Route,
    RouteEnd,
    Stage,
)
from partitioner.ir.system import (
    INF,
    Application,
    Device,
    DeviceClass,
    Link,
    System,
)

__all__ = [
    "DeviceClass",
    "TensorInfo",
    "Layer",
    "Cut",
    "LayerGraph",
    "Device",
    "Link",
    "Application",
    "System",
    "PositionKind",
    "Position",
    "BundleCost",
    "TransferCost",
    "CostTable",
    "NoiseTerm",
    "VariantCosts",
    "ObjectiveKind",
    "Objective",
    "RowOp",
    "Part",
    "ExitHead",
    "Route",
    "Stage",
    "Estimate",
    "PlanStatus",
    "Plan",
    "INF",
    "RouteEnd",
]
