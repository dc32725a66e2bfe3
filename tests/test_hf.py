"""Hugging Face checkpoints: llamanp/convert/hf.py and the safetensors reader.

1. The torch-free safetensors reader gives what the safetensors library gives,
   and refuses headers that lie.
2. Tiny random LlamaForCausalLM models saved *by transformers* (safetensors,
   single and sharded, float32 / float16 / bfloat16; pytorch_model.bin, single
   and sharded) are converted and compared with transformers' own logits of
   the saved model: loaded back in float32 from the very same file, so a
   half-precision file gives both sides the same rounded weights.
3. config.json handling (both RoPE spellings, head_dim, tying, special ids,
   chat template) and refusals, on small synthetic directories.
4. Bad input through the real `python convert.py`: one "error:" line, no
   traceback, no output file.
"""

from __future__ import annotations

import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import refmodels as R
import torch
from conftest import run_cli

import llamanp
import llamanp.convert
from llamanp.convert import hf
from llamanp.convert import safetensors as st
from llamanp.errors import LlamanpError

TOL = 1e-4          # max |logits - transformers logits|
MIN_MARGIN = 1e-3   # the reference greedy path must not pass near a tie
GEN_LEN = 16


def _maxdiff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    return float(np.max(np.abs(a - b)))


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    return message


# ---------------------------------------------------------------------------
# 1. the safetensors reader
# ---------------------------------------------------------------------------

def _safetensors_bytes(header: dict, buffer: bytes) -> bytes:
    """A safetensors file written by hand from the format description."""
    text = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text)) + text + buffer


def _library_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, generator=g).to(torch.float16),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, 2, generator=g).to(torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "note": "test"})
    return tensors


def test_safetensors_reader_matches_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file as load_torch

    path = tmp_path / "t.safetensors"
    _library_file(path)
    ours = st.load(path)
    by_torch = load_torch(str(path))
    with safe_open(str(path), framework="np") as f:     # numpy has no bfloat16: torch for that
        by_numpy = {k: f.get_tensor(k) for k in f.keys() if by_torch[k].dtype != torch.bfloat16}
    assert set(ours) == set(by_torch)
    for name, tensor in ours.items():
        want = by_torch[name]
        assert tensor.shape == tuple(want.shape), name
        if want.dtype == torch.bfloat16:
            assert tensor.dtype == "BF16"
        else:
            np.testing.assert_array_equal(tensor.numpy(), by_numpy[name], err_msg=name)
            assert tensor.numpy().dtype == by_numpy[name].dtype, name
        if want.is_floating_point():
            got = tensor.float32()
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want.to(torch.float32).numpy(), err_msg=name)
    assert st.read_metadata(path) == {"format": "pt", "note": "test"}
    # float32 comes straight from the memory map, no copy
    assert np.shares_memory(ours["f32"].float32(), ours["f32"].numpy())


def test_safetensors_reader_refuses_integer_weights(tmp_path):
    path = tmp_path / "t.safetensors"
    _library_file(path)
    tensor = st.load(path)["i64"]
    assert not tensor.is_floating_point
    with pytest.raises(LlamanpError) as e:
        tensor.float32()
    assert "I64" in _one_line_error(e)


def test_safetensors_hand_written_file_reads_back(tmp_path):
    """The hand-written files of the negative tests below are valid when not mangled."""
    from safetensors.numpy import load_file

    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.arange(4, dtype="<f2")
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}
    path = tmp_path / "h.safetensors"
    path.write_bytes(_safetensors_bytes(header, a.tobytes() + b.tobytes()))
    np.testing.assert_array_equal(load_file(str(path))["a"], a)
    np.testing.assert_array_equal(st.load(path)["a"].float32(), a)
    np.testing.assert_array_equal(st.load(path)["b"].float32(), b.astype(np.float32))


def _entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


_BUFFER = bytes(48)

