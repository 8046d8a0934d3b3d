"""Arrays of other libraries, in and out: DLPack and ``__cuda_array_interface__``.

An argument that is neither a NumPy nor a CuPy array but implements ``__dlpack__`` (torch tensors,
JAX arrays, any array-API library) or ``__cuda_array_interface__`` is imported without a copy:
host memory as a NumPy array (:func:`numpy.from_dlpack`), CUDA memory as a CuPy array, so that
``auto`` computes where the memory lives. Views share memory, so running statistics passed that
way are updated in place; memory exported read-only stays read-only (and is refused where
bncupy would write). Results go back through the caller's library's ``from_dlpack``, found from
the argument's own type: this module never imports torch, JAX or any other array library.

bfloat16, which DLPack carries but NumPy's importer refuses, crosses as its 16-bit payload:
a torch tensor is reinterpreted as int16 and viewed as ``ml_dtypes.bfloat16`` (no copy), and a
bfloat16 result goes back the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import numpy as np

from ._dtypes import BFLOAT16
from .backends import cupy as cupy_backend
from .backends.dispatch import _kinds_runtime, array_kind, known_kinds

# DLPack device types (dlpack.h): memory NumPy can address, and CUDA memory.
_HOST_DEVICES = {1: "cpu", 3: "cuda_host", 11: "rocm_host"}
_CUDA_DEVICES = {2: "cuda", 13: "cuda_managed"}

P = ParamSpec("P")
R = TypeVar("R")


def is_foreign(value: Any) -> bool:
    """True for an array of another library that bncupy can import."""
    return array_kind(value) is None and (hasattr(value, "__dlpack__")
                                          or hasattr(value, "__cuda_array_interface__"))


def _device(value: Any, arg: str) -> str:
    """Where a foreign array's memory lives: a DLPack device name ("cpu", "cuda", ...)."""
    if hasattr(value, "__dlpack_device__"):
        code = int(value.__dlpack_device__()[0])
        if code in _HOST_DEVICES:
            return _HOST_DEVICES[code]
        if code in _CUDA_DEVICES:
            return _CUDA_DEVICES[code]
        raise TypeError(f"{arg} ({_library(value)}) lives on DLPack device type {code}; bncupy "
                        f"computes on host memory (NumPy) and CUDA memory (CuPy) only")
    if hasattr(value, "__cuda_array_interface__"):
        return "cuda"
    raise TypeError(f"{arg} ({_library(value)}) has __dlpack__ but no __dlpack_device__, so "
                    f"where its memory lives is unknown")


