"""NumPy backend: the numerical reference and a multi-threaded CPU fallback.

Every operation sees its input as a C-contiguous ``(A, C, B)`` array, the channel axis in the
middle (a non-contiguous input is copied once). Its passes over memory:

* statistics: **one read** of ``x``. The array is cut into cache-sized units; a unit's centre
  (in the compute dtype) is the mean of a sample of it (or of all of it), then, while it is in
  cache, ``sum(x - centre)`` and ``sum((x - centre)^2)`` are accumulated in float64, after at
  most 16 values (or a pairwise sum along a row) in the compute dtype. A unit whose sample mean
  is more than a standard deviation from its mean in some channel is summed again about that
  mean, so there is no cancellation whatever the mean. The units' partials are Chan-merged in
  unit order;
* apply: **one read** of ``x`` (and the residual), **one write** of ``y``:
  ``act((x - center) * scale + shift + residual)`` in the compute dtype, with ``center`` the
  mean in the compute dtype; a constant channel gives ``0 * scale + shift``, exactly beta;
* backward: **one read** of ``x`` and ``dy`` for the float64 sums ``sum(dy)`` and
  ``sum(dy * (x - center))``, then **one read** of each and **one write** of ``dx``.

So forward-train reads ``x`` twice and writes once, eval reads once, backward reads ``x`` and
``dy`` twice each. The compute dtype is float32 (float64 for float64 input); float16 data stays
in float16 storage and is widened unit by unit as it is read.

Two engines make these passes: compiled loops (:mod:`._compiled`, when Numba is importable, as
the default install makes it where Numba has wheels; ``BNCUPY_CPU_ENGINE=numpy`` turns it off)
and NumPy ufuncs on L2-sized tiles (:mod:`._ufuncs`); :func:`engine_status` says which runs and
why. Their elementwise outputs are bitwise equal; their statistics differ only in rounding (the
order of the sums, the centres). Work units go to at most ``BNCUPY_NUM_THREADS`` threads
(:mod:`._pool`) counting the caller's; idle pool threads sleep, and no BLAS is called, so a call
runs no threads of its own libraries. Partials are merged in unit order: results do not depend
on the thread count. Data holding inf or NaN gives NaN in its channels, and no NumPy warning.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType
from typing import Any

import numpy as np

from .._dtypes import BFLOAT16
from ._common import backward_coefficients, cast, compute_dtype, forward_coefficients, quiet
from ._pool import PARALLEL_MIN
from ._pool import run as _run
from ._pool import threads as _threads
from ._ufuncs import NumpyPasses, _tiles  # noqa: F401 (_tiles: tests/test_properties.py)

name = "numpy"
xp = np

_UNIT_ELEMENTS = 1 << 14  # compiled engine: a row segment of 64 KiB of float32, in L1/L2
_BLOCK_ELEMENTS = 1 << 16  # compiled engine: a block of rows of 256 KiB of float32, in L2
_ROW_MIN = 64  # compiled engine: shortest row walked as a row (one vectorized loop step)


def asarray(a: Any) -> np.ndarray:
    """A NumPy view/copy of ``a`` (CuPy arrays are copied to the host)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def view3(x: np.ndarray, axis: int, dtype: Any = None) -> np.ndarray:
    """``x`` as a C-contiguous ``(A, C, B)`` array, channel axis in the middle (a copy only when
    ``x`` is not contiguous or is not of ``dtype``; bfloat16 is widened to float32, which the
    engines compute in)."""
    a, b = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    if dtype is None and x.dtype == BFLOAT16:
        dtype = np.float32
    return np.ascontiguousarray(x, dtype).reshape(a, x.shape[axis], b)


def _operand(v: np.ndarray, axis: int, cd: np.dtype) -> np.ndarray:
    """``dy`` or a residual as :func:`view3`, in ``cd`` unless it already computes in ``cd``."""
    own = compute_dtype(v.dtype) == cd and v.dtype != BFLOAT16
    return view3(v, axis, v.dtype if own else cd)


def _output(x: np.ndarray) -> np.ndarray:
    """An output array like ``x`` for the engines (float32 for bfloat16: see :func:`_stored`)."""
    return np.empty(x.shape, np.float32 if x.dtype == BFLOAT16 else x.dtype)


