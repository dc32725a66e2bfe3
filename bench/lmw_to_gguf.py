#!/usr/bin/env python3
"""Write an .lmw model as an F32 GGUF, for llama.cpp to run the same weights.

    python bench/lmw_to_gguf.py MODEL.lmw OUT.gguf [--tokenizer-from ORIGINAL.gguf]
                                [--no-tokenizer] [--force]

`bench/bench.py --compare llama-cpp` needs the model as llama.cpp reads it.
Every tensor is written as float32, exactly the values llamanp computes with,
under llama.cpp's names (`wqkv` and `w13` split back into attn_q/k/v and
ffn_gate/up). Q and K need no permutation: .lmw keeps Meta's interleaved RoPE
pairs, and so does GGUF (llama.cpp's converter permutes Hugging Face's
rotate-half rows into that same layout). Llama 3.1 RoPE scaling goes out as
llama.cpp's `rope_freqs.weight` (one divisor per frequency).

The tokenizer metadata llama.cpp needs (tokenizer.ggml.*) is rebuilt from the
tokenizer the .lmw embeds:
  SentencePiece -> model "llama": its pieces, scores and piece types, read
                   from the .model protobuf, and its normalizer flags;
  tiktoken      -> model "gpt2": the ranks as GPT-2 byte-level token strings,
                   the merges that rebuild each token from two lower-ranked
                   ones, the specials as control tokens, and the
                   pre-tokenizer named after the regex when llama.cpp knows it.
--tokenizer-from copies the tokenizer.* keys of another GGUF instead (e.g. the
one the model was converted from); --no-tokenizer writes none (llama.cpp
expects one; transformers and llamanp read it without).

The file is written beside OUT and renamed at the end, so an interrupted run
never leaves a partial file.
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import llamanp  # noqa: E402
from llamanp.cliutil import ArgumentParser, run_main  # noqa: E402
from llamanp.convert.tokenizers import bytes_to_unicode  # noqa: E402
from llamanp.errors import LlamanpError  # noqa: E402

# GGUF / SentencePiece token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LlamanpError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


# --- finding the GGUF a model was converted from -------------------------------------

def find_source_gguf(lmw_path: Path, metadata: dict) -> Optional[Path]:
    """The GGUF beside `lmw_path` that the model was converted from, if its
    metadata says it came from a GGUF and one there matches: by a recorded file
    name, else by general.name and the count of tensors of each type."""
    if not str(metadata.get("source_format", "")).startswith("GGUF"):
        return None
    folder = Path(lmw_path).resolve().parent
    for key in ("source_file", "source_path", "source", "gguf_file"):
        value = metadata.get(key)
        if isinstance(value, str) and (folder / Path(value).name).is_file():
            return folder / Path(value).name
    gguf = _gguf()
    want_name = metadata.get("gguf_name")
    want_types = metadata.get("gguf_tensor_types")
    for candidate in sorted(folder.glob("*.gguf")):
        try:
            reader = gguf.GGUFReader(str(candidate))
        except Exception:   # noqa: BLE001 - not a readable GGUF: not ours
            continue
        field = reader.fields.get("general.name")
        name = field.contents() if field is not None else None
        types = Counter(t.tensor_type.name for t in reader.tensors)
        if (want_name is None or name == want_name) and \
                (want_types is None or dict(types) == dict(want_types)):
            return candidate
    return None


# --- the tokenizer -----------------------------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _protobuf_fields(buf: bytes):
    """(field number, value) of a protobuf message: ints, or bytes for
    length-delimited and fixed-width fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise LlamanpError(f"the SentencePiece model has a protobuf wire type {wire} "
                               "this reader does not know")
        yield number, value


