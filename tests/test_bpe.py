"""Tokenizers from Hugging Face and GGUF checkpoints against the reference libraries.

llamanp.convert.tokenizers turns byte-level BPE vocabularies (tokenizer.json,
GGUF "gpt2") into tiktoken ranks, and GGUF SentencePiece vocabularies back
into SentencePiece models. Each is compared token for token with the library
that defines it:

(a) byte-level BPE tokenizers trained here with Hugging Face `tokenizers`
    (GPT-2, SmolLM and Llama 3 pre-tokenizers), read from tokenizer.json;
(b) the same vocabularies given as GGUF metadata;
(c) the real SmolLM2 vocabulary from its GGUF, against `tokenizers` set up with
    SmolLM2's pre-tokenizer, and against transformers' own GGUF loading;
(d) SentencePiece models (a tiny one trained here, and Llama 2's) taken apart
    into GGUF metadata and rebuilt;
(e) inputs that must be refused with a one-line error.
"""

import json
import random
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm

# the shared data folder, and Meta's Llama 3 split regex written out apart from
# llamanp's copy (the references must not share it)
from test_tokenizer import LLAMA3_SPLIT, SHARED  # noqa: E402
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llamanp.convert.tokenizers import tokenizer_from_gguf, tokenizer_from_hf_files
from llamanp.errors import LlamanpError
from llamanp.tokenizer import Tokenizer, TokenizerData

HARD_TEXTS = [
    "",
    " ",
    "   ",
    "hello",
    "Hello world",
    " leading space",
    "trailing space ",
    "  both ends  ",
    "many     spaces   between  words",
    "tabs\tand\t\ttabs\t",
    "one\ntwo",
    "windows\r\nline\r\nends\r\n",
    "paragraph\n\n\nnext",
    "\n",
    "\r\n\r\n",
    "\n\n  \t \n",
    "0123456789",
    "pi is 3.14159, a million is 1,000,000 and 12345678901234567890 is long",
    "abc123def 456 ghi  789\t0 x\n1 y\n\n22",
    "a 1  2   3    4\t5\n6 \n7",
    "version2.0 and v3 and 4th and 100%",
    "café naïve über façade Ñandú señor",
    "cafe\u0301 n\u0303o decomposed accents",
    "日本語のテキスト、中文字符和한국어",
    "emoji 😀🎉 family 👨\u200d👩\u200d👧 flag 🇺🇸 thumbs 👍🏽 england 🏴\U000e0067\U000e0062"
    "\U000e0065\U000e006e\U000e0067\U000e007f",
    'def square(x):\n    return x ** 2  # comment\n\n'
    'if __name__ == "__main__":\n\tprint(square(3))\n',
    '{"key": [1, 2, 3], "quoted": "a\\"b", "nested": {"x": null}}',
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "DON'T you're I'M we'LL they've she'd it's O'Neil",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<tool>call</tool> and <tool>",
    "math: ∀x ∈ ℝ, x² ≥ 0; Ω≈ç√∫µ≤≥÷ ½ ⅓ Ⅻ ٣ ৩",
    "zero\u200bwidth and the \ufb01 ligature, nbsp\u00a0here, ideographic\u3000space",
    "control \x04 chars !\x04! a\x04b \x1d\x1d and \x85 next line \x0b\x0c",
    "Once upon a time there was a little girl named Lily.",
]

WORDS = ("once upon a time there was little girl named lily she liked to play with her toy "
         "in the park one day saw big red ball and happy the of and to in is you that it he "
         "was for on are as with his they at be this have from or one had by word but not "
         "what all were we when your can said there use an each which she do how their if "
         "will up other about out many then them these so some her would make like him into "
         "time has look two more write go see number no way could people my than first water "
         "don't it's you're I'm we'll they've DON'T").split()
EXTRAS = ["café", "naïve", "über", "日本語", "中文", "한국어", "😀", "🎉", "👍🏽", "123", "42",
          "2024", "3.14", "1,000", "\t", "\n", "\n\n", "  ", "    ", "\r\n",
          "x = f(y) + 1;", "def f():", "return x", "# comment", "{}", "[]", "()", "...",
          "<|im_start|>", "ℝ", "√", "½"]


def _training_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 14)):
            parts.append(rng.choice(EXTRAS) if rng.random() < 0.15 else rng.choice(WORDS))
            parts.append(rng.choice([" ", " ", " ", "  ", "\n", ", ", ". ", " "]))
        lines.append("".join(parts))
    return lines


