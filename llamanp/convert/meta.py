"""Reader for Meta's original Llama 2 / Llama 3 checkpoints.

Meta ships a directory holding ``params.json`` (the hyper-parameters) and one
``consolidated.NN.pth`` per model-parallel rank (NN = 00, 01, ...), each a
torch.save'd dict of bfloat16 tensors under the canonical names. With more
than one rank, every large matrix is split the way fairscale split it for
training:

* ColumnParallelLinear (wq, wk, wv, w1, w3, output) holds a slice of the
  *output* features: the shards concatenate along axis 0;
* RowParallelLinear (wo, w2) holds a slice of the *input* features: axis 1;
* the token embedding is a ParallelEmbedding in Llama 2 (split along the
  embedding dimension, axis 1) and a VocabParallelEmbedding in Llama 3 (split
  along the vocabulary, axis 0); which one is read off the shard shapes;
* the RMSNorm weights are replicated: every shard holds the same copy.

``rope.freqs`` (a precomputed buffer in Llama 1/2 files) is ignored.

Defaults for what params.json may leave out, following Meta's code:
n_kv_heads = n_heads; head_dim = dim / n_heads; norm_eps = 1e-5; rope_theta
= 500000 for the Llama 3 family (vocabulary >= 128000) and 10000 otherwise;
max_seq_len = 131072 with use_scaled_rope (Llama 3.1+), 8192 for other Llama 3
models, 4096 otherwise (params.json does not record the trained context).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Optional

import numpy as np

from .. import inputfile
from ..config import Config, RopeScaling
from ..errors import LlamanpError, brief
from ..tokenizer import read_tokenizer_file
from . import torchfile
from .checkpoint import (
    Checkpoint,
    SourceTensor,
    check_canonical_tensors,
    few_names,
    require_float_tensors,
)

_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
_IGNORED_KEYS = {"rope.freqs"}
_LLAMA3_MIN_VOCAB = 128000
_MAX_FFN_MULTIPLIER = 16.0     # Llama 2 70B and Llama 3: 1.3; Llama 3.1 405B: 1.2

# How each tensor kind is split across model-parallel shards (None: replicated).
_SPLIT_AXIS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
}
_EMBEDDING = "tok_embeddings.weight"

# params.json keys that describe architectures llamanp does not run (Llama 4 MoE,
# vision adapters, quantized or LoRA checkpoints...), refused when set.
_UNSUPPORTED_PARAMS = ("moe_args", "vision_args", "quantization_args", "lora_args",
                       "use_qk_norm", "nope_layer_interval", "attention_chunk_size", "ffn_exp")


# --- finding the files ----------------------------------------------------------------

def _checkpoint_dir(path) -> str:
    """The directory itself, or the directory of params.json / a shard."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    raise LlamanpError(f"{path} does not exist")


def _shard_paths(directory: str) -> list[str]:
    """consolidated.00.pth, consolidated.01.pth, ... in rank order, none missing."""
    numbered: dict[int, str] = {}
    for name in os.listdir(directory):
        match = _SHARD_NAME.match(name)
        if not match:
            continue
        rank = int(match.group(1))
        if rank in numbered:
            raise LlamanpError(f"{directory} has both {numbered[rank]} and {name}; "
                               "keep one file per shard number")
        numbered[rank] = name
    if not numbered:
        raise LlamanpError(f"no consolidated.*.pth files in {directory}; a Meta checkpoint "
                           "is consolidated.00.pth (and further shards) plus params.json")
    for rank in range(len(numbered)):
        if rank not in numbered:
            raise LlamanpError(f"{directory} has {len(numbered)} shard files but no "
                               f"consolidated.{rank:02d}.pth; download the missing shard")
    return [os.path.join(directory, numbered[r]) for r in range(len(numbered))]


