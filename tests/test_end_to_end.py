"""End-to-end checks against an independent reference (HF transformers).

For every model shape in refmodels.SPECS and every source format that can
express it, the same random weights are written in that format, converted
with `python convert.py`, loaded with llamanp and compared with
transformers' LlamaForCausalLM: logits within 1e-4 and the same greedy
continuation.

The first group of tests checks the reference itself (that the Meta-layout
state dict, the writers and the test tokenizer are right, and that the
chosen weights make the comparison sensitive to the usual bugs); those do not
need llamanp.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import refmodels as R
import torch
from conftest import NOTOK_CASE, TOK_CASE, Case, case, run_cli

TOL = 1e-4          # max |logits - HF logits|
MIN_MARGIN = 1e-3   # the HF greedy path must not pass near a tie


# ---------------------------------------------------------------------------
# the matrix of source checkpoints
# ---------------------------------------------------------------------------

CASES: list[Case] = [
    # llama2.c training checkpoints (train.py's .pt)
    case("pt-mha_tied", "mha_tied", "llama2c_pt"),
    case("pt-mha3_untied_eps6", "mha3_untied_eps6", "llama2c_pt"),
    case("pt-gqa4_2", "gqa4_2", "llama2c_pt"),
    case("pt-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", "llama2c_pt"),
    case("pt-orig_mod-gqa4_2", "gqa4_2", "llama2c_pt", compiled_prefix=True),
    case("pt-orig_mod-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", "llama2c_pt", compiled_prefix=True),
    # model_args as upstream train.py writes them: no hidden_dim, no norm_eps
    case("pt-minimal_args-mha_tied", "mha_tied", "llama2c_pt", minimal_args=True),
    case("pt-minimal_args-gqa4_2", "gqa4_2", "llama2c_pt", minimal_args=True),
    # llama2.c export.py .bin files
    case("bin0-shared-mha_tied", "mha_tied", "llama2c_bin", version=0),
    case("bin0-unshared-gqa4_2", "gqa4_2", "llama2c_bin", version=0),
    case("bin1-shared-mha_tied", "mha_tied", "llama2c_bin", version=1),
    case("bin1-unshared-gqa4_2", "gqa4_2", "llama2c_bin", version=1),
    # Meta checkpoints, one shard, each spec in its natural family
    case("meta-llama2-1-mha_tied", "mha_tied", "meta", family="llama2", n_shards=1),
    case("meta-llama2-1-mha3_untied_eps6", "mha3_untied_eps6", "meta", family="llama2", n_shards=1),
    case("meta-llama2-1-gqa4_2", "gqa4_2", "meta", family="llama2", n_shards=1),
    case("meta-llama2-1-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", "meta", family="llama2", n_shards=1),
    case("meta-llama3-1-gqa6_2_theta5e5", "gqa6_2_theta5e5", "meta", family="llama3", n_shards=1),
    case("meta-llama3-1-gqa8_4_theta5e5", "gqa8_4_theta5e5", "meta", family="llama3", n_shards=1),
    case("meta-llama3-1-llama31_scaled_theta5e5", "llama31_scaled_theta5e5", "meta",
         family="llama3", n_shards=1),
    case("meta-llama3-1-llama31_scaled_theta1e4", "llama31_scaled_theta1e4", "meta",
         family="llama3", n_shards=1),
    # Meta model-parallel shards (2 and 4), both families, GQA
    case("meta-llama2-2-mha_tied", "mha_tied", "meta", family="llama2", n_shards=2),
    case("meta-llama2-2-gqa4_2", "gqa4_2", "meta", family="llama2", n_shards=2),
    case("meta-llama3-2-gqa4_2", "gqa4_2", "meta", family="llama3", n_shards=2),
    case("meta-llama2-4-gqa8_4_theta5e5", "gqa8_4_theta5e5", "meta", family="llama2", n_shards=4),
    case("meta-llama3-4-gqa8_4_theta5e5", "gqa8_4_theta5e5", "meta", family="llama3", n_shards=4),
    case("meta-llama3-2-llama31_scaled_theta5e5", "llama31_scaled_theta5e5", "meta",
         family="llama3", n_shards=2),
    # bfloat16 shards, as Meta ships them (reference uses the same rounded weights)
    case("meta-llama3-2-bf16-gqa6_2_theta5e5", "gqa6_2_theta5e5", "meta", bf16=True,
         family="llama3", n_shards=2),
    case("meta-llama2-1-bf16-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", "meta", bf16=True,
         family="llama2", n_shards=1),
    # .lmw written directly from docs/lmw-format.md (no converter): "llama3"
    # scaling with original context 16, which no source format above can express
    case("lmw-llama3_scaled_orig16", "llama3_scaled_orig16", "lmw"),
    case("lmw-gqa6_2_theta5e5", "gqa6_2_theta5e5", "lmw"),
    case("lmw-gqa4_2_hd24", "gqa4_2_hd24", "lmw"),
    # Hugging Face directories from save_pretrained (config.json + model.safetensors),
    # every spec, in the Hub's config spelling (top-level rope_theta / rope_scaling)
    # or transformers 5's (rope_parameters, "v5cfg"). test_hf.py adds shards,
    # float16 / bfloat16 files and pytorch_model.bin.
    case("hf-mha_tied", "mha_tied", "hf", legacy_config=True),
    case("hf-v5cfg-mha3_untied_eps6", "mha3_untied_eps6", "hf", legacy_config=False),
    case("hf-gqa4_2", "gqa4_2", "hf", legacy_config=True),
    case("hf-v5cfg-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", "hf", legacy_config=False),
    case("hf-gqa6_2_theta5e5", "gqa6_2_theta5e5", "hf", legacy_config=True),
    case("hf-v5cfg-gqa8_4_theta5e5", "gqa8_4_theta5e5", "hf", legacy_config=False),
    case("hf-llama31_scaled_theta5e5", "llama31_scaled_theta5e5", "hf", legacy_config=True),
    case("hf-v5cfg-llama31_scaled_theta1e4", "llama31_scaled_theta1e4", "hf",
         legacy_config=False),
    case("hf-llama3_scaled_orig16", "llama3_scaled_orig16", "hf", legacy_config=True),
    case("hf-v5cfg-llama3_scaled_orig16", "llama3_scaled_orig16", "hf", legacy_config=False),
    case("hf-gqa4_2_hd24", "gqa4_2_hd24", "hf", legacy_config=True),
    case("hf-v5cfg-gqa4_2_hd24", "gqa4_2_hd24", "hf", legacy_config=False),
    # bfloat16 safetensors (the reference holds the same rounded weights)
    case("hf-bf16-gqa6_2_theta5e5", "gqa6_2_theta5e5", "hf", bf16=True,
         legacy_config=True, dtype="bfloat16"),
]
CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES)

CONVERTIBLE = ("llama2c_pt", "llama2c_bin", "meta", "hf")   # what convert.py reads today


KV_CASES = ["pt-mqa3_1_tied_eps6", "pt-mha3_untied_eps6", "meta-llama3-1-gqa6_2_theta5e5",
            "meta-llama3-1-llama31_scaled_theta5e5", "lmw-llama3_scaled_orig16",
            "hf-v5cfg-gqa4_2_hd24"]


@pytest.fixture(scope="module", autouse=True)
def _start_conversions(store):
    # start every conversion in the background; tests then wait for theirs
    store.prefetch([*CASES, TOK_CASE])


def _maxdiff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    return float(np.max(np.abs(a - b)))


def test_matrix_covers_every_spec_and_format():
    """Every spec is tested, through every convertible format that can express it."""
    assert {c.spec for c in CASES} == set(R.SPEC_BY_NAME)
    have = {(c.spec, c.fmt) for c in CASES}
    for spec in R.SPECS:
        for fmt in CONVERTIBLE:
            if spec.can_express(fmt)[0]:
                assert (spec.name, fmt) in have, (spec.name, fmt)
    for fmt, kw in (("llama2c_bin", ("version", 0)), ("llama2c_bin", ("version", 1))):
        assert {c.model_spec.tied for c in CASES if c.fmt == fmt and kw in c.kw} == {True, False}
    assert {dict(c.kw)["n_shards"] for c in CASES if c.fmt == "meta"} == {1, 2, 4}
    assert {dict(c.kw)["family"] for c in CASES if c.fmt == "meta"
            and dict(c.kw)["n_shards"] > 1} == {"llama2", "llama3"}


# ---------------------------------------------------------------------------
# 1. the reference itself
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", R.SPECS, ids=lambda s: s.name)
def test_reference_meta_layout_matches_hf(store, spec):
    """meta_state_dict (HF->Meta names and q/k layout) run through an
    independent Meta-style forward (interleaved-pair RoPE, float64)
    reproduces HF's logits."""
    ref = store.reference(spec)
    sd = R.meta_state_dict(ref.model)
    assert set(sd) == {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{s}" for i in range(spec.n_layers) for s in (
            "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
            "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
            "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")}
    for i in range(spec.n_layers):
        att = ref.model.model.layers[i].self_attn
        for w, n in ((att.q_proj.weight, spec.n_heads), (att.k_proj.weight, spec.n_kv_heads)):
            assert torch.equal(R.meta_to_hf_qk(R.hf_to_meta_qk(w.detach(), n), n), w.detach())
    assert _maxdiff(R.meta_forward(sd, spec, ref.ids), ref.logits) <= TOL / 2