# (id, file bytes, words the message must contain)
_LIES = [
    ("too-short", b"\x10\x00\x00", "too short"),
    ("length-past-end", struct.pack("<Q", 10_000) + b"{}", "claims 10000 bytes"),
    ("not-json", struct.pack("<Q", 4) + b"{{{{", "not UTF-8 JSON"),
    ("not-object", _safetensors_bytes([], b""), "not a JSON object"),  # type: ignore[arg-type]
    ("unknown-dtype", _safetensors_bytes({"a": _entry(dtype="Q4")}, _BUFFER), "'Q4'"),
    ("bad-shape", _safetensors_bytes({"a": _entry(shape=(-2, 3))}, _BUFFER), "shape"),
    ("offsets-past-buffer", _safetensors_bytes({"a": _entry(offsets=(40, 64))}, _BUFFER),
     "bytes 40..64"),
    ("offsets-reversed", _safetensors_bytes({"a": _entry(offsets=(24, 0))}, _BUFFER),
     "bytes 24..0"),
    ("size-mismatch", _safetensors_bytes({"a": _entry(offsets=(0, 20))}, _BUFFER),
     "24 bytes"),
    ("overlap", _safetensors_bytes({"a": _entry(offsets=(0, 24)),
                                    "b": _entry(offsets=(12, 36))}, _BUFFER), "same bytes"),
    ("duplicate-name", _safetensors_bytes({"a": _entry(), "b": _entry(offsets=(24, 48))},
                                          _BUFFER).replace(b'"b"', b'"a"'), "twice"),
    ("metadata-not-object", _safetensors_bytes({"__metadata__": [1], "a": _entry()}, _BUFFER),
     "__metadata__"),
]


@pytest.mark.parametrize("data,words", [(d, w) for _, d, w in _LIES],
                         ids=[i for i, _, _ in _LIES])
def test_safetensors_reader_refuses_lying_headers(tmp_path, data, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(LlamanpError) as e:
        st.load(path)
    message = _one_line_error(e)
    assert words in message and "bad.safetensors" in message, message


# ---------------------------------------------------------------------------
# 2. models saved by transformers, converted, against transformers
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    id: str
    spec: str                           # refmodels.SPEC_BY_NAME
    dtype: Optional[str] = None         # "float16" / "bfloat16": a half-precision file
    max_shard_size: Optional[str] = None
    pytorch_bin: bool = False
    legacy_config: bool = False         # Hub spelling (rope_theta/rope_scaling), else 5.x
    with_tokenizer: bool = False        # + tokenizer.model, chat template, eos list
    via_cli: bool = False               # convert with `python convert.py`, not the API


VARIANTS = [
    Variant("st-f32-mha_tied", "mha_tied"),
    Variant("st-f32-sharded-gqa4_2", "gqa4_2", max_shard_size="24KB", legacy_config=True),
    Variant("st-f16-sharded-gqa4_2_hd24", "gqa4_2_hd24", dtype="float16",
            max_shard_size="24KB"),
    Variant("st-bf16-llama3_scaled_orig16", "llama3_scaled_orig16", dtype="bfloat16"),
    Variant("st-f16-llama31_scaled_theta1e4", "llama31_scaled_theta1e4", dtype="float16",
            legacy_config=True),
    Variant("bin-f32-mha3_untied_eps6", "mha3_untied_eps6", pytorch_bin=True,
            legacy_config=True, with_tokenizer=True, via_cli=True),
    Variant("bin-bf16-sharded-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", dtype="bfloat16",
            max_shard_size="8KB", pytorch_bin=True),
]
VARIANT_BY_ID = {v.id: v for v in VARIANTS}

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@dataclass
class Converted:
    variant: Variant
    directory: Path                     # the HF directory transformers wrote
    lmw: Path
    model: object                       # llamanp Model
    ids: list
    logits: np.ndarray                  # transformers, loaded in float32 from `directory`
    greedy: list
    margin: float
    cli_stderr: str = ""


def _add_tokenizer_files(directory: Path, tokenizer: Path) -> None:
    """What a Hub checkpoint carries beside the weights: tokenizer and generation settings."""
    shutil.copy(tokenizer, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 5]}))


