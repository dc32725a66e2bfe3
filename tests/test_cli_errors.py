"""Bad input through the real command lines.

Every case must end with a non-zero exit status, exactly one line on stderr
that starts with "error:" (no traceback), and no output file: neither the
requested path nor any temporary file beside it.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest
import refmodels as R
import torch
from conftest import NOTOK_CASE, TOK_CASE, case, run_cli

PROMPT = "the little cat saw the dog"
META_CASE = case("meta-llama3-2-gqa4_2", "gqa4_2", "meta", family="llama3", n_shards=2)


def assert_one_line_error(rc, stdout, stderr, *mentions):
    assert rc != 0, f"exit status 0 for bad input\nstdout: {stdout[-500:]}\nstderr: {stderr[-500:]}"
    assert rc in (1, 2), f"exit status {rc} (expected 1, or 2 for usage errors)\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-2000:]}"
    line = lines[0]
    assert line.startswith("error:"), line
    assert len(line) > len("error:") + 10, f"uninformative message: {line!r}"
    for m in mentions:
        assert m in line, f"message should mention {m!r}: {line!r}"
    return line


@pytest.fixture
def outdir(tmp_path):
    """An empty directory for the output; must still be empty after a failure."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_no_output(outdir, expected=()):
    left = sorted(p.name for p in outdir.iterdir())
    assert left == sorted(expected), f"stray files left behind: {left}"


# ---------------------------------------------------------------------------
# convert.py
# ---------------------------------------------------------------------------

def convert_fails(src, outdir, *extra, mentions=()):
    out = outdir / "model.lmw"
    rc, so, se = run_cli("convert.py", src, out, *extra)
    line = assert_one_line_error(rc, so, se, *mentions)
    assert not out.exists()
    assert_no_output(outdir)
    return line


def test_convert_random_bytes(tmp_path, outdir):
    rng = np.random.default_rng(1)
    for name in ("noise.dat", "noise.bin", "noise.pt"):
        src = tmp_path / name
        src.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        convert_fails(src, outdir)


def test_convert_empty_file(tmp_path, outdir):
    src = tmp_path / "empty.bin"
    src.write_bytes(b"")
    convert_fails(src, outdir)


def test_convert_empty_dir(tmp_path, outdir):
    src = tmp_path / "nothing"
    src.mkdir()
    convert_fails(src, outdir)


def test_convert_missing_source(tmp_path, outdir):
    convert_fails(tmp_path / "does-not-exist.pt", outdir)


def _meta_copy(store, tmp_path):
    src = tmp_path / "meta"
    shutil.copytree(store.source(META_CASE), src)
    return src


def test_convert_meta_without_params_json(store, tmp_path, outdir):
    src = _meta_copy(store, tmp_path)
    (src / "params.json").unlink()
    convert_fails(src, outdir, mentions=("params.json",))


def test_convert_meta_bad_params_json(store, tmp_path, outdir):
    src = _meta_copy(store, tmp_path)
    (src / "params.json").write_text('{"dim": 64, "n_layers": ')
    convert_fails(src, outdir)


def test_convert_meta_shard_missing_key(store, tmp_path, outdir):
    src = _meta_copy(store, tmp_path)
    shard = src / "consolidated.01.pth"
    sd = torch.load(shard, map_location="cpu", weights_only=True)
    del sd["layers.1.attention.wk.weight"]
    torch.save(sd, shard)
    convert_fails(src, outdir)


def test_convert_meta_shard_extra_key(store, tmp_path, outdir):
    src = _meta_copy(store, tmp_path)
    shard = src / "consolidated.00.pth"
    sd = torch.load(shard, map_location="cpu", weights_only=True)
    sd["layers.0.attention.wz.weight"] = torch.zeros(4, 4)
    torch.save(sd, shard)
    convert_fails(src, outdir)


def test_convert_meta_shard_wrong_shape(store, tmp_path, outdir):
    src = _meta_copy(store, tmp_path)
    shard = src / "consolidated.01.pth"
    sd = torch.load(shard, map_location="cpu", weights_only=True)
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:-8].clone()
    torch.save(sd, shard)
    convert_fails(src, outdir)


