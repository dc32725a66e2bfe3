"""llama2.c's ``tokenizer.bin``, encoded and decoded exactly as its run.c does.

The file (written by llama2.c's tokenizer.py export) is a list of pieces with
scores and no merge rules: the scores are the merge order. Its layout:

    int32 max_token_length
    then, for each token id 0, 1, 2, ...:  float32 score, int32 length, length bytes

The export takes a SentencePiece model's pieces with "▁" written as " ",
writes BOS and EOS as "\\n<s>\\n" and "\\n</s>\\n", and keeps byte pieces as
their text "<0xNN>". run.c then assumes <unk>, BOS and EOS at ids 0, 1, 2 and
the 256 byte pieces right after them, at ids 3..258.

Encoding (run.c's ``encode``): put a space before non-empty text (the
dummy prefix), look each UTF-8 character up as a piece, or else take one byte
token per byte (id = byte + 3); then, again and again, merge the adjacent pair
whose concatenated text is a piece with the highest score, the leftmost among
equal scores, until no pair is a piece. run.c rescans the whole sequence for
every merge; a heap of candidate pairs makes the same choices in O(n log n).

Decoding (run.c's ``decode``): a piece's text, a "<0xNN>" piece's one raw
byte, and the leading space of a piece that follows BOS dropped; BOS and EOS
themselves print nothing (run.c never prints them).
"""

from __future__ import annotations

import heapq
import math
import re
import struct
from typing import Optional

from .errors import LlamanpError
from .tokenizer import StreamDecoder, Tokenizer, TokenizerData, _ByteStream

BOS_ID, EOS_ID = 1, 2          # run.c's fixed ids
BYTE_OFFSET = 3                # byte b falls back to token b + 3 (after <unk>, <s>, </s>)

# run.c starts its search for the best pair at score -1e10 (as a float32) and
# takes a pair only if its score is greater: lower scores (and NaN) never merge.
_NO_MERGE = struct.unpack("<f", struct.pack("<f", -1e10))[0]

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")

# Bounds of a sane file: a piece longer than this is no text a tokenizer
# holds, and no model has more tokens than this (config.py's bound too).
_MAX_TOKEN_LENGTH = 1 << 16
_MAX_TOKENS = 1 << 22


def looks_like_tokenizer_bin(data: bytes) -> bool:
    """A plausible start: a sane max_token_length and (up to) three entries that fit it."""
    if len(data) < 4:
        return False
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= _MAX_TOKEN_LENGTH:
        return False
    pos = 4
    for _ in range(3):
        if pos == len(data):
            break
        if pos + 8 > len(data):
            return False
        score, n = struct.unpack_from("<fi", data, pos)
        if not (math.isfinite(score) and 0 <= n <= max_len):
            return False
        pos += 8 + n
    return pos <= len(data)


