"""A worker that holds the model: ``runtime serve --model MODEL.onnx --device NAME``.

Such a worker starts with no stages. The authenticated executor sends it a *plan* — the
manifest of a bundle compiled (or planned) on the executor's side: unit specs (layer
range, parts and rows, inputs, outputs, sends) and the expected SHA-256 of every file,
a few kilobytes — in an ``ensure`` frame (:mod:`runtime.ensure` is the client). The
worker then builds the units of its own device from its local copy of the model with the
back end's own unit writer (:func:`partitioner.backend.units.build_unit`, the function
``partitioner compile`` writes them with, so the bytes are identical), checks

* the model's fingerprint: the SHA-256 of the worker's model file must be the plan's
  ``model.sha256`` (and the front end must cut it into the plan's layers);
* every built file's SHA-256 against the plan's,

loads the units through the validating bundle loader, and serves them under the plan's
key. A re-plan thus moves a small plan over the network, never weights or code, and the
worker never loads a model (or anything executable) from a request. A build that fails
leaves nothing behind: the worker keeps serving what it served, and the error names the
unit and the mismatch.

The builder needs the compiler's front end (``partitioner.frontend``, the slicer and the
part builder), which imports only ``onnx`` and ``numpy``: the lean worker install
(README, "Lean worker") has both, so ``--model`` works there too; the solver, ``tqdm``
and PyTorch are never imported. A worker started with a bundle directory answers the same
``ensure`` frame from its disk (it rescans for new fallback bundles and checks the
digests), so the executor's side is the same for both kinds of worker.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagebundle.errors import UserError, fail
from stagebundle.load import sha256_file
from stagebundle.manifest import MANIFEST, Bundle, dumps

__all__ = ["ModelBuilder", "handle_ensure", "check_plan_key", "MAX_PLANS"]

log = logging.getLogger("runtime.build")

MAX_PLANS = 64  # plans one --model worker builds at most (disk held by built units)
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


def check_plan_key(key: Any) -> str:
    """A plan key (``"main"``, ``"fallback/without-hub"``, ``"adapt/p3"``): letters,
    digits, ``._-`` and ``/`` between non-empty names, at most 128 characters."""
    if not isinstance(key, str) or len(key) > 128 or not _KEY.fullmatch(key) \
            or ".." in key:
        fail(f"plan key {str(key)[:40]!r}: expected names of letters, digits, '._-' "
             f"joined by '/' (at most 128 characters)")
    return key


def _parse(doc: Any, where: Path) -> Bundle:
    try:
        return Bundle.from_json(doc, where)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"plan manifest: malformed ({err.__class__.__name__}: {err})"
                        ) from None


class ModelBuilder:
    """Builds one device's units of any plan of ``model`` into ``store``.

    Args:
        model: the worker's copy of the ONNX model (its external data next to it).
        store: folder for the built plans (default: a new temporary folder, removed by
            :meth:`close`).
    """

    def __init__(self, model: str | Path, store: str | Path | None = None) -> None:
        self.path = Path(model)
        if not self.path.is_file():
            fail(f"--model {model}: no such file")
        try:
            import partitioner.frontend  # noqa: F401  (the front end, onnx and numpy)
        except ImportError as err:
            fail(f"--model needs the compiler's front end and onnx ({err}); install onnx "
                 f"or serve a compiled bundle directory instead")
        self.sha256 = sha256_file(self.path)
        self._own_store = store is None
        self.store = Path(tempfile.mkdtemp(prefix="runtime-model-")) if store is None \
            else Path(store)
        try:
            self.store.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            fail(f"--store {store}: cannot make the folder ({err.strerror or err})")
        self._prepared: dict[tuple[Any, ...], Any] = {}

    def close(self) -> None:
        if self._own_store:
            shutil.rmtree(self.store, ignore_errors=True)

    def prepared(self, bundle: Bundle) -> Any:
        """The model prepared as the plan's was: its input shapes and granularity; the
        fingerprint and the layer list must match the plan's."""
        spec = bundle.model
        if spec.sha256 != self.sha256:
            fail(f"model fingerprint: the plan is for model sha256 {spec.sha256[:16]}..., "
                 f"this worker's {self.path.name} has {self.sha256[:16]}...")
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in spec.inputs}
        key = (tuple(sorted(shapes.items())), spec.granularity)
        if key not in self._prepared:
            from partitioner.errors import UserError as CompilerError
            from partitioner.frontend import load_model

            try:
                # big inline weights stay in the model file (read when a unit is
                # written): the worker keeps the prepared model for later plans
                prepared = load_model(self.path, shapes=shapes, granularity=spec.granularity,
                                      lazy_weights=True)
            except CompilerError as err:
                fail(f"--model {self.path.name}: {err}")
            names = tuple(layer.name for layer in prepared.graph.layers)
            if spec.layers and names != tuple(spec.layers):
                fail(f"model {self.path.name}: the front end here cuts it into "
                     f"{len(names)} layers, the plan has {len(spec.layers)} (a different "
                     f"compiler version?)")
            self._prepared[key] = prepared
        return self._prepared[key]

    def build(self, doc: Mapping[str, Any], device: str, out: Path) -> list[str]:
        """Write ``device``'s units of the plan ``doc`` (a manifest) and the manifest
        into the empty folder ``out``; the unit keys built.

        Raises:
            UserError: naming the unit and the mismatch (fingerprint, file name, digest).
        """
        from partitioner.backend.parts import build_parts
        from partitioner.backend.units import build_unit, stage_of, unit_file_name

        bundle = _parse(doc, out)
        prepared = self.prepared(bundle)
        built = []
        for spec in bundle.stages:
            mine = [u for u in spec.units if u.device == device]
            if not mine:
                continue
            stage = stage_of(spec)
            parts = list(build_parts(prepared, stage)) if spec.parts else None
            for unit in mine:
                what = f"stage {unit.key} ({device})"
                expected = unit_file_name(stage, unit.part)
                if unit.file != expected:
                    fail(f"{what}: file {unit.file!r} is not the back end's name "
                         f"{expected!r}")
                name, data, _ = build_unit(prepared, stage, unit.part, out, parts)
                if data != unit.external_data:
                    fail(f"{what}: built with external data {data!r}, the plan says "
                         f"{unit.external_data!r}")
                _check_digest(out / name, unit.sha256, what)
                if data is not None:
                    _check_digest(out / data, unit.external_data_sha256, f"{what} data")
                built.append(unit.key)
        (out / MANIFEST).write_text(dumps(dict(doc)) + "\n", encoding="utf-8")
        return built


