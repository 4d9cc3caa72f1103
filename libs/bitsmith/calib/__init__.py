"""Calibration: token windows, statistic accumulators, and hooked block runs that feed them."""

from __future__ import annotations

from bitsmith.calib.capture import capture_hessians, forward_block
from bitsmith.calib.data import calibration_tokens, tokenize_file
from bitsmith.calib.stats import HessianAccumulator

__all__ = ["HessianAccumulator", "calibration_tokens", "capture_hessians", "forward_block", "tokenize_file"]
