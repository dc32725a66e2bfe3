"""llama2.c (.pt, .bin v0/v1) and Meta (consolidated.NN.pth) readers.

Every source file is written here from random torch tensors, following the
published formats, and each reader must hand back exactly those tensors.
"""

import json
import struct

import numpy as np
import pytest
import torch

from llamanp.config import RopeScaling
from llamanp.convert import llama2c, meta, torchfile
from llamanp.convert.checkpoint import canonical_shapes, layer_tensor_names
from llamanp.errors import LlamanpError

# --- a tiny model ----------------------------------------------------------------------

def random_weights(dim=16, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=40, vocab=24,
                   tied=True, seed=0) -> dict:
    """Meta-named weights; a tied output is the embedding object itself (one storage)."""
    g = torch.Generator().manual_seed(seed)
    head_dim = dim // n_heads

    def r(*shape):
        return torch.randn(*shape, generator=g)
    w = {"tok_embeddings.weight": r(vocab, dim)}
    for i in range(n_layers):
        names = layer_tensor_names(i)
        shapes = [(dim,), (n_heads * head_dim, dim), (n_kv_heads * head_dim, dim),
                  (n_kv_heads * head_dim, dim), (dim, n_heads * head_dim), (dim,),
                  (hidden_dim, dim), (dim, hidden_dim), (hidden_dim, dim)]
        w.update({n: r(*s) for n, s in zip(names, shapes)})
    w["norm.weight"] = r(dim)
    w["output.weight"] = w["tok_embeddings.weight"] if tied else r(vocab, dim)
    return w


def assert_tensors_equal(ckpt, weights: dict):
    """The checkpoint holds exactly `weights` (minus a tied output), as float32."""
    expected = {k: v for k, v in weights.items()
                if not (k == "output.weight" and ckpt.config.tied_embeddings)}
    assert set(ckpt.tensors) == set(expected) == set(canonical_shapes(ckpt.config))
    for name, tensor in expected.items():
        got = ckpt.tensors[name].load()
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"], name
        assert ckpt.tensors[name].shape == tuple(tensor.shape) == got.shape, name
        np.testing.assert_array_equal(got, tensor.float().numpy(), err_msg=name)


# --- llama2.c training checkpoints (.pt) ---------------------------------------------------

def model_args(dim=16, n_layers=2, n_heads=4, n_kv_heads=None, vocab=24, **extra):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                vocab_size=vocab, hidden_dim=None, multiple_of=8, norm_eps=1e-5,
                max_seq_len=64, dropout=0.0, **extra)


