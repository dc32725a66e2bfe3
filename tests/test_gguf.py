"""GGUF files (llama.cpp's format) against transformers.

Tiny random Llamas are written with the gguf package's own GGUFWriter, their
matrices stored as F32, F16, Q8_0 or Q4_1 (quantized with gguf.quants), and
converted with llamanp. The reference is a transformers LlamaForCausalLM
holding the weights *as the file holds them* (dequantized again with
gguf.quants), with q/k permuted from the interleaved (Meta, llama.cpp) layout
to Hugging Face's rotate-half layout; quantization error is then the same on
both sides and logits must agree to 1e-4.

The real model, SmolLM2-135M-Instruct converted and quantized (Q4_1, Q8_0
embedding) by llama.cpp, is compared with transformers' own loading of the
same file. That is what settles the q/k layout question: transformers
un-permutes llama.cpp's q/k rows, llamanp takes them as they are.

Bad input goes through the real `python convert.py`.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import pytest
import refmodels as R
import torch
from conftest import REPO, run_cli

import llamanp
from llamanp.config import RopeScaling
from llamanp.convert import convert, read_checkpoint
from llamanp.convert import gguf as gguf_reader
from llamanp.errors import LlamanpError

Q = gguf.GGMLQuantizationType



# ---------------------------------------------------------------------------
# tiny models written as GGUF
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufCase:
    id: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    qtype: Q                            # the matrices of the blocks
    embed_qtype: Optional[Q] = None     # token_embd / output (default: qtype)
    tied: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None    # llama3: (factor, low, high, original context)
    max_seq_len: int = 64
    prompt_len: int = 12
    gen_len: int = 16
    minimal_metadata: bool = False      # leave out every key that has a default
    seed: int = 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


CASES = [
    # odd head count, tied, eps 1e-6, and only the required metadata keys
    GgufCase("f32-mha3-tied-minimal", dim=48, n_layers=2, n_heads=3, n_kv_heads=3,
             head_dim=16, hidden_dim=128, vocab_size=96, qtype=Q.F32, tied=True,
             norm_eps=1e-6, minimal_metadata=True),
    # GQA 6/2, theta 5e5, untied
    GgufCase("f16-gqa6_2-theta5e5", dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
             head_dim=16, hidden_dim=256, vocab_size=128, qtype=Q.F16, rope_theta=500000.0,
             seed=1),
    # GQA 4/2, untied
    GgufCase("q8_0-gqa4_2", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
             head_dim=16, hidden_dim=192, vocab_size=200, qtype=Q.Q8_0),
    # MHA, tied
    GgufCase("q4_1-mha4-tied", dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
             head_dim=16, hidden_dim=192, vocab_size=256, qtype=Q.Q4_1, tied=True, seed=3),
    # head_dim 32 with dim 64 and 4 heads: the query width (128) is not dim
    GgufCase("q8_0-headdim32-gqa4_2", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
             head_dim=32, hidden_dim=160, vocab_size=160, qtype=Q.Q8_0, seed=1),
    # head_dim 8 (query width 32 < dim), mixed types as llama.cpp writes them
    GgufCase("q4_1+q8_0-headdim8-untied", dim=64, n_layers=3, n_heads=4, n_kv_heads=1,
             head_dim=8, hidden_dim=128, vocab_size=192, qtype=Q.Q4_1, embed_qtype=Q.Q8_0,
             seed=2),
    # Llama 3.1 rope_freqs with Meta's constants; a long prompt reaches the scaled pairs
    GgufCase("f32-rope_freqs-llama31", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
             head_dim=16, hidden_dim=192, vocab_size=256, qtype=Q.F32,
             rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 8192),
             max_seq_len=128, prompt_len=100, seed=1),
    # rope_freqs from other llama3 parameters, recovered by fitting the blended band
    GgufCase("f16-rope_freqs-fitted", dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
             head_dim=32, hidden_dim=128, vocab_size=128, qtype=Q.F16, tied=True,
             rope_scaling=(4.0, 1.0, 8.0, 64), prompt_len=40),
]


def random_weights(c: GgufCase) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names, q/k in the interleaved layout.

    Scales as in refmodels.make_hf_model: projections ~ 1/sqrt(fan_in) (q/k
    a bit more, so attention is sharp), a small embedding, norms near 1, and a
    larger final norm for a tied head, so that logits have a std of about 1.
    """
    rng = np.random.default_rng(1000 + c.seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return 1.0 + normal((c.dim,), 0.1)

    w = {"token_embd.weight": normal((c.vocab_size, c.dim), 0.02)}
    for i in range(c.n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm()
        w[p + "attn_q.weight"] = normal((c.q_dim, c.dim), 1.6 / math.sqrt(c.dim))
        w[p + "attn_k.weight"] = normal((c.kv_dim, c.dim), 1.6 / math.sqrt(c.dim))
        w[p + "attn_v.weight"] = normal((c.kv_dim, c.dim), 1.0 / math.sqrt(c.dim))
        w[p + "attn_output.weight"] = normal((c.dim, c.q_dim), 1.0 / math.sqrt(c.q_dim))
        w[p + "ffn_norm.weight"] = norm()
        w[p + "ffn_gate.weight"] = normal((c.hidden_dim, c.dim), 1.0 / math.sqrt(c.dim))
        w[p + "ffn_up.weight"] = normal((c.hidden_dim, c.dim), 1.0 / math.sqrt(c.dim))
        w[p + "ffn_down.weight"] = normal((c.dim, c.hidden_dim), 1.0 / math.sqrt(c.hidden_dim))
    w["output_norm.weight"] = norm()
    if c.tied:
        w["output_norm.weight"] *= 1.0 / (0.02 * math.sqrt(c.dim))
    else:
        w["output.weight"] = normal((c.vocab_size, c.dim), 1.0 / math.sqrt(c.dim))
    return w


def llama3_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                    original_context: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it (float32 frequencies)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    divisors = []
    for f in freqs.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < original_context / high:
            divisors.append(1.0)
        elif wavelength > original_context / low:
            divisors.append(factor)
        else:
            s = (original_context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - s) / factor + s))
    return np.array(divisors, dtype=np.float32)