def _transformers_reference(directory: Path, spec: R.ModelSpec):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    assert model.dtype == torch.float32
    ids = R.random_prompt(spec)
    greedy, margin = R.hf_greedy_with_margin(model, ids, GEN_LEN)
    return ids, R.hf_logits(model, ids), greedy, margin


class HFStore:
    """Each variant written, referenced and converted once per module."""

    def __init__(self, store, root: Path):
        self.store, self.root = store, root
        self._done: dict[str, Converted] = {}

    def get(self, variant_id: str) -> Converted:
        if variant_id not in self._done:
            self._done[variant_id] = self._make(VARIANT_BY_ID[variant_id])
        return self._done[variant_id]

    def _make(self, v: Variant) -> Converted:
        spec = R.SPEC_BY_NAME[v.spec]
        source = self.store.reference(spec).model
        directory = R.write_hf(self.root / v.id, source, legacy_config=v.legacy_config,
                               dtype=v.dtype, max_shard_size=v.max_shard_size,
                               pytorch_bin=v.pytorch_bin)
        if v.with_tokenizer:
            _add_tokenizer_files(directory, self.store.tokenizer())
        ids, logits, greedy, margin = _transformers_reference(directory, spec)
        out = self.root / f"{v.id}.lmw"
        stderr = ""
        if v.via_cli:
            rc, _, stderr = run_cli("convert.py", directory, out)
            assert rc == 0, stderr[-2000:]
        else:
            llamanp.convert.convert(directory, out)
        return Converted(v, directory, out, llamanp.load(str(out)), ids, logits, greedy,
                         margin, stderr)


@pytest.fixture(scope="module")
def hf_store(store, tmp_path_factory):
    return HFStore(store, tmp_path_factory.mktemp("hf"))


def test_variants_cover_the_brief():
    """MHA and GQA, tied and untied, head_dim != dim / n_heads, llama3 scaling; each
    file kind single and sharded; float32, float16 and bfloat16."""
    specs = [R.SPEC_BY_NAME[v.spec] for v in VARIANTS]
    assert {s.n_kv_heads == s.n_heads for s in specs} == {True, False}
    assert {s.tied for s in specs} == {True, False}
    assert any(s.head_dim * s.n_heads != s.dim for s in specs)
    assert any(s.rope_scaling is not None for s in specs)
    for pytorch_bin in (False, True):
        assert {v.max_shard_size is not None for v in VARIANTS
                if v.pytorch_bin == pytorch_bin} == {True, False}
    assert {v.dtype for v in VARIANTS} == {None, "float16", "bfloat16"}
    assert {v.legacy_config for v in VARIANTS} == {True, False}
    assert sum(v.via_cli for v in VARIANTS) == 1


@pytest.mark.parametrize("vid", VARIANT_BY_ID)
def test_files_are_what_the_variant_says(hf_store, vid):
    c = hf_store.get(vid)
    v, names = c.variant, {p.name for p in c.directory.iterdir()}
    weights = sorted(n for n in names if n.endswith((".safetensors", ".bin")))
    index = "pytorch_model.bin.index.json" if v.pytorch_bin else "model.safetensors.index.json"
    if v.max_shard_size:
        assert index in names and len(weights) > 1, names
    else:
        assert weights == (["pytorch_model.bin"] if v.pytorch_bin else ["model.safetensors"])
    want = {None: "float32", "float16": "float16", "bfloat16": "bfloat16"}[v.dtype]
    if v.pytorch_bin:
        from llamanp.convert import torchfile
        dtypes = {t.dtype for w in weights for t in torchfile.load(c.directory / w).values()}
    else:
        names_st = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
        want = names_st[want]
        dtypes = {t.dtype for w in weights for t in st.load(c.directory / w).values()}
    assert dtypes == {want}
    cfg = json.loads((c.directory / "config.json").read_text())
    assert ("rope_parameters" in cfg) != v.legacy_config


