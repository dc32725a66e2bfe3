"""Tokenizers: text to token ids and back.

Llama-family models use one of two tokenizers, and llamanp reads both from the
original ``tokenizer.model`` file, and llama2.c's export of the first:

* SentencePiece (Llama 1 and 2, TinyStories): the file is a protobuf model
  that the ``sentencepiece`` library loads as it is.
* tiktoken BPE (Llama 3): the file is plain text, one ``base64(token) rank``
  per line. The pre-tokenizer regex and the special tokens are not in the
  file; they are Meta's Llama 3 constants below.
* llama2.c's ``tokenizer.bin`` (every llama2.c model and TinyStories
  checkpoint): pieces and scores, encoded by run.c's algorithm in
  ``llamanp.llama2c_tokenizer``, since no library reads it.

``llamanp.convert.tokenizers`` builds the same two kinds from the tokenizers
that Hugging Face and GGUF checkpoints carry: byte-level BPE vocabularies
(GPT-2, SmolLM, Llama 3 style) become tiktoken ranks, whose special tokens may
take any ids (SmolLM's come first), and SentencePiece vocabularies in a GGUF
become a SentencePiece model again.

The libraries do the encoding and decoding, so llamanp produces exactly the
ids the model was trained on. This module adds what a generation loop needs on
top of them: the raw bytes of each token, and a streaming decoder that prints
text as soon as it is complete and agrees with the library's ``decode``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import fileio
from .errors import LlamanpError

# -- Llama 3 constants (facts from Meta's reference tokenizer) ---------------

# Splits text into chunks before BPE runs: English contractions, words with
# one leading non-letter, numbers of at most three digits, punctuation runs,
# and whitespace, so that merges never cross these boundaries.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named special tokens in id order (Llama 3.1+ names). They take the ids
# right after the BPE ranks; the rest of the 256 slots are reserved.
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
LLAMA3_NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Meta's 256 Llama 3 special tokens, numbered from ``num_base_tokens``."""
    names = list(_LLAMA3_NAMED_SPECIALS)
    n_reserved = LLAMA3_NUM_SPECIAL_TOKENS - len(names)
    # reserved_special_token_0 and _1 are already named above
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


KINDS = ("sentencepiece", "tiktoken", "llama2c")

_SUPPORTED = ("llamanp reads a SentencePiece tokenizer.model (Llama 1/2, TinyStories), "
              "a tiktoken tokenizer.model (Llama 3) or a llama2.c tokenizer.bin")

_REPLACEMENT = "\ufffd"   # what an invalid UTF-8 byte decodes to

