"""The CPU execution target: bncupy's CUDA kernels compiled by g++ and launched by the CuPy
backend's own launch plan, on :mod:`tests.emulated.device` arrays.

``install()`` makes it the CuPy backend's runtime for the whole process (the ``emulated`` tox
env does this through ``BNCUPY_EMULATED=1``); the backend-parametrised tests then run their
``cupy`` cases here. It checks logic, not speed or the GPU memory model: a GPU run is the proof.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bncupy.backends import cupy as cupy_backend

from . import device
from .build import build

_SCALARS = {"u32": (np.uint32, ctypes.c_uint32), "u64": (np.uint64, ctypes.c_uint64),
            "i32": (np.int32, ctypes.c_int32), "i64": (np.int64, ctypes.c_int64),
            "f32": (np.float32, ctypes.c_float), "f64": (np.float64, ctypes.c_double)}
try:  # ml_dtypes directly: the host-overhead benchmark runs this with older bncupy checkouts too
    from ml_dtypes import bfloat16 as _bfloat16
except ImportError:
    _bfloat16 = None
_ELEMENTS = {"f16": np.float16, "bf16": _bfloat16, "f32": np.float32, "f64": np.float64,
             "u32": np.uint32, "u64": np.uint64, "i32": np.int32, "i64": np.int64}
# What CuPy passes for Python scalars (cupy/_core/_kernel: int -> long long, float -> double).
_PYTHON_SCALARS = {int: "i64", float: "f64"}


class KernelFault(RuntimeError):
    """A launch that would be undefined behaviour on a GPU: a bad argument, a write past an
    allocation, a deadlock, a shuffle naming absent lanes, a hung block."""


# Dynamic shared memory a launch may take unless the kernel's limit was raised
# (cudaFuncAttributeMaxDynamicSharedMemorySize).
SHARED_DEFAULT = 48 * 1024


class Kernel:
    """One kernel specialisation, called as CuPy's ``RawKernel``: ``k(grid, block, args)``.

    ``max_dynamic_shared_size_bytes`` is the kernel's (on its runtime, as a GPU keeps it per
    function), 48 KB until raised; raising it beyond the device's opt-in limit fails as CUDA
    does. The emulator keeps no static shared memory per kernel: ``shared_size_bytes`` is 0.
    """

    shared_size_bytes = 0

    def __init__(self, runtime: EmulatedRuntime, name: str) -> None:
        if name not in runtime.entries:
            raise KernelFault(f"kernel {name} is not in the emulated library (not one of the "
                              f"backend's name_expressions())")
        self.runtime = runtime
        self.name = name
        self.index, self.signature = runtime.entries[name]

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.runtime.dynamic_limits.get(self.name, SHARED_DEFAULT)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        if not 0 <= value <= self.runtime.shared_memory_optin() - self.shared_size_bytes:
            raise KernelFault(f"{self.name}: a dynamic shared memory limit of {value} bytes is "
                              f"beyond the device's {self.runtime.shared_memory_optin()} "
                              "(cudaErrorInvalidValue)")
        self.runtime.dynamic_limits[self.name] = int(value)

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any],
                 shared_mem: int = 0, stream: Any = None) -> None:
        g, b = _dims(grid, "grid", self.name), _dims(block, "block", self.name)
        if g[0] >= 2**31 or g[1] > 65535 or g[2] > 65535:
            raise KernelFault(f"{self.name}: grid {g} exceeds CUDA's limits "
                              "(x < 2^31, y and z <= 65535)")
        if b[0] * b[1] * b[2] > 1024 or b[2] > 64:
            raise KernelFault(f"{self.name}: block {b} has more than 1024 threads or z > 64")
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise KernelFault(f"{self.name}: shared_mem must be a byte count, got {shared_mem!r}")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise KernelFault(f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed "
                              f"the kernel's limit of {self.max_dynamic_shared_size_bytes} "
                              "(raise max_dynamic_shared_size_bytes first; "
                              "CUDA_ERROR_INVALID_VALUE)")
        if not isinstance(args, tuple):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.signature):
            raise KernelFault(f"{self.name} takes {len(self.signature)} arguments, got "
                              f"{len(args)}")
        keep, allocations = [], []
        argv = (ctypes.c_void_p * max(1, len(args)))()
        for i, (arg, kind) in enumerate(zip(args, self.signature, strict=True)):
            holder = self._pack(i, arg, kind)
            if isinstance(arg, device.ndarray):
                allocations.append((i, arg._alloc))
            keep.append(holder)
            argv[i] = ctypes.addressof(holder)
        rt = self.runtime
        device.FAULTS.tick("launch")
        stream = rt.current_stream()
        device.SEAM.launches += 1
        device.SEAM.streams.append(stream.ptr)

        def run(allocations: list, holders: list = keep) -> None:  # argv points into holders
            if rt.null:
                return
            buffers = list({id(a): a for _, a in allocations}.values())
            ranges = (ctypes.c_ulonglong * max(1, 2 * len(buffers)))(*[
                v for a in buffers for v in (a.buffer.ctypes.data,
                                             a.buffer.ctypes.data + a.nbytes)])
            counts = (ctypes.c_ulonglong * max(1, 3 * len(buffers)))()
            error = ctypes.create_string_buffer(1024)
            seed = rt.seed * 1_000_003 + next(rt.launches)
            failed = rt.lib.bncupy_emu_launch(
                self.index, (ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b),
                ctypes.c_ulonglong(int(shared_mem)), argv,
                1 if rt.order == "random" else 0, ctypes.c_ulonglong(seed),
                ctypes.c_double(rt.timeout), error, len(error), ranges, len(buffers), counts)
            device.SEAM.traffic.append((self.name, [(a, *counts[3 * i:3 * i + 3])
                                                    for i, a in enumerate(buffers)]))
            device.SEAM.rsqrts.append((self.name, rt.lib.bncupy_emu_rsqrts()))
            if failed:
                raise KernelFault(f"{self.name} grid={g} block={b}: {error.value.decode()}")
            for i, alloc in allocations:
                if not alloc.intact():
                    raise KernelFault(f"{self.name} grid={g} block={b} wrote past the end of the "
                                      f"allocation behind argument {i}")

        if stream.capture is not None:  # recorded (weakly: a graph keeps no memory alive)
            refs = [(i, weakref.ref(alloc)) for i, alloc in allocations]
            stream.capture.append((run, refs, self.name))
            return
        run(allocations)

    def _pack(self, i: int, arg: Any, kind: str) -> Any:
        where = f"{self.name}: argument {i}"
        if kind.startswith("p:"):
            _, element, size = kind.split(":")
            if arg is None:
                raise KernelFault(f"{where} is a pointer ({element}) but got None: CuPy 13 "
                                  "passes None as a garbage address; pass the backend's NULL")
            if isinstance(arg, np.uint64) and arg == 0:  # the backend's NULL
                return ctypes.c_void_p(0)
            if isinstance(arg, np.ndarray):
                raise TypeError(f"{where}: Unsupported type {type(arg)} (a host array passed to "
                                "a kernel)")
            if not isinstance(arg, device.ndarray):
                raise KernelFault(f"{where} is a pointer ({element}) but got "
                                  f"{type(arg).__name__}")
            if arg.dtype != _ELEMENTS[element] or arg.nbytes % int(size):
                raise KernelFault(f"{where} points to {element} elements of {size} bytes but got "
                                  f"a {arg.dtype} array of shape {arg.shape}")
            if not arg.flags.c_contiguous:
                raise KernelFault(f"{where} is not C-contiguous (the kernel sees only its "
                                  "first element's address)")
            return ctypes.c_void_p(arg.data.ptr)
        expected, ctype = _SCALARS[kind]
        passed = _PYTHON_SCALARS.get(type(arg)) if not isinstance(arg, np.generic) else None
        if passed is not None:
            if passed != kind:
                raise KernelFault(f"{where}: a Python {type(arg).__name__} is passed as {passed} "
                                  f"but the parameter is {kind}: CuPy would reinterpret its "
                                  f"bytes; pass numpy.{np.dtype(expected).name}")
            return ctype(arg)
        if not isinstance(arg, np.generic) or arg.dtype != expected:
            got = arg.dtype if isinstance(arg, np.generic) else type(arg).__name__
            raise KernelFault(f"{where} is {kind} but got {got}: a GPU would reinterpret the "
                              "bytes")
        return ctype(arg.item())


def _dims(value: Any, what: str, name: str) -> tuple[int, int, int]:
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise KernelFault(f"{name}: {what} must be 1 to 3 ints, got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if min(dims) < 1:
        raise KernelFault(f"{name}: {what} {dims} has an empty dimension (invalid configuration)")
    return dims  # type: ignore[return-value]


# Function-local statics of the emulator and the C++ library, not of device code.
_NOT_DEVICE = ("_ZZN10bncupy_emu", "_ZZNSt", "_ZZSt", "_ZZN9__gnu_cxx")


def _register_shared(lib: ctypes.CDLL, path: Path) -> list[str]:
    """Register every function-local static of the library's device code (``__shared__``
    variables: CUDA device code has no other) with the loader, which poisons them before each
    block; returns their mangled names. The emulator's own statics are in ``bncupy_emu``."""
    out = subprocess.run(["nm", "--defined-only", "-S", str(path)], capture_output=True,
                         text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16), parts[2])
    address = ctypes.cast(lib.bncupy_emu_count, ctypes.c_void_p).value
    assert address is not None
    base = address - symbols["bncupy_emu_count"][0]
    names = []
    for name, (value, size, kind) in symbols.items():
        if name.startswith("_ZZ") and not name.startswith(_NOT_DEVICE) and kind in "bBdDuV" \
                and size:
            lib.bncupy_emu_add_shared(ctypes.c_void_p(base + value), ctypes.c_ulonglong(size))
            names.append(name)
    return names


