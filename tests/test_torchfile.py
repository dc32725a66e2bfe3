"""The torch-free .pt reader against torch.load itself, and against hostile files."""

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from llamanp.convert import torchfile
from llamanp.errors import LlamanpError


def save_and_load(obj, tmp_path, name="x.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path, torchfile.load(path)


def torch_values(t: torch.Tensor) -> np.ndarray:
    """What TorchTensor.numpy() should hold (bfloat16 as its raw bits)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def assert_same_tree(ours, theirs):
    """Our unpickled tree equals torch.load's, tensor for tensor."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torchfile.TorchTensor)
        assert ours.shape == tuple(theirs.shape)
        assert ours.dtype == str(theirs.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(ours.numpy(), torch_values(theirs))
        if theirs.is_floating_point():
            np.testing.assert_array_equal(ours.float32(), theirs.detach().float().numpy())
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs)
        for key in theirs:
            assert_same_tree(ours[key], theirs[key])
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same_tree(a, b)
    else:
        assert ours == theirs


# --- agreement with torch.load ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_every_dtype_matches_torch(tmp_path, dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    path, ours = save_and_load({"t": t}, tmp_path)
    assert_same_tree(ours, torch.load(path, weights_only=False))


def test_bfloat16_widens_exactly(tmp_path):
    t = torch.tensor([1.0, -2.5, 3.140625, 1e-30, -65504.0, float("inf")], dtype=torch.bfloat16)
    _, ours = save_and_load(t, tmp_path)
    widened = ours.float32()
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, t.float().numpy())


def test_views_honour_offset_and_strides(tmp_path):
    base = torch.randn(6, 8)
    views = {"whole": base, "rows": base[2:5], "cols": base[:, 3:6], "transposed": base.t(),
             "stepped": base[::2, 1::3], "element": base[4, 5], "flat_tail": base.view(-1)[17:]}
    path, ours = save_and_load(views, tmp_path)
    assert_same_tree(ours, torch.load(path, weights_only=False))
    assert ours["transposed"].stride == (1, 8)
    assert ours["rows"].storage_offset == 16
    # float32() is always C-contiguous, even for a transposed view
    assert ours["transposed"].float32().flags["C_CONTIGUOUS"]


def test_tensors_are_read_only_views_of_the_file(tmp_path):
    base = torch.randn(4, 4)
    _, ours = save_and_load({"a": base, "b": base[1:]}, tmp_path)
    a, b = ours["a"].numpy(), ours["b"].numpy()
    assert not a.flags["WRITEABLE"]
    assert np.shares_memory(a, b)


def test_shared_storage_is_detectable(tmp_path):
    w = torch.randn(10, 4)
    _, ours = save_and_load({"emb": w, "out": w, "part": w[2:], "other": w.clone()}, tmp_path)
    assert ours["emb"].same_data_as(ours["out"])
    assert ours["emb"].storage_key == ours["part"].storage_key
    assert not ours["emb"].same_data_as(ours["part"])
    assert not ours["emb"].same_data_as(ours["other"])


def test_nested_containers_and_plain_values(tmp_path):
    obj = {"list": [1, 2.5, "three", None, True, torch.ones(2)],
           "tuple": (torch.zeros(3, dtype=torch.int64), (1, (2, 3))),
           "ordered": collections.OrderedDict(b=1, a=torch.arange(4.0)),
           "bytes": b"\x00\xffraw", "set": {1, 2, 3}, "frozen": frozenset({"x"}),
           "size": torch.Size([2, 3]), "float": 1e-5, "big": 2**70, "neg": -3}
    path, ours = save_and_load(obj, tmp_path)
    assert_same_tree(ours, torch.load(path, weights_only=False))


def test_zero_dim_tensors(tmp_path):
    obj = {"loss": torch.tensor(1.25), "step": torch.tensor(7), "half": torch.tensor(2.5).half()}
    _, ours = save_and_load(obj, tmp_path)
    assert ours["loss"].shape == () and ours["loss"].float32().shape == ()
    assert ours["loss"].float32() == np.float32(1.25)
    assert ours["step"].numpy() == 7 and ours["half"].float32() == np.float32(2.5)