def test_convert_meta_replicated_norm_differs(store, tmp_path, outdir):
    """Norms are replicated in every shard: copies that disagree mean the
    shards do not belong together."""
    src = _meta_copy(store, tmp_path)
    shard = src / "consolidated.01.pth"
    sd = torch.load(shard, map_location="cpu", weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 1.0
    torch.save(sd, shard)
    convert_fails(src, outdir)


def test_convert_meta_params_disagree_with_weights(store, tmp_path, outdir):
    src = _meta_copy(store, tmp_path)
    p = json.loads((src / "params.json").read_text())
    p["n_layers"] += 1
    (src / "params.json").write_text(json.dumps(p))
    convert_fails(src, outdir)


def test_convert_llama2c_bin_truncated(store, tmp_path, outdir):
    ref = store.reference("gqa4_2")
    src = R.write_llama2c_bin(tmp_path / "m.bin", ref.model, ref.spec, version=0)
    data = src.read_bytes()
    src.write_bytes(data[:-100])
    convert_fails(src, outdir)


def test_convert_llama2c_bin_v1_bad_version(store, tmp_path, outdir):
    ref = store.reference("gqa4_2")
    src = R.write_llama2c_bin(tmp_path / "m.bin", ref.model, ref.spec, version=1)
    data = bytearray(src.read_bytes())
    struct.pack_into("<i", data, 4, 7)   # a version llama2.c never wrote
    src.write_bytes(bytes(data))
    convert_fails(src, outdir)


def test_convert_llama2c_pt_missing_tensor(store, tmp_path, outdir):
    ref = store.reference("gqa4_2")
    src = R.write_llama2c_pt(tmp_path / "ckpt.pt", ref.model, ref.spec)
    ck = torch.load(src, map_location="cpu", weights_only=False)
    del ck["model"]["layers.1.feed_forward.w2.weight"]
    torch.save(ck, src)
    convert_fails(src, outdir)


def test_convert_bad_tokenizer(store, tmp_path, outdir):
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    convert_fails(store.source(NOTOK_CASE), outdir, "--tokenizer", tok)


def test_convert_missing_tokenizer(store, tmp_path, outdir):
    convert_fails(store.source(NOTOK_CASE), outdir, "--tokenizer", tmp_path / "nope.model")


def test_convert_into_missing_directory(store, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "m.lmw"
    rc, so, se = run_cli("convert.py", store.source(NOTOK_CASE), out)
    assert_one_line_error(rc, so, se)
    assert not (tmp_path / "no").exists()


def test_convert_existing_output_needs_force(store, outdir):
    out = outdir / "model.lmw"
    out.write_bytes(b"precious, not a model")
    st = out.stat()
    rc, so, se = run_cli("convert.py", store.source(NOTOK_CASE), out)
    assert_one_line_error(rc, so, se, "--force")
    assert out.read_bytes() == b"precious, not a model"
    assert out.stat().st_mtime_ns == st.st_mtime_ns
    assert_no_output(outdir, ["model.lmw"])


def test_convert_existing_output_with_force(store, outdir):
    import llamanp

    out = outdir / "model.lmw"
    out.write_bytes(b"precious, not a model")
    rc, so, se = run_cli("convert.py", store.source(NOTOK_CASE), out, "--force")
    assert rc == 0, se[-2000:]
    assert "Traceback" not in se
    assert_no_output(outdir, ["model.lmw"])
    ref = store.reference(NOTOK_CASE.spec)
    m = llamanp.load(str(out))
    assert np.abs(m.logits(ref.ids) - ref.logits).max() <= 1e-4


def test_convert_usage_errors(store, outdir):
    rc, so, se = run_cli("convert.py")                         # no arguments
    assert_one_line_error(rc, so, se)
    rc, so, se = run_cli("convert.py", store.source(NOTOK_CASE), outdir / "m.lmw", "--bogus")
    assert_one_line_error(rc, so, se)
    assert_no_output(outdir)


# ---------------------------------------------------------------------------
# llama-np.py: damaged model files
# ---------------------------------------------------------------------------

def run_fails(weights, outdir, *args, mentions=()):
    """Run llama-np.py expecting a one-line error and no --stats-json output."""
    stats = outdir / "stats.json"
    argv = ["-w", weights, *args]
    if not any(a in ("-i", "-f") for a in map(str, args)):
        argv += ["-i", PROMPT]
    if "-n" not in map(str, args):
        argv += ["-n", "4"]
    rc, so, se = run_cli("llama-np.py", *argv, "--stats-json", stats)
    line = assert_one_line_error(rc, so, se, *mentions)
    assert_no_output(outdir)
    return line


def _lmw_header_span(data: bytes) -> tuple[int, int]:
    assert data[:8] == R.LMW_MAGIC, "not an .lmw file"
    (n,) = struct.unpack_from("<Q", data, 16)
    return 24, 24 + n


def _damage(data: bytes, how: str) -> bytes:
    h0, h1 = _lmw_header_span(data)
    if how == "truncated_half":
        return data[: len(data) // 2]
    if how == "truncated_in_preamble":
        return data[:12]
    if how == "truncated_in_header":
        return data[: (h0 + h1) // 2]
    if how == "truncated_last_bytes":      # the format ends exactly at the last region
        return data[:-4]
    if how == "trailing_garbage":
        return data + b"\0" * 64
    if how == "wrong_magic":
        return b"GGUF\0\0\0\0" + data[8:]
    if how == "unknown_version":
        return data[:8] + struct.pack("<I", 99) + data[12:]
    if how == "header_length_too_big":
        return data[:16] + struct.pack("<Q", len(data) * 2) + data[24:]
    if how == "corrupt_json":
        header = data[h0:h1]
        i = header.index(b'"config"')
        return data[: h0 + i] + b"#" + data[h0 + i + 1:]
    if how == "json_not_utf8":
        header = data[h0:h1]
        i = header.index(b'"config"')
        return data[: h0 + i + 1] + b"\xff" + data[h0 + i + 2:]
    if how == "tensor_renamed":            # norm.weight missing, norx.weight unexpected
        header = data[h0:h1]
        assert header.count(b'"norm.weight"') == 1
        return data[:h0] + header.replace(b'"norm.weight"', b'"norx.weight"') + data[h1:]
    if how == "bad_dtype":
        header = data[h0:h1]
        new = re.sub(rb'"dtype":(\s*)"f32"', rb'"dtype":\1"i32"', header, count=1)
        assert new != header
        return data[:h0] + new + data[h1:]
    if how == "misaligned_offset":
        header = data[h0:h1]
        m = re.search(rb'"offset":(\s*)(\d+)', header[header.index(b'"norm.weight"'):])
        assert m is not None
        start = h0 + header.index(b'"norm.weight"') + m.start(2)
        digits = m.group(2)
        new = str(int(digits) + 4).encode()
        if len(new) != len(digits):
            pytest.fail("offset digits changed length; pick another edit")
        return data[:start] + new + data[start + len(digits):]
    raise ValueError(how)


DAMAGE = ["truncated_half", "truncated_in_preamble", "truncated_in_header",
          "truncated_last_bytes", "trailing_garbage", "wrong_magic", "unknown_version",
          "header_length_too_big", "corrupt_json", "json_not_utf8", "tensor_renamed",
          "bad_dtype", "misaligned_offset"]


@pytest.mark.parametrize("how", DAMAGE)
def test_run_damaged_lmw(store, tmp_path, outdir, how):
    good = store.lmw(TOK_CASE).read_bytes()
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(_damage(good, how))
    run_fails(bad, outdir)


@pytest.mark.parametrize("what", ["missing_tensor", "extra_tensor", "bad_config",
                                  "unknown_config_field", "unknown_rope_scaling"])
def test_run_invalid_lmw_written_from_spec(store, sp_model, tmp_path, outdir, what):
    """Well-formed files (written from docs/lmw-format.md by the test suite)
    whose content is wrong."""
    ref = store.reference(TOK_CASE.spec)
    spec = ref.spec
    cfg = R.lmw_config(spec)
    kw = {}
    if what == "missing_tensor":
        kw["drop"] = ("layers.1.feed_forward.w2.weight",)
    elif what == "extra_tensor":
        # a tied config with the output matrix still present
        kw["config"] = dict(cfg, tied_embeddings=True)
    elif what == "bad_config":
        kw["config"] = dict(cfg, n_kv_heads=2)          # 3 heads are not a multiple of 2
    elif what == "unknown_config_field":
        kw["config"] = dict(cfg, sliding_window=16)
    elif what == "unknown_rope_scaling":
        kw["config"] = dict(cfg, rope_scaling={"type": "yarn", "factor": 4.0})
    bad = R.write_lmw(tmp_path / "bad.lmw", ref.model, spec, tokenizer=sp_model, **kw)
    run_fails(bad, outdir)


def test_reference_lmw_writer_is_loadable(store, sp_model, tmp_path):
    """Control for the test above: the same writer without the defect gives a
    file llama-np.py runs (so the failures above are about the defects)."""
    ref = store.reference(TOK_CASE.spec)
    good = R.write_lmw(tmp_path / "good.lmw", ref.model, ref.spec, tokenizer=sp_model)
    rc, so, se = run_cli("llama-np.py", "-w", good, "-i", PROMPT, "-n", "4", "--temp", "0")
    assert rc == 0, se[-2000:]


def test_run_missing_model(tmp_path, outdir):
    run_fails(tmp_path / "nope.lmw", outdir)


def test_run_model_is_directory(tmp_path, outdir):
    run_fails(tmp_path, outdir)


def test_run_empty_model_file(tmp_path, outdir):
    (tmp_path / "empty.lmw").write_bytes(b"")
    run_fails(tmp_path / "empty.lmw", outdir)


def test_run_checkpoint_without_tokenizer(store, outdir, tmp_path, monkeypatch):
    """A source checkpoint given to -w is converted into the model cache (see
    test_cli.py); one without a tokenizer then asks for -t, in one line."""
    monkeypatch.setenv("LLAMANP_CACHE", str(tmp_path / "cache"))
    src = store.source(NOTOK_CASE)
    rc, so, se = run_cli("llama-np.py", "-w", src, "-i", PROMPT, "-n", "4")
    assert rc == 1 and "Traceback" not in se
    assert se.splitlines()[0].startswith(f"converting {src} into the model cache (once): ")
    assert se.splitlines()[-1].startswith("error: ") and "-t" in se.splitlines()[-1]


# ---------------------------------------------------------------------------
# llama-np.py: bad arguments with a good model
# ---------------------------------------------------------------------------

def test_run_empty_prompt(store, outdir):
    run_fails(store.lmw(TOK_CASE), outdir, "-i", "")


def test_run_empty_prompt_file(store, tmp_path, outdir):
    f = tmp_path / "prompt.txt"
    f.write_text("")
    run_fails(store.lmw(TOK_CASE), outdir, "-f", f)


def test_run_missing_prompt_file(store, tmp_path, outdir):
    run_fails(store.lmw(TOK_CASE), outdir, "-f", tmp_path / "nope.txt")


def test_run_prompt_longer_than_seqlength(store, outdir):
    long_prompt = " ".join(["the little cat saw the big dog"] * 4)
    run_fails(store.lmw(TOK_CASE), outdir, "-i", long_prompt, "--seqlength", "8")


@pytest.mark.parametrize("seqlength", ["0", "-5", "100000"])
def test_run_bad_seqlength(store, outdir, seqlength):
    run_fails(store.lmw(TOK_CASE), outdir, "--seqlength", seqlength)


@pytest.mark.parametrize("args", [("--temp", "-1"), ("--temp", "nan"), ("--topp", "0"),
                                  ("--topp", "1.5"), ("--topp", "-0.5"), ("--topk", "-3"),
                                  ("--topk", "2.5"), ("-n", "-2"), ("-n", "many"),
                                  ("--seed", "-2")],
                         ids=lambda a: " ".join(a))
def test_run_bad_sampling_values(store, outdir, args):
    run_fails(store.lmw(TOK_CASE), outdir, *args)


def test_run_unknown_kvcache(store, outdir):
    run_fails(store.lmw(TOK_CASE), outdir, "--kvcache", "foo")


def test_run_no_prompt_given(store, outdir):
    stats = outdir / "stats.json"
    rc, so, se = run_cli("llama-np.py", "-w", store.lmw(TOK_CASE), "--stats-json", stats)
    assert_one_line_error(rc, so, se)
    assert_no_output(outdir)


def test_run_text_without_tokenizer(store, outdir):
    """A model converted without a tokenizer, given text and no -t: the
    message must say to pass -t."""
    line = run_fails(store.lmw(NOTOK_CASE), outdir, "-i", PROMPT)
    assert re.search(r"(^|\s|\()-t\b", line), f"message should tell the user to pass -t: {line!r}"


def test_run_text_with_tokenizer_flag_works(store, sp_model, outdir):
    """Control for the test above: the same model with -t runs."""
    stats = outdir / "stats.json"
    rc, so, se = run_cli("llama-np.py", "-w", store.lmw(NOTOK_CASE), "-t", sp_model,
                         "-i", PROMPT, "-n", "4", "--temp", "0", "--stats-json", stats)
    assert rc == 0, se[-2000:]
    assert json.loads(stats.read_text())


def test_run_bad_tokenizer_flag(store, tmp_path, outdir):
    run_fails(store.lmw(NOTOK_CASE), outdir, "-t", tmp_path / "nope.model")


def test_run_prompt_not_utf8(store, tmp_path, outdir):
    f = tmp_path / "prompt.txt"
    f.write_bytes(b"the little cat \xff\xfe")
    run_fails(store.lmw(TOK_CASE), outdir, "-f", f, mentions=("UTF-8",))


def test_run_conflicting_kvcache_flags(store, outdir):
    run_fails(store.lmw(TOK_CASE), outdir, "--nokvcache", "--kvcache", "concat")
