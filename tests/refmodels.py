"""Independent reference models for the test suite (helpers only, no tests).

Everything here is built on Hugging Face ``transformers.LlamaForCausalLM``,
never on llamanp: a tiny random Llama is made in transformers, its logits and
greedy continuation are the reference, and the same weights are written out in
every source format the converter reads (llama2.c ``.pt``/``.bin``, Meta
``consolidated.*.pth`` + ``params.json``, Hugging Face ``config.json`` +
safetensors). A test then converts the file with llamanp and compares.

Layout facts used here (from Meta's / llama2.c's / HF's published code and
file formats):

* Meta and llama2.c apply RoPE to *interleaved pairs* (components 2i, 2i+1 of
  each head). HF applies it in "rotate half" form (components i, i+hd/2), and
  HF's conversion script permutes the rows of wq/wk Meta->HF by viewing them as
  (n_heads, head_dim//2, 2, dim) and swapping the two middle axes. Going back
  HF->Meta views them as (n_heads, 2, head_dim//2, dim) and swaps the middle
  axes again (:func:`hf_to_meta_qk`).
* Meta's feed-forward width: ``h = int(2*4*dim/3)``; ``h = int(mult*h)`` when
  ``ffn_dim_multiplier`` is set; ``h = multiple_of*ceil(h/multiple_of)``.
  llama2.c uses the same formula without the multiplier.
* Meta's Llama 3.1 "use_scaled_rope" is the "llama3" frequency scaling with
  the fixed factors factor=8, low_freq_factor=1, high_freq_factor=4,
  original_max_position_embeddings=8192.

Transformers 5.x expresses RoPE through ``LlamaConfig.rope_parameters``, a
dict holding ``rope_theta`` *and* the scaling fields, e.g.
``{"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
"low_freq_factor": 1.0, "high_freq_factor": 4.0,
"original_max_position_embeddings": 8192}``; a plain model is
``{"rope_type": "default", "rope_theta": 1e4}``. The 4.x style (top-level
``rope_theta`` and ``rope_scaling={"rope_type": "llama3", ...}``) is still
accepted as constructor kwargs and folded into ``rope_parameters``; real hub
``config.json`` files use the 4.x style, ``save_pretrained`` in 5.x writes
``rope_parameters``. :func:`write_hf` can produce either.
"""

from __future__ import annotations

import json
import math
import random
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# transformers is imported lazily inside the functions that need it, so that
# importing this module (e.g. from conftest) stays cheap.

META_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

# Source formats, by the name the tests use. The converter reads the first
# four ("hf" is a Hugging Face directory); "lmw" is llamanp's own format
# written directly from its specification.
FORMATS = ("llama2c_pt", "llama2c_bin", "meta", "hf", "lmw")


# ---------------------------------------------------------------------------
# model shapes
# ---------------------------------------------------------------------------

def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Feed-forward width exactly as Meta's (and llama2.c's) model.py derive it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    multiple_of: int = 32
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict with factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings ("llama3" scaling)
    rope_scaling: Optional[dict] = field(default=None, hash=False, compare=False)
    tied: bool = False
    prompt_len: int = 12          # length of the random prompt the tests use
    gen_len: int = 16             # greedy tokens compared with the reference
    seed: int = 0                 # weights/prompt seed (one whose greedy margins are clear)
    # head width when it is not dim / n_heads (HF's config.json head_dim can say so)
    explicit_head_dim: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def __post_init__(self):
        assert self.explicit_head_dim or self.dim % self.n_heads == 0, self.name
        assert self.n_heads % self.n_kv_heads == 0, self.name
        assert self.head_dim % 2 == 0, self.name
        assert self.prompt_len + self.gen_len <= self.max_seq_len, self.name

    def can_express(self, fmt: str) -> tuple[bool, str]:
        """Whether source format `fmt` can describe this model, and why not."""
        if self.explicit_head_dim is not None and fmt in ("llama2c_pt", "llama2c_bin", "meta"):
            return False, "llama2.c's and Meta's model.py derive head_dim = dim / n_heads"
        if fmt in ("llama2c_pt", "llama2c_bin"):
            # llama2.c: head_dim = dim / n_heads, theta 10000 hard-wired, no scaling
            if self.rope_theta != 10000.0:
                return False, "llama2.c has rope_theta fixed at 10000"
            if self.rope_scaling is not None:
                return False, "llama2.c has no RoPE scaling"
            if fmt == "llama2c_bin" and self.norm_eps != 1e-5:
                return False, "llama2.c .bin has norm_eps fixed at 1e-5"
            return True, ""
        if fmt == "meta":
            # params.json: any theta; scaling only Meta's fixed factors;
            # hidden_dim only through multiple_of/ffn_dim_multiplier (always
            # true for a ModelSpec); head_dim = dim / n_heads.
            if self.rope_scaling is not None and self.rope_scaling != META_SCALING:
                return False, "Meta's use_scaled_rope has fixed factors 8/1/4/8192"
            return True, ""
        if fmt in ("hf", "lmw"):
            return True, ""
        raise ValueError(f"unknown source format {fmt!r}")