@pytest.mark.parametrize("vid", VARIANT_BY_ID)
def test_config_matches_spec(hf_store, vid):
    c = hf_store.get(vid)
    spec, cfg = R.SPEC_BY_NAME[c.variant.spec], c.model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
            cfg.vocab_size, cfg.max_seq_len, cfg.tied_embeddings) == (
        spec.dim, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim,
        spec.hidden_dim, spec.vocab_size, spec.max_seq_len, spec.tied)
    assert cfg.norm_eps == pytest.approx(spec.norm_eps, rel=1e-6)
    assert cfg.rope_theta == spec.rope_theta
    if spec.rope_scaling is None:
        assert cfg.rope_scaling is None
    else:
        rs = cfg.rope_scaling
        assert {k: getattr(rs, k) for k in spec.rope_scaling} == spec.rope_scaling


@pytest.mark.parametrize("vid", VARIANT_BY_ID)
def test_logits_match_transformers(hf_store, vid):
    c = hf_store.get(vid)
    got = c.model.logits(c.ids)
    assert got.dtype == np.float32
    d = _maxdiff(got, c.logits)
    assert d <= TOL, f"max |logits - transformers| = {d:.3e} > {TOL}"


@pytest.mark.parametrize("vid", VARIANT_BY_ID)
def test_greedy_matches_transformers(hf_store, vid):
    c = hf_store.get(vid)
    assert c.margin >= MIN_MARGIN, f"reference near a tie ({c.margin:.2e})"
    got = list(llamanp.generate(c.model, c.ids, GEN_LEN, temperature=0.0, stop_ids=()))
    assert [int(t) for t in got] == c.greedy


@pytest.mark.parametrize("vid", [v.id for v in VARIANTS if v.dtype is None])
def test_float32_files_hold_the_reference_weights(hf_store, store, vid):
    """A float32 file read back by transformers is the in-memory reference model."""
    c = hf_store.get(vid)
    ref = store.reference(c.variant.spec)
    assert _maxdiff(c.logits, ref.logits) == 0.0


