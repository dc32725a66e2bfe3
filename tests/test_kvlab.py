"""The KV-cache lab, on a tiny model with a real tokenizer (seconds).

The lab's figures are checked against values computed here independently:
the full cache's logits from one fresh `Model.logits` pass over the whole
text, each strategy's from its own session fed chunk by chunk, and KL, NLL and
top-1 agreement written out again in float64. Exact strategies must show KL 0
and top-1 agreement 1.
"""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from tinymodel import write_text_model

import llamanp
from llamanp import kvlab
from llamanp.kvcache import STRATEGIES

TEXT = "tests/data/pride-and-prejudice-ch1.txt"
TOKENS, CHUNK, BUDGET = 120, 8, 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model):
    return write_text_model(tmp_path_factory.mktemp("kvlab") / "t.lmw", sp_model, seed=2,
                            max_seq_len=256)


def log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1,
                                                                                      keepdims=True))


def lossy_spec():
    """An evicting strategy, if llamanp.kvcache has one."""
    return f"window:size={BUDGET}" if "window" in STRATEGIES else None


def test_lab_table_against_independent_runs(tiny, tmp_path, capsys):
    specs = ["inplace", "concat", "paged:block=4"] + ([lossy_spec()] if lossy_spec() else [])
    out = tmp_path / "lab"
    code = kvlab.main(["-w", str(tiny), "--text", TEXT, "--tokens", str(TOKENS),
                       "--chunk", str(CHUNK), "--budget", str(BUDGET),
                       "--strategies", ";".join(specs), "--contexts", "32,64",
                       "--passkey-tokens", "60", "--steps", "1", "--out", str(out),
                       "--no-plots", "--no-sharing"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {r["strategy"]: r for r in csv.DictReader(open(out / "kvlab.csv"))}
    assert list(rows) == specs

    m = llamanp.load(str(tiny))
    ids = m.tokenizer.encode(open(TEXT).read(), bos=m.tokenizer.bos_id is not None)[:TOKENS]
    full = log_softmax(m.logits(ids, "inplace"))[:-1]        # one pass, a fresh cache
    targets = np.array(ids[1:])
    full_ppl = math.exp(-full[np.arange(len(targets)), targets].mean())
    printed_ppl = float(re.search(r"full cache: perplexity ([0-9.]+)", printed).group(1))
    assert printed_ppl == pytest.approx(full_ppl, rel=1e-4)
    for spec in specs:
        s = m.session(spec, max_seq_len=len(ids))
        logp = log_softmax(np.concatenate(
            [s.feed(ids[i:min(i + CHUNK, len(ids) - 1)], all_logits=True)
             for i in range(0, len(ids) - 1, CHUNK)]))
        kl = (np.exp(full) * (full - logp)).sum(-1)
        r = rows[spec]
        assert float(r["kl_mean"]) == pytest.approx(kl.mean(), rel=1e-6, abs=1e-9)
        assert float(r["top1"]) == pytest.approx((logp.argmax(-1) == full.argmax(-1)).mean())
        ppl = math.exp(-logp[np.arange(len(targets)), targets].mean())
        assert float(r["ppl"]) == pytest.approx(ppl, rel=1e-9)
        if spec != lossy_spec():            # exact: the full cache's numbers
            assert abs(float(r["kl_mean"])) < 1e-9 and float(r["top1"]) == 1.0
            assert float(r["logit_diff"]) <= 1e-5
            assert float(r["ppl"]) == pytest.approx(full_ppl, rel=1e-6)
        else:
            assert float(r["kl_mean"]) > 1e-6          # it forgets, and it shows
        # the cost process ran: bytes from the arrays, speeds, passkey
        assert int(r["nbytes"]) > 0 and float(r["prefill_tps"]) > 0
        assert float(r["decode_tps_32"]) > 0 and float(r["decode_tps_64"]) > 0
        assert r["passkey_50_retrieved"] in ("True", "False")
    # the in-place cache is allocated for exactly the text: bytes per position
    # are 2 (k, v) x layers x kv heads x head dim x 4 bytes
    c = m.config
    assert float(rows["inplace"]["bytes_per_position"]) == 2 * c.n_layers * c.n_kv_heads * \
        c.head_dim * 4
    kept = json.loads((out / "kept_positions.json").read_text())["kept"]
    assert kept["inplace"] == list(range(len(ids) - 1))
    if lossy_spec():
        assert len(kept[lossy_spec()]) == BUDGET


def test_peak_rss_is_each_cost_process_own(sp_model, tmp_path):
    """Each row's peak RSS is its own cost process's high-water mark. An exact
    cache filled to 8,000 positions must peak above a 24-position window by
    about the cache's bytes (measured here from its arrays), and both must stay
    below this launching process's peak, made large on purpose first: the
    figure once came from ru_maxrss, which the kernel carries over from the
    parent at exec, so every row read the parent's peak."""
    from llamanp.config import Config

    # 4 layers x 4 kv heads x 64 dims, float32: 8 KiB of keys and values per position
    cfg = Config(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, hidden_dim=256,
                 vocab_size=300, max_seq_len=8192)
    path = write_text_model(tmp_path / "wide.lmw", sp_model, seed=3, config=cfg)
    ballast = np.ones(512 << 17)            # 512 MiB, written, then let go
    del ballast
    parent_peak = kvlab.peak_rss_mb()
    specs = ["inplace", f"window:size={BUDGET}"]
    out = tmp_path / "lab"
    assert kvlab.main(["-w", str(path), "--text", TEXT, "--tokens", "40", "--chunk", "8",
                       "--budget", str(BUDGET), "--strategies", ";".join(specs),
                       "--contexts", "8000", "--passkey-tokens", "30", "--steps", "1",
                       "--out", str(out), "--no-plots", "--no-sharing"]) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(out / "kvlab.csv"))}
    peak = {spec: float(rows[spec]["rss_peak_mb"]) for spec in specs}

    s = llamanp.load(str(path)).session("inplace")     # the decode test's cache, as allocated
    cache_mb = s.cache.nbytes / 2**20
    assert cache_mb > 60
    assert 0.8 * cache_mb < peak["inplace"] - peak[specs[1]] < 1.5 * cache_mb, (peak, cache_mb)
    assert max(peak.values()) < parent_peak - 256, (peak, parent_peak)
    for spec in specs:                        # loading came first, and is part of the peak
        assert 0 < float(rows[spec]["rss_loaded_mb"]) <= peak[spec]