def sentencepiece_vocab(data: bytes) -> tuple[list, list, list, bool, bool]:
    """pieces, scores, types, add_dummy_prefix, remove_extra_whitespaces of a
    SentencePiece ModelProto (pieces = field 1, normalizer_spec = field 3)."""
    pieces, scores, types = [], [], []
    add_prefix, remove_spaces = True, True   # the proto's defaults
    for number, value in _protobuf_fields(data):
        if number == 1:
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _protobuf_fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = float(np.frombuffer(v, "<f4")[0])
                elif n == 3:
                    kind = v
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 3:
            for n, v in _protobuf_fields(value):
                if n == 3:
                    add_prefix = bool(v)
                elif n == 4:
                    remove_spaces = bool(v)
    return pieces, scores, types, add_prefix, remove_spaces


def tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a byte-level BPE from its ranks: each token of two or
    more bytes is what BPE makes of its own bytes using only lower-ranked
    merges, one step before the end (two parts). In rank order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _gguf_pre_name(pattern: str) -> str:
    """llama.cpp's name for a pre-tokenizer regex ("default" when unknown)."""
    try:
        from llamanp.convert.tokenizers import _GGUF_PRE
    except ImportError:
        return "default"
    for name, (regex, _) in _GGUF_PRE.items():
        if regex == pattern:
            return name
    return "default"


def _stop_keys(td, texts: list) -> dict:
    keys = {}
    for i in td.stop_ids:
        if i == td.eos_id or not 0 <= i < len(texts):
            continue
        if texts[i] == "<|eot_id|>":
            keys["eot"] = i
        elif texts[i] == "<|eom_id|>":
            keys["eom"] = i
    return keys


def add_tokenizer(writer, td, vocab_size: int) -> list[str]:
    """Write tokenizer.ggml.* from llamanp TokenizerData; returns warnings."""
    warnings = []

    def pad(texts, types, scores=None):
        if len(texts) > vocab_size:
            raise LlamanpError(f"the tokenizer has {len(texts)} tokens but the model's vocabulary "
                               f"is {vocab_size}; use --no-tokenizer")
        for i in range(len(texts), vocab_size):
            texts.append(f"<pad_{i}>")
            types.append(UNUSED)
            if scores is not None:
                scores.append(0.0)

    if td.kind == "sentencepiece":
        pieces, scores, types, add_prefix, remove_spaces = sentencepiece_vocab(td.data)
        pad(pieces, types, scores)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(add_prefix)
        writer.add_remove_extra_whitespaces(remove_spaces)
        if UNKNOWN in types:
            writer.add_unk_token_id(types.index(UNKNOWN))
        texts = pieces
    elif td.kind == "tiktoken":
        table = bytes_to_unicode()

        def as_text(b: bytes) -> str:
            return "".join(table[x] for x in b)

        ranks = tiktoken_ranks(td.data)
        top = max([*ranks.values(), *td.extra["special_tokens"].values(),
                   *td.extra.get("added_tokens", {}).values()], default=-1)
        if top >= vocab_size:
            raise LlamanpError(f"the tokenizer has token id {top} but the model's vocabulary "
                               f"is {vocab_size}; use --no-tokenizer")
        texts: list = [None] * vocab_size
        types = [UNUSED] * len(texts)
        for token, rank in ranks.items():
            texts[rank], types[rank] = as_text(token), NORMAL
        for text, i in td.extra["special_tokens"].items():
            texts[i], types[i] = text, CONTROL
        for text, i in td.extra.get("added_tokens", {}).items():
            texts[i], types[i] = text, USER_DEFINED
        texts = [t if t is not None else f"<pad_{i}>" for i, t in enumerate(texts)]
        pre = _gguf_pre_name(td.extra["pattern"])
        if pre == "default":
            warnings.append("the pre-tokenizer regex is not one llama.cpp names; written as "
                            "'default' (token ids are unaffected, text may split differently)")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(texts)
        writer.add_token_types(types)
        writer.add_token_merges([f"{as_text(a)} {as_text(b)}" for a, b in derive_merges(ranks)])
    else:
        raise LlamanpError(f"unknown tokenizer kind {td.kind!r}")
    if td.bos_id is not None:
        writer.add_bos_token_id(td.bos_id)
    writer.add_add_bos_token(td.bos_id is not None)
    if td.eos_id is not None:
        writer.add_eos_token_id(td.eos_id)
    keys = _stop_keys(td, texts)
    if "eot" in keys:
        writer.add_eot_token_id(keys["eot"])
    if "eom" in keys:
        writer.add_eom_token_id(keys["eom"])
    if td.chat_template:
        writer.add_chat_template(td.chat_template)
    return warnings


