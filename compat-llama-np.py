#!/usr/bin/env python3
# compat-llama-np: greedy Llama text generation in one short file of NumPy.
#
#     python compat-llama-np.py -w model.lmw -i "Once upon a time" [-t tokenizer.model] [-n 256]
#
# The whole engine, top to bottom, in the spirit of llama2.c's run.c:
#
#     config -> weights -> run state -> forward -> sample -> tokenizer -> main
#
# It reads the .lmw file itself (docs/lmw-format.md), imports nothing from the
# llamanp package, and prints on stdout exactly what `llama-np.py --temp 0`
# prints: the prompt, the continuation as it is generated, a newline. The maths
# is llamanp/model.py's, operation for operation, so the float32 results are
# bit-identical and greedy decoding picks the same tokens.

import argparse
import base64
import json
import math
import re
import struct
import sys
import zlib
from types import SimpleNamespace

import numpy as np


def fail(message):
    # Expected failures are one line on stderr and exit status 1, never a traceback.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------
# Config: the model's hyper-parameters, from the .lmw header (spec §2.1)
# ----------------------------------------------------------------------------

MAGIC, VERSIONS, ALIGN = b"\x89LMW\r\n\x1a\n", (1, 3), 64  # f32 files; 3 adds CRC-32s
SIZES = "dim n_layers n_heads n_kv_heads head_dim hidden_dim vocab_size max_seq_len".split()
DEFAULTS = dict(norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=2048,
                tied_embeddings=False)
SCALING = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


def read_config(fields, check):
    check(isinstance(fields, dict) and set(fields) <= set(SIZES) | set(DEFAULTS),
          "config is not an object of known fields (a newer file?)")
    c = SimpleNamespace(**{**DEFAULTS, **fields})
    bad = [n for n in SIZES if not (type(getattr(c, n, None)) is int and getattr(c, n) > 0)]
    check(not bad, f"config {bad} must be positive integers")
    check(c.n_heads % c.n_kv_heads == 0 and c.head_dim % 2 == 0,  # RoPE rotates pairs
          "n_heads must be a multiple of n_kv_heads, and head_dim even")
    check(all(type(v) in (int, float) and 0 < v < math.inf for v in (c.norm_eps, c.rope_theta))
          and type(c.tied_embeddings) is bool, "bad norm_eps, rope_theta or tied_embeddings")
    if (rs := c.rope_scaling) is not None:
        check(isinstance(rs, dict) and set(rs) <= set(SCALING)
              and rs.get("type", "llama3") == "llama3", f"unknown rope_scaling {rs!r}")
        c.rope_scaling = rs = SimpleNamespace(**{**SCALING, **rs})
        check(all(type(v) in (int, float) for k, v in vars(rs).items() if k != "type")
              and rs.factor > 0 and 0 < rs.low_freq_factor < rs.high_freq_factor
              and type(rs.original_max_position_embeddings) is int
              and rs.original_max_position_embeddings > 0, "bad rope_scaling values")
    return c


# ----------------------------------------------------------------------------
# Weights: read-only views into the memory-mapped file; nothing is copied
# ----------------------------------------------------------------------------

def expected_shapes(c):
    # Every tensor a file for config c holds (spec §2.2). wq, wk, wv are stacked in
    # one wqkv and w1 (gate), w3 (up) in one w13: one matmul instead of three or two.
    q, kv, hidden = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    block = {"attention_norm": [c.dim], "attention.wqkv": [q + 2 * kv, c.dim],
             "attention.wo": [c.dim, q], "ffn_norm": [c.dim],
             "feed_forward.w13": [2 * hidden, c.dim], "feed_forward.w2": [c.dim, hidden]}
    shapes = {"tok_embeddings.weight": [c.vocab_size, c.dim], "norm.weight": [c.dim]}
    shapes.update({f"layers.{i}.{name}.weight": shape
                   for i in range(c.n_layers) for name, shape in block.items()})
    if not c.tied_embeddings:
        shapes["output.weight"] = [c.vocab_size, c.dim]
    return shapes