def test_parameters_and_module_state_dicts(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    param = torch.nn.Parameter(torch.randn(2, 2))
    param.note = "with python state"          # pickled via _rebuild_parameter_with_state
    obj = {"param": torch.nn.Parameter(torch.randn(3)), "stateful": param,
           "state_dict": lin.state_dict()}
    path, ours = save_and_load(obj, tmp_path)
    theirs = torch.load(path, weights_only=False)
    assert_same_tree(ours["param"], theirs["param"].data)
    assert_same_tree(ours["stateful"], theirs["stateful"].data)
    assert_same_tree(ours["state_dict"], theirs["state_dict"])
    assert ours["state_dict"]._metadata == theirs["state_dict"]._metadata


def test_llama2c_style_training_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "model_args": {"dim": 4, "n_kv_heads": None, "norm_eps": 1e-5},
            "iter_num": 10, "best_val_loss": torch.tensor(3.25),
            "config": {"out_dir": "out", "compile": True, "lr": 5e-4}}
    path, ours = save_and_load(ckpt, tmp_path)
    assert_same_tree(ours, torch.load(path, weights_only=False))


def test_uint16_untyped_storage(tmp_path):
    t = torch.arange(10).to(torch.uint16)[3:]        # saved through _rebuild_tensor_v3
    _, ours = save_and_load({"u": t}, tmp_path)
    assert ours["u"].dtype == "uint16"
    np.testing.assert_array_equal(ours["u"].numpy(), np.arange(3, 10))


def test_float32_refuses_integer_tensors(tmp_path):
    _, ours = save_and_load(torch.arange(3), tmp_path)
    with pytest.raises(LlamanpError, match="int64"):
        ours.float32()


# --- hostile pickles ----------------------------------------------------------------------