def _stored(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """An engine's output in ``dtype``: bfloat16 rounded to nearest even from float32."""
    return out.astype(dtype) if out.dtype != dtype else out


# --- the compiled engine ------------------------------------------------------------------------

def _bits(a: np.ndarray | None) -> np.ndarray | None:
    """float16 arrays as their ``uint16`` bits (the compiled loops widen them)."""
    return a.view(np.uint16) if a is not None and a.dtype == np.float16 else a


class CompiledPasses:
    """The passes as Numba-compiled loops over cache-sized units (see :mod:`._compiled`).

    Rows of at least ``_ROW_MIN`` values (channel first) are walked row by row, in segments of at
    most ``_UNIT_ELEMENTS``, with per-channel scalars. Anything else, channels last (``B == 1``)
    and short rows alike, is walked as ``(A, C*B)`` columns in blocks of rows, with per-channel
    vectors spread over the ``B`` values of each channel: a short row would never reach the
    vectorized loop, a column block always does.
    """

    name = "numba"

    def __init__(self, kernels: ModuleType) -> None:
        self.k = kernels

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _units(shape: tuple[int, ...]) -> tuple[bool, int, int, np.ndarray, int]:
        """``(by_rows, unit_length, units, counts, k)`` for an ``(A, C, B)`` shape: ``counts``
        are the values of each of the statistics' partials, ordered as :meth:`moments` hands
        them to ``merge_moments``; ``k`` partials per channel and row or block (segments of a
        row, or the ``B`` columns of a channel). Cached: a shape's plan is worked out once."""
        a, c, b = shape
        if b >= _ROW_MIN:
            seg = min(b, _UNIT_ELEMENTS)
            nseg = -(-b // seg)
            counts = np.full(nseg, seg)
            counts[-1] = b - seg * (nseg - 1)
            return True, seg, a * c * nseg, np.tile(counts, a), nseg
        rows = max(16, _BLOCK_ELEMENTS // (c * b))
        units = -(-a // rows)
        counts = np.full(units, rows)
        counts[-1] = a - rows * (units - 1)
        return False, rows, units, np.repeat(counts, b), b

    @staticmethod
    def _flat(a3: np.ndarray | None, by_rows: bool) -> Any:
        if a3 is None:
            return None
        a, c, b = a3.shape
        return _bits(a3.reshape(a * c, b) if by_rows else a3.reshape(a, c * b))

    def moments(self, x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = x3.shape[1]
        by_rows, length, units, counts, k = self._units(x3.shape)
        x2 = self._flat(x3, by_rows)
        if by_rows:
            mean, m2 = np.empty(units), np.empty(units)
            _run(lambda lo, hi: self.k.row_moments(x2, length, lo, hi, mean, m2), units, x3.size)
        else:
            mean, m2 = np.empty((units, c * k)), np.empty((units, c * k))
            _run(lambda lo, hi: self.k.column_moments(x2, length, lo, hi, mean, m2), units,
                 x3.size)
        # partials ordered (row or block, segment or column) for each channel
        if k == 1:
            parts = mean.reshape(-1, c), m2.reshape(-1, c)
        else:
            parts = tuple(v.reshape(-1, c, k).transpose(0, 2, 1).reshape(-1, c) for v in (mean, m2))
        return self.k.merge_moments(*parts, counts)

    def affine(self, x3: np.ndarray, z3: np.ndarray | None, y3: np.ndarray,
               center: np.ndarray, scale: np.ndarray, shift: np.ndarray, relu: bool) -> None:
        by_rows, length, units = self._units(x3.shape)[:3]
        x2, z2, y2 = (self._flat(v, by_rows) for v in (x3, z3, y3))
        c, b = x3.shape[1:]
        if by_rows:
            _run(lambda lo, hi: self.k.row_affine(x2, z2, y2, length, c, center, scale, shift,
                                                  relu, lo, hi), units, x3.size)
        else:
            if b > 1:
                center, scale, shift = (np.repeat(v, b) for v in (center, scale, shift))
            _run(lambda lo, hi: self.k.column_affine(x2, z2, y2, length, center, scale, shift,
                                                     relu, lo, hi), units, x3.size)

    def grad_sums(self, g3: np.ndarray, x3: np.ndarray, center: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray]:
        c, b = x3.shape[1:]
        by_rows, length, units, _, k = self._units(x3.shape)
        g2, x2 = self._flat(g3, by_rows), self._flat(x3, by_rows)
        if by_rows:
            sum_g, sum_gx = np.empty(units), np.empty(units)
            _run(lambda lo, hi: self.k.row_grad_sums(g2, x2, length, c, center, lo, hi, sum_g,
                                                     sum_gx), units, x3.size)
        else:
            sum_g, sum_gx = np.empty((units, c * b)), np.empty((units, c * b))
            spread = np.repeat(center, b) if b > 1 else center
            _run(lambda lo, hi: self.k.column_grad_sums(g2, x2, length, spread, lo, hi, sum_g,
                                                        sum_gx), units, x3.size)
        # (row or block, channel, segment or column), summed in that fixed order
        return sum_g.reshape(-1, c, k).sum(axis=(0, 2)), sum_gx.reshape(-1, c, k).sum(axis=(0, 2))

    def grad_affine(self, g3: np.ndarray, x3: np.ndarray, dx3: np.ndarray, center: np.ndarray,
                    a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        by_rows, length, units = self._units(x3.shape)[:3]
        g2, x2, dx2 = (self._flat(v, by_rows) for v in (g3, x3, dx3))
        ch, n = x3.shape[1:]
        if by_rows:
            _run(lambda lo, hi: self.k.row_grad_affine(g2, x2, dx2, length, ch, center, a, b, c,
                                                       lo, hi), units, x3.size)
        else:
            if n > 1:
                center, a, b, c = (np.repeat(v, n) for v in (center, a, b, c))
            _run(lambda lo, hi: self.k.column_grad_affine(g2, x2, dx2, length, center, a, b, c,
                                                          lo, hi), units, x3.size)


_NOT_COMPILED: list[str] = []  # why the compiled engine could not be loaded


def _load_compiled() -> CompiledPasses | None:
    """The compiled engine, or None (why in ``_NOT_COMPILED``)."""
    _NOT_COMPILED.clear()
    try:
        from . import _compiled
    except ModuleNotFoundError as exc:
        if exc.name not in ("numba", "llvmlite"):
            raise
        _NOT_COMPILED.append(
            "Numba is not installed (bncupy installs it where it has wheels; "
            "`python3 -m pip install numba` adds it where it can be installed)")
        return None
    except Exception as exc:  # a Numba that cannot run here, e.g. one too old for this NumPy
        _NOT_COMPILED.append(f"Numba failed to load: {type(exc).__name__}: {exc}")
        return None
    return CompiledPasses(_compiled)


_COMPILED: list[CompiledPasses | None] = []  # filled on first use: importing Numba takes time


def _compiled_engine() -> CompiledPasses | None:
    if not _COMPILED:
        _COMPILED.append(_load_compiled())
    return _COMPILED[0]


def _engine_off() -> bool:
    return os.environ.get("BNCUPY_CPU_ENGINE", "").strip().lower() == "numpy"


def engine() -> NumpyPasses | CompiledPasses:
    """The passes in use: compiled when Numba is importable and ``BNCUPY_CPU_ENGINE`` is not
    ``numpy``."""
    compiled = None if _engine_off() else _compiled_engine()
    return compiled or NumpyPasses()


def engine_status() -> tuple[str, str]:
    """The engine NumPy-backend calls use now, ``"numba"`` or ``"numpy"``, and why."""
    if _engine_off():
        return "numpy", "BNCUPY_CPU_ENGINE=numpy turns the compiled engine off"
    compiled = _compiled_engine()
    if compiled is None:
        return "numpy", _NOT_COMPILED[0] if _NOT_COMPILED else "the compiled engine is disabled"
    where = compiled.k.cache_dir()
    cache = (f"compiled code cached in {where}" if where else
             "compiled code not cached: no writable cache directory (set NUMBA_CACHE_DIR)")
    return "numba", f"Numba {compiled.k.NUMBA_VERSION} is installed; {cache}"


# --- the backend interface ------------------------------------------------------------------------

@quiet
def stats(x: np.ndarray, axis: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel Welford partials ``(count, mean, m2)`` of ``x`` (float64 mean and m2)."""
    x3 = view3(x, axis)
    a, c, b = x3.shape
    if x3.size == 0:
        return a * b, np.zeros(c), np.zeros(c)
    mean, m2 = engine().moments(x3)
    return a * b, mean, np.maximum(m2, 0.0)


def _saved(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dtype = compute_dtype(x.dtype)  # per-channel outputs: float32, or float64 for float64 input
    return mean.astype(dtype), invstd.astype(dtype)


# --- small tensors ---------------------------------------------------------------------------
#
# Below SMALL_ELEMENTS values an op is a few whole-array NumPy operations: no tiles, no thread
# pool, no engine. The statistics are two-pass in float64 over the whole array (at least as
# precise as the engines' unit-wise two-pass sums); the coefficients are the same functions of
# them, and the elementwise passes the same operations in the compute dtype as the engines'
# (so a fused ReLU's backward recomputes exactly the forward's pre-activation).

SMALL_ELEMENTS = 1024
_PLAIN_FLOATS = frozenset(np.dtype(d) for d in (np.float16, np.float32, np.float64))
_WIDE_FLOATS = frozenset(np.dtype(d) for d in (np.float32, np.float64))


class Small:
    """The plan of a signature the small path takes: the ``(A, C, B)`` shape, whether the
    compiled engine's one-call kernels may run it (float32/float64 input-shaped arrays), and
    which per-channel vectors they take as float64 copies (not contiguous float32/float64)."""

    __slots__ = ("shape3", "compiled", "convert")

    def __init__(self, shape3: tuple[int, int, int], compiled: bool,
                 convert: tuple[bool, ...]) -> None:
        self.shape3, self.compiled, self.convert = shape3, compiled, convert


def plan(x: np.ndarray, axis: int, arrays: tuple = (), vectors: tuple = ()) -> Small | None:
    """What a call signature fixes for this backend (see the CuPy backend's ``plan``): a
    :class:`Small` when ``x`` (the input as the backend gets it), the input-shaped ``arrays``
    and the per-channel ``vectors`` take the small path: under :data:`SMALL_ELEMENTS` values,
    not empty, contiguous, float16/32/64 throughout."""
    if not 0 < x.size < SMALL_ELEMENTS or x.ndim < 2:
        return None
    wide = True
    for a in (x, *arrays):
        if a is not None:
            if a.dtype not in _PLAIN_FLOATS or not a.flags.c_contiguous:
                return None
            wide &= a.dtype in _WIDE_FLOATS
    if any(v is not None and (v.dtype not in _PLAIN_FLOATS or v.ndim != 1) for v in vectors):
        return None
    convert = tuple(v is not None and (v.dtype not in _WIDE_FLOATS or not v.flags.c_contiguous)
                    for v in vectors)
    shape3 = (math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:]))
    return Small(shape3, wide, convert)


# os.environ's own table and key for BNCUPY_CPU_ENGINE (see _validation.check_environment)
_ENVIRON = getattr(os.environ, "_data", None)
try:
    _ENGINE_KEY: Any = os.environ.encodekey("BNCUPY_CPU_ENGINE")
except (AttributeError, TypeError):
    _ENVIRON = None


def _small_kernels(plan: Small) -> Any:
    """The compiled engine's module when it runs ``plan`` (Numba loaded, not turned off)."""
    return _compiled_kernels() if plan.compiled else None


def _compiled_kernels() -> Any:
    """The compiled engine's module (Numba loaded, not turned off), or None."""
    if _ENVIRON is not None and not _ENVIRON.get(_ENGINE_KEY):
        compiled = _compiled_engine()
    else:
        compiled = None if _engine_off() else _compiled_engine()
    kernels = None if compiled is None else compiled.k
    return kernels if hasattr(kernels, "small_forward") else None


_EMPTY: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {
    np.dtype(d): (np.empty(0, d), np.empty((0, 0, 0), d)) for d in (np.float32, np.float64)}


def _compiled_train(k: Any, plan: Small, x: np.ndarray, weight: Any, bias: Any, eps: float,
                    running_mean: Any, running_var: Any, momentum: float, residual: Any,
                    relu: bool, keep: bool, training: bool) -> tuple:
    """The compiled engine's one-call small forward (training or eval)."""
    x3 = x.reshape(plan.shape3)
    c = plan.shape3[1]
    one, three = _EMPTY[x.dtype]
    targets = (running_mean, running_var)
    if any(plan.convert):  # vectors the kernel takes as contiguous float64 copies
        running_mean, running_var, weight, bias = (
            np.ascontiguousarray(v, np.float64) if change else v
            for v, change in zip((running_mean, running_var, weight, bias), plan.convert,
                                 strict=True))
    if not training and running_mean is not None and not (running_mean.flags.writeable
                                                          and running_var.flags.writeable):
        # read-only imports (JAX): the kernel's signature writes the running statistics
        running_mean, running_var = running_mean.copy(), running_var.copy()
    y = np.empty(x.shape, x.dtype)
    stats = np.empty((4, c))
    center = np.empty(c, x.dtype)
    flags = ((weight is not None) * k.SMALL_WEIGHT | (bias is not None) * k.SMALL_BIAS
             | (running_mean is not None) * k.SMALL_RUNNING
             | (residual is not None) * k.SMALL_RESIDUAL | relu * k.SMALL_RELU
             | training * k.SMALL_TRAIN)
    k.small_forward(x3, three if residual is None else residual.reshape(plan.shape3),
                    y.reshape(plan.shape3), one if weight is None else weight,
                    one if bias is None else bias, one if running_mean is None else running_mean,
                    one if running_var is None else running_var, flags, eps, momentum, stats,
                    center)
    if training and targets[0] is not None:
        for target, value in zip(targets, (running_mean, running_var), strict=True):
            if value is not target:
                target[...] = cast(value, target.dtype)
    mean, invstd, scale, shift = stats
    coef = (center, scale, shift)
    if not keep:
        return y, mean, None, None, coef
    return y, mean, center, invstd.astype(x.dtype), coef


def _centred(x3: np.ndarray, center: np.ndarray) -> np.ndarray:
    """A new ``x3 - center`` (per channel of an ``(A, C, B)`` array) in ``center``'s dtype."""
    c = x3.shape[1]
    if x3.dtype == center.dtype:
        return np.subtract(x3, center.reshape(c, 1))
    out = x3.astype(center.dtype)
    out -= center.reshape(c, 1)
    return out


def _sums(a: np.ndarray) -> np.ndarray:
    """Per-channel sums of an ``(A, C, B)`` array."""
    return np.add.reduce(a, axis=(0, 2))  # type: ignore[call-overload]


def _small_moments(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 mean and biased variance of an ``(A, C, B)`` array: two passes about
    a centre in the compute dtype (so a constant channel's mean is exactly its value)."""
    a, c, b = x3.shape
    n = a * b
    d = x3.astype(np.float64)
    centre = _sums(d)
    centre /= n
    centre = centre.astype(compute_dtype(x3.dtype)).astype(np.float64)
    np.subtract(d, centre.reshape(c, 1), out=d)
    s1 = _sums(d)
    m2 = _sums(np.square(d, out=d))
    m2 -= s1 * s1 / n
    np.maximum(m2, 0.0, out=m2)
    s1 /= n
    return centre + s1, m2 / n


def _small_apply(x: np.ndarray, x3: np.ndarray, coef: tuple, residual: Any, relu: bool,
                 ) -> np.ndarray:
    """:func:`apply` on a small contiguous ``x`` (``x3``: its ``(A, C, B)`` view): the engines'
    operations in the compute dtype on the whole array."""
    center, scale, shift = coef
    cd = center.dtype
    c = x3.shape[1]
    y3 = _centred(x3, center)
    y3 *= scale.astype(cd).reshape(c, 1)
    y3 += shift.astype(cd).reshape(c, 1)
    if residual is not None:
        y3 += residual.reshape(x3.shape).astype(cd, copy=False)
    if relu:
        np.maximum(y3, 0, out=y3)
    return (y3 if y3.dtype == x.dtype else y3.astype(x.dtype)).reshape(x.shape)


def _small_coefficients(mean: np.ndarray, invstd: np.ndarray, weight: Any, bias: Any,
                        cd: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`forward_coefficients` of float64 ``mean`` and ``invstd`` (the same values)."""
    center = mean.astype(cd)
    scale = invstd if weight is None else invstd * weight
    shift = mean - center
    shift *= scale
    np.negative(shift, out=shift)
    if bias is not None:
        shift += bias
    return center, scale, shift


@quiet
def _small_train(x: np.ndarray, axis: int, weight: Any, bias: Any, eps: float,
                 running_mean: Any, running_var: Any, momentum: float, residual: Any,
                 relu: bool, keep: bool) -> tuple:
    x3 = view3(x, axis)
    count = x3.shape[0] * x3.shape[2]
    mean, var = _small_moments(x3)
    invstd = var + eps
    np.sqrt(invstd, out=invstd)
    np.divide(1.0, invstd, out=invstd)
    cd = compute_dtype(x.dtype)
    coef = _small_coefficients(mean, invstd, weight, bias, cd)
    y = _small_apply(x, x3, coef, residual, relu)
    if running_mean is not None:
        unbiased = var * (count / (count - 1))
        new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased
        running_mean[...] = new_mean
        running_var[...] = new_var
    if not keep:
        return y, mean, None, None, coef
    return y, mean, mean.astype(cd), invstd.astype(cd), coef


@quiet
def _small_eval(x: np.ndarray, axis: int, running_mean: np.ndarray, running_var: np.ndarray,
                weight: Any, bias: Any, eps: float, residual: Any, relu: bool,
                keep: bool) -> tuple:
    mean = running_mean.astype(np.float64)
    invstd = running_var.astype(np.float64)
    invstd += eps
    np.sqrt(invstd, out=invstd)
    np.divide(1.0, invstd, out=invstd)
    cd = compute_dtype(x.dtype)
    coef = _small_coefficients(mean, invstd, weight, bias, cd)
    y = _small_apply(x, view3(x, axis), coef, residual, relu)
    if not keep:
        return y, mean, None, None, coef
    return y, mean, mean.astype(cd), invstd.astype(cd), coef


@quiet
def _small_backward(dy: np.ndarray, x: np.ndarray, axis: int, weight: Any, mean: np.ndarray,
                    invstd: np.ndarray, training: bool, fused: tuple | None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    g = dy if fused is None else relu_grad(dy, x, axis, *fused)
    x3 = view3(x, axis)
    a, c, b = x3.shape
    cd = compute_dtype(x.dtype)
    mean = mean.astype(np.float64)
    center = mean.astype(cd)
    g64 = g.reshape(a, c, b).astype(np.float64)
    e = x3.astype(np.float64)
    e -= center.reshape(c, 1)
    sum_dy = _sums(g64)
    sum_dy_xc = _sums(np.multiply(e, g64, out=e))
    center, ka, kb, kc, grad_weight, grad_bias = backward_coefficients(
        mean, invstd, weight, sum_dy, sum_dy_xc - (mean - center) * sum_dy, a * b, training,
        x.dtype)
    # backward_apply's operations: (x - center) * b + c + a * dy in the compute dtype
    dx3 = _centred(x3, center)
    dx3 *= kb.astype(cd).reshape(c, 1)
    dx3 += kc.astype(cd).reshape(c, 1)
    dx3 += np.multiply(g.reshape(a, c, b).astype(cd, copy=False), ka.astype(cd).reshape(c, 1))
    dx = (dx3 if dx3.dtype == x.dtype else dx3.astype(x.dtype)).reshape(x.shape)
    residual_grad = g if fused is not None and fused[1] is not None else None
    return dx, grad_weight, grad_bias, residual_grad


def _fused_kernels(x: np.ndarray, axis: int, residual: Any, *vectors: Any) -> Any:
    """The compiled engine's module when a forward of ``x`` is one call of ``fused_forward`` (a
    backward, of ``fused_backward``, where :func:`_fused_backward` takes it): one thread (fewer
    than ``PARALLEL_MIN`` values; or ``BNCUPY_NUM_THREADS=1`` and one partial per channel and
    row or block, where the fused call is measured no slower), no residual, float16/32/64
    data, per-channel vectors absent or contiguous writeable float32/float64; else None."""
    if residual is not None or x.size == 0 or x.dtype not in _PLAIN_FLOATS:
        return None
    if x.size >= PARALLEL_MIN and (_threads() > 1
                                   or CompiledPasses._units(view3(x, axis).shape)[4] != 1):
        return None
    for v in vectors:
        if v is not None and (v.dtype not in _WIDE_FLOATS or v.ndim != 1
                              or not (v.flags.c_contiguous and v.flags.writeable)):
            return None
    return _compiled_kernels()


def _fused_forward(k: Any, x: np.ndarray, axis: int, weight: Any, bias: Any, eps: float,
                   running_mean: Any, running_var: Any, momentum: float, relu: bool,
                   training: bool) -> tuple:
    """:func:`_normalize_train` (``training``) or :func:`_normalize_eval` in one call of the
    compiled engine (the same passes and arithmetic: bitwise the same results)."""
    x3 = view3(x, axis)
    c = x3.shape[1]
    passes = CompiledPasses
    by_rows, length, units, counts, parts = passes._units(x3.shape)
    y = np.empty(x.shape, x.dtype)
    stats = np.empty((4, c))
    center = np.empty(c, compute_dtype(x.dtype))
    one = _EMPTY[np.dtype(np.float64)][0]
    flags = ((weight is not None) * k.SMALL_WEIGHT | (bias is not None) * k.SMALL_BIAS
             | (running_mean is not None) * k.SMALL_RUNNING | relu * k.SMALL_RELU
             | training * k.SMALL_TRAIN)
    k.fused_forward(passes._flat(x3, by_rows), passes._flat(y.reshape(x3.shape), by_rows),
                    by_rows, length, units, counts, parts, c, *(
                        one if v is None else v
                        for v in (weight, bias, running_mean, running_var)),
                    flags, eps, momentum, stats, center)
    mean, invstd, scale, shift = stats
    return y, mean, center, invstd.astype(center.dtype), (center, scale, shift)


def _fused_backward(k: Any, dy: np.ndarray, x: np.ndarray, axis: int, weight: Any,
                    mean: np.ndarray, invstd: np.ndarray, training: bool) -> tuple | None:
    """:func:`_backward` without a fused activation in one call of the compiled engine's
    ``fused_backward`` (bitwise the same results), or None where that does not apply: ``dy``
    not of ``x``'s dtype, one channel, or more than one partial per channel and row or block
    (NumPy adds those in an order of its own)."""
    x3 = view3(x, axis)
    c = x3.shape[1]
    passes = CompiledPasses
    by_rows, length, units, _, parts = passes._units(x3.shape)
    if dy.dtype != x.dtype or c < 2 or parts != 1:
        return None
    dx = np.empty(x.shape, x.dtype)
    grads = np.empty((2, c))
    k.fused_backward(passes._flat(view3(dy, axis), by_rows), passes._flat(x3, by_rows),
                     passes._flat(dx.reshape(x3.shape), by_rows), by_rows, length, units, c,
                     _EMPTY[np.dtype(np.float64)][0] if weight is None else weight, mean, invstd,
                     (weight is not None) * k.SMALL_WEIGHT | bool(training) * k.SMALL_TRAIN,
                     grads)
    return dx, grads[0], grads[1], None


def normalize_train(x: np.ndarray, axis: int, weight: Any, bias: Any, eps: float,
                    running_mean: Any, running_var: Any, momentum: float,
                    residual: np.ndarray | None = None, relu: bool = False, keep: bool = True,
                    plan: Any = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Normalize with batch statistics; update the running ones in place (after everything else).

    Returns ``y``, the float64 batch mean, ``save_mean``/``save_invstd`` in the stat dtype (None
    for the small path unless ``keep``), and the apply coefficients (for a fused activation's
    backward). ``plan``: the call signature's (:func:`plan`).
    """
    if plan is not None:
        k = _small_kernels(plan)
        if k is not None:
            return _compiled_train(k, plan, x, weight, bias, eps, running_mean, running_var,
                                   momentum, residual, relu, keep, True)
        return _small_train(x, axis, weight, bias, eps, running_mean, running_var, momentum,
                            residual, relu, keep)
    return _normalize_train(x, axis, weight, bias, eps, running_mean, running_var, momentum,
                            residual, relu)


@quiet
def _normalize_train(x: np.ndarray, axis: int, weight: Any, bias: Any, eps: float,
                     running_mean: Any, running_var: Any, momentum: float,
                     residual: np.ndarray | None = None, relu: bool = False,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """:func:`normalize_train` through the engine."""
    k = _fused_kernels(x, axis, residual, running_mean, running_var, weight, bias)
    if k is not None:
        return _fused_forward(k, x, axis, weight, bias, eps, running_mean, running_var,
                              momentum, relu, True)
    count, mean, m2 = stats(x, axis)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    coef = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    y = apply(x, axis, *coef, residual, relu)
    if running_mean is not None:
        unbiased = var * (count / (count - 1))
        new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased
        running_mean[...] = new_mean
        running_var[...] = new_var
    return (y, mean, *_saved(x, mean, invstd), coef)


def normalize_eval(x: np.ndarray, axis: int, running_mean: np.ndarray, running_var: np.ndarray,
                   weight: Any, bias: Any, eps: float, residual: np.ndarray | None = None,
                   relu: bool = False, keep: bool = True, plan: Any = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Normalize with the running statistics; same returns as :func:`normalize_train`."""
    if plan is not None:
        k = _small_kernels(plan)
        if k is not None:
            return _compiled_train(k, plan, x, weight, bias, eps, running_mean, running_var, 0.0,
                                   residual, relu, keep, False)
        return _small_eval(x, axis, running_mean, running_var, weight, bias, eps, residual, relu,
                           keep)
    return _normalize_eval(x, axis, running_mean, running_var, weight, bias, eps, residual, relu)


@quiet
def _normalize_eval(x: np.ndarray, axis: int, running_mean: np.ndarray,
                    running_var: np.ndarray, weight: Any, bias: Any, eps: float,
                    residual: np.ndarray | None = None, relu: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    k = _fused_kernels(x, axis, residual, running_mean, running_var, weight, bias)
    if k is not None:
        return _fused_forward(k, x, axis, weight, bias, eps, running_mean, running_var, 0.0,
                              relu, False)
    mean = running_mean.astype(np.float64)
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    coef = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    y = apply(x, axis, *coef, residual, relu)
    return (y, mean, *_saved(x, mean, invstd), coef)


@quiet
def relu_grad(dy: np.ndarray, x: np.ndarray, axis: int, coef: tuple,
              residual: np.ndarray | None) -> np.ndarray:
    """``dy`` where the fused forward's output (recomputed, in ``x.dtype``) was > 0, else 0."""
    center, scale, shift = coef
    pre = apply(x, axis, center, scale, shift, residual)
    return np.where(pre > 0, dy, np.zeros((), dy.dtype)).astype(x.dtype, copy=False)


@quiet
def apply(x: np.ndarray, axis: int, center: np.ndarray, scale: np.ndarray, shift: np.ndarray,
          residual: np.ndarray | None = None, relu: bool = False) -> np.ndarray:
    """``act((x - center) * scale + shift + residual)`` per channel in the compute dtype, output
    in ``x.dtype``; act is ReLU (NaN kept) when ``relu``, residual optional.

    Never folded into ``x * scale + shift'``: with ``center`` the exact mean of a constant
    channel, ``x - center`` is 0 and the output is exactly ``shift``.
    """
    cd = compute_dtype(x.dtype)
    x3 = view3(x, axis)
    y = _output(x)
    z3 = None if residual is None else _operand(residual, axis, cd)
    if x.size:
        engine().affine(x3, z3, y.reshape(x3.shape), center.astype(cd), scale.astype(cd),
                        shift.astype(cd), relu)
    return _stored(y, x.dtype)


@quiet
def backward_apply(dy: np.ndarray, x: np.ndarray, axis: int, center: np.ndarray, a: np.ndarray,
                   b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(x - center) * b + c + a * dy`` per channel in the compute dtype, output in
    ``x.dtype``."""
    cd = compute_dtype(x.dtype)
    x3 = view3(x, axis)
    dx = _output(x)
    if x.size:
        engine().grad_affine(_operand(dy, axis, cd), x3, dx.reshape(x3.shape), center.astype(cd),
                             a.astype(cd), b.astype(cd), c.astype(cd))
    return _stored(dx, x.dtype)


@quiet
def backward_sums(dy: np.ndarray, x: np.ndarray, axis: int, mean: np.ndarray,
                 invstd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    cd = compute_dtype(x.dtype)
    mean = mean.astype(np.float64)
    center = mean.astype(cd)
    x3 = view3(x, axis)
    if x.size == 0:
        return np.zeros(x3.shape[1]), np.zeros(x3.shape[1])
    sum_dy, sum_dy_xc = engine().grad_sums(_operand(dy, axis, cd), x3, center)
    return sum_dy, sum_dy_xc - (mean - center) * sum_dy


def backward(dy: np.ndarray, x: np.ndarray, axis: int, weight: Any, mean: np.ndarray,
             invstd: np.ndarray, training: bool, fused: tuple | None = None, plan: Any = None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``grad_input`` (``x.dtype``), float64 ``grad_weight`` and ``grad_bias``, and the gradient
    of a fused residual. ``fused`` is a fused ReLU forward's ``(coefficients, residual)``: dy is
    masked where its output was not positive. ``plan``: the call signature's (:func:`plan`)."""
    if plan is not None and x.size:
        k = _small_kernels(plan)
        if k is not None and fused is None:
            if any(plan.convert):
                weight, mean, invstd = (np.ascontiguousarray(v, np.float64) if change else v
                                        for v, change in zip((weight, mean, invstd),
                                                             plan.convert, strict=True))
            dx = np.empty(x.shape, x.dtype)
            grads = np.empty((2, plan.shape3[1]))
            k.small_backward(dy.reshape(plan.shape3), x.reshape(plan.shape3),
                             dx.reshape(plan.shape3), weight if weight is not None else
                             _EMPTY[x.dtype][0], mean, invstd,
                             (weight is not None) * k.SMALL_WEIGHT | bool(training) * k.SMALL_TRAIN,
                             grads)
            return dx, grads[0], grads[1], None
        return _small_backward(dy, x, axis, weight, mean, invstd, training, fused)
    return _backward(dy, x, axis, weight, mean, invstd, training, fused)


@quiet
def _backward(dy: np.ndarray, x: np.ndarray, axis: int, weight: Any, mean: np.ndarray,
              invstd: np.ndarray, training: bool, fused: tuple | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    if fused is None:
        k = _fused_kernels(x, axis, None, weight, mean, invstd)
        done = None if k is None else _fused_backward(k, dy, x, axis, weight, mean, invstd,
                                                      training)
        if done is not None:
            return done
    g = dy if fused is None else relu_grad(dy, x, axis, *fused)
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    sum_dy, sum_dy_xmu = backward_sums(g, x, axis, mean, invstd)
    center, a, b, c, grad_weight, grad_bias = backward_coefficients(
        mean, invstd, weight, sum_dy, sum_dy_xmu, count, training, x.dtype)
    residual_grad = g if fused is not None and fused[1] is not None else None
    return backward_apply(g, x, axis, center, a, b, c), grad_weight, grad_bias, residual_grad


@quiet
def normalize_with(x: np.ndarray, axis: int, mean: np.ndarray, invstd: np.ndarray, weight: Any,
                   bias: Any, residual: np.ndarray | None = None, relu: bool = False,
                   ) -> tuple[np.ndarray, tuple]:
    """Apply given (e.g. globally merged) statistics; returns ``y`` and the coefficients."""
    coef = forward_coefficients(mean, invstd, weight, bias, x.dtype)
    return apply(x, axis, *coef, residual, relu), coef


# The normalizations over groups (LayerNorm, GroupNorm, InstanceNorm).
from . import numpy_groups as _groups  # noqa: E402
from .numpy_groups import group_backward  # noqa: E402, F401


def group_forward(x: np.ndarray, lay: Any, weight: Any, bias: Any, eps: float,
                  running: tuple | None = None, keep: bool = True, rms: bool = False,
                  residual: np.ndarray | None = None, sum_dtype: Any = None,
                  direct: bool = False,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
    """:func:`.numpy_groups.group_forward`; small float32/float64 rows (LayerNorm, RMSNorm
    without a residual) in one call of the compiled engine. ``direct`` (the caller's call
    signature vouches for contiguous arrays) changes nothing here."""
    if lay.kind == "rows" and residual is None and sum_dtype is None and \
            0 < x.size < SMALL_ELEMENTS and x.dtype in _WIDE_FLOATS:
        k = _compiled_kernels()
        if k is not None:
            return _small_rows(k, x, lay, weight, bias, eps, rms)
    return _groups.group_forward(x, lay, weight, bias, eps, running, keep, rms, residual,
                                 sum_dtype)


def _small_vector(v: np.ndarray) -> np.ndarray:
    """A parameter as the compiled engine reads it: float32/float64 and contiguous."""
    return v if v.dtype in _WIDE_FLOATS and v.flags.c_contiguous else \
        np.ascontiguousarray(v, np.float64)


def _small_rows(k: Any, x: np.ndarray, lay: Any, weight: Any, bias: Any, eps: float,
                rms: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, None]:
    one = _EMPTY[np.dtype(np.float64)][0]
    flags = rms * k.SMALL_RMS
    if weight is None:
        weight = one
    else:
        weight, flags = _small_vector(weight), flags | k.SMALL_WEIGHT
    if bias is None:
        bias = one
    else:
        bias, flags = _small_vector(bias), flags | k.SMALL_BIAS
    y = np.empty(x.shape, x.dtype)
    mean, invstd = np.empty(lay.n), np.empty(lay.n)
    k.small_rows(x.reshape(lay.n, lay.c), y.reshape(lay.n, lay.c), weight, bias, flags, eps,
                 mean, invstd)
    return y, mean, invstd, mean, None
