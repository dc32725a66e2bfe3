"""The fuzzer behind tests/test_fuzz.py: seeded mutations of every input format,
run in-process in a worker with bounded memory and time.

Usage (what test_fuzz.py does): ``python tests/fuzzing.py JOB.json`` runs the
cases the job names and prints one JSON object: how many cases each format
ran, how each ended, and every case that broke the contract. A case is fully
determined by (format, index, seed), so a failure is reproduced with
``python tests/fuzzing.py --one FORMAT INDEX SEED JOB.json``.

The contract, the one the command lines keep (llamanp.cliutil.run_main turns a
LlamanpError into one `error:` line):
  * refused: a LlamanpError whose message is one line, and nothing left in the
    output directory;
  * same: success, and the result equals the unmutated input's;
  * changed: success with a different result, allowed only where the mutation
    may have changed meaning the format cannot check (weights in formats with
    no checksums, numbers in a config, pickle arguments); the output must then
    still be a valid .lmw with finite weights.
Anything else is a failure: another exception (a traceback on the command
line), MemoryError (the worker runs under RLIMIT_AS), a case that runs past
its alarm (a hang), a file left behind, a pickle that ran code.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import random
import shutil
import signal
import struct
import sys
import time
import traceback
import zipfile
import zlib
from pathlib import Path

CASE_SECONDS = 20          # a case taking longer than this is a hang
CANARY = "LLAMANP_FUZZ_CANARY"

# --- byte-level mutations ------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               10**8, 2**40, 2**63, 2**64 - 1]


def _position(rng: random.Random, n: int) -> int:
    """Half the time in the first KiB, where the headers are."""
    return rng.randrange(min(n, 1024)) if rng.random() < 0.5 else rng.randrange(n)


def flip(data: bytes, rng):
    b = bytearray(data)
    spots = [_position(rng, len(b)) for _ in range(rng.randint(1, 3))]
    for i in spots:
        b[i] ^= rng.randint(1, 255)
    return bytes(b), f"flip bytes at {spots}"


def truncate(data: bytes, rng):
    n = _position(rng, len(data))
    return data[:n], f"truncate to {n} bytes"


def set_word(data: bytes, rng):
    width = rng.choice((4, 8))
    i = _position(rng, max(len(data) - width, 1)) // 4 * 4
    value = rng.choice(INTERESTING) % (1 << (8 * width))
    b = bytearray(data)
    b[i:i + width] = value.to_bytes(width, "little")[:len(b) - i]
    return bytes(b), f"set {width} bytes at {i} to {value}"


def splice(data: bytes, rng):
    i = _position(rng, len(data))
    n = rng.randint(1, 64)
    if rng.random() < 0.5:
        return data[:i] + data[i + n:], f"delete {n} bytes at {i}"
    return data[:i] + bytes(rng.randrange(256) for _ in range(n)) + data[i:], \
        f"insert {n} bytes at {i}"


BYTE_OPS = (flip, truncate, set_word, splice)

# --- JSON mutations ----------------------------------------------------------------------

_HUGE_INT = "9" * 5000
_DEEP = "[" * 100_000 + "]" * 100_000
JSON_VALUES = [0, -1, 1, 2**31, 2**40, 2**64, -(2**63), 1e308, 1e-45, 0.5, True, None,
               "x", "", [], {}, [1, 2], {"a": 1}, "@HUGE@", "@DEEP@", "@NAN@", "@INF@"]


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            yield from _paths(v, prefix + (i,))


def mutate_json(doc, rng):
    """A copy of `doc` with one value replaced, one key dropped or renamed; and
    the text it serialises to (huge numbers and deep nesting as raw text)."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return "@DEEP@", "replace the document"
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    how = rng.random()
    if isinstance(parent, dict) and how < 0.15:
        del parent[key]
        what = f"drop {list(path)}"
    elif isinstance(parent, dict) and how < 0.25:
        parent[str(key) + "_"] = parent.pop(key)
        what = f"rename {list(path)}"
    else:
        value = rng.choice(JSON_VALUES)
        if isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool) \
                and rng.random() < 0.5:
            value = rng.choice([parent[key] * 2, parent[key] + 1, -parent[key],
                                parent[key] * 1000, parent[key] // 2 if
                                isinstance(parent[key], int) else parent[key] / 2])
        parent[key] = value
        what = f"set {list(path)} to {str(value)[:20]}"
    text = json.dumps(doc, allow_nan=True)
    text = (text.replace('"@HUGE@"', _HUGE_INT).replace('"@DEEP@"', _DEEP)
            .replace('"@NAN@"', "NaN").replace('"@INF@"', "Infinity"))
    return text, what