class RunsCommand:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("make_payload, module_name", [
    (lambda marker: RunsCommand(os.system, f"touch {marker}"), os.system.__module__ + ".system"),
    (lambda marker: RunsCommand(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
    (lambda marker: RunsCommand(open, str(marker), "w"), "io.open"),
])
def test_code_running_pickle_is_refused(tmp_path, make_payload, module_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    # torch.save happily writes a genuine archive around the payload
    torch.save({"w": torch.ones(2), "payload": make_payload(marker)}, path)
    refusal = r"refusing to load evil\.pt: it references " + module_name
    with pytest.raises(LlamanpError, match=refusal):
        torchfile.load(path)
    assert not marker.exists()


def test_refusal_happens_before_anything_is_called(tmp_path):
    """Even a global that is never reduced (only named) is refused."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = pickle.dumps({"f": os.system}, protocol=2)
    write_archive(path, {"evil/data.pkl": payload})
    with pytest.raises(LlamanpError, match="could run code"):
        torchfile.load(path)
    assert not marker.exists()


# --- damaged and foreign files --------------------------------------------------------------

def write_archive(path, members: dict, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def members_of(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def saved_members(tmp_path) -> dict:
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "good.pt")
    return members_of(tmp_path / "good.pt")


def test_legacy_format_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(LlamanpError, match="legacy.*re-save it with a recent torch"):
        torchfile.load(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"hello, this is not a checkpoint" * 10)
    with pytest.raises(LlamanpError, match="not a PyTorch checkpoint"):
        torchfile.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(LlamanpError, match="no such file"):
        torchfile.load(tmp_path / "nope.pt")


def test_truncated_zip(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlamanpError, match="truncated or damaged"):
        torchfile.load(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    write_archive(path, {"readme.txt": b"hi"})
    with pytest.raises(LlamanpError, match="no <name>/data.pkl"):
        torchfile.load(path)


def test_missing_storage_member(tmp_path):
    members = saved_members(tmp_path)
    del members["good/data/0"]
    write_archive(tmp_path / "bad.pt", members)
    with pytest.raises(LlamanpError, match="good/data/0 is missing"):
        torchfile.load(tmp_path / "bad.pt")


def test_storage_member_too_short(tmp_path):
    members = saved_members(tmp_path)
    members["good/data/0"] = members["good/data/0"][:100]
    write_archive(tmp_path / "bad.pt", members)
    with pytest.raises(LlamanpError, match="holds 100 bytes but its tensor needs 256"):
        torchfile.load(tmp_path / "bad.pt")


class StorageRef:
    """Pickles as torch's persistent id for storage `key`."""
    def __init__(self, key, numel, cls=torch.FloatStorage):
        self.key, self.numel, self.cls = key, numel, cls


class TensorRef:
    """Pickles as a torch tensor with any geometry we like."""
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def handmade_archive(path, obj, storages: dict):
    """A torch-style archive whose data.pkl we pickle ourselves."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, StorageRef):
                return ("storage", o.cls, o.key, "cpu", o.numel)
            return None
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    members = {"hand/data.pkl": buf.getvalue(), "hand/byteorder": b"little"}
    members.update({f"hand/data/{k}": v for k, v in storages.items()})
    write_archive(path, members)


def test_handmade_archive_reads_back(tmp_path):
    data = np.arange(12, dtype=np.float32)
    store = StorageRef("0", 12)
    handmade_archive(tmp_path / "ok.pt", {"t": TensorRef(store, 2, (2, 3), (1, 2))},
                     {"0": data.tobytes()})
    got = torchfile.load(tmp_path / "ok.pt")["t"].numpy()
    np.testing.assert_array_equal(got, np.lib.stride_tricks.as_strided(
        data[2:], (2, 3), (4, 8)))


@pytest.mark.parametrize("offset, size, stride, message", [
    (10, (2, 3), (1, 2), "reaches element 15 of storage 0, which has only 12"),
    (-1, (2,), (1,), "bad tensor geometry"),
    (0, (2, 3), (1,), "bad tensor geometry"),
])
def test_bad_tensor_geometry(tmp_path, offset, size, stride, message):
    store = StorageRef("0", 12)
    handmade_archive(tmp_path / "bad.pt", TensorRef(store, offset, size, stride),
                     {"0": np.zeros(12, np.float32).tobytes()})
    with pytest.raises(LlamanpError, match=message):
        torchfile.load(tmp_path / "bad.pt")


def test_one_storage_with_two_dtypes(tmp_path):
    obj = [TensorRef(StorageRef("0", 4), 0, (4,), (1,)),
           TensorRef(StorageRef("0", 4, torch.HalfStorage), 0, (4,), (1,))]
    handmade_archive(tmp_path / "bad.pt", obj, {"0": bytes(16)})
    with pytest.raises(LlamanpError, match="both float32 and float16"):
        torchfile.load(tmp_path / "bad.pt")


def test_compressed_member_is_refused(tmp_path):
    write_archive(tmp_path / "zipped.pt", saved_members(tmp_path), compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(LlamanpError, match="compressed"):
        torchfile.load(tmp_path / "zipped.pt")


def test_big_endian_is_refused(tmp_path):
    members = saved_members(tmp_path)
    members["good/byteorder"] = b"big"
    write_archive(tmp_path / "be.pt", members)
    with pytest.raises(LlamanpError, match="big-endian"):
        torchfile.load(tmp_path / "be.pt")


def test_garbage_pickle(tmp_path):
    members = saved_members(tmp_path)
    members["good/data.pkl"] = members["good/data.pkl"][:40]
    write_archive(tmp_path / "bad.pt", members)
    with pytest.raises(LlamanpError, match="malformed"):
        torchfile.load(tmp_path / "bad.pt")


def test_unknown_persistent_id(tmp_path):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "x") if obj == "hook" else None
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(["hook"])
    write_archive(tmp_path / "bad.pt", {"bad/data.pkl": buf.getvalue()})
    with pytest.raises(LlamanpError, match="unknown persistent id"):
        torchfile.load(tmp_path / "bad.pt")