SPECS: list[ModelSpec] = [
    # llama2.c-like: MHA, tied, theta 1e4, eps 1e-5 -> every format
    ModelSpec("mha_tied", dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
              vocab_size=256, max_seq_len=64, multiple_of=32, tied=True),
    # odd head count (3 heads of 16), 3 layers, untied, eps 1e-6, vocab 300
    # (matches the test tokenizer) -> pt, meta, hf
    ModelSpec("mha3_untied_eps6", dim=48, n_layers=3, n_heads=3, n_kv_heads=3,
              vocab_size=300, max_seq_len=96, multiple_of=16, norm_eps=1e-6),
    # GQA 4/2, untied, theta 1e4 -> every format
    ModelSpec("gqa4_2", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
              vocab_size=200, max_seq_len=64, multiple_of=32),
    # odd heads with a single kv head (MQA), tied, eps 1e-6 -> pt, meta, hf
    ModelSpec("mqa3_1_tied_eps6", dim=48, n_layers=2, n_heads=3, n_kv_heads=1,
              vocab_size=96, max_seq_len=64, multiple_of=8, norm_eps=1e-6, tied=True),
    # Llama-3-like: GQA 6/2 (ratio 3), theta 5e5, ffn_dim_multiplier -> meta, hf
    ModelSpec("gqa6_2_theta5e5", dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
              vocab_size=128, max_seq_len=128, multiple_of=64,
              ffn_dim_multiplier=1.3, rope_theta=500000.0),
    # GQA 8/4 with head_dim 8, theta 5e5: shards evenly 4 ways -> meta, hf
    ModelSpec("gqa8_4_theta5e5", dim=64, n_layers=2, n_heads=8, n_kv_heads=4,
              vocab_size=256, max_seq_len=64, multiple_of=32, rope_theta=500000.0),
    # Llama 3.1 (Meta's fixed scaling, original context 8192): with theta 5e5
    # and head_dim 16 the lowest frequencies are scaled; a long prompt makes
    # the positions large enough for that to change the logits -> meta, hf
    ModelSpec("llama31_scaled_theta5e5", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
              vocab_size=256, max_seq_len=128, multiple_of=32, ffn_dim_multiplier=1.5,
              rope_theta=500000.0, rope_scaling=dict(META_SCALING), prompt_len=100),
    # the same Meta scaling with theta 1e4 (only the lowest frequencies scaled)
    ModelSpec("llama31_scaled_theta1e4", dim=64, n_layers=2, n_heads=4, n_kv_heads=1,
              vocab_size=128, max_seq_len=128, multiple_of=32, tied=True,
              rope_scaling=dict(META_SCALING), prompt_len=100, seed=1),
    # "llama3" scaling with a small original context so that it matters at
    # every position -> only HF's config.json can express it
    ModelSpec("llama3_scaled_orig16", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
              vocab_size=160, max_seq_len=64, multiple_of=32, tied=True,
              rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=16), prompt_len=40),
    # heads wider than dim / n_heads (4 x 24 = 96 > 64), GQA 4/2, untied: the
    # q/k permutation and the attention must use head_dim, not dim / n_heads
    # -> hf (config.json head_dim), lmw
    ModelSpec("gqa4_2_hd24", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
              vocab_size=192, max_seq_len=64, multiple_of=32, explicit_head_dim=24),
]

SPEC_BY_NAME = {s.name: s for s in SPECS}


def random_prompt(spec: ModelSpec, seed: Optional[int] = None,
                  length: Optional[int] = None) -> list[int]:
    seed = spec.seed if seed is None else seed
    rng = np.random.default_rng(10_000 + seed)
    n = spec.prompt_len if length is None else length
    return [int(t) for t in rng.integers(0, spec.vocab_size, size=n)]


# ---------------------------------------------------------------------------
# the Hugging Face reference
# ---------------------------------------------------------------------------