def case_metadata(c: GgufCase) -> dict:
    """The llama.* keys of case c (minimal_metadata: the required ones only)."""
    meta = {
        "llama.context_length": c.max_seq_len,
        "llama.embedding_length": c.dim,
        "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.hidden_dim,
        "llama.attention.head_count": c.n_heads,
        "llama.attention.layer_norm_rms_epsilon": c.norm_eps,
    }
    if not c.minimal_metadata:
        meta.update({
            "llama.attention.head_count_kv": c.n_kv_heads,
            "llama.rope.freq_base": c.rope_theta,
            "llama.rope.dimension_count": c.head_dim,
            "llama.attention.key_length": c.head_dim,
            "llama.attention.value_length": c.head_dim,
            "llama.vocab_size": c.vocab_size,
            "general.file_type": 1,
        })
    return meta


def _add_value(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def _stored(array: np.ndarray, qtype: Q) -> np.ndarray:
    """The array in the file's encoding: float32/float16 values or quantized bytes."""
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype == Q.F64:      # a type gguf writes but cannot dequantize
        return array.astype(np.float64)
    return gguf.quants.quantize(array, qtype)


def write_gguf(path: Path, metadata: dict, tensors: dict[str, tuple[np.ndarray, Q]],
               architecture: str = "llama") -> dict[str, np.ndarray]:
    """Write a GGUF file; returns each tensor as the file holds it, in float32
    (those of types that gguf cannot dequantize left out)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in metadata.items():
        _add_value(writer, key, value)
    held = {}
    for name, (array, qtype) in tensors.items():
        data = _stored(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        if gguf_reader.can_dequantize(qtype):
            held[name] = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def case_tensors(c: GgufCase) -> dict[str, tuple[np.ndarray, Q]]:
    """Every tensor of case c with the type it is stored as (1-d norms stay F32)."""
    tensors = {}
    for name, array in random_weights(c).items():
        if array.ndim == 1:
            qtype = Q.F32
        elif name in ("token_embd.weight", "output.weight"):
            qtype = c.embed_qtype or c.qtype
        else:
            qtype = c.qtype
        tensors[name] = (array, qtype)
    if c.rope_scaling is not None:
        tensors["rope_freqs.weight"] = (llama3_divisors(c.head_dim, c.rope_theta,
                                                        *c.rope_scaling), Q.F32)
    return tensors


def write_case(c: GgufCase, path: Path) -> dict[str, np.ndarray]:
    return write_gguf(path, case_metadata(c), case_tensors(c))


def hf_from_gguf_weights(c: GgufCase, held: dict[str, np.ndarray]):
    """A transformers model holding the file's (dequantized) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    scaling = None
    if c.rope_scaling is not None:
        factor, low, high, original = c.rope_scaling
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": original}
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tied, rope_theta=c.rope_theta, rope_scaling=scaling,
        attention_bias=False, mlp_bias=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()

    def t(name):
        return torch.from_numpy(held[name].copy())

    state = {"model.embed_tokens.weight": t("token_embd.weight"),
             "model.norm.weight": t("output_norm.weight")}
    if not c.tied:
        state["lm_head.weight"] = t("output.weight")
    for i in range(c.n_layers):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        state[h + "input_layernorm.weight"] = t(g + "attn_norm.weight")
        state[h + "self_attn.q_proj.weight"] = R.meta_to_hf_qk(t(g + "attn_q.weight"), c.n_heads)
        state[h + "self_attn.k_proj.weight"] = R.meta_to_hf_qk(t(g + "attn_k.weight"),
                                                               c.n_kv_heads)
        state[h + "self_attn.v_proj.weight"] = t(g + "attn_v.weight")
        state[h + "self_attn.o_proj.weight"] = t(g + "attn_output.weight")
        state[h + "post_attention_layernorm.weight"] = t(g + "ffn_norm.weight")
        state[h + "mlp.gate_proj.weight"] = t(g + "ffn_gate.weight")
        state[h + "mlp.up_proj.weight"] = t(g + "ffn_up.weight")
        state[h + "mlp.down_proj.weight"] = t(g + "ffn_down.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@dataclass
class Built:
    case: GgufCase
    held: dict              # the tensors as the GGUF holds them (float32)
    model: object           # llamanp Model from the converted .lmw
    ids: list
    ref_logits: np.ndarray
    ref_greedy: list
    margin: float


_BUILT: dict[str, Built] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def build(c: GgufCase, workdir: Path) -> Built:
    """Write, convert (llamanp.convert.convert) and run case c once per session."""
    if c.id not in _BUILT:
        src, out = workdir / f"{c.id}.gguf", workdir / f"{c.id}.lmw"
        held = write_case(c, src)
        convert(src, out)
        rng = np.random.default_rng(20_000 + c.seed)
        ids = [int(t) for t in rng.integers(0, c.vocab_size, size=c.prompt_len)]
        ref = hf_from_gguf_weights(c, held)
        greedy, margin = R.hf_greedy_with_margin(ref, ids, c.gen_len)
        _BUILT[c.id] = Built(c, held, llamanp.load(str(out)), ids, R.hf_logits(ref, ids),
                             greedy, margin)
    return _BUILT[c.id]


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_config_from_metadata(c, workdir):
    cfg = build(c, workdir).model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.hidden_dim, cfg.vocab_size, cfg.max_seq_len, cfg.tied_embeddings) == \
        (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
         c.hidden_dim, c.vocab_size, c.max_seq_len, c.tied)
    assert cfg.rope_theta == c.rope_theta
    assert cfg.norm_eps == pytest.approx(c.norm_eps, rel=1e-6)   # stored as float32
    if c.rope_scaling is None:
        assert cfg.rope_scaling is None
    else:
        factor, low, high, original = c.rope_scaling
        assert cfg.rope_scaling == RopeScaling(factor=factor, low_freq_factor=low,
                                               high_freq_factor=high,
                                               original_max_position_embeddings=original)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_logits_match_transformers(c, workdir):
    b = build(c, workdir)
    got = b.model.logits(b.ids)
    assert got.shape == b.ref_logits.shape
    diff = float(np.abs(got - b.ref_logits).max())
    assert diff <= 1e-4, f"{c.id}: max |logits diff| {diff:.3g}"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_greedy_matches_transformers(c, workdir):
    b = build(c, workdir)
    assert b.margin > 1e-3, f"{c.id}: reference greedy path has a near tie ({b.margin:.2g})"
    got = list(llamanp.generate(b.model, b.ids, c.gen_len, temperature=0.0, stop_ids=()))
    assert got == b.ref_greedy


def test_weights_are_the_files_dequantized(workdir):
    """Every canonical tensor equals gguf's dequantization, with q/k rows untouched."""
    c = CASES[5]        # mixed Q4_1 / Q8_0 / F32
    held = build(c, workdir).held
    ckpt = read_checkpoint(workdir / f"{c.id}.gguf")
    for i in range(c.n_layers):
        np.testing.assert_array_equal(ckpt.tensors[f"layers.{i}.attention.wq.weight"].load(),
                                      held[f"blk.{i}.attn_q.weight"])
        np.testing.assert_array_equal(ckpt.tensors[f"layers.{i}.feed_forward.w2.weight"].load(),
                                      held[f"blk.{i}.ffn_down.weight"])
    np.testing.assert_array_equal(ckpt.tensors["tok_embeddings.weight"].load(),
                                  held["token_embd.weight"])
    assert ckpt.source == "GGUF (Q4_1, F32, Q8_0)"


def test_tensors_are_dequantized_lazily(workdir, monkeypatch):
    c = CASES[2]
    src = workdir / "lazy.gguf"
    write_case(c, src)
    calls = []
    real = gguf.quants.dequantize

    def counting(data, qtype):
        calls.append(data.shape)
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    ckpt = gguf_reader.read_gguf(src)
    # only one-block probes of which types gguf dequantizes, no weights
    assert all(shape[0] == 1 for shape in calls), "weights were read before they were asked for"
    calls.clear()
    w = ckpt.tensors["layers.1.attention.wk.weight"].load()
    assert w.shape == (c.kv_dim, c.dim) and w.dtype == np.float32 and w.flags.c_contiguous
    assert len(calls) == 1


def canonical_name(gguf_name: str) -> str:
    """llama.cpp's tensor names -> Meta's (llamanp's canonical) names."""
    per_layer = {"attn_norm": "attention_norm", "attn_q": "attention.wq",
                 "attn_k": "attention.wk", "attn_v": "attention.wv",
                 "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                 "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                 "ffn_up": "feed_forward.w3"}
    if gguf_name.startswith("blk."):
        _, layer, kind, _ = gguf_name.split(".")
        return f"layers.{layer}.{per_layer[kind]}.weight"
    return {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}[gguf_name]


# Every type the installed gguf package dequantizes, read from random bytes:
# a model whose every row is 256 wide (the K- and IQ-quant block) with all of
# its matrices in that type.
_DEQUANTIZABLE = [q for q in Q if gguf_reader.can_dequantize(q)
                  and 256 % gguf.GGML_QUANT_SIZES[q][0] == 0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # random scales: some inf/nan
@pytest.mark.parametrize("qtype", _DEQUANTIZABLE, ids=lambda q: q.name)
def test_every_dequantizable_type(qtype, tmp_path):
    c = GgufCase("all-types", dim=256, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=128,
                 hidden_dim=256, vocab_size=8, qtype=qtype)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, value in case_metadata(c).items():
        _add_value(writer, key, value)
    expected = {}
    for name, array in random_weights(c).items():
        if array.ndim == 1:
            writer.add_tensor(name, array)
            continue
        rows, row_bytes = array.shape[0], array.shape[1] // block_size * block_bytes
        raw = rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        expected[canonical_name(name)] = gguf.quants.dequantize(raw, qtype).reshape(array.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = gguf_reader.read_gguf(tmp_path / "m.gguf")
    for name, want in expected.items():
        got = ckpt.tensors[name].load()
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))


# ---------------------------------------------------------------------------
# rope_freqs -> llama3 scaling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim,theta,params", [
    (128, 500000.0, (8.0, 1.0, 4.0, 8192)),      # Llama 3.1 8B / 70B / 405B
    (64, 500000.0, (32.0, 1.0, 4.0, 8192)),      # Llama 3.2 1B / 3B
    (32, 10000.0, (4.0, 1.0, 8.0, 64)),          # not Meta's: fitted
    (128, 500000.0, (16.0, 2.0, 6.0, 16384)),    # not Meta's: fitted (L/2 = 8192)
])
def test_rope_freqs_recover_llama3_scaling(head_dim, theta, params):
    divisors = llama3_divisors(head_dim, theta, *params).astype(np.float64)
    scaling = gguf_reader.llama3_scaling_from_divisors(divisors, head_dim, theta)
    from llamanp.model import rope_frequencies
    factor, low, high, original = params
    want = rope_frequencies(head_dim, theta, RopeScaling(factor, low, high, original))
    np.testing.assert_allclose(rope_frequencies(head_dim, theta, scaling), want, rtol=1e-6)
    assert scaling.factor == factor
    assert scaling.original_max_position_embeddings / scaling.low_freq_factor == \
        pytest.approx(original / low, rel=1e-6)
    assert scaling.original_max_position_embeddings / scaling.high_freq_factor == \
        pytest.approx(original / high, rel=1e-6)