# --- zip structure ---------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")
_CDIR = struct.Struct("<4s6H3L5H2L")   # central directory header, 46 bytes
_LOCAL = struct.Struct("<4s5H3L2H")    # local file header, 30 bytes
# (field index, name) in the central directory header
_CD_FIELDS = [(2, "version needed"), (3, "flags"), (4, "method"), (7, "crc"),
              (8, "compressed size"), (9, "size"), (10, "name length"), (16, "local offset")]


def _central(data: bytes):
    """[(offset of each central directory entry)], EOCD offset."""
    end = data.rfind(b"PK\x05\x06")
    if end < 0:
        return [], -1
    _, _, _, _, count, size, start, _ = _EOCD.unpack_from(data, end)
    entries, pos = [], start
    for _ in range(count):
        if data[pos:pos + 4] != b"PK\x01\x02":
            break
        f = _CDIR.unpack_from(data, pos)
        entries.append(pos)
        pos += _CDIR.size + f[10] + f[11] + f[12]
    return entries, end


def mutate_zip(data: bytes, rng):
    entries, end = _central(data)
    if not entries:
        return flip(data, rng)
    b = bytearray(data)
    pos = rng.choice(entries)
    fields = list(_CDIR.unpack_from(b, pos))
    name = bytes(b[pos + 46:pos + 46 + fields[10]]).decode("utf-8", "replace")
    op = rng.random()
    if op < 0.55:
        index, label = rng.choice(_CD_FIELDS)
        if label == "method":
            value = rng.choice([8, 9, 12, 14, 99])
        elif label == "flags":
            value = fields[3] | rng.choice([1, 8, 0x40, 0x2000])
        elif label == "local offset":
            value = _CDIR.unpack_from(b, rng.choice(entries))[16] + rng.choice([0, 4, -4])
        elif label == "crc":
            value = fields[7] ^ (1 << rng.randrange(32))
        else:
            value = rng.choice([0, 1, fields[index] + 1, max(fields[index] - 1, 0), 0xFFFF])
        limit = 0xFFFF if index < 7 or 10 <= index <= 15 else 0xFFFFFFFF
        fields[index] = max(0, min(value, limit))
        b[pos:pos + 46] = _CDIR.pack(*fields)
        return bytes(b), f"central entry {name}: {label} = {fields[index]}"
    if op < 0.8:
        # the local header's copy of a field, which must agree with the directory
        local = fields[16]
        if b[local:local + 4] != b"PK\x03\x04":
            return flip(data, rng)
        lf = list(_LOCAL.unpack_from(b, local))
        index = rng.choice([1, 2, 3, 6, 7, 8, 9])
        lf[index] = (lf[index] ^ (1 << rng.randrange(16))) & (0xFFFF if index < 6 else 0xFFFFFFFF)
        b[local:local + 30] = _LOCAL.pack(*lf)
        return bytes(b), f"local header of {name}: field {index} = {lf[index]}"
    # a duplicated central directory entry (a second member of the same name)
    size = _CDIR.size + fields[10] + fields[11] + fields[12]
    entry = bytes(b[pos:pos + size])
    sig, disk, cd_disk, n_disk, n, cd_size, cd_start, clen = _EOCD.unpack_from(b, end)
    b[end:end] = entry
    b[end + size:end + size + 22] = _EOCD.pack(sig, disk, cd_disk, n_disk + 1, n + 1,
                                               cd_size + size, cd_start, clen)
    return bytes(b), f"duplicate the central entry of {name}"


# --- pickle opcodes (inside a torch zip, which is rebuilt so that its CRCs match) ----------