def hf_config(spec: ModelSpec):
    """LlamaConfig for spec.

    RoPE is passed in the 4.x spelling (top-level rope_theta, rope_scaling with
    "rope_type"), which transformers 4.45+ reads natively and 5.x folds into
    ``rope_parameters`` (checked by test_reference_hf_config_rope), so the
    reference is right whichever version the test extras install.
    """
    from transformers import LlamaConfig

    scaling = None
    if spec.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **{k: v for k, v in spec.rope_scaling.items()}}
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.dim,
        intermediate_size=spec.hidden_dim,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_seq_len,
        rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tied,
        rope_theta=float(spec.rope_theta),
        rope_scaling=scaling,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )


def hf_rope_settings(config) -> tuple[float, Optional[dict]]:
    """(theta, llama3 scaling dict or None) as a LlamaConfig of any version holds them."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:          # transformers 5
        rp = dict(rp)
        theta = rp.pop("rope_theta")
        kind = rp.pop("rope_type", rp.pop("type", "default"))
        return float(theta), (None if kind == "default" else dict(rp, rope_type=kind))
    rs = getattr(config, "rope_scaling", None)                # transformers 4.x
    return float(config.rope_theta), (dict(rs) if rs else None)


def make_hf_model(spec: ModelSpec, seed: Optional[int] = None):
    """A float32 LlamaForCausalLM with deterministic random weights.

    Scales are chosen so that the suite is *sensitive*: with the usual
    std=0.02 init, attention in a 64-wide model is almost uniform and RoPE or
    GQA mistakes move the logits by less than the comparison tolerance. Here
    projections use std ~ 1/sqrt(fan_in) (q/k a bit more, so attention is
    sharp), the embedding keeps a small, realistic std (0.02, so the RMSNorm
    epsilon matters) and every norm weight is 1 + 0.1*randn.
    """
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    # HF warns that Meta's original context (8192) exceeds our tiny
    # max_position_embeddings; that does not affect the computation.
    hf_logging.set_verbosity_error()
    seed = spec.seed if seed is None else seed
    torch.manual_seed(seed)  # only affects transformers' own init, overwritten below
    model = LlamaForCausalLM(hf_config(spec))
    model.eval()
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + hash_name(spec.name))

    def normal(shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + normal(p.shape, 0.1))
            elif name == "model.embed_tokens.weight":
                p.copy_(normal(p.shape, 0.02))
            elif name == "lm_head.weight":
                p.copy_(normal(p.shape, 1.0 / math.sqrt(spec.dim)))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(normal(p.shape, 1.6 / math.sqrt(p.shape[1])))
            elif name.endswith("_proj.weight"):
                p.copy_(normal(p.shape, 1.0 / math.sqrt(p.shape[1])))
            else:
                raise AssertionError(f"unexpected parameter {name}")
    if spec.tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            # a tied head reads the small embedding: a larger final norm
            # weight (as trained Llamas have) gives logits of std ~1
            model.model.norm.weight.mul_(1.0 / (0.02 * math.sqrt(spec.dim)))
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def hash_name(name: str) -> int:
    """A stable (not per-process salted) small hash of a string."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 1_000_000_007
    return h