class EmulatedRuntime:
    """The CuPy backend's runtime on the CPU (see :class:`bncupy.backends.cupy.CupyRuntime`).

    Parameters
    ----------
    sms : int
        Streaming multiprocessors the launch plan sizes its grids for.
    order : "random" or "index"
        Order in which a launch's blocks run (one at a time).
    seed : int
        Seeds the block order and the threads' turns (each launch draws its own from it).
    library : path, optional
        A library from :func:`tests.emulated.build.build` (default: every kernel of kernels/).
    null : bool
        Launches check their arguments but run nothing (with :data:`device.POISON` off,
        allocations are O(1) too): what the launch plan does, counted through the seam.
    shared_optin : int
        Shared memory a block may take once a kernel opts in (an H200's 227 KB by default).
    """

    def __init__(self, sms: int = 132, order: str = "random", seed: int = 0,
                 library: Path | None = None, timeout: float = 120.0, null: bool = False,
                 shared_optin: int = 232448) -> None:
        if order not in ("random", "index"):
            raise ValueError(f"order must be 'random' or 'index', got {order!r}")
        self.sms, self.order, self.seed, self.timeout = sms, order, seed, timeout
        self.shared_optin = shared_optin
        self.dynamic_limits: dict[str, int] = {}  # kernels' raised dynamic shared memory limits
        self.null = null
        library = Path(library or build())
        self.lib = ctypes.CDLL(str(library))
        self.lib.bncupy_emu_name.restype = ctypes.c_char_p
        self.lib.bncupy_emu_signature.restype = ctypes.c_char_p
        self.lib.bncupy_emu_rsqrts.restype = ctypes.c_ulonglong
        self.entries = {}
        for i in range(self.lib.bncupy_emu_count()):
            sig = self.lib.bncupy_emu_signature(i).decode()
            self.entries[self.lib.bncupy_emu_name(i).decode()] = (i, sig.split(",") if sig else [])
        self.shared = _register_shared(self.lib, library)
        self.launches = itertools.count()
        self.xp = device

    def unavailable_reason(self) -> None:
        return None

    def require(self) -> Any:
        return self.xp

    @staticmethod
    def is_array(value: Any) -> bool:
        return isinstance(value, device.ndarray) or cupy_backend.CupyRuntime.is_array(value)

    def kernel(self, dtype: str, name: str) -> Kernel:
        return Kernel(self, name)

    def sm_count(self) -> int:
        return self.sms

    def shared_memory_optin(self) -> int:
        return self.shared_optin

    def device_id(self) -> int:
        return 0

    def current_stream(self) -> Any:
        return device.get_current_stream()

    def external_stream(self, ptr: int, device_id: int) -> Any:
        return device.ExternalStream(ptr, device_id)

    def is_capturing(self) -> bool:
        return device.get_current_stream().is_capturing()

    def describe(self) -> str:
        return (f"CPU execution target (kernels built with g++; {self.sms} SMs modelled, blocks "
                f"in {self.order} order, seed {self.seed})")