def _read_params(directory: str) -> dict:
    path = os.path.join(directory, "params.json")
    if not os.path.isfile(path):
        raise LlamanpError(f"{directory}: no params.json beside the consolidated.*.pth "
                           "files; a Meta checkpoint needs it")
    try:
        params = inputfile.load(path)
    except inputfile.JsonFileError as e:
        raise LlamanpError(f"cannot read {path}: {e.problem}") from None
    if not isinstance(params, dict):
        raise LlamanpError(f"{path} must hold a JSON object")
    return params


def _load_shard(path: str) -> dict:
    name = os.path.basename(path)
    tree = torchfile.state_dict(torchfile.load(path), name, "Meta checkpoint shard")
    shard = {k: v for k, v in tree.items() if k not in _IGNORED_KEYS}
    require_float_tensors(shard, name)
    return shard


# --- merging shards ----------------------------------------------------------------------

def _check_same_names(shards: list[dict], names: list[str]) -> None:
    """Every shard must hold exactly the tensors the first one does."""
    first = set(shards[0])
    for shard, name in zip(shards[1:], names[1:]):
        lacking, extra = sorted(first - set(shard)), sorted(set(shard) - first)
        if lacking:
            raise LlamanpError(f"{name} lacks {few_names(lacking)}, which {names[0]} has; "
                               "the shards do not belong together")
        if extra:
            raise LlamanpError(f"{name} has {few_names(extra)}, which {names[0]} lacks; "
                               "the shards do not belong together")