def test_cli_embeds_the_checkpoints_tokenizer(hf_store):
    """`python convert.py HFDIR OUT` embeds tokenizer.model with the model's own ids
    (generation_config's eos list) and tokenizer_config.json's chat template."""
    c = hf_store.get("bin-f32-mha3_untied_eps6")
    assert "Hugging Face pytorch_model.bin" in c.cli_stderr and "tokenizer sentencepiece" \
        in c.cli_stderr, c.cli_stderr
    tok = c.model.tokenizer
    assert tok is not None
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, [2, 5])
    assert tok.data.chat_template == CHAT_TEMPLATE
    text = "the little cat saw the dog"
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------
# 3. config.json and the directory, on small synthetic checkpoints
# ---------------------------------------------------------------------------

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def tiny_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names for a config like TINY."""
    rng = np.random.default_rng(seed)
    d, h = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d),
                       p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d),
                       p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d),
                       p + "mlp.down_proj.weight": (d, h)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write_tiny_hf(directory: Path, cfg: Optional[dict] = None, weights: Optional[dict] = None,
                  shards: int = 1) -> Path:
    """config.json + model.safetensors (or `shards` shards and the index)."""
    from safetensors.numpy import save_file

    cfg = dict(TINY if cfg is None else cfg)
    weights = tiny_weights(cfg) if weights is None else weights
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


def _read_with(tmp_path, **changes):
    """read_hf of TINY's weights under TINY's config with some fields changed."""
    cfg = {**TINY, **changes}
    return hf.read_hf(write_tiny_hf(tmp_path / "m", cfg, tiny_weights(TINY)))


def _refused(tmp_path, directory=None, **changes) -> str:
    with pytest.raises(LlamanpError) as e:
        if directory is None:
            _read_with(tmp_path, **changes)
        else:
            hf.read_hf(directory)
    return _one_line_error(e)


@pytest.mark.parametrize("changes,theta,scaling", [
    ({}, 10000.0, None),
    ({"rope_theta": None}, 10000.0, None),
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}},
     5e5, LLAMA3_SCALING),
    ({"rope_scaling": {"type": "llama3", **LLAMA3_SCALING}}, 10000.0, LLAMA3_SCALING),
    ({"rope_scaling": {"rope_type": "default"}}, 10000.0, None),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}},
     123.0, None),
    ({"rope_theta": None,
      "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING}},
     5e5, LLAMA3_SCALING),
], ids=["default", "theta-null", "hub-llama3", "old-type-key", "hub-default", "v5-default",
        "v5-llama3"])
def test_rope_settings_in_either_spelling(tmp_path, changes, theta, scaling):
    cfg = _read_with(tmp_path, **changes).config
    assert cfg.rope_theta == theta
    if scaling is None:
        assert cfg.rope_scaling is None
    else:
        assert {k: getattr(cfg.rope_scaling, k) for k in scaling} == scaling


@pytest.mark.parametrize("changes,words", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "gpt2"}, "'gpt2'"),
    ({"model_type": "mistral"}, "'mistral'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"model_type": None, "architectures": None}, "model_type"),
    ({"hidden_act": "gelu"}, "'gelu'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "gptq"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": 3}, "num_attention_heads 3"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"vocab_size": 40}, "tok_embeddings.weight"),
    ({"eos_token_id": 300}, "eos_token_id"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_refusals_say_what(tmp_path, changes, words):
    if "eos_token_id" in changes:      # ids are only checked when there is a tokenizer
        d = write_tiny_hf(tmp_path / "m", {**TINY, **changes, "vocab_size": 300},
                          tiny_weights({**TINY, "vocab_size": 300}))
        shutil.copy(R.build_sp_tokenizer(tmp_path / "tok"), d / "tokenizer.model")
        message = _refused(tmp_path, d)
    else:
        message = _refused(tmp_path, **changes)
    assert words in message, message


def test_head_dim_from_config(tmp_path):
    """head_dim 12 with hidden 16 and 2 heads: wq is 24 x 16, reordered per 12-row head."""
    cfg = {**TINY, "head_dim": 12}
    weights = tiny_weights(cfg)
    ckpt = hf.read_hf(write_tiny_hf(tmp_path / "m", cfg, weights))
    assert (ckpt.config.head_dim, ckpt.config.q_dim) == (12, 24)
    wq = ckpt.tensors["layers.0.attention.wq.weight"].load()
    hf_wq = torch.from_numpy(weights["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(wq, R.hf_to_meta_qk(hf_wq, 2).numpy())
    wk = ckpt.tensors["layers.0.attention.wk.weight"].load()
    hf_wk = torch.from_numpy(weights["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(wk, R.hf_to_meta_qk(hf_wk, 1).numpy())


@pytest.mark.parametrize("n_heads,head_dim", [(1, 2), (3, 10), (4, 8), (2, 24)])
def test_rope_permutation_and_its_inverse(n_heads, head_dim):
    w = np.random.default_rng(1).standard_normal((n_heads * head_dim, 5)).astype(np.float32)
    meta = hf.rotate_half_to_interleaved(w, n_heads, head_dim)
    np.testing.assert_array_equal(meta, R.hf_to_meta_qk(torch.from_numpy(w), n_heads).numpy())
    np.testing.assert_array_equal(hf.interleaved_to_rotate_half(meta, n_heads, head_dim), w)
    # row 2j / 2j+1 of each interleaved head are HF rows j / j + head_dim/2
    half = head_dim // 2
    np.testing.assert_array_equal(meta[1], w[half])


@pytest.mark.parametrize("flag,keep_head,tied", [(True, True, True), (False, False, True),
                                                 (True, False, True), (False, True, False)])
def test_tying(tmp_path, flag, keep_head, tied):
    """tie_word_embeddings, or no lm_head.weight at all, means the embedding is the output."""
    cfg = {**TINY, "tie_word_embeddings": flag}
    weights = tiny_weights(cfg)
    if not keep_head:
        del weights["lm_head.weight"]
    ckpt = hf.read_hf(write_tiny_hf(tmp_path / "m", cfg, weights))
    assert ckpt.config.tied_embeddings == tied
    assert ("output.weight" in ckpt.tensors) == (not tied)


def test_sharded_safetensors_and_ignored_buffers(tmp_path):
    weights = tiny_weights(TINY)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    one = hf.read_hf(write_tiny_hf(tmp_path / "one", TINY, weights))
    three = hf.read_hf(write_tiny_hf(tmp_path / "three", TINY, weights, shards=3))
    assert three.source == "Hugging Face safetensors (3 files)"
    assert set(one.tensors) == set(three.tensors)
    for name, t in one.tensors.items():
        np.testing.assert_array_equal(t.load(), three.tensors[name].load(), err_msg=name)


def test_unexpected_tensors_are_named(tmp_path):
    weights = tiny_weights(TINY)
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros(16, np.float32)
    message = _refused(tmp_path, write_tiny_hf(tmp_path / "m", TINY, weights))
    assert "model.layers.0.self_attn.q_proj.bias" in message


def test_integer_weights_are_refused(tmp_path):
    weights = tiny_weights(TINY)
    weights["model.norm.weight"] = np.ones(16, np.int8)
    message = _refused(tmp_path, write_tiny_hf(tmp_path / "m", TINY, weights))
    assert "norm.weight" in message and "I8" in message


def test_missing_pieces_of_a_sharded_checkpoint(tmp_path):
    d = write_tiny_hf(tmp_path / "m", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _refused(tmp_path, d)
    (d / "model.safetensors.index.json").unlink()
    assert "model.safetensors.index.json" in _refused(tmp_path, d)
    (d / "model-00001-of-00002.safetensors").unlink()
    assert "no weights" in _refused(tmp_path, d)


def test_model_stop_ids_and_chat_template(tmp_path, sp_model):
    """Every eos id of generation_config.json and config.json stops generation;
    the chat template comes from tokenizer_config.json (whose old list form names a
    "default" template) or chat_template.jinja."""
    cfg = {**TINY, "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 11}
    d = write_tiny_hf(tmp_path / "m", cfg, tiny_weights(cfg))
    shutil.copy(sp_model, d / "tokenizer.model")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    tok = hf.read_hf(d).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 2, "D")
    assert set(tok.stop_ids) == {2, 7, 9, 11} and len(tok.stop_ids) == 4
    (d / "tokenizer_config.json").unlink()
    (d / "chat_template.jinja").write_text("J")
    assert hf.read_hf(d).tokenizer.chat_template == "J"
    (d / "tokenizer.model").unlink()
    assert hf.read_hf(d).tokenizer is None


# ---------------------------------------------------------------------------
# 4. bad input through the real command line
# ---------------------------------------------------------------------------

def _lie_about_offsets(d: Path) -> None:
    path = d / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    entry = header["model.norm.weight"]
    entry["data_offsets"] = [o + len(data) for o in entry["data_offsets"]]
    path.write_bytes(_safetensors_bytes(header, data[8 + n:]))


def _drop_a_shard(d: Path) -> None:
    (d / "model-00002-of-00003.safetensors").unlink()


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


BAD_INPUTS = {
    "lying-offsets": (1, _lie_about_offsets, "model.safetensors"),
    "missing-shard": (3, _drop_a_shard, "model-00002-of-00003.safetensors"),
    "yarn": (1, _edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    "attention-bias": (1, _edit_config(attention_bias=True), "attention_bias"),
    "gpt2": (1, _edit_config(model_type="gpt2"), "'gpt2'"),
}


def test_cli_bad_input_gives_one_error_line(tmp_path):
    jobs = {}
    for name, (shards, damage, _) in BAD_INPUTS.items():
        d = write_tiny_hf(tmp_path / name, shards=shards)
        damage(d)
        out_dir = tmp_path / f"out-{name}"
        out_dir.mkdir()
        jobs[name] = (out_dir, ("convert.py", d, out_dir / "m.lmw"))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = {name: pool.submit(run_cli, *args) for name, (_, args) in jobs.items()}
        for name, future in results.items():
            rc, stdout, stderr = future.result()
            lines = stderr.strip().splitlines()
            assert rc != 0, (name, stderr)
            assert "Traceback" not in stderr, (name, stderr)
            assert len(lines) == 1 and lines[0].startswith("error:"), (name, stderr)
            assert BAD_INPUTS[name][2] in lines[0], (name, lines[0])
            assert list(jobs[name][0].iterdir()) == [], f"{name}: left files behind"