def round_weights_bf16(model) -> None:
    """Round every weight to bfloat16 (kept in float32), in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    """Logits [len(ids), vocab] float32 of the HF model on one sequence."""
    x = torch.tensor([list(ids)], dtype=torch.long)
    out = model(input_ids=x, use_cache=False)
    return out.logits[0].to(torch.float32).numpy().copy()


@torch.no_grad()
def hf_greedy_with_margin(model, ids, n: int) -> tuple[list[int], float]:
    """Greedy continuation (no stopping) and the smallest top-1/top-2 gap.

    Runs the full sequence every step: slow but unambiguous. The margin tells
    whether a greedy comparison is well posed (a near tie could flip between
    two correct float32 implementations).
    """
    seq = list(ids)
    new: list[int] = []
    margin = math.inf
    for _ in range(n):
        last = hf_logits(model, seq)[-1]
        top2 = np.partition(last, -2)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        t = int(np.argmax(last))
        new.append(t)
        seq.append(t)
    return new, margin


def hf_greedy(model, ids, n: int) -> list[int]:
    return hf_greedy_with_margin(model, ids, n)[0]


# ---------------------------------------------------------------------------
# HF -> Meta naming and layout
# ---------------------------------------------------------------------------

def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's row permutation of wq/wk (rotate-half -> interleaved pairs)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's documented Meta->HF permutation (used only to check the inverse)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under Meta's names and in Meta's layout (fresh tensors).

    output.weight is always present; for a tied model it is a *copy* of the
    embedding (writers that want the shared object arrange that themselves).
    """
    cfg = model.config
    hs = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    sd["tok_embeddings.weight"] = hs["model.embed_tokens.weight"].clone()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        sd[q + "attention.wq.weight"] = hf_to_meta_qk(hs[p + "self_attn.q_proj.weight"],
                                                      cfg.num_attention_heads).clone()
        sd[q + "attention.wk.weight"] = hf_to_meta_qk(hs[p + "self_attn.k_proj.weight"],
                                                      cfg.num_key_value_heads).clone()
        sd[q + "attention.wv.weight"] = hs[p + "self_attn.v_proj.weight"].clone()
        sd[q + "attention.wo.weight"] = hs[p + "self_attn.o_proj.weight"].clone()
        sd[q + "feed_forward.w1.weight"] = hs[p + "mlp.gate_proj.weight"].clone()
        sd[q + "feed_forward.w2.weight"] = hs[p + "mlp.down_proj.weight"].clone()
        sd[q + "feed_forward.w3.weight"] = hs[p + "mlp.up_proj.weight"].clone()
        sd[q + "attention_norm.weight"] = hs[p + "input_layernorm.weight"].clone()
        sd[q + "ffn_norm.weight"] = hs[p + "post_attention_layernorm.weight"].clone()
    sd["norm.weight"] = hs["model.norm.weight"].clone()
    head = hs.get("lm_head.weight", hs["model.embed_tokens.weight"])
    sd["output.weight"] = head.clone()
    return sd


# ---------------------------------------------------------------------------
# a second, Meta-style reference forward (float64) to check the helpers above
# ---------------------------------------------------------------------------

def meta_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> np.ndarray:
    """RoPE frequencies as Meta computes them, with Llama 3.1's scaling (float64)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return freqs
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out, dtype=np.float64)


def meta_forward(sd: dict[str, torch.Tensor], spec: ModelSpec, ids,
                 gqa_cyclic: bool = False, zero_head=None, add=None) -> np.ndarray:
    """Logits of a Meta-layout state dict, written from the model definition.

    gqa_cyclic=True deliberately gives query head j the kv head j % n_kv_heads
    instead of j // (n_heads/n_kv_heads): a classic GQA bug, used only to show
    that the reference would catch it. Two changes made by hand, for the
    interventions of llamanp.inspect: zero_head=(layer, head) zeroes that
    head's mixed values before wo; add=(layer, vector) adds vector to the
    residual stream after that layer.
    """
    W = {k: v.to(torch.float64).numpy() for k, v in sd.items()}
    T = len(ids)
    hd, H, KV = spec.head_dim, spec.n_heads, spec.n_kv_heads
    freqs = meta_inv_freq(hd, spec.rope_theta, spec.rope_scaling)
    ang = np.arange(T, dtype=np.float64)[:, None] * freqs[None, :]   # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.norm_eps) * w

    def rope(x):  # x [T, heads, hd], interleaved pairs
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    h = W["tok_embeddings.weight"][list(ids)]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        x = norm(h, W[p + "attention_norm.weight"])
        q = rope((x @ W[p + "attention.wq.weight"].T).reshape(T, H, hd))
        k = rope((x @ W[p + "attention.wk.weight"].T).reshape(T, KV, hd))
        v = (x @ W[p + "attention.wv.weight"].T).reshape(T, KV, hd)
        kv_of_head = np.arange(H) % KV if gqa_cyclic else np.arange(H) // (H // KV)
        k = k[:, kv_of_head]
        v = v[:, kv_of_head]
        s = np.einsum("thd,uhd->htu", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("htu,uhd->thd", s, v)
        if zero_head is not None and zero_head[0] == i:
            o[:, zero_head[1]] = 0
        h = h + o.reshape(T, H * hd) @ W[p + "attention.wo.weight"].T
        x = norm(h, W[p + "ffn_norm.weight"])
        a = x @ W[p + "feed_forward.w1.weight"].T
        g = a / (1 + np.exp(-a))
        h = h + (g * (x @ W[p + "feed_forward.w3.weight"].T)) @ W[p + "feed_forward.w2.weight"].T
        if add is not None and add[0] == i:
            h = h + add[1]
    h = norm(h, W["norm.weight"])
    return (h @ W["output.weight"].T).astype(np.float32)


# ---------------------------------------------------------------------------
# writers, one per source format
# ---------------------------------------------------------------------------

def _layer_tensors(sd, n_layers, suffix):
    return [sd[f"layers.{i}.{suffix}"] for i in range(n_layers)]


def llama2c_freq_tables(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """llama2.c's freqs_cos / freqs_sin buffers [max_seq_len, head_dim/2] (float32)."""
    hd = spec.head_dim
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    t = torch.arange(spec.max_seq_len)
    ang = torch.outer(t, freqs).float()
    return torch.cos(ang).numpy(), torch.sin(ang).numpy()


