"""bench/bench.py end to end on a tiny model, bench/lmw_to_gguf.py round trips,
and llamanp.threads."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, case, recode

import llamanp
from llamanp import threads

# written straight in the .lmw format (no converter run): GQA 6/2, max_seq_len 128
BENCH_CASE = case("lmw-bench-gqa6_2", "gqa6_2_theta5e5", "lmw")
# with the test SentencePiece tokenizer embedded
TOK_CASE = case("lmw-bench-tok-mha3", "mha3_untied_eps6", "lmw", tokenizer=True)


def test_bench_quick_writes_table_csv_and_plot(store, tmp_path):
    lmw = store.lmw(BENCH_CASE)
    out_csv, out_png = tmp_path / "b.csv", tmp_path / "b.png"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "-w", str(lmw),
                           "--quick", "--runs", "1", "--csv", str(out_csv), "--plot",
                           str(out_png), "--machine-mb", "64"],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    took = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    print(out)
    print(f"bench --quick --runs 1 on the tiny model took {took:.1f} s")
    for heading in ("## Machine limits", "## Prefill", "## Decode", "## Load and memory"):
        assert heading in out, heading
    for word in ("inplace", "concat", "none", "one at a time", "batched", "roofline",
                 "peak RSS", "llamanp.load", "inplace ÷ this"):
        assert word in out, word
    # the tiny model's max_seq_len (128) leaves out the long prompts and contexts, saying so
    assert "skipped: beyond the model's max_seq_len 128" in out

    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == (
        "engine", "section", "mode", "size", "unit", "runs", "median", "min", "max",
        "roofline", "fraction_of_roofline", "vs_transformers", "vs_transformers_min",
        "vs_transformers_max", "vs_llama_cpp", "vs_llama_cpp_min", "vs_llama_cpp_max", "samples")
    got = {(r["engine"], r["section"], r["mode"], r["size"]) for r in rows}
    for key in [("llamanp", "prefill", "batched", "16"), ("llamanp", "prefill", "fill1", "16"),
                ("llamanp", "decode", "inplace", "0"), ("llamanp", "decode", "concat", "0"),
                ("llamanp", "decode", "none", "0"), ("llamanp", "load", "llamanp.load", "0")]:
        assert key in got, key
    assert any(r["section"] == "machine" and r["unit"] == "GB/s" for r in rows)
    assert any(r["section"] == "machine" and r["unit"] == "GFLOP/s" for r in rows)
    assert any(r["section"] == "memory" for r in rows)
    for r in rows:
        assert float(r["median"]) > 0 and r["runs"] == "1", r
        assert float(r["samples"]) == float(r["median"]), r   # one run: one sample
        if r["engine"] == "llamanp" and r["section"] in ("prefill", "decode"):
            assert float(r["roofline"]) > 0 and float(r["fraction_of_roofline"]) > 0, r
            # the roofline is at least what llamanp reached, so no run passes it
            assert float(r["fraction_of_roofline"]) <= 1, r
            assert float(r["max"]) <= float(r["roofline"]) * (1 + 1e-5), r
    for line in out.split("## Prefill", 1)[1].split("## Load", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        fractions = [c for c in cells if c.endswith("%")]
        assert all(int(c[:-1]) <= 100 for c in fractions), line

    if importlib.util.find_spec("matplotlib") is not None:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out and not out_png.exists()


# --- the roofline, the interleaved bandwidth readings and the plot, on made-up figures ---

def bench_module():
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import bench
    return bench


def made_up_report(bench, model, read_gbs: float, sgemm_gflops: float):
    """A Report as bench builds it, with made-up samples: llamanp decoding at
    40-60 tok/s and prefilling at up to 900 tok/s."""
    plan = bench.Plan(prompt_lens=(16, 64), fill1_max=64, contexts=(0, 64, 96), steps=4,
                      none_steps=2, none_max=64, runs=3, machine_mb=16, sgemm_n=64,
                      probe=(16, 4), hf_fill1_max=16, hf_context_max=0)
    tasks = {}

    def add(engine, section, mode, size, unit, samples):
        t = bench.Task(engine, section, mode, size, unit, lambda: 0.0, samples=list(samples))
        tasks[t.key] = t
    add("machine", "machine", "read: BLAS sdot", 16, "GB/s", [read_gbs * f for f in (0.8, 1, .9)])
    add("machine", "machine", "gemv: x @ W.T", 16, "GB/s", [read_gbs] * 3)
    add("machine", "machine", "sgemm: 64 x 64 x 64", 64, "GFLOP/s", [sgemm_gflops] * 3)
    for ctx, speed in zip(plan.contexts, (60, 50, 40)):
        for kv, share in (("inplace", 1), ("concat", 0.9), ("none", 0.2)):
            if kv != "none" or ctx <= plan.none_max:
                add("llamanp", "decode", kv, ctx, "tok/s",
                    [speed * share * f for f in (0.9, 1.0, 1.1)])
    for n, speed in zip(plan.prompt_lens, (500, 900)):
        add("llamanp", "prefill", "batched", n, "tok/s", [speed * f for f in (0.9, 1.0, 1.2)])
        add("llamanp", "prefill", "fill1", n, "tok/s", [55, 50, 45])
    rep = bench.Report(model, "made-up.lmw", plan, tasks, [], [], ["# made up"], {})
    bench.compute_limits(rep)
    return rep


def llamanp_rows(rep):
    return [(k, t) for k, t in rep.tasks.items()
            if k[0] == "llamanp" and k[1] in ("prefill", "decode")]


def test_no_run_passes_its_roofline_when_the_measures_saw_a_busy_machine(store, tmp_path):
    bench = bench_module()
    model = llamanp.load(str(store.lmw(BENCH_CASE)))
    busy = made_up_report(bench, model, read_gbs=1e-3, sgemm_gflops=1e-3)
    L = busy.limits
    assert L["bandwidth_gbs"] > 1e-3 and L["sgemm_gflops"] > 1e-3
    assert L["bandwidth_from"].startswith("llamanp's") and L["sgemm_from"].startswith("llamanp's")
    best_fraction = 0.0
    for (engine, section, mode, size), t in llamanp_rows(busy):
        roof = bench.roofline(busy, section, mode, size)
        assert max(t.samples) <= roof * (1 + 1e-12), (section, mode, size)
        best_fraction = max(best_fraction, max(t.samples) / roof)
    assert best_fraction == pytest.approx(1.0)      # the fastest run is the roofline
    text = bench.render(busy)
    assert "reached by llamanp's" in text and "a busy machine slowed the measure" in text
    for section in ("## Prefill", "## Decode"):
        table = text.split(section, 1)[1].split("\n\n")[1]
        percents = [int(c.strip()[:-1]) for c in table.split("|") if c.strip().endswith("%")]
        assert percents and max(percents) <= 100, table
    out_csv = tmp_path / "r.csv"
    bench.write_csv(busy, str(out_csv))
    with open(out_csv, newline="") as f:
        fractions = [float(r["fraction_of_roofline"]) for r in csv.DictReader(f)
                     if r["fraction_of_roofline"]]
    assert fractions and max(fractions) <= 1

    # A quiet machine's measures stand: the roofline is theirs, well above every run.
    quiet = made_up_report(bench, model, read_gbs=1e6, sgemm_gflops=1e9)
    assert quiet.limits["bandwidth_from"] == '"read: BLAS sdot"'
    assert quiet.limits["bandwidth_gbs"] == 1e6 and quiet.limits["sgemm_gflops"] == 1e9
    assert "the best streaming read, \"read: BLAS sdot\"" in bench.render(quiet)


def test_bandwidth_readings_are_interleaved_with_the_runs():
    bench = bench_module()
    log, values = [], iter(range(1, 1000))

    def task(engine, section, mode, between=False):
        def once():
            log.append(mode)
            return float(next(values))
        return bench.Task(engine, section, mode, 0, "x", once, between=between)
    reads = [task("machine", "machine", f"read{i}", between=True) for i in range(2)]
    sgemm = task("machine", "machine", "sgemm")
    work = [task("llamanp", "decode", "d1"), task("llamanp", "prefill", "batched"),
            task("llamanp", "prefill", "fill1"), task("llamanp", "decode", "d2"),
            task("llamanp", "load", "load")]
    tasks = [*reads, sgemm, *work]
    bench.run_round_robin(tasks, runs=3, settle=0, warmup=False)
    runs = [log[i:i + 9] for i in range(0, len(log), 9)]
    assert len(runs) == 3 and sum(map(len, runs)) == len(log)
    for run in runs:
        for i, mode in enumerate(run):     # a reading right before each bandwidth-bound task
            if mode in ("d1", "d2", "fill1"):
                assert run[i - 1].startswith("read"), run
        assert [m for m in run if m.startswith("read")] == ["read0", "read1", "read0"]
    for t in tasks:
        assert len(t.samples) == 3, t.mode           # one figure per run for every task
    # a run's figure of a reading is its best reading in that run (values grow here)
    first_run_read0 = [v for v, m in zip(range(1, 10), runs[0]) if m == "read0"]
    assert reads[0].samples[0] == max(first_run_read0)


def test_log_axis_ticks_mark_every_decade_in_plain_numbers():
    bench = bench_module()
    wide = bench.log_ticks(0.8, 3000)
    for decade in (1, 10, 100, 1000):
        assert decade in wide
    assert [bench.tick_label(v) for v in wide if v >= 20][:4] == ["20", "50", "100", "200"]
    assert bench.tick_label(2000) == "2000" and bench.tick_label(1e6) == "1000000"
    assert bench.tick_label(1.5) == "1.5" and bench.tick_label(0.2) == "0.2"
    narrow = bench.log_ticks(15, 45)              # inside one decade: finer steps
    assert len(narrow) >= 4 and {20, 30, 40} <= set(narrow)
    assert all(15 <= v <= 45 for v in narrow)
    tight = bench.log_ticks(41, 49)               # even finer: the axis widens a little
    assert len(tight) >= 4 and tight[0] <= 41 and tight[-1] >= 49 and 45 in tight


def test_plot_has_labels_and_its_note_outside_the_plots(store):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bench = bench_module()
    rep = made_up_report(bench, llamanp.load(str(store.lmw(BENCH_CASE))), 5, 50)
    fig, note = bench.draw(rep, "made up")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = note.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
            shown = [t.get_text() for t in ax.get_yticklabels()
                     if t.get_text() and ax.get_ylim()[0] <= t.get_position()[1]
                     <= ax.get_ylim()[1]]
            assert len(shown) >= 4, (ax.get_title(), shown)
            assert not any("e+" in s or "$" in s for s in shown), shown
            # labels all the way up: one at or above a third of the top of the axis
            assert max(float(s) for s in shown) >= ax.get_ylim()[1] / 3, shown
    finally:
        plt.close(fig)


def test_bench_bad_arguments_are_one_line(store, tmp_path):
    lmw = store.lmw(BENCH_CASE)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "-w", str(lmw),
                           "--prompt-lens", "4096", "--contexts", "4096"],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: nothing to measure"), proc.stderr
    assert "Traceback" not in proc.stderr


def md_table(out: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under `heading`, its header first."""
    lines = out.split(heading, 1)[1].split("\n\n")[1].split("\n")
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line[1] != "-"]


