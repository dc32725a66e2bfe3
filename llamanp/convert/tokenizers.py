"""Tokenizers carried by Hugging Face and GGUF checkpoints, as llamanp tokenizers.

Two public functions:

* :func:`tokenizer_from_hf_files` reads a Hugging Face checkpoint directory:
  its ``tokenizer.json`` (with ``tokenizer_config.json``,
  ``generation_config.json`` and ``chat_template.jinja`` when present), or its
  SentencePiece ``tokenizer.model``.
* :func:`tokenizer_from_gguf` reads the ``tokenizer.*`` keys of a GGUF file.

Both return a :class:`~llamanp.tokenizer.TokenizerData` of one of llamanp's two
kinds, so that the libraries llamanp runs on (tiktoken, sentencepiece) produce
the same ids as the reference tokenizers:

Byte-level BPE (GPT-2, SmolLM, Llama 3 style) becomes tiktoken ranks. Each
token string is mapped through GPT-2's byte <-> unicode table to its raw bytes,
and the token id becomes its tiktoken rank. tiktoken uses that rank as the
merge priority too, so the ids must grow with the merge order; this is
checked, along with the other conditions under which tiktoken's algorithm
gives the same tokens as Hugging Face's merge list (see ``_byte_level_ranks``).
The pre-tokenizer becomes one regex. Special tokens become tiktoken specials
(decoded to their text, never produced from user text); non-special added
tokens are also recognised in user text, as Hugging Face and llama.cpp do.

SentencePiece vocabularies stay SentencePiece: a GGUF's tokens, scores and
token types are written back into a SentencePiece ``ModelProto`` by a small
protobuf encoder here, and sentencepiece loads it.

Anything that cannot be expressed exactly is refused by name with a one-line
:class:`LlamanpError`, rather than tokenized differently.
"""

from __future__ import annotations

import base64
import json
import operator
import os
import struct
from pathlib import Path
from typing import Optional

from .. import inputfile
from ..errors import LlamanpError
from ..tokenizer import LLAMA3_PATTERN, TokenizerData, merge_pairs, read_tokenizer_file

__all__ = ["tokenizer_from_hf_files", "tokenizer_from_gguf"]

# -- pre-tokenizer regexes -----------------------------------------------------

# GPT-2's pre-tokenizer, which Hugging Face's ByteLevel(use_regex=true) applies.
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                r"|\s+(?!\S)|\s+")

# Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)] (SmolLM,
# StarCoder): each digit is split off first, then GPT-2's regex runs inside
# each piece between digits. As one regex: a digit is a piece of its own, and
# GPT-2's alternatives are kept, except that
#  * " ?\p{N}+" goes (a space before a digit ends the piece before it), and
#  * whitespace may end right before a digit: "\s+(?!\S)" sees the end of its
#    piece there, so in the whole text its lookahead must let a digit pass.
SINGLE_DIGITS_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                         r"|\s+(?![^\s\p{N}])|\s+")

# The same with Digits(individual_digits=false): a run of digits is one piece.
DIGIT_RUNS_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+"
                      r"|\s+(?![^\s\p{N}])|\s+")

# Qwen2's Split regex: Llama 3's with single digits.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# Split regexes (Hugging Face "Split" pre-tokenizer, behaviour Isolated) that
# llamanp knows to match every character: tiktoken drops what no match covers,
# where Hugging Face keeps it as a piece, so only such regexes are safe.
_KNOWN_SPLIT_REGEXES = {LLAMA3_PATTERN: "Llama 3", GPT2_PATTERN: "GPT-2",
                        QWEN2_PATTERN: "Qwen2"}

