"""Tokenizer tests: llamanp against sentencepiece and tiktoken used directly.

Six tokenizers are exercised. Three small SentencePiece models and a small
tiktoken ranks file are built here, so the suite always has something to run;
the real Llama 2 and Llama 3 tokenizer files come from ../shared/data and their
tests are skipped when it is absent.
"""

import base64
import dataclasses
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tiktoken

from llamanp.errors import LlamanpError
from llamanp.tokenizer import (
    StreamDecoder,
    Tokenizer,
    TokenizerData,
    load_tokenizer,
    read_tokenizer_file,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# Meta's Llama 3 pre-tokenizer regex, written out again so the reference below
# does not share llamanp's copy.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

HARD_TEXTS = [
    "",
    " ",
    "   ",
    "hello",
    "Hello world",
    " leading space",
    "trailing space ",
    "  both ends  ",
    "tabs\tand\t\ttabs\t",
    "one\ntwo",
    "windows\r\nline\r\nends\r\n",
    "paragraph\n\n\nnext",
    "\n",
    "\n\n  \t \n",
    "0123456789",
    "pi is 3.14159, a million is 1,000,000 and 12345678901234567890 is long",
    "café naïve über façade Ñandú señor",
    "cafe\u0301 n\u0303o decomposed accents",
    "日本語のテキスト、中文字符和한국어",
    "emoji 😀🎉 family 👨\u200d👩\u200d👧 flag 🇺🇸 thumbs 👍🏽",
    'def square(x):\n    return x ** 2  # comment\n\n'
    'if __name__ == "__main__":\n\tprint(square(3))\n',
    '{"key": [1, 2, 3], "quoted": "a\\"b", "nested": {"x": null}}',
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<s>",
    "</s>",
    "<s>hello</s>",
    "<unk>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "math: ∀x ∈ ℝ, x² ≥ 0; Ω≈ç√∫µ≤≥÷",
    "zero\u200bwidth and the \ufb01 ligature",
    "Once upon a time there was a little girl named Lily.",
]

CORPUS_WORDS = ("once upon a time there was little girl named lily she liked to play "
                "with her toy in the park one day saw big red ball and happy").split()


# -- the tokenizers under test -----------------------------------------------


def _train_sentencepiece(path: Path, **options) -> Path:
    """Train a small SentencePiece model on generated TinyStories-like text."""
    rng = random.Random(0)
    extras = ["café", "naïve", "über", "日本", "😀", "123", "42", "tab\there", "x = f(y) + 1;"]
    lines = []
    for _ in range(3000):
        line = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12)))
        if rng.random() < 0.2:
            line += " " + rng.choice(extras)
        lines.append(line.capitalize() + ".")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=512, byte_fallback=True, minloglevel=2,
                                   num_threads=1, **options)
    path.write_bytes(model.getvalue())
    return path


def _write_tiny_ranks(path: Path) -> Path:
    """A tiktoken ranks file: all 256 bytes, then a few merges."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" a", b"  ", b"\n\n"]
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {
        # Like llama2.c's TinyStories tok512: BPE, identity normalisation.
        "tiny-sp": _train_sentencepiece(d / "tok512.model", model_type="bpe",
                                        character_coverage=1.0,
                                        normalization_rule_name="identity",
                                        remove_extra_whitespaces=False, split_digits=True),
        # SentencePiece defaults: unigram, NFKC, extra whitespace removed.
        "tiny-sp-nfkc": _train_sentencepiece(d / "nfkc.model", model_type="unigram",
                                             hard_vocab_limit=False),
        # No dummy prefix: the first space is never dropped.
        "tiny-sp-raw": _train_sentencepiece(d / "raw.model", model_type="bpe",
                                            add_dummy_prefix=False,
                                            normalization_rule_name="identity",
                                            remove_extra_whitespaces=False),
        "tiny-tiktoken": _write_tiny_ranks(d / "ranks.model"),
        "llama2": SHARED / "llama2-tokenizer.model",
        "llama3": SHARED / "llama3-tokenizer.model",
    }


def _path(files, name) -> Path:
    path = files[name]
    if not path.exists():
        pytest.skip(f"{path} is absent (shared test data not checked out)")
    return path


def _reference(path: Path, kind: str):
    """The library itself, set up without llamanp's code."""
    if kind == "sentencepiece":
        return spm.SentencePieceProcessor(model_file=str(path))
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    n = len(ranks)
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>", "<|image|>"]
    names = named + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]
    specials = {name: n + i for i, name in enumerate(names)}
    return tiktoken.Encoding("reference", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks,
                             special_tokens=specials)


_cache = {}