def write_llama2c_pt(path, model, spec: ModelSpec, compiled_prefix: bool = False,
                     minimal_args: bool = False) -> Path:
    """A llama2.c training checkpoint (train.py's torch.save layout).

    compiled_prefix: keys carry "_orig_mod." as in checkpoints of a
    torch.compile'd model. minimal_args: model_args exactly as upstream
    train.py stores them (no hidden_dim, no norm_eps: the reader must use
    llama2.c's defaults/derivations).
    """
    ok, why = spec.can_express("llama2c_pt")
    assert ok, why
    sd = meta_state_dict(model)
    if spec.tied:
        # llama2.c ties by assigning the Parameter: one tensor, two keys
        sd["output.weight"] = sd["tok_embeddings.weight"]
    # llama2.c's state_dict order: tok_embeddings, layers..., norm, output
    ordered = {"tok_embeddings.weight": sd["tok_embeddings.weight"]}
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        for s in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                  "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                  "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"):
            ordered[p + s] = sd[p + s]
    ordered["norm.weight"] = sd["norm.weight"]
    ordered["output.weight"] = sd["output.weight"]
    if compiled_prefix:
        ordered = {"_orig_mod." + k: v for k, v in ordered.items()}

    model_args = dict(dim=spec.dim, n_layers=spec.n_layers, n_heads=spec.n_heads,
                      n_kv_heads=spec.n_kv_heads, vocab_size=spec.vocab_size,
                      hidden_dim=spec.hidden_dim, multiple_of=spec.multiple_of,
                      norm_eps=spec.norm_eps, max_seq_len=spec.max_seq_len, dropout=0.0)
    if minimal_args:
        assert spec.ffn_dim_multiplier is None and spec.norm_eps == 1e-5, \
            "minimal llama2.c model_args cannot carry hidden_dim/norm_eps"
        del model_args["hidden_dim"], model_args["norm_eps"]

    g = torch.Generator().manual_seed(7)
    params = list(ordered.values())
    optimizer = {
        "state": {i: {"step": torch.tensor(10.0),
                      "exp_avg": torch.randn(p.shape, generator=g) * 1e-3,
                      "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6}
                  for i, p in enumerate(params[:3])},
        "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                          "weight_decay": 0.1, "amsgrad": False, "maximize": False,
                          "foreach": None, "capturable": False, "differentiable": False,
                          "fused": None, "params": list(range(len(params)))}],
    }
    config = dict(out_dir="out", eval_interval=2000, log_interval=1, eval_iters=100,
                  eval_only=False, always_save_checkpoint=False, init_from="scratch",
                  batch_size=128, max_seq_len=spec.max_seq_len, vocab_source="custom",
                  vocab_size=spec.vocab_size, dim=spec.dim, n_layers=spec.n_layers,
                  n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads,
                  multiple_of=spec.multiple_of, dropout=0.0, learning_rate=5e-4,
                  device="cpu", dtype="float32", compile=compiled_prefix)
    ckpt = {"model": ordered, "optimizer": optimizer, "model_args": model_args,
            "iter_num": 10, "best_val_loss": torch.tensor(1.5), "config": config}
    path = Path(path)
    torch.save(ckpt, path)
    return path


