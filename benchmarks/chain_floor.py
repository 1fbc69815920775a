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

``framing="runtime"`` passes the same messages with the runtime's own transport instead
(:func:`runtime.transport.send_frame` / ``recv_frame`` on connections set up as the
runtime's, with kernel timeouts and a header shaped like a worker's: route, reply, token,
budget, the timings so far), still with none of the worker's logic.

Run beside ``runtime serve`` on the same bundle, the two floors split the chain's overhead
into what any chain of Python processes on this host pays (wake-ups on cold cores, copies
through the kernel, an interpreter step per message), what the runtime's framing adds,
and the runtime's own per-message work. The stage processes are started by
:class:`FloorChain`; this file is also their entry point::

    python benchmarks/chain_floor.py --bundle DIR --device D --next HOST:PORT \\
        --forward a,b --threads 1 [--framing least|runtime] --port-file F
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hops import _py_min_recv, spawn  # noqa: E402  (after the path)

__all__ = ["FloorChain", "send_tensors", "recv_tensors", "FRAMINGS"]

FRAMINGS = ("least", "runtime")
_TIMEOUT = 30.0  # seconds, on the runtime framing's connections (as a worker's)


def send_tensors(sock: socket.socket, tensors: Mapping[str, np.ndarray]) -> None:
    """One message: sizes, a JSON list of (name, dtype, shape), the bytes of each tensor."""
    arrays = [np.ascontiguousarray(a) for a in tensors.values()]
    head = json.dumps([[n, a.dtype.str, list(a.shape)]
                       for n, a in zip(tensors, arrays, strict=True)]).encode()
    body = sum(a.nbytes for a in arrays)
    parts: list[Any] = [len(head).to_bytes(4, "little") + body.to_bytes(4, "little") + head]
    parts += [memoryview(a).cast("B") for a in arrays if a.nbytes]  # type: ignore[arg-type]
    total = sum(len(p) for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:  # a blocking socket sends all but on a signal; finish plainly if not
        sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def recv_tensors(sock: socket.socket) -> dict[str, np.ndarray]:
    """The tensors of one message, as views into the one buffer it was read into."""
    head, body = _py_min_recv(sock)
    out, at = {}, 0
    entries: list[Any] = head  # type: ignore[assignment]  # (this framing's header: a list)
    for name, dtype, shape in entries:
        dt = np.dtype(dtype)
        count = math.prod(shape)
        out[name] = np.frombuffer(body, dt, count, at).reshape(shape)
        at += count * dt.itemsize
    return out


def _connect(address: str, framing: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    if framing == "runtime":
        from runtime.transport import connect

        return connect((host, int(port)), _TIMEOUT)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _accept(srv: socket.socket, framing: str) -> socket.socket:
    sock, _ = srv.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if framing == "runtime":
        from runtime.transport import set_timeout

        set_timeout(sock, _TIMEOUT)
    return sock


def first_header(request: int, devices: Sequence[str]) -> dict[str, Any]:
    """A header shaped like the executor's first one (route, reply, token, budget)."""
    return {"type": "infer", "unit": "0", "plan": "main", "id": f"floor-{request:08d}",
            "attempt": 1, "from": "input", "route": {d: f"127.0.0.1:{40000 + k}"
                                                     for k, d in enumerate(devices)},
            "reply": "127.0.0.1:39999", "budget": 30.0, "token": "t" * 43, "timings": []}


def _send(sock: socket.socket, framing: str, header: dict[str, Any],
          tensors: Mapping[str, np.ndarray]) -> None:
    if framing == "runtime":
        from runtime.transport import send_frame

        send_frame(sock, {**header, "rows": dict.fromkeys(tensors)}, tensors)
    else:
        send_tensors(sock, tensors)


def _recv(sock: socket.socket, framing: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if framing == "runtime":
        from runtime.transport import recv_frame

        frame = recv_frame(sock, max_body=1 << 31)
        return frame.header, dict(frame.tensors)
    return {}, recv_tensors(sock)


def _serve_stage(args: argparse.Namespace) -> int:
    """A stage process: accept the previous one, run every message, pass on what is needed."""
    from runtime.stages import StageRunner, open_bundle

    view = open_bundle(args.bundle)
    unit = next(u for u in view.units() if u.device == args.device)
    runner = StageRunner(unit, view.root, threads=args.threads)
    forward = [n for n in args.forward.split(",") if n]
    srv = socket.create_server(("127.0.0.1", 0))
    Path(args.port_file).write_text(str(srv.getsockname()[1]))
    closed: tuple[type[BaseException], ...] = (ConnectionError, OSError)
    if args.framing == "runtime":
        from runtime.protocol import ProtocolError
        from runtime.transport import ConnectionClosed

        closed += (ConnectionClosed, ProtocolError)
    prev = _accept(srv, args.framing)
    nxt = _connect(args.next, args.framing)
    with prev, nxt:
        while True:
            try:
                header, tensors = _recv(prev, args.framing)
            except closed:  # the caller closed the ring (or died): stop
                return 0
            t0 = time.perf_counter()
            tensors.update(runner.run(tensors))
            if header:  # what a worker adds to the header it passes on
                compute = time.perf_counter() - t0
                header["timings"] = [*header["timings"], {
                    "stage": unit.key, "device": unit.device, "wait": 0.0, "queue": 0.0,
                    "compute": compute, "start": time.time() - compute}]
                header["from"] = unit.key
            _send(nxt, args.framing, header, {n: tensors[n] for n in forward})


class FloorChain:
    """The stages of the bundle at ``bundle`` (one per device, in the plan's order) as
    floor processes passing tensors with ``framing`` (:data:`FRAMINGS`); :meth:`infer`
    sends the model's inputs round the ring."""

    def __init__(self, bundle: str | Path, threads: int | None = None,
                 framing: str = "least") -> None:
        from runtime.stages import open_bundle

        view = open_bundle(bundle)
        units = list(view.units())
        if len({u.device for u in units}) != len(units):
            raise ValueError(f"{bundle}: the floor chain takes one stage per device")
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r}: one of {', '.join(FRAMINGS)}")
        self.framing = framing
        self._devices = [u.device for u in units]
        self._requests = 0  # numbers the headers' request ids
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
                     "--framing", framing, "--port-file", str(pf)]
                    + ([] if threads is None else ["--threads", str(threads)]), pf))
                address = f"127.0.0.1:{pf.read_text().strip()}"
            self._first = _connect(address, framing)
            self._back = _accept(self._reply, framing)
        except BaseException:
            self.close()
            raise

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs for ``feeds``, computed round the ring."""
        self._requests += 1
        try:
            _send(self._first, self.framing, first_header(self._requests, self._devices),
                  {n: feeds[n] for n in self.inputs})
            return _recv(self._back, self.framing)[1]
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
    p.add_argument("--framing", choices=FRAMINGS, default="least")
    p.add_argument("--port-file", required=True)
    return _serve_stage(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