def save_llama2c_pt(path, weights, args, prefix=""):
    """What llama2.c's train.py saves (optimizer state included)."""
    params = [torch.nn.Parameter(weights["norm.weight"].clone())]
    opt = torch.optim.AdamW(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    torch.save({"model": {prefix + k: v for k, v in weights.items()},
                "optimizer": opt.state_dict(), "model_args": args, "iter_num": 2000,
                "best_val_loss": torch.tensor(1.25), "config": {"batch_size": 8}}, path)


def test_pt_tied(tmp_path):
    w = random_weights(tied=True)
    save_llama2c_pt(tmp_path / "ckpt.pt", w, model_args())
    ckpt = llama2c.read_llama2c_pt(tmp_path / "ckpt.pt")
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (16, 2, 4, 4, 4)
    assert (c.hidden_dim, c.vocab_size, c.max_seq_len) == (40, 24, 64)
    assert c.tied_embeddings and c.rope_theta == 10000.0 and c.rope_scaling is None
    assert_tensors_equal(ckpt, w)


def test_pt_compiled_prefix_untied_gqa(tmp_path):
    w = random_weights(n_kv_heads=2, tied=False, seed=1)
    save_llama2c_pt(tmp_path / "ckpt.pt", w, model_args(n_kv_heads=2), prefix="_orig_mod.")
    ckpt = llama2c.read_llama2c_pt(tmp_path / "ckpt.pt")
    assert ckpt.config.n_kv_heads == 2 and not ckpt.config.tied_embeddings
    assert_tensors_equal(ckpt, w)


def test_pt_equal_but_separate_output_counts_as_tied(tmp_path):
    w = random_weights(tied=True)
    w["output.weight"] = w["tok_embeddings.weight"].clone()
    save_llama2c_pt(tmp_path / "ckpt.pt", w, model_args())
    assert llama2c.read_llama2c_pt(tmp_path / "ckpt.pt").config.tied_embeddings


def test_pt_accepts_preloaded_tree_and_detection(tmp_path):
    save_llama2c_pt(tmp_path / "ckpt.pt", random_weights(), model_args())
    tree = torchfile.load(tmp_path / "ckpt.pt")
    assert llama2c.is_llama2c_pt(tree)
    assert not llama2c.is_llama2c_pt({"model": {}})
    assert not llama2c.is_llama2c_pt([1, 2])
    assert llama2c.read_llama2c_pt(tmp_path / "ckpt.pt", tree).config.dim == 16


def test_pt_ignores_rope_buffers(tmp_path):
    w = random_weights()
    save_llama2c_pt(tmp_path / "ckpt.pt", dict(w, **{"rope.freqs": torch.ones(2)}), model_args())
    assert_tensors_equal(llama2c.read_llama2c_pt(tmp_path / "ckpt.pt"), w)


@pytest.mark.parametrize("change, message", [
    (lambda w, a: w.update({"layers.0.attention.bias": torch.ones(3)}),
     "unexpected tensor.*layers.0.attention.bias"),
    (lambda w, a: w.pop("layers.1.feed_forward.w3.weight"),
     "lacks tensor.*layers.1.feed_forward.w3"),
    (lambda w, a: a.update(hidden_dim=48), "hidden_dim is 48 but w1 has 40 rows"),
    (lambda w, a: a.update(n_layers=1), "unexpected tensor.*layers.1"),
    (lambda w, a: a.update(vocab_size=30), r"tok_embeddings.weight has shape \[24, 16\]"),
    (lambda w, a: a.update(n_heads=3), "not a multiple of n_heads"),
    (lambda w, a: a.pop("dim"), "model_args.dim must be a positive integer"),
    (lambda w, a: w.update({"layers.0.ffn_norm.weight": torch.ones(16, dtype=torch.int64)}),
     "layers.0.ffn_norm.weight holds int64 values"),
])
def test_pt_errors(tmp_path, change, message):
    w, a = random_weights(tied=False), model_args()
    change(w, a)
    save_llama2c_pt(tmp_path / "ckpt.pt", w, a)
    with pytest.raises(LlamanpError, match=message):
        ckpt = llama2c.read_llama2c_pt(tmp_path / "ckpt.pt")
        for t in ckpt.tensors.values():       # errors that only show when reading
            t.load()


def test_pt_that_is_not_llama2c(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(LlamanpError, match="not a llama2.c training checkpoint"):
        llama2c.read_llama2c_pt(tmp_path / "x.pt")


# --- llama2.c exports (.bin) ---------------------------------------------------------------

def stacked(w, n_layers, index):
    return [w[layer_tensor_names(i)[index]] for i in range(n_layers)]


def rope_tables(dim, n_heads, max_seq_len):
    """The cos and sin tables export.py writes after the final norm in version 0."""
    head_dim = dim // n_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return [torch.cos(angles), torch.sin(angles)]


def write_bin(path, w, version, shared, dim=16, hidden=40, n_layers=2, n_heads=4,
              n_kv_heads=4, vocab=24, seq=32, with_rope_tables=True):
    """A llama2.c export, laid out as export.py's legacy_export / version1_export do."""
    params = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq)
    if version == 0:
        header = struct.pack("<7i", *params[:5], vocab if shared else -vocab, seq)
        order = [[w["tok_embeddings.weight"]]] + [stacked(w, n_layers, k) for k in range(9)]
        order.append([w["norm.weight"]])
        if with_rope_tables:
            order.append(rope_tables(dim, n_heads, seq))
    else:
        header = struct.pack("<Ii7iB", 0x616B3432, version, *params, int(shared))
        header += b"\0" * (256 - len(header))
        order = [stacked(w, n_layers, 0), stacked(w, n_layers, 5), [w["norm.weight"]],
                 [w["tok_embeddings.weight"]]]
        order += [stacked(w, n_layers, k) for k in (1, 2, 3, 4, 6, 7, 8)]
    if not shared:
        order.append([w["output.weight"]])
    with open(path, "wb") as f:
        f.write(header)
        for group in order:
            for t in group:
                f.write(t.detach().numpy().astype("<f4").tobytes())


@pytest.mark.parametrize("version, shared, tables", [
    (0, True, True), (0, False, True), (0, True, False), (0, False, False),
    (1, True, False), (1, False, False)])
def test_bin_round_trip(tmp_path, version, shared, tables):
    w = random_weights(tied=shared, seed=3)
    path = tmp_path / "model.bin"
    write_bin(path, w, version, shared, with_rope_tables=tables)
    assert llama2c.is_llama2c_bin(path)
    ckpt = llama2c.read_llama2c_bin(path)
    c = ckpt.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.vocab_size, c.max_seq_len) == \
        (16, 40, 2, 4, 24, 32)
    assert c.tied_embeddings == shared and c.norm_eps == 1e-5 and c.rope_theta == 10000.0
    assert_tensors_equal(ckpt, w)


