"""Energy meters and CPU frequency control for the profiler (``--energy-meter``, ``--frequency``).

Meters report joules per inference for a batch of timed runs:

* ``rapl`` reads Linux powercap counters (``/sys/class/powercap/intel-rapl:N/energy_uj``,
  the package domains; AMD CPUs expose the same files) before and after the runs;
* ``command:CMD`` runs ``CMD`` (through ``/bin/sh -c``) before and after the runs; it must
  print the joules consumed so far (a monotonic counter, e.g. from an external power
  meter) as the last line of its stdout;
* ``power:WATTS`` assumes a constant draw: ``WATTS * latency`` per inference.

``rapl`` and ``command`` measure everything the host spends during the runs (idle power
and the Python loop included); they are only as precise as the counters behind them.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from partitioner.errors import fail

__all__ = ["EnergyMeter", "parse_energy_meter", "parse_frequency_khz", "cpu_frequency"]

POWERCAP = Path("/sys/class/powercap")
CPUFREQ = Path("/sys/devices/system/cpu")


@dataclass
class EnergyMeter:
    """A parsed ``--energy-meter`` spec.

    Attributes:
        spec: the spec as given (recorded in the profile).
        kind: ``rapl``, ``command`` or ``power``.
        command: the shell command of ``command:CMD``.
        watts: the constant power of ``power:WATTS``.
        files: the RAPL counter files read.
    """

    spec: str
    kind: str
    command: str | None = None
    watts: float | None = None
    files: tuple[Path, ...] = ()
    _start: float = field(default=0.0, repr=False)

    def _read_rapl(self) -> float:
        total = 0.0
        for f in self.files:
            try:
                total += int(f.read_text().strip())
            except (OSError, ValueError) as err:
                fail(f"--energy-meter rapl: cannot read {f}: {err}")
        return total / 1e6  # energy_uj is in microjoules

    def _read_command(self) -> float:
        assert self.command is not None
        proc = subprocess.run(["/bin/sh", "-c", self.command], capture_output=True,
                              text=True, check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            fail(f"--energy-meter command {self.command!r} failed (exit {proc.returncode}) "
                 f"or printed nothing")
        try:
            return float(lines[-1].split()[0])
        except ValueError:
            fail(f"--energy-meter command {self.command!r} printed {lines[-1]!r}, "
                 f"expected joules consumed so far")

    def _wrap(self) -> float:
        # Counters wrap at max_energy_range_uj; one wrap per batch at most.
        total = 0.0
        for f in self.files:
            try:
                total += int((f.parent / "max_energy_range_uj").read_text().strip())
            except (OSError, ValueError):
                return 0.0
        return total / 1e6

    def start(self) -> None:
        """Sample the counter before the timed runs."""
        if self.kind == "rapl":
            self._start = self._read_rapl()
        elif self.kind == "command":
            self._start = self._read_command()

    def stop(self, runs: int, latency: float) -> float:
        """Joules per inference of the ``runs`` timed runs (``latency``: trimmed mean, s)."""
        if self.kind == "power":
            assert self.watts is not None
            return self.watts * latency
        end = self._read_rapl() if self.kind == "rapl" else self._read_command()
        delta = end - self._start
        if delta < 0 and self.kind == "rapl":
            delta += self._wrap()
        if delta < 0:
            fail(f"--energy-meter {self.spec}: the counter went backwards "
                 f"({self._start} -> {end} J)")
        return delta / runs


def _rapl_files(root: Path) -> tuple[Path, ...]:
    # Top-level package domains only (intel-rapl:0, not the sub-zones intel-rapl:0:0).
    return tuple(sorted(p / "energy_uj" for p in root.glob("intel-rapl:*")
                        if re.fullmatch(r"intel-rapl:\d+", p.name)))


def parse_energy_meter(spec: str | None, *, powercap: Path = POWERCAP) -> EnergyMeter | None:
    """Parse ``--energy-meter`` (``rapl``, ``command:CMD``, ``power:WATTS``).

    Raises:
        UserError: an unknown spec, a bad wattage, or RAPL counters that are missing or
            unreadable (naming the file).
    """
    if spec is None:
        return None
    kind, sep, arg = spec.partition(":")
    if kind == "rapl" and not sep:
        files = _rapl_files(powercap)
        if not files:
            fail(f"--energy-meter rapl: {powercap / 'intel-rapl:0' / 'energy_uj'} does not "
                 f"exist (no RAPL powercap counters on this host)")
        meter = EnergyMeter(spec, "rapl", files=files)
        meter._read_rapl()  # fail now, naming the file, when it is not readable
        return meter
    if kind == "command" and arg.strip():
        return EnergyMeter(spec, "command", command=arg)
    if kind == "power":
        try:
            watts = float(arg)
        except ValueError:
            watts = -1.0
        if not watts >= 0:
            fail(f"--energy-meter {spec!r}: power:WATTS needs a non-negative number of watts")
        return EnergyMeter(spec, "power", watts=watts)
    fail(f"--energy-meter {spec!r}: expected rapl, command:CMD or power:WATTS")


_UNITS = {"ghz": 1e6, "mhz": 1e3, "khz": 1.0, "hz": 1e-3}


def parse_frequency_khz(label: str) -> int | None:
    """``"1.5GHz"`` -> 1500000 (kHz, as cpufreq wants it); None when not a frequency."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GMk]?Hz)\s*", label, flags=re.IGNORECASE)
    if not m:
        return None
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


@contextlib.contextmanager
def cpu_frequency(label: str | None, *, root: Path = CPUFREQ) -> Iterator[str | None]:
    """Try to run at ``label`` (cpufreq ``scaling_setspeed``, else ``scaling_max_freq``).

    Yields a note saying what was done (or why nothing could be done, in which case only
    the label is recorded). Values changed are restored on exit.
    """
    if label is None:
        yield None
        return
    khz = parse_frequency_khz(label)
    if khz is None:
        yield f"frequency label {label!r} is not a frequency (e.g. 1.5GHz); recorded only"
        return
    changed: list[tuple[Path, str]] = []
    note: str | None = None
    try:
        for cpu in sorted(root.glob("cpu[0-9]*")):
            for name in ("scaling_setspeed", "scaling_max_freq"):
                f = cpu / "cpufreq" / name
                try:
                    old = f.read_text().strip()
                    f.write_text(str(khz))
                except OSError:
                    continue
                if old and not old.startswith("<"):  # "<unsupported>" setspeed
                    changed.append((f, old))
                break
        if changed:
            note = f"set {len(changed)} cpufreq controls to {khz} kHz"
        else:
            note = (f"could not set the CPU frequency to {label} ({root}/cpu*/cpufreq is "
                    f"missing or not writable); recorded the label only")
        yield note
    finally:
        for f, old in changed:
            with contextlib.suppress(OSError):
                f.write_text(old)