def _check_digest(path: Path, expected: str | None, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        fail(f"{what}: {path.name} built from the model has sha256 {got[:16]}..., the plan "
             f"expects {str(expected)[:16]}...")


def _same_plan(served: Bundle, doc: Mapping[str, Any]) -> None:
    """Refuse a plan sent under a key already served with other stages or sends."""
    other = _parse(doc, served.path)
    if other.model.sha256 != served.model.sha256:
        fail("served with another model (sha256 differs)")
    mine = [s.to_json() for s in served.stages], [s.to_json() for s in served.input_sends]
    theirs = [s.to_json() for s in other.stages], [s.to_json() for s in other.input_sends]
    if mine != theirs:
        changed = next((f"stage {a['id']}" for a, b in zip(mine[0], theirs[0], strict=False)
                        if a != b), "the stage graph")
        fail(f"served with other stages ({changed} differs); a new plan needs a new key")


def _manifest_of(h: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's manifest from an ``ensure`` header: a JSON object, or the manifest
    file's text (``runtime.adapt`` sends that, with its ``sha256``, checked here)."""
    import hashlib
    import json

    doc = h.get("manifest")
    if isinstance(doc, str):
        digest = h.get("sha256")
        if digest is not None and hashlib.sha256(doc.encode()).hexdigest() != digest:
            fail("the manifest's text does not have the sha256 sent with it")
        try:
            doc = json.loads(doc)
        # (ValueError: also an integer of more digits than Python converts)
        except (ValueError, RecursionError) as err:
            fail(f"the manifest is not valid JSON ({err.__class__.__name__})")
    if not isinstance(doc, dict):
        fail("'manifest' must be the plan's manifest (a JSON object or its text)")
    return doc


def handle_ensure(worker: Any, h: Mapping[str, Any]) -> dict[str, Any]:
    """The reply to an authenticated ``ensure`` frame: ``{"type": "ensure", "plan": KEY,
    "manifest": {...}}``.

    A ``--model`` worker builds and loads its units of a new plan; a worker of a bundle
    directory rescans it for the plan (``fallback/<name>``). Either way the plan's units
    of this device then run here and agree with the manifest, or the reply is an
    ``error`` naming what differs, and what was served before is served unchanged.
    """
    start = time.monotonic()
    key = "?"
    try:
        key = check_plan_key(h.get("plan"))
        doc = _manifest_of(h)
        built: list[str] = []
        if key not in worker.views:
            if worker.builder is None:
                worker.reload()
                if key not in worker.views:
                    fail(f"not in bundle directory {worker.bundle_dir}, and this worker "
                         f"holds no model to build it (serve it with --model)")
            else:
                built = _build_plan(worker, key, doc)
        _same_plan(worker.views[key].bundle, doc)
    except UserError as err:
        log.warning("plan %s refused: %s", key, err)
        return {"type": "error", "code": "bad_plan", "plan": key,
                "message": f"plan {key}: {err}"}
    units = sorted(u for p, u in worker.runners if p == key)
    return {"type": "ensured", "plan": key, "device": worker.device, "units": units,
            "built": built, "seconds": time.monotonic() - start}


def _build_plan(worker: Any, key: str, doc: Mapping[str, Any]) -> list[str]:
    """Build, verify, load and serve ``worker.device``'s units of plan ``key``."""
    from runtime.stages import open_bundle

    builder: ModelBuilder = worker.builder
    with worker.build_lock:
        if key in worker.views:  # another connection built it meanwhile
            return []
        if len(worker.views) >= MAX_PLANS:
            fail(f"this worker serves {MAX_PLANS} plans already")
        final = builder.store / key.replace("/", "__")
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=builder.store))
        try:
            built = builder.build(doc, worker.device, tmp)
            shutil.rmtree(final, ignore_errors=True)  # a stale folder of a failed start
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            view = open_bundle(final, key=key, device=worker.device)
            worker.add_plan(key, view)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    log.info("plan %s: built %s from %s", key, ", ".join(built) or "no unit",
             builder.path.name)
    return built