@pytest.mark.parametrize("spec_name,bf16", sorted({(c.spec, c.bf16) for c in CASES}))
def test_reference_greedy_is_well_posed(store, spec_name, bf16):
    """No near tie on the HF greedy path: a greedy comparison between two
    correct float32 implementations cannot flip."""
    ref = store.reference(spec_name, bf16)
    assert ref.margin >= MIN_MARGIN, \
        f"reference greedy path has a near tie ({ref.margin:.2e}); pick another seed " \
        f"for {spec_name}"


@pytest.mark.parametrize("spec", R.SPECS, ids=lambda s: s.name)
def test_reference_hf_config_rope(store, spec):
    """The HF reference really runs the spec's RoPE: the config holds the
    theta/scaling, and the model's inverse frequencies are Meta's."""
    ref = store.reference(spec)
    theta, scaling = R.hf_rope_settings(ref.model.config)
    assert theta == spec.rope_theta
    if spec.rope_scaling is None:
        assert scaling is None
    else:
        assert scaling["rope_type"] == "llama3"
        assert {k: scaling[k] for k in spec.rope_scaling} == spec.rope_scaling
    inv = ref.model.model.rotary_emb.inv_freq.double().numpy()
    want = R.meta_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    np.testing.assert_allclose(inv, want, rtol=1e-6)


