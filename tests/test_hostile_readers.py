"""Hostile and corrupt checkpoints: every reader refuses them with one clear line.

Named regression tests for each family of issue 12 (the fuzzer in
test_fuzz.py keeps the contract on mutated inputs; these are the hand-built
cases). Where it matters the input goes through the real ``convert.py``
command line: exit status not 0, exactly one ``error:`` line, no traceback,
no file left behind, bounded time. torch.load is the reference for what
must still load.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_torchfile import StorageRef, TensorRef, handmade_archive

from llamanp import inputfile, lmw
from llamanp.convert import torchfile
from llamanp.errors import LlamanpError, brief

CLI_TIMEOUT = 60


def assert_one_error(rc, stdout, stderr, *mentions) -> str:
    """Non-zero exit, exactly one line on stderr starting with error:, no traceback."""
    assert rc not in (0, None), f"exit 0 for bad input\n{stdout[-500:]}\n{stderr[-500:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-2000:]
    assert len(lines[0]) < 600, f"overlong message: {lines[0][:700]}"
    for m in mentions:
        assert m in lines[0], f"message should mention {m!r}: {lines[0]!r}"
    return lines[0]


def convert_fails(src, tmp_path, *extra, mentions=()) -> str:
    """convert.py SRC OUT fails cleanly and leaves nothing in OUT's directory."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    rc, so, se = run_cli("convert.py", src, out_dir / "m.lmw", *extra, timeout=CLI_TIMEOUT)
    line = assert_one_error(rc, so, se, *mentions)
    assert list(out_dir.iterdir()) == [], f"files left behind: {list(out_dir.iterdir())}"
    return line


# --- a tiny model, written by hand in each source format ----------------------------------

DIM, LAYERS, HEADS, HIDDEN, VOCAB = 8, 1, 2, 16, 12


def canonical_weights(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"tok_embeddings.weight": (VOCAB, DIM), "norm.weight": (DIM,),
         "output.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        w.update({p + "attention_norm.weight": (DIM,), p + "ffn_norm.weight": (DIM,),
                  p + "attention.wq.weight": (DIM, DIM), p + "attention.wk.weight": (DIM, DIM),
                  p + "attention.wv.weight": (DIM, DIM), p + "attention.wo.weight": (DIM, DIM),
                  p + "feed_forward.w1.weight": (HIDDEN, DIM),
                  p + "feed_forward.w2.weight": (DIM, HIDDEN),
                  p + "feed_forward.w3.weight": (HIDDEN, DIM)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in w.items()}


HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight":
            "model.norm.weight", "output.weight": "lm_head.weight"}
HF_LAYER = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj"}


def hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER[rest[:-len('.weight')]]}.weight"


def safetensors_bytes(header: dict, buffer: bytes) -> bytes:
    text = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text)) + text + buffer


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    header, chunks, at = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [at, at + len(raw)]}
        chunks.append(raw)
        at += len(raw)
    path.write_bytes(safetensors_bytes(header, b"".join(chunks)))


HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "hidden_size": DIM, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "num_key_value_heads": HEADS, "intermediate_size": HIDDEN, "vocab_size": VOCAB,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
             "tie_word_embeddings": False}


def write_hf(d, weights=None, config=None):
    d.mkdir(parents=True, exist_ok=True)
    weights = canonical_weights() if weights is None else weights
    write_safetensors(d / "model.safetensors", {hf_name(k): v for k, v in weights.items()})
    (d / "config.json").write_text(json.dumps(HF_CONFIG if config is None else config))
    return d


META_PARAMS = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "vocab_size": VOCAB,
               "multiple_of": 16, "norm_eps": 1e-5}     # hidden: 2*4*8/3 = 21 -> 32


