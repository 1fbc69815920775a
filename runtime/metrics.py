"""What a worker measures while it serves, and its Prometheus text exposition.

Every worker keeps a :class:`WorkerMetrics`:

* per unit (plan key, unit key): requests run, and the sums and smoothed (EWMA) values of
  its **compute** time (ONNX Runtime's run), **queue** time (complete, waiting behind
  earlier requests) and **wait** time (its first message in, waiting for the others);
* per link it sends on (receiving device; results go to the bundle's destination
  device, else ``"reply"``): transfers, bytes and seconds spent in the send, and a
  smoothed throughput (bytes / seconds of one transfer) over the transfers of at least
  :data:`MIN_LINK_BYTES` (smaller ones fit in the socket buffer and time only the copy);
  and every :data:`LINK_SAMPLE`-th transfer to a peer (the first included) asks the
  receiver for its ``accepted`` answer and is timed until it comes: that *acknowledged
  transfer time* (bytes on the wire, the link's delay both ways, the receiver's checks)
  is what calibration compares with the cost model's ``bytes / bandwidth + latency``;
* the process's CPU load (fraction of one core, from ``/proc/self/stat`` between two
  samples) and resident memory (``/proc/self/status``), and the host's 1-minute load
  average, core count and available memory (``/proc/loadavg``, ``/proc/meminfo``).

Read from ``/proc`` directly (no psutil): a lean worker needs only onnxruntime and numpy.
The executor sees them in every result (the per-unit ``timings``) and, authenticated, in
``health`` and ``metrics`` replies (:meth:`WorkerMetrics.snapshot`); ``runtime serve
--metrics-port P`` serves :func:`prometheus_text` over HTTP (:class:`MetricsServer`,
stdlib ``http.server`` on a thread).
"""

from __future__ import annotations

import http.server
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["WorkerMetrics", "MetricsServer", "prometheus_text", "process_figures",
           "host_figures", "MIN_LINK_BYTES", "EWMA_ALPHA", "LINK_SAMPLE"]

log = logging.getLogger("runtime.metrics")

MIN_LINK_BYTES = 64 << 10  # smaller sends time the copy into the socket buffer only
LINK_SAMPLE = 8  # one transfer in this many per peer waits for the receiver's answer
EWMA_ALPHA = 0.2  # weight of the newest sample in the smoothed per-unit/per-link figures
_CPU_SAMPLE = 1.0  # seconds between two CPU-time samples (several pollers share one)


def _ewma(old: float | None, new: float, alpha: float = EWMA_ALPHA) -> float:
    return new if old is None else alpha * new + (1.0 - alpha) * old


@dataclass
class _Unit:
    count: int = 0
    compute: float = 0.0
    queue: float = 0.0
    wait: float = 0.0
    compute_ewma: float | None = None
    queue_ewma: float | None = None