# GGUF "tokenizer.ggml.pre" names (llama.cpp's) whose regexes llamanp expresses,
# with whether llama.cpp looks a whole piece up in the vocabulary first
# (ignore_merges, as Hugging Face's Llama 3 tokenizer does).
_GGUF_PRE = {
    "gpt-2": (GPT2_PATTERN, False),
    "smollm": (SINGLE_DIGITS_PATTERN, False),
    "starcoder": (SINGLE_DIGITS_PATTERN, False),
    "refact": (SINGLE_DIGITS_PATTERN, False),
    "llama3": (LLAMA3_PATTERN, True),
    "llama-v3": (LLAMA3_PATTERN, True),
    "llama-bpe": (LLAMA3_PATTERN, True),
}

# GGUF token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Turn-ending tokens that are stop ids whenever the vocabulary has them.
_TURN_ENDS = ("<|eot_id|>", "<|eom_id|>")
_CHATML_END = "<|im_end|>"           # a stop id when the chat template uses it


# -- GPT-2's byte <-> unicode table ----------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other
    68 bytes for the code points from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0x100
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def _raw_bytes(token: str) -> Optional[bytes]:
    """The bytes a byte-level token string stands for; None if a character is
    outside the table (such a token is no BPE token)."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return None


def _decoded_bytes(token: str) -> bytes:
    """What Hugging Face's ByteLevel decoder makes of a token: its raw bytes if
    every character is in the table, else the token's own UTF-8 text."""
    raw = _raw_bytes(token)
    return raw if raw is not None else token.encode("utf-8")


# -- byte-level BPE -> tiktoken --------------------------------------------------


class _AddedToken:
    """A token outside BPE's reach: a special or added token in HF terms."""

    def __init__(self, content: str, special: bool, flags: tuple = ()):
        self.content = content
        self.special = special
        self.flags = flags          # names of lstrip/rstrip/single_word that are set


def _byte_level_data(*, source: str, vocab: dict[int, str], added: dict[int, _AddedToken],
                     merges: list[tuple[str, str]], pattern: str, ignore_merges: bool,
                     bos_id: Optional[int], eos_id: Optional[int], stop_ids: list[int],
                     chat_template: Optional[str]) -> TokenizerData:
    """Build a tiktoken TokenizerData from a byte-level BPE vocabulary.

    vocab: id -> token string (GPT-2 byte-level form), the BPE model's tokens;
    added: id -> added token (may share ids with vocab; then it takes over).
    """
    ranks, specials, matched = _byte_level_ranks(source, vocab, added, merges, ignore_merges)
    n = len(ranks) + len(specials)
    lines = sorted((rank, token) for token, rank in ranks.items())
    data = "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in lines).encode()
    extra = {"pattern": pattern, "special_tokens": specials}
    if matched:
        extra["added_tokens"] = matched
    for name, id in (("BOS", bos_id), ("EOS", eos_id)):
        if id is not None and not 0 <= id < n:
            raise LlamanpError(f"{source}: the {name} token id {id} is outside the "
                               f"vocabulary (0..{n - 1})")
    stops = _dedupe(i for i in stop_ids if i is not None and 0 <= i < n)
    td = TokenizerData(kind="tiktoken", data=data, bos_id=bos_id, eos_id=eos_id,
                       stop_ids=stops, extra=extra, chat_template=chat_template)
    td.validate()
    return td