def test_bench_storage_dtypes_table_and_csv(store, tmp_path):
    lmw_path = store.lmw(BENCH_CASE)
    bf16 = recode(lmw_path, tmp_path / "m-bf16.lmw", "bf16")
    out_csv = tmp_path / "d.csv"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "-w", str(lmw_path),
                           "--dtype-file", str(bf16), "--quick", "--runs", "2",
                           "--prompt-lens", "16,128", "--contexts", "0", "--fill1-max", "16",
                           "--steps", "4", "--machine-mb", "16", "--csv", str(out_csv)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    print(out)
    assert "## Storage dtypes" in out
    header, f32, b = md_table(out, "## Storage dtypes")    # the main file first
    assert header == ["dtype", "file MB", "load ms", "peak RSS MB", "decode tok/s",
                      "decode vs f32", "prefill tok/s", "prefill vs f32"]
    assert f32[0] == "f32" and b[0] == "bf16"
    num = lambda cell: float(cell.split()[0].replace(",", "").rstrip("×"))  # noqa: E731
    assert 0.4 < num(b[1]) / num(f32[1]) < 0.7    # the file: matrices at 2 bytes, not 4
    for row in (f32, b):
        assert num(row[2]) > 0 and num(row[3]) > 10 and num(row[4]) > 0 and num(row[6]) > 0, row
    assert f32[5] == f32[7] == "1"
    for ratio in (b[5], b[7]):                    # per-run ratios: median [min–max]
        assert "× [" in ratio and 0.01 < num(ratio) < 100, ratio

    with open(out_csv, newline="") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["engine"] == "llamanp-bf16"]
    got = {(r["section"], r["mode"]): r for r in csv_rows}
    assert set(got) == {("prefill", "batched"), ("decode", "inplace"), ("load", "llamanp.load"),
                        ("memory", "file size"), ("memory", "peak RSS inplace")}, set(got)
    for r in csv_rows:
        assert float(r["median"]) > 0 and r["roofline"] == "", r
    assert got["prefill", "batched"]["size"] == "128" and got["decode", "inplace"]["size"] == "0"
    assert len(got["decode", "inplace"]["samples"].split(";")) == 2


