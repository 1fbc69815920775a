"""Serve a device's stages, run a bundle across devices, compile fallback plans.

::

    runtime serve (BUNDLE | --model M.onnx [--store DIR]) --device NAME [--listen HOST:PORT]
                  [--token-file F] [--threads N] [--grpc-port P] [--port-file F]
                  [--queue-depth N] [--metrics-port P]
                  (--model: build the stages the executor asks for)
    runtime run   BUNDLE (--local | --hosts NAME=HOST:PORT,... | --system S) --input NAME=FILE.npy
                  ... [--token-file F] [--timeout S] [--repeat N] [--concurrency C]
                  -o OUT.npz [--json] [--listen HOST:PORT]
                  [--model M --system S [--adapt]]  (--model: re-plan on failure, on drift)
    runtime fallback BUNDLE --model M --system S [--device NAME ...]
    runtime certs SYSTEM -o DIR [--host H ...] [--days N] [--force]

User errors are one line on stderr and exit status 2; a request that fails for good
(after re-planning and retries) exits with status 3 and names the request id.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from runtime.files import check_writable, load_inputs, save_outputs, write_atomic
from stagebundle.errors import OneLineParser, UserError, check_threads, fail

__all__ = ["main", "parse_hosts", "load_inputs", "save_outputs"]

# the longest deadline budget a worker accepts for one attempt (runtime/worker.py)
MAX_BUDGET = 3600.0


def parse_hosts(text: str) -> dict[str, str]:
    """``NAME=HOST:PORT,...`` -> ``{name: "host:port"}``."""
    from runtime.transport import parse_address

    hosts: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, addr = item.partition("=")
        if not sep or not name:
            fail(f"--hosts {item!r}: expected NAME=HOST:PORT")
        if name in hosts:
            fail(f"--hosts {name}: given twice ({hosts[name]} and {addr})")
        try:
            _, port = parse_address(addr, what=f"--hosts {name}")
        except ValueError as err:
            fail(str(err))
        if port == 0:
            fail(f"--hosts {name} {addr!r}: port 0 is not a worker's port")
        hosts[name] = addr
    if not hosts:
        fail("--hosts: no NAME=HOST:PORT given")
    return hosts


def check_known_devices(hosts: Iterable[str], known: Iterable[str], where: str) -> None:
    """Refuse a ``--hosts`` device that no plan can use (a typo would be ignored)."""
    names = sorted(set(known))
    for dev in hosts:
        if dev not in names:
            fail(f"--hosts {dev}: not a device of {where} (devices: {', '.join(names)})")


def check_port(port: int | None, what: str) -> None:
    """``None`` (not given), or a TCP port number (0: any free port)."""
    if port is not None and not 0 <= port <= 65535:
        fail(f"{what} {port}: expected a port number in 0..65535 (0: any free port)")


def check_timeouts(timeout: float, attempt_timeout: float | None, attempts: int) -> None:
    """Finite, positive, and no attempt longer than a worker's budget cap."""
    for what, value in (("--timeout", timeout), ("--attempt-timeout", attempt_timeout)):
        if value is not None and (math.isnan(value) or value <= 0):
            fail(f"{what} {value}: must be a positive number of seconds")
    if math.isinf(timeout):
        fail(f"--timeout {timeout}: must be a finite number of seconds")
    if attempt_timeout is None and timeout / (attempts + 1) > MAX_BUDGET:
        fail(f"--timeout {timeout:g}: its default attempt timeout ({timeout / (attempts + 1):g}"
             f" s) is over the workers' cap of {MAX_BUDGET:g} s; give --attempt-timeout")
    if attempt_timeout is not None and min(attempt_timeout, timeout) > MAX_BUDGET:
        fail(f"--attempt-timeout {attempt_timeout:g}: must be at most {MAX_BUDGET:g} s (the "
             f"workers' deadline cap)")


def _add_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mutual TLS (optional; all three or none)")
    g.add_argument("--tls-cert", metavar="PEM", help="this node's certificate")
    g.add_argument("--tls-key", metavar="PEM", help="this node's private key")
    g.add_argument("--tls-ca", metavar="PEM", help="the deployment's CA certificate")