@pytest.mark.parametrize("spec", R.SPECS, ids=lambda s: s.name)
def test_reference_is_sensitive(store, spec):
    """Each classic bug moves the logits far beyond TOL, so passing the
    1e-4 comparison really means the feature is implemented."""
    ref = store.reference(spec)
    sd = R.meta_state_dict(ref.model)
    big = 100 * TOL
    base = R.meta_forward(sd, spec, ref.ids)

    # q/k left in HF's rotate-half order but rotated as interleaved pairs
    bad = dict(sd)
    for i in range(spec.n_layers):
        att = ref.model.model.layers[i].self_attn
        bad[f"layers.{i}.attention.wq.weight"] = att.q_proj.weight.detach()
        bad[f"layers.{i}.attention.wk.weight"] = att.k_proj.weight.detach()
    assert _maxdiff(R.meta_forward(bad, spec, ref.ids), base) > big, "q/k layout"

    other_eps = 1e-6 if spec.norm_eps == 1e-5 else 1e-5
    assert _maxdiff(R.meta_forward(sd, R.spec_with(spec, norm_eps=other_eps), ref.ids),
                    base) > big, "norm_eps"
    assert _maxdiff(R.meta_forward(sd, R.spec_with(spec, rope_theta=spec.rope_theta * 2),
                                   ref.ids), base) > big, "rope_theta"
    ones = {k: (torch.ones_like(v) if k.endswith("norm.weight") else v) for k, v in sd.items()}
    assert _maxdiff(R.meta_forward(ones, spec, ref.ids), base) > big, "norm weights"
    if spec.rope_scaling is not None:
        assert _maxdiff(R.meta_forward(sd, R.spec_with(spec, rope_scaling=None), ref.ids),
                        base) > big, "rope scaling"
    if 1 < spec.n_kv_heads < spec.n_heads:
        assert _maxdiff(R.meta_forward(sd, spec, ref.ids, gqa_cyclic=True), base) > big, "GQA"