def read_lmw(path):
    # Map the file and check everything spec §4 asks before using any of it.
    def check(ok, problem):
        if not ok:
            fail(f"{path}: {problem}")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        fail(f"cannot open model {path}: {getattr(e, 'strerror', None) or e}")
    check(len(mm) >= 24 and bytes(mm[:8]) == MAGIC, "not an .lmw file (too short or no magic)")
    _, version, crc, hlen = struct.unpack("<8sIIQ", bytes(mm[:24]))
    check(version in VERSIONS, f"format version {version}; this reader knows only {VERSIONS}")
    check((crc == 0 or version == 3) and 24 + hlen <= len(mm), "damaged preamble")
    # version 3: the header's CRC-32 (the tensors' ones are llamanp.verify's job)
    check(version == 1 or zlib.crc32(bytes(mm[24:24 + hlen])) == crc, "damaged header (CRC-32)")
    try:
        header = json.loads(bytes(mm[24:24 + hlen]).decode("utf-8"))
    except ValueError:  # bad UTF-8 and bad JSON both are ValueErrors
        fail(f"{path}: the header is not UTF-8 JSON")
    check(isinstance(header, dict) and {"config", "tensors"} <= set(header), "no config/tensors")
    c = read_config(header["config"], check)
    data = mm[-(-(24 + hlen) // ALIGN) * ALIGN:]  # offsets count from this 64-aligned start
    regions, want, tensors, table = [], expected_shapes(c), {}, header["tensors"]

    def region(entry, what):
        off, n = entry.get("offset"), entry.get("nbytes")
        check(type(off) is int and type(n) is int and 0 <= off and 0 <= n
              and off % ALIGN == 0 and off + n <= len(data), f"{what}: bad offset or nbytes")
        regions.append((off, n))
        return off, n

    check(isinstance(table, list) and all(isinstance(e, dict) for e in table), "bad tensor table")
    for e in table:
        name, shape = e.get("name"), e.get("shape")
        check(str(name) in want and name not in tensors, f"unexpected or repeated tensor {name!r}")
        check(e.get("dtype") == "f32", f"tensor {name} is {e.get('dtype')!r}, not f32")
        # compared as text, so that a shape of 32.0 or true is not taken for 32 or 1
        check(str(shape) == str(want[name]), f"tensor {name} has shape {shape}, not {want[name]}")
        off, n = region(e, f"tensor {name}")
        check(n == 4 * math.prod(shape), f"tensor {name}: nbytes does not match its shape")
        tensors[name] = np.frombuffer(data, "<f4", math.prod(shape), off).reshape(shape)
    check(len(tensors) == len(want), f"tensors {sorted(set(want) - set(tensors))[:3]} missing")
    tok = header.get("tokenizer")
    if tok is not None:
        check(isinstance(tok, dict), "the tokenizer section is not an object")
        off, n = region(tok, "tokenizer")
        tok = dict(tok, blob=bytes(data[off:off + n]))
    spans = sorted(regions)  # (offset, nbytes): no overlaps, and the file ends with the last
    check(all(o + n <= next_o for (o, n), (next_o, _) in zip(spans, spans[1:])),
          "two regions of the data section overlap")
    check(sum(spans[-1]) == len(data), "the file does not end where its last region does")
    return c, tensors, tok


def model_weights(c, t):
    # `.T` turns the stored [out, in] into the [in, out] that `x @ W` wants: a view, no copy.
    layer = lambda p: SimpleNamespace(  # noqa: E731
        attention_norm=t[p + "attention_norm.weight"], wqkv=t[p + "attention.wqkv.weight"].T,
        wo=t[p + "attention.wo.weight"].T, ffn_norm=t[p + "ffn_norm.weight"],
        w13=t[p + "feed_forward.w13.weight"].T, w2=t[p + "feed_forward.w2.weight"].T)
    out = t["tok_embeddings.weight" if c.tied_embeddings else "output.weight"]
    return SimpleNamespace(tok_embeddings=t["tok_embeddings.weight"], norm=t["norm.weight"],
                           layers=[layer(f"layers.{i}.") for i in range(c.n_layers)], output=out.T)


# ----------------------------------------------------------------------------
# Run state: what one sequence remembers, the keys and values of its past
# ----------------------------------------------------------------------------

class RunState:
    def __init__(self, c):
        # [layer, kv head, position, head_dim], written in place. np.empty only
        # takes memory as positions fill, so a long max_seq_len costs nothing upfront.
        shape = (c.n_layers, c.n_kv_heads, c.max_seq_len, c.head_dim)
        self.k, self.v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self.pos = 0  # positions filled so far


# ----------------------------------------------------------------------------
# Forward: one pass of the transformer, all in float32
# ----------------------------------------------------------------------------

def rmsnorm(x, weight, eps):
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * weight


def rope_frequencies(c):
    # Radians per position for each pair of a head. Llama 3.1 slows the low
    # frequencies down by `factor`, so the model reaches past its training context.
    freqs = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
    if (rs := c.rope_scaling) is None:
        return freqs
    ctx, wavelen = rs.original_max_position_embeddings, 2 * math.pi / freqs
    smooth = (ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * freqs / rs.factor + smooth * freqs
    return np.where(wavelen < ctx / rs.high_freq_factor, freqs,
                    np.where(wavelen > ctx / rs.low_freq_factor, freqs / rs.factor, blended))


def rope(x, start, freqs):
    # Rotate each interleaved pair (x[2j], x[2j+1]) of every head by position * freqs[j].
    angles = np.outer(np.arange(start, start + len(x), dtype=np.float64), freqs)[:, None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    a, b, out = x[..., 0::2], x[..., 1::2], np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # minus the max: exp cannot overflow
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, keys, values, start):
    # Causal grouped-query attention; q [T, heads, hd], keys/values [kv_heads, S, hd].
    # Query head h reads kv head h // group: stacking each group's queries on their
    # kv head makes it one batched matmul, without repeating (copying) the cache.
    (T, n_heads, hd), (n_kv, S, _) = q.shape, keys.shape
    group = n_heads // n_kv
    q = q.reshape(T, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * T, hd)
    scores = (q @ keys.transpose(0, 2, 1)).reshape(n_kv, group, T, S)
    scores *= np.float32(1.0 / math.sqrt(hd))
    scores[..., np.arange(S) > np.arange(start, start + T)[:, None]] = -np.inf  # the future
    out = softmax(scores.reshape(n_kv, group * T, S)) @ values
    return out.reshape(n_kv, group, T, hd).transpose(2, 0, 1, 3).reshape(T, n_heads * hd)


def swiglu(gate_up):
    gate, up = np.split(gate_up, 2, axis=-1)
    with np.errstate(over="ignore"):  # exp(-gate) = inf only makes silu(gate) -0: fine
        return gate / (1.0 + np.exp(-gate)) * up


def forward(tokens, state, c, w, freqs):
    # Run tokens (at positions state.pos...) through the model; the last one's logits.
    T, p, hd = len(tokens), state.pos, c.head_dim
    q_end, k_end = c.n_heads * hd, (c.n_heads + c.n_kv_heads) * hd
    x = w.tok_embeddings[np.asarray(tokens, dtype=np.intp)]  # [T, dim]: a copy we add into
    for i, layer in enumerate(w.layers):
        qkv = rmsnorm(x, layer.attention_norm, c.norm_eps) @ layer.wqkv
        q = rope(qkv[:, :q_end].reshape(T, c.n_heads, hd), p, freqs)
        k = rope(qkv[:, q_end:k_end].reshape(T, c.n_kv_heads, hd), p, freqs)
        state.k[i, :, p:p + T] = k.transpose(1, 0, 2)
        state.v[i, :, p:p + T] = qkv[:, k_end:].reshape(T, c.n_kv_heads, hd).transpose(1, 0, 2)
        x += attention(q, state.k[i, :, :p + T], state.v[i, :, :p + T], p) @ layer.wo
        x += swiglu(rmsnorm(x, layer.ffn_norm, c.norm_eps) @ layer.w13) @ layer.w2
    state.pos += T
    return (rmsnorm(x[-1:], w.norm, c.norm_eps) @ w.output)[0]


# ----------------------------------------------------------------------------
# Sample: greedy, until a stop token, n tokens, or the end of the context
# ----------------------------------------------------------------------------

def generate(ids, n, stop_ids, c, w):
    state, freqs, batch = RunState(c), rope_frequencies(c), ids
    # The prompt goes in as one batch (prefill), then each new token on its own.
    while n > 0:
        token = int(np.argmax(forward(batch, state, c, w, freqs)))  # greedy: the most likely
        if token in stop_ids or state.pos >= c.max_seq_len:  # no position left for it
            return
        yield token
        n, batch = n - 1, [token]


# ----------------------------------------------------------------------------
# Tokenizer: the library each model was trained with, plus ids from the file
# ----------------------------------------------------------------------------

# Meta's Llama 3 pre-tokenizer regex and special tokens: a bare tiktoken ranks
# file (-t) holds neither, so they are these constants.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = [f"<|{name}|>" for name in (
    "begin_of_text end_of_text reserved_special_token_0 reserved_special_token_1 "
    "finetune_right_pad_id step_id start_header_id end_header_id eom_id eot_id python_tag image "
    ).split() + [f"reserved_special_token_{i}" for i in range(2, 246)]]  # 256 in all


def sentencepiece_tokenizer(blob, source, ids=None):
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=blob)
    except RuntimeError:
        fail(f"{source} is not a valid SentencePiece model")
    bos, eos = sp.bos_id(), sp.eos_id()  # a bare .model file: its own ids (-1: none)
    bos_id, stop_ids = ids or (bos if bos >= 0 else None, [eos] if eos >= 0 else [])
    # sp.decode drops the space of the text's first piece (the encoder put it
    # there), but a continuation is not the start of a text: decode it after an
    # anchor piece with visible text, then cut the anchor's text off again.
    anchor = next(i for i in range(sp.vocab_size()) if sp.decode([i]) and not (
        sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i)))
    skip = len(sp.decode([anchor]))
    return SimpleNamespace(encode=sp.encode, decode=lambda ids: sp.decode([anchor] + ids)[skip:],
                           n_vocab=sp.vocab_size(), bos_id=bos_id, stop_ids=set(stop_ids))