# -- (a) byte-level BPE tokenizers trained with Hugging Face `tokenizers` ---------


def _pre(kind: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        return byte_level
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if kind == "digit-runs":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                        byte_level])
    assert kind == "llama3"
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _train(kind: str, full_alphabet: bool = True, vocab_size: int = 1200) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = _pre(kind)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [])
    tok.train_from_iterator(_training_corpus(), trainer)
    # A non-special added token (recognised in text) and a special one at the end.
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.add_special_tokens([AddedToken("<|eot_id|>", special=True, normalized=False)])
    if kind == "llama3":                     # Llama 3's tokenizer.json takes whole pieces first
        tok = HFTokenizer.from_str(_edit_json(tok, lambda j: j["model"].update(
            ignore_merges=True)))
    return tok


def _edit_json(tok: HFTokenizer, edit) -> str:
    j = json.loads(tok.to_str())
    edit(j)
    return json.dumps(j)


def _save(tok_or_json, directory: Path, config=None, generation=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = tok_or_json if isinstance(tok_or_json, str) else tok_or_json.to_str()
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


# name -> (pre-tokenizer, trained with all 256 bytes, GGUF pre name)
TRAINED = {
    "gpt2": ("gpt2", True, "gpt-2"),
    "gpt2-partial-alphabet": ("gpt2", False, "gpt-2"),   # lacks bytes: they are dropped
    "smollm": ("smollm", True, "smollm"),
    "digit-runs": ("digit-runs", True, None),
    "llama3": ("llama3", True, "llama-bpe"),
}


@pytest.fixture(scope="module")
def trained():
    return {name: _train(kind, full) for name, (kind, full, _) in TRAINED.items()}


class Ref:
    """A `tokenizers` tokenizer as the reference: special-token text is plain
    text, as llamanp encodes user text; non-special added tokens still match."""

    def __init__(self, hf: HFTokenizer):
        self.hf = HFTokenizer.from_str(hf.to_str())
        self.hf.encode_special_tokens = True

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False)


def _stream_all(tok: Tokenizer, ids) -> str:
    stream = tok.stream()
    return "".join(stream.push(i) for i in ids) + stream.flush()


def _compare(tok: Tokenizer, ref, texts, decode_pool=None, rounds=300):
    """Encode and decode as the reference does, on every text and on random ids."""
    for text in texts:
        ids = tok.encode(text)
        expected = ref.encode(text)
        assert ids == expected, (text, ids, expected)
        assert tok.decode(ids) == ref.decode(ids), text
        assert _stream_all(tok, ids) == tok.decode(ids), text
    rng = random.Random(5)
    pool = decode_pool or list(range(tok.vocab_size))
    for _ in range(rounds):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 6))]
        assert tok.decode(ids) == ref.decode(ids), ids


@pytest.mark.parametrize("name", list(TRAINED))
def test_tokenizer_json_matches_tokenizers(trained, tmp_path, name):
    hf = trained[name]
    td = tokenizer_from_hf_files(_save(hf, tmp_path / name))
    assert td.kind == "tiktoken"
    tok = Tokenizer.from_data(td)
    assert tok.vocab_size == hf.get_vocab_size()
    extra_texts = [" ".join(_training_corpus(seed=9, n=40)), "<tool>x<tool><tool >"]
    _compare(tok, Ref(hf), HARD_TEXTS + extra_texts)
    # The specials decode to their text and take their Hugging Face ids.
    vocab = hf.get_vocab()
    for text in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<tool>"):
        assert tok.special_id(text) == vocab[text]
        assert tok.decode([vocab[text]]) == text
    # "<tool>" is a non-special added token: found in text, as Hugging Face does.
    assert vocab["<tool>"] in tok.encode("a <tool> b")
    assert not {vocab[t] for t in ("<|endoftext|>", "<|im_end|>")} & set(
        tok.encode("<|endoftext|><|im_end|>"))
    # The .lmw header round-trips through JSON.
    again = TokenizerData.from_header(json.loads(json.dumps(td.header())), td.data)
    assert again == td
    assert Tokenizer.from_data(again).encode(HARD_TEXTS[17]) == tok.encode(HARD_TEXTS[17])