# --------------------------------------------------------------------------- serve


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE_DIR", nargs="?",
                   help="the compiled bundle (or give --model)")
    p.add_argument("--model", metavar="MODEL.onnx",
                   help="instead of a bundle: hold this model and build, from it, the "
                        "stages of any plan the (authenticated) executor sends, each "
                        "checked against the plan's SHA-256 (runtime/build.py)")
    p.add_argument("--store", metavar="DIR",
                   help="with --model: where built stages are kept (default: a temporary "
                        "folder, removed on exit)")
    p.add_argument("--device", required=True, help="the device whose stages to serve")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="where to listen (default: the device's `address` in --system, "
                        "else 127.0.0.1 on any free port); a non-loopback address needs "
                        "--token-file")
    p.add_argument("--system", help="system file whose device `address` is the default "
                                    "--listen")
    p.add_argument("--token-file", help="file holding the shared token")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads per stage")
    p.add_argument("--spin", action="store_true",
                   help="let idle ONNX Runtime threads spin-wait (lower latency on a host "
                        "this worker has to itself; off by default)")
    p.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                   help="also serve the Open Inference Protocol v2 over gRPC (0: any port)")
    p.add_argument("--port-file", help="write {host, port, grpc_port} as JSON here once "
                                       "listening (atomic)")
    p.add_argument("--queue-depth", type=int, default=64, metavar="N",
                   help="requests queued per unit before senders are held back and then "
                        "refused busy (bounds the worker's memory)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve the worker's measurements in the Prometheus text format "
                        "over HTTP on this port of the --listen host (0: any free port, "
                        "written to --port-file as metrics_port)")
    p.add_argument("--debug-slowdown", type=float, default=None, metavar="FACTOR",
                   help="test/benchmark aid: every unit takes FACTOR times its compute "
                        "time (a slow-but-alive host); authenticated `debug` frames may "
                        "change it while serving")
    _add_tls(p)
    p.add_argument("--quiet", action="store_true", help="log warnings only")