def test_rope_freqs_of_ones_is_no_scaling():
    assert gguf_reader.llama3_scaling_from_divisors(np.ones(32), 64, 10000.0) is None


@pytest.mark.parametrize("divisors", [
    np.linspace(1.0, 3.0, 32) ** 2,                            # smooth, but not llama3
    np.where(np.arange(32) % 2 == 0, 1.0, 8.0),                # not monotonic
], ids=["quadratic", "alternating"])
def test_rope_freqs_that_follow_no_llama3_scaling_are_refused(divisors):
    with pytest.raises(LlamanpError, match="follow no Llama 3"):
        gguf_reader.llama3_scaling_from_divisors(divisors, 64, 10000.0)


# ---------------------------------------------------------------------------
# refusals, in-process
# ---------------------------------------------------------------------------

SMALL = CASES[2]


def write_variant(path: Path, metadata_changes: dict = (), tensor_changes: dict = (),
                  c: GgufCase = SMALL) -> Path:
    """Case c with metadata keys and tensors changed (value None: left out)."""
    metadata = case_metadata(c)
    tensors = case_tensors(c)
    for table, changes in ((metadata, metadata_changes), (tensors, tensor_changes)):
        for key, value in dict(changes).items():
            if value is None:
                del table[key]
            else:
                table[key] = value
    write_gguf(path, metadata, tensors)
    return path


