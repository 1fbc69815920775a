"""One hop of a tensor on loopback: raw sockets, the runtime's framed TCP, the floor of
any framing written in Python (``py_min``), gRPC.

The per-hop part of ``runtime_overhead.py`` (``--hops-only`` there runs it alone): echo
servers in their own processes, interleaved rounds, wall-clock medians and CPU per hop.
Run by that script; ``python benchmarks/hops.py --echo-server KIND --port-file F`` is how
it starts the echo processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["SIZES", "bench_hops", "spawn", "median_time"]

SIZES = {  # name -> shape (float32)
    "1x1000": (1, 1000),
    "1x256x14x14": (1, 256, 14, 14),
    "1x3x224x224": (1, 3, 224, 224),
    "1x64x112x112": (1, 64, 112, 112),
    "1x3x640x640": (1, 3, 640, 640),
}


# --------------------------------------------------------------------------- echo servers


def _accept_forever(port_file: str, serve: Any, timeout: float | None = None) -> None:
    """Listen on a free loopback port (written to ``port_file``); ``serve`` each
    connection in its own thread, as the runtime's servers do; ``timeout``: set as the
    runtime's servers set theirs."""
    srv = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(srv.getsockname()[1]))
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if timeout is not None:
            from runtime.transport import set_timeout

            set_timeout(conn, timeout)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _echo_tcp(port_file: str) -> None:
    from runtime.transport import ConnectionClosed, recv_frame, send_frame

    def serve(c: socket.socket) -> None:
        with c:
            while True:
                try:
                    f = recv_frame(c, max_body=1 << 30)
                except (ConnectionClosed, OSError):
                    return
                send_frame(c, {"type": "echo"}, f.tensors)

    # a timeout, as on a worker's connections
    _accept_forever(port_file, serve, timeout=600.0)


def _echo_raw(port_file: str) -> None:
    """The floor: blocking sockets, ``recv_into`` a reused buffer, ``sendall`` it back.

    A connection starts with the 8-byte size of every message that follows (sizes are
    known in advance, so no per-message header, no allocation, no decoding) and a byte
    saying whether to read with ``MSG_WAITALL`` (one call per message) or a plain loop.
    """
    def serve(c: socket.socket) -> None:
        with c:
            size = bytearray(9)
            if not _raw_fill(c, memoryview(size)):
                return
            buf = memoryview(bytearray(int.from_bytes(size[:8], "little")))
            while _raw_fill(c, buf, bool(size[8])):
                c.sendall(buf)

    _accept_forever(port_file, serve)


def _raw_fill(sock: socket.socket, view: memoryview, waitall: bool = False) -> bool:
    got, flags = 0, socket.MSG_WAITALL if waitall else 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, flags)
        if n == 0:
            return False
        got += n
    return True


def _py_min_send(sock: socket.socket, header: dict[str, Any], arr: np.ndarray) -> None:
    head = json.dumps(header).encode()
    sock.sendmsg([len(head).to_bytes(4, "little") + arr.nbytes.to_bytes(4, "little") + head,
                  memoryview(arr).cast("B")])  # type: ignore[arg-type]


def _py_min_recv(sock: socket.socket) -> tuple[dict[str, Any], np.ndarray]:
    sizes = bytearray(8)
    if not _raw_fill(sock, memoryview(sizes), True):
        raise ConnectionError("closed")
    head = bytearray(int.from_bytes(sizes[:4], "little"))
    body = np.empty(int.from_bytes(sizes[4:], "little"), np.uint8)
    if not (_raw_fill(sock, memoryview(head), True)
            and _raw_fill(sock, memoryview(body), True)):  # type: ignore[arg-type]
        raise ConnectionError("closed")
    return json.loads(head), body


def _echo_py_min(port_file: str) -> None:
    """The floor of any framing in Python: a length prefix and a JSON header per message,
    a new receive buffer each time (the receiver hands the tensor on), blocking sockets,
    ``MSG_WAITALL``; no checks, no deadlines, no tensor descriptors."""
    def serve(c: socket.socket) -> None:
        with c:
            try:
                while True:
                    _, body = _py_min_recv(c)
                    _py_min_send(c, {"type": "echo"}, body)
            except (ConnectionError, OSError):
                return

    _accept_forever(port_file, serve)