def test_bench_refuses_a_dtype_file_of_another_model(store, tmp_path):
    lmw_path = store.lmw(BENCH_CASE)
    other = store.lmw(TOK_CASE)       # 3 layers, dim 48: another model
    for bad, says in [(other, "is not the model of -w"), (tmp_path / "nope.lmw", "no such file"),
                      (lmw_path, "is stored as f32, as")]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "-w",
                               str(lmw_path), "--dtype-file", str(bad), "--no-rss"],
                              capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: --dtype-file {bad}") and says in proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr
        assert time.perf_counter() - t0 < 30     # refused before measuring anything


def test_set_threads_changes_what_get_threads_reports():
    before = threads.get_threads()
    if before is None:
        pytest.skip("this NumPy's BLAS does not tell its thread count (no threadpoolctl, no "
                    "OpenBLAS/MKL/BLIS symbol found), so set_threads cannot be checked")
    try:
        assert threads.set_threads(1) is True
        assert threads.get_threads() == 1
        assert threads.method() in ("threadpoolctl",) or threads.method().startswith("ctypes")
        a = np.ones((64, 64), np.float32)
        assert float((a @ a)[0, 0]) == 64.0      # BLAS still works with one thread
        assert threads.set_threads(2) is True
        assert threads.get_threads() == 2
    finally:
        threads.set_threads(before)
    assert threads.get_threads() == before
    with pytest.raises(ValueError):
        threads.set_threads(0)