def _serve(args: argparse.Namespace) -> int:
    from runtime.security import load_token
    from runtime.tls import tls_from_args
    from runtime.transport import format_address, parse_address
    from runtime.worker import Worker

    listen = args.listen
    if listen is None and args.system:
        from partitioner.analysis.system import load_system

        try:
            listen = load_system(args.system).device(args.device).address or None
        except KeyError:
            fail(f"--device {args.device}: not a device of {args.system}")
    try:
        host, port = parse_address("127.0.0.1:0" if listen is None else listen,
                                   what="--listen")
    except ValueError as err:
        fail(str(err))
    check_port(args.grpc_port, "--grpc-port")
    check_port(args.metrics_port, "--metrics-port")
    check_threads(args.threads)
    if args.queue_depth < 1:
        fail("--queue-depth must be at least 1")
    if args.port_file:
        check_writable(args.port_file, "--port-file")
    if (args.bundle is None) == (args.model is None):
        fail("give a BUNDLE_DIR or --model MODEL.onnx (one of them)")
    if args.store and not args.model:
        fail("--store goes with --model")
    if args.model and args.grpc_port is not None:
        fail("--grpc-port needs a BUNDLE_DIR (its message caps are sized from the stages "
             "served at start; a --model worker starts with none)")
    builder = None
    if args.model:
        from runtime.build import ModelBuilder

        builder = ModelBuilder(args.model, args.store)
    try:
        worker = Worker(args.bundle, args.device, listen=(host, port), builder=builder,
                        token=load_token(args.token_file), threads=args.threads,
                        grpc_port=args.grpc_port, spin=args.spin,
                        queue_depth=args.queue_depth, slowdown=args.debug_slowdown,
                        tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_ca)).start()
    except OSError as err:  # the port is taken, or the address is not this host's
        if builder is not None:
            builder.close()
        fail(f"--listen {format_address((host, port))}: cannot listen there "
             f"({err.strerror or err})")
    except BaseException:
        if builder is not None:
            builder.close()
        raise
    metrics = None
    if args.metrics_port is not None:
        from runtime.metrics import MetricsServer

        try:
            metrics = MetricsServer(host, args.metrics_port, worker.metrics_snapshot).start()
        except OSError as err:
            worker.close()
            fail(f"--metrics-port {args.metrics_port}: cannot listen there "
                 f"({err.strerror or err})")
    addr = format_address(worker.address)
    info = {"device": args.device, "host": worker.address[0], "port": worker.address[1],
            "grpc_port": None if worker.grpc_address is None else worker.grpc_address[1],
            "metrics_port": None if metrics is None else metrics.address[1],
            "pid": os.getpid()}
    if args.port_file:
        write_atomic(args.port_file, json.dumps(info).encode())
    print(f"runtime serve: device {args.device} listening on {addr}"
          + (f", gRPC on port {info['grpc_port']}" if info["grpc_port"] else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if metrics is not None:
        metrics.close()
    worker.close()
    return 0


# --------------------------------------------------------------------------- run


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run every stage here")
    where.add_argument("--hosts", metavar="NAME=HOST:PORT,...",
                       help="the worker of every device the plan uses (default: the "
                            "devices' `address` in --system)")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where the last stage returns results (default: loopback, any "
                        "port); a non-loopback address needs --token-file")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   required=True, help="a model input (repeatable)")
    p.add_argument("--token-file", help="file holding the shared token")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, s")
    p.add_argument("--attempt-timeout", type=float, default=None,
                   help="give one attempt up (and retry) after S s (default: timeout / 4)")
    p.add_argument("--repeat", type=int, default=1, help="run the request N times")
    p.add_argument("--concurrency", type=int, default=1, metavar="C",
                   help="requests in flight at once while repeating (default 1)")
    p.add_argument("--model", help="the model, to re-plan when a device is down (and, "
                                   "with --adapt, on drift)")
    g = p.add_argument_group("live adaptation (--adapt needs --model and --system; the "
                             "defaults are measured, see runtime/README.md)")
    g.add_argument("--adapt", action="store_true",
                   help="calibrate the cost table while serving and switch plans on drift")
    g.add_argument("--adapt-window", type=float, default=1.0, metavar="S",
                   help="seconds per calibration window")
    g.add_argument("--adapt-margin", type=float, default=0.5, metavar="M",
                   help="switch when the current plan's re-estimate exceeds the new "
                        "optimum by this fraction ...")
    g.add_argument("--adapt-windows", type=int, default=5, metavar="K",
                   help="... in K consecutive windows ...")
    g.add_argument("--adapt-min-interval", type=float, default=10.0, metavar="S",
                   help="... and S seconds after the previous switch")
    g.add_argument("--adapt-alpha", type=float, default=0.5, metavar="A",
                   help="EWMA weight of the newest window")
    g.add_argument("--adapt-baseline", choices=("first", "file"), default="first",
                   help="factors relative to the first windows (drift, default) or "
                        "absolute against the system file's figures")
    g.add_argument("--adapt-min-samples", type=int, default=3, metavar="N",
                   help="unit runs a device needs in a window to be calibrated")
    g.add_argument("--adapt-forget", type=float, default=30.0, metavar="W",
                   help="half-life in windows of the factor of a device the plan left, so "
                        "a recovered host is tried again (0: never)")
    p.add_argument("--system", help="the system file: device addresses (when --hosts is "
                                    "not given) and, with --model, re-planning")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument("--json", action="store_true", help="print timings as JSON")
    _add_tls(p)
    p.add_argument("--quiet", action="store_true")


def _run(args: argparse.Namespace) -> int:
    from runtime.executor import LocalExecutor, RemoteExecutor
    from runtime.security import load_token
    from runtime.tls import tls_from_args

    if args.repeat < 1 or args.concurrency < 1:
        fail("--repeat and --concurrency must be at least 1")
    if args.adapt and not args.local and not (args.model and args.system):
        # the bundle records what re-planning needs (partitioner/backend/planning.py)
        from partitioner.backend.planning import planning_files, records_planning

        if records_planning(args.bundle):
            args.planning_dir = tempfile.TemporaryDirectory(prefix="runtime-planning-")
            model, system = planning_files(args.bundle, args.planning_dir.name,
                                           model=args.model, system=args.system)
            args.model, args.system = str(model), str(system)
    if args.adapt and (args.local or not args.model or not args.system):
        fail("--adapt needs workers (not --local), --model and --system")
    if args.local:  # what only talks to workers: given with --local, a mistake to say
        given = [flag for flag, value in (
            ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
            ("--tls-ca", args.tls_ca), ("--token-file", args.token_file),
            ("--model", args.model), ("--system", args.system),
            ("--listen", args.listen != "127.0.0.1:0"))
            if value]
        if given:
            fail(f"{', '.join(given)}: only for workers, not with --local")
    check_timeouts(args.timeout, args.attempt_timeout, attempts=3)  # RemoteExecutor's
    hosts: dict[str, str] = {}
    if not args.local:
        if args.hosts:
            hosts = parse_hosts(args.hosts)
        elif args.system:
            from partitioner.analysis.system import load_system

            hosts = {d.name: d.address for d in load_system(args.system).devices
                     if d.address}
            if not hosts:
                fail(f"--system {args.system}: no device has an address; give --hosts")
        else:
            fail("one of --local, --hosts or --system (device addresses) is required")
    inputs = load_inputs(args.input)
    check_writable(args.output)
    executor: Any
    if args.local:
        executor = LocalExecutor(args.bundle)
    else:
        from runtime.stages import open_bundles

        views = open_bundles(args.bundle)  # the bundle's own plans (main, fallback/*, ...)
        if args.hosts:  # (addresses from --system may name devices no plan uses)
            known = {d for v in views.values() for d in v.devices}
            if args.system and args.model:  # re-plans may use any device of the system
                from partitioner.analysis.system import load_system

                known |= {d.name for d in load_system(args.system).devices}
            check_known_devices(hosts, known, f"bundle {args.bundle}" + (
                f" or {args.system}" if args.system and args.model else ""))
        token = load_token(args.token_file)
        replanner = None
        if args.model:
            if not args.system:
                fail("--model needs --system to re-plan")
            from runtime.replan import Replanner

            replanner = Replanner(args.bundle, args.model, args.system, token=token)
        from runtime.ensure import prepare_workers

        # workers started with --model get the bundle's plans to build (no-op otherwise)
        prepare_workers(hosts, args.bundle, token,
                        tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_ca))
        try:
            executor = RemoteExecutor(
                views, hosts, token=token, timeout=args.timeout,
                replanner=replanner, attempt_timeout=args.attempt_timeout,
                tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_ca),
                listen=args.listen)
        except OSError as err:  # the --listen port is taken
            fail(f"--listen {args.listen}: cannot listen there ({err.strerror or err})")
        if replanner is not None:
            replanner.bind(executor)
    from runtime.stream import stream

    adapter = None
    try:
        if args.adapt:
            from runtime.adapt import Adapter, AdaptOptions
            from runtime.ensure import units_ensurer

            adapter = Adapter(executor, args.model, args.system, options=AdaptOptions(
                window=args.adapt_window, margin=args.adapt_margin,
                windows=args.adapt_windows, min_interval=args.adapt_min_interval,
                alpha=args.adapt_alpha, baseline=args.adapt_baseline,
                min_samples=args.adapt_min_samples, forget=args.adapt_forget),
                ensure=units_ensurer(executor)).start()  # --model workers build new plans
        doc, outputs, error = stream(executor, inputs, args.repeat,
                                     concurrency=args.concurrency, adapter=adapter)
    finally:
        if adapter is not None:
            adapter.close()
        executor.close()
    if outputs is None:  # nothing answered: the first error, as for a single request
        from runtime.local import RequestError

        fail(error or "no request was answered", error=RequestError)
    save_outputs(args.output, outputs)
    doc = {"mode": "local" if args.local else "remote", "output": str(args.output), **doc}
    if adapter is not None:  # the drift rule's windows (factors, decisions): benchmarks
        doc["adaptation"] = {"windows": adapter.history,
                             "failed_switches": list(adapter.failed_switches)}
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        s = doc["summary"]
        print(f"wrote {args.output}: {len(outputs)} output(s); latency mean "
              f"{doc['latency']['mean'] * 1e3:.2f} ms over {s['ok']} request(s)"
              + (f", {s['failed']} failed, {s['lost']} lost" if s["failed"] or s["lost"]
                 else "")
              + (f"; {len(doc['switches'])} plan switch(es)" if doc["switches"] else ""))
    if error is not None:
        print(f"runtime run: error: {error}", file=sys.stderr)
        return 3
    return 0