class Pair:
    """llamanp's tokenizer next to the reference library."""

    def __init__(self, name, path):
        self.name = name
        self.tok = load_tokenizer(path)
        self.kind = self.tok.data.kind
        self.ref = _reference(path, self.kind)

    def ref_encode(self, text):
        if self.kind == "sentencepiece":
            return self.ref.encode(text)
        return self.ref.encode(text, allowed_special=set(), disallowed_special=())

    def ref_decode(self, ids):
        if self.kind == "sentencepiece":
            return self.ref.decode(ids)
        return self.ref.decode(ids, errors="replace")

    def is_byte_piece(self, id):
        return self.kind == "sentencepiece" and self.ref.is_byte(id)


ALL = ["tiny-sp", "tiny-sp-nfkc", "tiny-sp-raw", "tiny-tiktoken", "llama2", "llama3"]
SENTENCEPIECE = ["tiny-sp", "tiny-sp-nfkc", "tiny-sp-raw", "llama2"]
TIKTOKEN = ["tiny-tiktoken", "llama3"]


@pytest.fixture
def pair(request, files) -> Pair:
    name = request.param
    if name not in _cache:                  # loading Llama 3 twice would be slow
        _cache[name] = Pair(name, _path(files, name))
    return _cache[name]


def _stream_all(tok: Tokenizer, ids, at_start=True) -> str:
    stream = tok.stream(at_start=at_start)
    assert isinstance(stream, StreamDecoder)
    return "".join(stream.push(i) for i in ids) + stream.flush()


# -- encode / decode against the reference -------------------------------------


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_encode_and_decode_match_the_library(pair):
    for text in HARD_TEXTS:
        ids = pair.tok.encode(text)
        assert ids == pair.ref_encode(text), text
        assert all(type(i) is int for i in ids)
        assert pair.tok.decode(ids) == pair.ref_decode(ids), text


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_round_trip_wherever_the_library_round_trips(pair):
    round_trips = 0
    for text in HARD_TEXTS:
        if pair.ref_decode(pair.ref_encode(text)) == text:
            assert pair.tok.decode(pair.tok.encode(text)) == text
            round_trips += 1
    # Only the NFKC model may change text (ligatures, spacing); the rest must not.
    assert round_trips == len(HARD_TEXTS) or pair.name == "tiny-sp-nfkc"


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_special_token_text_is_plain_text(pair):
    specials = {pair.tok.special_id(t) for t in ("<s>", "</s>", "<unk>", "<|begin_of_text|>",
                                                   "<|end_of_text|>", "<|eot_id|>")}
    specials |= set(pair.tok.stop_ids) | {pair.tok.bos_id}
    specials.discard(None)
    for text in ["<s>", "</s>", "<|begin_of_text|>", "<|eot_id|>", "a<|eot_id|>b</s>"]:
        ids = pair.tok.encode(text)
        assert not specials & set(ids), text
        assert pair.tok.decode(ids) == text


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_decode_of_arbitrary_ids_matches_the_library(pair):
    rng = random.Random(1)
    tok = pair.tok
    # Mix specials, low ids (SentencePiece byte pieces) and ordinary tokens.
    pool = list(range(min(300, tok.vocab_size))) + tok.stop_ids + [tok.vocab_size - 1]
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == pair.ref_decode(ids), ids


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_decode_accepts_numpy_ids_and_rejects_unknown_ones(pair):
    ids = pair.tok.encode("Hello world")
    assert pair.tok.decode(np.array(ids, dtype=np.int64)) == pair.tok.decode(ids)
    for bad in (-1, pair.tok.vocab_size):
        with pytest.raises(LlamanpError):
            pair.tok.decode([bad])
        with pytest.raises(LlamanpError):
            pair.tok.token_bytes(bad)


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_bos_and_eos_flags(pair):
    tok = pair.tok
    ref = pair.ref_encode("Hello world")
    assert tok.encode("Hello world", bos=True) == [tok.bos_id] + ref
    assert tok.encode("Hello world", eos=True) == ref + [tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]
    assert tok.eos_id in tok.stop_ids
    if pair.kind == "sentencepiece":                 # control pieces print nothing
        assert tok.decode(tok.encode("Hello world", bos=True, eos=True)) == "Hello world"
    # without a BOS token, bos=True adds nothing (transformers' add_special_tokens
    # on SmolLM2 does the same: tests/test_cli.py)
    no_bos = Tokenizer.from_data(dataclasses.replace(tok.data, bos_id=None))
    assert no_bos.encode("hi", bos=True) == no_bos.encode("hi") == pair.ref_encode("hi")


# -- token bytes and the stream decoder --------------------------------------