def _byte_level_ranks(source, vocab, added, merges, ignore_merges):
    """Ranks, specials and matched added tokens for tiktoken, or LlamanpError.

    tiktoken encodes a piece by (1) taking it whole if it is a token, else
    (2) merging, again and again, the adjacent pair whose concatenation is the
    token of lowest rank. Hugging Face merges the adjacent pair that comes
    first in its merge list (and does (1) only with ignore_merges). These agree
    when, as is checked here:
      * the ids of the merges' results grow with the merge order, so "lowest
        rank" and "first merge" pick the same pair;
      * every token of two or more bytes is some merge's result (tiktoken
        could otherwise build a token Hugging Face never does); a token that
        is not becomes a special token, which decodes the same and which
        plain text never yields, when Hugging Face cannot yield it either;
      * without ignore_merges, each token's own bytes merge back into that
        token, so (1) changes nothing.
    """
    n = 1 + max([*vocab, *added], default=-1)
    missing_ids = [i for i in range(n) if i not in vocab and i not in added]
    if missing_ids:
        raise LlamanpError(f"{source}: token ids are not contiguous (no token has id "
                           f"{missing_ids[0]}); llamanp needs ids 0..{n - 1}")

    by_text: dict[str, int] = {}
    for id, text in vocab.items():
        if by_text.setdefault(text, id) != id:
            raise LlamanpError(f"{source}: the vocabulary has {text!r} twice "
                               f"(ids {by_text[text]} and {id})")

    raw_of = {text: _raw_bytes(text) for text in by_text}

    # Merges: their parts and results must be byte-level tokens.
    results: dict[str, int] = {}          # result token -> first merge index
    merge_rank: dict[tuple[bytes, bytes], int] = {}
    last_id = -1
    for index, (a, b) in enumerate(merges):
        for part in (a, b, a + b):
            if raw_of.get(part) is None:
                what = "in the vocabulary" if part not in by_text else "a byte-level token"
                raise LlamanpError(f"{source}: merge #{index} ({a} {b}) uses {part!r}, "
                                   f"which is not {what}")
        id = by_text[a + b]
        if id < last_id:
            raise LlamanpError(
                f"{source}: merge #{index} ({a} {b}) makes token id {id}, but an earlier merge "
                f"made id {last_id}; tiktoken ranks merges by token id, so the ids must follow "
                "the merge order, and this vocabulary cannot be expressed with it")
        results.setdefault(a + b, index)
        last_id = id
        merge_rank.setdefault((raw_of[a], raw_of[b]), index)

    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    matched: dict[str, int] = {}

    def add_special(id: int, text: str, what: str) -> None:
        raw = _decoded_bytes(text)
        try:
            shown = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LlamanpError(f"{source}: {what} {text!r} (id {id}) decodes to bytes that "
                               "are not UTF-8 text, which tiktoken cannot hold") from None
        if shown in specials:
            raise LlamanpError(f"{source}: tokens {specials[shown]} and {id} both decode to "
                               f"{shown!r}, which tiktoken cannot hold")
        specials[shown] = id

    for id in range(n):
        token = added.get(id)
        text = vocab.get(id)
        if token is not None:
            if not token.special:
                if token.flags:
                    raise LlamanpError(
                        f"{source}: added token {token.content!r} sets {'/'.join(token.flags)}, "
                        "which llamanp does not support")
                matched[token.content] = id
            raw = raw_of.get(text) if text is not None else None
            if raw is not None and (len(raw) == 1 or text in results):
                # BPE can make this id too: it stays a rank, decoded from the vocabulary.
                if _decoded_bytes(token.content) != raw_of[text]:
                    raise LlamanpError(f"{source}: added token {token.content!r} has id {id}, "
                                       f"which the merges make as {text!r}")
                ranks[raw_of[text]] = id
            else:
                add_special(id, token.content, "added token")
            continue
        raw = raw_of[text]
        if raw is not None and (len(raw) == 1 or text in results):
            ranks[raw] = id
        elif ignore_merges and raw is not None:
            raise LlamanpError(f"{source}: token {text!r} (id {id}) is no merge's result; with "
                               "ignore_merges tiktoken would build it where the reference "
                               "does not")
        else:
            # No merge makes it, so only decoding can meet it: a special decodes alike.
            add_special(id, text, "token")

    if not ignore_merges:
        for text in results:
            raw = raw_of[text]
            if _merge_list_bpe(raw, merge_rank) != [raw]:
                raise LlamanpError(
                    f"{source}: token {text!r} does not encode to itself with the merges, so "
                    "tiktoken (which takes a piece that is a token whole) would differ")
    return ranks, specials, matched


def _merge_list_bpe(piece: bytes, merge_rank: dict) -> list[bytes]:
    """Hugging Face's BPE on one piece: merge the adjacent pair listed first."""
    return merge_pairs(piece, lambda a, b: merge_rank.get((a, b)))