def _f32(t) -> bytes:
    a = t.detach().to(torch.float32).numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def write_llama2c_bin(path, model, spec: ModelSpec, version: int = 0,
                      with_freq_tables: bool = True) -> Path:
    """llama2.c's export.py formats: legacy v0 and v1 (fp32 with 256-byte header).

    Sharing of the classifier follows spec.tied (v0: sign of vocab_size, v1:
    the flag byte). with_freq_tables=False drops v0's freq_cis tables: that is
    NOT a valid v0 file (every v0 export has them), only for negative tests.
    """
    ok, why = spec.can_express("llama2c_bin")
    assert ok, why
    sd = meta_state_dict(model)
    L = spec.n_layers
    shared = spec.tied
    if shared:
        assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    params7 = [spec.dim, spec.hidden_dim, L, spec.n_heads, spec.n_kv_heads,
               spec.vocab_size, spec.max_seq_len]
    lay = lambda s: _layer_tensors(sd, L, s)  # noqa: E731
    out = bytearray()
    if version == 0:
        if not shared:
            params7[5] = -params7[5]
        out += struct.pack("<7i", *params7)
        order = [sd["tok_embeddings.weight"],
                 *lay("attention_norm.weight"), *lay("attention.wq.weight"),
                 *lay("attention.wk.weight"), *lay("attention.wv.weight"),
                 *lay("attention.wo.weight"), *lay("ffn_norm.weight"),
                 *lay("feed_forward.w1.weight"), *lay("feed_forward.w2.weight"),
                 *lay("feed_forward.w3.weight"), sd["norm.weight"]]
        for t in order:
            out += _f32(t)
        if with_freq_tables:
            fc, fs = llama2c_freq_tables(spec)
            out += _f32(fc) + _f32(fs)
        if not shared:
            out += _f32(sd["output.weight"])
    elif version == 1:
        out += struct.pack("<I", 0x616B3432)
        out += struct.pack("<i", 1)
        out += struct.pack("<7i", *params7)
        out += struct.pack("<B", int(shared))
        out += b"\0" * (256 - len(out))
        order = [*lay("attention_norm.weight"), *lay("ffn_norm.weight"), sd["norm.weight"],
                 sd["tok_embeddings.weight"],
                 *lay("attention.wq.weight"), *lay("attention.wk.weight"),
                 *lay("attention.wv.weight"), *lay("attention.wo.weight"),
                 *lay("feed_forward.w1.weight"), *lay("feed_forward.w2.weight"),
                 *lay("feed_forward.w3.weight")]
        for t in order:
            out += _f32(t)
        if not shared:
            out += _f32(sd["output.weight"])
    else:
        raise ValueError(f"llama2.c .bin version {version} not supported by this writer")
    path = Path(path)
    path.write_bytes(bytes(out))
    return path


# how Meta's model-parallel layers split each tensor (None = replicated)
def meta_split_axis(name: str, family: str) -> Optional[int]:
    if name == "tok_embeddings.weight":
        return 1 if family == "llama2" else 0   # ParallelEmbedding vs VocabParallelEmbedding
    if name == "output.weight":
        return 0
    if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                      "feed_forward.w1.weight", "feed_forward.w3.weight")):
        return 0                                # ColumnParallelLinear
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1                                # RowParallelLinear
    if name.endswith("norm.weight"):
        return None
    raise AssertionError(f"no split rule for {name}")


def meta_params(spec: ModelSpec, family: str) -> dict:
    assert family in ("llama2", "llama3"), family
    ok, why = spec.can_express("meta")
    assert ok, why
    params = {"dim": spec.dim, "n_layers": spec.n_layers, "n_heads": spec.n_heads}
    if family == "llama3" or spec.n_kv_heads != spec.n_heads:
        params["n_kv_heads"] = spec.n_kv_heads
    params["vocab_size"] = -1 if family == "llama2" else spec.vocab_size
    params["multiple_of"] = spec.multiple_of
    if spec.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = spec.ffn_dim_multiplier
    params["norm_eps"] = spec.norm_eps
    if family == "llama3" or spec.rope_theta != 10000.0:   # Code Llama also writes it
        params["rope_theta"] = spec.rope_theta
    if spec.rope_scaling is not None:
        assert family == "llama3", "use_scaled_rope is a Llama 3.1 field"
        params["use_scaled_rope"] = True
    return params