def test_lab_sharing_section(tiny, tmp_path, capsys, monkeypatch):
    """The paged sharing figures the lab prints come from real batch and beam runs."""
    m = llamanp.load(str(tiny))
    ids = list(range(3, 200))
    share = kvlab.sharing(m, ids, prefix=64, n=4, suffix=8, new=4, beams=3)
    b = share["batch"]
    assert b["same_outputs"] and b["ratio"] < 0.6
    assert share["beam"]["same_beams"]
    assert share["beam"]["paged_peak_kv_bytes"] < share["beam"]["inplace_peak_kv_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--strategies", "bogus"], "unknown kvcache strategy 'bogus'"),
    (["--strategies", "none"], "keeps no cache"),
    (["--budget", "0"], "--budget must be >= 1"),
    (["--chunk", "0"], "--chunk must be in 1..512"),
    (["--contexts", "a,b"], "--contexts must be comma-separated integers"),
])
def test_bad_arguments_get_one_line(tiny, tmp_path, capsys, args, message):
    code = kvlab.run_main(kvlab.main, ["-w", str(tiny), "--text", TEXT, "--out",
                                       str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_missing_text_file(tiny, tmp_path, capsys):
    code = kvlab.run_main(kvlab.main, ["-w", str(tiny), "--text", str(tmp_path / "nope.txt")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: cannot read")
