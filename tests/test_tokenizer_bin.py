"""llama2.c's tokenizer.bin: llamanp against SentencePiece and against run.c's algorithm.

The tokenizer.bin files are exported here from SentencePiece models as
llama2.c's tokenizer.py does. Two references check llamanp's encoder:

* sentencepiece itself, on the model the file was exported from: the ids must
  be the same, except where run.c's algorithm and SentencePiece's differ;
* ``RunC`` below, run.c's ``encode``/``decode`` written again as plainly as the
  C (a byte loop, and a full rescan of the sequence for every merge), which
  pins down those differences and the merge order on made-up vocabularies
  with tied scores.
"""

import random
import re
import struct
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import NOTOK_CASE, run_cli
from test_tokenizer import HARD_TEXTS, _one_line_error

from llamanp import llama2c_tokenizer
from llamanp.tokenizer import Tokenizer, TokenizerData, load_tokenizer, read_tokenizer_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2 = SHARED / "llama2-tokenizer.model"

# Beyond test_tokenizer's texts: byte fallback for characters no piece holds,
# long whitespace runs, digits, code, and the texts of special and byte pieces.
MORE_TEXTS = [
    "\x00 nul, \x07 bell, \x7f delete, \x1b[0m escape",
    "rare: 𠀋𡈽 (CJK extension B), \U000F0000 (private use), \U0010FFFD, ꙮ",
    "tabs\t\t\tand spaces          and\n\n\n\n\nnewlines \r\r",
    "    indented\n        twice\n\t\tmixed \t \t",
    "2024-06-01 12:34:56.789 +0000, 0x1F, 1e-10, -42, 3,141,592, ½ ¾ ⅞ ٣٤٥ ४२",
    "int main(void) { printf(\"%d\\n\", a[i] >> 2 & 0xff); return !x || y != z; }",
    "<0x0A> <0xFF> <0x41><0x42> <unk> <s> </s> \n<s>\n \n</s>\n",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย, ქართული",
    "a" * 300 + " " + "ab" * 150 + " " + "😀" * 40,
    "The quick brown fox jumps over the lazy dog. " * 20,
]
CORPUS = HARD_TEXTS + MORE_TEXTS

# U+2581 is SentencePiece's own mark for a space: in text, sentencepiece takes
# it as a space, run.c as an ordinary character (byte tokens, as no piece of
# the export holds it any more).
SPACE_MARK_TEXTS = ["▁", "a▁b", "▁▁indented", "word▁ ▁word", "日本▁語"]


# -- the export, and run.c written plainly -------------------------------------