def _kind(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'attention.wq.weight'."""
    if name.startswith("layers."):
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return parts[2]
    return name


def _embedding_axis(part_shape: tuple, n_shards: int, dim: int, where: str) -> int:
    """Llama 3 splits the vocabulary (axis 0), Llama 2 the embedding dimension (axis 1)."""
    if len(part_shape) != 2:
        raise LlamanpError(f"{where}: {_EMBEDDING} is {list(part_shape)}, not a matrix")
    if n_shards == 1 or part_shape[1] == dim:
        return 0
    if part_shape[1] * n_shards == dim:
        return 1
    raise LlamanpError(f"{where}: each shard's {_EMBEDDING} is {list(part_shape)}, which "
                       f"splits neither the vocabulary nor dim {dim} into {n_shards} parts")


def _merged_shape(shape: tuple, axis: Optional[int], n_shards: int) -> tuple:
    if axis is None:
        return shape
    return tuple(n * n_shards if i == axis else n for i, n in enumerate(shape))


def _concatenated(parts: list, axis: Optional[int]) -> Callable[[], np.ndarray]:
    """Read and join the shards only when the writer asks for this tensor."""
    if axis is None or len(parts) == 1:
        return parts[0].float32
    return lambda: np.concatenate([p.float32() for p in parts], axis=axis)


def _check_replicated(name: str, parts: list, shard_names: list[str]) -> None:
    """Norm weights are copies; different copies mean mismatched shards."""
    reference = parts[0].float32()
    for part, shard in zip(parts[1:], shard_names[1:]):
        if part.shape != parts[0].shape or not np.array_equal(part.float32(), reference):
            raise LlamanpError(f"{name} differs between {shard_names[0]} and {shard}, but "
                               "every shard must hold the same copy; the shards do not "
                               "belong together")


def _merge_shards(shards: list[dict], shard_names: list[str], dim: int,
                  where: str) -> tuple[dict[str, SourceTensor], Optional[int]]:
    """Canonical tensors from the shards, plus the axis the embedding was split on."""
    n = len(shards)
    unknown = sorted(k for k in shards[0] if _kind(k) not in _SPLIT_AXIS and k != _EMBEDDING)
    if unknown:
        raise LlamanpError(f"{where} has unexpected tensor(s) {few_names(unknown)}; "
                           "llamanp reads plain Llama models only")
    tensors, embedding_axis = {}, None
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        for part, shard in zip(parts[1:], shard_names[1:]):
            if part.shape != parts[0].shape:
                raise LlamanpError(f"{name} is {list(part.shape)} in {shard} but "
                                   f"{list(parts[0].shape)} in {shard_names[0]}; "
                                   "the shards do not belong together")
        if len(parts[0].shape) not in (1, 2):
            raise LlamanpError(f"{where}: {name} has {len(parts[0].shape)} dimensions; "
                               "a Llama weight has 1 or 2")
        if name == _EMBEDDING:
            axis = embedding_axis = _embedding_axis(parts[0].shape, n, dim, where)
        else:
            axis = _SPLIT_AXIS[_kind(name)]
            if axis is not None and axis >= len(parts[0].shape):
                raise LlamanpError(f"{where}: {name} is {list(parts[0].shape)}, "
                                   "but a 2-d matrix was expected")
        if axis is None and n > 1:
            _check_replicated(name, parts, shard_names)
        tensors[name] = SourceTensor(_merged_shape(parts[0].shape, axis, n),
                                     _concatenated(parts, axis))
    return tensors, embedding_axis


# --- the configuration -------------------------------------------------------------------

def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The SwiGLU width Meta's FeedForward derives from dim (start from 4*dim, take 2/3)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)      # round up to a multiple


def _param_int(params: dict, key: str, where: str, default=None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LlamanpError(f"{where}: params.json {key} must be a positive integer, "
                           f"got {brief(value)}")
    return value


def _param_number(params: dict, key: str, where: str, default) -> float:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not 0 < value <= sys.float_info.max:
        raise LlamanpError(f"{where}: params.json {key} must be a positive number, "
                           f"got {brief(value)}")
    return float(value)


def _refuse_unsupported(params: dict, where: str) -> None:
    features = [k for k in _UNSUPPORTED_PARAMS if params.get(k)]
    if isinstance(params.get("vision_chunk_size"), int) and params["vision_chunk_size"] > 0:
        features.append("vision_chunk_size")
    if features:
        raise LlamanpError(f"{where}: params.json sets {', '.join(features)}: that model is "
                           "not a plain Llama text model, which is all llamanp runs")


def _rope_scaling(params: dict, where: str) -> Optional[RopeScaling]:
    """Llama 3.1+ "use_scaled_rope"; Meta's newer params may override two factors."""
    if not params.get("use_scaled_rope"):
        return None
    defaults = RopeScaling()
    return RopeScaling(
        factor=_param_number(params, "rope_scaling_factor", where, defaults.factor),
        high_freq_factor=_param_number(params, "rope_high_freq_factor", where,
                                       defaults.high_freq_factor))


def _default_max_seq_len(use_scaled_rope: bool, vocab_size: int) -> int:
    if use_scaled_rope:
        return 131072
    return 8192 if vocab_size >= _LLAMA3_MIN_VOCAB else 4096


def _meta_config(params: dict, tensors: dict, tied: bool, where: str) -> Config:
    dim = _param_int(params, "dim", where)
    n_layers = _param_int(params, "n_layers", where)
    n_heads = _param_int(params, "n_heads", where)
    n_kv_heads = (n_heads if params.get("n_kv_heads") is None
                  else _param_int(params, "n_kv_heads", where))
    if params.get("head_dim") is not None:
        head_dim = _param_int(params, "head_dim", where)
    elif dim % n_heads:
        raise LlamanpError(f"{where}: dim {dim} is not a multiple of n_heads {n_heads}")
    else:
        head_dim = dim // n_heads

    if params.get("vocab_size", -1) in (-1, None):   # Meta: "defined later by tokenizer"
        vocab_size = _embedding_rows(tensors, where)
    else:
        vocab_size = _param_int(params, "vocab_size", where)

    hidden_dim = _hidden_dim(params, tensors, dim, where)
    rope_scaling = _rope_scaling(params, where)
    llama3 = vocab_size >= _LLAMA3_MIN_VOCAB
    max_seq_len = _param_int(params, "max_seq_len", where,
                             default=_default_max_seq_len(rope_scaling is not None, vocab_size))
    cfg = Config(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                 head_dim=head_dim, hidden_dim=hidden_dim, vocab_size=vocab_size,
                 norm_eps=_param_number(params, "norm_eps", where, 1e-5),
                 rope_theta=_param_number(params, "rope_theta", where,
                                          500000.0 if llama3 else 10000.0),
                 rope_scaling=rope_scaling, max_seq_len=max_seq_len, tied_embeddings=tied)
    cfg.validate()
    return cfg


def _embedding_rows(tensors: dict, where: str) -> int:
    if _EMBEDDING not in tensors or len(tensors[_EMBEDDING].shape) != 2:
        raise LlamanpError(f"{where} lacks a 2-d {_EMBEDDING}; it is not a Llama checkpoint")
    return tensors[_EMBEDDING].shape[0]


def _hidden_dim(params: dict, tensors: dict, dim: int, where: str) -> int:
    """The w1 width, checked against what Meta's formula makes of params.json."""
    w1 = tensors.get("layers.0.feed_forward.w1.weight")
    if w1 is None:
        raise LlamanpError(f"{where} lacks layers.0.feed_forward.w1.weight; "
                           "it is not a Llama checkpoint")
    multiplier = _param_number(params, "ffn_dim_multiplier", where, None)
    if multiplier is not None and multiplier > _MAX_FFN_MULTIPLIER:
        raise LlamanpError(f"{where}: params.json ffn_dim_multiplier is {multiplier:g}; real "
                           f"models use about 1.3, and more than {_MAX_FFN_MULTIPLIER} is "
                           "no Llama model")
    implied = meta_hidden_dim(dim, _param_int(params, "multiple_of", where, default=256),
                              multiplier)
    if w1.shape[0] != implied:
        raise LlamanpError(f"{where}: params.json implies a feed-forward width of {implied} "
                           f"(from dim, multiple_of, ffn_dim_multiplier) but w1 has "
                           f"{w1.shape[0]} rows; params.json does not belong to these weights")
    return implied


def _is_tied(tensors: dict, shards: list[dict]) -> bool:
    """Tied when there is no output matrix, or it is the embedding's own storage."""
    if "output.weight" not in tensors:
        return True
    embedding = shards[0].get(_EMBEDDING)
    return (len(shards) == 1 and embedding is not None
            and shards[0]["output.weight"].same_data_as(embedding))


# --- public entry point --------------------------------------------------------------------

def read_meta(path) -> Checkpoint:
    """Read a Meta checkpoint directory (or the directory of params.json / a shard)."""
    directory = _checkpoint_dir(path)
    where = os.path.basename(os.path.normpath(directory)) or directory
    shard_paths = _shard_paths(directory)
    params = _read_params(directory)
    _refuse_unsupported(params, where)
    shard_names = [os.path.basename(p) for p in shard_paths]
    shards = [_load_shard(p) for p in shard_paths]
    _check_same_names(shards, shard_names)
    dim = _param_int(params, "dim", where)
    tensors, embedding_axis = _merge_shards(shards, shard_names, dim, where)
    tied = _is_tied(tensors, shards)
    if tied:
        tensors.pop("output.weight", None)
    cfg = _meta_config(params, tensors, tied, where)
    check_canonical_tensors(tensors, cfg, where)
    metadata = {"meta_shards": len(shards)}
    if len(shards) > 1:
        metadata["meta_embedding_split"] = "vocab" if embedding_axis == 0 else "dim"
    plural = "s" if len(shards) > 1 else ""
    return Checkpoint(config=cfg, tensors=tensors,
                      tokenizer=_tokenizer_beside(directory),
                      source=f"Meta consolidated.*.pth ({len(shards)} shard{plural})",
                      metadata=metadata)


def _tokenizer_beside(directory: str):
    """Meta ships tokenizer.model in the model directory (Llama 3) or next to
    it (Llama 2's download puts it in the parent): embed it when present."""
    for candidate in (os.path.join(directory, "tokenizer.model"),
                      os.path.join(os.path.dirname(os.path.normpath(directory)),
                                   "tokenizer.model")):
        if os.path.isfile(candidate):
            return read_tokenizer_file(candidate)
    return None