def _read_f32(buf, off, shape):
    n = int(np.prod(shape))
    a = np.frombuffer(buf, dtype="<f4", count=n, offset=off).reshape(shape)
    return a, off + 4 * n


def _bin_order(spec, version):
    L = range(spec.n_layers)
    lay = lambda s: [f"layers.{i}.{s}" for i in L]  # noqa: E731
    mats = [*lay("attention.wq.weight"), *lay("attention.wk.weight"),
            *lay("attention.wv.weight"), *lay("attention.wo.weight")]
    if version == 0:
        return (["tok_embeddings.weight", *lay("attention_norm.weight"), *mats,
                 *lay("ffn_norm.weight"), *lay("feed_forward.w1.weight"),
                 *lay("feed_forward.w2.weight"), *lay("feed_forward.w3.weight"),
                 "norm.weight"])
    return ([*lay("attention_norm.weight"), *lay("ffn_norm.weight"), "norm.weight",
             "tok_embeddings.weight", *mats, *lay("feed_forward.w1.weight"),
             *lay("feed_forward.w2.weight"), *lay("feed_forward.w3.weight")])


def _shapes(spec):
    s = {"tok_embeddings.weight": (spec.vocab_size, spec.dim), "norm.weight": (spec.dim,),
         "output.weight": (spec.vocab_size, spec.dim)}
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        s.update({p + "attention.wq.weight": (q, spec.dim),
                  p + "attention.wk.weight": (kv, spec.dim),
                  p + "attention.wv.weight": (kv, spec.dim),
                  p + "attention.wo.weight": (spec.dim, q),
                  p + "feed_forward.w1.weight": (spec.hidden_dim, spec.dim),
                  p + "feed_forward.w2.weight": (spec.dim, spec.hidden_dim),
                  p + "feed_forward.w3.weight": (spec.hidden_dim, spec.dim),
                  p + "attention_norm.weight": (spec.dim,), p + "ffn_norm.weight": (spec.dim,)})
    return s


@pytest.mark.parametrize("spec_name,version", [("mha_tied", 0), ("gqa4_2", 0),
                                               ("mha_tied", 1), ("gqa4_2", 1)])
def test_reference_llama2c_bin_writer(store, tmp_path, spec_name, version):
    """The .bin writer follows llama2.c's export.py layout, byte for byte."""
    ref = store.reference(spec_name)
    spec = ref.spec
    path = R.write_llama2c_bin(tmp_path / "m.bin", ref.model, spec, version=version)
    buf = path.read_bytes()
    sd = R.meta_state_dict(ref.model)
    if version == 0:
        p = struct.unpack_from("<7i", buf, 0)
        off = 28
        assert (p[5] > 0) == spec.tied
    else:
        magic, ver = struct.unpack_from("<Ii", buf, 0)
        assert (magic, ver) == (0x616B3432, 1) and buf[:4] == b"24ka"
        p = struct.unpack_from("<7i", buf, 8)
        assert buf[36] == int(spec.tied) and buf[37:256] == b"\0" * 219
        off = 256
    assert (p[0], p[1], p[2], p[3], p[4], abs(p[5]), p[6]) == (
        spec.dim, spec.hidden_dim, spec.n_layers, spec.n_heads, spec.n_kv_heads,
        spec.vocab_size, spec.max_seq_len)
    shapes = _shapes(spec)
    for name in _bin_order(spec, version):
        a, off = _read_f32(buf, off, shapes[name])
        np.testing.assert_array_equal(a, sd[name].numpy(), err_msg=name)
    if version == 0:
        fc, fs = R.llama2c_freq_tables(spec)
        a, off = _read_f32(buf, off, fc.shape)
        np.testing.assert_array_equal(a, fc)
        a, off = _read_f32(buf, off, fs.shape)
        np.testing.assert_array_equal(a, fs)
        assert np.allclose(a[5, 0], math.sin(5.0))
    if not spec.tied:
        a, off = _read_f32(buf, off, shapes["output.weight"])
        np.testing.assert_array_equal(a, sd["output.weight"].numpy())
    assert off == len(buf)