def export_tokenizer_bin(sp_path: Path) -> bytes:
    """llama2.c's tokenizer.py export: BOS and EOS become "\\n<s>\\n" and
    "\\n</s>\\n", "▁" becomes " " in every piece, and the rest (byte pieces
    "<0xNN>", "<unk>") is kept as it is; then uint32 max_token_length and
    (float32 score, uint32 length, bytes) per piece."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    pieces = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        pieces.append(piece.replace("▁", " ").encode("utf-8"))
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    return tokenizer_bin(pieces, scores)


def tokenizer_bin(pieces: list[bytes], scores: list[float]) -> bytes:
    out = [struct.pack("<I", max(len(p) for p in pieces))]
    for piece, score in zip(pieces, scores):
        out.append(struct.pack("<fI", score, len(piece)) + piece)
    return b"".join(out)


class RunC:
    """run.c's build_tokenizer, encode and decode, transcribed without cleverness."""

    def __init__(self, data: bytes):
        (self.max_len,) = struct.unpack_from("<i", data, 0)
        self.vocab, self.scores, pos = [], [], 4
        while pos < len(data):
            score, n = struct.unpack_from("<fi", data, pos)
            self.vocab.append(data[pos + 8:pos + 8 + n])
            self.scores.append(score)
            pos += 8 + n
        self.sorted = {}
        for i, piece in enumerate(self.vocab):
            self.sorted.setdefault(piece, i)

    def lookup(self, s: bytes) -> int:
        return self.sorted.get(s, -1)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        tokens = [1] if bos else []
        if raw:
            tokens.append(self.lookup(b" "))
        buf = b""
        for k, c in enumerate(raw):
            if c & 0xC0 != 0x80:                # not a continuation byte: a new code point
                buf = b""
            buf += bytes([c])
            following = raw[k + 1] if k + 1 < len(raw) else 0
            if following & 0xC0 == 0x80 and len(buf) < 4:
                continue
            id = self.lookup(buf)
            if id != -1:
                tokens.append(id)
            else:
                tokens += [b + 3 for b in buf]
            buf = b""
        while True:
            best_score = struct.unpack("<f", struct.pack("<f", -1e10))[0]
            best_id = best_idx = -1
            for i in range(len(tokens) - 1):
                id = self.lookup(self.vocab[tokens[i]] + self.vocab[tokens[i + 1]])
                if id != -1 and self.scores[id] > best_score:
                    best_score, best_id, best_idx = self.scores[id], id, i
            if best_idx == -1:
                break
            tokens[best_idx] = best_id
            del tokens[best_idx + 1]
        if eos:
            tokens.append(2)
        return tokens

    def decode(self, prev: int, token: int) -> bytes:
        piece = self.vocab[token]
        if prev == 1 and piece[:1] == b" ":
            piece = piece[1:]
        m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def generated_text(self, ids: list[int]) -> str:
        """What run.c prints for a sequence opened by BOS: each token after it."""
        assert ids[0] == 1
        return b"".join(self.decode(p, t) for p, t in zip(ids, ids[1:])).decode("utf-8",
                                                                                  "replace")


# -- fixtures ------------------------------------------------------------------


class Trio:
    """llamanp's tokenizer for an exported tokenizer.bin, sentencepiece, and RunC."""

    def __init__(self, sp_path: Path, out: Path):
        self.path, self.sp_path = out, sp_path
        out.write_bytes(export_tokenizer_bin(sp_path))
        self.tok = load_tokenizer(out)
        self.sp = spm.SentencePieceProcessor(model_file=str(sp_path))
        self.runc = RunC(out.read_bytes())


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> Trio:
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (shared test data not checked out)")
    return Trio(LLAMA2, tmp_path_factory.mktemp("tokbin") / "tokenizer.bin")


@pytest.fixture(scope="module")
def tok300(sp_model, tmp_path_factory) -> Trio:
    """The suite's small tokenizer, trained with llama2.c's train_vocab settings."""
    return Trio(sp_model, tmp_path_factory.mktemp("tokbin") / "tok300.bin")


@pytest.fixture(params=["llama2", "tok300"])
def trio(request) -> Trio:
    return request.getfixturevalue(request.param)


# -- reading -------------------------------------------------------------------


def test_read_tokenizer_file_reads_a_tokenizer_bin(trio):
    td = read_tokenizer_file(trio.path)
    assert td.kind == "llama2c" and td.data == trio.path.read_bytes()
    assert (td.bos_id, td.eos_id, td.extra) == (1, 2, {})
    assert sorted(td.stop_ids) == [1, 2]          # run.c stops at BOS; EOS ends too
    assert trio.tok.vocab_size == trio.sp.vocab_size() == len(trio.runc.vocab)
    again = Tokenizer.from_data(TokenizerData.from_header(td.header(), td.data))
    assert again.encode(CORPUS[-1]) == trio.tok.encode(CORPUS[-1])


def test_damaged_tokenizer_bin_is_refused_by_name(store, tok300, tmp_path, monkeypatch):
    good = tok300.path.read_bytes()
    last = len(good) - 8 - len(tok300.runc.vocab[-1])       # where the last entry starts
    cut = tmp_path / "cut.bin"
    for data, hint in [(good[:-3], "cut off"),
                       (good[:last + 4] + struct.pack("<i", 10 ** 6) + good[last + 8:],
                        "length 1000000"),
                       (good + b"\x00\x00", "cut off"),
                       (good[:4] + good[4:4 + 8 + 5], "holds 1 tokens")]:
        cut.write_bytes(data)
        message = _one_line_error(read_tokenizer_file, cut)
        assert str(cut) in message and hint in message, message
    # no model has millions of tokens: a file that would is not read to its end
    monkeypatch.setattr(llama2c_tokenizer, "_MAX_TOKENS", 100)
    assert "more than 100 tokens" in _one_line_error(read_tokenizer_file, tok300.path)
    rc, out, err = run_cli("llama-np.py", "-w", store.lmw(NOTOK_CASE), "-t", cut, "-i", "x")
    assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(cut) in err and "llama2.c tokenizer" in err