def write_meta(d, params=None):
    d.mkdir(parents=True, exist_ok=True)
    w = canonical_weights()
    hidden = 32
    rng = np.random.default_rng(1)
    for i in range(LAYERS):
        for k, shape in (("w1", (hidden, DIM)), ("w2", (DIM, hidden)), ("w3", (hidden, DIM))):
            w[f"layers.{i}.feed_forward.{k}.weight"] = rng.standard_normal(shape, np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in w.items()}, d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(META_PARAMS if params is None else params))
    return d


def llama2c_args(**changes) -> dict:
    args = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": HEADS,
            "vocab_size": VOCAB, "multiple_of": 16, "max_seq_len": 64, "norm_eps": 1e-5,
            "hidden_dim": HIDDEN}
    args.update(changes)
    return args


def write_llama2c_pt(path, weights=None, **arg_changes):
    weights = canonical_weights() if weights is None else weights
    torch.save({"model_args": llama2c_args(**arg_changes),
                "model": {k: torch.from_numpy(v) for k, v in weights.items()}}, path)
    return path


def test_the_hand_written_models_convert(tmp_path):
    """The baseline every corruption below starts from converts cleanly."""
    for name, src in (("hf", write_hf(tmp_path / "hf")), ("meta", write_meta(tmp_path / "meta")),
                      ("pt", write_llama2c_pt(tmp_path / "ckpt.pt"))):
        out = tmp_path / f"{name}.lmw"
        rc, so, se = run_cli("convert.py", src, out, timeout=CLI_TIMEOUT)
        assert rc == 0, se
        f = lmw.read(out)
        np.testing.assert_array_equal(f.tensors["tok_embeddings.weight"],
                                      canonical_weights()["tok_embeddings.weight"])


# --- family: bounded JSON ------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" * 5000


@pytest.mark.parametrize("text, words", [
    (DEEP, "more than 100 levels deep"),
    ('{"a": ' + HUGE_INT + "}", "an integer of 5000 digits"),
    ('{"a": -' + "9" * 101 + "}", "an integer of 101 digits"),
    ("{not json", "not valid JSON (line 1, column 2)"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_bounded_json_refuses_with_one_line(tmp_path, text, words):
    p = tmp_path / "x.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(inputfile.JsonFileError) as e:
        inputfile.load(p)
    assert words in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_bounded_json_reads_what_json_reads():
    text = json.dumps({"a": [1, -2, 3.5, "x]\\\"[{", None, True, {"b": [[[]]]}],
                       "n": 2**64 - 1})
    assert inputfile.loads(text, "t") == json.loads(text)
    assert inputfile.loads(text.encode(), "t") == json.loads(text)
    nested = "[" * 100 + "]" * 100
    assert inputfile.loads(nested, "t") == json.loads(nested)


def test_bounded_json_size_cap(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 2000 + b"{}")
    with pytest.raises(inputfile.JsonFileError, match="larger than 2000 bytes"):
        inputfile.load(p, limit=2000)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "dir"])
def test_only_regular_files_are_read(tmp_path, special):
    if special == "fifo":
        path = tmp_path / "pipe.json"
        os.mkfifo(path)                          # nobody writes: a plain open would block
    elif special == "dir":
        path = tmp_path
    else:
        path = special
    with pytest.raises(inputfile.JsonFileError, match="not a regular file"):
        inputfile.load(path)


def test_every_json_reader_is_bounded(tmp_path):
    """tokenizer.json, generation_config.json, the .lmw header and /load files all go
    through the bounded loader (config.json, params.json and the safetensors header
    are covered through convert.py below)."""
    from llamanp.console import read_conversation
    from llamanp.convert import hf, tokenizers

    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    with pytest.raises(LlamanpError, match="levels deep"):
        tokenizers._read_json(deep, required=True)
    with pytest.raises(LlamanpError, match="levels deep"):
        hf._read_optional_json(str(deep), "model")
    with pytest.raises(LlamanpError, match="levels deep.*the conversation is unchanged"):
        read_conversation(deep, tokenizer=None)
    fifo = tmp_path / "conv.json"
    os.mkfifo(fifo)
    with pytest.raises(LlamanpError, match="pipe.*the conversation is unchanged"):
        read_conversation(fifo, tokenizer=None)

    header = ('{"config": ' + HUGE_INT + "}").encode()
    blob = lmw.PREAMBLE.pack(lmw.MAGIC, 1, 0, len(header)) + header
    (tmp_path / "x.lmw").write_bytes(blob)
    with pytest.raises(LlamanpError, match="is damaged: header: .*5000 digits"):
        lmw.read(tmp_path / "x.lmw")


@pytest.mark.parametrize("where", ["config.json", "params.json", "safetensors"])
def test_convert_refuses_hostile_json(tmp_path, where):
    if where == "params.json":
        src = write_meta(tmp_path / "m")
        (src / "params.json").write_text('{"dim": ' + HUGE_INT + "}")
        words = "5000 digits"
    else:
        src = write_hf(tmp_path / "h")
        if where == "config.json":
            (src / "config.json").write_text(DEEP)
        else:
            (src / "model.safetensors").write_bytes(
                struct.pack("<Q", len(DEEP)) + DEEP.encode())
        words = "levels deep"
    convert_fails(src, tmp_path, mentions=(words,))


def test_safetensors_dtype_that_is_not_a_string(tmp_path):
    src = write_hf(tmp_path / "h")
    for dtype in (["F32"], {"a": 1}, 5):
        header = {"model.norm.weight": {"dtype": dtype, "shape": [DIM],
                                        "data_offsets": [0, 4 * DIM]}}
        (src / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(4 * DIM)))
        convert_fails(src, tmp_path, mentions=("unknown dtype",))