def read_tokenizer_bin(data: bytes, source: str) -> tuple[list[bytes], list[float]]:
    """The pieces and scores of a tokenizer.bin, or LlamanpError if it is damaged.

    The file does not say how many tokens it holds (run.c takes that from the
    model), so entries are read to the end of the file, which must be the end
    of the last one.
    """
    def damaged(why: str) -> LlamanpError:
        return LlamanpError(f"{source} is a damaged llama2.c tokenizer.bin: {why}")

    if len(data) < 4:
        raise damaged("it is shorter than its 4-byte header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= _MAX_TOKEN_LENGTH:
        raise damaged(f"max_token_length is {max_len}")
    pieces, scores = [], []
    pos, end = 4, len(data)
    while pos < end:
        id = len(pieces)
        if id == _MAX_TOKENS:
            raise damaged(f"it holds more than {_MAX_TOKENS} tokens")
        if pos + 8 > end:
            raise damaged(f"token {id} is cut off after {end - pos} bytes")
        score, n = struct.unpack_from("<fi", data, pos)
        if not 0 <= n <= max_len:
            raise damaged(f"token {id} has length {n}, outside 0..{max_len} "
                          "(the file's max_token_length)")
        pos += 8
        if pos + n > end:
            raise damaged(f"token {id} is cut off ({n} bytes announced, {end - pos} left)")
        pieces.append(data[pos:pos + n])
        scores.append(score)
        pos += n
    if not pieces:
        raise damaged("it holds no tokens")
    return pieces, scores


def tokenizer_bin_data(data: bytes, source: str) -> TokenizerData:
    """TokenizerData for a tokenizer.bin, with run.c's ids.

    Generation stops at EOS and also at BOS, as run.c's does: llama2.c's
    TinyStories models were trained on stories each opened by a BOS and closed
    by none, so the BOS that starts the next story is where one ends.
    """
    pieces, _ = read_tokenizer_bin(data, source)
    if len(pieces) <= EOS_ID:
        raise LlamanpError(f"{source} holds {len(pieces)} tokens; a llama2.c tokenizer has "
                           "<unk>, <s> and </s> at ids 0, 1 and 2")
    return TokenizerData(kind="llama2c", data=data, bos_id=BOS_ID, eos_id=EOS_ID,
                         stop_ids=[EOS_ID, BOS_ID], extra={})


def _piece_bytes(piece: bytes) -> bytes:
    """A piece's raw bytes: "<0xNN>" is the one byte NN, any other piece its text."""
    m = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece


class Llama2cTokenizer(Tokenizer):
    """run.c's tokenizer: score-ordered byte-pair merges over a tokenizer.bin."""

    def __init__(self, td: TokenizerData):
        self._pieces, scores = read_tokenizer_bin(td.data, "the embedded tokenizer.bin")
        self._scores = scores
        # run.c finds pieces by binary search in a sorted copy; a piece written
        # twice (no export does that) is taken at its lowest id here.
        self._id_of: dict[bytes, int] = {}
        for id, piece in enumerate(self._pieces):
            self._id_of.setdefault(piece, id)
        # BOS and EOS ("\n<s>\n", "\n</s>\n") print nothing: run.c never prints
        # the BOS that opens its prompt, and generation ends at either.
        silent = {td.bos_id, td.eos_id}
        super().__init__(td, [b"" if id in silent else _piece_bytes(p)
                              for id, p in enumerate(self._pieces)])

    # -- encoding --------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """run.c's encode: BOS, when asked for, takes part in the merging as there."""
        start = [self._required(self.bos_id, "BOS")] if bos else []
        ids = self._merge(start + self._characters(" " + text if text else ""))
        if eos:
            ids.append(self._required(self.eos_id, "EOS"))
        return ids

    def _characters(self, text: str) -> list[int]:
        """One token per character, or its UTF-8 bytes' tokens if no piece is that character.

        run.c cuts its byte string into a lead byte and the continuation bytes
        after it (at most four bytes in all), which for the UTF-8 of a Python
        string is one character each; a lone surrogate is kept as its three
        bytes, as a C string would hold them.
        """
        ids = []
        for ch in text:
            raw = ch.encode("utf-8", "surrogatepass")
            id = self._id_of.get(raw)
            if id is not None:
                ids.append(id)
            else:
                ids += [self._byte_token(b) for b in raw]
        return ids

    def _byte_token(self, b: int) -> int:
        id = b + BYTE_OFFSET
        if id >= self.vocab_size:
            raise LlamanpError(f"the text needs the byte-fallback token for byte 0x{b:02X} "
                               f"(id {id}), but the vocabulary has only {self.vocab_size} tokens")
        return id

    def _merge(self, ids: list[int]) -> list[int]:
        """Merge adjacent pairs by score, as run.c's loop does.

        Symbols form a linked list over their first positions. The heap holds
        a candidate (-score, position of the left symbol) for each adjacent
        pair that concatenates to a piece, so popping gives run.c's choice:
        the highest score, the leftmost among equals. A merge changes its
        symbol's stamp, which marks the candidates that involved it as stale.
        """
        n = len(ids)
        ids = list(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        stamp = [0] * n                     # -1 once a symbol is merged into its left
        heap: list = []
        pieces, id_of, scores = self._pieces, self._id_of, self._scores

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                id = id_of.get(pieces[ids[i]] + pieces[ids[j]])
                if id is not None and scores[id] > _NO_MERGE:
                    heapq.heappush(heap, (-scores[id], i, stamp[i], stamp[j], id))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, si, sj, id = heapq.heappop(heap)
            if stamp[i] != si or nxt[i] >= n or stamp[nxt[i]] != sj:
                continue                    # a neighbour changed since this was pushed
            j = nxt[i]
            ids[i] = id
            stamp[i] += 1
            stamp[j] = -1
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        out, i = [], 0
        while i < n:
            out.append(ids[i])
            i = nxt[i]
        return out

    # -- decoding --------------------------------------------------------------
    def shown_bytes(self, prev: Optional[int], id: int) -> bytes:
        """What run.c prints for `id` after `prev`: a piece that follows BOS
        loses its leading space (SentencePiece's decoder does so too)."""
        if prev is not None and prev == self.bos_id and self._pieces[id][:1] == b" ":
            return self._bytes[id][1:]
        return self._bytes[id]

    def _decode_ids(self, ids: list[int]) -> str:
        out = b"".join(self.shown_bytes(prev, id) for prev, id in zip([None, *ids], ids))
        return out.decode("utf-8", "replace")

    def special_id(self, text: str) -> Optional[int]:
        """'<unk>', '<s>' or '</s>' (the export writes the last two between newlines)."""
        for id in (0, self.bos_id, self.eos_id):
            if id is not None and self._pieces[id].strip(b"\n") == text.encode("utf-8"):
                return id
        return None

    def stream(self, at_start: bool = True) -> StreamDecoder:
        # run.c's only start-of-text rule is the space after BOS, which the
        # stream sees itself, so at_start changes nothing.
        return _Llama2cStream(self)


class _Llama2cStream(_ByteStream):
    """Raw bytes through an incremental UTF-8 decoder, minding the space after BOS."""

    def __init__(self, tok: Llama2cTokenizer):
        super().__init__(tok)
        self._prev: Optional[int] = None

    def push(self, id: int) -> str:
        self._tok._check_id(id)
        raw = self._tok.shown_bytes(self._prev, id)
        self._prev = id
        return self._utf8.decode(raw)
