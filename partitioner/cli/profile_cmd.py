"""``partitioner profile``: measure bundles of layers on this host (SPEC §3, DIME).

Full profiling measures every bundle of 1..MBS consecutive layers. ``--lazy --system
SYSTEM`` measures single layers, then only the bundles that successive plans use (see
:mod:`partitioner.analysis.lazy`); the file it writes is marked ``"lazy": true`` and
``partitioner plan`` estimates its unmeasured bundles from the single layers (as plain
sums, also after ``--lazy-estimate adaptive``, which only steers what gets measured).
``--spatial [--row-counts R ...]`` also measures, per row-splittable layer, the back end's
row part at several output-row counts (:mod:`partitioner.analysis.row_profile`); the
spatial planner then prices parts from them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from partitioner.cli.common import (
    add_model_options,
    check_writable,
    parse_shapes,
    print_json,
    progress_enabled,
    stdout_to_stderr,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``partitioner profile`` (docs/INTERFACES.md plus lazy profiling)."""
    add_model_options(parser)
    parser.add_argument("--device", required=True, metavar="NAME",
                        help="the device name this host stands for in the system file")
    parser.add_argument("-o", "--output", required=True, metavar="PROFILE.json",
                        help="profile file (resumed when it exists with the same settings)")
    parser.add_argument("--mbs", type=int, default=None, metavar="N",
                        help="maximum bundle size in layers (default: all layers)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per bundle")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    parser.add_argument("--trim", type=float, default=0.1,
                        help="fraction of runs dropped at each end before the mean")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="ONNX Runtime intra-op threads (default: ORT's choice)")
    parser.add_argument("--frequency", default=None, metavar="LABEL",
                        help="frequency label to record (and set via cpufreq when writable)")
    parser.add_argument("--energy-meter", default=None, metavar="SPEC",
                        help="rapl | command:CMD (prints joules so far) | power:WATTS")
    parser.add_argument("--inputs", default=None, metavar="FILE.npz",
                        help="sample model inputs (default: seeded random data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--force", action="store_true",
                        help="start afresh when -o exists with other settings")
    parser.add_argument("--lazy", action="store_true",
                        help="measure only the bundles that plans use (needs --system)")
    parser.add_argument("--system", default=None, metavar="SYSTEM",
                        help="system file for --lazy")
    parser.add_argument("--profiles", nargs="+", action="extend", default=[],
                        metavar="PROFILE.json",
                        help="profiles of other devices for --lazy")
    parser.add_argument("--lazy-estimate", choices=("sum", "adaptive"), default="sum",
                        help="price of an unmeasured bundle: its singles plus internal "
                             "cuts, or that scaled by the best measured ratio so far")
    parser.add_argument("--objective", choices=("latency", "throughput", "energy"),
                        default="latency", help="what the --lazy plans minimise")
    parser.add_argument("--max-latency", type=float, default=None, metavar="S",
                        help="latency cap of the --lazy plans (energy objective)")
    parser.add_argument("--private", type=int, default=0, metavar="K",
                        help="--lazy plans: first K layers on trusted devices only")
    parser.add_argument("--preload", action=argparse.BooleanOptionalAction, default=True,
                        help="model weight preloading in the --lazy plans")
    parser.add_argument("--inline-weights", action="store_true",
                        help="open every bundle from its own in-memory copy of its weights "
                             "(slower set-up; default: the weights are written once to a "
                             "temporary file that every bundle maps)")
    parser.add_argument("--spatial", action="store_true",
                        help="also measure every row-splittable layer's row parts at several "
                             "output-row counts (for plan --spatial)")
    parser.add_argument("--row-counts", type=int, nargs="+", default=None, metavar="R",
                        help="output-row counts for --spatial (those that fit each layer, "
                             "plus its whole height; default: 1, a quarter, a half)")
    parser.add_argument("--no-open-ahead", action="store_true",
                        help="open each bundle only when it is measured (one session alive "
                             "at a time: less memory); by default the next bundle is opened "
                             "during the current one's warm-up, never while one is timed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    """Profile the model; returns the exit status."""
    from partitioner.analysis.meters import cpu_frequency, parse_energy_meter
    from partitioner.analysis.profiler import ProfileSettings
    from partitioner.errors import fail

    settings = ProfileSettings(runs=args.runs, warmup=args.warmup, trim=args.trim,
                               threads=args.threads)
    settings.check()
    for flag, value in (("--device", args.device), ("--frequency", args.frequency)):
        if value is not None and not value.strip():
            fail(f"{flag} {value!r}: must not be empty")
    check_writable(args.output, "-o")  # before the (slow) load and measurements
    if args.row_counts is not None:
        if not args.spatial:
            fail("--row-counts needs --spatial")
        bad = [r for r in args.row_counts if r < 1]
        if bad:
            fail(f"--row-counts {bad[0]}: a part computes at least 1 row")
    if args.mbs is not None and args.mbs < 1:
        fail(f"--mbs {args.mbs}: the maximum bundle size must be at least 1")
    system = None
    if args.lazy:
        from partitioner.analysis.system import load_system

        if args.system is None:
            fail("--lazy needs --system SYSTEM (the plans decide which bundles to measure)")
        system = load_system(args.system)  # before the model: cheap errors first
        if args.device not in {d.name for d in system.devices}:
            fail(f"--device {args.device!r} is not in {args.system}")
    meter = parse_energy_meter(args.energy_meter)
    shapes = parse_shapes(args.shape)
    from partitioner.frontend import load_model

    # big inline weights stay in the model file: the profiler copies them once into its
    # shared weight file anyway (faster and half the memory of parsing them eagerly)
    prepared = load_model(args.model, shapes=shapes or None, granularity=args.granularity,
                          lazy_weights=True)
    with cpu_frequency(args.frequency) as note:
        if note:
            print(f"partitioner profile: {note}", file=sys.stderr)
        with stdout_to_stderr():
            summary = _profile(args, prepared, settings, meter, system)
    summary["frequency_note"] = note
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['output']}: {summary['bundles_in_file']} bundles of "
              f"{summary['layers']} layers on {args.device} ({summary['measured_now']} "
              f"measured now; the full set at MBS {summary['mbs']} is "
              f"{summary['full_set']})")
        if args.spatial:
            print(f"{summary['output']}: {summary['rows_in_file']} row parts of "
                  f"{summary['splittable_layers']} row-splittable layers")
        if "lazy" in summary:
            lazy = summary["lazy"]
            print(f"lazy: {lazy['rounds']} rounds, {lazy['measured']} of {lazy['full']} "
                  f"bundles measured; plan latency {lazy['plan']['estimate']['latency']:.6g} s")
    return 0


def _profile(args: argparse.Namespace, prepared: Any, settings: Any, meter: Any,
             system: Any) -> dict[str, Any]:
    from partitioner.analysis.profiler import (
        BundleTimer,
        SharedWeights,
        bundle_count,
        bundle_ranges,
        capture_intermediates,
        profile_bundles,
        reuse_freed_memory,
        sample_inputs,
        start_profile,
    )

    graph = prepared.graph
    n_layers = len(graph.layers)
    mbs = n_layers if args.mbs is None else min(args.mbs, n_layers)
    out = Path(args.output)
    profile = start_profile(out, graph, args.device, settings, meter, force=args.force,
                            lazy=args.lazy)
    before = len(profile.bundles)
    inputs = sample_inputs(graph, args.inputs, seed=args.seed)
    started = time.perf_counter()
    weights = None
    timer = None
    reused = False
    if not args.inline_weights:
        # this process only profiles: let bundles reuse the memory their predecessors freed
        reused = reuse_freed_memory()
        # the weights are written once; every bundle's session maps them (issue 16)
        weights = SharedWeights(prepared)
    weights_seconds = time.perf_counter() - started
    try:
        captured = capture_intermediates(prepared, inputs, settings.threads, weights=weights)
        timer = BundleTimer(prepared, captured, settings, meter, weights=weights,
                            shared=weights is not None, ahead=not args.no_open_ahead)
        progress = progress_enabled(args)
        summary: dict[str, Any] = {"output": str(out), "device": args.device,
                                   "layers": n_layers, "mbs": mbs,
                                   "full_set": bundle_count(n_layers, mbs)}
        if not args.lazy:
            profile = profile_bundles(profile, bundle_ranges(n_layers, mbs), timer.measure,
                                      out, frequency=args.frequency, progress=progress,
                                      expect=timer.expect)
        else:
            profile, summary["lazy"] = _lazy(args, graph, system, profile, timer, mbs,
                                             progress)
        if args.spatial:
            from partitioner.analysis.row_profile import (
                measure_row_part,
                profile_rows,
                splittable_layers,
            )

            profile = profile_rows(
                profile, graph, args.row_counts,
                lambda k, r: measure_row_part(timer, k, r, args.frequency), out,
                frequency=args.frequency)
            summary["splittable_layers"] = len(splittable_layers(graph))
            summary["rows_in_file"] = len(profile.rows)
    finally:
        if timer is not None:
            timer.close()  # no bundle is still being opened from the weight file
        if weights is not None:
            weights.close()
    # where the time went (benchmarks/profiler_overhead.py reads these)
    summary["weights_file_seconds"] = weights_seconds
    summary["reused_freed_memory"] = reused
    summary["setup_seconds"] = timer.setup_seconds
    summary["ahead_seconds"] = timer.ahead_seconds
    summary["run_seconds"] = timer.run_seconds
    summary["bundles_in_file"] = len(profile.bundles)
    summary["measured_now"] = len(profile.bundles) - before
    return summary


def _lazy(args: argparse.Namespace, graph: Any, system: Any, profile: Any, timer: Any,
          mbs: int, progress: bool) -> tuple[Any, dict[str, Any]]:
    from tqdm import tqdm

    from partitioner.analysis.lazy import lazy_profile
    from partitioner.analysis.profiles import load_profile, save_profile
    from partitioner.ir import Objective
    from partitioner.pipeline import planner

    others = [load_profile(p, graph) for p in args.profiles]
    objective = Objective(kind=args.objective, max_latency=args.max_latency)
    with tqdm(unit="bundle", file=sys.stderr, disable=not progress,
              desc=f"lazy profiling {args.device}") as bar:
        def saved(p: Any) -> None:
            save_profile(p, args.output)
            bar.update()

        result = lazy_profile(graph, system, args.device, profile, timer.measure,
                              planner=planner(objective), mbs=mbs, preload=args.preload,
                              private=args.private, frequency=args.frequency, others=others,
                              estimate=args.lazy_estimate, on_measured=saved)
    save_profile(result.profile, args.output)
    return result.profile, {"rounds": len(result.rounds), "measured": result.measured,
                            "full": result.full, "plan": result.plan.to_json(),
                            "history": [{"latency": r.latency, "measured": r.measured}
                                        for r in result.rounds]}