@pytest.mark.parametrize("c", [c for c in CASES if c.fmt == "meta"], ids=lambda c: c.id)
def test_reference_meta_writer(store, c):
    """Meta shards reassemble (Meta's split axes) into the reference weights,
    and params.json reproduces the spec through Meta's formulas."""
    spec = c.model_spec
    ref = store.reference(spec, c.bf16)
    d = store.source(c)
    kw = c.writer_kw
    params = json.loads((d / "params.json").read_text())
    hidden = R.meta_hidden_dim(params["dim"], params["multiple_of"],
                               params.get("ffn_dim_multiplier"))
    assert hidden == spec.hidden_dim
    assert params.get("n_kv_heads", params["n_heads"]) == spec.n_kv_heads
    assert params["vocab_size"] == (-1 if kw["family"] == "llama2" else spec.vocab_size)
    assert params.get("rope_theta", 10000.0) == spec.rope_theta
    assert params.get("use_scaled_rope", False) == (spec.rope_scaling is not None)
    files = sorted(d.glob("consolidated.*.pth"))
    assert [f.name for f in files] == [f"consolidated.{i:02d}.pth" for i in range(kw["n_shards"])]
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    sd = R.meta_state_dict(ref.model)
    for name, full in sd.items():
        parts = [s[name] for s in shards]
        assert all(p.dtype == (torch.bfloat16 if c.bf16 else torch.float32) for p in parts)
        axis = R.meta_split_axis(name, kw["family"])
        got = parts[0] if axis is None else torch.cat(parts, dim=axis)
        assert torch.equal(got.float(), full), name
        if axis is None:
            assert all(torch.equal(p, parts[0]) for p in parts)
    for s in shards:
        assert ("rope.freqs" in s) == (kw["family"] == "llama2")
        assert set(s) - {"rope.freqs"} == set(sd)


def test_reference_llama2c_pt_writer(store, tmp_path):
    ref = store.reference("mqa3_1_tied_eps6")
    p = R.write_llama2c_pt(tmp_path / "c.pt", ref.model, ref.spec, compiled_prefix=True)
    ck = torch.load(p, map_location="cpu", weights_only=False)
    assert set(ck) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    m = ck["model"]
    assert all(k.startswith("_orig_mod.") for k in m)
    # tied as llama2.c ties: one tensor under two names
    assert m["_orig_mod.output.weight"] is m["_orig_mod.tok_embeddings.weight"]
    assert ck["model_args"]["hidden_dim"] == ref.spec.hidden_dim
    sd = R.meta_state_dict(ref.model)
    for k, v in sd.items():
        assert torch.equal(m["_orig_mod." + k], v), k


@pytest.mark.parametrize("legacy", [True, False])
def test_reference_hf_writer(store, tmp_path, legacy):
    """write_hf's directory (either config style) is read back by transformers
    with the same rope settings and logits."""
    from transformers import LlamaForCausalLM

    ref = store.reference("llama3_scaled_orig16")
    d = R.write_hf(tmp_path / "hf", ref.model, legacy_config=legacy)
    cfg = json.loads((d / "config.json").read_text())
    if legacy:
        assert "rope_parameters" not in cfg and cfg["rope_scaling"]["rope_type"] == "llama3"
        assert cfg["rope_scaling"]["original_max_position_embeddings"] == 16
    else:
        assert cfg["rope_parameters"]["rope_type"] == "llama3"
    back = LlamaForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    assert _maxdiff(R.hf_logits(back, ref.ids), ref.logits) == 0.0


