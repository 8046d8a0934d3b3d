"""Exceptions raised by bncupy."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing.

    A subclass of :class:`RuntimeError`, raised where ``"cupy"`` is asked for and CuPy, a CUDA
    device or a recent enough driver is missing, chained from the cause; bncupy never falls
    back silently.

    Examples
    --------
    >>> x = np.ones((4, 3), np.float32)
    >>> try:
    ...     with bn.use_backend("cupy"):
    ...         y = bn.batch_norm(x, None, None, training=True)
    ... except bn.BackendUnavailableError as exc:  # str(exc) says what is missing
    ...     y = bn.batch_norm(x, None, None, training=True)  # on NumPy, by choice
    >>> y.shape
    (4, 3)
    """