@pytest.mark.parametrize("pair", TIKTOKEN, indirect=True)
def test_tiktoken_token_bytes_concatenate_to_the_text(pair):
    for text in HARD_TEXTS:
        ids = pair.tok.encode(text, bos=True)
        joined = b"".join(pair.tok.token_bytes(i) for i in ids)
        assert joined == pair.tok.decode(ids).encode("utf-8")


@pytest.mark.parametrize("pair", ["tiny-sp", "llama2"], indirect=True)
def test_sentencepiece_token_bytes(pair):
    tok, sp = pair.tok, pair.ref
    assert tok.token_bytes(tok.bos_id) == b""
    assert tok.token_bytes(sp.piece_to_id("<0x41>")) == b"A"
    assert tok.token_bytes(sp.piece_to_id("<0xE2>")) == b"\xe2"
    assert tok.token_bytes(sp.unk_id()) == sp.decode([sp.unk_id()]).encode()
    # add_dummy_prefix puts a space before the text; token bytes keep it.
    for text in HARD_TEXTS[1:]:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == b" " + text.encode(), text


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_stream_equals_decode(pair):
    tok = pair.tok
    for text in HARD_TEXTS:
        for ids in (tok.encode(text), tok.encode(text, bos=True, eos=True)):
            assert _stream_all(tok, ids) == tok.decode(ids), text


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_stream_after_a_prompt_keeps_the_leading_space(pair):
    tok = pair.tok
    prompt = tok.encode("Prompt:", bos=True)
    for text in HARD_TEXTS:
        generated = tok.encode(text)
        whole = tok.decode(prompt + generated)
        assert tok.decode(prompt) + _stream_all(tok, generated, at_start=False) == whole, text


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_stream_split_anywhere_between_characters(pair):
    tok = pair.tok
    for text in HARD_TEXTS:
        ids = tok.encode(text)
        for k in range(1, len(ids)):
            head = tok.decode(ids[:k])
            # Skip cuts inside a character, and prompts that print nothing yet.
            if not head or "\ufffd" in head or pair.is_byte_piece(ids[k]):
                continue
            assert head + _stream_all(tok, ids[k:], at_start=False) == tok.decode(ids), (text, k)


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_stream_holds_back_a_split_character(pair):
    tok = pair.tok
    ids = tok.encode("ok 👨\u200d👩\u200d👧 ñ 日本")
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
    # An unfinished character comes out of flush as the library decodes it.
    partial = [i for i in tok.encode(" 😀") if tok.token_bytes(i)][:-1]
    if partial:
        stream = tok.stream()
        assert "".join(stream.push(i) for i in partial) + stream.flush() == tok.decode(partial)


@pytest.mark.parametrize("pair", SENTENCEPIECE, indirect=True)
def test_sentencepiece_stream_on_random_pieces(pair):
    """Control, unknown, byte and space pieces in any order still decode alike."""
    tok, sp = pair.tok, pair.ref
    space = [sp.piece_to_id(p) for p in ("▁", "▁▁") if sp.id_to_piece(sp.piece_to_id(p)) == p]
    pool = [sp.bos_id(), sp.eos_id(), sp.unk_id(), *space, *tok.encode("a b")]
    pool += [sp.piece_to_id(f"<0x{b:02X}>") for b in (0x20, 0x41, 0xC3, 0xB1, 0xE2, 0x82, 0xF0)]
    rng = random.Random(2)
    for _ in range(2000):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 6))]
        assert _stream_all(tok, ids) == sp.decode(ids), [sp.id_to_piece(i) for i in ids]


# -- special tokens and known facts ------------------------------------------


@pytest.mark.parametrize("pair", SENTENCEPIECE, indirect=True)
def test_sentencepiece_special_ids(pair):
    tok = pair.tok
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, [2])
    assert tok.special_id("<s>") == 1
    assert tok.special_id("</s>") == 2
    assert tok.special_id("<unk>") == 0
    assert tok.special_id("<|eot_id|>") is None
    assert tok.special_id("▁the") is None            # an ordinary piece is not special


@pytest.mark.parametrize("pair", TIKTOKEN, indirect=True)
def test_llama3_special_tokens(pair):
    tok = pair.tok
    n = tok.vocab_size - 256                          # the specials follow the BPE ranks
    expected = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|finetune_right_pad_id|>": 4,
                "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8,
                "<|eot_id|>": 9, "<|python_tag|>": 10, "<|reserved_special_token_245|>": 255}
    for text, offset in expected.items():
        assert tok.special_id(text) == n + offset, text
    assert tok.bos_id == n and tok.eos_id == n + 1
    assert tok.stop_ids == [n + 1, n + 8, n + 9]
    assert tok.special_id("<s>") is None
    assert tok.decode([n + 9]) == "<|eot_id|>"