@pytest.mark.parametrize("version", [0, 1])
def test_bin_gqa(tmp_path, version):
    w = random_weights(n_kv_heads=1, tied=False, seed=4)
    write_bin(tmp_path / "m.bin", w, version, shared=False, n_kv_heads=1)
    ckpt = llama2c.read_llama2c_bin(tmp_path / "m.bin")
    assert ckpt.config.n_kv_heads == 1
    assert_tensors_equal(ckpt, w)


def test_bin_is_memory_mapped(tmp_path):
    write_bin(tmp_path / "m.bin", random_weights(), 1, shared=True)
    ckpt = llama2c.read_llama2c_bin(tmp_path / "m.bin")
    got = ckpt.tensors["layers.1.attention.wq.weight"].load()
    assert isinstance(got.base, np.memmap) or isinstance(got.base.base, np.memmap)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b[:-4], "truncated: its header implies|fits neither"),
    (lambda b: b[:300], "truncated: its header implies"),
    (lambda b: b + b"\0" * 8, "8 bytes beyond what its header implies"),
])
@pytest.mark.parametrize("version", [0, 1])
def test_bin_size_mismatch(tmp_path, edit, message, version):
    path = tmp_path / "m.bin"
    write_bin(path, random_weights(), version, shared=True)
    path.write_bytes(edit(path.read_bytes()))
    assert not (version == 0 and llama2c.is_llama2c_bin(path))
    with pytest.raises(LlamanpError, match=message):
        llama2c.read_llama2c_bin(path)


def test_bin_between_sizes(tmp_path):
    path = tmp_path / "m.bin"
    write_bin(path, random_weights(), 0, shared=True)
    path.write_bytes(path.read_bytes()[:-40])        # lost part of the RoPE tables
    with pytest.raises(LlamanpError, match="fits neither"):
        llama2c.read_llama2c_bin(path)


@pytest.mark.parametrize("version, message", [(2, "version-2 \\(int8 Q8_0\\)"),
                                              (7, "unknown version 7")])
def test_bin_other_versions(tmp_path, version, message):
    path = tmp_path / "q.bin"
    header = struct.pack("<Ii7iB", 0x616B3432, version, 16, 40, 2, 4, 4, 24, 32, 1)
    path.write_bytes(header + b"\0" * (256 - len(header)) + b"\0" * 1000)
    assert llama2c.is_llama2c_bin(path)          # recognised, so the error can be clear
    with pytest.raises(LlamanpError, match=message):
        llama2c.read_llama2c_bin(path)


