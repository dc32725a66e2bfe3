"""Reader for Hugging Face Llama checkpoints (transformers' ``LlamaForCausalLM``).

A checkpoint is a directory, as ``save_pretrained`` or the Hub leaves it:

    config.json                      the hyper-parameters (a LlamaConfig)
    model.safetensors                the weights, or, when sharded,
      model-00001-of-0000N.safetensors ... + model.safetensors.index.json
    pytorch_model.bin                older checkpoints: the weights as a torch.save'd
      pytorch_model-00001-of-0000N.bin ... + pytorch_model.bin.index.json
    generation_config.json           optional: bos / eos ids (eos may be a list)
    tokenizer.json, tokenizer.model, tokenizer_config.json   optional: the tokenizer

An index file maps every tensor name to the shard holding it (``weight_map``).
Tensors may be float32, float16 or bfloat16; all come out as float32.

Names (HF on the left, canonical Meta names on the right)::

    model.embed_tokens.weight                          tok_embeddings.weight
    model.layers.{i}.input_layernorm.weight            layers.{i}.attention_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers.{i}.attention.w{q,k,v,o}.weight
    model.layers.{i}.post_attention_layernorm.weight   layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.gate_proj.weight              layers.{i}.feed_forward.w1.weight
    model.layers.{i}.mlp.down_proj.weight              layers.{i}.feed_forward.w2.weight
    model.layers.{i}.mlp.up_proj.weight                layers.{i}.feed_forward.w3.weight
    model.norm.weight                                  norm.weight
    lm_head.weight                                     output.weight

RoPE layout: HF's LlamaAttention rotates "halves": in each head, component j
pairs with component j + head_dim/2. Meta's (canonical) layout rotates
interleaved pairs 2j, 2j+1. HF's conversion script reordered the rows of wq
and wk to make Meta's weights work with rotate-half; this reader undoes that
reordering (:func:`rotate_half_to_interleaved`). The reordering is within each
head, so it needs only head_dim and the number of heads, whatever head_dim is.

Refused, each by name: another model_type or architecture, bias terms
(attention_bias, mlp_bias), an activation other than SiLU, quantized weights,
RoPE scaling other than "llama3", and any tensor the names above do not
cover (the RoPE inverse-frequency buffers some checkpoints save are ignored).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Callable, Optional

import numpy as np

from .. import inputfile
from ..config import Config, RopeScaling
from ..errors import LlamanpError, brief
from ..tokenizer import TokenizerData, read_tokenizer_file
from . import safetensors, torchfile
from .checkpoint import Checkpoint, SourceTensor, check_canonical_tensors, few_names

__all__ = ["read_hf", "rotate_half_to_interleaved", "interleaved_to_rotate_half"]

_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_SENTENCEPIECE_FILE = "tokenizer.model"
_MAX_TEMPLATE_BYTES = 16 << 20      # real chat templates are a few KB

# (single file, index of shards, shard name pattern, what it is), in the order
# transformers looks for them: safetensors first.
_WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json",
     re.compile(r"^model-\d+-of-\d+\.safetensors$"), "safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json",
     re.compile(r"^pytorch_model-\d+-of-\d+\.bin$"), "pytorch_model.bin"),
)

_ARCHITECTURE = "LlamaForCausalLM"
_MODEL_TYPE = "llama"

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
# "model.layers.12.mlp.up_proj.weight" -> ("12", "mlp.up_proj.weight"); no leading zeros
_LAYER_KEY = re.compile(r"^model\.layers\.(0|[1-9][0-9]*)\.(.+)$")
# RoPE buffers older transformers saved (recomputed from the config, so ignored)
_IGNORED_KEY = re.compile(r"^model\.(layers\.[0-9]+\.self_attn\.)?rotary_emb\.inv_freq$")

# LlamaConfig's defaults for fields a config.json may leave out
_DEFAULT_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_MAX_POSITIONS = 2048

_LLAMA3_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings")


# --- small JSON helpers ---------------------------------------------------------------

def _read_json(path: str, where: str) -> dict:
    """A JSON object from a file; any failure is one LlamanpError naming the file."""
    name = os.path.basename(path)
    if not os.path.lexists(path):
        raise LlamanpError(f"{where}: {name} is missing")
    obj = inputfile.load(path, f"{where}: {name}")
    if not isinstance(obj, dict):
        raise LlamanpError(f"{where}: {name} must hold a JSON object")
    return obj


def _read_optional_json(path: str, where: str) -> dict:
    return _read_json(path, where) if os.path.isfile(path) else {}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_REQUIRED = object()


def _config_int(cfg: dict, key: str, where: str, default=_REQUIRED) -> int:
    """A positive integer field of config.json (null counts as absent)."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise LlamanpError(f"{where}: config.json lacks {key}; it is not a complete "
                               "Llama config")
        return default
    if not _is_int(value) or value <= 0:
        raise LlamanpError(f"{where}: config.json {key} must be a positive integer, "
                           f"got {brief(value)}")
    return value