def _echo_grpc(port_file: str) -> None:
    import concurrent.futures as cf

    import grpc

    def echo(req: bytes, ctx: Any) -> bytes:
        n = int.from_bytes(req[:4], "little")
        head = json.loads(req[4:4 + n])
        # the receiver gets a numpy array, as with the TCP transport (zero-copy view)
        np.frombuffer(req, dtype=head["dtype"], offset=4 + n)
        return req

    server = grpc.server(cf.ThreadPoolExecutor(4), options=[
        ("grpc.max_receive_message_length", 1 << 30),
        ("grpc.max_send_message_length", 1 << 30)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def spawn(args: list[str], port_file: Path, timeout: float = 60.0) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    end = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"{args}: exited: {proc.stderr.read().decode()[-1000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"{args}: did not start")
        time.sleep(0.05)
    return proc


def _frame_cpu_us(arr: np.ndarray, n: int = 2000) -> dict[str, float]:
    """CPU cost of one frame's encoding and decoding alone (no socket), microseconds."""
    from runtime.protocol import PREFIX, decode_tensors, encode, parse_header, unpack_prefix

    header = {"type": "infer", "id": "req-000001", "plan": "main", "stage": "1",
              "token": "t" * 32, "timings": []}
    body = np.empty(arr.nbytes + 64, np.uint8)

    def enc() -> None:
        encode(header, {"t": arr})

    first = bytes(encode(header, {"t": arr})[0])
    head = first[PREFIX.size:]

    def dec() -> None:
        unpack_prefix(first[:PREFIX.size], 1 << 20, 1 << 30)
        decode_tensors(parse_header(head), body)

    def alloc() -> None:
        np.empty(arr.nbytes, np.uint8)

    return {k: median_time(fn, n) * 1e6 for k, fn in
            (("encode", enc), ("decode", dec), ("allocate_body", alloc))}


def bench_hops(iters: int, work: Path, repeats: int = 5,
               sizes: list[str] | None = None, warm_up: int = 500) -> list[dict[str, Any]]:
    """Median one-way time (half a round trip) per size: raw sockets, frames, the floor
    of any Python framing (``py_min``, see :func:`_echo_py_min`), gRPC; each connection
    first makes ``warm_up`` round trips.

    The three are measured in the same run, in ``repeats`` interleaved rounds (so a load
    spike from another process hits all of them alike); each figure is the median over
    rounds of each round's median, and ``tcp_over_raw`` the median of the per-round ratios.
    """
    import grpc

    from runtime.transport import connect, recv_frame, send_frame

    rows = []
    procs = {}
    try:
        for kind in ("tcp", "grpc", "raw", "py_min"):
            pf = work / f"echo-{kind}.port"
            procs[kind] = spawn([__file__, "--echo-server", kind, "--port-file", str(pf)], pf)
        port = {k: int((work / f"echo-{k}.port").read_text()) for k in procs}
        sock = connect(("127.0.0.1", port["tcp"]), 30)
        py_min = socket.create_connection(("127.0.0.1", port["py_min"]))
        py_min.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = grpc.insecure_channel(f"127.0.0.1:{port['grpc']}", options=[
            ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30)])
        call = channel.unary_unary("/bench.Echo/Echo")
        for name, shape in SIZES.items():
            if sizes and name not in sizes:
                continue
            arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            n = max(20, iters if arr.nbytes < 4e6 else iters // 4)
            raws = {}
            for mode in (0, 1):  # plain recv_into loop, MSG_WAITALL
                raws[mode] = socket.create_connection(("127.0.0.1", port["raw"]))
                raws[mode].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raws[mode].sendall(arr.nbytes.to_bytes(8, "little") + bytes([mode]))
            raw_back = memoryview(bytearray(arr.nbytes))
            header = {"type": "infer", "id": "req-000001", "plan": "main", "stage": "1",
                      "token": "t" * 32, "timings": []}

            def raw_once(a: np.ndarray = arr, back: memoryview = raw_back,
                         s: socket.socket = raws[0], waitall: bool = False) -> None:
                s.sendall(memoryview(a).cast("B"))  # type: ignore[arg-type]
                if not _raw_fill(s, back, waitall):
                    raise ConnectionError("raw echo closed")

            def raw_waitall_once(a: np.ndarray = arr, back: memoryview = raw_back,
                                 s: socket.socket = raws[1]) -> None:
                raw_once(a, back, s, True)

            def tcp_once(a: np.ndarray = arr, header: dict[str, Any] = header) -> None:
                send_frame(sock, header, {"t": a})
                f = recv_frame(sock, max_body=1 << 30)
                assert f.tensors["t"].shape == a.shape

            def py_min_once(a: np.ndarray = arr, header: dict[str, Any] = header) -> None:
                _py_min_send(py_min, header, a)
                _py_min_recv(py_min)

            def grpc_once(a: np.ndarray = arr) -> None:
                head = json.dumps({"dtype": "float32", "shape": list(a.shape)}).encode()
                payload = len(head).to_bytes(4, "little") + head + a.tobytes()
                back = call(payload, timeout=30)
                np.frombuffer(back, dtype=np.float32, offset=4 + len(head)).reshape(a.shape)

            fns = (("raw", raw_once), ("raw_waitall", raw_waitall_once), ("tcp", tcp_once),
                   ("py_min", py_min_once), ("grpc", grpc_once))
            rounds: dict[str, list[float]] = {kind: [] for kind, _ in fns}
            # a new loopback connection is slower for its first several hundred messages
            # (the kernel grows its buffers): every connection is warmed up alike first
            for _, fn in fns:
                for _ in range(warm_up):
                    fn()
            cpu = dict.fromkeys(rounds, 0.0)  # CPU seconds, both ends, over all rounds
            calls = dict.fromkeys(rounds, 0)
            for _ in range(repeats):
                for kind, fn in fns:
                    pid = procs["raw" if kind.startswith("raw") else kind].pid
                    c0, s0 = time.process_time(), _cpu_seconds(pid)
                    rounds[kind].append(median_time(fn, n) / 2 * 1e3)
                    cpu[kind] += time.process_time() - c0 + _cpu_seconds(pid) - s0
                    calls[kind] += n + 3  # (with median_time's warm-up calls)
            for r in raws.values():
                r.close()
            row: dict[str, Any] = {"tensor": name, "bytes": int(arr.nbytes), "rounds": rounds}
            for kind in rounds:
                row[f"{kind}_hop_ms"] = statistics.median(rounds[kind])
            def ratio(num: list[float], den: list[float]) -> float:
                """The median over rounds of each round's ratio."""
                return statistics.median(t / r for t, r in zip(num, den, strict=True))

            # the two raw loops take turns being the faster one (whether the plain loop's
            # recv_into wakes once per segment varies from run to run): against the faster
            # of them in each round too
            best = [min(a, b) for a, b in zip(rounds["raw"], rounds["raw_waitall"],
                                              strict=True)]
            for floor in ("raw", "raw_waitall", "py_min"):
                row[f"tcp_over_{floor}"] = ratio(rounds["tcp"], rounds[floor])
            row["py_min_over_raw"] = ratio(rounds["py_min"], rounds["raw"])
            for kind in ("tcp", "py_min"):
                row[f"{kind}_over_best_raw"] = ratio(rounds[kind], best)
            # CPU per hop (a call is a round trip: two hops) is what the load of other
            # processes distorts least; the wall-clock figures above are medians
            row["cpu_per_hop_us"] = {k: cpu[k] / (2 * calls[k]) * 1e6 for k in rounds}
            row["cpu_us"] = _frame_cpu_us(arr)
            rows.append(row)
            print(f"hop {name:>14} {arr.nbytes / 1e6:7.2f} MB: raw {row['raw_hop_ms']:.3f} ms"
                  f" (waitall {row['raw_waitall_hop_ms']:.3f}), tcp {row['tcp_hop_ms']:.3f} ms"
                  f" ({row['tcp_over_raw']:.2f}x raw, {row['tcp_over_raw_waitall']:.2f}x"
                  f" waitall, {row['tcp_over_best_raw']:.2f}x the faster), Python floor"
                  f" {row['py_min_hop_ms']:.3f} ms ({row['py_min_over_best_raw']:.2f}x the"
                  f" faster raw), grpc {row['grpc_hop_ms']:.3f} ms;"
                  f" CPU per hop, both ends: raw"
                  f" {row['cpu_per_hop_us']['raw']:.0f} us, tcp"
                  f" {row['cpu_per_hop_us']['tcp']:.0f} us", file=sys.stderr)
        sock.close()
        py_min.close()
        channel.close()
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    return rows


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_time(fn: Any, n: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)



def _main() -> int:
    p = argparse.ArgumentParser(description="echo server for the hop benchmark")
    p.add_argument("--echo-server", choices=("tcp", "grpc", "raw", "py_min"), required=True)
    p.add_argument("--port-file", required=True)
    args = p.parse_args()
    {"tcp": _echo_tcp, "grpc": _echo_grpc, "raw": _echo_raw,
     "py_min": _echo_py_min}[args.echo_server](args.port_file)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