def test_bin_bad_headers(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(struct.pack("<7i", 16, 40, 2, 3, 3, 24, 32) + b"\0" * 64)
    assert not llama2c.is_llama2c_bin(path)
    with pytest.raises(LlamanpError, match="do not divide evenly"):
        llama2c.read_llama2c_bin(path)
    path.write_bytes(struct.pack("<7i", 16, 40, -2, 4, 4, 24, 32))
    with pytest.raises(LlamanpError, match="n_layers is -2"):
        llama2c.read_llama2c_bin(path)
    path.write_bytes(b"tiny")
    assert not llama2c.is_llama2c_bin(path)
    with pytest.raises(LlamanpError, match="too short"):
        llama2c.read_llama2c_bin(path)
    # a header claiming an absurd model is rejected by the layer bound, without trying to
    # build it
    path.write_bytes(struct.pack("<7i", 4096, 11008, 2**30, 32, 32, 32000, 2048))
    with pytest.raises(LlamanpError, match="n_layers is 1073741824, over the 1024"):
        llama2c.read_llama2c_bin(path)


# --- Meta consolidated checkpoints ------------------------------------------------------

COLUMN = ("wq", "wk", "wv", "w1", "w3")
ROW = ("wo", "w2")


def split_axis(name, embedding_axis):
    """How fairscale splits each tensor across model-parallel ranks (None: copied)."""
    leaf = name.split(".")[-2]
    if name == "tok_embeddings.weight":
        return embedding_axis
    if leaf in COLUMN or name == "output.weight":
        return 0
    if leaf in ROW:
        return 1
    return None


def write_meta(directory, w, params, n_shards, embedding_axis, dtype=torch.bfloat16):
    """params.json plus consolidated.NN.pth shards, split as Meta's checkpoints are."""
    directory.mkdir(exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for rank in range(n_shards):
        shard = {}
        for name, t in w.items():
            axis = split_axis(name, embedding_axis)
            part = t if axis is None else torch.chunk(t, n_shards, dim=axis)[rank]
            shard[name] = part.to(dtype).clone()
        shard["rope.freqs"] = torch.ones(4)            # Llama 2 files carry this buffer
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")


# dim 32, multiple_of 16: int(2*128/3) = 85 -> 96; with ffn_dim_multiplier 1.3: 110 -> 112
LLAMA2_PARAMS = {"dim": 32, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06,
                 "vocab_size": -1}
LLAMA3_PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
                 "multiple_of": 16, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
                 "rope_theta": 500000.0, "use_scaled_rope": True}


def llama2_weights(seed=5):
    return random_weights(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=96,
                          vocab=64, tied=False, seed=seed)


def llama3_weights(seed=6):
    return random_weights(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=112,
                          vocab=64, tied=False, seed=seed)


def bf16_rounded(w):
    return {k: v.to(torch.bfloat16) for k, v in w.items()}


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_llama2_style(tmp_path, n_shards):
    w = llama2_weights()
    write_meta(tmp_path / "m", w, LLAMA2_PARAMS, n_shards, embedding_axis=1)
    ckpt = meta.read_meta(tmp_path / "m")
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (32, 2, 4, 4, 8)
    assert (c.hidden_dim, c.vocab_size, c.norm_eps, c.rope_theta) == (96, 64, 1e-6, 10000.0)
    assert c.rope_scaling is None and c.max_seq_len == 4096 and not c.tied_embeddings
    assert ckpt.metadata["meta_shards"] == n_shards
    assert_tensors_equal(ckpt, bf16_rounded(w))


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_llama3_style(tmp_path, n_shards):
    w = llama3_weights()
    write_meta(tmp_path / "m", w, LLAMA3_PARAMS, n_shards, embedding_axis=0)
    ckpt = meta.read_meta(tmp_path / "m" / "params.json")
    c = ckpt.config
    assert (c.n_kv_heads, c.hidden_dim, c.vocab_size, c.rope_theta) == (2, 112, 64, 500000.0)
    assert c.rope_scaling == RopeScaling() and c.max_seq_len == 131072
    if n_shards > 1:
        assert ckpt.metadata["meta_embedding_split"] == "vocab"
    assert_tensors_equal(ckpt, bf16_rounded(w))


def test_meta_float32_shards_and_explicit_fields(tmp_path):
    w = llama3_weights()
    params = dict(LLAMA3_PARAMS, max_seq_len=2048, use_scaled_rope=False)
    write_meta(tmp_path / "m", w, params, 2, embedding_axis=0, dtype=torch.float32)
    ckpt = meta.read_meta(tmp_path / "m")
    assert ckpt.config.max_seq_len == 2048 and ckpt.config.rope_scaling is None
    assert_tensors_equal(ckpt, w)


def test_meta_rope_scaling_overrides(tmp_path):
    params = dict(LLAMA3_PARAMS, rope_scaling_factor=32.0)
    write_meta(tmp_path / "m", llama3_weights(), params, 1, embedding_axis=0)
    assert meta.read_meta(tmp_path / "m").config.rope_scaling == RopeScaling(factor=32.0)


def test_meta_hidden_dim_formula():
    assert meta.meta_hidden_dim(4096, 256, None) == 11008          # Llama 2 7B
    assert meta.meta_hidden_dim(8192, 4096, 1.3) == 28672          # Llama 2 70B
    assert meta.meta_hidden_dim(4096, 1024, 1.3) == 14336          # Llama 3 8B
    assert meta.meta_hidden_dim(2048, 256, 1.5) == 8192            # Llama 3.2 1B


def meta_dir_with(tmp_path, n_shards=2, params=LLAMA3_PARAMS):
    write_meta(tmp_path / "m", llama3_weights(), params, n_shards, embedding_axis=0)
    return tmp_path / "m"


def resave(path, edit):
    shard = torch.load(path)
    edit(shard)
    torch.save(shard, path)


def test_meta_missing_params(tmp_path):
    d = meta_dir_with(tmp_path)
    (d / "params.json").unlink()
    with pytest.raises(LlamanpError, match="no params.json beside the consolidated"):
        meta.read_meta(d)


def test_meta_missing_shard(tmp_path):
    d = meta_dir_with(tmp_path, n_shards=4)
    (d / "consolidated.01.pth").unlink()
    with pytest.raises(LlamanpError, match="no consolidated.01.pth"):
        meta.read_meta(d)


def test_meta_no_shards(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(LlamanpError, match="no consolidated"):
        meta.read_meta(tmp_path)


def test_meta_different_key_sets(tmp_path):
    d = meta_dir_with(tmp_path)
    resave(d / "consolidated.01.pth", lambda s: s.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(LlamanpError, match="consolidated.01.pth lacks layers.1.ffn_norm"):
        meta.read_meta(d)


def test_meta_shapes_disagree(tmp_path):
    d = meta_dir_with(tmp_path)
    resave(d / "consolidated.01.pth",
           lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(8, 32)}))
    with pytest.raises(LlamanpError, match="wq.weight is \\[8, 32\\] in consolidated.01.pth"):
        meta.read_meta(d)


def test_meta_replicated_norms_differ(tmp_path):
    d = meta_dir_with(tmp_path)
    resave(d / "consolidated.01.pth",
           lambda s: s.update({"norm.weight": torch.zeros(32, dtype=torch.bfloat16)}))
    with pytest.raises(LlamanpError, match="norm.weight differs between"):
        meta.read_meta(d)


def test_meta_hidden_dim_disagrees(tmp_path):
    d = meta_dir_with(tmp_path, params=dict(LLAMA3_PARAMS, ffn_dim_multiplier=1.0))
    with pytest.raises(LlamanpError, match="width of 96 .* w1 has 112 rows"):
        meta.read_meta(d)


def test_meta_unexpected_tensor(tmp_path):
    d = meta_dir_with(tmp_path, n_shards=1)
    resave(d / "consolidated.00.pth",
           lambda s: s.update({"layers.0.attention.q_norm": torch.ones(8)}))
    with pytest.raises(LlamanpError, match="unexpected tensor.*q_norm"):
        meta.read_meta(d)


def test_meta_wrong_vocab(tmp_path):
    d = meta_dir_with(tmp_path, params=dict(LLAMA3_PARAMS, vocab_size=100))
    with pytest.raises(LlamanpError, match="tok_embeddings.weight has shape"):
        meta.read_meta(d)


def test_meta_embedding_split_that_fits_nothing(tmp_path):
    d = meta_dir_with(tmp_path)
    for rank in (0, 1):
        resave(d / f"consolidated.0{rank}.pth",
               lambda s: s.update({"tok_embeddings.weight": torch.zeros(32, 12)}))
    with pytest.raises(LlamanpError, match="splits neither the vocabulary nor dim 32"):
        meta.read_meta(d)


def test_meta_unsupported_architecture(tmp_path):
    d = meta_dir_with(tmp_path, params=dict(LLAMA3_PARAMS, moe_args={"num_experts": 16}))
    with pytest.raises(LlamanpError, match="sets moe_args"):
        meta.read_meta(d)


def test_meta_bad_params_json(tmp_path):
    d = meta_dir_with(tmp_path)
    (d / "params.json").write_text("{not json")
    with pytest.raises(LlamanpError, match="cannot read .*params.json"):
        meta.read_meta(d)