def _library(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def describe(value: Any, arg: str = "argument") -> str:
    """The kind of an array argument as messages name it: ``numpy.ndarray``, ``cupy.ndarray``,
    ``torch.Tensor (cpu)``, ..."""
    kind = array_kind(value)
    if kind is not None:
        return f"{kind}.ndarray"
    return f"{_library(value)} ({_device(value, arg)})"


def to_native(value: Any, arg: str) -> Any:
    """A NumPy (host memory) or CuPy (CUDA memory) array sharing ``value``'s memory.

    Raises
    ------
    TypeError
        Naming ``arg``, when the exporter refuses (a torch tensor that requires grad, a dtype
        NumPy lacks such as bfloat16) or the memory is on a device bncupy does not compute on.
    BackendUnavailableError
        For CUDA memory where the CuPy backend cannot run.
    """
    device = _device(value, arg)
    if device in _HOST_DEVICES.values():
        importer = np.from_dlpack
    else:
        cupy = cupy_backend.require()
        importer = cupy.from_dlpack if hasattr(value, "__dlpack__") else cupy.asarray
    try:
        return importer(value)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        if _is_bfloat16(value):
            if device not in _HOST_DEVICES.values():
                raise TypeError(f"{arg} ({_library(value)} on {device}) is bfloat16, which needs "
                                f"CuPy >= 14 (CuPy {cupy.__version__} is installed): {exc}"
                                ) from exc
            native = _bfloat16_payload(value, importer)
            if native is not None:
                return native
        raise TypeError(f"{arg} ({_library(value)} on {device}) could not be imported through "
                        f"DLPack: {exc}") from exc


def _is_bfloat16(value: Any) -> bool:
    return BFLOAT16 is not None and str(getattr(value, "dtype", "")).endswith("bfloat16")


def _bfloat16_payload(value: Any, importer: Callable[[Any], Any]) -> Any:
    """A bfloat16 array whose exporter's DLPack NumPy refuses: its 16-bit payload imported as
    int16 (the library's own ``view(int16)``: no copy) and viewed as bfloat16; else what its
    ``__array__`` gives when that is bfloat16 (JAX hands out ml_dtypes arrays); else None."""
    int16 = getattr(sys.modules.get(type(value).__module__.split(".")[0]), "int16", None)
    with contextlib.suppress(BufferError, RuntimeError, TypeError, ValueError, AttributeError):
        if int16 is not None:
            return importer(value.view(int16)).view(BFLOAT16)
    with contextlib.suppress(BufferError, RuntimeError, TypeError, ValueError):
        array = np.asarray(value)
        if array.dtype == BFLOAT16:
            return array
    return None


def _exporter(value: Any) -> Callable[[Any], Any] | None:
    """The ``from_dlpack`` of ``value``'s library: its array-API namespace's, else its top-level
    module's (torch.from_dlpack); only libraries the caller has already imported are looked at."""
    namespace = getattr(value, "__array_namespace__", None)
    if namespace is not None:
        found = getattr(namespace(), "from_dlpack", None)
        if found is not None:
            return found
    module = sys.modules.get(type(value).__module__.split(".")[0])
    return getattr(module, "from_dlpack", None)


def export(result: Any, exporter: Callable[[Any], Any]) -> Any:
    """``result`` with every NumPy/CuPy array in it (tuples, dataclasses such as
    :class:`~bncupy.Moments`) passed through ``exporter``."""
    if array_kind(result) is not None:
        try:
            return exporter(result)
        except (BufferError, RuntimeError, TypeError, ValueError):
            if result.dtype != BFLOAT16:
                raise
            return _export_bfloat16(result, exporter)
    if isinstance(result, tuple):
        items = [export(item, exporter) for item in result]
        return result._make(items) if hasattr(result, "_make") else tuple(items)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.replace(result, **{f.name: export(getattr(result, f.name), exporter)
                                              for f in dataclasses.fields(result) if f.init})
    return result


def _export_bfloat16(result: Any, exporter: Callable[[Any], Any]) -> Any:
    """A bfloat16 result through an exporter that refuses it: its payload as int16, viewed back
    as the library's bfloat16 (no copy)."""
    out = exporter(result.view(np.int16))
    library = sys.modules.get(type(out).__module__.split(".")[0])
    bfloat16 = getattr(library, "bfloat16", None)
    if bfloat16 is None:  # e.g. jax.Array: the namespace module holds the dtype
        bfloat16 = getattr(getattr(library, "numpy", None), "bfloat16", None)
    return out.view(bfloat16)


def import_arrays(arguments: dict[str, Any], names: Iterable[str]) -> Callable[[Any], Any]:
    """Replace the foreign arrays among ``arguments[name]`` by native views, in place.

    Returns the function that gives a result back in the caller's kind (the identity when no
    argument was foreign, or the foreign library has no ``from_dlpack``).

    Raises
    ------
    TypeError
        When the array arguments are of different kinds (naming each), or one cannot be imported.
    """
    kinds = {name: describe(arguments[name], name) for name in names
             if is_foreign(arguments.get(name)) or array_kind(arguments.get(name)) is not None}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{name} is a {kind}" for name, kind in kinds.items())
        raise TypeError(f"all array arguments must be of one kind: {listing}")
    foreign = [name for name in kinds if is_foreign(arguments[name])]
    if not foreign:
        return lambda result: result
    exporter = _exporter(arguments[foreign[0]])
    for name in foreign:
        arguments[name] = to_native(arguments[name], name)
    if exporter is None:
        return lambda result: result
    return functools.partial(export, exporter=exporter)


def caller_stream(arguments: dict[str, Any], names: Iterable[str]) -> Any:
    """The stream the caller's library is working on, for foreign CUDA arrays whose library
    names one (torch: ``torch.cuda.current_stream``), wrapped without a copy as a CuPy stream;
    None when there is none (CuPy's current stream is then the caller's)."""
    for name in names:
        value: Any = arguments.get(name)
        if not is_foreign(value) or not hasattr(value, "__dlpack_device__"):
            continue
        code, device = value.__dlpack_device__()
        if int(code) not in _CUDA_DEVICES:
            continue
        module = sys.modules.get(type(value).__module__.split(".")[0])
        current = getattr(getattr(module, "cuda", None), "current_stream", None)
        if current is not None:
            ptr = int(current(int(device)).cuda_stream)
            return cupy_backend.runtime().external_stream(ptr, int(device))
    return None


# Argument types that are never foreign arrays: checked before anything else.
_PLAIN = frozenset({type(None), bool, int, float, str, np.ndarray})


def accepts(*names: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that its array parameters ``names`` also take foreign arrays
    (returned results then come back in their kind, computed on the caller's stream where its
    library names one). Calls with only NumPy/CuPy arrays go straight through."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        # where the array parameters sit among the positional arguments (only they are looked
        # at: a foreign array anywhere else is not imported either way)
        positional = tuple(i for i, (name, p) in enumerate(signature.parameters.items())
                           if name in names and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD))

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            count = len(args)
            kinds = known_kinds()  # NumPy/CuPy array types: never foreign
            for i in positional:
                if i < count:
                    a = args[i]
                    cls = type(a)
                    if cls not in _PLAIN and not kinds.get(cls) and is_foreign(a):
                        break
            else:
                for a in kwargs.values():
                    cls = type(a)
                    if cls not in _PLAIN and not kinds.get(cls) and is_foreign(a):
                        break
                else:
                    return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            stream = caller_stream(bound.arguments, names)
            with contextlib.nullcontext() if stream is None else stream:
                give_back = import_arrays(bound.arguments, names)
                return give_back(fn(*bound.args, **bound.kwargs))

        return functools.wraps(fn)(_direct(fn, signature, names, call) or call)

    return decorate


def _direct(fn: Callable[P, R], signature: inspect.Signature, names: tuple[str, ...],
            general: Callable[P, R]) -> Callable[P, R] | None:
    """A wrapper with ``fn``'s own parameters that calls ``fn`` itself when each array
    parameter in ``names`` is None, a plain value or of a type known to be NumPy/CuPy under the
    runtime in force, and ``general`` (the wrapper taking ``*args, **kwargs``) otherwise; None
    where ``fn`` takes ``*args`` or ``**kwargs`` (or a parameter whose name could clash with
    the wrapper's own).

    Passing the arguments on as they came costs about a quarter of what packing them into
    ``*args, **kwargs`` and unpacking them again does, and every public call goes through here.
    """
    namespace: dict[str, Any] = {"_fn": fn, "_general": general, "_plain": _PLAIN,
                                 "_kinds": known_kinds(), "_seen": _kinds_runtime,
                                 "_cuda": cupy_backend._cuda}
    values = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name.startswith("_")
           for p in values):
        return None
    last_positional_only = max((i for i, p in enumerate(values) if p.kind is p.POSITIONAL_ONLY),
                               default=-1)
    params, passed = [], []
    for i, p in enumerate(values):
        if p.kind is p.KEYWORD_ONLY and "*" not in params:
            params.append("*")
        if p.default is p.empty:
            params.append(p.name)
        else:
            namespace[f"_default{i}"] = p.default
            params.append(f"{p.name}=_default{i}")
        passed.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
        if i == last_positional_only:
            params.append("/")
    checks = " and ".join(f"({n}.__class__ in _plain or _kinds.get({n}.__class__))"
                          for n in names if n in signature.parameters)
    args = ", ".join(passed)
    source = (f"def {fn.__name__}({', '.join(params)}):\n"
              f"    if _seen[0] is _cuda._runtime and {checks or 'True'}:\n"
              f"        return _fn({args})\n"
              f"    return _general({args})\n")
    exec(compile(source, f"<bncupy.accepts {fn.__qualname__}>", "exec"), namespace)
    made: Callable[P, R] = namespace[fn.__name__]
    return made


def merge_moments(a: Any, b: Any) -> Any:
    """``a.merge(b)`` for :class:`~bncupy.Moments` holding foreign arrays: merged as NumPy/CuPy
    views, returned in the arrays' own kind."""
    arrays = {"self.mean": a.mean, "self.m2": a.m2, "other.mean": b.mean, "other.m2": b.m2}
    give_back = import_arrays(arrays, list(arrays))
    native_a = dataclasses.replace(a, mean=arrays["self.mean"], m2=arrays["self.m2"])
    native_b = dataclasses.replace(b, mean=arrays["other.mean"], m2=arrays["other.m2"])
    return give_back(native_a.merge(native_b))