def copy_tokenizer(writer, source: Path) -> None:
    """Every tokenizer.* key of another GGUF, values and types as they are."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    found = False
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        found = True
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(name, value, main, sub_type=sub)
        elif main == gguf.GGUFValueType.STRING:
            writer.add_key_value(name, bytes(field.parts[field.data[0]]), main)
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], main)
    if not found:
        raise LlamanpError(f"{source} has no tokenizer.* metadata to copy")


# --- the model -----------------------------------------------------------------------

def write_gguf(lmw_path, out_path, tokenizer_from=None, with_tokenizer=True,
               force=False) -> list[str]:
    """Write the F32 GGUF; returns warnings (empty when all went as planned)."""
    gguf = _gguf()
    from llamanp.model import rope_frequencies

    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise LlamanpError(f"{out_path} exists; pass --force to replace it")
    m = llamanp.load(str(lmw_path))
    cfg, t, warnings = m.config, m.file.tensors, []
    name = m.file.metadata.get("gguf_name") or Path(lmw_path).stem

    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".part", dir=out_path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)      # as a plain open() would have made it
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_string("llamanp.source", Path(lmw_path).name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if tokenizer_from is not None:
            copy_tokenizer(w, Path(tokenizer_from))
        elif with_tokenizer and m.file.tokenizer is not None:
            warnings += add_tokenizer(w, m.file.tokenizer, cfg.vocab_size)
        elif with_tokenizer:
            warnings.append("the model carries no tokenizer: none written (llama.cpp will "
                            "not load the file; give --tokenizer-from)")

        q, kv, hidden = cfg.q_dim, cfg.kv_dim, cfg.hidden_dim
        w.add_tensor("token_embd.weight", t["tok_embeddings.weight"])
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            wqkv = t[p + "attention.wqkv.weight"]
            w13 = t[p + "feed_forward.w13.weight"]
            for gname, arr in (("attn_norm", t[p + "attention_norm.weight"]),
                               ("attn_q", wqkv[:q]), ("attn_k", wqkv[q:q + kv]),
                               ("attn_v", wqkv[q + kv:]),
                               ("attn_output", t[p + "attention.wo.weight"]),
                               ("ffn_norm", t[p + "ffn_norm.weight"]),
                               ("ffn_gate", w13[:hidden]), ("ffn_up", w13[hidden:]),
                               ("ffn_down", t[p + "feed_forward.w2.weight"])):
                w.add_tensor(f"blk.{i}.{gname}.weight", np.ascontiguousarray(arr))
        w.add_tensor("output_norm.weight", t["norm.weight"])
        if not cfg.tied_embeddings:
            w.add_tensor("output.weight", t["output.weight"])
        if cfg.rope_scaling is not None:
            divisors = (rope_frequencies(cfg.head_dim, cfg.rope_theta, None)
                        / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
            w.add_tensor("rope_freqs.weight", divisors.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return warnings


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench/lmw_to_gguf.py",
                       description="Write an .lmw model as an F32 GGUF (for llama.cpp).")
    p.add_argument("src", help="the model, .lmw")
    p.add_argument("out", help="the GGUF to write")
    p.add_argument("--tokenizer-from", help="copy the tokenizer.* metadata of this GGUF "
                                            "instead of rebuilding it from the .lmw")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer metadata")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    for warning in write_gguf(args.src, args.out, args.tokenizer_from,
                              not args.no_tokenizer, args.force):
        print(f"warning: {warning}", file=sys.stderr)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