@pytest.mark.parametrize("changes,message", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
     "'linear' RoPE scaling"),
    ({"llama.rope.scaling.type": "yarn"}, "'yarn' RoPE scaling"),
    ({"llama.rope.scale_linear": 4.0}, "'linear' RoPE scaling"),
    ({"llama.expert_count": 8}, "mixture-of-experts"),
    ({"llama.context_length": None}, "lacks the metadata key llama.context_length"),
    ({"llama.attention.layer_norm_rms_epsilon": None}, "layer_norm_rms_epsilon"),
    ({"llama.rope.dimension_count": 8}, "rotates 8 of the 16"),
    ({"llama.attention.value_length": 32}, "value_length differs"),
    ({"llama.block_count": 3}, "block_count is 3 but the file holds tensors for 2"),
    ({"llama.block_count": 1}, "unexpected tensor(s) layers.1."),
    ({"llama.vocab_size": 300}, "tok_embeddings.weight has shape [200, 64]"),
    ({"llama.embedding_length": 0}, "embedding_length must be a positive integer"),
    ({"llama.feed_forward_length": [192, 160]}, "varies between layers"),
], ids=["linear", "yarn", "scale_linear", "moe", "no-context", "no-eps", "partial-rope",
        "value-length", "missing-layer", "extra-layer", "vocab-mismatch", "zero-dim",
        "per-layer-ffn"])
