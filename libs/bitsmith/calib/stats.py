"""Statistics accumulators: pure, no hooks, fed one activation batch at a time."""

from __future__ import annotations

from typing import NamedTuple

import torch

from bitsmith.errors import CalibrationError


class InputStats(NamedTuple):
    """What calibration learns about one linear's input: GPTQ's Hessian, the rows it was made of, and
    the largest |activation| (FP8's static activation scale is that over 448)."""

    hessian: torch.Tensor
    tokens: int
    absmax: float


class HessianAccumulator:
    """The GPTQ Hessian H = 2/n · Σ xᵀx over all n input rows seen, for a linear with K inputs.

    Each batch's XᵀX is a float32 matrix product (fast on any device); the running sum is kept in
    float64 so a long calibration run does not lose the small contributions of late batches.

    >>> acc = HessianAccumulator(2)
    >>> acc.add(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    >>> acc.hessian(), acc.count
    (tensor([[1., 0.],
            [0., 9.]]), 2)
    """

    def __init__(self, columns: int, *, device: torch.device | str = "cpu", name: str = "") -> None:
        self.columns = columns
        self.name = name
        self.count = 0
        self._sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self._absmax = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations [..., K]; every leading dimension counts as rows."""
        if x.shape[-1] != self.columns:
            raise CalibrationError(f"{self.name}: activations have {x.shape[-1]} columns, expected {self.columns}")
        rows = x.reshape(-1, self.columns).to(device=self._sum.device, dtype=torch.float32)
        if not torch.isfinite(rows).all():
            raise CalibrationError(f"{self.name}: activations contain NaN or Inf")
        self._sum.add_(rows.T @ rows)  # widened element by element: no float64 copy of the product
        torch.maximum(self._absmax, rows.abs().amax(), out=self._absmax)  # stays on the device: no sync
        self.count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """float32 [K, K]; raises if nothing was accumulated."""
        if self.count == 0:
            raise CalibrationError(f"{self.name}: no activations were captured")
        return (self._sum * (2.0 / self.count)).float()

    def stats(self) -> InputStats:
        """The Hessian, the number of rows and the absmax seen; raises if nothing was accumulated."""
        return InputStats(hessian=self.hessian(), tokens=self.count, absmax=float(self._absmax))


def relative_output_error(inputs: torch.Tensor, quantized: torch.Tensor, reference: torch.Tensor) -> float:
    """‖Y_q - Y‖ / ‖Y - X‖ of a residual block: its output error relative to what it adds to its input.

    Relative to Y itself the error would shrink block by block only because the residual stream
    grows; relative to the block's own contribution it says how much of the block survived.

    >>> x = torch.zeros(1, 2); y = torch.tensor([[3.0, 4.0]])
    >>> relative_output_error(x, y + torch.tensor([[0.0, 0.5]]), y)
    0.1
    """
    update = (reference.double() - inputs.double()).norm()
    if update == 0:
        return 0.0 if torch.equal(quantized, reference) else float("inf")
    return float((quantized.double() - reference.double()).norm() / update)