def test_brief_never_formats_the_whole_value():
    nested = []
    for _ in range(200):
        nested = [nested, nested]                # 2**200 leaves if printed in full
    assert len(brief(nested)) < 200
    assert len(brief(10**10000)) < 40
    assert len(brief(bytearray(10**7))) < 200
    assert len(brief({i: i for i in range(10**5)})) < 200
    assert brief({"a": [1, 2]}) == repr({"a": [1, 2]})


# --- family: plausibility bounds on every config number ---------------------------------------

def test_config_bounds_accept_real_models_and_refuse_the_rest():
    from llamanp.config import Config
    llama31_405b = dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, head_dim=128,
                        hidden_dim=53248, vocab_size=128256, norm_eps=1e-5,
                        rope_theta=500000.0, max_seq_len=131072)
    Config(**llama31_405b).validate()
    Config(**dict(llama31_405b, rope_theta=3.6e9, max_seq_len=1 << 20)).validate()  # Gradient
    for change in ({"n_layers": 10**8}, {"n_layers": 2**64}, {"max_seq_len": 2**40},
                   {"dim": 2**20}, {"vocab_size": 2**30}, {"hidden_dim": 2**30},
                   {"norm_eps": 1e-45}, {"norm_eps": 1.0}, {"norm_eps": float("nan")},
                   {"rope_theta": 1.8e308}, {"rope_theta": 10**400}, {"rope_theta": 0.5}):
        with pytest.raises(LlamanpError, match="invalid model config"):
            Config(**dict(llama31_405b, **change)).validate()