def _dedupe(ids) -> list[int]:
    out = []
    for i in ids:
        if i not in out:
            out.append(i)
    return out


# -- SentencePiece ModelProto, written by hand -----------------------------------
# Field numbers from sentencepiece's sentencepiece_model.proto:
#   ModelProto: pieces = 1, trainer_spec = 2, normalizer_spec = 3
#   SentencePiece: piece = 1, score = 2 (float), type = 3 (enum)
#   TrainerSpec: model_type = 3 (UNIGRAM 1, BPE 2), vocab_size = 4,
#     byte_fallback = 35, unk_id = 40, bos_id = 41, eos_id = 42, pad_id = 43,
#     unk_piece = 45, bos_piece = 46, eos_piece = 47, pad_piece = 48
#   NormalizerSpec: name = 1, add_dummy_prefix = 3,
#     remove_extra_whitespaces = 4, escape_whitespaces = 5

_SP_BPE = 2


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64                    # negative int32: ten bytes, two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _pb_bytes(field: int, value) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _sp_piece(piece: str, score: float, type: int) -> bytes:
    body = _pb_bytes(1, piece) + _pb_float(2, score) + _pb_int(3, type)
    return _pb_bytes(1, body)


def _sentencepiece_model(pieces: list[tuple[str, float, int]], *, unk_id: int,
                         bos_id: Optional[int], eos_id: Optional[int],
                         add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """A BPE SentencePiece model with the identity normalizer, as llama.cpp's SPM
    tokenizer works: merges by piece score, byte fallback if there are byte pieces."""
    def piece_id(field_id, field_piece, id):
        if id is None:
            return _pb_int(field_id, -1)
        return _pb_int(field_id, id) + _pb_bytes(field_piece, pieces[id][0])

    trainer = (_pb_int(3, _SP_BPE) + _pb_int(4, len(pieces))
               + _pb_int(35, any(t == BYTE for _, _, t in pieces))
               + piece_id(40, 45, unk_id) + piece_id(41, 46, bos_id)
               + piece_id(42, 47, eos_id) + _pb_int(43, -1))      # pad_id: none
    normalizer = (_pb_bytes(1, "identity") + _pb_int(3, add_dummy_prefix)
                  + _pb_int(4, remove_extra_whitespaces) + _pb_int(5, True))
    out = bytearray()
    for piece in pieces:
        out += _sp_piece(*piece)
    out += _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
    return bytes(out)


def _sentencepiece_data(source: str, data: bytes, bos_id, eos_id, stop_ids,
                        chat_template) -> TokenizerData:
    td = TokenizerData(kind="sentencepiece", data=data, bos_id=bos_id, eos_id=eos_id,
                       stop_ids=_dedupe(i for i in stop_ids if i is not None),
                       extra={}, chat_template=chat_template)
    td.validate()
    # Let sentencepiece itself judge the model now, not when the .lmw is used.
    from ..tokenizer import Tokenizer
    try:
        Tokenizer.from_data(td)
    except LlamanpError as e:
        raise LlamanpError(f"{source}: {e}") from None
    return td


# -- GGUF ------------------------------------------------------------------------


def tokenizer_from_gguf(meta: dict) -> Optional[TokenizerData]:
    """The tokenizer in a GGUF file's metadata, or None if it carries none.

    meta maps GGUF keys to Python values (strings as str, arrays as lists).
    Supports tokenizer.ggml.model "gpt2" (byte-level BPE, with the
    pre-tokenizers in _GGUF_PRE) and "llama" (SentencePiece).
    """
    model = meta.get("tokenizer.ggml.model")
    if model is None or model == "none":
        return None
    source = "GGUF tokenizer"
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens \
            or not all(isinstance(t, str) for t in tokens):
        raise LlamanpError(f"{source}: tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    types = _gguf_list(meta, "tokenizer.ggml.token_type", n, int, default=NORMAL)
    template = meta.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None

    def token_id(key):
        v = meta.get(key)
        if v is None:
            return None
        try:
            i = operator.index(v) if not isinstance(v, bool) else -1
        except TypeError:
            i = -1
        if not 0 <= i < n:
            raise LlamanpError(f"{source}: {key} is {v!r}, not a token id below {n}")
        return i

    bos, eos, unk = (token_id(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown"))
    turn_ends = [token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")]
    stops = [eos, *turn_ends]
    if template and _CHATML_END in template and _CHATML_END in tokens:
        stops.append(tokens.index(_CHATML_END))

    if model == "llama":
        add_bos = _gguf_bool(meta, "tokenizer.ggml.add_bos_token", True)
        scores = _gguf_list(meta, "tokenizer.ggml.scores", n, float, default=0.0)
        pieces = [(t, float(s), ty if ty in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED,
                                             UNUSED, BYTE) else NORMAL)
                  for t, s, ty in zip(tokens, scores, types)]
        if unk is not None and not any(ty == UNKNOWN for _, _, ty in pieces):
            pieces[unk] = (pieces[unk][0], pieces[unk][1], UNKNOWN)
        unknowns = [i for i, (_, _, ty) in enumerate(pieces) if ty == UNKNOWN]
        if len(unknowns) != 1:
            raise LlamanpError(f"{source}: a SentencePiece vocabulary needs exactly one "
                               f"unknown token, this one has {len(unknowns)}")
        data = _sentencepiece_model(
            pieces, unk_id=unknowns[0], bos_id=bos, eos_id=eos,
            add_dummy_prefix=_gguf_bool(meta, "tokenizer.ggml.add_space_prefix", True),
            remove_extra_whitespaces=_gguf_bool(
                meta, "tokenizer.ggml.remove_extra_whitespaces", False))
        return _sentencepiece_data(source, data, bos if add_bos else None, eos, stops, template)

    if model != "gpt2":
        raise LlamanpError(f"{source}: tokenizer.ggml.model {model!r} is not supported "
                           "(llamanp reads 'llama' SentencePiece and 'gpt2' byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None or pre == "default":
        raise LlamanpError(f"{source}: the file names no pre-tokenizer (tokenizer.ggml.pre is "
                           f"{pre!r}), so the regex that splits text is unknown; re-convert the "
                           "model with a newer llama.cpp")
    if pre not in _GGUF_PRE:
        raise LlamanpError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
                           f"supported; llamanp knows {', '.join(sorted(_GGUF_PRE))}")
    pattern, ignore_merges = _GGUF_PRE[pre]
    add_bos = _gguf_bool(meta, "tokenizer.ggml.add_bos_token", ignore_merges)
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, (list, tuple)):
        raise LlamanpError(f"{source}: tokenizer.ggml.merges is missing")
    vocab, added = {}, {}
    for id, (text, ty) in enumerate(zip(tokens, types)):
        if ty == NORMAL:
            vocab[id] = text
        elif ty in (CONTROL, UNKNOWN, UNUSED):
            added[id] = _AddedToken(text, special=True)
        elif ty == USER_DEFINED:
            added[id] = _AddedToken(text, special=False)
        else:
            raise LlamanpError(f"{source}: token {text!r} (id {id}) has type {ty}, which a "
                               "byte-level BPE vocabulary does not use")
    return _byte_level_data(
        source=source, vocab=vocab, added=added,
        merges=[_split_merge(m, i, source) for i, m in enumerate(merges)],
        pattern=pattern, ignore_merges=ignore_merges, bos_id=bos if add_bos else None,
        eos_id=eos, stop_ids=stops, chat_template=template)


def _gguf_list(meta, key, n, kind, default):
    v = meta.get(key)
    if v is None:
        return [default] * n
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise LlamanpError(f"GGUF tokenizer: {key} must be a list of {n} values, one per token")
    try:
        return [kind(x) for x in v]
    except (TypeError, ValueError):
        raise LlamanpError(f"GGUF tokenizer: {key} holds a value that is no "
                           f"{kind.__name__}") from None


def _gguf_bool(meta, key, default: bool) -> bool:
    v = meta.get(key)
    return default if v is None else bool(v)


def _split_merge(merge, index: int, source: str) -> tuple[str, str]:
    """A merge is "a b" (byte-level tokens hold no spaces) or, in newer JSON, [a, b]."""
    if isinstance(merge, str):
        parts = merge.split(" ")
    elif isinstance(merge, (list, tuple)):
        parts = list(merge)
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise LlamanpError(f"{source}: merge #{index} {merge!r} is not a pair of tokens")
    return parts[0], parts[1]


# -- Hugging Face ----------------------------------------------------------------


def tokenizer_from_hf_files(directory) -> Optional[TokenizerData]:
    """The tokenizer of a Hugging Face checkpoint directory, or None if it has none.

    A byte-level BPE tokenizer.json becomes tiktoken ranks. A SentencePiece
    tokenizer.model is used as it is (preferred for Llama 2 style checkpoints,
    whose tokenizer.json is derived from it), with the added tokens that
    tokenizer.json numbers after its pieces appended. tokenizer_config.json
    gives the chat template, BOS/EOS by text and add_bos_token;
    generation_config.json's eos_token_id adds stop ids. The BOS id is null
    when the reference tokenizer adds no BOS.
    """
    d = Path(directory)
    json_path, sp_path = d / "tokenizer.json", d / "tokenizer.model"
    has_json, has_sp = json_path.is_file(), sp_path.is_file()
    if not has_json and not has_sp:
        return None
    config = _read_json(d / "tokenizer_config.json", required=False) or {}
    if not isinstance(config, dict):
        raise LlamanpError(f"{d / 'tokenizer_config.json'} is not a JSON object")
    tj = _read_json(json_path, required=True) if has_json else None
    if tj is not None and not isinstance(tj, dict):
        raise LlamanpError(f"{json_path} is not a JSON object")
    template = _chat_template(d, config)
    gen_eos = _generation_eos(d)

    model = (tj or {}).get("model")
    if tj is not None and not isinstance(model, dict):
        raise LlamanpError(f"{json_path} has no model section")
    kind = model.get("type", "BPE" if "merges" in model else None) if model else None
    if tj is None or kind != "BPE" or _is_sentencepiece_style(tj):
        if has_sp:
            return _hf_sentencepiece(d, sp_path, tj, config, template, gen_eos)
        if kind != "BPE":
            raise LlamanpError(f"{json_path}: the tokenizer model is {kind!r}; llamanp supports "
                               "byte-level BPE, or SentencePiece from a tokenizer.model")
        raise LlamanpError(f"{json_path} is a SentencePiece-style BPE (byte fallback, '▁' for "
                           "spaces); llamanp needs the tokenizer.model it was made from "
                           "beside it")
    return _hf_byte_level(json_path, tj, config, template, gen_eos)


def _read_json(path: Path, required: bool):
    if not os.path.lexists(path):
        if required:
            raise LlamanpError(f"{path} does not exist")
        return None
    return inputfile.load(path)       # bounded: size, nesting, digits; regular files only


def _chat_template(d: Path, config: dict) -> Optional[str]:
    t = config.get("chat_template")
    if isinstance(t, list):          # named templates: [{"name": ..., "template": ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default", next(iter(named.values()), None))
    if isinstance(t, str):
        return t
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlamanpError(f"cannot read {jinja}: {e}") from None
    return None


def _generation_eos(d: Path) -> list[int]:
    g = _read_json(d / "generation_config.json", required=False)
    v = g.get("eos_token_id") if isinstance(g, dict) else None
    v = v if isinstance(v, list) else [v]
    return [i for i in v if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


def _token_text(v) -> Optional[str]:
    """tokenizer_config's bos_token/eos_token: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _is_sentencepiece_style(tj: dict) -> bool:
    """A tokenizer.json converted from SentencePiece: byte fallback, '▁' for spaces."""
    model = tj.get("model") or {}
    if model.get("byte_fallback"):
        return True
    parts = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")],
                       ensure_ascii=False)
    return "▁" in parts or '"Metaspace"' in parts


def _hf_sentencepiece(d, sp_path, tj, config, template, gen_eos) -> TokenizerData:
    td = read_tokenizer_file(sp_path)
    if td.kind != "sentencepiece":          # a Llama 3 tiktoken file named tokenizer.model
        td.chat_template = template
        return td
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=td.data)
    n = sp.vocab_size()
    # Added tokens numbered after the pieces (a fine-tune's "<|im_start|>") are
    # appended as pieces: special ones as control pieces, others user-defined,
    # which sentencepiece recognises in text as Hugging Face does.
    extra = {}
    for tok in (tj or {}).get("added_tokens") or []:
        if not isinstance(tok, dict):
            continue
        id, content = tok.get("id"), tok.get("content")
        if isinstance(id, int) and id >= n and isinstance(content, str):
            extra[id] = (content, CONTROL if tok.get("special") else USER_DEFINED)
    if extra:
        if sorted(extra) != list(range(n, n + len(extra))):
            raise LlamanpError(f"{d / 'tokenizer.json'}: the added tokens after the "
                               f"SentencePiece pieces do not number {n}.. without gaps")
        for id, (content, _) in extra.items():
            if sp.piece_to_id(content) != sp.unk_id() or content == sp.id_to_piece(sp.unk_id()):
                raise LlamanpError(f"{d / 'tokenizer.json'}: added token {content!r} is "
                                   "already a SentencePiece piece")
        data = td.data + b"".join(_sp_piece(c, 0.0, ty) for _, (c, ty) in sorted(extra.items()))
    else:
        data = td.data

    def lookup(text):
        if text is None:
            return None
        for id, (content, _) in extra.items():
            if content == text:
                return id
        i = sp.piece_to_id(text)
        return i if sp.id_to_piece(i) == text else None

    bos = lookup(_token_text(config.get("bos_token")))
    bos = bos if bos is not None else td.bos_id
    eos = lookup(_token_text(config.get("eos_token")))
    eos = eos if eos is not None else td.eos_id
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _template_bos(tj) is not None if tj is not None else True
    stops = [eos, *gen_eos, *(lookup(t) for t in _TURN_ENDS)]
    if template and _CHATML_END in template:
        stops.append(lookup(_CHATML_END))
    total = n + len(extra)
    return _sentencepiece_data(str(sp_path), data, bos if add_bos else None, eos,
                               [i for i in stops if i is not None and i < total], template)


def _template_bos(tj: dict) -> Optional[str]:
    """The special token a TemplateProcessing post-processor puts first, if any."""
    post = tj.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            first = single[0] if single else {}
            if isinstance(first, dict) and "SpecialToken" in first:
                return first["SpecialToken"].get("id")
    return None


def _describe(step) -> str:
    if not isinstance(step, dict):
        return repr(step)
    kind = step.get("type", "?")
    if kind == "Sequence":
        inner = step.get("pretokenizers", step.get("normalizers", step.get("decoders", [])))
        return f"Sequence[{', '.join(_describe(s) for s in inner)}]"
    return kind


def _hf_pattern(source: str, pre) -> str:
    """The one regex equivalent to a byte-level tokenizer.json's pre-tokenizer."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" \
        else [pre]
    name = _describe(pre) if pre is not None else "none"

    def refuse(why=""):
        raise LlamanpError(f"{source}: pre-tokenizer {name}{why} cannot be expressed as one "
                           "tiktoken regex; llamanp supports ByteLevel, Sequence[Digits, "
                           "ByteLevel] and Sequence[Split(known regex), ByteLevel]")

    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        refuse()
    *head, last = steps
    if last.get("type") != "ByteLevel":
        refuse()
    if last.get("add_prefix_space", True):
        refuse(" (ByteLevel with add_prefix_space)")
    use_regex = last.get("use_regex", True)
    if not head and use_regex:
        return GPT2_PATTERN
    if len(head) == 1 and head[0].get("type") == "Digits" and use_regex:
        return SINGLE_DIGITS_PATTERN if head[0].get("individual_digits") else DIGIT_RUNS_PATTERN
    if len(head) == 1 and head[0].get("type") == "Split" and not use_regex:
        split = head[0]
        pattern = split.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if split.get("behavior") != "Isolated" or split.get("invert"):
            refuse(f" (Split with behavior {split.get('behavior')!r}, "
                   f"invert {split.get('invert')!r})")
        if regex not in _KNOWN_SPLIT_REGEXES:
            shown = regex if regex is None or len(regex) < 60 else regex[:57] + "..."
            refuse(f" (Split regex {shown!r} is not one llamanp knows to cover every character)")
        return regex
    refuse()


def _hf_byte_level(path: Path, tj: dict, config: dict, template, gen_eos) -> TokenizerData:
    source = str(path)
    model = tj["model"]
    normalizer = tj.get("normalizer")
    if normalizer is not None and not (isinstance(normalizer, dict)
                                       and normalizer.get("type") == "Sequence"
                                       and not normalizer.get("normalizers")):
        raise LlamanpError(f"{source}: normalizer {_describe(normalizer)} is not supported "
                           "(tiktoken has no normalizer)")
    decoder = tj.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise LlamanpError(f"{source}: decoder {_describe(decoder)} is not supported; a "
                           "byte-level BPE needs the ByteLevel decoder")
    pattern = _hf_pattern(source, tj.get("pre_tokenizer"))
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise LlamanpError(f"{source}: BPE {key} {model[key]!r} is not supported")
    if model.get("dropout"):
        raise LlamanpError(f"{source}: BPE dropout is not supported")

    vocab_json = model.get("vocab")
    if not isinstance(vocab_json, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0
            for i in vocab_json.values()):
        raise LlamanpError(f"{source}: the BPE vocab is not an object of token -> id")
    vocab = {}
    for text, id in vocab_json.items():
        if vocab.setdefault(id, text) != text:
            raise LlamanpError(f"{source}: id {id} belongs to two tokens "
                               f"({vocab[id]!r} and {text!r})")
    added = {}
    for tok in tj.get("added_tokens") or []:
        id, content = (tok.get("id"), tok.get("content")) if isinstance(tok, dict) else (0, 0)
        if not (isinstance(id, int) and id >= 0 and isinstance(content, str) and content):
            raise LlamanpError(f"{source}: an added token lacks an id or content")
        flags = tuple(f for f in ("lstrip", "rstrip", "single_word") if tok.get(f))
        added[id] = _AddedToken(content, bool(tok.get("special")), flags)
    merges = [_split_merge(m, i, source) for i, m in enumerate(model.get("merges") or [])]

    ids_by_text = {t.content: i for i, t in added.items()}
    for i, t in vocab.items():
        ids_by_text.setdefault(t, i)
    if model.get("unk_token") is not None:
        missing = [b for b, c in bytes_to_unicode().items() if c not in ids_by_text]
        if missing:
            raise LlamanpError(f"{source}: the vocabulary lacks byte 0x{missing[0]:02x} and "
                               "names an unk_token for it, which llamanp does not support")

    def named(key):
        text = _token_text(config.get(key))
        return ids_by_text.get(text) if text is not None else None

    bos_text = _token_text(config.get("bos_token")) or _template_bos(tj)
    bos = ids_by_text.get(bos_text) if bos_text is not None else None
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _template_bos(tj) is not None
    eos = named("eos_token")
    stops = [eos, *gen_eos, *(ids_by_text.get(t) for t in _TURN_ENDS)]
    if template and _CHATML_END in template:
        stops.append(ids_by_text.get(_CHATML_END))
    return _byte_level_data(
        source=source, vocab=vocab, added=added, merges=merges, pattern=pattern,
        ignore_merges=bool(model.get("ignore_merges")), bos_id=bos if add_bos else None,
        eos_id=eos, stop_ids=stops, chat_template=template)