def test_sentencepiece_models_stay_sentencepiece(trio):
    # Both formats are binary; telling them apart must not go wrong either way.
    assert read_tokenizer_file(trio.sp_path).kind == "sentencepiece"


# -- encoding ------------------------------------------------------------------


def test_encode_equals_sentencepiece_and_run_c(trio):
    for text in CORPUS:
        ids = trio.tok.encode(text)
        assert ids == trio.sp.encode(text), text
        assert ids == trio.runc.encode(text), text
        assert all(type(i) is int for i in ids)
    text = CORPUS[-1]
    assert trio.tok.encode(text, bos=True, eos=True) == [1, *trio.sp.encode(text), 2]
    assert trio.tok.encode("", bos=True, eos=True) == trio.runc.encode("", True, True) == [1, 2]


def test_where_run_c_and_sentencepiece_differ_llamanp_follows_run_c(llama2):
    mark = [b + 3 for b in "▁".encode()]           # its three UTF-8 bytes as byte tokens
    for text in SPACE_MARK_TEXTS:
        ids = llama2.tok.encode(text, bos=True)
        assert ids == llama2.runc.encode(text, bos=True), text
        assert ids[1:] != llama2.sp.encode(text), text
        assert any(ids[i:i + 3] == mark for i in range(len(ids))), text
        assert llama2.tok.decode(ids) == text       # and it comes back as it was
    # sentencepiece reads the mark as the space it stands for.
    assert llama2.sp.encode("a▁b") == llama2.sp.encode("a b")


def _random_vocabulary(rng: random.Random) -> tuple[list[bytes], list[float]]:
    """<unk>, BOS, EOS, 256 byte pieces, then pieces over a few characters,
    scored from a small set so that ties are common; a few never merge."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    scores = [0.0] * len(pieces)
    alphabet = ["a", "b", " ", "é", "\n"]
    for ch in alphabet:
        pieces.append(ch.encode())
        scores.append(rng.choice([-50.0, 0.0]))
    for _ in range(40):
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5))).encode()
        if piece not in pieces:
            pieces.append(piece)
            scores.append(rng.choice([-3.0, -2.0, -1.0, -1.0, 5.0, -1e10, float("nan")]))
    return pieces, scores


def test_merges_match_run_c_on_vocabularies_with_ties(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "random.bin"
    for _ in range(30):
        pieces, scores = _random_vocabulary(rng)
        data = tokenizer_bin(pieces, scores)
        path.write_bytes(data)
        tok, runc = load_tokenizer(path), RunC(data)
        for _ in range(20):
            text = "".join(rng.choice("ab é\nc") for _ in range(rng.randint(0, 40)))
            bos = rng.random() < 0.5
            assert tok.encode(text, bos=bos) == runc.encode(text, bos=bos), (text, pieces)


def test_byte_fallback_beyond_a_small_vocabulary_is_an_error(tmp_path):
    path = tmp_path / "small.bin"
    path.write_bytes(tokenizer_bin([b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b" a"],
                                   [0.0, 0.0, 0.0, -1.0, -1.0, -0.5]))
    tok = load_tokenizer(path)
    assert tok.encode("a") == [5]
    message = _one_line_error(tok.encode, "b")
    assert "0x62" in message and "6 tokens" in message


def lines_run(fn, *args) -> int:
    """How many lines of Python fn(*args) runs, in it and in all it calls: a
    count of work which, unlike a clock, the machine and its load do not change."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        count += event == "line"
        return trace

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        fn(*args)
    finally:
        sys.settrace(before)
    return count