def test_set_threads_before_numpy_uses_the_environment():
    """In a fresh interpreter, before NumPy is imported, the environment
    route is taken, and NumPy's BLAS then starts with that many threads."""
    path = str(REPO / "llamanp" / "threads.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('t', {path!r})\n"
        "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
        "assert 'numpy' not in sys.modules\n"
        "print(t.set_threads(1), t.method())\n"
        "import numpy\n"
        "print(t.get_threads())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("\n")[:2]
    assert first == "True environment"
    assert second in ("1", "None"), proc.stdout   # None: a BLAS that does not tell


def test_blas_kernels_names_the_kernels_openblas_was_told_to_use():
    """OPENBLAS_CORETYPE makes OpenBLAS use the named kernels (its documented
    behaviour); blas_kernels must report that name, and bench's header must
    say the kernels were chosen by the environment."""
    if threads.blas_kernels() is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS that names its kernels")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the kernel names asked for below are x86-64 ones")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import numpy, bench; from llamanp.threads import blas_kernels\n"
            "print(blas_kernels()); print(bench.blas_kernels_line())\n")
    # SSE4.2 and AVX2 kernels (a CPU without AVX2 gets OpenBLAS's own fallback)
    for name in ("Nehalem", "Haswell"):
        env = dict(os.environ, OPENBLAS_CORETYPE=name)
        proc = subprocess.run([sys.executable, "-c", code, str(REPO), str(REPO / "bench")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        kernels, line = proc.stdout.splitlines()[:2]
        if name == "Haswell" and kernels != name:
            assert "avx2" not in open("/proc/cpuinfo").read(), kernels
            continue
        assert kernels == name
        assert line.startswith(f"- BLAS kernels: OpenBLAS {name}, set by "
                               f"OPENBLAS_CORETYPE={name} in the environment")


# --- bench/lmw_to_gguf.py ---------------------------------------------------------

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the gguf package is not installed")


def lmw_to_gguf(src, dst, *extra):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "lmw_to_gguf.py"), str(src),
                           str(dst), *map(str, extra)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def convert_back(gguf_path, out):
    proc = subprocess.run([sys.executable, str(REPO / "convert.py"), str(gguf_path), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return llamanp.load(str(out))


@needs_gguf
@pytest.mark.parametrize("spec", ["gqa4_2_hd24", "llama31_scaled_theta1e4", "mqa3_1_tied_eps6"])
def test_lmw_to_gguf_round_trips_through_llamanps_gguf_reader(store, tmp_path, spec):
    """lmw -> F32 GGUF -> lmw gives back the same config and the same tensors
    (q/k stay in the interleaved layout GGUF uses; Llama 3.1 scaling goes out
    as rope_freqs and comes back)."""
    src = store.lmw(case(f"lmw-bench-{spec}", spec, "lmw"))
    gguf_path = tmp_path / "m.gguf"
    lmw_to_gguf(src, gguf_path)
    a, b = llamanp.load(str(src)), convert_back(gguf_path, tmp_path / "back.lmw")
    # GGUF keeps norm_eps and rope_theta as float32
    assert np.float32(b.config.norm_eps) == np.float32(a.config.norm_eps)
    assert np.float32(b.config.rope_theta) == np.float32(a.config.rope_theta)
    assert dataclasses.replace(b.config, norm_eps=a.config.norm_eps,
                               rope_theta=a.config.rope_theta) == a.config
    assert a.file.tensors.keys() == b.file.tensors.keys()
    for name, t in a.file.tensors.items():
        assert np.array_equal(t, b.file.tensors[name]), name


@needs_gguf
def test_lmw_to_gguf_loads_in_transformers_with_the_same_logits(store, tmp_path):
    """transformers reads the written GGUF as llama.cpp would (it un-permutes
    q/k from GGUF's layout) and computes llamanp's logits."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from test_gguf import transformers_from_gguf
    src = store.lmw(case("lmw-bench-gqa4_2", "gqa4_2", "lmw"))
    gguf_path = tmp_path / "m.gguf"
    lmw_to_gguf(src, gguf_path)
    m = llamanp.load(str(src))
    hf = transformers_from_gguf(gguf_path)
    ids = list(range(1, 20))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    assert float(np.abs(m.logits(ids) - want).max()) < 1e-4


@needs_gguf
def test_lmw_to_gguf_carries_a_sentencepiece_tokenizer(store, tmp_path):
    src = store.lmw(TOK_CASE)
    gguf_path = tmp_path / "m.gguf"
    lmw_to_gguf(src, gguf_path)
    a, b = llamanp.load(str(src)), convert_back(gguf_path, tmp_path / "back.lmw")
    text = "Once upon a time, a tiny model 123 said: héllo!"
    assert b.tokenizer is not None
    assert b.tokenizer.encode(text, bos=True) == a.tokenizer.encode(text, bos=True)
    ids = a.tokenizer.encode(text, bos=False)
    assert b.tokenizer.decode(ids) == a.tokenizer.decode(ids)
    assert (b.file.tokenizer.bos_id, b.file.tokenizer.eos_id) == \
        (a.file.tokenizer.bos_id, a.file.tokenizer.eos_id)


FAKE_LLAMA_CPP = '''
"""A stand-in for llama-cpp-python with the calls bench.py makes (it counts
tokens instead of computing), so that the --compare llama-cpp plumbing runs
without compiling llama.cpp."""
import numpy as np
__version__ = "0.0-fake"


class Llama:
    def __init__(self, model_path, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=None,
                 n_threads_batch=None, logits_all=False, verbose=True):
        with open(model_path, "rb") as f:
            assert f.read(4) == b"GGUF", model_path
        self.n_ctx, self.n_batch, self.n_tokens = n_ctx, n_batch, 0
        self.scores = np.zeros((n_ctx, 8), np.float32)

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        assert self.n_tokens + len(tokens) <= self.n_ctx, "context overflow"
        self.n_tokens += len(tokens)
'''


@needs_gguf
def test_bench_compare_llama_cpp_plumbing_with_a_stand_in(store, tmp_path):
    lmw = store.lmw(BENCH_CASE)
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    base = [sys.executable, str(REPO / "bench" / "bench.py"), "-w", str(lmw), "--quick",
            "--runs", "1", "--machine-mb", "16", "--no-rss", "--compare", "llama-cpp"]
    env = dict(__import__("os").environ, PYTHONPATH=str(fake))
    # without the F32 GGUF: says how to make one and skips
    gguf_path = tmp_path / "m.f32.gguf"
    proc = subprocess.run(base + ["--llama-gguf", str(gguf_path)], capture_output=True,
                          text=True, timeout=120, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench/lmw_to_gguf.py" in proc.stderr and "llama.cpp skipped" in proc.stdout
    lmw_to_gguf(lmw, gguf_path)
    out_csv = tmp_path / "c.csv"
    proc = subprocess.run(base + ["--llama-gguf", str(gguf_path), "--csv", str(out_csv)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama-cpp-python 0.0-fake" in proc.stdout
    assert "llamanp / llama-cpp" in proc.stdout
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r["engine"] == "llama-cpp" and r["section"] == "decode" for r in rows)
    assert all(r["vs_llama_cpp"] for r in rows
               if r["engine"] == "llamanp" and r["section"] == "prefill"
               and (r["mode"], r["size"]) in {("batched", "16"), ("fill1", "16")})


@needs_gguf
def test_bench_compare_transformers_on_a_tiny_model(store, tmp_path):
    """--compare transformers through --hf-gguf (an F32 GGUF of the same
    weights), with --threads: the table gets transformers columns, the
    logits agree, and the CSV carries the ratios."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    lmw = store.lmw(BENCH_CASE)
    gguf_path = tmp_path / "m.f32.gguf"
    lmw_to_gguf(lmw, gguf_path)
    out_csv = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "-w", str(lmw),
                           "--quick", "--runs", "1", "--machine-mb", "16", "--no-rss",
                           "--threads", "1", "--compare", "transformers", "--hf-gguf",
                           str(gguf_path), "--csv", str(out_csv)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "llamanp / transformers" in out and "transformers tok/s" in out
    assert "with 1 thread, set by --threads" in out, out[:2000]
    diff = float(out.split("max |logits diff| vs llamanp on 16 tokens: ")[1].split()[0])
    assert diff < 1e-3
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r["engine"] == "transformers" and r["section"] == "decode" for r in rows)
    batched16 = [r for r in rows if (r["engine"], r["section"], r["mode"], r["size"])
                 == ("llamanp", "prefill", "batched", "16")]
    assert batched16 and float(batched16[0]["vs_transformers"]) > 0


def test_tokenizer_bench_tables_on_the_suites_tokenizer(sp_model, tmp_path):
    """bench/tokenizer.py on the suite's small SentencePiece model: both tables,
    and the token counts it prints are sentencepiece's and run.c's own."""
    import re

    import sentencepiece as spm
    from test_tokenizer_bin import RunC, export_tokenizer_bin

    text = tmp_path / "t.txt"
    text.write_text((REPO / "tests" / "data" / "pride-and-prejudice-ch1.txt").read_text())
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "tokenizer.py"), "--runs", "2",
                           "--sizes", "200,1000", "--text", str(text), "--llama2", str(sp_model),
                           "--only", "llama2,tokenizer.bin"],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "## Loading" in out and "## Encoding" in out and "2 runs each" in out
    rows = {(m[1], int(m[2].replace(",", ""))): (int(m[3].replace(",", "")), m[4])
            for m in re.finditer(r"^\| (\S+) \| ([\d,]+) \| ([\d,]+) \|.*\| (yes|NO) \|$", out,
                                 re.M)}
    assert set(rows) == {(name, n) for name in ("llama2", "tokenizer.bin") for n in (200, 1000)}
    sp, runc = spm.SentencePieceProcessor(model_file=str(sp_model)), RunC(
        export_tokenizer_bin(sp_model))
    for n in (200, 1000):
        piece = text.read_text()[:n]
        assert rows["llama2", n] == (len(sp.encode(piece)), "yes")
        assert rows["tokenizer.bin", n][0] == len(runc.encode(piece))
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "tokenizer.py"), "--only", "gpt9"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --only: unknown gpt9")
    assert bad.stderr.count("\n") == 1