def write_meta(dirpath, model, spec: ModelSpec, n_shards: int = 1, family: str = "llama2",
               dtype: torch.dtype = torch.float32, sd: Optional[dict] = None) -> Path:
    """A Meta checkpoint directory: params.json + consolidated.NN.pth.

    Tensors are split over n_shards as Meta's model-parallel layers split
    them. dtype=torch.bfloat16 writes bf16 like Meta's releases: the reference
    model must then hold the same rounded weights (round_weights_bf16).
    Llama-2-family shards carry Meta's "rope.freqs" buffer. `sd` overrides the
    state dict (for negative tests).
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    params = meta_params(spec, family)
    (dirpath / "params.json").write_text(json.dumps(params, indent=2))
    if sd is None:
        sd = meta_state_dict(model)
    if dtype != torch.float32:
        rounded = {k: v.to(dtype).to(torch.float32) for k, v in sd.items()}
        assert all(torch.equal(rounded[k], sd[k]) for k in sd), \
            "round the reference model's weights first (round_weights_bf16)"
    shards: list[dict] = [dict() for _ in range(n_shards)]
    for name, t in sd.items():
        axis = meta_split_axis(name, family)
        if axis is None:
            parts = [t] * n_shards
        else:
            assert t.shape[axis] % n_shards == 0, \
                f"{name} {tuple(t.shape)} does not split {n_shards} ways on axis {axis}"
            parts = list(torch.chunk(t, n_shards, dim=axis))
        for s, part in zip(shards, parts):
            s[name] = part.to(dtype).contiguous().clone()
    if family == "llama2":
        hd = spec.head_dim
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        for s in shards:
            s["rope.freqs"] = freqs.to(dtype).clone()
    for i, s in enumerate(shards):
        torch.save(s, dirpath / f"consolidated.{i:02d}.pth")
    return dirpath


def write_hf(dirpath, model, legacy_config: bool = True, dtype: Optional[str] = None,
             max_shard_size: Optional[str] = None, pytorch_bin: bool = False) -> Path:
    """A Hugging Face model directory, written by transformers / huggingface_hub.

    By default: config.json + model.safetensors from ``save_pretrained``.
    dtype ("float16", "bfloat16") saves a half-precision copy of the model
    (the reference then has to be loaded back from the file).
    max_shard_size (e.g. "40KB") shards the weights and writes the index.
    pytorch_bin=True writes pytorch_model.bin (and, sharded,
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json) as
    transformers 4 did: transformers 5 only saves safetensors, so the
    state_dict goes through huggingface_hub.save_torch_state_dict, the
    routine 4.x used, and a tied model keeps lm_head.weight as a second
    name for the embedding's storage.

    legacy_config=True rewrites config.json the way hub checkpoints are
    written (top-level "rope_theta", "rope_scaling" with "rope_type"), which
    is what most real files look like; False keeps transformers 5's
    "rope_parameters".
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        import copy
        model = copy.deepcopy(model).to(getattr(torch, dtype))    # leave the caller's alone
    shard_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if pytorch_bin:
        from huggingface_hub import save_torch_state_dict
        save_torch_state_dict(model.state_dict(), dirpath, safe_serialization=False,
                              **shard_kw)
        model.config.save_pretrained(dirpath)
        model.generation_config.save_pretrained(dirpath)
    else:
        model.save_pretrained(dirpath, **shard_kw)
    cfg_path = dirpath / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta, scaling = hf_rope_settings(model.config)
    for k in ("rope_parameters", "rope_theta", "rope_scaling"):
        cfg.pop(k, None)
    if legacy_config:
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = scaling
        if "dtype" in cfg:
            cfg["torch_dtype"] = cfg.pop("dtype")
    else:
        rp = {"rope_type": "default", "rope_theta": theta}
        if scaling is not None:
            rp = {**scaling, "rope_theta": theta}
        cfg["rope_parameters"] = rp
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dirpath


LMW_MAGIC = b"\x89LMW\r\n\x1a\n"


