"""Read PyTorch state dicts (safetensors or .bin) into numpy, without importing torch.

snapjax never imports torch (export/ does). A ``.bin`` file is a zip archive holding a pickle whose
tensors point into raw storage records; we rebuild them as numpy arrays with a restricted
unpickler that accepts only the handful of globals a state dict uses.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the model."""


def read_config_json(folder: Path) -> dict:
    """``folder/config.json`` as a dict; a missing or malformed file is an error naming it."""
    # local: pretrained.load_component copies a bucket's folder first
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder}: missing config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config


def find_weights_file(folder: Path) -> Path:
    folder = Path(folder)  # local: pretrained.load_component copies a bucket's folder first
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    sharded = sorted(folder.glob("*.safetensors.index.json"))
    if sharded:
        return sharded[0]
    raise WeightsError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def load_state_dict(folder_or_file: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array (fp32 for floating point) from a model folder or weights file."""
    path = Path(folder_or_file)  # local: pretrained.load_component copies a bucket's folder first
    if path.is_dir():
        path = find_weights_file(path)
    if path.name.endswith(".index.json"):
        import json
        index = json.loads(path.read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_state_dict(path.parent / shard))
        return out
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file
            tensors = load_file(str(path))
        else:
            tensors = _load_torch_zip(path)
    except WeightsError:
        raise
    except Exception as e:  # safetensors and zipfile raise assorted types for a corrupt file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    return {k: _to_float32(v) for k, v in tensors.items()}


def _to_float32(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


def _load_torch_zip(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a PyTorch zip checkpoint (legacy pickles are not supported;"
                           " re-save it with torch.save or as safetensors)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise WeightsError(f"{path}: zip archive without data.pkl")
        root = pkl[: -len("data.pkl")]

        def storage(dtype, key):
            raw = zf.read(f"{root}data/{key}")
            if dtype == "bfloat16":
                import ml_dtypes
                return np.frombuffer(raw, dtype=ml_dtypes.bfloat16)
            return np.frombuffer(raw, dtype=dtype)

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return _rebuild_tensor
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                if module == "collections" and name == "OrderedDict":
                    import collections
                    return collections.OrderedDict
                if module == "torch._utils" and name == "_rebuild_parameter":
                    return lambda data, requires_grad, hooks: data
                raise WeightsError(f"{path}: refusing to unpickle {module}.{name}")

            def persistent_load(self, pid):
                _, dtype, key, _location, _numel = pid
                return storage(dtype, key)

        obj = Unpickler(zf.open(pkl)).load()
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()
