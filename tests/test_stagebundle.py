"""The shared stage-graph mechanics: row pieces, inboxes, the schema-1 upgrade."""

from __future__ import annotations

import numpy as np
import pytest

from stagebundle.errors import UserError
from stagebundle.graph import Inbox, assemble, take_rows
from stagebundle.manifest import TensorSpec


def _x(h: int = 7) -> np.ndarray:
    return np.arange(2 * 3 * h * 4, dtype=np.float32).reshape(2, 3, h, 4)


def test_take_rows_cuts_absolute_rows_from_a_held_piece():
    x = _x()
    assert np.array_equal(take_rows(x, None, (2, 4), "t"), x[:, :, 2:5])
    piece = x[:, :, 3:7]
    assert np.array_equal(take_rows(piece, (3, 6), (4, 5), "t"), x[:, :, 4:6])
    with pytest.raises(UserError, match=r"rows \[2, 5\] asked for, rows \[3, 6\] held"):
        take_rows(piece, (3, 6), (2, 5), "t")
    with pytest.raises(UserError, match="whole tensor was asked for"):
        take_rows(piece, (3, 6), None, "t")


def test_assemble_tiles_pieces_exactly_once():
    x = _x()
    whole = TensorSpec("x", x.shape, "float32")
    got = assemble(whole, [((4, 6), x[:, :, 4:]), ((0, 3), x[:, :, :4])], "r")
    assert np.array_equal(got, x)
    part = TensorSpec("x", (2, 3, 3, 4), "float32", rows=(2, 4))
    assert np.array_equal(assemble(part, [((2, 4), x[:, :, 2:5])], "r"), x[:, :, 2:5])
    with pytest.raises(UserError, match="do not cover its rows exactly once"):
        assemble(whole, [((0, 3), x[:, :, :4]), ((3, 6), x[:, :, 3:])], "r")
    with pytest.raises(UserError, match="do not fit"):
        assemble(part, [((0, 2), x[:, :, :3])], "r")


def test_inbox_waits_for_every_sender_and_refuses_repeats_and_strangers():
    box = Inbox(("input", "0"))
    assert not box.add("input", {"a": (None, _x())})
    with pytest.raises(UserError, match="second message from 'input'"):
        box.add("input", {"a": (None, _x())})
    with pytest.raises(UserError, match="unexpected message from '5'"):
        box.add("5", {})
    assert box.add("0", {"b": (None, _x(3))})
    got = box.tensors([TensorSpec("a", (2, 3, 7, 4), "float32")], "r")
    assert np.array_equal(got["a"], _x())
    with pytest.raises(UserError, match="no sender sent tensor c"):
        box.tensors([TensorSpec("c", (1,), "float32")], "r")


def test_byte_sizes_know_sub_byte_types():
    assert TensorSpec("q", (3, 5), "int4").nbytes == 8
    assert TensorSpec("f", (3, 5), "float16").nbytes == 30
    with pytest.raises(UserError, match="unknown dtype 'float33'"):
        TensorSpec.from_json({"name": "z", "shape": [1], "dtype": "float33"})
