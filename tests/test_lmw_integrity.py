"""The .lmw format's CRC-32s, `llamanp.verify`, and the sizes a header may ask for.

The CRC-32s are checked against zlib's (an independent implementation of the
same polynomial) over the byte ranges docs/lmw-format.md gives; older format
versions, rebuilt here from a new file by the spec, must still load.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import run_cli
from tinymodel import write_tiny

import llamanp
from llamanp import lmw, verify
from llamanp.errors import LlamanpError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("lmw") / "tiny.lmw", vocab=100, seed=3)


def layout(data: bytes):
    """(version, header CRC field, header dict, header length, data start), by the spec."""
    _, version, crc, hlen = struct.unpack_from("<8sIIQ", data, 0)
    return version, crc, json.loads(data[24:24 + hlen]), hlen, (24 + hlen + 63) // 64 * 64


def rebuild(data: bytes, header: dict, version: int, seal: bool = True) -> bytes:
    """The same data section under a new header (sealed with its CRC-32 for
    version 3, the reserved 0 before)."""
    *_, old_start = layout(data)
    hbytes = json.dumps(header).encode()
    start = (24 + len(hbytes) + 63) // 64 * 64
    crc = zlib.crc32(hbytes) if version >= 3 and seal else 0
    return (struct.pack("<8sIIQ", lmw.MAGIC, version, crc, len(hbytes)) + hbytes
            + b"\0" * (start - 24 - len(hbytes)) + data[old_start:])


def test_writer_records_the_crc32_of_every_region(model):
    data = model.read_bytes()
    version, crc, header, hlen, start = layout(data)
    assert version == 3
    assert crc == zlib.crc32(data[24:24 + hlen])
    entries = header["tensors"]
    assert [e["name"] for e in entries] == list(lmw.expected_shapes(lmw.read(model).config))
    for e in entries:
        region = data[start + e["offset"]:start + e["offset"] + e["nbytes"]]
        assert e["crc32"] == f"{zlib.crc32(region):08x}", e["name"]


def test_verify_passes_an_intact_file(model, capsys):
    assert verify.verify(model) == 0
    out = capsys.readouterr().out.splitlines()
    names = list(lmw.read(model).tensors)
    assert [line.split()[1] for line in out[:-1]] == names
    assert all(line.startswith("ok") for line in out[:-1])


@pytest.mark.parametrize("name", ["tok_embeddings.weight", "layers.1.attention.wo.weight",
                                  "norm.weight"])
def test_a_flipped_bit_loads_but_verify_names_the_tensor(model, tmp_path, name):
    f = lmw.read(model)
    offset, nbytes = f.regions[name]
    data = bytearray(model.read_bytes())
    data[offset + nbytes // 2] ^= 0x10
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(bytes(data))
    llamanp.load(bad)             # loading does not read the tensors, so it cannot notice
    with pytest.raises(LlamanpError) as e:
        verify.verify(bad)
    assert name in str(e.value) and "CRC-32" in str(e.value) and "\n" not in str(e.value)


def test_verify_command_lines(model, tmp_path):
    rc, out, err = run_cli("llama-np.py", "-w", model, "--verify")
    assert (rc, err) == (0, "") and out.splitlines()[-1].endswith("match their CRC-32s")
    f = lmw.read(model)
    offset, _ = f.regions["layers.0.feed_forward.w2.weight"]
    data = bytearray(model.read_bytes())
    data[offset] ^= 1
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(bytes(data))
    for cmd in (("-m", "llamanp.verify", bad), ("llama-np.py", "-w", bad, "--verify")):
        if cmd[0] == "-m":
            p = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True)
            rc, out, err = p.returncode, p.stdout, p.stderr
        else:
            rc, out, err = run_cli(*cmd)
        assert rc == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert "layers.0.feed_forward.w2.weight" in lines[0]
        assert "CORRUPT layers.0.feed_forward.w2.weight" in out


def test_a_damaged_header_is_refused_at_load(model, tmp_path):
    data = bytearray(model.read_bytes())
    *_, hlen, _ = layout(data)
    i = data.index(b'"norm_eps"', 24, 24 + hlen)
    j = data.index(b"e-05", i)            # 1e-05 -> 1e-06: valid JSON, a different model
    data[j + 3] = ord("6")
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(bytes(data))
    with pytest.raises(LlamanpError, match="header's CRC-32 does not match"):
        llamanp.load(bad)


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_still_load(model, tmp_path, version):
    """A file as versions 1 and 2 were written (no CRCs, reserved field 0) reads
    to the same tensors; verify says it cannot check it, and succeeds."""
    data = model.read_bytes()
    _, _, header, _, _ = layout(data)
    for e in header["tensors"]:
        del e["crc32"]
    old = tmp_path / f"v{version}.lmw"
    old.write_bytes(rebuild(data, header, version))
    a, b = lmw.read(model), lmw.read(old)
    assert b.version == version and b.checksums == {}
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name], b.tensors[name])
    assert verify.verify(old) == 0


def test_crc_field_must_be_eight_hex_digits(model, tmp_path):
    data = model.read_bytes()
    _, _, header, _, _ = layout(data)
    header["tensors"][1]["crc32"] = 12345
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(rebuild(data, header, 3))
    with pytest.raises(LlamanpError, match="no valid crc32"):
        lmw.read(bad)


@pytest.mark.parametrize("shape", [
    [2**32, 2**32],              # 2**64 values: wraps an int64 product to 0
    [2**33 + 1, 2**31],          # wraps to a small positive count
    [3, 5, 7, 11, 13],           # more axes than any tensor has
    [10**4000 // 10**3990, 1],   # a big Python int, still only checked with Python ints
])
def test_shape_products_are_checked_before_numpy(model, tmp_path, shape):
    data = model.read_bytes()
    _, _, header, _, _ = layout(data)
    header["tensors"][0]["shape"] = shape
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(rebuild(data, header, 3))
    with pytest.raises(LlamanpError) as e:
        lmw.read(bad)
    assert "tok_embeddings.weight" in str(e.value) and "\n" not in str(e.value)


def test_a_huge_layer_count_fails_before_anything_is_sized_by_it(model, tmp_path):
    data = model.read_bytes()
    _, _, header, _, _ = layout(data)
    header["config"]["n_layers"] = 1000     # within the config bounds (1024): the table decides
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(rebuild(data, header, 3))
    with pytest.raises(LlamanpError, match="layers, but the file holds"):
        lmw.read(bad)


def test_a_huge_context_is_one_line_not_an_oserror(model, tmp_path):
    """max_seq_len 2**40 would size the default KV cache (128 TiB here): the
    config's bound refuses it at load, before anything is sized by it."""
    data = model.read_bytes()
    _, _, header, _, _ = layout(data)
    header["config"]["max_seq_len"] = 2**40
    big = tmp_path / "big.lmw"
    big.write_bytes(rebuild(data, header, 3))
    with pytest.raises(LlamanpError) as e:
        llamanp.load(big)
    assert "max_seq_len" in str(e.value) and "\n" not in str(e.value)


def test_reserve_failure_is_one_line():
    """Whatever the bound, a cache the kernel will not map is one line, not ENOMEM."""
    from llamanp.kvcache.base import reserve
    with pytest.raises(LlamanpError, match="cannot reserve .* for the KV cache; pass a smaller"):
        reserve((2, 4, 8, 2**62))    # 2**70 bytes: more than an address space holds


def test_converting_a_damaged_lmw_is_refused(model, tmp_path):
    """convert.py reads .lmw files too; it reads every byte, so it checks them."""
    f = lmw.read(model)
    offset, _ = f.regions["layers.1.feed_forward.w13.weight"]
    data = bytearray(model.read_bytes())
    data[offset + 3] ^= 0x40
    bad = tmp_path / "bad.lmw"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli("convert.py", bad, out / "again.lmw", "--dtype", "q8_0")
    assert rc == 1 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error:") and "layers.1.feed_forward.w13.weight" in err
    assert list(out.iterdir()) == []
    rc, _, err = run_cli("convert.py", model, out / "again.lmw", "--dtype", "q8_0")
    assert rc == 0, err
    assert verify.verify(out / "again.lmw", out=io.StringIO()) == 0
