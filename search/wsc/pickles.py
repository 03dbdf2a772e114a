"""Reading the WSC weight pickles without running them.

``WSC-MTL-tiny.pt.zip`` holds ``encoder.pt``, ``squeezer.pt`` and ``grouper.pt``: each a whole ``nn.Module``
saved with ``torch.save`` (a zip with ``data.pkl`` and one raw file per tensor storage). Unpickling such a file
normally imports and calls whatever globals it names, i.e. runs arbitrary code. This reader turns every global
into an inert stub that only records what it was called with, so the pickle yields a tree of records instead of
objects; from that tree it recovers each module's class name, its plain-data attributes (the config) and its
state dict. Only the tensor-rebuild functions do real work, and they are this module's own: they read the
storage bytes from the zip into tensors.

Refused outright: any global outside the accepted prefixes below (``os.system``, ``builtins.eval``,
``subprocess.*``, ...), so a tampered file fails with its name instead of running. ``torch.load`` with
``weights_only=True`` and an allowlist is not enough here: enum members are pickled as ``getattr(Enum, name)``,
and a real ``builtins.getattr`` reaches anything.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from search.core.errors import CheckpointError

ACCEPTED_PREFIXES = ("mmm.", "torch.nn.", "torchvision.models.", "torchvision.ops.", "timm.")
MODULE_NAMES = ("encoder", "squeezer", "grouper")

# Legacy storage type names torch.save writes for each element type.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# nn.Module bookkeeping that is not configuration.
_MODULE_INTERNALS = {"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"}


class Stub:
    """An inert stand-in for a pickled global: constructing, calling or restoring it only records."""

    module = ""
    qualname = ""
    path = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {self.path}>"


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str


@dataclass
class ModuleRecord:
    """What one pickled module holds, recovered without executing it."""

    name: str
    class_path: str
    attributes: dict[str, Any]  # JSON-able (see to_json)
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def _stub_class(module: str, qualname: str) -> type[Stub]:
    return type(qualname.rsplit(".", 1)[-1], (Stub,), {"module": module, "qualname": qualname,
                                                       "path": f"{module}.{qualname}"})  # fmt: skip


def _safe_getattr(owner: Any, name: Any) -> type[Stub]:
    # Pickle spells nested classes (``Squeezer.Config``) and enum members (``ActivationFn.GeLU``) as
    # getattr(owner, name): both become stubs named by the dotted path, looked up nowhere.
    if not (isinstance(owner, type) and issubclass(owner, Stub) and isinstance(name, str) and name.isidentifier()):
        raise pickle.UnpicklingError(f"getattr on {owner!r} refused: only attributes of accepted classes are read")
    return _stub_class(owner.module, f"{owner.qualname}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: dict[str, bytes], label: str) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._label = label
        self._tensors: dict[str, torch.Tensor] = {}
        self._stubs: dict[str, type[Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        path = f"{module}.{name}"
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if path in ("collections.OrderedDict",):
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return set if name == "set" else frozenset
        if module in ("builtins", "__builtin__") and name == "getattr":
            return _safe_getattr
        if path.startswith(ACCEPTED_PREFIXES):
            if path not in self._stubs:
                self._stubs[path] = _stub_class(module, name)
            return self._stubs[path]
        raise pickle.UnpicklingError(
            f"refused global {path}: only {', '.join(p + '*' for p in ACCEPTED_PREFIXES)} classes and tensors are read"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return _StorageRef(pid[1], str(pid[2]))

    def _tensor(self, ref: _StorageRef) -> torch.Tensor:
        if ref.key not in self._tensors:
            if ref.key not in self._storages:
                raise pickle.UnpicklingError(f"storage {ref.key} missing from the archive")
            raw = bytearray(self._storages[ref.key])
            if len(raw) % ref.dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {ref.key}: {len(raw)} bytes do not hold whole {ref.dtype}s")
            self._tensors[ref.key] = torch.frombuffer(raw, dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
        return self._tensors[ref.key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor without a storage")
        flat = self._tensor(storage)
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        needed = int(offset) + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1 if all(size) else 0
        if needed > flat.numel():
            raise pickle.UnpicklingError(f"tensor of size {size} runs past its storage {storage.key}")
        # A copy: tensors that shared a storage in the file stay independent here (the state dict owns them).
        return flat.as_strided(size, stride, int(offset)).clone()


def _rebuild_parameter(data: Any, requires_grad: Any, _backward_hooks: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data  # a plain tensor: the state dict needs values, not autograd leaves


def _read_member_pickle(archive: zipfile.ZipFile, member: str) -> Any:
    """Unpickle one ``torch.save`` file (itself a zip) restrictedly."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(archive.read(member)))
    except zipfile.BadZipFile:
        raise CheckpointError(f"{member}: not a torch.save zip (legacy pickles are not read)") from None
    names = inner.namelist()
    data_pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(data_pkl) != 1:
        raise CheckpointError(f"{member}: expected one data.pkl, found {len(data_pkl)}")
    prefix = data_pkl[0][: -len("data.pkl")]
    byteorder = inner.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if byteorder != "little":
        raise CheckpointError(f"{member}: {byteorder}-endian tensors are not read")
    storages = {n[len(prefix) + len("data/") :]: inner.read(n) for n in names if n.startswith(prefix + "data/")}
    try:
        return _RestrictedUnpickler(inner.read(data_pkl[0]), storages, member).load()
    except (pickle.UnpicklingError, TypeError, ValueError, EOFError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{member}: refused: {exc}") from None


def to_json(value: Any, where: str = "") -> Any:
    """A lossless JSON form of recovered configuration data (tuples, sets, int keys and enums tagged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, list):
        return [to_json(v, where) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v, where) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted((to_json(v, where) for v in value), key=repr)}
    if isinstance(value, dict) and all(isinstance(k, str) and not k.startswith("__") for k in value):
        return {k: to_json(v, where) for k, v in value.items()}
    if isinstance(value, dict):
        return {"__mapping__": [[to_json(k, where), to_json(v, where)] for k, v in value.items()]}
    if isinstance(value, type) and issubclass(value, Stub):
        return {"__global__": value.module, "qualname": value.qualname}
    if isinstance(value, Stub):
        if isinstance(value.state, dict) and isinstance(value.state.get("__dict__"), dict):
            # A pydantic model: its fields live in the "__dict__" of its pickled state.
            return {"__model__": value.module, "qualname": value.qualname,
                    "fields": to_json(value.state["__dict__"], where)}  # fmt: skip
        if value.state is None:
            args = [to_json(a, where) for a in value.args]
            return {"__call__": value.module, "qualname": value.qualname, "args": args}
    raise _NotConfig(f"{where}: {type(value).__name__} {value!r} is not configuration data")


class _NotConfig(ValueError):
    pass


def _is_module(obj: Any) -> bool:
    return isinstance(obj, Stub) and isinstance(obj.state, dict) and "_parameters" in obj.state


def _state_dict(module: Stub, prefix: str, out: dict[str, torch.Tensor], member: str) -> None:
    state = module.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{member}: {prefix}{name} is not a tensor")
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not _is_module(child):
            raise CheckpointError(f"{member}: submodule {prefix}{name} is not a module")
        _state_dict(child, f"{prefix}{name}.", out, member)


def read_module(archive: zipfile.ZipFile, name: str) -> ModuleRecord:
    member = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == f"{name}.pt"), None)
    if member is None:
        raise CheckpointError(f"no {name}.pt in the archive (has: {', '.join(archive.namelist())})")
    root = _read_member_pickle(archive, member)
    if not _is_module(root):
        raise CheckpointError(f"{member}: does not hold a pickled module")
    attributes = {}
    for key, value in root.state.items():
        if key in _MODULE_INTERNALS or key.startswith("_"):
            continue
        try:
            attributes[key] = to_json(value, f"{member}: {key}")
        except _NotConfig:
            continue  # submodules, cached tensors: not constructor arguments
    state_dict: dict[str, torch.Tensor] = {}
    _state_dict(root, "", state_dict, member)
    return ModuleRecord(name=name, class_path=root.path, attributes=attributes, state_dict=state_dict)


def read_archive(data: bytes, label: str = "archive") -> dict[str, ModuleRecord]:
    """The encoder, squeezer and grouper records of a WSC ``.pt.zip``'s bytes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CheckpointError(f"{label}: not a zip file") from None
    with archive:
        try:
            return {name: read_module(archive, name) for name in MODULE_NAMES}
        except CheckpointError as exc:
            raise CheckpointError(f"{label}: {exc.message}") from None
