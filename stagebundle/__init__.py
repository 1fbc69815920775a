"""The deployment bundle of the stage graph: its schema, loader and shared mechanics.

The compiler's back end writes bundles, the runtime reads them; this package is the one
definition both use. It depends only on the standard library, numpy and (for checking
external-data references) onnx, so a lean worker needs nothing of the compiler.

* :mod:`stagebundle.manifest`: the manifest dataclasses (schema 2), with
  :mod:`stagebundle.tensors` (tensor specs, sends, row pieces), :mod:`stagebundle.fields`
  (the JSON field readers) and :mod:`stagebundle.schema1` (schema 1 upgraded);
* :mod:`stagebundle.exits`: the early-exit rule a head's output is checked against;
* :mod:`stagebundle.load`: :func:`load_bundle`, which trusts nothing in the directory;
* :mod:`stagebundle.graph`: who waits for whom, what each unit sends, row pieces;
* :mod:`stagebundle.dtypes`: the one byte-size helper (sub-byte types included);
* :mod:`stagebundle.errors`: ``UserError`` / ``InternalError`` / ``fail``.
"""

from stagebundle.errors import InternalError, UserError, fail
from stagebundle.load import load_bundle, safe_path, sha256_file
from stagebundle.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
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

__all__ = ["UserError", "InternalError", "fail", "load_bundle", "safe_path", "sha256_file",
           "MANIFEST", "SCHEMA_VERSION", "Bundle", "ModelSpec", "PartSpec", "Piece", "Send",
           "StageSpec", "TensorSpec", "Unit", "dumps", "unit_key"]