def test_bad_metadata_is_refused(changes, message, tmp_path):
    src = write_variant(tmp_path / "m.gguf", metadata_changes=changes)
    with pytest.raises(LlamanpError) as e:
        gguf_reader.read_gguf(src)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes,message", [
    ({"blk.0.attn_q.bias": (np.zeros(64, np.float32), Q.F32)}, "blk.0.attn_q.bias"),
    ({"blk.1.ffn_up.weight": None}, "lacks tensor(s) layers.1.feed_forward.w3.weight"),
    ({"rope_freqs.weight": (np.linspace(1.0, 3.0, 8, dtype=np.float32) ** 2, Q.F32)},
     "follow no Llama 3"),
    ({"rope_freqs.weight": (np.ones(4, np.float32), Q.F32)}, "must hold 8 divisors"),
    ({"blk.0.attn_k.weight": (np.zeros((32, 64), np.float32), Q.F64)},
     "blk.0.attn_k.weight is stored as F64"),
], ids=["bias", "missing", "rope_freqs-not-llama3", "rope_freqs-shape", "f64"])
def test_bad_tensors_are_refused(changes, message, tmp_path):
    src = write_variant(tmp_path / "m.gguf", tensor_changes=changes)
    with pytest.raises(LlamanpError) as e:
        gguf_reader.read_gguf(src)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_truncation_is_refused(tmp_path):
    src = tmp_path / "whole.gguf"
    write_case(SMALL, src)
    data = src.read_bytes()
    reader = gguf.GGUFReader(src)
    header_end = reader.data_offset
    cut = tmp_path / "cut.gguf"
    lengths = list(range(0, header_end, 11)) + list(range(header_end, len(data), 4099))
    for n in lengths:
        cut.write_bytes(data[:n])
        with pytest.raises(LlamanpError) as e:
            gguf_reader.read_gguf(cut)
        assert "\n" not in str(e.value), n
        assert n == 0 or "truncated" in str(e.value), (n, str(e.value))


