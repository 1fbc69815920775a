"""The floor of a chain of Python processes, for ``runtime_overhead.py`` (issue 16).

Each stage of a compiled bundle runs in its own process with the runtime's own
:class:`runtime.stages.StageRunner` (same session options, same threads), and the tensors
go from process to process with the least framing any Python transport does (hops.py's
``py_min``: a length prefix and a JSON header per message, a new receive buffer each time,
blocking ``MSG_WAITALL`` sockets) and nothing else: one thread per process, no checks, no
deadlines, no authentication, no inbox. The chain is a ring on loopback::

    caller -> stage 0 -> stage 1 -> ... -> last stage -> caller

and every message carries what later stages or the model's outputs still need (a skip
tensor rides along instead of going straight to its reader: the least work per message).

Run beside ``runtime serve`` on the same bundle, it splits the chain's overhead into what
any chain of Python processes on this host pays (wake-ups on cold cores, copies through the
kernel, an interpreter step per message) and what is the runtime's own. The stage
processes are started by :class:`FloorChain`; this file is also their entry point::

    python benchmarks/chain_floor.py --bundle DIR --device D --next HOST:PORT \\
        --forward a,b --threads 1 --port-file F
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hops import _py_min_recv, spawn  # noqa: E402  (after the path)

__all__ = ["FloorChain", "send_tensors", "recv_tensors"]


def send_tensors(sock: socket.socket, tensors: Mapping[str, np.ndarray]) -> None:
    """One message: sizes, a JSON list of (name, dtype, shape), the bytes of each tensor."""
    arrays = [np.ascontiguousarray(a) for a in tensors.values()]
    head = json.dumps([[n, a.dtype.str, list(a.shape)]
                       for n, a in zip(tensors, arrays, strict=True)]).encode()
    body = sum(a.nbytes for a in arrays)
    parts: list[Any] = [len(head).to_bytes(4, "little") + body.to_bytes(4, "little") + head]
    parts += [memoryview(a).cast("B") for a in arrays if a.nbytes]
    total = sum(len(p) for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:  # a blocking socket sends all but on a signal; finish plainly if not
        sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def recv_tensors(sock: socket.socket) -> dict[str, np.ndarray]:
    """The tensors of one message, as views into the one buffer it was read into."""
    head, body = _py_min_recv(sock)
    out, at = {}, 0
    for name, dtype, shape in head:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(body, dt, count, at).reshape(shape)
        at += count * dt.itemsize
    return out


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _serve_stage(args: argparse.Namespace) -> int:
    """A stage process: accept the previous one, run every message, pass on what is needed."""
    from runtime.stages import StageRunner, open_bundle

    view = open_bundle(args.bundle)
    unit = next(u for u in view.units() if u.device == args.device)
    runner = StageRunner(unit, view.root, threads=args.threads)
    forward = [n for n in args.forward.split(",") if n]
    srv = socket.create_server(("127.0.0.1", 0))
    Path(args.port_file).write_text(str(srv.getsockname()[1]))
    prev, _ = srv.accept()
    prev.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nxt = _connect(args.next)
    with prev, nxt:
        while True:
            try:
                tensors = recv_tensors(prev)
            except (ConnectionError, OSError):
                return 0
            tensors.update(runner.run(tensors))
            send_tensors(nxt, {n: tensors[n] for n in forward})


class FloorChain:
    """The stages of the bundle at ``bundle`` (one per device, in the plan's order) as
    floor processes; :meth:`infer` sends the model's inputs round the ring."""

    def __init__(self, bundle: str | Path, threads: int | None = None) -> None:
        from runtime.stages import open_bundle

        view = open_bundle(bundle)
        units = list(view.units())
        if len({u.device for u in units}) != len(units):
            raise ValueError(f"{bundle}: the floor chain takes one stage per device")
        self.outputs = [o.name for o in view.outputs]
        self.inputs = [i.name for i in view.inputs]
        # what travels on after unit k: what it has (the model's inputs, outputs of units
        # up to k) that a later unit reads or the model outputs
        later: list[set[str]] = []
        have = set(self.inputs)
        for k, u in enumerate(units):
            have |= {t.name for t in u.outputs}
            need = set(self.outputs).union(*({t.name for t in v.inputs} for v in units[k + 1:]))
            later.append(have & need)
        self._work = tempfile.TemporaryDirectory(prefix="chain-floor-")
        self._reply = socket.create_server(("127.0.0.1", 0))
        address = f"127.0.0.1:{self._reply.getsockname()[1]}"
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            for k in reversed(range(len(units))):  # the last first: each needs its next
                pf = Path(self._work.name) / f"{k}.port"
                self._procs.append(spawn(
                    [__file__, "--bundle", str(bundle), "--device", units[k].device,
                     "--next", address, "--forward", ",".join(sorted(later[k])),
                     "--port-file", str(pf)]
                    + ([] if threads is None else ["--threads", str(threads)]), pf))
                address = f"127.0.0.1:{pf.read_text().strip()}"
            self._first = _connect(address)
            self._back, _ = self._reply.accept()
        except BaseException:
            self.close()
            raise

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs for ``feeds``, computed round the ring."""
        try:
            send_tensors(self._first, {n: feeds[n] for n in self.inputs})
            return recv_tensors(self._back)
        except (ConnectionError, OSError) as err:
            for proc in self._procs:  # a stage died: say why
                if proc.poll() is not None and proc.stderr is not None:
                    raise RuntimeError(f"a floor stage exited: "
                                       f"{proc.stderr.read().decode()[-1500:]}") from err
            raise

    def close(self) -> None:
        for s in ("_first", "_back"):
            sock = getattr(self, s, None)
            if sock is not None:
                sock.close()
        self._reply.close()
        for p in self._procs:
            p.kill()
            p.wait()
        self._work.cleanup()

    def __enter__(self) -> FloorChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a stage process of the floor chain")
    p.add_argument("--bundle", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--next", required=True, help="HOST:PORT the results go to")
    p.add_argument("--forward", default="", help="comma-separated tensors to pass on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--port-file", required=True)
    return _serve_stage(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