def _positive_number(value, label: str, where: str, default=_REQUIRED) -> float:
    """A positive number from config.json; `label` names the field in messages."""
    if value is None:
        if default is _REQUIRED:
            raise LlamanpError(f"{where}: config.json lacks {label}")
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not 0 < value <= sys.float_info.max:
        raise LlamanpError(f"{where}: config.json {label} must be a positive number, "
                           f"got {brief(value)}")
    return float(value)


# --- is it a model llamanp runs? ----------------------------------------------------------

def _refuse_foreign_models(cfg: dict, where: str) -> None:
    """Anything that is not a plain LlamaForCausalLM is refused, by name."""
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures")
    if model_type is not None and model_type != _MODEL_TYPE:
        raise LlamanpError(f"{where}: config.json model_type is {brief(model_type)}; llamanp "
                           f"converts Llama models (model_type {_MODEL_TYPE!r}) only")
    if architectures is not None:
        if not isinstance(architectures, list):
            raise LlamanpError(f"{where}: config.json architectures must be a list, "
                               f"got {brief(architectures)}")
        others = [a for a in architectures if a != _ARCHITECTURE]
        if others:
            raise LlamanpError(f"{where}: config.json architectures names "
                               f"{', '.join(map(repr, others))}; llamanp converts "
                               f"{_ARCHITECTURE} only")
    if model_type is None and not architectures:
        raise LlamanpError(f"{where}: config.json names neither model_type nor "
                           f"architectures; llamanp converts {_ARCHITECTURE} "
                           f"(model_type {_MODEL_TYPE!r}) only")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise LlamanpError(f"{where}: config.json sets {key}: true, but llamanp runs "
                               "Llama models without bias terms only")
    act = cfg.get("hidden_act")
    if act is not None and act != "silu":
        raise LlamanpError(f"{where}: config.json hidden_act is {brief(act)}; llamanp runs the "
                           "SiLU (SwiGLU) feed-forward of Llama only")
    quantization = cfg.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise LlamanpError(f"{where}: config.json has a quantization_config "
                           f"({method or 'unknown method'}); llamanp converts float32, "
                           "float16 or bfloat16 weights, so use the unquantized model")


# --- RoPE settings --------------------------------------------------------------------------

def _rope_settings(cfg: dict, where: str) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, llama3 scaling or None), from either spelling of the config.

    transformers 4.x and most Hub files: top-level rope_theta and rope_scaling.
    transformers 5 writes rope_parameters, one object holding both.
    """
    params = cfg.get("rope_parameters")
    if params is None:
        theta = _positive_number(cfg.get("rope_theta"), "rope_theta", where,
                                 _DEFAULT_ROPE_THETA)
        return theta, _rope_scaling(cfg.get("rope_scaling"), "rope_scaling", where)
    if not isinstance(params, dict):
        raise LlamanpError(f"{where}: config.json rope_parameters must be an object, "
                           f"got {brief(params)}")
    if params.get("rope_theta") is not None:
        theta = _positive_number(params["rope_theta"], "rope_parameters.rope_theta", where)
    else:   # a hand-edited file may keep the old top-level field
        theta = _positive_number(cfg.get("rope_theta"), "rope_theta", where,
                                 _DEFAULT_ROPE_THETA)
    return theta, _rope_scaling(params, "rope_parameters", where)


def _rope_scaling(scaling, label: str, where: str) -> Optional[RopeScaling]:
    """Llama 3.1's "llama3" frequency scaling, or None; other kinds are refused by name."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise LlamanpError(f"{where}: config.json {label} must be an object or null, "
                           f"got {brief(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise LlamanpError(f"{where}: config.json asks for RoPE scaling {brief(kind)}, which "
                           "llamanp does not implement; it supports none or 'llama3' "
                           "(Llama 3.1)")
    missing = [k for k in _LLAMA3_SCALING_FIELDS if scaling.get(k) is None]
    if missing:
        raise LlamanpError(f"{where}: config.json {label} is 'llama3' but lacks "
                           f"{', '.join(missing)}")
    original = scaling["original_max_position_embeddings"]
    if not _is_int(original) or original <= 0:
        raise LlamanpError(f"{where}: config.json {label}.original_max_position_embeddings "
                           f"must be a positive integer, got {brief(original)}")

    def factor(key: str) -> float:
        return _positive_number(scaling[key], f"{label}.{key}", where)

    return RopeScaling(factor=factor("factor"), low_freq_factor=factor("low_freq_factor"),
                       high_freq_factor=factor("high_freq_factor"),
                       original_max_position_embeddings=original)