class _NullKernel:
    """A launch that only counts (the host-overhead benchmark's: no argument checks either)."""

    __slots__ = ()
    shared_size_bytes = 0
    max_dynamic_shared_size_bytes = property(lambda self: 0, lambda self, value: None)

    def __call__(self, grid: Any, block: Any, args: Any, shared_mem: int = 0,
                 stream: Any = None) -> None:
        device.SEAM.launches += 1


class NullRuntime(EmulatedRuntime):
    """The launch plan with nothing behind it: no kernels built or run, no argument checks,
    allocations O(1) (memory is never touched). bncupy's own host time per call is what remains;
    :data:`device.SEAM` still counts launches, allocations and operations."""

    def __init__(self, sms: int = 132) -> None:
        self.sms, self.null, self.xp = sms, True, device
        self.shared_optin, self.dynamic_limits = 232448, {}
        self.order, self.seed = "index", 0

    def kernel(self, dtype: str, name: str) -> Any:
        return _NULL_KERNEL

    def describe(self) -> str:
        return f"null runtime ({self.sms} SMs modelled; kernels not run)"


_NULL_KERNEL = _NullKernel()


def from_environment() -> EmulatedRuntime:
    """A runtime configured by ``BNCUPY_EMULATED_ORDER`` (random|index), ``BNCUPY_EMULATED_SEED``
    and ``BNCUPY_EMULATED_SMS``."""
    return EmulatedRuntime(sms=int(os.environ.get("BNCUPY_EMULATED_SMS", "132")),
                           order=os.environ.get("BNCUPY_EMULATED_ORDER", "random"),
                           seed=int(os.environ.get("BNCUPY_EMULATED_SEED", "0")))


def install(runtime: EmulatedRuntime | None = None) -> EmulatedRuntime:
    """Make ``runtime`` (default: :func:`from_environment`) the CuPy backend's runtime."""
    runtime = runtime or from_environment()
    cupy_backend.set_runtime(runtime)
    return runtime
