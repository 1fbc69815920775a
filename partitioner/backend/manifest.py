"""The back end's handle on the bundle schema.

The schema has one definition, :mod:`stagebundle` (which the runtime reads too); this
module only adds what the writer stamps on every bundle (:data:`PRODUCER`) and keeps the
names the back end and its users import from here.
"""

from __future__ import annotations

from partitioner import __version__
from stagebundle.load import load_bundle, safe_path, sha256_file
from stagebundle.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
    Endpoint,
    ModelSpec,
    PartSpec,
    Piece,
    Send,
    StageSpec,
    TensorSpec,
    Unit,
    dumps,
    unit_key,
)

__all__ = [
    "SCHEMA_VERSION",
    "PRODUCER",
    "MANIFEST",
    "Endpoint",
    "TensorSpec",
    "ModelSpec",
    "PartSpec",
    "StageSpec",
    "Piece",
    "Send",
    "Unit",
    "Bundle",
    "load_bundle",
    "sha256_file",
    "safe_path",
    "dumps",
    "unit_key",
]

PRODUCER = f"partitioner {__version__}"