# --------------------------------------------------------------------------- fallback


def _add_fallback(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--model", required=True, help="the model the bundle was compiled from")
    p.add_argument("--system", required=True, help="the system file")
    p.add_argument("--device", action="append", default=[],
                   help="compile a fallback without this device (default: each device of "
                        "the plan that is not pinned as source or destination)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _fallback(args: argparse.Namespace) -> int:
    from runtime.replan import compile_fallbacks

    made = compile_fallbacks(args.bundle, args.model, args.system,
                             devices=args.device or None)
    if args.json:
        json.dump({"fallbacks": {k: str(v) if v else None for k, v in made.items()}},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for dev, path in made.items():
            print(f"without {dev}: {path if path else 'no feasible plan'}")
    return 0


# --------------------------------------------------------------------------- certs
# (the logic lives in runtime/certs.py; only the registration is here)


def _add_certs(p: argparse.ArgumentParser) -> None:
    from runtime.certs import add_arguments

    add_arguments(p)


def _certs(args: argparse.Namespace) -> int:
    from runtime.certs import run

    return run(args)


COMMANDS = {
    "serve": (_add_serve, _serve, "serve one device's stages of a bundle"),
    "run": (_add_run, _run, "run a bundle locally or on workers"),
    "fallback": (_add_fallback, _fallback, "compile fallback plans, one per device lost"),
    "certs": (_add_certs, _certs, "make a private CA and TLS certificates for a system's "
                                  "device addresses"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=f"runtime {args.command}: %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        return int(COMMANDS[args.command][1](args) or 0)
    except UserError as err:
        print(f"runtime {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"runtime {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
