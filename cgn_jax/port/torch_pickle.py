"""Read PyTorch `.pth`/`.bin` files into numpy arrays without importing torch.

Both serialisations torch has used are supported: the zip archive (torch >= 1.6)
and the older single-stream pickle format (still used by e.g. BigGAN and U2-Net
weights published in 2019-2020). Only tensors and plain containers are rebuilt;
anything else in the pickle is refused, so a file cannot run code on load.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np


class TorchFileError(ValueError):
    pass


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": None,  # handled via uint16 view below
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        if name not in _STORAGE_DTYPES:
            raise TorchFileError(f"unsupported tensor storage type {name}")
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    arr = storage
    if not size:
        return arr[offset:offset + 1].reshape(()).copy()
    itemsize = arr.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        arr[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, load_storage):
        super().__init__(stream)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in ("float32", "float64", "float16", "int64", "int32", "uint8", "bool", "bfloat16"):
            return name
        raise TorchFileError(f"refusing to load {module}.{name} from a checkpoint (only tensors and dicts are read)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or pid[0] != "storage":
            raise TorchFileError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if isinstance(storage_type, str):  # torch >= 2 may pass a dtype name
            storage_type = _StorageType({"float32": "FloatStorage", "float64": "DoubleStorage",
                                          "float16": "HalfStorage", "int64": "LongStorage",
                                          "int32": "IntStorage", "uint8": "ByteStorage",
                                          "bool": "BoolStorage", "bfloat16": "BFloat16Storage"}[storage_type])
        return self._load_storage(str(key), storage_type, numel)


def _as_array(raw: bytes, storage_type: _StorageType, numel: int) -> np.ndarray:
    if storage_type.dtype is None:  # bfloat16 -> float32
        bits = np.frombuffer(raw, dtype="<u2", count=numel).astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"), count=numel)


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise TorchFileError(f"{path}: zip archive without data.pkl; not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        cache = {}

        def load_storage(key, storage_type, numel):
            if key not in cache:
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise TorchFileError(f"{path}: storage {key} missing from the archive (truncated file?)") from None
                cache[key] = _as_array(raw, storage_type, numel)
            return cache[key]

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path: Path):
    data = path.read_bytes()
    stream = io.BytesIO(data)
    magic = pickle.load(stream)
    if magic != 0x1950A86A20F9469CFC6C:
        raise TorchFileError(f"{path}: not a PyTorch checkpoint (bad magic number)")
    pickle.load(stream)  # protocol version
    pickle.load(stream)  # sys info
    start = stream.tell()
    # Storage bytes follow the object pickle, so unpickle once to learn the storages,
    # read them, then unpickle again with the filled storages.
    types = {}

    def record(key, storage_type, numel):
        types[key] = (storage_type, numel)
        return np.zeros(numel, dtype=np.float32 if storage_type.dtype is None else storage_type.dtype)

    _Unpickler(stream, record).load()
    keys = pickle.load(stream)
    offset = stream.tell()
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q", data[offset:offset + 8])
        offset += 8
        storage_type, _ = types[str(key)]
        itemsize = 2 if storage_type.dtype is None else np.dtype(storage_type.dtype).itemsize
        raw = data[offset:offset + numel * itemsize]
        if len(raw) != numel * itemsize:
            raise TorchFileError(f"{path}: file ends inside tensor storage {key} (truncated download?)")
        storages[str(key)] = _as_array(raw, storage_type, numel)
        offset += numel * itemsize
    stream.seek(start)
    return _Unpickler(stream, lambda key, storage_type, numel: storages[key]).load()


def load_torch_file(path: str | Path) -> dict:
    """Load a PyTorch checkpoint as nested dicts of numpy arrays (no torch needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError, ValueError) as e:
        raise TorchFileError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e}); "
                             "the file is corrupt or truncated: download it again") from e


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A flat `name -> array` state dict; unwraps the common {'state_dict': ...} / {'model': ...} wrappers."""
    obj = load_torch_file(path)
    for wrapper in ("state_dict", "model", "generator"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
        elif isinstance(v, (int, float)):
            out[str(k)] = np.asarray(v)
    return out
