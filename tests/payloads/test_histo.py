"""The demo/test payloads: deterministic map, exact merge, refusals, outputs where the
convention says (payloads/runtime.py). Pure and fast: no database, no broker."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from payloads import histo, noop, runtime
from payloads.histo import Binning, BinningMismatch, Histogram, HistogramError

ROOT = Path(__file__).resolve().parents[2]


def write_seeds(directory: Path, seeds: list[int], events: int = 500, process: str = "z"):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        p = directory / f"seed-{s}.json"
        p.write_text(histo.seed_file_text(s, events, process))
        paths.append(p)
    return paths


def job_env(inputs: list[Path], out: Path, attempt: int | None = None) -> dict[str, str]:
    env = {
        runtime.INPUT_FILES: json.dumps([str(p) for p in inputs]),
        runtime.OUTPUT_DIR: str(out),
    }
    if attempt is not None:
        env[runtime.ATTEMPT] = str(attempt)
    return env


def run_map(tmp_path: Path, seeds: list[int], *args: str, name: str = "job", **kw) -> Path:
    inputs = write_seeds(tmp_path / "in", seeds, **kw)
    out = tmp_path / name
    assert histo.map_main(list(args), job_env(inputs, out)) == 0
    return out / "hist.json"


# --- map ----------------------------------------------------------------------------------------


def test_map_writes_hist_json_in_the_output_dir(tmp_path):
    out = run_map(tmp_path, [7], name="outdir")

    assert out == tmp_path / "outdir" / "hist.json" and out.is_file()
    hist = histo.load(out)
    assert hist.entries == 500
    assert hist.entries == sum(hist.counts) + hist.underflow + hist.overflow
    assert hist.seeds == [7] and hist.jobs == 1
    assert hist.binning == histo.PROCESSES["z"].binning
    # the Z peak is there: the fullest bin holds 91 GeV
    peak = max(range(hist.binning.nbins), key=hist.counts.__getitem__)
    edges = hist.binning.edges()
    assert edges[peak] <= 91.1876 < edges[peak + 1] + 1.0


def test_map_is_deterministic_byte_for_byte(tmp_path):
    a = run_map(tmp_path / "a", [11, 12])
    b = run_map(tmp_path / "b", [11, 12])
    c = run_map(tmp_path / "c", [11, 13])

    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_map_of_several_inputs_equals_the_merge_of_one_map_per_input(tmp_path):
    together = histo.load(run_map(tmp_path / "all", [1, 2, 3]))
    apart = [histo.load(run_map(tmp_path / f"one{s}", [s])) for s in (1, 2, 3)]

    merged = histo.merge(apart)

    assert merged.counts == together.counts and merged.sumw == together.sumw
    assert merged.entries == together.entries == 1500
    assert merged.seeds == together.seeds == [1, 2, 3]


def test_map_options_events_bins_and_seed_offset(tmp_path):
    out = run_map(tmp_path, [5], "--events", "123", "--bins", "10", "--low", "80", "--high", "100")
    hist = histo.load(out)
    assert hist.entries == 123
    assert hist.binning == Binning(10, 80.0, 100.0)

    shifted = histo.load(run_map(tmp_path / "s", [5], "--seed-offset", "1000", "--events", "50"))
    direct = histo.generate([(1005, 50)])
    assert shifted == direct


def test_map_process_from_the_seed_file_or_the_option(tmp_path):
    higgs = histo.load(run_map(tmp_path / "h", [3], process="higgs"))
    assert higgs.observable == "m_gg" and higgs.binning == histo.PROCESSES["higgs"].binning

    forced = histo.load(run_map(tmp_path / "f", [3], "--process", "higgs"))
    assert forced == higgs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"seed": 4, "events": 10}', histo.SeedSpec(4, 10, None)),
        ('{"seed": 4, "events": 10, "process": "higgs"}', histo.SeedSpec(4, 10, "higgs")),
        ("seed = 9\nevents=20  # comment\n", histo.SeedSpec(9, 20, None)),
        ("42\n", histo.SeedSpec(42, None, None)),
    ],
)
def test_seed_file_formats(text, expected):
    assert histo.parse_seed_file(text) == expected


@pytest.mark.parametrize(
    "text", ["", "{not json", '{"events": 3}', "seed=x", '{"seed": 1, "process": "w"}']
)
def test_bad_seed_files_are_refused(text):
    with pytest.raises(HistogramError):
        histo.parse_seed_file(text)


def test_map_refuses_a_bad_input_with_exit_4(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("no seed here")
    missing = tmp_path / "missing.json"

    assert histo.map_main([], job_env([bad], tmp_path / "o1")) == histo.EXIT_BAD_INPUT
    assert histo.map_main([], job_env([missing], tmp_path / "o2")) == histo.EXIT_BAD_INPUT
    assert histo.map_main([], {runtime.OUTPUT_DIR: str(tmp_path)}) == histo.EXIT_USAGE
    assert "map:" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "hist.json").exists()


def test_inputs_may_be_file_urls(tmp_path):
    (path,) = write_seeds(tmp_path / "in", [21])
    env = {
        runtime.INPUT_FILES: json.dumps([path.as_uri()]),
        runtime.OUTPUT_DIR: str(tmp_path / "out"),
    }
    assert histo.map_main([], env) == 0
    assert histo.load(tmp_path / "out" / "hist.json").seeds == [21]


# --- deliberate failures (retries) ----------------------------------------------------------------


def test_fail_until_attempt_fails_early_attempts_then_succeeds(tmp_path, capsys):
    inputs = write_seeds(tmp_path / "in", [8])
    out = tmp_path / "out"
    args = ["--fail-until-attempt", "2"]

    codes = [histo.map_main(args, job_env(inputs, out, attempt=a)) for a in range(4)]

    assert codes == [histo.EXIT_INJECTED, histo.EXIT_INJECTED, 0, 0]
    assert "failing on purpose" in capsys.readouterr().err
    assert (out / "hist.json").is_file()


def test_fail_rate_is_deterministic_per_seed_and_attempt(tmp_path):
    def codes(seed: int) -> list[int]:
        inputs = write_seeds(tmp_path / f"in{seed}", [seed], events=1)
        env = [job_env(inputs, tmp_path / f"o{seed}", attempt=a) for a in range(6)]
        return [histo.map_main(["--fail-rate", "0.5"], e) for e in env]

    runs = {s: codes(s) for s in range(20)}

    assert runs == {s: codes(s) for s in range(20)}  # same seed and attempt, same outcome
    flat = [c for cs in runs.values() for c in cs]
    assert histo.EXIT_INJECTED in flat and 0 in flat  # the rate does something, not everything
    assert histo.map_main(["--fail-rate", "1"], job_env(write_seeds(tmp_path, [1]), tmp_path)) == 3
    assert histo.map_main(["--fail-rate", "2"], job_env(write_seeds(tmp_path, [1]), tmp_path)) == 2


def test_without_wms_attempt_the_attempt_is_zero():
    assert runtime.attempt({}) == 0
    assert runtime.attempt({runtime.ATTEMPT: "3"}) == 3
    with pytest.raises(runtime.RuntimeConfigError):
        runtime.attempt({runtime.ATTEMPT: "x"})


# --- merge --------------------------------------------------------------------------------------


def random_histograms(n: int, seed: int = 0) -> list[Histogram]:
    rng = random.Random(seed)
    return [histo.generate([(rng.randrange(10**6), rng.randrange(50, 400))]) for _ in range(n)]


def test_merge_sums_every_field():
    a, b = random_histograms(2)
    m = a + b
    assert m.counts == [x + y for x, y in zip(a.counts, b.counts, strict=True)]
    assert m.sumw == [x + y for x, y in zip(a.sumw, b.sumw, strict=True)]
    assert m.entries == a.entries + b.entries
    assert m.sum_weights == a.sum_weights + b.sum_weights
    assert (m.underflow, m.overflow) == (a.underflow + b.underflow, a.overflow + b.overflow)
    assert m.seeds == sorted(a.seeds + b.seeds) and m.jobs == 2


def test_merge_is_exactly_associative_and_commutative():
    hs = random_histograms(9, seed=3)
    left = histo.merge(hs)
    right = hs[-1]
    for h in reversed(hs[:-1]):
        right = h + right
    tree = histo.merge([histo.merge(hs[:4]), histo.merge(hs[4:7]), histo.merge(hs[7:])])
    shuffled = hs[:]
    random.Random(1).shuffle(shuffled)

    assert left == right == tree == histo.merge(shuffled)  # exact: weights are k/16
    assert histo.dumps(left) == histo.dumps(tree)


def test_merge_step_output_equals_the_merge_of_all_its_inputs(tmp_path):
    maps = [run_map(tmp_path / f"m{s}", [s], name=f"job{s}") for s in range(5)]
    out = tmp_path / "merged"

    code = histo.merge_main([], job_env(maps, out))

    assert code == 0
    merged = histo.load(out / "hist.json")
    assert merged == histo.merge_files(maps)
    assert merged.entries == 5 * 500 and merged.jobs == 5 and merged.seeds == [0, 1, 2, 3, 4]


def test_merges_nest(tmp_path):
    maps = [run_map(tmp_path / f"m{s}", [s], name=f"job{s}") for s in range(4)]
    histo.merge_main([], job_env(maps[:2], tmp_path / "left"))
    histo.merge_main([], job_env(maps[2:], tmp_path / "right"))
    top = [tmp_path / "left" / "hist.json", tmp_path / "right" / "hist.json"]

    assert histo.merge_main([], job_env(top, tmp_path / "top")) == 0
    assert histo.load(tmp_path / "top" / "hist.json") == histo.merge_files(maps)


def test_merge_refuses_a_binning_mismatch(tmp_path, capsys):
    z = run_map(tmp_path / "z", [1], name="z")
    rebinned = run_map(tmp_path / "r", [2], "--bins", "30", name="r")
    higgs = run_map(tmp_path / "h", [3], process="higgs", name="h")

    assert histo.merge_main([], job_env([z, rebinned], tmp_path / "o1")) == histo.EXIT_MISMATCH
    assert histo.merge_main([], job_env([z, higgs], tmp_path / "o2")) == histo.EXIT_MISMATCH
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "hist.json").exists()
    assert not (tmp_path / "o2" / "hist.json").exists()
    with pytest.raises(BinningMismatch):
        histo.merge([histo.load(z), histo.load(rebinned)])


def test_merge_refuses_bad_or_missing_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    lying = tmp_path / "lying.json"
    doc = histo.generate([(1, 10)]).to_dict()
    doc["entries"] += 1
    lying.write_text(json.dumps(doc))

    assert histo.merge_main([], job_env([bad], tmp_path / "o")) == histo.EXIT_BAD_INPUT
    assert histo.merge_main([], job_env([lying], tmp_path / "o")) == histo.EXIT_BAD_INPUT
    assert histo.merge_main([], job_env([tmp_path / "nope"], tmp_path / "o")) == 4
    assert histo.merge_main([], {runtime.INPUT_FILES: "[]"}) == histo.EXIT_USAGE
    with pytest.raises(HistogramError):
        histo.merge([])


def test_histogram_document_round_trips():
    h = histo.generate([(99, 300)], process="higgs")
    assert Histogram.from_dict(json.loads(histo.dumps(h))) == h
    assert json.loads(histo.dumps(h))["format"] == histo.FORMAT


def test_binning_edges_and_flows():
    b = Binning(4, 0.0, 4.0)
    assert [b.index(x) for x in (-0.1, 0.0, 0.99, 1.0, 3.999, 4.0, float("nan"))] == [
        -1,
        0,
        0,
        1,
        3,
        4,
        4,
    ]
    assert b.edges() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(HistogramError):
        Binning(0, 0.0, 1.0)
    with pytest.raises(HistogramError):
        Binning(3, 1.0, 1.0)


# --- noop and the console scripts -----------------------------------------------------------------


def test_noop_exits_zero_whatever_the_arguments():
    assert noop.main([]) == 0
    assert noop.main(["--anything", "x"]) == 0


def test_the_console_scripts_run_as_a_pilot_would_run_them(tmp_path):
    """The installed entry points (wms-payload-*) if present, else the same code via -m."""
    inputs = write_seeds(tmp_path / "in", [31, 32], events=200)
    env = {"PATH": str(Path(sys.executable).parent), **job_env(inputs, tmp_path / "map")}
    script = Path(sys.executable).parent / "wms-payload-map"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "payloads.histo", "map"]

    proc = subprocess.run(
        [*cmd, "--events", "100"], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )

    assert proc.returncode == 0, proc.stderr
    assert "200 events" in proc.stdout
    assert histo.load(tmp_path / "map" / "hist.json") == histo.generate([(31, 100), (32, 100)])
