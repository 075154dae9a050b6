"""How the tests compare floating-point results: tolerances that follow from the computation.

MKL and oneDNN pick blocking and summation order by CPU, so two routes to one quantity (blocked vs
whole, chunked vs whole batch, ours vs a reference library, batched vs one at a time) agree only
up to rounding, and that rounding differs between an Intel Xeon and an AMD EPYC. So:

- Where a test claims two computations are mathematically equal, both sides run in float64
  (`.double()` on the module or the inputs, or `with float64():`) and are compared with RTOL64
  of the tensor's scale. The rounding error of a sum of n terms is at most n·eps64 relative to
  the terms' size (eps64 = 2.2e-16), below 1e-11 for the ≤ 10^4 terms of these tiny models;
  any real error (a missing term, a dropped chunk, a wrong scale or sign) is ≥ 1e-7 relative.
- Where a comparison must stay in float32 (`encode()` returns float32 arrays), it is relative to
  the tensor's scale with RTOL32: one forward pass of the tiny encoders accumulates a few dozen
  terms per output (hidden ≤ 64 wide, 1-2 layers), n·eps32 (eps32 = 1.2e-7) ≈ 1e-5 of the
  output's scale; wrong weights, pooling or normalisation differ by ≥ 1e-2.
- Bitwise `torch.equal` stays only where the same kernels run on the same inputs in the same
  order (a replay, a copy, a reload), which no CPU can change.

Tolerances are relative to a scale, not to each element: an entry that cancels to ~0 (e.g. the
attention key bias's gradient, zero by softmax invariance) is rounded at the size of the terms
it sums, not at its own size.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

EPS32 = torch.finfo(torch.float32).eps   # 1.19e-07
EPS64 = torch.finfo(torch.float64).eps   # 2.22e-16
RTOL64 = 1e-10
RTOL32 = 1e-5


def _tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def scale_of(*tensors) -> float:
    """The largest magnitude over tensors (or a dict's values): the size of the terms they sum."""
    flat = [t for x in tensors for t in (x.values() if isinstance(x, dict) else [x])]
    return max((float(_tensor(t).abs().max()) for t in flat if _tensor(t).numel()), default=0.0)


def assert_close_scaled(actual, expected, rtol: float, *, scale: float | None = None,
                        what: str = "") -> None:
    """|actual − expected| ≤ rtol·|expected| + rtol·scale elementwise, scale = max|expected|
    unless given (e.g. `scale_of(grads)` over all of a model's gradients). Shapes and dtypes
    must match (torch.testing.assert_close); tensors, arrays and Python floats are accepted."""
    a, e = _tensor(actual), _tensor(expected)
    s = scale_of(e) if scale is None else float(scale)
    atol = rtol * s
    prefix = f"{what}: " if what else ""
    torch.testing.assert_close(
        a, e, rtol=rtol, atol=atol,
        msg=lambda m: f"{prefix}{m}\n(tolerance rtol={rtol:g} of |expected| plus {atol:.3g} = rtol x scale {s:.3g})")


@contextlib.contextmanager
def float64():
    """New floating tensors (torch.tensor of floats, torch.randn, ...) default to float64 inside."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