def tiktoken_tokenizer(blob, source, pattern, specials, bos_id, stop_ids):
    import tiktoken
    try:  # a ranks file has one `base64(token) rank` per line
        ranks = {base64.b64decode(t, validate=True): int(r)
                 for t, r in (line.split(b" ") for line in blob.splitlines() if line)}
        enc = tiktoken.Encoding("compat", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
    except ValueError as e:  # bad lines, bad base64, bad specials are all ValueErrors
        fail(f"{source} is not a valid tiktoken tokenizer ({e})")
    # Special-token text typed in a prompt is plain text, never a control token.
    return SimpleNamespace(encode=lambda s: enc.encode(s, disallowed_special=()),
                           decode=lambda ids: enc.decode(ids, errors="replace"),
                           n_vocab=enc.n_vocab, bos_id=bos_id, stop_ids=set(stop_ids))


def embedded_tokenizer(h, source):
    if h is None:
        fail(f"{source} is missing: the model embeds none; pass -t TOKENIZER")
    ids = (h.get("bos_id"), h.get("stop_ids") or [])
    if h.get("kind") == "sentencepiece":
        return sentencepiece_tokenizer(h["blob"], source, ids)
    extra = h.get("extra") or {}
    if h.get("kind") != "tiktoken" or not {"pattern", "special_tokens"} <= set(extra):
        fail(f"{source} is of an unknown kind {h.get('kind')!r}")
    return tiktoken_tokenizer(h["blob"], source, extra["pattern"], extra["special_tokens"], *ids)


def tokenizer_file(path):
    # -t: a tiktoken ranks file (taken to be Llama 3's) or a SentencePiece .model.
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        fail(f"cannot read tokenizer file {path}: {e.strerror}")
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* [0-9]+\r?", blob.split(b"\n", 1)[0]):
        n_ranks = len(blob.split()) // 2  # the specials' ids follow the ranks
        specials = {name: n_ranks + i for i, name in enumerate(LLAMA3_SPECIALS)}
        stops = [specials[s] for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        return tiktoken_tokenizer(blob, path, LLAMA3_PATTERN, specials, n_ranks, stops)
    if blob[:1] != b"\x0a":  # a SentencePiece ModelProto opens with field 1, a piece
        fail(f"tokenizer file {path} is neither a SentencePiece model nor a tiktoken file")
    return sentencepiece_tokenizer(blob, path)


# ----------------------------------------------------------------------------
# Main: prompt -> ids -> generated ids -> text on stdout
# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="Greedy text generation with an .lmw model.")
    ap.add_argument("-w", "--weights", required=True, metavar="MODEL.lmw")
    ap.add_argument("-i", "--prompt", required=True)
    ap.add_argument("-t", "--tokenizer", metavar="PATH", help="overrides the embedded one")
    ap.add_argument("-n", "--n-tokens", type=int, default=256, metavar="N")
    args = ap.parse_args()
    if args.n_tokens < 0 or not args.prompt or re.search("[\ud800-\udfff]", args.prompt):
        fail("-n must be >= 0, and the prompt non-empty UTF-8 text")  # (argv may be any bytes)
    c, tensors, tok_header = read_lmw(args.weights)
    tok = (tokenizer_file(args.tokenizer) if args.tokenizer
           else embedded_tokenizer(tok_header, f"{args.weights}'s tokenizer"))
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(args.prompt)
    if not 0 < len(ids) <= c.max_seq_len or max(ids) >= c.vocab_size:
        fail(f"the prompt's {len(ids)} tokens do not fit the model's context or vocabulary")

    print(args.prompt, end="", flush=True)
    generated, shown = [], ""
    for token in generate(ids, args.n_tokens, tok.stop_ids, c, model_weights(c, tensors)):
        if token >= tok.n_vocab:
            fail(f"token id {token} is outside the tokenizer's vocabulary")
        generated.append(token)
        # Re-decoding the whole continuation keeps the library's exact rules. A
        # character split over byte tokens reads U+FFFD until its last byte comes,
        # so such a tail is held back rather than printed twice.
        ready = tok.decode(generated).rstrip("\ufffd")
        print(ready[len(shown):], end="", flush=True)
        shown = ready
    print(tok.decode(generated)[len(shown):])


if __name__ == "__main__":
    main()
