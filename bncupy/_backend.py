"""The public backend setting; :mod:`bncupy.backends.dispatch` keeps it and resolves it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .backends import dispatch


def get_backend() -> str:
    """The backend in force now: ``"numpy"`` or ``"cupy"``.

    Under ``"auto"`` computation follows each call's input; this returns the backend ``"auto"``
    gives new arrays (a layer's state): ``"cupy"`` when it can run here, else ``"numpy"``.

    Returns
    -------
    str
        ``"numpy"`` or ``"cupy"``.

    Examples
    --------
    >>> with bn.use_backend("numpy"):
    ...     bn.get_backend()
    'numpy'
    """
    return dispatch.get_backend()


def set_backend(name: str) -> None:
    """Set the process-wide backend (the environment variable ``BNCUPY_BACKEND`` sets it first).

    Parameters
    ----------
    name : {"auto", "numpy", "cupy"}
        ``"auto"`` computes where each input lives; ``"numpy"`` and ``"cupy"`` compute there
        for either array kind and return results of the caller's kind.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones).
    BackendUnavailableError
        For ``"cupy"`` where CuPy cannot run; the previous setting stays.

    Examples
    --------
    >>> bn.set_backend("numpy")
    >>> bn.get_backend()
    'numpy'
    >>> bn.set_backend("auto")
    """
    dispatch.set_backend(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block, in this thread or asyncio task only.

    Parameters
    ----------
    name : {"auto", "numpy", "cupy"}
        As :func:`set_backend`.

    Yields
    ------
    None
        Inside the block the backend is ``name``; it is restored on leaving.

    Raises
    ------
    ValueError
        For an unknown name.
    BackendUnavailableError
        For ``"cupy"`` where CuPy cannot run.

    Examples
    --------
    >>> x = np.ones((4, 3), np.float32)
    >>> with bn.use_backend("numpy"):
    ...     y = bn.batch_norm(x, None, None, training=True)
    """
    with dispatch.use_backend(name):
        yield
