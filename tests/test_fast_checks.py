"""The fast message and input checks on the runtime's hot path agree with the full ones.

``BundleView.message_matches`` and ``BundleView.inputs_match`` compare a message with
what they worked out once per (sender, receiver); when they say yes, the full checks
(:func:`runtime.stages.check_message`, :func:`runtime.local.check_model_inputs`), which
name what is wrong, must pass too, and the correct message must take the fast path.
Every declared send of bundles with skip sends, fan-out and row parts is tried, each
with the faults a peer could send.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.local import check_model_inputs
from runtime.stages import BundleView, check_message, open_bundle
from stagebundle.errors import UserError
from stagebundle.manifest import INPUT, OUTPUT
from tests.test_runtime_graph_fixtures import parts_bundle, skip_bundle

Rows = dict[str, tuple[int, int] | None]


@pytest.fixture(scope="module", params=["skip", "parts-middle", "parts-edges"])
def view(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> BundleView:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "skip":
        built = skip_bundle(root)
    else:
        built = parts_bundle(root, 2, request.param.split("-")[1])
    return open_bundle(built.bundle)


def _sends(view: BundleView) -> Iterator[tuple[str, str]]:
    for send in view.bundle.input_sends:
        yield INPUT, send.to
    for unit in view.units():
        for send in unit.sends:
            yield unit.key, send.to


def _correct(view: BundleView, sender: str, to: str
             ) -> tuple[dict[str, np.ndarray], Rows]:
    send = view.send(sender, to)
    assert send is not None
    specs = view.receives(to)
    tensors, rows = {}, {}
    for p in send.tensors:
        spec = specs[p.name]
        shape = list(spec.shape)
        if p.rows is not None and len(shape) > 2:
            shape[2] = p.rows[1] - p.rows[0] + 1
        tensors[p.name] = np.zeros(shape, np.dtype(spec.dtype))
        rows[p.name] = p.rows
    return tensors, rows


def _faults(tensors: dict[str, np.ndarray], rows: Rows
            ) -> Iterator[tuple[str, dict[str, np.ndarray], Rows]]:
    name = next(iter(tensors))
    arr = tensors[name]
    other = np.float64 if arr.dtype != np.float64 else np.float32
    yield "dtype", {**tensors, name: arr.astype(other)}, rows
    yield "byte order", {**tensors, name: arr.astype(arr.dtype.newbyteorder(">"))}, rows
    yield "shape", {**tensors, name: np.zeros((*arr.shape[:-1], arr.shape[-1] + 1),
                                             arr.dtype)}, rows
    yield "rank", {**tensors, name: arr.reshape(-1)}, rows
    yield "extra tensor", {**tensors, "stray": arr}, {**rows, "stray": None}
    yield "missing tensor", {k: v for k, v in tensors.items() if k != name}, \
        {k: v for k, v in rows.items() if k != name}
    r = rows[name]
    yield "rows", tensors, {**rows, name: (0, 0) if r is None else (r[0] + 1, r[1] + 1)}


def _full_check_passes(view: BundleView, sender: str, to: str,
                       tensors: dict[str, np.ndarray], rows: Rows) -> bool:
    try:
        check_message(view, sender, to, tensors, rows, "test")
    except UserError:
        return False
    return True


def test_the_correct_message_takes_the_fast_path(view: BundleView) -> None:
    pairs = list(_sends(view))
    assert any(to == OUTPUT for _, to in pairs) and any(s == INPUT for s, _ in pairs)
    for sender, to in pairs:
        tensors, rows = _correct(view, sender, to)
        assert view.message_matches(sender, to, tensors, rows), (sender, to)
        check_message(view, sender, to, tensors, rows, "test")


def test_a_fast_yes_is_never_a_full_no(view: BundleView) -> None:
    refused = 0
    for sender, to in _sends(view):
        tensors, rows = _correct(view, sender, to)
        for fault, bad, bad_rows in _faults(tensors, rows):
            fast = view.message_matches(sender, to, bad, bad_rows)
            full = _full_check_passes(view, sender, to, bad, bad_rows)
            assert not (fast and not full), (sender, to, fault)
            assert not fast, (sender, to, fault)  # every fault here leaves the fast path
            refused += not full
    assert refused > 0


def test_an_undeclared_send_is_left_to_the_full_check(view: BundleView) -> None:
    units = [u.key for u in view.units()]
    tensors, rows = _correct(view, *next(_sends(view)))
    assert not view.message_matches(units[-1], units[0], tensors, rows)
    with pytest.raises(UserError, match="sends nothing"):
        check_message(view, units[-1], units[0], tensors, rows, "test")


def test_model_inputs_fast_and_full(view: BundleView) -> None:
    good = {t.name: np.zeros(t.shape, np.dtype(t.dtype)) for t in view.inputs}
    assert view.inputs_match(good)
    check_model_inputs(view, good)
    name = next(iter(good))
    bad_inputs = [
        {**good, name: good[name].astype(np.float64)},
        {**good, name: good[name].reshape(-1)},
        {**good, "stray": good[name]},
        {k: v for k, v in good.items() if k != name},
    ]
    for bad in bad_inputs:
        assert not view.inputs_match(bad)
        with pytest.raises(UserError):
            check_model_inputs(view, bad)
    # not an ndarray: the full check decides (a list of floats is float64: refused)
    as_list = {**good, name: good[name].tolist()}
    assert not view.inputs_match(as_list)
    with pytest.raises(UserError, match="dtype float64"):
        check_model_inputs(view, as_list)


def test_paths(tmp_path: Path) -> None:
    """The fixture bundles are what the module says (row parts carry rows)."""
    built = parts_bundle(tmp_path, 2, "middle")
    view = open_bundle(built.bundle)
    assert any(p.rows is not None for u in view.units() for s in u.sends
               for p in s.tensors)