@pytest.mark.parametrize("fmt, change, words", [
    ("pt", {"n_layers": 2**64}, "n_layers"),
    ("pt", {"n_layers": 10**8}, "n_layers"),
    ("pt", {"max_seq_len": 2**40}, "max_seq_len"),
    ("pt", {"norm_eps": 10**400}, "norm_eps"),
    ("pt", {"norm_eps": 1e-45}, "norm_eps"),
    ("hf", {"num_hidden_layers": 10**8}, "n_layers"),
    ("hf", {"rope_theta": 1.8e308}, "rope_theta"),
    ("hf", {"max_position_embeddings": 2**64}, "max_seq_len"),
    ("hf", {"num_hidden_layers": 3}, "say 3 layers but the weights hold 1"),
    ("meta", {"ffn_dim_multiplier": 1e308}, "ffn_dim_multiplier"),
    ("meta", {"ffn_dim_multiplier": float("inf")}, "ffn_dim_multiplier"),
    ("meta", {"n_layers": 2**64}, "n_layers"),
    ("meta", {"rope_theta": 1e-45}, "rope_theta"),
])
def test_readers_refuse_implausible_configs(tmp_path, fmt, change, words):
    """Refused by the bound, quickly: nothing is sized by the number first."""
    from llamanp.convert import read_checkpoint
    if fmt == "pt":
        src = write_llama2c_pt(tmp_path / "ckpt.pt", **change)
    elif fmt == "hf":
        src = write_hf(tmp_path / "hf", config=dict(HF_CONFIG, **change))
    else:
        src = write_meta(tmp_path / "meta", dict(META_PARAMS, **change))
    with pytest.raises(LlamanpError, match=words) as e:
        read_checkpoint(src)
    assert "\n" not in str(e.value)


def test_convert_refuses_a_huge_layer_count_at_once(tmp_path):
    src = write_llama2c_pt(tmp_path / "ckpt.pt", n_layers=10**8)
    convert_fails(src, tmp_path, mentions=("n_layers",))


@pytest.mark.parametrize("changes, words", [
    ({"llama.block_count": 2**32 - 1}, "block_count"),
    ({"llama.context_length": 2**31}, "max_seq_len"),
    ({"llama.attention.layer_norm_rms_epsilon": 1e-45}, "norm_eps"),
    ({"llama.rope.freq_base": 3e38}, "rope_theta"),
])
def test_gguf_metadata_bounds(tmp_path, changes, words):
    from test_gguf import write_variant

    from llamanp.convert import gguf as gguf_reader
    src = write_variant(tmp_path / "m.gguf", metadata_changes=changes)
    with pytest.raises(LlamanpError, match=words):
        gguf_reader.read_gguf(src)


# --- family: zip archives (.pt / .pth / pytorch_model.bin) ------------------------------------


def central_entry(data: bytes, name: str) -> int:
    """Offset of the central-directory header of member `name`."""
    at = data.rfind(b"PK\x05\x06")
    start = struct.unpack_from("<I", data, at + 16)[0]
    while data[start:start + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, start + 28)
        if data[start + 46:start + 46 + n].decode() == name:
            return start
        start += 46 + n + m + k
    raise KeyError(name)


def patched(data: bytes, name: str, **fields) -> bytes:
    """Change central-directory (and, for flags and method, local) header fields."""
    out = bytearray(data)
    c = central_entry(data, name)
    local = struct.unpack_from("<I", data, c + 42)[0]
    where = {"version_needed": [(c + 6, "<H")], "flags": [(c + 8, "<H"), (local + 6, "<H")],
             "method": [(c + 10, "<H"), (local + 8, "<H")], "offset": [(c + 42, "<I")],
             "file_size": [(c + 24, "<I")]}
    for key, value in fields.items():
        for at, fmt in where[key]:
            struct.pack_into(fmt, out, at, value)
    return bytes(out)


def members_of(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_archive(path, members, compress=None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))


def small_pt(tmp_path, name="good.pt"):
    path = tmp_path / name
    torch.save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3)}, path)
    return path, f"{path.stem}/data.pkl"


@pytest.mark.parametrize("fields, words", [
    ({"version_needed": 99}, "version 9.9"),
    ({"method": 9}, "compression method 9"),
    ({"method": 99}, "compression method 99"),
    ({"flags": 1}, "encrypted"),
    ({"file_size": 6}, "holds"),
])
def test_zip_fields_zipfile_would_refuse(tmp_path, fields, words):
    path, pkl = small_pt(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(patched(path.read_bytes(), pkl, **fields))
    with pytest.raises(LlamanpError, match=words) as e:
        torchfile.load(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2])