def test_reference_tokenizer(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert sp.get_piece_size() == 300
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    text = "the little cat saw Zoë 42 times"
    assert sp.decode(sp.encode(text)) == text          # byte fallback covers the rest


# ---------------------------------------------------------------------------
# 2. llamanp against the reference
# ---------------------------------------------------------------------------

def _check_config(m, c: Case):
    spec = c.model_spec
    cfg = m.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.hidden_dim, cfg.vocab_size) == (
        spec.dim, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim,
        spec.hidden_dim, spec.vocab_size)
    assert math.isclose(cfg.norm_eps, spec.norm_eps, rel_tol=1e-6)
    assert math.isclose(cfg.rope_theta, spec.rope_theta, rel_tol=1e-9)
    if spec.rope_scaling is None:
        assert cfg.rope_scaling is None
    else:
        rs = cfg.rope_scaling
        assert rs is not None
        assert (rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                rs.original_max_position_embeddings) == (
            spec.rope_scaling["factor"], spec.rope_scaling["low_freq_factor"],
            spec.rope_scaling["high_freq_factor"],
            spec.rope_scaling["original_max_position_embeddings"])
    if c.fmt.startswith("llama2c") or c.fmt in ("lmw", "hf"):
        assert cfg.max_seq_len == spec.max_seq_len


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_converted_logits_match_reference(store, c):
    m = store.load(c)
    _check_config(m, c)
    ref = store.reference(c.spec, c.bf16)
    got = m.logits(ref.ids)
    assert got.dtype == np.float32
    d = _maxdiff(got, ref.logits)
    assert d <= TOL, f"max |logits - HF| = {d:.3e} > {TOL}"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_converted_greedy_matches_reference(store, c):
    import llamanp

    m = store.load(c)
    ref = store.reference(c.spec, c.bf16)
    assert ref.margin >= MIN_MARGIN, f"reference near a tie ({ref.margin:.2e})"
    got = list(llamanp.generate(m, ref.ids, c.model_spec.gen_len, temperature=0.0, stop_ids=()))
    assert [int(t) for t in got] == ref.greedy


@pytest.mark.parametrize("fill1", [False, True], ids=["batch", "fill1"])
@pytest.mark.parametrize("kvcache", ["none", "inplace", "concat"])
@pytest.mark.parametrize("cid", KV_CASES)
def test_kvcache_modes_agree(store, cid, kvcache, fill1):
    import llamanp

    c = CASE_BY_ID[cid]
    m = store.load(c)
    ref = store.reference(c.spec, c.bf16)
    base = m.logits(ref.ids, kvcache="inplace", fill1=False)
    got = m.logits(ref.ids, kvcache=kvcache, fill1=fill1)
    scale = max(1.0, float(np.abs(base).max()))
    assert _maxdiff(got, base) <= 1e-5 * scale
    assert _maxdiff(got, ref.logits) <= TOL
    toks = list(llamanp.generate(m, ref.ids, c.model_spec.gen_len, temperature=0.0,
                                 kvcache=kvcache, fill1=fill1, stop_ids=()))
    assert [int(t) for t in toks] == ref.greedy