# --- the hyper-parameters ---------------------------------------------------------------------

def _tie_flag(cfg: dict, where: str) -> bool:
    value = cfg.get("tie_word_embeddings", False)       # LlamaConfig's default
    if not isinstance(value, bool):
        raise LlamanpError(f"{where}: config.json tie_word_embeddings must be true or "
                           f"false, got {brief(value)}")
    return value


def _hf_config(cfg: dict, tied: bool, where: str) -> Config:
    dim = _config_int(cfg, "hidden_size", where)
    n_heads = _config_int(cfg, "num_attention_heads", where)
    head_dim = _config_int(cfg, "head_dim", where, default=None)
    if head_dim is None:
        if dim % n_heads:
            raise LlamanpError(f"{where}: config.json hidden_size {dim} is not a multiple "
                               f"of num_attention_heads {n_heads}, and no head_dim is given")
        head_dim = dim // n_heads
    theta, scaling = _rope_settings(cfg, where)
    config = Config(
        dim=dim,
        n_layers=_config_int(cfg, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=_config_int(cfg, "num_key_value_heads", where, default=n_heads),
        head_dim=head_dim,
        hidden_dim=_config_int(cfg, "intermediate_size", where),
        vocab_size=_config_int(cfg, "vocab_size", where),
        norm_eps=_positive_number(cfg.get("rms_norm_eps"), "rms_norm_eps", where,
                                  _DEFAULT_NORM_EPS),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=_config_int(cfg, "max_position_embeddings", where,
                                default=_DEFAULT_MAX_POSITIONS),
        tied_embeddings=tied)
    config.validate()
    return config


# --- finding and opening the weight files ------------------------------------------------------

def _weight_files(directory: str, where: str) -> tuple[list[str], str]:
    """The files holding the weights, and what kind they are."""
    names = os.listdir(directory)
    for single, index, shard_pattern, kind in _WEIGHT_LAYOUTS:
        if index in names:
            return _shards_named_by_index(directory, index, where), kind
        if single in names:
            return [os.path.join(directory, single)], kind
        orphans = sorted(n for n in names if shard_pattern.match(n))
        if orphans:
            raise LlamanpError(f"{where} has {orphans[0]} and other shards but no {index} "
                               "to say what is in them; download the index file too")
    raise LlamanpError(f"{where} has a config.json but no weights: expected model.safetensors, "
                       "sharded model-*-of-*.safetensors with model.safetensors.index.json, "
                       "or pytorch_model.bin")


def _shards_named_by_index(directory: str, index: str, where: str) -> list[str]:
    """The distinct shard files an index's weight_map points to, all present."""
    weight_map = _read_json(os.path.join(directory, index), where).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise LlamanpError(f"{where}: {index} has no weight_map of tensor name -> shard file; "
                           "download it again")
    shards = []
    for shard in dict.fromkeys(weight_map.values()):         # distinct, in order
        if os.path.basename(shard) != shard or shard in (".", ".."):
            raise LlamanpError(f"{where}: {index} names shard {brief(shard)}, which is not a plain "
                               "file name; the index is damaged")
        if not os.path.isfile(os.path.join(directory, shard)):
            raise LlamanpError(f"{where}: {index} names shard {shard}, which is not in the "
                               "directory; download the missing file")
        shards.append(os.path.join(directory, shard))
    return shards


def _open_weight_file(path: str, kind: str) -> dict:
    """name -> lazy tensor (SafetensorsTensor or TorchTensor) of one file."""
    if kind == "safetensors":
        return safetensors.load(path)
    return torchfile.state_dict(torchfile.load(path), os.path.basename(path))


def _read_all_weights(paths: list[str], kind: str, where: str) -> dict:
    """Every tensor of every shard, each name once."""
    tensors: dict = {}
    found_in: dict[str, str] = {}
    for path in paths:
        shard = os.path.basename(path)
        for name, tensor in _open_weight_file(path, kind).items():
            if name in tensors:
                raise LlamanpError(f"{where}: {name} is in both {found_in[name]} and {shard}; "
                                   "the shards do not belong together")
            tensors[name], found_in[name] = tensor, shard
    return tensors


# --- names and layout --------------------------------------------------------------------------

def rotate_half_to_interleaved(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Reorder the rows of an HF q/k projection into Meta's interleaved-pair layout.

    Within head h, HF row j (j < head_dim/2) and row j + head_dim/2 form RoPE
    pair j; in Meta's layout that pair is rows 2j and 2j+1. So view each head
    as (2 halves, head_dim/2 rows) and make the half the fastest-moving index.
    """
    cols = w.shape[1]
    halves = w.reshape(n_heads, 2, head_dim // 2, cols)
    return np.ascontiguousarray(halves.transpose(0, 2, 1, 3)).reshape(n_heads * head_dim, cols)


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of :func:`rotate_half_to_interleaved` (Meta -> HF row order)."""
    cols = w.shape[1]
    pairs = w.reshape(n_heads, head_dim // 2, 2, cols)
    return np.ascontiguousarray(pairs.transpose(0, 2, 1, 3)).reshape(n_heads * head_dim, cols)


def _canonical_name(hf_name: str) -> Optional[str]:
    """The Meta name of an HF tensor, or None if the name is not a Llama weight."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_KEY.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _renamed(weights: dict, where: str) -> dict:
    """HF name -> tensor becomes canonical name -> tensor; strangers are refused."""
    renamed, unknown = {}, []
    for hf_name, tensor in weights.items():
        if _IGNORED_KEY.match(hf_name):
            continue
        name = _canonical_name(hf_name)
        if name is None:
            unknown.append(hf_name)
        else:
            renamed[name] = tensor
    if unknown:
        raise LlamanpError(f"{where} has tensor(s) {few_names(sorted(unknown))} that a plain "
                           "LlamaForCausalLM does not; llamanp cannot convert this model")
    return renamed


def _require_float_weights(tensors: dict, where: str) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_floating_point:
            raise LlamanpError(f"{where}: {name} is stored as {tensor.dtype}; llamanp converts "
                               "float32, float16 and bfloat16 weights only (a quantized "
                               "checkpoint? use the unquantized one)")


def _qk_loader(tensor, n_heads: int, head_dim: int) -> Callable[[], np.ndarray]:
    return lambda: rotate_half_to_interleaved(tensor.float32(), n_heads, head_dim)


def _source_tensors(tensors: dict, cfg: Config) -> dict[str, SourceTensor]:
    """Lazy float32 loaders; wq and wk are reordered into the interleaved layout."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("attention.wq.weight"):
            load = _qk_loader(tensor, cfg.n_heads, cfg.head_dim)
        elif name.endswith("attention.wk.weight"):
            load = _qk_loader(tensor, cfg.n_kv_heads, cfg.head_dim)
        else:
            load = tensor.float32
        out[name] = SourceTensor(tuple(tensor.shape), load)
    return out


# --- the tokenizer -------------------------------------------------------------------------------

def _hf_tokenizer_module():
    """llamanp.convert.tokenizers (tokenizer.json support), or None where it is absent."""
    name = f"{__package__}.tokenizers"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _tokenizer_file(directory: str) -> Optional[TokenizerData]:
    """tokenizer.json (through llamanp.convert.tokenizers), else tokenizer.model."""
    module = _hf_tokenizer_module()
    if module is not None:
        data = module.tokenizer_from_hf_files(directory)
        if data is not None:
            return data
    path = os.path.join(directory, _SENTENCEPIECE_FILE)
    return read_tokenizer_file(path) if os.path.isfile(path) else None


def _token_ids(value, key: str, source: str, vocab_size: int, where: str) -> list[int]:
    """An id field of config.json / generation_config.json: null, an int or a list."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if not _is_int(i) or not 0 <= i < vocab_size:
            raise LlamanpError(f"{where}: {source} {key} is {brief(value)}, but token ids must be "
                               f"integers in 0..{vocab_size - 1}")
    return ids


def _add_model_stop_ids(tok: TokenizerData, cfg: dict, generation: dict, vocab_size: int,
                        where: str) -> None:
    """Every eos id the model declares ends generation (Llama 3.1 lists three).

    generation_config.json is what transformers' generate() obeys, config.json
    the fallback. The tokenizer's own bos/eos stand (its reader knows, e.g.,
    when no BOS is added); the model's eos only fills in a missing one.
    """
    def ids(source: dict, name: str, key: str) -> list[int]:
        return _token_ids(source.get(key), key, name, vocab_size, where)

    config_eos = ids(cfg, _CONFIG, "eos_token_id")
    generation_eos = ids(generation, _GENERATION_CONFIG, "eos_token_id")
    model_eos = generation_eos + config_eos
    if tok.eos_id is None and model_eos:
        tok.eos_id = (config_eos or generation_eos)[0]
    tok.stop_ids = list(dict.fromkeys([*tok.stop_ids, *model_eos]))


def _chat_template(directory: str, where: str) -> Optional[str]:
    """chat_template.jinja (newer transformers), else tokenizer_config.json's chat_template."""
    jinja = os.path.join(directory, _CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        try:
            return inputfile.read_bytes(jinja, _MAX_TEMPLATE_BYTES, "chat template") \
                .decode("utf-8")
        except (inputfile.JsonFileError, UnicodeDecodeError) as e:
            raise LlamanpError(f"{where}: cannot read {_CHAT_TEMPLATE_FILE}: {e}") from None
    template = _read_optional_json(os.path.join(directory, _TOKENIZER_CONFIG),
                                   where).get("chat_template")
    if isinstance(template, list):
        # older files list named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _tokenizer(directory: str, cfg: dict, vocab_size: int, where: str) -> Optional[TokenizerData]:
    tok = _tokenizer_file(directory)
    if tok is None:
        return None
    generation = _read_optional_json(os.path.join(directory, _GENERATION_CONFIG), where)
    _add_model_stop_ids(tok, cfg, generation, vocab_size, where)
    if tok.chat_template is None:
        tok.chat_template = _chat_template(directory, where)
    tok.validate()
    return tok


# --- public entry point -----------------------------------------------------------------------

def read_hf(directory) -> Checkpoint:
    """Read a Hugging Face LlamaForCausalLM directory into a Checkpoint."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise LlamanpError(f"{directory} is not a directory; pass the Hugging Face model "
                           "directory (the one holding config.json)")
    where = os.path.basename(os.path.normpath(directory)) or directory
    cfg = _read_json(os.path.join(directory, _CONFIG), where)
    _refuse_foreign_models(cfg, where)
    paths, kind = _weight_files(directory, where)
    tensors = _renamed(_read_all_weights(paths, kind, where), where)
    _require_float_weights(tensors, where)

    # A tied model uses the embedding as its output matrix; transformers then
    # ignores any lm_head.weight the file still carries (.bin files keep one).
    tied = _tie_flag(cfg, where) or "output.weight" not in tensors
    if tied:
        tensors.pop("output.weight", None)
    config = _hf_config(cfg, tied, where)
    check_canonical_tensors(tensors, config, where)

    n = len(paths)
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    return Checkpoint(
        config=config,
        tensors=_source_tensors(tensors, config),
        tokenizer=_tokenizer(directory, cfg, config.vocab_size, where),
        source=f"Hugging Face {kind} ({n} file{'s' if n > 1 else ''})",
        metadata={"hf_weight_files": n, "hf_dtypes": dtypes})
