"""Check an .lmw file's data against the CRC-32s in its header.

    python -m llamanp.verify MODEL.lmw        (or: llama-np.py -w MODEL.lmw --verify)

Loading a model validates its structure and maps the tensors without reading
them, so that it stays fast; a flipped bit inside a tensor would go unnoticed.
This reads every byte once and compares each region's CRC-32 with the one the
writer recorded as it streamed the region out (format version 3 on, see
docs/lmw-format.md). It prints one line per tensor; the exit status is 0 when
everything matches and 1 when anything is damaged, with one `error:` line that
names the damaged tensors.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from typing import Optional

from . import fileio, lmw
from .cliutil import ArgumentParser, run_main
from .errors import LlamanpError

CHUNK = 16 << 20   # bytes read at a time: a bounded buffer whatever the tensor's size


@dataclass
class RegionCheck:
    name: str       # a tensor's name, or "tokenizer"
    nbytes: int
    expected: int   # the CRC-32 the header gives
    actual: int     # the CRC-32 of the bytes in the file

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


def crc32_of(f, offset: int, nbytes: int, buffer: bytearray) -> int:
    """The CRC-32 of `nbytes` bytes of file `f` from `offset`, read in chunks."""
    f.seek(offset)
    crc, left, view = 0, nbytes, memoryview(buffer)
    while left:
        got = f.readinto(view[:min(left, len(buffer))])
        if not got:
            raise LlamanpError(f"{f.name} ended while being read (was it truncated just now?)")
        crc = zlib.crc32(view[:got], crc)
        left -= got
    return crc


def check_regions(model: lmw.LmwFile, report=None) -> list[RegionCheck]:
    """Compute the CRC-32 of every region the header has one for, in file
    order; `report`, if given, is called with each RegionCheck as it is done."""
    checks = []
    buffer = bytearray(CHUNK)
    order = sorted(model.checksums, key=lambda name: model.regions[name][0])
    with fileio.open_regular(model.path, "model") as f:
        for name in order:
            offset, nbytes = model.regions[name]
            check = RegionCheck(name, nbytes, model.checksums[name],
                                crc32_of(f, offset, nbytes, buffer))
            checks.append(check)
            if report is not None:
                report(check)
    return checks


def verify(path, out=None) -> int:
    """Check `path`, print one line per region to `out` (stdout); return the exit
    status (0 intact; damage raises LlamanpError naming the damaged tensors)."""
    out = out or sys.stdout
    model = lmw.read(path)   # the structure, the header's and the tokenizer's CRCs
    if model.version < lmw.CRC_VERSION:
        print(f"note: {path} is .lmw format version {model.version}, which has no "
              f"CRC-32s: its structure is valid but its data cannot be verified; "
              f"re-convert it to add them", file=sys.stderr)
        return 0

    def report(c: RegionCheck) -> None:
        status = "ok     " if c.ok else "CORRUPT"
        where = "" if c.ok else f" (CRC-32 {c.actual:08x}, header says {c.expected:08x})"
        print(f"{status} {c.name} [{_size(c.nbytes)}]{where}", file=out, flush=True)

    checks = require_intact(model, report)
    print(f"{path}: all {len(checks)} regions match their CRC-32s", file=out)
    return 0


def require_intact(model: lmw.LmwFile, report=None) -> list[RegionCheck]:
    """check_regions, raising one line that names the damaged tensors if any."""
    checks = check_regions(model, report)
    bad = [c.name for c in checks if not c.ok]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise LlamanpError(f"{model.path} is damaged: the data of {bad[0]}{more} does not "
                           "match its CRC-32; re-convert or re-download it")
    return checks


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def add_verify_arguments(parser) -> None:
    """--verify for llama-np.py: check -w MODEL's CRC-32s instead of running it."""
    parser.add_argument("--verify", action="store_true",
                        help="read the whole model, check every tensor against the CRC-32 "
                             "in its header, and exit (0 intact, 1 damaged)")


def main(argv: Optional[list] = None) -> int:
    p = ArgumentParser(prog="python -m llamanp.verify",
                       description="Check every tensor of an .lmw model file against the "
                                   "CRC-32 its header records (exit 0 intact, 1 damaged).")
    p.add_argument("model", metavar="MODEL.lmw")
    return verify(p.parse_args(argv).model)


if __name__ == "__main__":
    sys.exit(run_main(main))
