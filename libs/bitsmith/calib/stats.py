"""Statistics accumulators: pure, no hooks, fed one activation batch at a time."""

from __future__ import annotations

from typing import NamedTuple

import torch

from bitsmith.errors import CalibrationError


class InputStats(NamedTuple):
    """What calibration learns about one linear's input: GPTQ's Hessian, the rows it was made of, and
    the largest |activation| (FP8's static activation scale is that over 448); `cross`, where asymmetric
    calibration asks for it, is 2/n · X̃ᵀX between these inputs X̃ and the float model's X of the same rows."""

    hessian: torch.Tensor
    tokens: int
    absmax: float
    cross: torch.Tensor | None = None


class HessianAccumulator:
    """The GPTQ Hessian H = 2/n · Σ xᵀx over all n input rows seen, for a linear with K inputs, and with
    `cross` asymmetric calibration's C = 2/n · Σ xᵀx_f, x_f the float model's input on the same row.

    Each batch's XᵀX is a float32 matrix product (fast on any device); the running sum is kept in
    float64 so a long calibration run does not lose the small contributions of late batches. bfloat16
    activations on a GPU multiply on its bfloat16 tensor cores into float32 (`_product`: three times
    TF32's rate, the same sums up to float32 rounding, since products of bfloat16 values are exact in
    float32); elsewhere they are widened first.

    >>> acc = HessianAccumulator(2)
    >>> acc.add(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    >>> acc.hessian(), acc.count
    (tensor([[1., 0.],
            [0., 9.]]), 2)
    """

    def __init__(self, columns: int, *, device: torch.device | str = "cpu", name: str = "", cross: bool = False
                 ) -> None:
        self.columns = columns
        self.name = name
        self.count = 0
        self._sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self._cross = torch.zeros(columns, columns, dtype=torch.float64, device=device) if cross else None
        self._absmax = torch.zeros((), dtype=torch.float32, device=device)

    def _rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.shape[-1] != self.columns:
            raise CalibrationError(f"{self.name}: {what} have {x.shape[-1]} columns, expected {self.columns}")
        rows = x.reshape(-1, self.columns).to(device=self._sum.device)
        if not (rows.dtype is torch.bfloat16 and rows.is_cuda):
            rows = rows.float()
        if not torch.isfinite(rows).all():
            raise CalibrationError(f"{self.name}: {what} contain NaN or Inf")
        return rows

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Accumulate activations [..., K]; every leading dimension counts as rows. An accumulator made with
        `cross` also takes the float model's activations of the same rows, `reference`."""
        rows = self._rows(x, "activations")
        if self._cross is not None:
            if reference is None:
                raise CalibrationError(f"{self.name}: cross statistics need the float model's activations")
            float_rows = self._rows(reference, "the float model's activations")
            if float_rows.shape != rows.shape:
                raise CalibrationError(f"{self.name}: the float model's activations have shape "
                                       f"{tuple(reference.shape)}, these {tuple(x.shape)}")
            self._cross.add_(_product(rows, float_rows))
        self._sum.add_(_product(rows, rows))  # widened element by element: no float64 copy of the product
        torch.maximum(self._absmax, rows.abs().amax(), out=self._absmax)  # stays on the device: no sync
        self.count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """float32 [K, K]; raises if nothing was accumulated."""
        if self.count == 0:
            raise CalibrationError(f"{self.name}: no activations were captured")
        return (self._sum * (2.0 / self.count)).float()

    def stats(self) -> InputStats:
        """The Hessian, the number of rows, the absmax seen and (with `cross`) the cross statistics;
        raises if nothing was accumulated."""
        hessian = self.hessian()
        cross = None if self._cross is None else (self._cross * (2.0 / self.count)).float()
        return InputStats(hessian=hessian, tokens=self.count, absmax=float(self._absmax), cross=cross)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀb in float32 (the rows as `_rows` gives them: bfloat16 on a GPU, float32 otherwise)."""
    if a.dtype is torch.bfloat16 and b.dtype is torch.bfloat16:
        return torch.mm(a.T, b, out_dtype=torch.float32)
    return a.float().T @ b.float()


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