@dataclass
class _Link:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0
    throughput: float | None = None  # bytes / s, EWMA over sends of >= MIN_LINK_BYTES
    acked: int = 0  # transfers timed until the receiver's answer
    acked_seconds: float | None = None  # EWMA of their times
    acked_bytes: float | None = None  # EWMA of their sizes
    acked_seconds_sum: float = 0.0  # totals (a reader's window: differences)
    acked_bytes_sum: int = 0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _kib_field(text: str, key: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (``/proc/self/stat``, else ``os.times``)."""
    stat = _read("/proc/self/stat")
    if stat:
        fields = stat.rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    t = os.times()
    return t.user + t.system


def host_figures() -> dict[str, float | int | None]:
    """The host's load average (1 min), cores, total and available memory in bytes."""
    load = _read("/proc/loadavg").split()
    mem = _read("/proc/meminfo")
    return {"load1": float(load[0]) if load else None, "cpus": os.cpu_count() or 1,
            "mem_total": _kib_field(mem, "MemTotal"),
            "mem_available": _kib_field(mem, "MemAvailable")}


class _CpuSampler:
    """CPU load of this process in cores, over the last :data:`_CPU_SAMPLE` s or more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (time.monotonic(), _cpu_seconds())
        self.load = 0.0

    def sample(self) -> float:
        with self._lock:
            now, cpu = time.monotonic(), _cpu_seconds()
            wall = now - self._last[0]
            if wall >= _CPU_SAMPLE:
                self.load = max(0.0, (cpu - self._last[1]) / wall)
                self._last = (now, cpu)
            return self.load


def process_figures(sampler: _CpuSampler | None = None) -> dict[str, float | int | None]:
    """This process's CPU load (cores), resident memory (bytes) and thread count."""
    status = _read("/proc/self/status")
    threads = next((int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("Threads:")), None)
    return {"cpu": None if sampler is None else sampler.sample(),
            "rss": _kib_field(status, "VmRSS"), "threads": threads}


class WorkerMetrics:
    """Thread-safe counters of one worker (see the module doc)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._units: dict[tuple[str, str], _Unit] = {}
        self._links: dict[str, _Link] = {}
        self._cpu = _CpuSampler()
        self.started = time.time()

    def record_unit(self, plan: str, unit: str, compute: float, queue: float,
                    wait: float) -> None:
        with self._lock:
            u = self._units.setdefault((plan, unit), _Unit())
            u.count += 1
            u.compute += compute
            u.queue += queue
            u.wait += wait
            u.compute_ewma = _ewma(u.compute_ewma, compute)
            u.queue_ewma = _ewma(u.queue_ewma, queue)

    def record_send(self, peer: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            link = self._links.setdefault(peer, _Link())
            link.count += 1
            link.bytes += nbytes
            link.seconds += seconds
            if nbytes >= MIN_LINK_BYTES and seconds > 0:
                link.throughput = _ewma(link.throughput, nbytes / seconds)

    def sample(self, peer: str) -> bool:
        """Whether the next transfer to ``peer`` is to be timed until its answer."""
        with self._lock:
            return self._links.get(peer, _Link()).count % LINK_SAMPLE == 0

    def record_transfer(self, peer: str, nbytes: int, seconds: float) -> None:
        """A transfer timed until the receiver's answer (see the module doc)."""
        with self._lock:
            link = self._links.setdefault(peer, _Link())
            link.acked += 1
            link.acked_seconds = _ewma(link.acked_seconds, seconds)
            link.acked_bytes = _ewma(link.acked_bytes, float(nbytes))
            link.acked_seconds_sum += seconds
            link.acked_bytes_sum += nbytes

    def snapshot(self, stats: Mapping[str, int] | None = None) -> dict[str, Any]:
        """A JSON-safe copy of everything measured (what ``health``/``metrics`` return)."""
        with self._lock:
            units = [{"plan": p, "unit": k, "count": u.count, "compute_sum": u.compute,
                      "queue_sum": u.queue, "wait_sum": u.wait,
                      "compute_ewma": u.compute_ewma, "queue_ewma": u.queue_ewma}
                     for (p, k), u in sorted(self._units.items())]
            links = [{"peer": peer, "count": k.count, "bytes": k.bytes,
                      "seconds": k.seconds, "throughput": k.throughput, "acked": k.acked,
                      "acked_seconds": k.acked_seconds, "acked_bytes": k.acked_bytes,
                      "acked_seconds_sum": k.acked_seconds_sum,
                      "acked_bytes_sum": k.acked_bytes_sum}
                     for peer, k in sorted(self._links.items())]
        return {"device": self.device, "time": time.time(), "units": units,
                "links": links, "process": process_figures(self._cpu),
                "host": host_figures(), "stats": dict(stats or {})}


# --------------------------------------------------------------------------- Prometheus


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kw.items()) + "}"


def _num(x: float | int) -> str:
    return repr(float(x)) if isinstance(x, float) else str(int(x))


