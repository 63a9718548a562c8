"""Loading pickles users bring (fairseq checkpoints) without running code from them.

`torch.load(weights_only=True)` refuses AV-HuBERT checkpoints (they hold a fairseq `Dictionary`
and, in older files, an argparse `Namespace`), and a plain `torch.load` would need fairseq
importable and would execute whatever the pickle names. This unpickler admits only what such
checkpoints need: tensors and their storages, plain containers, and config/dictionary objects,
which it rebuilds as inert attribute bags. Any other global (a function such as `os.system`, an
arbitrary class) is refused with its name.
"""

from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path

import torch

from .errors import MavsrError


class Inert:
    """Stands in for a class we do not import (fairseq, omegaconf, argparse objects)."""

    _origin = "?"

    def __init__(self, *args, **kwargs) -> None:
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            self.__dict__.update(state[1] or {})
            if isinstance(state[0], dict):
                self.__dict__.update(state[0])
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<inert {self._origin}>"


_INERT: dict[str, type] = {}


def _inert(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _INERT:
        _INERT[key] = type(name, (Inert,), {"_origin": key})
    return _INERT[key]


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): None,  # filled below (rebuilds plain objects of admitted classes)
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
_INERT_MODULE_PREFIXES = ("fairseq", "omegaconf", "argparse", "hydra")
# Lightning checkpoints (the authors' epoch=K.ckpt) keep their hyper-parameters in an AttributeDict,
# a dict subclass: rebuilt as a plain dict
_DICT_MODULE_PREFIXES = ("lightning", "lightning_fabric", "pytorch_lightning")


class InertDict(dict):
    """Stands in for a dict subclass we do not import."""


class Refused(pickle.UnpicklingError):
    """The pickle names something this loader does not admit."""


def _reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, InertDict) and base is dict:
        return cls()
    if not (isinstance(cls, type) and issubclass(cls, Inert)) or base is not object:
        raise Refused(f"refused to rebuild {cls!r}")
    return cls.__new__(cls)


_ALLOWED[("copyreg", "_reconstructor")] = _reconstructor


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module.split(".")[0] in _INERT_MODULE_PREFIXES:
            return _inert(module, name)
        if module.split(".")[0] in _DICT_MODULE_PREFIXES and name == "AttributeDict":
            return InertDict
        raise Refused(f"refused to load global {module}.{name}")


# torch.load takes a module-like object with `Unpickler` and `load`
restricted = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=pickle.load, __name__="mavsr_restricted")


def load_checkpoint(path: str | Path) -> dict:
    """torch.load a fairseq-style checkpoint through the restricted unpickler, on the CPU."""
    p = Path(path)
    if not p.is_file():
        raise MavsrError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", pickle_module=restricted, weights_only=False)
    except Refused as e:
        raise MavsrError(f"{p}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise MavsrError(f"{p} is not a readable torch checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise MavsrError(f"{p} does not hold a checkpoint dict")
    return obj


_NUMPY_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class NumpyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers only (landmark pickles)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_ALLOWED:
            return super().find_class(module, name)
        raise Refused(f"refused to load global {module}.{name}")


def load_numpy_pickle(path: str | Path):
    """Read a pickle of numpy arrays, lists and None (e.g. a landmark file) without running code."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return NumpyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise MavsrError(f"file not found: {p}") from None
    except Refused as e:
        raise MavsrError(f"{p}: {e}") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MavsrError(f"{p} is not a readable pickle: {why}") from None