# -- what a .lmw file embeds ---------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class TokenizerData:
    """Everything needed to rebuild a tokenizer: the file and a few settings."""

    kind: str                      # "sentencepiece" | "tiktoken" | "llama2c"
    data: bytes                    # the tokenizer file, byte for byte
    bos_id: Optional[int]
    eos_id: Optional[int]
    stop_ids: list[int]            # ids that end generation
    # tiktoken: {"pattern": str, "special_tokens": {text: id}} and optionally
    # "added_tokens": {text: id}, texts that encode recognises in user text.
    extra: dict
    chat_template: Optional[str] = None

    def header(self) -> dict:
        """JSON-able description of everything except the file bytes."""
        return {
            "kind": self.kind,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "stop_ids": list(self.stop_ids),
            "extra": copy.deepcopy(self.extra),
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_header(cls, h: dict, data: bytes) -> "TokenizerData":
        """Inverse of :meth:`header`; raises LlamanpError on anything malformed."""
        if not isinstance(h, dict):
            raise LlamanpError("tokenizer header must be a JSON object; the file is corrupt")
        known = {"kind", "bos_id", "eos_id", "stop_ids", "extra", "chat_template"}
        unknown = sorted(set(h) - known)
        if unknown:
            raise LlamanpError(f"tokenizer header has unknown field(s) {unknown}; "
                               "the file may come from a newer llamanp")
        missing = sorted(known - {"chat_template"} - set(h))
        if missing:
            raise LlamanpError(f"tokenizer header lacks field(s) {missing}; the file is corrupt")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LlamanpError("tokenizer data must be bytes")
        td = cls(kind=h["kind"], data=bytes(data), bos_id=h["bos_id"], eos_id=h["eos_id"],
                 stop_ids=h["stop_ids"], extra=h["extra"],
                 chat_template=h.get("chat_template"))
        td.validate()
        return td

    def validate(self) -> None:
        """Raise LlamanpError unless the fields have the types and shapes they need."""
        def need(cond, msg):
            if not cond:
                raise LlamanpError(f"invalid tokenizer settings: {msg}")

        need(self.kind in KINDS, f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        need(isinstance(self.data, bytes) and len(self.data) > 0,
             "the tokenizer file bytes are missing")
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            need(v is None or (_is_int(v) and v >= 0),
                 f"{name} must be null or a token id, got {v!r}")
        need(isinstance(self.stop_ids, list)
             and all(_is_int(i) and i >= 0 for i in self.stop_ids),
             f"stop_ids must be a list of token ids, got {self.stop_ids!r}")
        need(self.chat_template is None or isinstance(self.chat_template, str),
             "chat_template must be null or a string")
        need(isinstance(self.extra, dict), "extra must be an object")
        if self.kind == "tiktoken":
            pattern = self.extra.get("pattern")
            specials = self.extra.get("special_tokens")
            need(isinstance(pattern, str) and pattern != "",
                 "tiktoken needs extra.pattern, the pre-tokenizer regex")
            need(isinstance(specials, dict)
                 and all(isinstance(k, str) and _is_int(v) and v >= 0
                         for k, v in specials.items()),
                 "tiktoken needs extra.special_tokens, an object of text -> id")
            added = self.extra.get("added_tokens", {})
            need(isinstance(added, dict)
                 and all(isinstance(k, str) and k != "" and _is_int(v) and v >= 0
                         for k, v in added.items()),
                 "extra.added_tokens must be an object of non-empty text -> id")


# -- reading a tokenizer file ------------------------------------------------


def read_tokenizer_file(path) -> TokenizerData:
    """Read a tokenizer file, telling SentencePiece, tiktoken and tokenizer.bin apart by content."""
    path = Path(path)
    if not os.path.lexists(path):
        raise LlamanpError(f"tokenizer file {path} does not exist; {_SUPPORTED}")
    data = fileio.read_bytes(path, "tokenizer file", fileio.TOKENIZER_LIMIT)

    # llama2c_tokenizer builds on this module, so it is imported here, when needed.
    from .llama2c_tokenizer import looks_like_tokenizer_bin, tokenizer_bin_data

    source = f"tokenizer file {path}"
    if _looks_like_tiktoken(data):
        return _llama3_tiktoken_data(data, source=source)
    bin_error = None
    if looks_like_tokenizer_bin(data):
        try:
            return tokenizer_bin_data(data, source)
        except LlamanpError as e:
            bin_error = e
    if _looks_like_sentencepiece(data):
        try:
            return _sentencepiece_data(data, source=source)
        except LlamanpError:
            # Whichever format the start suggested first names what is damaged.
            if bin_error is None:
                raise
    if bin_error is not None:
        raise bin_error
    raise LlamanpError(f"{source} {_what_else_it_is(data)}; {_SUPPORTED}")


# A ranks file starts with a line like "IQ== 0".
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* [0-9]+\r?")


def _looks_like_tiktoken(data: bytes) -> bool:
    first_line = data.split(b"\n", 1)[0]
    return _TIKTOKEN_LINE.fullmatch(first_line) is not None


def _looks_like_sentencepiece(data: bytes) -> bool:
    # A serialized ModelProto starts with its first piece: field 1, length-delimited.
    return data[:1] == b"\x0a"


def _what_else_it_is(data: bytes) -> str:
    """Name a file we cannot read, so the message can say what to pass instead."""
    if not data:
        return "is empty"
    if data[:4] == b"GGUF":
        return "is a GGUF file, not a tokenizer file"
    if data.lstrip()[:1] in (b"{", b"["):
        return "is JSON (a Hugging Face tokenizer.json?); pass the tokenizer.model beside it"
    return "is in no tokenizer format llamanp knows"


def _sentencepiece_data(data: bytes, source: str) -> TokenizerData:
    sp = _load_sentencepiece(data, source)
    bos, eos = sp.bos_id(), sp.eos_id()          # -1 means "this model has none"
    bos = bos if bos >= 0 else None
    eos = eos if eos >= 0 else None
    return TokenizerData(kind="sentencepiece", data=data, bos_id=bos, eos_id=eos,
                         stop_ids=[eos] if eos is not None else [], extra={})


def _llama3_tiktoken_data(data: bytes, source: str) -> TokenizerData:
    """A tiktoken ranks file is taken to be Llama 3's: Meta's regex and specials."""
    ranks = _parse_ranks(data, source)
    specials = llama3_special_tokens(len(ranks))
    eos = specials["<|end_of_text|>"]
    # Instruct models end a turn with <|eot_id|>, and a tool call with <|eom_id|>.
    stops = [eos, specials["<|eom_id|>"], specials["<|eot_id|>"]]
    return TokenizerData(kind="tiktoken", data=data, bos_id=specials["<|begin_of_text|>"],
                         eos_id=eos, stop_ids=stops,
                         extra={"pattern": LLAMA3_PATTERN, "special_tokens": specials})


def _parse_ranks(data: bytes, source: str, contiguous: bool = True) -> dict[bytes, int]:
    """Parse "base64(token) rank" lines; each rank once, and 0..n-1 if `contiguous`."""
    # Split the whole file at once: per-line parsing of Llama 3's 128000 lines
    # is twice as slow. One space per line keeps tokens and ranks paired.
    fields = data.split()
    tokens, numbers = fields[0::2], fields[1::2]
    try:
        if len(fields) != 2 * data.count(b" "):
            raise ValueError("not one space per line")
        ranks = dict(zip([base64.b64decode(t, validate=True) for t in tokens],
                         map(int, numbers)))
    except (binascii.Error, ValueError):
        raise LlamanpError(f"{source}: {_first_bad_line(data)} is not 'base64-token rank'; "
                           "the tiktoken ranks file is damaged") from None
    n = len(tokens)
    if contiguous and (len(ranks) != n or sorted(ranks.values()) != list(range(n))):
        raise LlamanpError(f"{source}: the tiktoken ranks are not 0..{n - 1} each once; "
                           "the ranks file is damaged")
    if not contiguous and (len(ranks) != n or len(set(ranks.values())) != n):
        raise LlamanpError(f"{source}: a token or a rank occurs twice; "
                           "the ranks file is damaged")
    return ranks


def _first_bad_line(data: bytes) -> str:
    """Find the line a malformed ranks file goes wrong on, for the error message."""
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        token, _, rank = line.rstrip(b"\r").partition(b" ")
        try:
            if token and rank.isdigit() and base64.b64decode(token, validate=True):
                continue
        except binascii.Error:
            pass
        return f"line {number}"
    return "a line"


def _load_sentencepiece(data: bytes, source: str):
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, ValueError):   # ValueError: a damaged string's UTF-8
        sp = None
    if sp is None or sp.vocab_size() == 0:
        raise LlamanpError(f"{source} is not a valid SentencePiece model; {_SUPPORTED}")
    return sp


# -- tokenizers --------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids. Build one with :meth:`from_data` or :func:`load_tokenizer`."""

    data: TokenizerData
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    stop_ids: list[int]

    @classmethod
    def from_data(cls, td: TokenizerData) -> "Tokenizer":
        td.validate()
        if td.kind == "llama2c":
            from .llama2c_tokenizer import Llama2cTokenizer
            return Llama2cTokenizer(td)
        kind = SentencePieceTokenizer if td.kind == "sentencepiece" else TiktokenTokenizer
        return kind(td)

    def __init__(self, td: TokenizerData, table: list[bytes]):
        self.data = td
        self.vocab_size = len(table)
        self.bos_id, self.eos_id = td.bos_id, td.eos_id
        self.stop_ids = list(td.stop_ids)
        self._bytes = table          # token id -> its raw bytes
        for i in [td.bos_id, td.eos_id, *td.stop_ids]:
            if i is not None and i >= self.vocab_size:
                raise LlamanpError(f"tokenizer settings name token id {i}, but the vocabulary "
                                   f"has only {self.vocab_size} tokens; the file is corrupt")

    # -- public API ----------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text in it is encoded as plain text.

        bos=True puts the BOS token first if the tokenizer has one; one without
        (SmolLM2's) adds nothing, as transformers' add_special_tokens and
        llama.cpp do, so that bos=True means "as the model's text begins".
        """
        ids = self._encode_text(text)
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self._required(self.eos_id, "EOS"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, exactly as the library decodes them.

        SentencePiece prints control tokens such as BOS as nothing; tiktoken
        prints specials as their text. Invalid UTF-8 becomes U+FFFD.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._decode_ids(ids)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes one token stands for (no context-dependent space rules)."""
        self._check_id(id)
        return self._bytes[id]

    def special_id(self, text: str) -> Optional[int]:
        """Id of a special token by its text ('<|eot_id|>', '<s>'); None if absent."""
        raise NotImplementedError

    def stream(self, at_start: bool = True) -> "StreamDecoder":
        """A decoder for printing tokens as they are generated.

        at_start says whether the tokens begin the text. SentencePiece drops the
        leading space of the text's first piece, so a stream that continues
        after a prompt must be made with at_start=False to keep it.
        """
        raise NotImplementedError

    # -- for subclasses --------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.vocab_size:
            raise LlamanpError(f"token id {id} is outside the vocabulary "
                               f"(0..{self.vocab_size - 1}); the model and tokenizer do not match")

    @staticmethod
    def _required(id: Optional[int], name: str) -> int:
        if id is None:
            raise LlamanpError(f"this tokenizer has no {name} token; encode without "
                               f"{name.lower()}=True")
        return id


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 style tokenizer backed by the sentencepiece library."""

    def __init__(self, td: TokenizerData):
        sp = _load_sentencepiece(td.data, source="the embedded SentencePiece model")
        self._sp = sp
        n = sp.vocab_size()
        pieces = sp.id_to_piece(list(range(n)))
        unk_surface = sp.decode([sp.unk_id()]).encode() if sp.unk_id() >= 0 else b""
        self._is_special = [sp.is_control(i) or sp.is_unknown(i) for i in range(n)]
        self._is_byte = [sp.is_byte(i) for i in range(n)]
        # Pieces whose "▁" sentencepiece drops when they open the text.
        self._spaced = [p.startswith("▁") and not (s or b)
                        for p, s, b in zip(pieces, self._is_special, self._is_byte)]
        table = [self._piece_bytes(i, p, unk_surface) for i, p in enumerate(pieces)]
        self.drops_first_space, self.keeps_dropping_spaces = _leading_space_rule(sp, pieces)
        super().__init__(td, table)

    def _piece_bytes(self, id: int, piece: str, unk_surface: bytes) -> bytes:
        if self._sp.is_control(id):
            return b""                              # <s>, </s> print nothing
        if self._sp.is_unknown(id):
            return unk_surface                      # " ⁇ " by default
        if self._is_byte[id]:
            return bytes([int(piece[3:5], 16)])     # "<0xAB>" -> b"\xab"
        return piece.replace("▁", " ").encode()

    def _encode_text(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def special_id(self, text: str) -> Optional[int]:
        """Id of a control or unknown piece such as '<s>' or '<unk>'."""
        i = self._sp.piece_to_id(text)
        if self._sp.id_to_piece(i) == text and self._is_special[i]:
            return i
        return None

    def stream(self, at_start: bool = True) -> "StreamDecoder":
        return _SentencePieceStream(self, at_start)


def _leading_space_rule(sp, pieces: list[str]) -> tuple[bool, bool]:
    """How sentencepiece treats spaces at the start of the text, asked of the library.

    With add_dummy_prefix the encoder puts "▁" before the text, so decoding
    drops the "▁" of the first piece again. With remove_extra_whitespaces too,
    it goes on dropping while the text is still empty. The model file holds
    these flags, but the Python API does not expose them, so we watch decode.
    Returns (drops_first_space, keeps_dropping_spaces).
    """
    space = sp.piece_to_id("▁")
    if pieces[space] == "▁" and not sp.is_unknown(space):
        drops = sp.decode([space]) == ""
        return drops, drops and sp.decode([space, space]) == ""
    # Without a bare "▁" piece no piece can vanish, so only the first matters.
    probe = next((i for i, p in enumerate(pieces) if p.startswith("▁")
                  and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))), None)
    if probe is None:
        return False, False
    return sp.decode([probe]) == pieces[probe][1:].replace("▁", " "), False


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE tokenizer (Llama 3, GPT-2, SmolLM) backed by the tiktoken library.

    The ranks and the special tokens together number the ids 0..n-1; the
    specials may come anywhere (Llama 3's follow the ranks, SmolLM's precede
    them). Special-token text in user text is plain text, except the texts in
    ``extra["added_tokens"]`` (Hugging Face's non-special added tokens), which
    are recognised as Hugging Face does: leftmost, and the longest there.
    """

    def __init__(self, td: TokenizerData):
        import tiktoken

        ranks = _parse_ranks(td.data, source="the embedded tiktoken ranks file",
                             contiguous=False)
        specials = td.extra["special_tokens"]
        n = len(ranks) + len(specials)
        if sorted([*ranks.values(), *specials.values()]) != list(range(n)):
            raise LlamanpError(f"tiktoken ranks and special token ids must together number "
                               f"0..{n - 1}, each once; the tokenizer settings are corrupt")
        try:
            self._enc = tiktoken.Encoding(name="llamanp", pat_str=td.extra["pattern"],
                                          mergeable_ranks=ranks, special_tokens=specials)
        except ValueError as e:
            raise LlamanpError(f"bad tiktoken settings: {e}") from None
        table = [b""] * n
        for token, rank in ranks.items():
            table[rank] = token
        for text, id in specials.items():
            table[id] = text.encode()           # tiktoken decodes a special to its text
        super().__init__(td, table)

        self._added = dict(td.extra.get("added_tokens", {}))
        for text, id in self._added.items():
            self._check_id(id)
        # Leftmost match first; among matches there, the alternatives are tried
        # longest first, so the longest wins (Hugging Face's rule).
        self._added_re = re.compile("|".join(
            re.escape(t) for t in sorted(self._added, key=len, reverse=True))) \
            if self._added else None

        # A vocabulary may lack some single bytes (SmolLM has no token for
        # b"\x04"); tiktoken cannot encode text that needs one, and Hugging
        # Face's BPE drops such bytes. Texts that hold one take a slower path.
        present = bytes(b for b in range(256) if bytes([b]) in ranks)
        self._present = present if len(present) < 256 else None
        self._missing = bytes(sorted(set(range(256)) - set(present)))
        self._ranks = ranks
        self._pattern = None

    def _encode_text(self, text: str) -> list[int]:
        if self._added_re is None:
            return self._encode_plain(text)
        ids, pos = [], 0
        for m in self._added_re.finditer(text):
            ids += self._encode_plain(text[pos:m.start()])
            ids.append(self._added[m.group()])
            pos = m.end()
        return ids + self._encode_plain(text[pos:])

    def _encode_plain(self, text: str) -> list[int]:
        if self._present is not None and text:
            try:
                raw = text.encode("utf-8")
            except UnicodeEncodeError:          # lone surrogates: as tiktoken does
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                raw = text.encode("utf-8")
            if raw.translate(None, self._present):
                return self._encode_dropping_missing_bytes(text)
        # User text never yields special ids: "<|eot_id|>" typed by a user is just text.
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def _encode_dropping_missing_bytes(self, text: str) -> list[int]:
        """Encode text with bytes the vocabulary lacks, dropping them as Hugging Face does.

        The text is split with the same regex, then each piece loses the bytes
        that have no token before BPE runs on what is left, so the bytes on
        either side of a dropped one may merge. The `regex` module is
        tiktoken's own dependency.
        """
        import regex

        if self._pattern is None:
            self._pattern = regex.compile(self.data.extra["pattern"])
        ids = []
        for m in self._pattern.finditer(text):
            piece = m.group().encode("utf-8")
            kept = piece.translate(None, self._missing)
            if kept:
                # Only an intact piece may be looked up whole: Hugging Face
                # runs BPE on a piece whose bytes were dropped.
                ids += _bpe(kept, self._ranks, whole=kept == piece)
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

    def special_id(self, text: str) -> Optional[int]:
        id = self.data.extra["special_tokens"].get(text)
        return id if id is not None else self._added.get(text)

    def stream(self, at_start: bool = True) -> "StreamDecoder":
        # Byte-level BPE has no start-of-text rule, so at_start changes nothing.
        return _ByteStream(self)


def merge_pairs(piece: bytes, rank_of: Callable[[bytes, bytes], Optional[int]]) -> list[bytes]:
    """Byte-pair merging of one piece: start from single bytes and, while some
    adjacent pair has a rank, merge the pair with the lowest rank (the leftmost
    among equals). `rank_of(left, right)` gives a pair's rank or None."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = rank_of(parts[i], parts[i + 1])
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _bpe(piece: bytes, ranks: dict[bytes, int], whole: bool = True) -> list[int]:
    """tiktoken's byte-pair encoding of one piece, in Python (for the rare slow path).

    With `whole`, a piece that is itself a token is that token. Otherwise pairs
    merge by the rank of their concatenation, as tiktoken does.
    """
    if whole and piece in ranks:
        return [ranks[piece]]
    return [ranks[p] for p in merge_pairs(piece, lambda a, b: ranks.get(a + b))]


def load_tokenizer(path) -> Tokenizer:
    """Read a tokenizer.model file and build the tokenizer it describes."""
    return Tokenizer.from_data(read_tokenizer_file(path))


# -- streaming decoders ------------------------------------------------------


class StreamDecoder:
    """Turns tokens into text one at a time, for printing while generating.

    Pushing every id and then flushing gives the same text as decoding them
    all at once; bytes of a character split over several tokens are held back
    until the character is complete.
    """

    def push(self, id: int) -> str:
        """The text that became complete with this token."""
        raise NotImplementedError

    def flush(self) -> str:
        """Whatever is left; an unfinished character becomes U+FFFD."""
        raise NotImplementedError


class _ByteStream(StreamDecoder):
    """tiktoken tokens are byte strings; an incremental UTF-8 decoder does the rest."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        # errors="replace" to match tiktoken's decode(errors="replace")
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _SentencePieceStream(StreamDecoder):
    """Follows sentencepiece's decode rules one piece at a time.

    Those rules are: byte-fallback pieces in a row form one byte string, in
    which each byte that is not part of a valid character becomes U+FFFD; and
    the "▁" that opens the text is dropped (see _leading_space_rule).
    """

    def __init__(self, tok: SentencePieceTokenizer, at_start: bool):
        self._tok = tok
        self._pending = bytearray()      # byte pieces of an unfinished character
        self._at_start = at_start        # may a leading "▁" still be dropped?
        self._dropped_space = False      # was a "▁" dropped? (ends the start next piece)
        self._shown = False              # has any text come out yet?

    def push(self, id: int) -> str:
        tok = self._tok
        surface = tok.token_bytes(id)
        if tok._is_byte[id]:
            self._pending += surface
            text, self._pending = _complete_chars(self._pending)
            return self._show(text)
        text = self._end_byte_run()
        # The start of the text is over once something was shown or a space dropped.
        if text or self._shown or self._dropped_space:
            self._at_start = False
        if self._at_start and tok.drops_first_space and tok._spaced[id]:
            surface = surface[1:]
            # If spaces keep being dropped, dropping one does not end the start.
            self._dropped_space = not tok.keeps_dropping_spaces
        return self._show(text + surface.decode())

    def flush(self) -> str:
        return self._show(self._end_byte_run())

    def _end_byte_run(self) -> str:
        # A run of byte pieces ends unfinished: each leftover byte is invalid.
        text = _REPLACEMENT * len(self._pending)
        self._pending = bytearray()
        return text

    def _show(self, text: str) -> str:
        self._shown = self._shown or text != ""
        return text


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 character starting with byte `lead`; 0 if none can."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _complete_chars(buf: bytearray) -> tuple[str, bytearray]:
    """Decode the whole characters at the front of `buf`, as sentencepiece does.

    A byte that cannot start a valid character becomes U+FFFD on its own.
    Returns the text and the bytes of a character that may still complete.
    """
    out = []
    i = 0
    while i < len(buf):
        n = _utf8_length(buf[i])
        if n == 0:
            out.append(_REPLACEMENT)
            i += 1
            continue
        chunk = bytes(buf[i:i + n])
        if len(chunk) < n and all(0x80 <= b < 0xC0 for b in chunk[1:]):
            break                                   # wait for the rest of it
        try:
            out.append(chunk.decode("utf-8"))
            i += n
        except UnicodeDecodeError:                  # e.g. a truncated or overlong form
            out.append(_REPLACEMENT)
            i += 1
    return "".join(out), buf[i:]