def test_damaged_array_length_is_refused(tmp_path):
    """gguf's own reader would count through 2**40 missing array elements."""
    src = tmp_path / "m.gguf"
    metadata = dict(case_metadata(SMALL), **{"tokenizer.ggml.token_type": [1] * SMALL.vocab_size})
    write_gguf(src, metadata, case_tensors(SMALL))
    data = bytearray(src.read_bytes())
    key = b"tokenizer.ggml.token_type"
    at = data.find(key) + len(key)          # then: value type, element type, count
    struct.pack_into("<Q", data, at + 8, 1 << 40)
    src.write_bytes(bytes(data))
    with pytest.raises(LlamanpError, match="truncated.*tokenizer.ggml.token_type"):
        gguf_reader.read_gguf(src)


# ---------------------------------------------------------------------------
# bad input through the real command line
# ---------------------------------------------------------------------------

def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of the GGML type id in the header record of tensor `name`."""
    encoded = name.encode()
    at = data.find(struct.pack("<Q", len(encoded)) + encoded)
    assert at > 0, name
    pos = at + 8 + len(encoded)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims


def _other_architecture(path: Path) -> None:
    write_gguf(path, {"qwen2.block_count": 1, "qwen2.embedding_length": 32},
               {"token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32)},
               architecture="qwen2")


def _unknown_type(path: Path) -> None:
    write_case(SMALL, path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, _tensor_type_offset(data, "blk.1.attn_k.weight"), 99)
    path.write_bytes(bytes(data))


def _truncated_data(path: Path) -> None:
    write_case(SMALL, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _truncated_header(path: Path) -> None:
    write_case(SMALL, path)
    path.write_bytes(path.read_bytes()[:300])


def _f64(path: Path) -> None:
    weights = random_weights(SMALL)
    write_variant(path, tensor_changes={
        "blk.1.ffn_gate.weight": (weights["blk.1.ffn_gate.weight"], Q.F64)})


@pytest.mark.parametrize("make,mentions", [
    (_other_architecture, ["architecture 'qwen2'", "llama only"]),
    (_unknown_type, ["blk.1.attn_k.weight", "type id 99"]),
    (_truncated_data, ["truncated"]),
    (_truncated_header, ["truncated", "header"]),
    (_f64, ["blk.1.ffn_gate.weight", "F64"]),
], ids=["qwen2", "unknown-type", "truncated-data", "truncated-header", "f64"])
def test_cli_refuses_bad_gguf(make, mentions, tmp_path):
    src = tmp_path / "bad.gguf"
    make(src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "model.lmw"
    rc, stdout, stderr = run_cli("convert.py", src, out)
    assert rc == 1, f"exit status {rc}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-2000:]
    for m in mentions:
        assert m in lines[0], f"message should mention {m!r}: {lines[0]!r}"
    assert not out.exists() and list(outdir.iterdir()) == []


# ---------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct, Q4_1, converted by llama.cpp
# ---------------------------------------------------------------------------

# Prompts as token ids (so that this test does not need the tokenizer):
SMOL_PROMPTS = {
    # "Once upon a time, there was a little"
    "story": [6403, 1980, 253, 655, 28, 665, 436, 253, 1838],
    # "The capital of France is"
    "capital": [504, 3575, 282, 4649, 314],
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>"
    "chat": [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1],
}
SMOL_GEN = 32


def transformers_from_gguf(path: Path):
    """transformers' own loading of a GGUF file (it dequantizes with gguf and
    un-permutes llama.cpp's q/k rows). from_pretrained insists on the
    accelerate package; without it the same steps are taken one by one."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = LlamaForCausalLM(config).eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@torch.no_grad()