def lmw_config(spec: ModelSpec) -> dict:
    """The `config` object of an .lmw header (docs/lmw-format.md section 2.1)."""
    rs = None
    if spec.rope_scaling is not None:
        rs = {"type": "llama3", **{k: spec.rope_scaling[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    return {"dim": spec.dim, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
            "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
            "hidden_dim": spec.hidden_dim, "vocab_size": spec.vocab_size,
            "norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta, "rope_scaling": rs,
            "max_seq_len": spec.max_seq_len, "tied_embeddings": spec.tied}


def lmw_tensors(spec: ModelSpec, sd: dict) -> dict[str, np.ndarray]:
    """Meta-layout weights fused as the .lmw format stores them (wqkv, w13), in order."""
    f = lambda k: sd[k].detach().to(torch.float32).numpy()  # noqa: E731
    out = {"tok_embeddings.weight": f("tok_embeddings.weight")}
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = f(p + "attention_norm.weight")
        out[p + "attention.wqkv.weight"] = np.concatenate(
            [f(p + "attention.wq.weight"), f(p + "attention.wk.weight"),
             f(p + "attention.wv.weight")], axis=0)
        out[p + "attention.wo.weight"] = f(p + "attention.wo.weight")
        out[p + "ffn_norm.weight"] = f(p + "ffn_norm.weight")
        out[p + "feed_forward.w13.weight"] = np.concatenate(
            [f(p + "feed_forward.w1.weight"), f(p + "feed_forward.w3.weight")], axis=0)
        out[p + "feed_forward.w2.weight"] = f(p + "feed_forward.w2.weight")
    out["norm.weight"] = f("norm.weight")
    if not spec.tied:
        out["output.weight"] = f("output.weight")
    return out


def write_lmw(path, model, spec: ModelSpec, tokenizer: Optional[Path] = None,
              drop: tuple = (), config: Optional[dict] = None) -> Path:
    """Write an .lmw file directly, from docs/lmw-format.md (not with llamanp).

    This bypasses the converter, so that shapes no source format can express
    (e.g. "llama3" scaling with a small original context) still reach the
    engine. `drop` leaves tensors out and `config` replaces the config object:
    both only for negative tests.
    """
    tensors = lmw_tensors(spec, meta_state_dict(model))
    for name in drop:
        del tensors[name]
    regions: list[bytes] = []
    table = []
    offset = 0
    for name, a in tensors.items():
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
        table.append({"name": name, "dtype": "f32", "shape": list(a.shape),
                      "offset": offset, "nbytes": len(data)})
        regions.append(data)
        offset = -(-(offset + len(data)) // 64) * 64
    header = {"config": lmw_config(spec) if config is None else config, "tensors": table,
              "metadata": {"source_format": "tests/refmodels.write_lmw",
                           "converter": "llamanp test suite"}}
    if tokenizer is not None:
        blob = Path(tokenizer).read_bytes()
        header["tokenizer"] = {"kind": "sentencepiece", "offset": offset, "nbytes": len(blob),
                               "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": {},
                               "chat_template": None}
        regions.append(blob)
    hjson = json.dumps(header).encode("utf-8")
    out = bytearray(LMW_MAGIC + struct.pack("<IIQ", 1, 0, len(hjson)) + hjson)
    out += b"\0" * (-len(out) % 64)
    data_start = len(out)
    for entry, data in zip(table + ([header["tokenizer"]] if tokenizer is not None else []),
                           regions):
        out += b"\0" * (data_start + entry["offset"] - len(out))
        out += data
    path = Path(path)
    path.write_bytes(bytes(out))
    return path


def write_source(fmt: str, dest, model, spec: ModelSpec, **kw) -> Path:
    """Write `model` in source format fmt; returns the path to pass to convert."""
    dest = Path(dest)
    if fmt == "llama2c_pt":
        return write_llama2c_pt(dest, model, spec, **kw)
    if fmt == "llama2c_bin":
        return write_llama2c_bin(dest, model, spec, **kw)
    if fmt == "meta":
        return write_meta(dest, model, spec, **kw)
    if fmt == "hf":
        return write_hf(dest, model, **kw)      # config.json carries everything
    if fmt == "lmw":
        return write_lmw(dest, model, spec, **kw)
    raise ValueError(fmt)


# ---------------------------------------------------------------------------
# a tiny SentencePiece tokenizer
# ---------------------------------------------------------------------------

_WORDS = ("the a one little big old red blue green happy sad cat dog bird tree sun moon "
          "girl boy mom dad ran saw liked played jumped found said went home park "
          "ball toy box day night and but so then with to in on of was is it he she "
          "they we you very fast slow").split()


def tokenizer_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        # lower case and two punctuation marks only: the ~30 characters plus
        # 256 byte pieces and 3 specials must fit in a ~300-piece vocabulary
        lines.append(" ".join(words) + rng.choice([".", ","]))
    return lines


_SP_CACHE: dict[tuple[str, int], Path] = {}


def build_sp_tokenizer(dirpath, vocab_size: int = 300) -> Path:
    """Train a small Llama-style BPE SentencePiece model (byte_fallback, unk=0,
    bos=1, eos=2); returns the .model path. Cached per (dir, vocab)."""
    import sentencepiece as spm

    dirpath = Path(dirpath)
    key = (str(dirpath.resolve()), vocab_size)
    if key in _SP_CACHE and _SP_CACHE[key].exists():
        return _SP_CACHE[key]
    dirpath.mkdir(parents=True, exist_ok=True)
    prefix = dirpath / f"tok{vocab_size}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = prefix.with_suffix(".model")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == vocab_size, sp.get_piece_size()
    _SP_CACHE[key] = path
    return path


def spec_with(spec: ModelSpec, **changes) -> ModelSpec:
    """A copy of spec with some fields changed (for sensitivity checks)."""
    return replace(spec, **changes)