def test_compressed_data_pkl(tmp_path, method):
    """A re-zipped checkpoint with a deflated data.pkl still loads; a corrupt stream is
    one line; lzma and bzip2 (which zipfile would inflate without bound) are refused."""
    path, pkl = small_pt(tmp_path)
    members = list(members_of(path).items())
    write_archive(tmp_path / "z.pt", members, {pkl: method})
    if method != zipfile.ZIP_DEFLATED:
        with pytest.raises(LlamanpError, match=f"compression method {method}"):
            torchfile.load(tmp_path / "z.pt")
        return
    ours = torchfile.load(tmp_path / "z.pt")
    theirs = torch.load(tmp_path / "z.pt")
    np.testing.assert_array_equal(ours["a"].numpy(), theirs["a"].numpy())
    data = bytearray((tmp_path / "z.pt").read_bytes())
    c = central_entry(bytes(data), pkl)
    local = struct.unpack_from("<I", data, c + 42)[0]
    start = local + 30 + len(pkl)
    data[start + 5:start + 25] = b"\xff" * 20                 # wreck the deflate stream
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(LlamanpError, match="does not inflate|CRC-32|holds") as e:
        torchfile.load(tmp_path / "bad.pt")
    assert "\n" not in str(e.value)


def test_small_members_are_bounded_before_inflating(tmp_path):
    path, pkl = small_pt(tmp_path)
    members = members_of(path)
    byteorder = pkl.replace("data.pkl", "byteorder")
    members[byteorder] = b"\0" * (8 << 20)                    # 8 MiB of zeros: 8 KB deflated
    write_archive(tmp_path / "z.pt", members.items(), {byteorder: zipfile.ZIP_DEFLATED})
    t0 = time.perf_counter()
    with pytest.raises(LlamanpError, match="claims 8388608 bytes"):
        torchfile.load(tmp_path / "z.pt")
    # ... and a directory that lies about the size inflates no more than the limit
    lying = patched((tmp_path / "z.pt").read_bytes(), byteorder, file_size=6)
    (tmp_path / "lie.pt").write_bytes(lying)
    with pytest.raises(LlamanpError, match="holds 65 bytes, not the 6"):
        torchfile.load(tmp_path / "lie.pt")
    assert time.perf_counter() - t0 < 5


def test_multi_disk_end_record_is_one_line(tmp_path):
    """zipfile.is_zipfile itself raises on this one."""
    src = write_llama2c_pt(tmp_path / "ckpt.pt")
    data = bytearray(src.read_bytes())
    struct.pack_into("<I", data, data.rfind(b"PK\x06\x07") + 16, 2)   # zip64 "total disks"
    src.write_bytes(bytes(data))
    convert_fails(src, tmp_path, mentions=("damaged zip",))


def storage_data_offset(data: bytes, name: str) -> int:
    c = central_entry(data, name)
    local = struct.unpack_from("<I", data, c + 42)[0]
    n, m = struct.unpack_from("<HH", data, local + 26)
    return local + 30 + n + m


def test_flipped_byte_in_a_storage_is_caught_by_its_crc(tmp_path):
    src = write_llama2c_pt(tmp_path / "ckpt.pt")
    data = bytearray(src.read_bytes())
    at = storage_data_offset(bytes(data), "ckpt/data/0") + 7
    data[at] ^= 0x10
    src.write_bytes(bytes(data))
    with zipfile.ZipFile(src) as zf:
        assert zf.testzip() == "ckpt/data/0"     # zipfile, the reference, finds it too
    convert_fails(src, tmp_path, mentions=("CRC-32",))


def test_directory_entry_pointing_at_another_member(tmp_path):
    path, _ = small_pt(tmp_path)
    data = path.read_bytes()
    other = struct.unpack_from("<I", data, central_entry(data, "good/data/1") + 42)[0]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(patched(data, "good/data/0", offset=other))
    with pytest.raises(LlamanpError, match="points at a member named good/data/1"):
        torchfile.load(bad)