def prometheus_text(snap: Mapping[str, Any]) -> str:
    """``snap`` (:meth:`WorkerMetrics.snapshot`) in the Prometheus text format 0.0.4."""
    dev = str(snap["device"])
    lines: list[str] = []

    def family(name: str, kind: str, help_: str,
               samples: list[tuple[str, dict[str, str], float | int | None]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            if value is not None:
                lines.append(f"{name}{suffix}{_labels(device=dev, **labels)} {_num(value)}")

    units = snap.get("units", [])
    for what, key, help_ in (("compute", "compute_sum", "ONNX Runtime time per request"),
                             ("queue", "queue_sum", "time queued behind earlier requests"),
                             ("wait", "wait_sum", "time waiting for the other senders")):
        samples: list[tuple[str, dict[str, str], float | int | None]] = []
        for u in units:
            lab = {"plan": u["plan"], "unit": u["unit"]}
            samples += [("_sum", lab, u[key]), ("_count", lab, u["count"])]
        family(f"runtime_unit_{what}_seconds", "summary", f"{help_} (per unit)", samples)
    for what in ("compute", "queue"):
        family(f"runtime_unit_{what}_ewma_seconds", "gauge",
               f"smoothed {what} time per request (per unit)",
               [("", {"plan": u["plan"], "unit": u["unit"]}, u[f"{what}_ewma"])
                for u in units])
    links = snap.get("links", [])
    family("runtime_link_sent_bytes_total", "counter", "bytes sent to a peer",
           [("", {"peer": k["peer"]}, k["bytes"]) for k in links])
    family("runtime_link_send_seconds_total", "counter", "seconds spent sending to a peer",
           [("", {"peer": k["peer"]}, k["seconds"]) for k in links])
    family("runtime_link_transfers_total", "counter", "messages sent to a peer",
           [("", {"peer": k["peer"]}, k["count"]) for k in links])
    family("runtime_link_throughput_bytes_per_second", "gauge",
           f"smoothed bytes/s of sends of at least {MIN_LINK_BYTES} B",
           [("", {"peer": k["peer"]}, k["throughput"]) for k in links])
    family("runtime_link_acked_transfer_seconds", "gauge",
           f"smoothed time of one transfer until the receiver's answer (1 in {LINK_SAMPLE})",
           [("", {"peer": k["peer"]}, k.get("acked_seconds")) for k in links])
    proc, host = snap.get("process", {}), snap.get("host", {})
    family("runtime_process_cpu_cores", "gauge", "CPU load of the worker process, cores",
           [("", {}, proc.get("cpu"))])
    family("runtime_process_resident_memory_bytes", "gauge", "resident memory",
           [("", {}, proc.get("rss"))])
    family("runtime_host_load1", "gauge", "1-minute load average of the host",
           [("", {}, host.get("load1"))])
    family("runtime_host_cpus", "gauge", "cores of the host", [("", {}, host.get("cpus"))])
    family("runtime_host_memory_available_bytes", "gauge", "MemAvailable of the host",
           [("", {}, host.get("mem_available"))])
    family("runtime_requests_total", "counter", "frames handled, by outcome",
           [("", {"outcome": k}, v) for k, v in sorted(snap.get("stats", {}).items())])
    return "\n".join(lines) + "\n"


class _HTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most ``limit`` at once: one more is answered 503 and
    closed (slow or stalled clients cannot pile up threads); a client that goes away
    mid-answer is one debug line, not a traceback (only real bugs print one)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics %s: too many connections, refused", client_address[0])
            try:
                request.sendall(_BUSY)
            except OSError as err:
                log.debug("metrics %s: %s", client_address[0], err)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # reset, broken pipe, timed out: the client's doing
            log.debug("metrics %s: %s", client_address[0], err)
            return
        super().handle_error(request, client_address)


_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")
MAX_CONNECTIONS = 32  # metrics connections served at once (scrapers are few)
TIMEOUT = 10.0  # seconds a metrics connection may stay silent before it is closed


class MetricsServer:
    """``GET /metrics`` -> :func:`prometheus_text` of ``snapshot()``, on its own thread.

    It serves figures only (no tensors, no token): bind it where the scraper can reach
    it and nobody else (the worker's own ``--listen`` host by default). A connection
    silent for ``timeout`` seconds is closed, and at most ``max_connections`` are served
    at once (more are answered 503), so slow clients cannot exhaust the worker's threads.
    """

    def __init__(self, host: str, port: int,
                 snapshot: Callable[[], Mapping[str, Any]], *,
                 timeout: float = TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's spelling
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics")
                    return
                body = prometheus_text(snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def refuse(self) -> None:
                self.send_response(405, "only GET")
                self.send_header("Allow", "GET")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = refuse  # noqa: N815

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics %s: " + fmt, self.address_string(), *args)

        Handler.timeout = timeout  # socket timeout of every read and write
        self._http = _HTTPServer((host, port), Handler, max_connections)
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