def test_pre_tokenizer_regexes_split_like_tokenizers():
    """The regexes against the pre-tokenizers themselves, piece by piece."""
    import regex

    from llamanp.convert.tokenizers import (
        DIGIT_RUNS_PATTERN,
        GPT2_PATTERN,
        LLAMA3_PATTERN,
        SINGLE_DIGITS_PATTERN,
    )
    table = {ord(c): b for b, c in _byte_table().items()}
    cases = {GPT2_PATTERN: _pre("gpt2"), SINGLE_DIGITS_PATTERN: _pre("smollm"),
             DIGIT_RUNS_PATTERN: _pre("digit-runs"), LLAMA3_PATTERN: _pre("llama3")}
    rng = random.Random(3)
    alphabet = "ab Z1 9\t\n\r'.,!-é日😀\u00a0\u3000٣½xs'tT"
    texts = HARD_TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                          for _ in range(400)]
    for pattern, pre in cases.items():
        compiled = regex.compile(pattern)
        for text in texts:
            ours = [m.group() for m in compiled.finditer(text)]
            theirs = [bytes(table[ord(c)] for c in piece).decode("utf-8", "replace")
                      for piece, _ in pre.pre_tokenize_str(text)]
            assert ours == theirs, (pattern, text)


def _byte_table() -> dict[int, str]:
    """GPT-2's byte -> character table, checked against the library's alphabet."""
    chars = pre_tokenizers.ByteLevel.alphabet()
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0x100
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    assert sorted(table.values()) == sorted(chars)
    return table