_OPCODES = [b"c", b"R", b"b", b"i", b"o", b"\x81", b"\x93", b"P", b"Q", b"(", b"t", b")",
            b"]", b"}", b"s", b"u", b"e", b"a", b"0", b"2", b"q", b"h", b"N", b"\x88",
            b"K", b"J", b"M", b"X", b"\x8c", b"\x94", b"\x95", b"\x97", b"\x98", b"."]


def _evil(rng) -> bytes:
    """A pickle fragment that would run code if a dangerous global were allowed."""
    target = rng.choice([b"posix\nsystem\n", b"os\nsystem\n", b"builtins\neval\n",
                         b"builtins\nexec\n", b"subprocess\ncall\n",
                         b"builtins\n__import__\n", b"builtins\ngetattr\n",
                         b"torch._utils\n_rebuild_tensor_v2\n", b"builtins\nbytearray\n"])
    arg = f"touch {os.environ.get(CANARY, '/nonexistent/x')}".encode()
    return b"c" + target + b"(X" + struct.pack("<I", len(arg)) + arg + b"tR"


def mutate_pickle(pkl: bytes, rng):
    ops = [(op, arg, pos) for op, arg, pos in pickletools.genops(pkl)]
    op, arg, pos = rng.choice(ops[1:]) if len(ops) > 1 else ops[0]
    choice = rng.random()
    if choice < 0.3:
        new = rng.choice(_OPCODES)
        return pkl[:pos] + new + pkl[pos + 1:], f"opcode {op.name} at {pos} -> {new!r}"
    if choice < 0.5 and isinstance(arg, int):
        value = rng.choice([0, 1, -1, 255, 2**31 - 1, 2**40, 10**18, arg + 1, arg * 2])
        enc = b"\x8a" + _long(value)   # LONG1: any integer
        end = ops[ops.index((op, arg, pos)) + 1][2]
        return pkl[:pos] + enc + pkl[end:], f"int {op.name} {arg} at {pos} -> {value}"
    if choice < 0.65 and isinstance(arg, str):
        value = rng.choice(["FloatStorage", "HalfStorage", "DoubleStorage", "LongStorage",
                            "system", "0", "1", "", "x" * 300, arg + "x", "cpu", "cuda"])
        enc = b"X" + struct.pack("<I", len(value.encode())) + value.encode()
        end = ops[ops.index((op, arg, pos)) + 1][2]
        return pkl[:pos] + enc + pkl[end:], f"str {op.name} {arg!r} at {pos} -> {value!r}"
    if choice < 0.8:
        return pkl[:pos] + _evil(rng) + b"0" + pkl[pos:], f"code-running prefix at {pos}"
    end = ops[min(ops.index((op, arg, pos)) + 1, len(ops) - 1)][2]
    return pkl[:pos] + pkl[end:], f"drop opcode {op.name} at {pos}"