def test_encoding_is_linear_in_the_text(llama2):
    # run.c rescans the sequence for every merge: four times the text, about
    # sixteen times the work (tens of seconds on 10 KB); the heap's work grows
    # with the text. How fast it is: bench/tokenizer.py.
    text = (" ".join(CORPUS) * 4)[:10_000]
    assert llama2.tok.encode(text) == llama2.sp.encode(text)
    ours = lines_run(llama2.tok.encode, text) / lines_run(llama2.tok.encode, text[:2_500])
    runc = lines_run(llama2.runc.encode, text[:400]) / lines_run(llama2.runc.encode, text[:100])
    assert runc > 10, runc            # the count sees a quadratic loop
    assert ours < 5, ours


# -- decoding ------------------------------------------------------------------


def test_decode_follows_run_c(trio):
    for text in CORPUS:
        ids = trio.tok.encode(text, bos=True)
        assert trio.tok.decode(ids) == trio.runc.generated_text(ids) == text, text
        # Without a BOS before it, run.c keeps the dummy prefix's space
        # (sentencepiece drops it at the start of the text).
        if text:
            assert trio.tok.decode(ids[1:]) == " " + text


def test_decode_of_special_and_byte_tokens(trio):
    tok = trio.tok
    assert tok.decode([1, 2]) == "" and tok.token_bytes(1) == tok.token_bytes(2) == b""
    assert tok.decode([0]) == "<unk>"               # run.c prints the piece's text
    assert tok.token_bytes(3 + 0x41) == b"A" and tok.token_bytes(3 + 0xE2) == b"\xe2"
    assert tok.decode([3 + 0xE2, 3 + 0x82, 3 + 0xAC]) == "€"
    assert tok.decode([3 + 0xE2, 3 + 0x82]) == "\ufffd"
    assert tok.decode([3 + 0xFF]) == "\ufffd"
    space = trio.sp.piece_to_id("▁")
    assert tok.decode([1, space, space]) == " "     # the piece after BOS loses its space,
    assert tok.decode([1, 3 + 0x20]) == " "          # but a byte piece "<0x20>" is no " "
    assert (tok.special_id("<s>"), tok.special_id("</s>"), tok.special_id("<unk>")) == (1, 2, 0)
    assert tok.special_id("<|eot_id|>") is None


def test_stream_equals_decode(trio):
    rng = random.Random(3)
    tok = trio.tok
    pool = [0, 1, 2, *range(3, 259), *rng.sample(range(259, tok.vocab_size), 30)]
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 10))]
        for at_start in (True, False):
            stream = tok.stream(at_start=at_start)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == tok.decode(ids), ids


def test_chat_uses_llama2s_format_as_run_c_does(llama2):
    from llamanp.chat import render
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"}]
    ids = render(llama2.tok, messages)
    # run.c's chat prompt, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", after BOS.
    text = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]"
    assert ids == llama2.runc.encode(text, bos=True) == [1, *llama2.sp.encode(text)]


# -- embedded in a .lmw, and from the command line -----------------------------


def test_convert_embeds_it_and_the_cli_runs_with_it(store, tok300, tmp_path):
    src = store.source(NOTOK_CASE)
    out = tmp_path / "with-bin.lmw"
    rc, so, se = run_cli("convert.py", src, out, "--tokenizer", tok300.path)
    assert rc == 0, se
    from llamanp import lmw
    f = lmw.read(out)
    assert f.tokenizer.kind == "llama2c" and f.tokenizer.data == tok300.path.read_bytes()

    plain = store.lmw(NOTOK_CASE)
    args = ["-i", "the cat sat", "-n", "6", "--temp", "0"]
    runs = [run_cli("llama-np.py", "-w", out, *args),
            run_cli("llama-np.py", "-w", plain, "-t", tok300.path, *args),
            run_cli("llama-np.py", "-w", plain, "-t", store.tokenizer(), *args)]
    for rc, so, se in runs:
        assert rc == 0, se
    # The same prompt ids, so the same greedy tokens and the same text.
    assert runs[0][1] == runs[1][1] == runs[2][1]
    assert runs[0][1].startswith("the cat sat")