@pytest.mark.parametrize("cid", KV_CASES)
def test_last_logits_only_match_reference(store, cid):
    """Asking for the last position's logits only lets the last layer skip
    every other row after its keys and values are stored; the logits must be
    the reference's, and a continuation must still see the whole cache."""
    c = CASE_BY_ID[cid]
    m = store.load(c)
    ref = store.reference(c.spec, c.bf16)
    cut = len(ref.ids) // 2
    s = m.session()
    first = s.feed(ref.ids[:cut])
    assert _maxdiff(first, ref.logits[cut - 1]) <= TOL
    rest = s.feed(ref.ids[cut:])
    assert _maxdiff(rest, ref.logits[-1]) <= TOL


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_prefill_in_micro_batches_matches_reference(store, monkeypatch, batch):
    """A prompt longer than PREFILL_BATCH is run a slice at a time (the
    Workspace's arrays are then reused at a smaller size, and each slice's
    attention continues the cache): the logits of every position must still
    be the reference's."""
    from llamanp import model as M

    c = CASE_BY_ID[KV_CASES[0]]
    m = store.load(c)
    ref = store.reference(c.spec, c.bf16)
    assert len(ref.ids) > batch
    monkeypatch.setattr(M, "PREFILL_BATCH", batch)
    got = m.logits(ref.ids)
    assert _maxdiff(got, ref.logits) <= TOL
    monkeypatch.undo()
    assert _maxdiff(m.logits(ref.ids), got) <= 1e-5 * max(1.0, float(np.abs(got).max()))


def test_convert_api(store, tmp_path):
    """llamanp.convert.convert(): same result as the CLI; refuses to
    overwrite without force; embeds a tokenizer when given one."""
    import llamanp
    import llamanp.convert
    from llamanp.errors import LlamanpError

    c = CASE_BY_ID["meta-llama3-2-gqa4_2"]
    src = store.source(c)
    ref = store.reference(c.spec)
    out = tmp_path / "api.lmw"
    llamanp.convert.convert(str(src), str(out), tokenizer=None, force=False)
    m = llamanp.load(str(out))
    assert m.tokenizer is None
    assert _maxdiff(m.logits(ref.ids), ref.logits) <= TOL
    assert _maxdiff(m.logits(ref.ids), store.load(c).logits(ref.ids)) == 0.0

    before = out.read_bytes()
    with pytest.raises(LlamanpError):
        llamanp.convert.convert(str(src), str(out))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.lmw"]

    tc = TOK_CASE
    llamanp.convert.convert(str(store.source(tc)), str(out), tokenizer=str(store.tokenizer()),
                            force=True)
    m2 = llamanp.load(str(out))
    assert m2.tokenizer is not None
    ref2 = store.reference(tc.spec)
    assert _maxdiff(m2.logits(ref2.ids), ref2.logits) <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.lmw"]


def test_tokenizer_embedded_only_when_given(store):
    with_tok = store.load(TOK_CASE)
    without = store.load(NOTOK_CASE)
    assert with_tok.tokenizer is not None
    assert without.tokenizer is None
    ref = store.reference(TOK_CASE.spec)
    assert _maxdiff(with_tok.logits(ref.ids), ref.logits) <= TOL


def test_cli_generation_same_for_every_kvcache_mode(store, tmp_path):
    """`llama-np.py` at temperature 0 prints the same text whatever the KV
    cache strategy, and writes valid --stats-json."""
    lmw = store.lmw(TOK_CASE)
    outputs = {}
    for kv in ("none", "inplace", "concat"):
        for fill1 in (False, True):
            stats = tmp_path / f"stats-{kv}-{fill1}.json"
            args = ["-w", lmw, "-i", "the little cat saw the", "-n", "12", "--temp", "0",
                    "--kvcache", kv, "--stats-json", stats] + (["--fill1"] if fill1 else [])
            rc, so, se = run_cli("llama-np.py", *args)
            assert rc == 0, f"exit {rc}\n{se[-2000:]}"
            assert "Traceback" not in se
            assert so.strip(), "no text printed"
            json.loads(stats.read_text())
            outputs[(kv, fill1)] = so
    assert len(set(outputs.values())) == 1, outputs


def test_cli_sampling_is_seeded(store):
    """Same --seed, same text; the run is reproducible."""
    lmw = store.lmw(TOK_CASE)
    args = ["-w", lmw, "-i", "the dog", "-n", "16", "--temp", "1.0", "--topp", "0.9",
            "--seed", "1234"]
    r1 = run_cli("llama-np.py", *args)
    r2 = run_cli("llama-np.py", *args)
    assert r1[0] == 0 and r2[0] == 0, (r1[2][-2000:], r2[2][-2000:])
    assert r1[1] == r2[1]