def _long(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return bytes([len(raw)]) + raw


def rezip(data: bytes, mutate_member) -> bytes:
    """The torch zip `data` rewritten with one member's bytes changed (CRCs right)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, body in members:
            z.writestr(name, mutate_member(name, body))
    return out.getvalue()


# --- the formats --------------------------------------------------------------------------------

def lmw_split(data: bytes):
    hlen = struct.unpack_from("<Q", data, 16)[0]
    return json.loads(data[24:24 + hlen]), (24 + hlen + 63) // 64 * 64


def lmw_rebuild(data: bytes, header_text: str) -> bytes:
    """The same data section under a new header, its CRC-32 sealed again."""
    _, start = lmw_split(data)
    h = header_text.encode()
    new_start = (24 + len(h) + 63) // 64 * 64
    return (data[:8] + struct.pack("<IIQ", 3, zlib.crc32(h), len(h)) + h
            + b"\0" * (new_start - 24 - len(h)) + data[start:])


def safetensors_rebuild(data: bytes, header_text: str) -> bytes:
    n = struct.unpack_from("<Q", data, 0)[0]
    h = header_text.encode()
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def mutation(fmt: str, target: str, data: bytes, rng: random.Random):
    """(new bytes, description, may_change) for one case of `fmt`."""
    zipped = data[:4] == b"PK\x03\x04"
    r = rng.random()
    if target.endswith(".json"):
        if r < 0.7:
            text, what = mutate_json(json.loads(data), rng)
            return text.encode(), what, True
        new, what = rng.choice(BYTE_OPS)(data, rng)
        return new, what, True
    if fmt == "lmw" and r < 0.35:
        header, _ = lmw_split(data)
        text, what = mutate_json(header, rng)
        return lmw_rebuild(data, text), "header (resealed): " + what, True
    if target.endswith(".safetensors") and r < 0.4:
        n = struct.unpack_from("<Q", data, 0)[0]
        text, what = mutate_json(json.loads(data[8:8 + n]), rng)
        return safetensors_rebuild(data, text), "header: " + what, True
    if zipped and r < 0.35:
        new, what = mutate_zip(data, rng)
        return new, what, False
    if zipped and r < 0.7:
        desc = []

        def member(name, body):
            if name.endswith("data.pkl"):
                body, what = mutate_pickle(body, rng)
                desc.append(what)
            return body
        return rezip(data, member), "data.pkl: " + "".join(desc), True
    new, what = rng.choice(BYTE_OPS)(data, rng)
    # checked formats must refuse a change or not be changed by it: the torch zips
    # (CRC-32 of each member), .lmw (header CRC at load, tensors by verify)
    checked = zipped or fmt == "lmw"
    return new, what, not checked


# --- running one case ---------------------------------------------------------------------------

class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_entry(fmt: str, src: Path, out_dir: Path, extra: dict):
    """Run the entry point of `fmt` on src; return a comparable result."""
    if fmt in ("tokenizer",):
        from llamanp.tokenizer import Tokenizer, read_tokenizer_file
        data = read_tokenizer_file(src)
        tok = Tokenizer.from_data(data)
        return [data.kind, tok.vocab_size, tok.encode("the little cat saw a dog", bos=False)]
    if fmt == "chat":
        from llamanp.console import read_conversation
        from llamanp.tokenizer import load_tokenizer
        return read_conversation(src, load_tokenizer(extra["tokenizer"]))
    if fmt == "lmw":
        from llamanp import lmw, verify
        f = lmw.read(src)
        verify.verify(src, out=io.StringIO())
        return {name: bytes(memoryview(_raw(t))) for name, t in f.tensors.items()} | {
            "@config": repr(f.config), "@tokenizer": f.tokenizer and f.tokenizer.data}
    from llamanp.convert import convert
    out = out_dir / "model.lmw"
    convert(src, out, dtype="f32")
    return out.read_bytes()


def _raw(t):
    import numpy as np
    return np.ascontiguousarray(t if isinstance(t, np.ndarray) else t.data)


def check_output(fmt: str, result, out_dir: Path) -> str:
    """'' if a changed result is still a valid .lmw with finite weights."""
    if fmt in ("tokenizer", "chat", "lmw"):
        return ""
    import numpy as np

    from llamanp import lmw
    f = lmw.read(out_dir / "model.lmw")
    for name, t in f.tensors.items():
        values = np.asarray(t) if isinstance(t, np.ndarray) else t.widen()
        if not np.isfinite(values).all():
            return f"converted with non-finite values in {name}"
    return ""


def run_case(job: dict, fmt: str, index: int, seed: int, work: Path, baseline) -> dict:
    spec = job["formats"][fmt]
    rng = random.Random(f"{fmt}/{index}/{seed}")
    target = rng.choice(spec["targets"])
    src_root = Path(spec["source"])
    original = (src_root / target if src_root.is_dir() else src_root).read_bytes()
    data, what, may_change = mutation(fmt, target, original, rng)
    case_dir = work / f"case-{fmt}"
    shutil.rmtree(case_dir, ignore_errors=True)
    out_dir = case_dir / "out"
    out_dir.mkdir(parents=True)
    if src_root.is_dir():
        src = case_dir / src_root.name
        src.mkdir()
        for p in src_root.iterdir():
            if p.name != target:
                os.link(p, src / p.name)
        (src / target).write_bytes(data)
    else:
        src = case_dir / src_root.name
        src.write_bytes(data)
    record = {"format": fmt, "index": index, "seed": seed, "target": target, "mutation": what}
    signal.alarm(CASE_SECONDS)
    try:
        result = run_entry(fmt, src, out_dir, spec)
        signal.alarm(0)
    except Hang:
        return dict(record, outcome="fail", why=f"no answer within {CASE_SECONDS} s")
    except MemoryError:
        signal.alarm(0)
        return dict(record, outcome="fail", why="MemoryError: memory not bounded")
    except Exception as e:
        signal.alarm(0)
        from llamanp.errors import LlamanpError
        if not isinstance(e, LlamanpError):
            return dict(record, outcome="fail", why="traceback: " +
                        "".join(traceback.format_exception_only(type(e), e)).strip()[-300:],
                        where=traceback.format_tb(e.__traceback__)[-1].strip()[-300:])
        message = str(e)
        left = sorted(p.name for p in out_dir.iterdir())
        if "\n" in message or not message:
            return dict(record, outcome="fail", why=f"error message not one line: {message!r}")
        if left:
            return dict(record, outcome="fail", why=f"files left behind: {left}")
        return dict(record, outcome="refused", message=message, path=str(src))
    finally:
        signal.alarm(0)
    canary = os.environ.get(CANARY)
    if canary and os.path.exists(canary):
        return dict(record, outcome="fail", why="a pickle ran code (canary file exists)")
    if fmt not in ("tokenizer", "chat", "lmw"):
        left = sorted(p.name for p in out_dir.iterdir())
        if left != ["model.lmw"]:
            return dict(record, outcome="fail", why=f"files beside the output: {left}")
    if result == baseline:
        return dict(record, outcome="same", path=str(src))
    if not may_change:
        return dict(record, outcome="fail", why="a change the format checks was accepted "
                                                 "and gave a different result")
    problem = check_output(fmt, result, out_dir)
    if problem:
        return dict(record, outcome="fail", why=problem)
    return dict(record, outcome="changed", path=str(src))


def run_job(job: dict, keep: Path) -> dict:
    """All cases of the job; keeps a few inputs per outcome under `keep` for the
    command-line runs."""
    signal.signal(signal.SIGALRM, _alarm)
    work = Path(job["work"])
    summary = {"counts": {}, "failures": [], "kept": [], "seconds": {}}
    for fmt, spec in job["formats"].items():
        t0 = time.perf_counter()
        base_dir = work / f"base-{fmt}"
        shutil.rmtree(base_dir, ignore_errors=True)
        base_dir.mkdir(parents=True)
        baseline = run_entry(fmt, Path(spec["source"]), base_dir, spec)
        counts = summary["counts"].setdefault(fmt, {})
        for index in range(spec["cases"]):
            r = run_case(job, fmt, index, job["seed"], work, baseline)
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            if r["outcome"] == "fail":
                summary["failures"].append(r)
            elif sum(1 for k in summary["kept"] if k["format"] == fmt
                     and k["outcome"] == r["outcome"]) < 2:
                src = Path(r["path"])
                dest = keep / f"{fmt}-{index}" / src.name   # messages name the file
                dest.parent.mkdir(parents=True)
                shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)
                summary["kept"].append(dict(r, path=str(dest), case_path=r["path"]))
        summary["seconds"][fmt] = round(time.perf_counter() - t0, 2)
        shutil.rmtree(work / f"case-{fmt}", ignore_errors=True)
    return summary


def main(argv) -> int:
    if argv[0] == "--one":
        fmt, index, seed, job_path = argv[1], int(argv[2]), int(argv[3]), argv[4]
        job = json.loads(Path(job_path).read_text())
        signal.signal(signal.SIGALRM, _alarm)
        work = Path(job["work"])
        spec = job["formats"][fmt]
        base_dir = work / f"base-{fmt}"
        shutil.rmtree(base_dir, ignore_errors=True)
        base_dir.mkdir(parents=True)
        baseline = run_entry(fmt, Path(spec["source"]), base_dir, spec)
        print(json.dumps(run_case(job, fmt, index, seed, work, baseline), indent=1))
        return 0
    job = json.loads(Path(argv[0]).read_text())
    keep = Path(job["keep"])
    keep.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_job(job, keep)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