def hf_prompt_and_greedy(model, ids, n: int) -> tuple[np.ndarray, list[int], float]:
    """Logits over the prompt, then n greedy tokens decoded with transformers' KV
    cache, and the smallest top-1/top-2 gap along the way."""
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=True)
    prompt_logits = out.logits[0].to(torch.float32).numpy().copy()
    greedy, margin = [], math.inf
    for _ in range(n):
        last = out.logits[0, -1].to(torch.float32).numpy()
        top2 = np.partition(last, -2)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        greedy.append(int(np.argmax(last)))
        out = model(input_ids=torch.tensor([[greedy[-1]]]),
                    past_key_values=out.past_key_values, use_cache=True)
    return prompt_logits, greedy, margin


@dataclass
class Smol:
    model: object           # llamanp Model of the converted file
    references: dict        # prompt -> (logits, greedy, margin) from transformers


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf) -> Smol:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2.lmw"
    # the conversion (real command line) runs while transformers works
    proc = subprocess.Popen([sys.executable, str(REPO / "convert.py"), str(smollm2_gguf), str(out)],
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        reference = transformers_from_gguf(smollm2_gguf)
        references = {name: hf_prompt_and_greedy(reference, ids, SMOL_GEN)
                      for name, ids in SMOL_PROMPTS.items()}
    finally:
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return Smol(llamanp.load(str(out)), references)


def test_smollm2_config(smol):
    c = smol.model.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim,
            c.vocab_size, c.tied_embeddings, c.rope_theta, c.max_seq_len, c.rope_scaling) == \
        (30, 576, 9, 3, 64, 1536, 49152, True, 100000.0, 8192, None)


@pytest.mark.parametrize("prompt", SMOL_PROMPTS)
def test_smollm2_logits_match_transformers(smol, prompt):
    want = smol.references[prompt][0]
    got = smol.model.logits(SMOL_PROMPTS[prompt])
    diff = float(np.abs(got - want).max())
    print(f"SmolLM2 {prompt}: max |logits diff| {diff:.3g} (logits up to "
          f"{float(np.abs(want).max()):.3g})")
    assert diff <= 1e-3, f"{prompt}: max |logits diff| {diff:.3g}"


@pytest.mark.parametrize("prompt", SMOL_PROMPTS)
def test_smollm2_greedy_matches_transformers(smol, prompt):
    _, want, margin = smol.references[prompt]
    got = list(llamanp.generate(smol.model, SMOL_PROMPTS[prompt], SMOL_GEN, temperature=0.0,
                                stop_ids=()))
    assert got == want, f"{prompt}: greedy paths differ (smallest reference margin {margin:.2g})"
