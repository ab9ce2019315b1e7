"""Histogram payloads: a map step that fills a histogram from generated events, a merge step
that sums histograms, and the library both use (tests use it to check merged outputs).

The map step (``wms-payload-map``) reads its input files (``WMS_INPUT_FILES``), each a small seed
file, generates events deterministically from each seed with :class:`random.Random`, fills one
histogram of an invariant mass and writes it to ``$WMS_OUTPUT_DIR/hist.json``. The same inputs
and options always give the same bytes.

The merge step (``wms-payload-merge``) sums the histograms listed in ``WMS_INPUT_FILES`` (or
given as arguments) into one. Histograms of different binning (or observable) are refused with
exit code :data:`EXIT_MISMATCH`.

Event weights are multiples of 1/16 between 0.5 and 1.5, so every sum of weights is exact in
binary floating point: merging is exactly associative and commutative, and "the merged output
equals the merge of all inputs" can be asserted with ``==``.

Histogram file (JSON, keys sorted, one line)::

    {"format": "wms.histogram/1", "observable": "m_ll", "unit": "GeV",
     "binning": {"nbins": 60, "low": 60.0, "high": 120.0},
     "counts": [...nbins ints...], "sumw": [...nbins floats...],
     "underflow": int, "overflow": int, "entries": int, "sum_weights": float,
     "seeds": [sorted seeds of the events it holds], "jobs": int}

``entries`` counts every filled event, ``underflow`` and ``overflow`` included, so
``entries == sum(counts) + underflow + overflow``; ``sum_weights`` is the sum of every filled
event's weight; ``jobs`` is the number of map outputs summed into it (1 for a map output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payloads import runtime

FORMAT = "wms.histogram/1"
OUTPUT_NAME = "hist.json"
DEFAULT_EVENTS = 10_000

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments (argparse's own code too)
EXIT_INJECTED = 3  # a failure asked for by --fail-rate / --fail-until-attempt
EXIT_BAD_INPUT = 4  # an input missing, unreadable or not in the expected format
EXIT_MISMATCH = 5  # merge: histograms of different binning or observable


class HistogramError(ValueError):
    """A histogram document that does not follow the format."""


class BinningMismatch(HistogramError):
    """Histograms that cannot be added: different binning, observable or unit."""


@dataclass(frozen=True)
class Binning:
    """Fixed binning: ``nbins`` equal bins from ``low`` (included) to ``high`` (excluded)."""

    nbins: int
    low: float
    high: float

    def __post_init__(self) -> None:
        if not isinstance(self.nbins, int) or isinstance(self.nbins, bool) or self.nbins < 1:
            raise HistogramError(f"nbins must be a positive integer, not {self.nbins!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise HistogramError(f"need finite low < high, not {self.low!r}, {self.high!r}")
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    def index(self, x: float) -> int:
        """The bin of ``x``: -1 for underflow, ``nbins`` for overflow (NaN is overflow)."""
        if x < self.low:
            return -1
        if not x < self.high:
            return self.nbins
        i = int((x - self.low) / (self.high - self.low) * self.nbins)
        return min(i, self.nbins - 1)  # rounding at the upper edge stays in the last bin

    def edges(self) -> list[float]:
        width = (self.high - self.low) / self.nbins
        return [self.low + i * width for i in range(self.nbins)] + [self.high]

    def to_dict(self) -> dict[str, Any]:
        return {"nbins": self.nbins, "low": self.low, "high": self.high}


@dataclass
class Histogram:
    """A 1-D histogram of weighted entries (see the module docstring for the file format)."""

    binning: Binning
    observable: str = "m"
    unit: str = "GeV"
    counts: list[int] = field(default_factory=list)
    sumw: list[float] = field(default_factory=list)
    underflow: int = 0
    overflow: int = 0
    entries: int = 0
    sum_weights: float = 0.0
    seeds: list[int] = field(default_factory=list)
    jobs: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * self.binning.nbins
        if not self.sumw:
            self.sumw = [0.0] * self.binning.nbins
        if len(self.counts) != self.binning.nbins or len(self.sumw) != self.binning.nbins:
            raise HistogramError(
                f"counts and sumw need {self.binning.nbins} values, "
                f"not {len(self.counts)} and {len(self.sumw)}"
            )

    def fill(self, x: float, weight: float = 1.0) -> None:
        i = self.binning.index(x)
        if i < 0:
            self.underflow += 1
        elif i >= self.binning.nbins:
            self.overflow += 1
        else:
            self.counts[i] += 1
            self.sumw[i] += weight
        self.entries += 1
        self.sum_weights += weight

    def compatible_with(self, other: Histogram) -> bool:
        return (self.binning, self.observable, self.unit) == (
            other.binning,
            other.observable,
            other.unit,
        )

    def __add__(self, other: Histogram) -> Histogram:
        if not isinstance(other, Histogram):
            return NotImplemented
        if not self.compatible_with(other):
            raise BinningMismatch(
                f"cannot add {describe(other)} to {describe(self)}: "
                "binning, observable and unit must be identical"
            )
        return Histogram(
            binning=self.binning,
            observable=self.observable,
            unit=self.unit,
            counts=[a + b for a, b in zip(self.counts, other.counts, strict=True)],
            sumw=[a + b for a, b in zip(self.sumw, other.sumw, strict=True)],
            underflow=self.underflow + other.underflow,
            overflow=self.overflow + other.overflow,
            entries=self.entries + other.entries,
            sum_weights=self.sum_weights + other.sum_weights,
            seeds=sorted(self.seeds + other.seeds),
            jobs=self.jobs + other.jobs,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "observable": self.observable,
            "unit": self.unit,
            "binning": self.binning.to_dict(),
            "counts": list(self.counts),
            "sumw": list(self.sumw),
            "underflow": self.underflow,
            "overflow": self.overflow,
            "entries": self.entries,
            "sum_weights": self.sum_weights,
            "seeds": sorted(self.seeds),
            "jobs": self.jobs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Read and validate a histogram document; anything off → :class:`HistogramError`."""
        if not isinstance(data, Mapping):
            raise HistogramError("a histogram must be a JSON object")
        if data.get("format") != FORMAT:
            raise HistogramError(f"format must be {FORMAT!r}, not {data.get('format')!r}")
        try:
            b = data["binning"]
            binning = Binning(_int(b["nbins"]), float(b["low"]), float(b["high"]))
            hist = cls(
                binning=binning,
                observable=str(data["observable"]),
                unit=str(data["unit"]),
                counts=[_int(c) for c in data["counts"]],
                sumw=[float(w) for w in data["sumw"]],
                underflow=_int(data["underflow"]),
                overflow=_int(data["overflow"]),
                entries=_int(data["entries"]),
                sum_weights=float(data["sum_weights"]),
                seeds=sorted(_int(s) for s in data.get("seeds", [])),
                jobs=_int(data.get("jobs", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, HistogramError):
                raise
            raise HistogramError(f"bad histogram document: {type(exc).__name__}: {exc}") from exc
        if hist.entries != sum(hist.counts) + hist.underflow + hist.overflow:
            raise HistogramError("entries must equal sum(counts) + underflow + overflow")
        return hist


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HistogramError(f"expected an integer, not {value!r}")
    return value


def describe(h: Histogram) -> str:
    b = h.binning
    return f"{h.observable} [{h.unit}] {b.nbins} bins {b.low:g}..{b.high:g}"


def merge(histograms: Iterable[Histogram]) -> Histogram:
    """The sum of histograms of identical binning; :class:`BinningMismatch` otherwise.

    Exact (weights are multiples of 1/16), so the order of the inputs does not matter.
    """
    items = list(histograms)
    if not items:
        raise HistogramError("nothing to merge")
    total = items[0]
    for h in items[1:]:
        total = total + h
    return total


# --- files ---------------------------------------------------------------------------------------


def dumps(h: Histogram) -> str:
    """The canonical text of a histogram: same histogram, same bytes."""
    return json.dumps(h.to_dict(), sort_keys=True, separators=(",", ":")) + "\n"


def dump(h: Histogram, path: str | os.PathLike[str]) -> Path:
    """Write a histogram atomically (a reader never sees half a file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumps(h))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(path: str | os.PathLike[str]) -> Histogram:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HistogramError(f"{path}: not JSON: {exc}") from exc
    try:
        return Histogram.from_dict(data)
    except HistogramError as exc:
        raise HistogramError(f"{path}: {exc}") from exc


def merge_files(paths: Iterable[str | os.PathLike[str]]) -> Histogram:
    return merge(load(p) for p in paths)


# --- event generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """A toy physics process: a resonance over a falling exponential background."""

    name: str
    observable: str
    binning: Binning
    signal_fraction: float
    mass: float
    width: float  # Breit-Wigner width (0: a Gaussian peak of the resolution only)
    resolution: float
    background_start: float
    background_slope: float


PROCESSES: dict[str, Process] = {
    # Z -> l+l-: Breit-Wigner at the Z mass, smeared by the detector resolution.
    "z": Process("z", "m_ll", Binning(60, 60.0, 120.0), 0.8, 91.1876, 2.4952, 1.2, 50.0, 30.0),
    # H -> gamma gamma: a narrow peak over a large diphoton background.
    "higgs": Process("higgs", "m_gg", Binning(60, 100.0, 160.0), 0.3, 125.1, 0.0, 1.7, 95.0, 25.0),
}


def _gauss(rng: random.Random) -> float:
    """A standard normal number from two uniforms (Box-Muller): only ``rng.random`` is used, so
    the stream is the same on every Python version."""
    u1, u2 = rng.random(), rng.random()
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


def generate_event(rng: random.Random, process: Process) -> tuple[float, float]:
    """One event: (mass, weight). The weight is a multiple of 1/16 in [0.5, 1.5]."""
    if rng.random() < process.signal_fraction:
        mass = process.mass
        if process.width > 0:
            mass += process.width / 2.0 * math.tan(math.pi * (rng.random() - 0.5))
        mass += process.resolution * _gauss(rng)
    else:
        mass = process.background_start - process.background_slope * math.log(1.0 - rng.random())
    weight = (8 + int(rng.random() * 17)) / 16.0
    return mass, weight


def fill_from_seed(
    hist: Histogram, *, seed: int, events: int, process: Process = PROCESSES["z"]
) -> Histogram:
    """Fill ``hist`` with ``events`` events generated from ``seed`` (deterministic)."""
    rng = random.Random(seed)
    for _ in range(events):
        mass, weight = generate_event(rng, process)
        hist.fill(mass, weight)
    hist.seeds.append(seed)
    hist.seeds.sort()
    return hist


def histogram_for(process: Process, binning: Binning | None = None) -> Histogram:
    return Histogram(binning=binning or process.binning, observable=process.observable, unit="GeV")


def generate(
    seeds: Sequence[tuple[int, int]],
    *,
    process: str = "z",
    binning: Binning | None = None,
) -> Histogram:
    """The histogram of a map job over inputs given as ``(seed, events)`` pairs."""
    proc = PROCESSES[process]
    hist = histogram_for(proc, binning)
    for seed, events in seeds:
        fill_from_seed(hist, seed=seed, events=events, process=proc)
    hist.jobs = 1
    return hist


# --- seed files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSpec:
    """What one input file of the map step says."""

    seed: int
    events: int | None = None
    process: str | None = None


def seed_file_text(seed: int, events: int, process: str = "z") -> str:
    """The canonical seed file (what the demo writes)."""
    return json.dumps({"seed": seed, "events": events, "process": process}, sort_keys=True) + "\n"


def parse_seed_file(text: str) -> SeedSpec:
    """A seed file is a JSON object ``{"seed": int, "events": int?, "process": str?}``, or
    ``key=value`` lines with the same keys, or a bare integer seed."""
    stripped = text.strip()
    if not stripped:
        raise HistogramError("empty seed file")
    data: dict[str, Any]
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError as exc:
            raise HistogramError(f"seed file is not JSON: {exc}") from exc
    elif "=" in stripped:
        data = {}
        for line in stripped.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, value = line.partition("=")
                data[key.strip()] = value.strip()
    else:
        data = {"seed": stripped}
    try:
        seed = int(data["seed"])
        events = int(data["events"]) if data.get("events") not in (None, "") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise HistogramError(f"seed file needs an integer seed (and events): {exc}") from exc
    if events is not None and events < 0:
        raise HistogramError("events must not be negative")
    process = data.get("process") or None
    if process is not None and process not in PROCESSES:
        raise HistogramError(f"unknown process {process!r}; known: {sorted(PROCESSES)}")
    return SeedSpec(seed=seed, events=events, process=process)


def read_seed_file(path: str | os.PathLike[str]) -> SeedSpec:
    try:
        return parse_seed_file(Path(path).read_text(encoding="utf-8"))
    except HistogramError as exc:
        raise HistogramError(f"{path}: {exc}") from exc


# --- command lines ------------------------------------------------------------------------------


def _fail(code: int, message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


def _output_path(name: str, environ: Mapping[str, str] | None) -> Path:
    path = Path(name)
    return path if path.is_absolute() else runtime.output_dir(environ) / path


def injected_failure(*, seed: int, attempt: int, rate: float, until_attempt: int) -> str:
    """Why this attempt must fail on purpose, or "" (deterministic: same seed, same attempt,
    same answer; a later attempt draws again)."""
    if attempt < until_attempt:
        return f"attempt {attempt} < --fail-until-attempt {until_attempt}"
    if rate > 0 and random.Random(f"fail:{seed}:{attempt}").random() < rate:
        return f"drawn by --fail-rate {rate} (seed {seed}, attempt {attempt})"
    return ""


def _map_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wms-payload-map",
        description="Generate events from the seed files in WMS_INPUT_FILES, fill a histogram, "
        "write it to $WMS_OUTPUT_DIR/hist.json.",
    )
    p.add_argument("inputs", nargs="*", help="seed files (default: WMS_INPUT_FILES)")
    p.add_argument("--events", type=int, help="events per input (default: the seed file's)")
    p.add_argument("--process", choices=sorted(PROCESSES), help="default: the seed file's, or z")
    p.add_argument("--bins", type=int, help="number of bins (default: the process's)")
    p.add_argument("--low", type=float, help="lower edge (default: the process's)")
    p.add_argument("--high", type=float, help="upper edge (default: the process's)")
    p.add_argument("--seed-offset", type=int, default=0, help="added to every seed")
    p.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="fail (exit 3) with this probability, drawn from the first seed and WMS_ATTEMPT",
    )
    p.add_argument(
        "--fail-until-attempt",
        type=int,
        default=0,
        metavar="K",
        help="fail (exit 3) while WMS_ATTEMPT < K (retries, deterministically)",
    )
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep first (slow jobs)")
    p.add_argument("--output", default=OUTPUT_NAME, help="output file, relative to WMS_OUTPUT_DIR")
    return p


def map_main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``wms-payload-map``: exit 0 with the histogram written, non-zero with a reason on stderr."""
    args = _map_parser().parse_args(argv)
    if args.events is not None and args.events < 0:
        return _fail(EXIT_USAGE, "map: --events must not be negative")
    if not 0.0 <= args.fail_rate <= 1.0:
        return _fail(EXIT_USAGE, "map: --fail-rate must be between 0 and 1")
    try:
        paths = [runtime.local_path(i) for i in args.inputs] or runtime.input_files(environ)
        attempt = runtime.attempt(environ)
    except runtime.RuntimeConfigError as exc:
        return _fail(EXIT_USAGE, f"map: {exc}")
    if not paths:
        return _fail(EXIT_USAGE, f"map: no input files (set {runtime.INPUT_FILES})")
    try:
        specs = [read_seed_file(p) for p in paths]
    except OSError as exc:
        return _fail(EXIT_BAD_INPUT, f"map: cannot read an input: {exc}")
    except HistogramError as exc:
        return _fail(EXIT_BAD_INPUT, f"map: {exc}")
    processes = {args.process or s.process or "z" for s in specs}
    if len(processes) != 1:
        return _fail(EXIT_BAD_INPUT, f"map: inputs of different processes {sorted(processes)}")
    process = PROCESSES[processes.pop()]
    try:
        binning = Binning(
            args.bins if args.bins is not None else process.binning.nbins,
            args.low if args.low is not None else process.binning.low,
            args.high if args.high is not None else process.binning.high,
        )
    except HistogramError as exc:
        return _fail(EXIT_USAGE, f"map: bad binning: {exc}")
    seeds = [
        (s.seed + args.seed_offset, args.events if args.events is not None else s.events)
        for s in specs
    ]
    why = injected_failure(
        seed=seeds[0][0],
        attempt=attempt,
        rate=args.fail_rate,
        until_attempt=args.fail_until_attempt,
    )
    if why:
        return _fail(EXIT_INJECTED, f"map: failing on purpose: {why}")
    if args.sleep > 0:
        time.sleep(args.sleep)
    hist = generate(
        [(seed, DEFAULT_EVENTS if n is None else n) for seed, n in seeds],
        process=process.name,
        binning=binning,
    )
    out = dump(hist, _output_path(args.output, environ))
    print(
        f"map: {len(paths)} input(s), process {process.name}, {hist.entries} events, "
        f"sum of weights {hist.sum_weights:g}, {describe(hist)} -> {out}",
        flush=True,
    )
    return EXIT_OK


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wms-payload-merge",
        description="Sum the histograms in WMS_INPUT_FILES into $WMS_OUTPUT_DIR/hist.json; "
        f"histograms of different binning are refused (exit {EXIT_MISMATCH}).",
    )
    p.add_argument("inputs", nargs="*", help="histogram files (default: WMS_INPUT_FILES)")
    p.add_argument("--output", default=OUTPUT_NAME, help="output file, relative to WMS_OUTPUT_DIR")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep first (slow jobs)")
    return p


def merge_main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``wms-payload-merge``: exit 0 with the sum written; 5 on a binning mismatch."""
    args = _merge_parser().parse_args(argv)
    try:
        paths = [runtime.local_path(i) for i in args.inputs] or runtime.input_files(environ)
    except runtime.RuntimeConfigError as exc:
        return _fail(EXIT_USAGE, f"merge: {exc}")
    if not paths:
        return _fail(EXIT_USAGE, f"merge: no input histograms (set {runtime.INPUT_FILES})")
    try:
        hists = [load(p) for p in paths]
    except OSError as exc:
        return _fail(EXIT_BAD_INPUT, f"merge: cannot read an input: {exc}")
    except HistogramError as exc:
        return _fail(EXIT_BAD_INPUT, f"merge: {exc}")
    try:
        total = merge(hists)
    except BinningMismatch as exc:
        return _fail(EXIT_MISMATCH, f"merge: refused: {exc}")
    if args.sleep > 0:
        time.sleep(args.sleep)
    out = dump(total, _output_path(args.output, environ))
    print(
        f"merge: {len(hists)} histogram(s) from {total.jobs} map job(s), {total.entries} events, "
        f"sum of weights {total.sum_weights:g} -> {out}",
        flush=True,
    )
    return EXIT_OK


if __name__ == "__main__":  # python -m payloads.histo map|merge ...
    _cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if _cmd not in ("map", "merge"):
        raise SystemExit(_fail(EXIT_USAGE, "usage: python -m payloads.histo map|merge [options]"))
    raise SystemExit((map_main if _cmd == "map" else merge_main)(sys.argv[2:]))