def test_hf_directory_settings(trained, tmp_path):
    hf = trained["smollm"]
    vocab = hf.get_vocab()
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}")
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"},
              "chat_template": template, "add_bos_token": False}
    td = tokenizer_from_hf_files(_save(hf, tmp_path / "a", config, {"eos_token_id": [0, 4]}))
    assert td.bos_id is None                   # add_bos_token false: no BOS is added
    assert td.eos_id == vocab["<|endoftext|>"]
    # EOS, generation_config's ids, and <|im_end|> since the template ends turns with it.
    assert td.stop_ids == [0, 4, vocab["<|eot_id|>"], vocab["<|im_end|>"]]
    assert td.chat_template == template

    # add_bos_token true names the BOS; a template file beside it is read.
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    d = _save(hf, tmp_path / "b", config)
    (d / "chat_template.jinja").write_text("{{ messages }}")
    td = tokenizer_from_hf_files(d)
    assert td.bos_id == vocab["<|im_start|>"] and td.eos_id == vocab["<|im_end|>"]
    assert td.chat_template == "{{ messages }}"
    assert Tokenizer.from_data(td).encode("hi", bos=True)[0] == vocab["<|im_start|>"]

    # Without a config, a post-processor that puts a special token first adds BOS.
    def llama3_post(j):
        j["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [], "special_tokens": {"<|endoftext|>": {
                "id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    td = tokenizer_from_hf_files(_save(_edit_json(hf, llama3_post), tmp_path / "c"))
    assert td.bos_id == 0 and td.eos_id is None and td.chat_template is None

    assert tokenizer_from_hf_files(tmp_path / "empty-dir") is None
    (tmp_path / "nothing").mkdir()
    assert tokenizer_from_hf_files(tmp_path / "nothing") is None


# -- (b) the same vocabularies as GGUF metadata ----------------------------------


def _gguf_meta(hf: HFTokenizer, pre: str, **more) -> dict:
    j = json.loads(hf.to_str())
    n = hf.get_vocab_size()
    tokens, types = [None] * n, [1] * n
    for text, id in j["model"]["vocab"].items():
        tokens[id] = text
    for added in j["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}
    meta.update(more)
    return meta


@pytest.mark.parametrize("name", [n for n, v in TRAINED.items() if v[2]])
def test_gguf_byte_level_matches_tokenizers(trained, name):
    hf = trained[name]
    td = tokenizer_from_gguf(_gguf_meta(hf, TRAINED[name][2]))
    tok = Tokenizer.from_data(td)
    _compare(tok, Ref(hf), HARD_TEXTS, rounds=100)
    # llama.cpp adds BOS for Llama 3 vocabularies unless the file says otherwise.
    assert td.bos_id == (1 if name == "llama3" else None)
    assert td.eos_id == 2 and td.stop_ids == [2]


def test_gguf_stop_ids_and_bos():
    hf = _train("smollm", vocab_size=400)
    meta = _gguf_meta(hf, "smollm", **{
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.eot_token_id": 0,
        "tokenizer.chat_template": "{{ '<|im_start|>' }}{{ content }}{{ '<|im_end|>' }}"})
    meta["tokenizer.ggml.eos_token_id"] = 0
    td = tokenizer_from_gguf(meta)
    assert td.bos_id == 1 and td.eos_id == 0
    assert td.stop_ids == [0, 2]               # eos (= eot), and <|im_end|> from the template
    assert td.chat_template.startswith("{{ '<|im_start|>' }}")
    assert tokenizer_from_gguf({"general.architecture": "llama"}) is None


# -- (c) the real SmolLM2 vocabulary ----------------------------------------------


def _read_gguf_meta(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                meta[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                meta[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == gguf.GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            meta[key] = field.parts[field.data[0]].tolist()[0]
    return meta


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    meta = _read_gguf_meta(smollm2_gguf)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    # The reference: `tokenizers` with SmolLM2's documented pre-tokenizer and decoder.
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    ref.pre_tokenizer = _pre("smollm")
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return meta, tokenizer_from_gguf(meta), Ref(ref)    # its speed: bench/tokenizer.py


def _smollm2_texts() -> list[str]:
    rng = random.Random(11)
    texts = list(HARD_TEXTS)
    # Text in many scripts and symbols, with whitespace and digits in between.
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x370, 0x530), range(0x600, 0x700),
             range(0x900, 0x980), range(0x3040, 0x3100), range(0x4E00, 0x4F00),
             range(0xAC00, 0xAD00), range(0x1F300, 0x1F700), range(0x2000, 0x2070)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.15:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", " \n ", "\u200d"]))
            elif r < 0.3:
                chars.append(str(rng.randint(0, 10 ** rng.randint(1, 8))))
            else:
                chars.append(chr(rng.choice(rng.choice(pools))))
        texts.append("".join(chars))
    texts += [" ".join(_training_corpus(seed=s, n=30)) for s in range(3)]
    return texts


def test_smollm2_gguf_matches_tokenizers(smollm2):
    meta, td, ref = smollm2
    tok = Tokenizer.from_data(td)
    assert tok.vocab_size == 49152 and td.bos_id is None    # add_bos_token is false
    assert td.eos_id == 2 and td.stop_ids == [2]            # <|im_end|>
    assert tok.special_id("<|im_start|>") == 1 and tok.decode([1]) == "<|im_start|>"
    texts = _smollm2_texts()
    _compare(tok, ref, texts, decode_pool=list(range(0, 400)) + list(range(49000, 49152)))
    # Known values (llama.cpp's tokenizer tests agree on the first).
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    # Bytes the vocabulary lacks are dropped, and their neighbours may merge.
    assert tok.encode("!\x04!") == ref.encode("!\x04!") == tok.encode("!!")


def test_smollm2_against_transformers_gguf_loading(smollm2, smollm2_gguf, tmp_path):
    """transformers reads the same GGUF with GPT-2's pre-tokenizer, not SmolLM's:
    it ignores tokenizer.ggml.pre. The two agree except where splitting digits
    off first changes how whitespace before a digit is grouped."""
    transformers = pytest.importorskip("transformers")
    meta, td, ref = smollm2
    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=smollm2_gguf.name)
    tok = Tokenizer.from_data(td)
    agree = differ = 0
    for text in _smollm2_texts():
        theirs = hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        if theirs == ref.encode(text):
            assert tok.encode(text) == theirs
            agree += 1
        else:
            differ += 1
    assert agree > 250
    # The difference: GPT-2's regex keeps one space for " 1", SmolLM's splits 1 off.
    text = "a  1"
    assert tok.encode(text) == ref.encode(text) == [81, 256, 33]
    assert hf.encode(text, add_special_tokens=False) == [81, 216, 216, 33]
    assert hf.decode(tok.encode("Hello world! 123")) == "Hello world! 123"


def test_llama3_vocabulary_as_gguf_gives_the_llama3_ranks():
    """Meta's Llama 3 ranks, written as a "llama-bpe" GGUF vocabulary with merges
    made the way Hugging Face's converter makes them (every split of a token
    into two earlier tokens, by the token's rank, then by the parts' ranks),
    come back as the very same ranks file and specials."""
    import base64

    from llamanp.tokenizer import llama3_special_tokens, read_tokenizer_file

    path = SHARED / "llama3-tokenizer.model"
    if not path.exists():
        pytest.skip(f"{path} is absent (shared test data not checked out)")
    original = read_tokenizer_file(path)
    by_rank = [base64.b64decode(line.split()[0]) for line in original.data.splitlines()]
    ranks = {t: r for r, t in enumerate(by_rank)}
    table = _byte_table()
    text = {t: "".join(table[b] for b in t) for t in by_rank}
    merges = []
    for rank, token in enumerate(by_rank):
        splits = sorted((ranks[token[:k]], ranks[token[k:]], k) for k in range(1, len(token))
                        if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank)
        merges += [f"{text[token[:k]]} {text[token[k:]]}" for _, _, k in splits]
    specials = list(llama3_special_tokens(len(by_rank)))
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": [text[t] for t in by_rank] + specials,
            "tokenizer.ggml.token_type": [1] * len(by_rank) + [3] * len(specials),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 128000,
            "tokenizer.ggml.eos_token_id": 128001, "tokenizer.ggml.eot_token_id": 128009}
    td = tokenizer_from_gguf(meta)
    assert td.data == original.data
    assert td.extra["special_tokens"] == original.extra["special_tokens"]
    assert td.extra["pattern"] == original.extra["pattern"]
    assert (td.bos_id, td.eos_id, td.stop_ids) == (128000, 128001, [128001, 128009])


# -- (d) SentencePiece vocabularies in a GGUF ------------------------------------


def _proto_fields(data: bytes):
    """(field, value) pairs of a serialized protobuf message (enough for ModelProto)."""
    i, out = 0, []
    while i < len(data):
        key, i = _varint_at(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint_at(data, i)
        elif wire == 2:
            n, i = _varint_at(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        else:
            raise ValueError(wire)
        out.append((field, value))
    return out


def _varint_at(data: bytes, i: int):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _sp_to_gguf_meta(model: bytes) -> dict:
    """What llama.cpp's converter stores for a SentencePiece model."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    fields = _proto_fields(model)
    types = [dict(_proto_fields(v)).get(3, 1) for f, v in fields if f == 1]
    normalizer = dict(_proto_fields(next(v for f, v in fields if f == 3)))
    n = sp.vocab_size()
    assert len(types) == n
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_space_prefix": bool(normalizer.get(3, 1)),
    }


def _train_sp(**options) -> bytes:
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus(n=2000)), model_writer=model, vocab_size=600,
        byte_fallback=True, minloglevel=2, num_threads=1, model_type="bpe",
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, **options)
    return model.getvalue()


def _sp_cases():
    cases = {
        "tiny-sp": lambda: _train_sp(split_digits=True, user_defined_symbols=["<tool>"],
                                     control_symbols=["<|im_end|>"]),
        "tiny-sp-no-dummy-prefix": lambda: _train_sp(add_dummy_prefix=False),
    }
    path = SHARED / "llama2-tokenizer.model"
    cases["llama2"] = lambda: path.read_bytes() if path.exists() else pytest.skip(
        f"{path} is absent (shared test data not checked out)")
    return cases


SP_CASES = _sp_cases()


@pytest.mark.parametrize("name", list(SP_CASES))
def test_gguf_sentencepiece_matches_the_original(name):
    original = SP_CASES[name]()
    meta = _sp_to_gguf_meta(original)
    td = tokenizer_from_gguf(meta)
    assert td.kind == "sentencepiece"
    tok = Tokenizer.from_data(td)
    sp = spm.SentencePieceProcessor(model_proto=original)
    assert tok.vocab_size == sp.vocab_size()
    assert (td.bos_id, td.eos_id, td.stop_ids) == (sp.bos_id(), sp.eos_id(), [sp.eos_id()])
    texts = HARD_TEXTS + [" ".join(_training_corpus(seed=4, n=30))]
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    rebuilt = spm.SentencePieceProcessor(model_proto=td.data)
    rng = random.Random(6)
    for _ in range(300):
        ids = [rng.randrange(sp.vocab_size()) for _ in range(rng.randint(1, 6))]
        assert rebuilt.decode(ids) == sp.decode(ids), ids
    for i in range(sp.vocab_size()):
        assert (rebuilt.id_to_piece(i), rebuilt.is_control(i), rebuilt.is_byte(i),
                rebuilt.is_unknown(i)) == (sp.id_to_piece(i), sp.is_control(i), sp.is_byte(i),
                                           sp.is_unknown(i))
    if name == "tiny-sp":                 # a user-defined piece is found in text, a control not
        assert sp.piece_to_id("<tool>") in tok.encode("a<tool>b")
        assert sp.piece_to_id("<|im_end|>") not in tok.encode("a<|im_end|>b")
    if name == "llama2":
        assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]


def test_gguf_sentencepiece_without_bos():
    meta = _sp_to_gguf_meta(SP_CASES["tiny-sp"]())
    meta["tokenizer.ggml.add_bos_token"] = False
    meta["tokenizer.ggml.eot_token_id"] = meta["tokenizer.ggml.tokens"].index("<|im_end|>")
    td = tokenizer_from_gguf(meta)
    assert td.bos_id is None and td.stop_ids == [2, meta["tokenizer.ggml.eot_token_id"]]


def test_hf_directory_with_sentencepiece(tmp_path):
    """A Llama 2 style checkpoint: SentencePiece-derived tokenizer.json beside
    tokenizer.model; the model is used, with later added tokens appended."""
    original = SP_CASES["tiny-sp"]()
    sp = spm.SentencePieceProcessor(model_proto=original)
    n = sp.vocab_size()
    d = tmp_path / "llama2-style"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(original)
    tj = {"version": "1.0", "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
          "pre_tokenizer": None, "decoder": None,
          "model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
          "added_tokens": [
              {"id": 0, "content": "<unk>", "special": True},
              {"id": n, "content": "<|im_start|>", "special": True},
              {"id": n + 1, "content": "<think>", "special": False}]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ '<|im_start|>' }}{{ '<|im_end|>' }}"}))
    td = tokenizer_from_hf_files(d)
    assert td.kind == "sentencepiece"
    tok = Tokenizer.from_data(td)
    assert tok.vocab_size == n + 2
    assert (td.bos_id, td.eos_id) == (1, 2)
    assert td.stop_ids == [2, sp.piece_to_id("<|im_end|>")]
    assert tok.special_id("<|im_start|>") == n
    assert n + 1 in tok.encode("a <think> b")            # user-defined: found in text
    assert tok.decode(tok.encode("a <think> b")) == "a <think> b"
    assert n not in tok.encode("<|im_start|>")
    for text in HARD_TEXTS:
        if "<think>" not in text:
            assert tok.encode(text) == sp.encode(text), text
    # Without tokenizer.json, the tokenizer.model alone.
    (d / "tokenizer.json").unlink()
    td = tokenizer_from_hf_files(d)
    assert td.kind == "sentencepiece" and td.data == original and td.bos_id == 1


# -- (e) refused inputs -------------------------------------------------------------


def _one_line_error(fn, *args) -> str:
    with pytest.raises(LlamanpError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("pre, hint", [
    ("deepseek-llm", "'deepseek-llm'"),
    ("qwen2", "'qwen2'"),
    ("default", "'default'"),
    (None, "tokenizer.ggml.pre"),
])
def test_gguf_unknown_pre_tokenizer(trained, pre, hint):
    meta = _gguf_meta(trained["gpt2"], "gpt-2")
    if pre is None:
        del meta["tokenizer.ggml.pre"]
    else:
        meta["tokenizer.ggml.pre"] = pre
    assert hint in _one_line_error(tokenizer_from_gguf, meta)


def test_gguf_bad_metadata(trained):
    meta = _gguf_meta(trained["gpt2"], "gpt-2")
    assert "'bert'" in _one_line_error(tokenizer_from_gguf,
                                       {**meta, "tokenizer.ggml.model": "bert"})
    assert "tokens" in _one_line_error(tokenizer_from_gguf,
                                       {**meta, "tokenizer.ggml.tokens": "abc"})
    assert "token_type" in _one_line_error(tokenizer_from_gguf,
                                           {**meta, "tokenizer.ggml.token_type": [1, 2]})
    assert "eos" in _one_line_error(tokenizer_from_gguf,
                                    {**meta, "tokenizer.ggml.eos_token_id": 10 ** 6})
    merges = list(meta["tokenizer.ggml.merges"])
    merges[5] = "nonsense"
    assert "merge #5" in _one_line_error(tokenizer_from_gguf,
                                         {**meta, "tokenizer.ggml.merges": merges})
    merges[5] = "qq zz"
    assert "vocabulary" in _one_line_error(tokenizer_from_gguf,
                                           {**meta, "tokenizer.ggml.merges": merges})


def _swap_merge_ids(j):
    """Swap the ids of the tokens two merges make: ids no longer follow the merges."""
    vocab = j["model"]["vocab"]
    merges = j["model"]["merges"]
    first, last = ("".join(m if isinstance(m, list) else m.split(" "))
                   for m in (merges[10], merges[-1]))
    vocab[first], vocab[last] = vocab[last], vocab[first]


def test_ids_out_of_merge_order(trained, tmp_path):
    d = _save(_edit_json(trained["gpt2"], _swap_merge_ids), tmp_path / "swapped")
    assert "merge order" in _one_line_error(tokenizer_from_hf_files, d)
    meta = _gguf_meta(HFTokenizer.from_str(_edit_json(trained["gpt2"], _swap_merge_ids)),
                      "gpt-2")
    assert "merge order" in _one_line_error(tokenizer_from_gguf, meta)


def _set(path, value):
    def edit(j):
        target = j
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, hint", [
    (_set(["normalizer"], {"type": "NFC"}), "normalizer NFC"),
    (_set(["pre_tokenizer"], {"type": "Metaspace", "replacement": "▁"}), "tokenizer.model"),
    (_set(["pre_tokenizer"], {"type": "Whitespace"}), "pre-tokenizer Whitespace"),
    (_set(["pre_tokenizer", "pretokenizers", 0, "pattern", "Regex"], r"\w+"), "Split regex"),
    (_set(["pre_tokenizer", "pretokenizers", 0, "behavior"], "Removed"), "Removed"),
    (_set(["pre_tokenizer", "pretokenizers", 1, "add_prefix_space"], True), "add_prefix_space"),
    (_set(["decoder"], None), "decoder"),
    (_set(["model", "continuing_subword_prefix"], "##"), "continuing_subword_prefix"),
    (_set(["model", "vocab", "zzz-not-merged"], 99999), "not contiguous"),
])
def test_inexpressible_tokenizer_json(trained, tmp_path, edit, hint):
    d = _save(_edit_json(trained["llama3"], edit), tmp_path / "bad")
    assert hint in _one_line_error(tokenizer_from_hf_files, d)


def test_non_bpe_tokenizer_json(tmp_path):
    wp = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(_training_corpus(n=200), trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]"], show_progress=False))
    d = _save(wp, tmp_path / "wordpiece")
    message = _one_line_error(tokenizer_from_hf_files, d)
    assert "'WordPiece'" in message and str(d) in message
    (d / "tokenizer.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(tokenizer_from_hf_files, d)


def test_added_token_flags_are_refused(trained, tmp_path):
    def lstrip(j):
        for t in j["added_tokens"]:
            if t["content"] == "<tool>":
                t["lstrip"] = True
    d = _save(_edit_json(trained["gpt2"], lstrip), tmp_path / "lstrip")
    assert "lstrip" in _one_line_error(tokenizer_from_hf_files, d)


def test_gguf_sentencepiece_bad_input():
    meta = _sp_to_gguf_meta(SP_CASES["tiny-sp"]())
    types = [1 if t == 2 else t for t in meta["tokenizer.ggml.token_type"]]
    message = _one_line_error(tokenizer_from_gguf, {
        **meta, "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": None})
    assert "unknown token" in message
    assert "scores" in _one_line_error(tokenizer_from_gguf,
                                       {**meta, "tokenizer.ggml.scores": [0.0]})


def test_unicode_categories_used_in_texts_are_covered():
    # The hard corpus holds letters, marks, digits of several kinds, and controls.
    cats = {unicodedata.category(c) for t in HARD_TEXTS for c in t}
    assert {"Lu", "Ll", "Lo", "Mn", "Nd", "Nl", "No", "Cc", "Zs", "So", "Sm"} <= cats


def test_encoded_ids_are_python_ints(trained, tmp_path):
    td = tokenizer_from_hf_files(_save(trained["gpt2"], tmp_path / "ints"))
    ids = Tokenizer.from_data(td).encode("a\x04 b <tool> 12")
    assert all(type(i) is int for i in ids)
