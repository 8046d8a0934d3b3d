"""The CuPy backend's launch plan loads 16 bytes at a time on every shape that matters.

* the plan: every BatchNorm shape of the ResNet-50 suite (N in {1, 32, 256}, both layouts,
  float16 and float32) and every LayerNorm hidden size of the transformer suite choose 16-byte
  vectors for their reductions and elementwise passes, on an H200's SM count;
* the kernels: run on the CPU execution target, which counts the bytes every load and store
  moves, the bytes moved by accesses narrower than 16 bytes stay within the plan's single-value
  heads and tails: at most ``2 (V - 1)`` values per channel plane (channel-first reductions),
  per row (rows) or per tensor (elementwise and channels-last passes), also on views that start
  off a 16-byte boundary.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest

import bncupy as bn
from bncupy._bench import RESNET50
from bncupy.backends import cupy as cupy_backend
from bncupy.backends._groups import GroupLayout
from tests.conftest import EMULATED

SMS = 132  # an H200
HIDDEN = [768, 1024, 2048, 4096, 5120, 8192, 12288, 16384]
DTYPES = ["float16", "float32"]


def _vector(dtype: str) -> int:
    return 16 // np.dtype(dtype).itemsize


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n", [1, 32, 256])
def test_resnet50_batch_norm_shapes_take_16_byte_vectors(n, channels_last, dtype):
    for c, h, w in RESNET50:
        shape, axis = ((n, h, w, c), 3) if channels_last else ((n, c, h, w), 1)
        geo = cupy_backend._Geometry(shape, axis, np.dtype(dtype), 0, SMS)
        assert (geo.width, geo.apply_width, geo.head) == (_vector(dtype),) * 2 + (0,), shape
        assert all(f", {_vector(dtype)}, " in name for name in geo.names.values()), geo.names


# Shared memory a block may take once its kernel opts in: T4, A100, H100/H200.
SHARED_OPTIN = {"sm_75": 65536, "sm_80": 166912, "sm_90": 232448}


@pytest.mark.parametrize("arch", SHARED_OPTIN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_transformer_hidden_sizes_take_16_byte_vectors_and_single_read_rows(hidden, dtype, arch):
    geo = cupy_backend._GroupGeometry(GroupLayout("rows", 8192, hidden), np.dtype(dtype), 0,
                                      SMS, SHARED_OPTIN[arch])
    assert (geo.row_width, geo.apply_width) == (_vector(dtype),) * 2
    assert geo.stats_mode == "regs"  # forward: the row read once, from registers
    # backward reads x and dy once: up to 8192 values a row from registers, up to 16384 from
    # 128 KB of shared memory a block (sm_80's and sm_90's opt-in limits allow it, not sm_75's);
    # rows the device cannot hold take a second pass for the parameter gradients
    # (column_grads), also 16 bytes at a time
    shared = hidden > 8192
    held = not shared or arch != "sm_75"
    assert (geo.back is not None) == held
    if held:
        assert geo.back is not None and geo.back_sum is not None
        names = {geo.names["row_norm_backward", s] for s in (False, True)}
        assert all(("_shared<" in n) == shared for n in names), names
        assert (geo.back.shared, geo.back_sum.shared) == ((131072,) * 2 if shared else (0, 0))
        if shared:
            assert geo.back.block == geo.back.height == 1024
    assert geo.columns.width == _vector(dtype)


# ------------------------------------------------------------------ bytes the kernels move

needs_target = pytest.mark.skipif(not EMULATED, reason="counts through the CPU execution "
                                                       "target's seam (tox -e emulated)")


@pytest.fixture
def dev():
    from tests.emulated import device

    device.SEAM.reset()
    yield device


def _data(dev: Any, shape: tuple[int, ...], dtype: str, seed: int, lag: int = 0) -> Any:
    """Random data of ``shape``, starting ``lag`` values past a 16-byte boundary."""
    values = np.random.default_rng(seed).standard_normal(int(np.prod(shape))) + 1.5
    flat = dev.asarray(np.concatenate([np.zeros(lag), values]).astype(dtype))
    return flat[lag:].reshape(shape)


def _narrow_values(dev: Any, array: Any, call: Any) -> tuple[int, int]:
    """Values of ``array`` moved by narrow accesses during ``call()``, and full passes over it."""
    call()  # the stream's workspace exists
    dev.SEAM.reset()
    call()
    read, written = dev.SEAM.bytes(array)
    return (dev.SEAM.narrow_bytes(array) // array.itemsize,
            round((read + written) / array.nbytes))


@needs_target
@pytest.mark.parametrize("lag", [0, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernels_move_all_but_heads_and_tails_16_bytes_at_a_time(dev, channels_last, dtype,
                                                                 lag):
    """ResNet-50's planes of 7x7, 14x14 and 28x28 (not multiples of a float16 vector) at N=1,
    aligned and three values off a 16-byte boundary."""
    v = _vector(dtype)
    for c, h, w in [(256, 7, 7), (256, 14, 14), (128, 28, 28)]:
        shape, axis = ((1, h, w, c), -1) if channels_last else ((1, c, h, w), 1)
        x, dy = (_data(dev, shape, dtype, s, lag) for s in (0, 1))
        acc = "float32"
        weight, bias = dev.ones(c, acc), dev.zeros(c, acc)
        _, mean, invstd = bn.batch_norm_forward(x, None, None, weight, bias, True, axis=axis)
        planes = 0 if channels_last else c
        # channels-last reductions take vectors only from a 16-byte boundary
        scalar_cl = channels_last and lag != 0
        for name, call in [
            ("train", partial(bn.batch_norm, x, None, None, weight, bias, True, axis=axis)),
            ("eval", partial(bn.batch_norm, x, mean, weight, weight, bias, False, axis=axis)),
            ("backward", partial(bn.batch_norm_backward, dy, x, weight, mean, invstd,
                                 axis=axis)),
        ]:
            narrow, passes = _narrow_values(dev, x, call)
            bound = passes * (2 * (v - 1) * (planes + 1))
            if scalar_cl and name != "eval":
                bound = x.size + bound  # the reduction pass reads single values
            assert narrow <= bound, (name, shape, lag, narrow, bound)


@needs_target
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_rows_move_16_bytes_at_a_time(dev, dtype):
    v = _vector(dtype)
    for hidden in HIDDEN:
        rows = 3
        x, dy = (_data(dev, (rows, hidden), dtype, s) for s in (0, 1))
        w = dev.ones(hidden, "float32")
        _, mean, rstd = bn.layer_norm_forward(x, hidden, w, w)
        for call in (partial(bn.layer_norm, x, hidden, w, w),
                     partial(bn.layer_norm_backward, dy, x, hidden, mean, rstd, w)):
            narrow, passes = _narrow_values(dev, x, call)
            assert narrow <= passes * 2 * (v - 1) * rows, (hidden, narrow)