def test_duplicate_member_names(tmp_path):
    path, _ = small_pt(tmp_path)
    members = list(members_of(path).items())
    members.append(("good/data/0", np.full(6, np.nan, np.float32).tobytes()))
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_archive(tmp_path / "dup.pt", members)
    with pytest.raises(LlamanpError, match="names member good/data/0 twice"):
        torchfile.load(tmp_path / "dup.pt")


# --- family: the restricted unpickler ----------------------------------------------------------

def handmade(path, obj, storages: dict):
    handmade_archive(path, obj, storages)
    return path


def raw_pickle_archive(path, opcodes: bytes):
    write_archive(path, [("hand/data.pkl", opcodes), ("hand/byteorder", b"little")])
    return path


def test_build_cannot_change_the_allow_list(tmp_path):
    """BUILD with a dict state on torch.FloatStorage is refused, and a later valid file
    in the same process still reads as float32 (checked against torch.load)."""
    evil = (b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00"
            b"float64sb.")
    with pytest.raises(LlamanpError, match="set attributes on a StorageType"):
        torchfile.load(raw_pickle_archive(tmp_path / "evil.pt", evil))
    assert torchfile.StorageType("float32").dtype == "float32"
    path = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
    got = torchfile.load(path)["w"]
    assert got.dtype == "float32"
    np.testing.assert_array_equal(got.numpy(), torch.load(path)["w"].numpy())


def test_bytearray_is_not_allowed(tmp_path):
    evil = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\xc0\x85R."   # bytearray(3 << 30)
    with pytest.raises(LlamanpError, match="references builtins.bytearray"):
        torchfile.load(raw_pickle_archive(tmp_path / "evil.pt", evil))


def test_bytearray8_opcode_is_refused_before_it_allocates(tmp_path):
    evil = b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"."   # BYTEARRAY8 of 1 TiB
    with pytest.raises(LlamanpError, match="opcode BYTEARRAY8"):
        torchfile.load(raw_pickle_archive(tmp_path / "evil.pt", evil))


def test_error_messages_never_format_a_huge_value(tmp_path):
    """A persistent id of memoised nested lists would take 2**40 characters to print."""
    ops = b"\x80\x02]q\x00"                        # empty list, memo 0
    for i in range(1, 41):                         # list_i = [list_{i-1}, list_{i-1}]
        ops += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
    ops += b"Q."                                   # BINPERSID on the last
    t0 = time.perf_counter()
    with pytest.raises(LlamanpError, match="unknown persistent id") as e:
        torchfile.load(raw_pickle_archive(tmp_path / "evil.pt", ops))
    assert time.perf_counter() - t0 < 5 and len(str(e.value)) < 400


def test_hash_flooding_keys_are_refused(tmp_path):
    p = (1 << 61) - 1
    colliding = {k * p + 1: 0 for k in range(1, 2000)}   # the same hash, every one
    for obj, words in ((colliding, "key is a int"), ({(1, 2): 0}, "key is a tuple"),
                       ({frozenset([1]): 0}, "key is a frozenset")):
        path = handmade(tmp_path / "evil.pt", obj, {})
        t0 = time.perf_counter()
        with pytest.raises(LlamanpError, match=words):
            torchfile.load(path)
        assert time.perf_counter() - t0 < 5
    # optimizer state is keyed by small ints: still fine, as torch.load reads it
    path = tmp_path / "opt.pt"
    torch.save({"state": {0: {"step": 3}, 1: {"step": 4}}, "names": {"a", "b"}}, path)
    assert torchfile.load(path) == torch.load(path)


@pytest.mark.parametrize("size, stride", [((1000, 16), (0, 1)), ((4, 4), (1, 1)),
                                          ((16, 16), (1, 0)), ((2, 3), (2, 1))])
def test_views_that_reuse_stored_elements_are_refused(tmp_path, size, stride):
    path = handmade(tmp_path / "z.pt", {"w": TensorRef(StorageRef("0", 16), 0, size, stride)},
                    {"0": np.arange(16, dtype=np.float32).tobytes()})
    with pytest.raises(LlamanpError, match="more than once"):
        torchfile.load(path)


