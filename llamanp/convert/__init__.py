"""Conversion of checkpoints into .lmw files.

One reader per source format turns a checkpoint into a
:class:`~llamanp.convert.checkpoint.Checkpoint` (canonical names and layout);
this module detects the format, fuses the projections the way the .lmw format
stores them, and hands everything to the writer.

    detect(src) ─► reader ─► Checkpoint ─► fuse ─► lmw.write (atomic)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import inputfile, lmw, quant
from ..errors import LlamanpError
from ..tokenizer import Tokenizer, TokenizerData, read_tokenizer_file
from .checkpoint import Checkpoint, check_canonical_tensors

__all__ = ["convert", "read_checkpoint", "detect_format", "fused_tensors", "Checkpoint"]


# --- which reader? ------------------------------------------------------------------

def detect_format(src: Path) -> str:
    """Name the source format of `src` from its contents, not from the user."""
    if src.is_dir():
        if list(src.glob("consolidated.*.pth")) or (src / "params.json").exists():
            return "meta"
        if (src / "config.json").exists():
            return "hf"
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise LlamanpError(f"no checkpoint found in directory {src}: expected "
                           "consolidated.*.pth + params.json (Meta), config.json + "
                           "*.safetensors / pytorch_model.bin (Hugging Face), or one .gguf")
    if not src.exists():
        raise LlamanpError(f"{src} does not exist")
    inputfile.require_regular(src)           # a FIFO or a device is never a checkpoint
    if src.name == "params.json":
        return "meta"
    if src.name == "config.json" or src.name.endswith(".safetensors.index.json") \
            or src.name.endswith(".bin.index.json"):
        return "hf"
    with open(src, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if head == lmw.MAGIC:
        return "lmw"
    from .torchfile import is_zip
    if src.suffix == ".safetensors" or (is_zip(src)
                                        and (src.parent / "config.json").exists()):
        return "hf"
    if is_zip(src):
        return "torch"
    from . import llama2c
    if llama2c.is_llama2c_bin(src):
        return "llama2c-bin"
    raise LlamanpError(f"{src}: unknown checkpoint format; supported are llama2.c .pt/.bin, "
                       "Meta consolidated.*.pth + params.json, Hugging Face directories "
                       "(config.json + safetensors or pytorch_model.bin), GGUF and .lmw")


def read_checkpoint(src) -> Checkpoint:
    src = Path(src)
    kind = detect_format(src)
    if kind == "meta":
        from . import meta
        return meta.read_meta(src.parent if src.is_file() else src)
    if kind == "hf":
        from . import hf
        return hf.read_hf(src.parent if src.is_file() else src)
    if kind == "gguf":
        from . import gguf
        return gguf.read_gguf(src if src.is_file() else sorted(src.glob("*.gguf"))[0])
    if kind == "lmw":
        from .lmwsrc import read_lmw
        return read_lmw(src)
    if kind == "llama2c-bin":
        from . import llama2c
        return llama2c.read_llama2c_bin(src)
    # a torch zip: a llama2.c training checkpoint, or one Meta consolidated shard
    from . import llama2c, torchfile
    obj = torchfile.load(src)
    if llama2c.is_llama2c_pt(obj):
        return llama2c.read_llama2c_pt(src, obj)
    if src.name.startswith("consolidated."):
        from . import meta
        return meta.read_meta(src.parent)
    raise LlamanpError(f"{src} is a PyTorch file but neither a llama2.c checkpoint "
                       "(model_args + model) nor a Meta consolidated.NN.pth")


# --- canonical tensors -> the tensors an .lmw stores -----------------------------------

def _stacked(loads: list[Callable[[], np.ndarray]]) -> Callable[[], np.ndarray]:
    return lambda: np.concatenate([load() for load in loads], axis=0)


_FINITE_CHECK_BLOCK = 1 << 20        # elements checked at a time: a 1 MB mask, not a copy


def first_nonfinite(values: np.ndarray) -> Optional[int]:
    """The flat index of the first NaN or infinity in `values`, or None."""
    flat = values.reshape(-1)
    for start in range(0, flat.size, _FINITE_CHECK_BLOCK):
        block = flat[start:start + _FINITE_CHECK_BLOCK]
        finite = np.isfinite(block)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def _checked_finite(name: str, load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """`load`, refusing a tensor with NaN or infinite values, by name, as it is read.

    A weight that is not finite is corrupt data (a flipped exponent, a broken
    save); converted, it would only show up later as NaN logits.
    """
    def load_finite() -> np.ndarray:
        values = load()
        at = first_nonfinite(values)
        if at is not None:
            index = tuple(int(i) for i in np.unravel_index(at, values.shape))
            raise LlamanpError(f"tensor {name} holds a non-finite value "
                               f"({values.reshape(-1)[at]} at {list(index)}); the checkpoint "
                               "is corrupt (pass --allow-nonfinite to convert it anyway)")
        return values
    return load_finite


def fused_tensors(ckpt: Checkpoint, allow_nonfinite: bool = False) -> list[lmw.TensorSource]:
    """The .lmw tensor list: wq|wk|wv stacked into wqkv, w1|w3 into w13.

    Each source tensor is checked for NaN and infinities as it is read, unless
    `allow_nonfinite`.
    """
    check_canonical_tensors(ckpt.tensors, ckpt.config, ckpt.source or "checkpoint")

    def source(name: str) -> Callable[[], np.ndarray]:
        load = ckpt.tensors[name].load
        return load if allow_nonfinite else _checked_finite(name, load)

    out = []
    for name, shape in lmw.expected_shapes(ckpt.config).items():
        if name.endswith("attention.wqkv.weight"):
            p = name[: -len("wqkv.weight")]
            load = _stacked([source(p + "wq.weight"), source(p + "wk.weight"),
                             source(p + "wv.weight")])
        elif name.endswith("feed_forward.w13.weight"):
            p = name[: -len("w13.weight")]
            load = _stacked([source(p + "w1.weight"), source(p + "w3.weight")])
        else:
            load = source(name)
        out.append(lmw.TensorSource(name, shape, load))
    return out


def _files_read(src: Path, kind: str, tokenizer) -> list[Path]:
    """The files a conversion of `src` reads (an existing OUT must be none of them)."""
    if src.is_dir() or kind in ("meta", "hf") or src.name.startswith("consolidated."):
        directory = src if src.is_dir() else src.parent
        files = list(directory.iterdir())
        if kind == "meta":
            files.append(directory.resolve().parent / "tokenizer.model")
    else:
        files = [src]
    if tokenizer is not None:
        files.append(Path(tokenizer))
    return files


def _refuse_overwriting_sources(src: Path, out: Path, tokenizer) -> None:
    if not out.exists():
        return
    for path in _files_read(src, detect_format(src), tokenizer):
        try:
            same = os.path.samefile(path, out)
        except OSError:
            continue
        if same:
            raise LlamanpError(f"{out} is {path}, which the conversion reads; "
                               "give another output file")


# --- the whole conversion -----------------------------------------------------------------

def convert(src, out, tokenizer=None, force: bool = False,
            progress: Optional[Callable[[int, int, str], None]] = None,
            dtype: str = "f32", allow_nonfinite: bool = False) -> Checkpoint:
    """Convert checkpoint `src` (file or directory) into the .lmw file `out`.

    `tokenizer` (a path) is embedded, overriding any the checkpoint carries.
    `dtype` is how the weights are stored: "f32" (default), "f16", "bf16" or
    "q8_0" (norms always f32; see docs/lmw-format.md §3); computation is
    float32 whatever it is. A weight holding NaN or infinity is refused by
    name unless `allow_nonfinite`. Nothing is written unless the whole
    conversion succeeds, and never over a file the conversion reads.
    """
    quant.check_dtype(dtype)
    out = Path(out)
    if out.exists() and not force:
        raise LlamanpError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise LlamanpError(f"{out} is a directory; give a file name such as model.lmw")
    src = Path(src)
    _refuse_overwriting_sources(src, out, tokenizer)
    tok: Optional[TokenizerData] = None
    if tokenizer is not None:
        inputfile.require_regular(tokenizer)
        tok = read_tokenizer_file(tokenizer)
    ckpt = read_checkpoint(src)
    if tok is not None:
        ckpt.tokenizer = tok
    tensors = fused_tensors(ckpt, allow_nonfinite)
    if ckpt.tokenizer is not None:
        n_tok = Tokenizer.from_data(ckpt.tokenizer).vocab_size
        if n_tok > ckpt.config.vocab_size:
            raise LlamanpError(f"the tokenizer has {n_tok} tokens but the model only "
                               f"{ckpt.config.vocab_size}; is it the right tokenizer?")
    from .. import __version__
    metadata = dict(ckpt.metadata, source_format=ckpt.source, converter=f"llamanp {__version__}")
    lmw.write(out, ckpt.config, tensors, ckpt.tokenizer, metadata, force=force,
              progress=progress, dtype=dtype)
    return ckpt
