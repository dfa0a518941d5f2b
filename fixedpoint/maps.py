"""One map, every consumer: how ``solve``, ``spectral_radius``, ``lyapunov_exponent`` and
``classify`` call a user's ``f`` on some rows of the batch.

Three ways to write a map, all accepted everywhere:

* ``f(z, *inputs)`` with ``inputs=(x, ...)`` passed to the library: each input is a tensor whose
  dim 0 is the batch (or an object with ``select(rows)``, like ``models.LoopContext``); the library
  slices them to the rows being evaluated, once per change of the active set.
* a plain ``f(z)``: if it also works on a subset of the rows, it is called on the active rows only;
  if it closes over batch tensors (``lambda z: torch.tanh(z @ W.T + x)`` with ``x`` of shape
  (B, n)), the first call on a subset fails with a shape error or returns the wrong shape; the map
  then switches, once, to whole-batch evaluation with the rows that stopped frozen at their last
  iterate (their images are discarded), so the answer is the same and only the saving is lost.
* the older ``f(z, rows)`` form (deprecated): ``rows`` is the LongTensor of the evaluated rows'
  indices in the batch (the whole ``arange(B)`` for a whole-batch call; never ``None``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RowMap", "as_row_map"]


def _takes_rows(f: Callable[..., Tensor]) -> bool:
    target = f.forward if isinstance(f, nn.Module) else f
    try:
        return "rows" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins such as torch.tanh have no signature
        return False


def _check_inputs(inputs: Any, batch: int) -> tuple[Any, ...]:
    if inputs is None:
        return ()
    if isinstance(inputs, Tensor) or hasattr(inputs, "select") and not isinstance(inputs, tuple):
        inputs = (inputs,)
    if not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a tuple of per-sample tensors, got "
                        f"{type(inputs).__name__}")
    for i, item in enumerate(inputs):
        if isinstance(item, Tensor):
            if item.dim() == 0 or item.shape[0] != batch:
                raise ValueError(f"inputs[{i}] must have the batch size {batch} as dim 0, got "
                                 f"shape {tuple(item.shape)}")
        elif not callable(getattr(item, "select", None)):
            raise TypeError(f"inputs[{i}] must be a (B, ...) tensor or have select(rows), got "
                            f"{type(item).__name__}")
    return tuple(inputs)


class RowMap:
    """``f`` evaluated on chosen rows of a batch of ``batch`` samples: ``call(z, rows)``.

    ``rows`` is ``None`` (the whole batch) or a LongTensor of row indices; the same tensor object
    is passed until the active set changes, so per-row slices are cached on its identity (no host
    sync per step).
    """

    def __init__(self, f: Callable[..., Tensor], batch: int, inputs: Any = None) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        self.f, self.batch = f, batch
        self.inputs = _check_inputs(inputs, batch)
        self.rows_form = not self.inputs and _takes_rows(f)
        self.whole_batch = False  # set once a plain f(z) turns out to close over batch tensors
        self._rows: Tensor | None = None
        self._sliced: tuple[Any, ...] = self.inputs
        self._full: Tensor | None = None  # whole-batch mode: every row's latest state
        self._arange: Tensor | None = None

    def anchor(self, z: Tensor) -> None:
        """Set every row's frozen state (whole-batch mode), e.g. to z* before the backward."""
        self._full = z.detach()

    def _all_rows(self, z: Tensor) -> Tensor:
        if self._arange is None or self._arange.device != z.device:
            self._arange = torch.arange(self.batch, device=z.device)
        return self._arange

    def _slice(self, rows: Tensor) -> tuple[Any, ...]:
        if rows is not self._rows:
            self._rows = rows
            self._sliced = tuple(x[rows] if isinstance(x, Tensor) else x.select(rows)
                                 for x in self.inputs)
        return self._sliced

    def __call__(self, z: Tensor, rows: Tensor | None = None) -> Tensor:
        full = rows is None or z.shape[0] == self.batch
        if self.inputs:
            return self.f(z, *self.inputs) if full else self.f(z, *self._slice(rows))
        if self.rows_form:
            return self.f(z, rows=self._all_rows(z) if rows is None else rows)
        if full:
            self._full = z  # every row's latest state, detached only if whole-batch mode needs it
            return self.f(z)
        if not self.whole_batch:
            out = self._try_subset(z)
            if out is not None:
                return out
        return self._through_whole_batch(z, rows)

    def bind(self, rows: Tensor) -> Callable[[Tensor], Tensor] | None:
        """``f`` on exactly the rows ``rows`` as a one-argument map, for a loop that evaluates
        the same active set many times (``Problem.run_plain``); ``None`` where the general
        ``__call__`` must decide (the ``rows`` form, or a plain f on a subset of the batch)."""
        if self.inputs:
            f = self.f
            args = self.inputs if rows.shape[0] == self.batch else self._slice(rows)
            return lambda z: f(z, *args)
        if self.rows_form or rows.shape[0] != self.batch:
            return None
        return self.f

    def settle(self, z: Tensor) -> None:
        """After a bound loop over the whole batch of a plain f: ``z`` is every row's state."""
        if not self.inputs and not self.rows_form and z.shape[0] == self.batch:
            self._full = z

    def _try_subset(self, z: Tensor) -> Tensor | None:
        """``f(z)`` on a subset; ``None`` when f cannot run on fewer rows than the batch."""
        try:
            out = self.f(z)
        except RuntimeError as err:
            if "size" not in str(err) and "shape" not in str(err):
                raise
            out = None
        if isinstance(out, Tensor) and out.shape == z.shape:
            return out
        if self._full is None:
            raise ValueError(
                f"f(z) works on the whole batch of {self.batch} but not on {z.shape[0]} of its "
                "rows: it closes over per-sample tensors. Pass them with inputs=(x, ...) and "
                "write f(z, x, ...); the library slices them to the active rows")
        self.whole_batch = True
        return None

    def _through_whole_batch(self, z: Tensor, rows: Tensor) -> Tensor:
        """f on the whole batch, stopped rows frozen at their last state; the rows' images."""
        state = self._full.detach().to(z.dtype).index_copy(0, rows, z)
        self._full = state.detach()
        out = self.f(state)
        if not isinstance(out, Tensor) or out.shape != state.shape:
            raise ValueError(
                f"f must return the shape of its input {tuple(state.shape)}; got "
                f"{getattr(out, 'shape', type(out).__name__)}. If f closes over per-sample "
                "tensors, pass them with inputs=(x, ...) and write f(z, x, ...)")
        return out[rows]


def as_row_map(f: Callable[..., Tensor] | RowMap, batch: int, inputs: Any = None) -> RowMap:
    """``f`` as a ``RowMap`` (unchanged if it already is one)."""
    if isinstance(f, RowMap):
        return f
    return RowMap(f, batch, inputs)