def test_views_torch_makes_still_load(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    views = {"t": base.transpose(0, 2), "p": base.permute(1, 2, 0), "s": base[:, 1:, ::2],
             "one": base[:1, :, :1], "empty": base[:, :0]}
    path = tmp_path / "views.pt"
    torch.save(views, path)
    ours, theirs = torchfile.load(path), torch.load(path)
    for k in views:
        np.testing.assert_array_equal(ours[k].numpy(), theirs[k].numpy())


def test_zero_stride_checkpoint_does_not_convert(tmp_path):
    """The 6 KB .pt that became a 1 GB .lmw: now one line, nothing written."""
    big = 1 << 14
    w = {k: torch.from_numpy(v) for k, v in canonical_weights().items()}
    w["tok_embeddings.weight"] = torch.zeros(16).as_strided((big, DIM), (0, 1))
    src = tmp_path / "ckpt.pt"
    torch.save({"model_args": llama2c_args(vocab_size=big), "model": w}, src)
    assert src.stat().st_size < 50_000
    convert_fails(src, tmp_path, mentions=("more than once",))


def test_state_dict_keys_must_be_strings(tmp_path):
    w = {k: torch.from_numpy(v) for k, v in canonical_weights().items()}
    w[7] = torch.ones(2)
    src = tmp_path / "ckpt.pt"
    torch.save({"model_args": llama2c_args(), "model": w}, src)
    convert_fails(src, tmp_path, mentions=("key 7 of type int",))


# --- family: GGUF structure --------------------------------------------------------------------

def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_gguf_arrays_nested_3000_deep(tmp_path):
    value = struct.pack("<IQ", 9, 1) * 3000 + struct.pack("<IQ", 4, 0)
    data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("x")
            + struct.pack("<I", 9) + value)
    (tmp_path / "deep.gguf").write_bytes(data)
    convert_fails(tmp_path / "deep.gguf", tmp_path, mentions=("nests arrays more than 8 deep",))


def gguf_offset_field(data: bytes, name: str) -> int:
    from test_gguf import _tensor_type_offset
    return _tensor_type_offset(data, name) + 4


@pytest.mark.parametrize("edit, words", [
    ("moved", "not a multiple of the alignment"),
    ("overlap", "claim the same bytes"),
])
def test_gguf_tensor_offsets_aligned_and_distinct(tmp_path, edit, words):
    from test_gguf import SMALL, write_case

    from llamanp.convert import gguf as gguf_reader
    src = tmp_path / "m.gguf"
    write_case(SMALL, src)
    data = bytearray(src.read_bytes())
    if edit == "moved":
        at = gguf_offset_field(data, "token_embd.weight")
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] + 4)
    else:
        v = struct.unpack_from("<Q", data, gguf_offset_field(data, "blk.0.attn_v.weight"))[0]
        struct.pack_into("<Q", data, gguf_offset_field(data, "blk.0.attn_k.weight"), v)
    src.write_bytes(bytes(data))
    with pytest.raises(LlamanpError, match=words):
        gguf_reader.read_gguf(src)


# --- family: the conversion itself ------------------------------------------------------------

def test_first_nonfinite_matches_numpy():
    from llamanp.convert import first_nonfinite
    rng = np.random.default_rng(3)
    a = rng.standard_normal(3_000_000).astype(np.float32)
    assert first_nonfinite(a) is None
    for at, bad in ((2_500_001, np.inf), (17, np.nan), (1 << 20, -np.inf)):
        b = a.copy()
        b[at] = bad
        assert first_nonfinite(b.reshape(1000, 3000)) == int(np.flatnonzero(~np.isfinite(b))[0])


