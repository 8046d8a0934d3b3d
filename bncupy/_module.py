"""What every layer shares: training/eval mode, placement on an array kind, and torch-style state
dicts (all or nothing). A layer lists its state's keys and shapes in :meth:`_Module._state_shapes`
and creates it with :meth:`_Module._allocate`."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _validation as v
from ._interop import is_foreign, to_native
from .backends import dispatch

COUNTER = "num_batches_tracked"


class _Module:
    """Base of the layers. ``grad_*`` attributes move with the state in :meth:`to`."""

    training: bool
    dtype: np.dtype
    _GRADS: tuple[str, ...] = ("grad_weight", "grad_bias")

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state key this layer has (torch's order) and its shape; the counter is 0-d."""
        raise NotImplementedError

    def _allocate(self, fills: Mapping[str, float], sized_by: str) -> None:
        """Create the array state ``{key: fill value}`` in the array kind of the backend in force
        (the counter is a 0-d int64 NumPy array, as torch keeps it on any device); allocation
        errors name ``sized_by`` (the constructor argument that sized the state)."""
        xp = dispatch.module_for(dispatch.get_backend()).xp
        shapes = self._state_shapes()
        for key, fill in fills.items():
            if key not in shapes:
                continue
            if key == COUNTER:
                setattr(self, key, np.zeros((), np.int64))
                continue
            try:
                setattr(self, key, xp.full(shapes[key], fill, self.dtype))
            except ValueError as exc:  # more bytes than an address space holds
                raise ValueError(f"{sized_by}: {key} of shape {shapes[key]} is too large for "
                                 f"{self.dtype}: {exc}") from exc
            except MemoryError as exc:
                raise MemoryError(f"{sized_by}: cannot allocate the layer's {key} of shape "
                                  f"{shapes[key]}: {exc}") from exc
        self._find_first_array()

    # ------------------------------------------------------------------ mode and placement
    def train(self, mode: bool = True) -> Any:
        """Set training mode or, with ``mode=False``, eval mode.

        Parameters
        ----------
        mode : bool
            True for training (batch statistics), False for eval (running statistics).

        Returns
        -------
        self
            The layer, for chaining.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(4).eval()
        >>> layer.training, layer.train().training
        (False, True)
        """
        self.training = v.check_bool(mode, "mode")
        return self

    def eval(self) -> Any:
        """Set eval mode: ``train(False)``.

        Returns
        -------
        self
            The layer, for chaining.

        Examples
        --------
        >>> bn.BatchNorm1d(4).eval().training
        False
        """
        return self.train(False)

    def _array_names(self) -> tuple[str, ...]:
        """Names of the array state (the counter aside) and the gradients, in order."""
        return (*(k for k in self._state_shapes() if k != COUNTER), *self._GRADS)

    def _arrays(self) -> list[str]:
        return [k for k in self._array_names() if getattr(self, k, None) is not None]

    def _state_kind(self) -> str:
        arrays = self._arrays()
        kind = dispatch.array_kind(getattr(self, arrays[0])) if arrays else None
        return kind or "numpy"

    def to(self, kind: str) -> Any:
        """Move parameters, statistics and gradients to NumPy or CuPy arrays.

        Parameters
        ----------
        kind : {"numpy", "cupy"}
            The array kind to hold the state in.

        Returns
        -------
        self
            The layer, for chaining.

        Raises
        ------
        BackendUnavailableError
            For ``"cupy"`` where CuPy cannot run; the state stays where it was.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(4).to("numpy")
        >>> type(layer.running_mean).__name__
        'ndarray'
        """
        v.check_choice(kind, "kind", ("numpy", "cupy"))
        if kind == "cupy":
            dispatch.backend_for("cupy")  # raises BackendUnavailableError when it cannot run
        module = dispatch.module_for(kind)
        moved = {name: module.asarray(getattr(self, name)) for name in self._arrays()}
        for name, value in moved.items():  # only once every copy has succeeded
            setattr(self, name, value)
        return self

    def _follow(self, kind: str) -> None:
        """Move the state to the array kind of a call's input (after every check of the call):
        the kind of its first array (:meth:`_state_kind`) decides (the state moves as a whole,
        so any of its arrays would decide alike)."""
        name = self.__dict__.get("_first_array")
        value = None if name is None else getattr(self, name, None)
        if value is None:
            value = self._find_first_array()
            if value is None:
                return
        if (dispatch.array_kind(value) or "numpy") != kind:
            self.to(kind)

    def _find_first_array(self) -> Any:
        """The first array of the state (None when it has none); its name is remembered in
        ``_first_array`` (from construction on, so that a call never adds it)."""
        for name in self._array_names():
            value = getattr(self, name, None)
            if value is not None:
                self.__dict__["_first_array"] = name
                return value
        return None

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0, in place.

        Only where the layer tracks running statistics, as torch.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(2)
        >>> y = layer(np.array([[0.0, 1.0], [4.0, 3.0]]))
        >>> layer.reset_running_stats()
        >>> layer.running_mean, int(layer.num_batches_tracked)
        (array([0., 0.], dtype=float32), 0)
        """
        if getattr(self, "track_running_stats", False) and \
                getattr(self, "running_mean", None) is not None:
            for name, value in (("running_mean", 0), ("running_var", 1)):
                getattr(self, name)[...] = value
            setattr(self, COUNTER, np.zeros((), np.int64))

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, and ``weight`` 1 and ``bias`` 0, in place.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(2)
        >>> layer.weight[...] = 3
        >>> layer.reset_parameters()
        >>> layer.weight
        array([1., 1.], dtype=float32)
        """
        self.reset_running_stats()
        for name, value in (("weight", 1), ("bias", 0)):
            if getattr(self, name, None) is not None:
                getattr(self, name)[...] = value

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state under torch's keys.

        Returns
        -------
        dict
            ``{key: array}`` in torch's order; the counter is a 0-d int64 array.

        Examples
        --------
        >>> list(bn.BatchNorm2d(3).state_dict())
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        """
        return {key: getattr(self, key).copy() for key in self._state_shapes()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True,
                        ) -> IncompatibleKeys:
        """Load a :meth:`state_dict`, torch's included; all or nothing.

        Values may be NumPy or CuPy arrays or any array with ``__dlpack__`` (torch tensors), of
        any float dtype; ``num_batches_tracked`` a 0-d integer array or a Python int. A state
        without ``num_batches_tracked`` (a checkpoint from before torch added it) keeps the
        layer's count, as torch: 0 for a new layer.

        Parameters
        ----------
        state : mapping
            Arrays under torch's keys.
        strict : bool
            Require exactly this layer's keys. With False, state the mapping lacks keeps its
            value and keys the layer does not have are ignored (as torch).

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, as torch returns them.

        Raises
        ------
        TypeError
            ``state`` is not a mapping, or a value is not an array of a suitable dtype.
        ValueError
            Missing or unexpected keys (``strict``), a wrong shape, or a counter outside int64.

        Examples
        --------
        >>> layer = bn.BatchNorm1d(3)
        >>> state = {"running_mean": np.ones(3), "step": 7}
        >>> layer.load_state_dict(state, strict=False)
        IncompatibleKeys(missing_keys=['weight', 'bias', 'running_var'], unexpected_keys=['step'])
        >>> layer.running_mean
        array([1., 1., 1.], dtype=float32)
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        strict = v.check_bool(strict, "strict")
        shapes = self._state_shapes()
        given = dict(state)
        if COUNTER in shapes:  # torch: checkpoints from before the counter existed
            given.setdefault(COUNTER, int(getattr(self, COUNTER)))
        missing = [key for key in shapes if key not in given]
        unexpected = [key for key in state if key not in shapes]
        if strict and (missing or unexpected):
            raise ValueError(f"state keys do not match {type(self).__name__}: missing "
                             f"{sorted(missing)}, unexpected {sorted(map(str, unexpected))} "
                             f"(strict=False loads the keys that match)")
        loaded: dict[str, Any] = {}
        for key, shape in shapes.items():
            if key not in given:
                continue
            arg = f"state[{key!r}]"
            value = to_native(given[key], arg) if is_foreign(given[key]) else given[key]
            if key == COUNTER:
                loaded[key] = np.asarray(_counter(value, arg), np.int64)
                continue
            v.check_array(value, arg)
            v.check_float(value, arg)
            if tuple(value.shape) != shape:
                raise ValueError(f"{arg} must have shape {shape}, got shape {tuple(value.shape)}")
            loaded[key] = value
        module = dispatch.module_for(self._state_kind())
        for key in loaded.keys() - {COUNTER}:
            loaded[key] = module.asarray(loaded[key]).astype(self.dtype)
        for key, value in loaded.items():  # nothing is replaced until everything is ready
            setattr(self, key, value)
        return IncompatibleKeys(missing, unexpected)

    def extra_repr(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def channel_state(channels: int, affine: bool, bias: bool, running: bool,
                  ) -> dict[str, tuple[int, ...]]:
    """The state shapes of a per-channel layer (batch norm, instance norm), torch's order."""
    c = (channels,)
    shapes: dict[str, tuple[int, ...]] = {"weight": c} if affine else {}
    if bias:
        shapes["bias"] = c
    if running:
        shapes.update(running_mean=c, running_var=c, num_batches_tracked=())
    return shapes


class IncompatibleKeys(NamedTuple):
    """What :meth:`_Module.load_state_dict` returns, as torch's ``load_state_dict``."""

    missing_keys: list[str]
    unexpected_keys: list[Any]


def _counter(value: Any, arg: str) -> int:
    """``num_batches_tracked`` from a state dict: a Python int or a 0-d integer array."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return v.check_int(int(value), arg)
    v.check_array(value, arg)
    if value.dtype.kind not in "iu":
        raise TypeError(f"{arg} must be an int or have an integer dtype, got {value.dtype}")
    if value.shape != ():
        raise ValueError(f"{arg} must be an int or a 0-d array holding a count, got shape "
                         f"{value.shape}")
    return v.check_int(int(value), arg)