@pytest.mark.parametrize("pair", ["llama3"], indirect=True)
def test_llama3_known_values(pair):
    tok = pair.tok
    assert tok.vocab_size == 128256 and tok.bos_id == 128000
    assert tok.encode("Hello world", bos=True) == [128000, 9906, 1917]


@pytest.mark.parametrize("pair", ["llama2"], indirect=True)
def test_llama2_known_values(pair):
    tok = pair.tok
    assert tok.vocab_size == 32000
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]


# -- TokenizerData -------------------------------------------------------------


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_header_round_trip(pair):
    td = pair.tok.data
    header = json.loads(json.dumps(td.header()))
    assert "data" not in header
    again = TokenizerData.from_header(header, td.data)
    assert again == td
    tok = Tokenizer.from_data(again)
    assert tok.encode(HARD_TEXTS[-1]) == pair.tok.encode(HARD_TEXTS[-1])


def test_read_tokenizer_file_detects_the_kind(files):
    sp = read_tokenizer_file(files["tiny-sp"])
    assert (sp.kind, sp.bos_id, sp.eos_id, sp.stop_ids, sp.extra) == (
        "sentencepiece", 1, 2, [2], {})
    assert sp.data == files["tiny-sp"].read_bytes()
    tt = read_tokenizer_file(files["tiny-tiktoken"])
    assert tt.kind == "tiktoken"
    assert tt.extra["pattern"] == LLAMA3_SPLIT
    assert len(tt.extra["special_tokens"]) == 256
    assert tt.bos_id == 266 and tt.stop_ids == [267, 274, 275]    # 266 ranks precede them


def _one_line_error(fn, *args) -> str:
    with pytest.raises(LlamanpError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("bad_header", [
    "not a dict",
    {"kind": "bpe"},
    {"kind": "gpt2", "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": {}},
    {"kind": "sentencepiece", "bos_id": True, "eos_id": 2, "stop_ids": [2], "extra": {}},
    {"kind": "sentencepiece", "bos_id": 1, "eos_id": -2, "stop_ids": [2], "extra": {}},
    {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "stop_ids": 2, "extra": {}},
    {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": []},
    {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": {},
     "chat_template": 5},
    {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": {}, "x": 1},
    {"kind": "tiktoken", "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": {}},
    {"kind": "tiktoken", "bos_id": 1, "eos_id": 2, "stop_ids": [2],
     "extra": {"pattern": ".", "special_tokens": {"<s>": "1"}}},
])
def test_from_header_rejects_nonsense(bad_header):
    _one_line_error(TokenizerData.from_header, bad_header, b"bytes")


def test_from_header_rejects_missing_data():
    header = {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "stop_ids": [2], "extra": {}}
    _one_line_error(TokenizerData.from_header, header, b"")
    _one_line_error(TokenizerData.from_header, header, "text")


def test_from_data_rejects_corrupt_bytes(files):
    sp = read_tokenizer_file(files["tiny-sp"])
    tt = read_tokenizer_file(files["tiny-tiktoken"])
    for td in [dataclasses.replace(sp, data=b"\x0a\x03abc"),
               dataclasses.replace(sp, bos_id=100000),
               dataclasses.replace(tt, data=b"QQ== 0\nnot base64!\n"),
               dataclasses.replace(tt, extra={**tt.extra, "pattern": "("}),
               dataclasses.replace(tt, extra={**tt.extra, "special_tokens": {"<s>": 5}})]:
        _one_line_error(Tokenizer.from_data, td)


@pytest.mark.parametrize("name, content, hint", [
    ("empty.model", b"", "empty"),
    ("garbage.model", bytes(random.Random(3).randrange(256) for _ in range(4096)), "tiktoken"),
    ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE"}}', "tokenizer.json"),
    ("model.gguf", b"GGUF\x03\x00\x00\x00" + bytes(64), "GGUF"),
    ("broken-sp.model", b"\x0a\x05<unk>\x15garbage", "SentencePiece"),
    ("broken-ranks.model", b"IQ== 0\nIg== 1\nthis is not base64 2\n", "line 3"),
    ("gappy-ranks.model", b"IQ== 0\nIg== 5\n", "ranks"),
])
def test_read_errors(tmp_path, name, content, hint):
    path = tmp_path / name
    path.write_bytes(content)
    message = _one_line_error(read_tokenizer_file, path)
    assert str(path) in message and hint in message


def test_read_error_for_a_missing_file_or_a_directory(tmp_path):
    missing = tmp_path / "nope.model"
    message = _one_line_error(read_tokenizer_file, missing)
    assert str(missing) in message and "does not exist" in message
    assert str(tmp_path) in _one_line_error(read_tokenizer_file, tmp_path)
    _one_line_error(load_tokenizer, missing)