@pytest.mark.parametrize("fmt, name, bad", [
    ("pt", "layers.0.attention.wk.weight", np.nan),
    ("hf", "norm.weight", np.inf),
])
def test_nonfinite_weights_are_refused_by_name(tmp_path, fmt, name, bad):
    w = canonical_weights()
    w[name][-1, ...] = bad
    if fmt == "pt":
        src = write_llama2c_pt(tmp_path / "ckpt.pt", w)
    else:
        src = write_hf(tmp_path / "hf", w)
    convert_fails(src, tmp_path, mentions=(f"tensor {name} holds a non-finite value",
                                           "--allow-nonfinite"))
    out = tmp_path / "forced.lmw"
    rc, so, se = run_cli("convert.py", src, out, "--allow-nonfinite", timeout=CLI_TIMEOUT)
    assert rc == 0, se
    f = lmw.read(out)
    stored = (f.tensors["layers.0.attention.wqkv.weight"][DIM:2 * DIM]
              if name.endswith("wk.weight") else f.tensors[name])
    np.testing.assert_array_equal(stored, w[name])           # NaN compares equal here


def test_output_that_is_the_source_is_refused(tmp_path):
    src = write_llama2c_pt(tmp_path / "x.pt")
    before = src.read_bytes()
    convert_fails_in_place = run_cli("convert.py", src, src, "--force", timeout=CLI_TIMEOUT)
    assert_one_error(*convert_fails_in_place, "which the conversion reads")
    assert src.read_bytes() == before
    hf = write_hf(tmp_path / "hf")
    config = (hf / "config.json").read_bytes()
    os.symlink(hf / "config.json", tmp_path / "link.lmw")
    for out in (hf / "config.json", tmp_path / "link.lmw"):
        rc, so, se = run_cli("convert.py", hf, out, "--force", timeout=CLI_TIMEOUT)
        assert_one_error(rc, so, se, "which the conversion reads")
    assert (hf / "config.json").read_bytes() == config
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


SIGTERM_MIDWAY = """
import os, signal, sys
from llamanp.convert import cli

class KillMidway(cli.Progress):
    def __call__(self, done, total, name):
        if done == 3:                 # the temporary file is open and half written
            os.kill(os.getpid(), signal.SIGTERM)

cli.Progress = KillMidway
sys.exit(cli.run(sys.argv[1:]))
"""


def test_sigterm_during_conversion_removes_the_temporary_file(tmp_path):
    import subprocess
    import sys
    src = write_llama2c_pt(tmp_path / "ckpt.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    from conftest import REPO
    proc = subprocess.run([sys.executable, "-c", SIGTERM_MIDWAY, str(src),
                           str(out_dir / "m.lmw")], cwd=REPO, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == "error: terminated"
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("special", ["fifo-src", "dev-zero-src", "fifo-config", "fifo-params",
                                     "dev-zero-tokenizer"])
def test_special_files_are_one_line_never_a_hang(tmp_path, special):
    extra = []
    if special == "fifo-src":
        src = tmp_path / "ckpt.pt"
        os.mkfifo(src)
    elif special == "dev-zero-src":
        src = "/dev/zero"
    elif special == "fifo-config":
        src = write_hf(tmp_path / "hf")
        (src / "config.json").unlink()
        os.mkfifo(src / "config.json")
    elif special == "fifo-params":
        src = write_meta(tmp_path / "meta")
        (src / "params.json").unlink()
        os.mkfifo(src / "params.json")
    else:
        src = write_llama2c_pt(tmp_path / "ckpt.pt")
        extra = ["--tokenizer", "/dev/zero"]
    t0 = time.perf_counter()
    convert_fails(src, tmp_path, *extra)
    assert time.perf_counter() - t0 < 30


def test_every_reader_refuses_a_fifo_without_blocking(tmp_path):
    from llamanp.convert import gguf, llama2c, safetensors
    fifo = tmp_path / "model"
    os.mkfifo(fifo)                                  # nobody writes: a plain open would block
    assert not llama2c.is_llama2c_bin(fifo)
    for read in (llama2c.read_llama2c_bin, torchfile.load, safetensors.load, gguf.read_gguf):
        with pytest.raises(LlamanpError, match="pipe"):
            read(fifo)
