"""AWQ (Lin et al., 2023): activation-aware scales folded into the op before each group of linears, then clipping.

Per scaling group (`bitsmith.models.base.SmoothPair`: a norm or linear and the linears reading its output),
input channel c of the balance linears is multiplied by s[c] and the smooth op's output channel c divided by
it, so the float block computes the same function while the channels that carry large activations get a finer
grid. The scales tried are ``s = x_mean^r / w_mean^(1-r)`` (``x_mean^r`` without duo scaling) for r = i/grid,
each normalised so that ``sqrt(max(s) · min(s)) = 1``, plus no scaling at all; the winner has the least mean
squared error of the group's `inspect` module output with the balance linears quantized as the final solve
will quantize them (``Q(W·s)/s`` on the unscaled input, which is the same number as ``Q(W·s)`` on ``x/s``).
Every group is searched on the activations of the float block (scaled by the groups before it, which changes
nothing but rounding), one group at a time so that one inspected module's activations are held at once; v_proj
and up_proj take both their input scale and their output scale. The loss of a group whose inspect module is a
single linear is computed from its input Hessian (``tr(ΔW·H·ΔWᵀ)/2N``): the same number, no activation stored.

Clipping then shrinks each group of input columns' range, each end to a fraction (1, 1 - 1/clip_grid, ..., down
to 1 - max_shrink) of the group's max and min, so that the quantized output on about `clip_tokens` evenly sampled
(scaled) inputs is closest to the float one, per output row (through the sampled inputs' Hessian, so the number of
tokens costs no memory). Unlike AutoAWQ's search (one ±absmax limit per group, each group on its own) it moves
the two ends apart and weighs each group's error against the other groups' (`_clip`). q and k (the adapter's
`score_linears`) are not clipped, as in AutoAWQ: their outputs matter only through the attention scores (their
product, then a softmax), which their own output error does not measure, so a clip chosen on it can hurt.

Under grouped-query attention, v_proj's output channel (g, d) feeds o_proj's column d of every query head of
KV group g; one scale per v channel then multiplies all of those columns (`SmoothPair.repeat_kv`), the search
using x_mean and w_mean averaged over them. AutoAWQ and llm-compressor skip the v→o group unless the shapes match.

The report's losses are what the search compared: mean squared error per output element of the inspected module
(no scaling vs the chosen scales) and of each clipped linear on the sampled tokens (no clipping vs clipped), all
with the linears quantized; ``ratio`` None means no scaling won and the group was left as it was.

>>> from bitsmith.demo import DEMO_MODEL
>>> from bitsmith.models import load_checkpoint
>>> model = load_checkpoint(DEMO_MODEL)
>>> hidden = model.embed(torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0)))
>>> schemes = {name: QuantScheme(bits=4, group_size=128) for name in model.adapter.linears}
>>> transform = awq_block(model, 0, hidden, schemes, AWQOptions(grid=4, clip_grid=4))
>>> sorted(transform.tensors)[:2]
['input_layernorm.weight', 'mlp.down_proj.weight']
>>> all(g["loss_scaled"] <= g["loss_plain"] for g in transform.report.to_dict()["scales"])
True
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bitsmith.algos.gptq import hessian_row_errors, weight_energy
from bitsmith.algos.grid import dequantize, fit_grid, group_size_for, quantize
from bitsmith.calib.capture import DEFAULT_CHUNK, chunks, run_with_input_hooks
from bitsmith.errors import CalibrationError, ConfigError, UnsupportedError
from bitsmith.models.base import CheckpointModel, SmoothPair
from bitsmith.schemes import AWQOptions, GridSearch, QuantScheme

_EPS = 1e-4
"""Floor of the scales and offset of w_mean's power, as in the reference implementations."""

_CLIP_PASSES = 2
"""Walks of the clipping search over a linear's groups with the cross terms, after the diagonal one."""

_CLIP_BATCH_ELEMENTS = 1 << 24
"""The clipping search tries every range of a batch of output rows at once: about this many weights."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleSearch:
    """One scaling group's search: `ratio` None means no scaling beat leaving the group as it is."""

    smooth: str
    balance: tuple[str, ...]
    quantized: tuple[str, ...]
    inspect: str
    ratio: float | None
    loss_plain: float
    loss_scaled: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "balance": list(self.balance), "quantized": list(self.quantized)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClipSearch:
    """One linear's clipping: output MSE on the sampled tokens without and with clipping (both quantized)."""

    linear: str
    error_plain: float
    error_clipped: float
    clipped_groups: float
    """Fraction of the (row, group) ranges that were shrunk."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class AWQReport:
    """What AWQ chose for one block, in plain numbers and names for a manifest."""

    scales: tuple[ScaleSearch, ...]
    clips: tuple[ClipSearch, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"scales": [s.to_dict() for s in self.scales], "clips": [c.to_dict() for c in self.clips]}


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockTransform:
    """AWQ's result for one block: every parameter it changed (block-local name -> new float32 value).

    Applied with no quantization (``block_forward(bid, x, tensors)``) the block computes what it did before.
    """

    tensors: dict[str, torch.Tensor]
    report: AWQReport
    references: dict[str, torch.Tensor] = field(default_factory=dict)
    """The scaled weights of the linears clipping then changed, before it (block-local name -> float32):
    what their quantized weights approximate, for measuring the error clipping and rounding make together."""

    def report_dict(self) -> dict[str, Any]:
        """The report as plain names and numbers (JSON-ready), for a manifest."""
        return self.report.to_dict()


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme, search: GridSearch | None = None) -> torch.Tensor:
    """The float weight round-to-nearest gives `weight` [N, K] under `scheme`: what `quantize_rtn` then
    `dequantize()` return (same grid functions), without building the integer codes."""
    n, k = weight.shape
    size = group_size_for(k, scheme)
    return _fake_quantize_rows(weight.float().reshape(-1, size), scheme, search).reshape(n, k)


def _fake_quantize_rows(rows: torch.Tensor, scheme: QuantScheme, search: GridSearch | None) -> torch.Tensor:
    """Each row of `rows` [R, C] on its own grid: `fake_quantize` of weights whose groups are the rows."""
    scale, zero = fit_grid(rows, scheme, search)
    return dequantize(quantize(rows, scale, zero, scheme.maxq), scale, zero)


def weight_magnitude(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input column, the row mean of |w| relative to its group's absmax (AWQ's w_mean), [K]."""
    n, k = weight.shape
    groups = weight.abs().reshape(-1, group_size)
    relative = groups / (groups.amax(dim=1, keepdim=True) + 1e-6)
    return relative.reshape(n, k).mean(dim=0)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor, options: AWQOptions
) -> list[tuple[float, torch.Tensor]]:
    """(ratio, scales) for r = i/grid, i = 0 .. grid-1, each normalised to sqrt(max·min) = 1."""
    candidates = []
    for step in range(options.grid):
        ratio = step / options.grid
        scales = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + _EPS) if options.duo_scaling else x_mean.pow(ratio)
        scales = scales.clamp(min=_EPS)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales = torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))
        candidates.append((ratio, scales))
    return candidates


def search_clip(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    options: AWQOptions,
    search: GridSearch | None = None,
    *,
    name: str = "",
) -> tuple[torch.Tensor, ClipSearch]:
    """Clip each (row, group) of `weight` [N, K] to ±(the shrunk absmax) whose quantized partial output is
    closest to the float one, given the input Hessian ``H = 2/T·XᵀX`` [K, K] of the tokens searched on (the
    group's error is ``Δw_g·H_gg·Δw_gᵀ``, the same number as on the tokens themselves); returns the clipped
    weight and the search's report (output MSE on those tokens, quantized, without and with clipping)."""
    weight = weight.float()
    hessian = hessian.float().to(weight.device)
    clipped, shrunk = _clip(weight, hessian, scheme, options, search, name)
    plain = _hessian_loss(fake_quantize(weight, scheme, search) - weight, hessian)
    after = _hessian_loss(fake_quantize(clipped, scheme, search) - weight, hessian)
    return clipped, ClipSearch(linear=name, error_plain=plain, error_clipped=after, clipped_groups=shrunk)


def _clip(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    options: AWQOptions,
    search: GridSearch | None,
    name: str = "",
) -> tuple[torch.Tensor, float]:
    """`search_clip`'s weight, and the fraction of (row, group) ranges it shrank.

    Each (row, group) range is ``[lo · min(w, 0), hi · max(w, 0)]`` with both factors on the clipping grid
    (one factor for both ends on a symmetric grid). A first walk over the groups scores each group on its own
    diagonal block (AutoAWQ's search), which gives every group its own best start. Then `_CLIP_PASSES` more
    walks try, at each group, every pair of factors again and keep, per row, the one with the least error of
    the row's whole output: the group's own ``δ·H_gg·δᵀ`` plus twice its cross term with the other groups'
    current rounding errors, ``2·δ·Σ_h H_gh·δ_hᵀ``; the current pair is among the trials, so no walk raises
    that error. Clipping errors are not noise: every clipped weight moves towards
    zero, so the groups' errors add up along the weights' direction, which the diagonal blocks do not see.
    Letting each end move on its own fits the asymmetric grid's zero as well.
    """
    n, k = weight.shape
    size = group_size_for(k, scheme, name)
    groups = k // size
    steps = max(1, int(options.max_shrink * options.clip_grid))
    factors = torch.tensor([1 - step / options.clip_grid for step in range(steps)], device=weight.device)
    if scheme.sym:
        hi_factors = lo_factors = factors
    else:  # every pair, the widest ranges first so that ties keep the wider one
        pairs = torch.cartesian_prod(factors, factors)
        pairs = pairs[torch.argsort(-pairs.sum(dim=1), stable=True)]
        hi_factors, lo_factors = pairs[:, 0], pairs[:, 1]
    w = weight.reshape(n, groups, size)
    top = w.amax(dim=2).clamp(min=0)
    bottom = w.amin(dim=2).clamp(max=0)
    if scheme.sym:
        top = torch.maximum(top, -bottom)
        bottom = -top
    upper = top.clone()  # [n, G]: the chosen range of each (row, group)
    lower = bottom.clone()
    delta = _fake_quantize_rows(weight.reshape(-1, size), scheme, search).reshape(n, groups, size) - w
    batch = max(1, _CLIP_BATCH_ELEMENTS // (len(hi_factors) * size))
    for walk in range(1 + _CLIP_PASSES):
        for g in range(groups):
            block = hessian[g * size : (g + 1) * size, g * size : (g + 1) * size]
            # The first walk uses the diagonal blocks alone: every group's own best range is the start.
            cross = delta.reshape(n, k) @ hessian[:, g * size : (g + 1) * size] - delta[:, g] @ block if walk else None
            for rows in torch.arange(n, device=weight.device).split(batch):
                trial_upper = top[rows, g] * hi_factors.unsqueeze(1)  # [P, r]
                trial_lower = bottom[rows, g] * lo_factors.unsqueeze(1)
                wg = w[rows, g]
                trials = torch.maximum(torch.minimum(wg, trial_upper.unsqueeze(2)), trial_lower.unsqueeze(2))
                deltas = _fake_quantize_rows(trials.reshape(-1, size), scheme, search).reshape(trials.shape) - wg
                error = ((deltas @ block) * deltas).sum(dim=2)  # [P, r]
                if cross is not None:
                    error += 2 * (deltas * cross[rows]).sum(dim=2)
                best = error.argmin(dim=0)  # the first minimum: the widest range among equals
                pick = best.view(1, -1, 1).expand(1, len(rows), size)
                delta[rows, g] = deltas.gather(0, pick).squeeze(0)
                upper[rows, g] = trial_upper.gather(0, best.unsqueeze(0)).squeeze(0)
                lower[rows, g] = trial_lower.gather(0, best.unsqueeze(0)).squeeze(0)
    clipped = torch.maximum(torch.minimum(w, upper.unsqueeze(2)), lower.unsqueeze(2))
    return clipped.reshape(n, k), float(((upper != top) | (lower != bottom)).float().mean())


def _hessian_loss(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error of a weight change `delta` [N, K] given H = 2/T·XᵀX."""
    return float(((delta @ hessian) * delta).double().sum() / (2 * delta.shape[0]))


class _PairStats:
    """What one group's search needs from a block run: mean |x| per input column; either the input itself (a
    module inspected) or its Hessian (a single linear inspected); and the Hessian of every `stride`-th token,
    on which the group's balance linears are clipped."""

    def __init__(
        self, columns: int, *, keep_inputs: bool, stride: int, length: int, device: torch.device, store: torch.device
    ) -> None:
        self.abs_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.count = 0
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None
        self.xtx = None if keep_inputs else torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.sampled_xtx = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.sampled = 0
        self.stride = stride
        self.length = length
        self.store = store

    def add(self, part: slice, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise CalibrationError("AWQ: block activations contain NaN or Inf")
        rows = x.reshape(-1, x.shape[-1])
        self.abs_sum += rows.abs().sum(dim=0).double()
        self.count += rows.shape[0]
        if self.xtx is not None:
            self.xtx += (rows.T @ rows).double()
        if self.inputs is not None:
            self.inputs.append(x.to(self.store))
        sampled = rows[(-part.start * self.length) % self.stride :: self.stride]
        self.sampled_xtx += (sampled.T @ sampled).double()
        self.sampled += sampled.shape[0]

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / self.count).float()

    @property
    def hessian(self) -> torch.Tensor:
        if self.xtx is None:
            raise CalibrationError("AWQ: this group kept its inputs, not their Hessian")
        return (self.xtx * (2.0 / self.count)).float()

    @property
    def sampled_hessian(self) -> torch.Tensor:
        return (self.sampled_xtx * (2.0 / max(1, self.sampled))).float()


def scale_factors(model: CheckpointModel, bid: int, pair: SmoothPair, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """What folding `scales` (one per output channel of `pair.smooth`) into block `bid` multiplies each changed
    parameter by (broadcastable factors, by block-local parameter name); the block's function is unchanged.

    A norm's weight and a linear smooth op's output rows and bias are divided by the scales, and every balance
    linear's input columns multiplied by the scale of the channel they read.
    """
    factors = {f"{pair.smooth}.weight": 1 / scales}
    if pair.smooth in model.adapter.linears:
        factors[f"{pair.smooth}.weight"] = 1 / scales.unsqueeze(1)
        if model.linear_bias(bid, pair.smooth) is not None:
            factors[f"{pair.smooth}.bias"] = 1 / scales
    column_scales = scales[_channel_map(model, bid, pair, scales.numel())].unsqueeze(0)
    factors.update({f"{name}.weight": column_scales for name in pair.balance})
    return factors


def _is_single_linear(pair: SmoothPair) -> bool:
    return pair.balance == (pair.inspect,)


def _channel_map(model: CheckpointModel, bid: int, pair: SmoothPair, channels: int) -> torch.Tensor:
    """For each input column of the balance linears, the smooth output channel it reads, [K] long."""
    columns = model.linear_shape(bid, pair.balance[0])[1]
    index = torch.arange(columns, device=model.device)
    if not pair.repeat_kv or channels == columns:
        if channels != columns:
            raise UnsupportedError(
                f"{model.full_name(bid, pair.smooth)} has {channels} output channels but "
                f"{pair.balance[0]} reads {columns}"
            )
        return index
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if channels != kv_heads * head_dim or columns != heads * head_dim:
        raise UnsupportedError(
            f"{model.full_name(bid, pair.smooth)} -> {pair.balance[0]}: {channels} channels and {columns} columns "
            f"do not match {kv_heads} KV heads and {heads} query heads of dimension {head_dim}"
        )
    head = index // head_dim
    return (head // (heads // kv_heads)) * head_dim + index % head_dim


def _per_channel(values: torch.Tensor, channel_of: torch.Tensor, channels: int) -> torch.Tensor:
    """Mean of `values` [K] over the columns reading each channel, [channels]."""
    sums = torch.zeros(channels, dtype=values.dtype, device=values.device).index_add_(0, channel_of, values)
    counts = torch.zeros(channels, dtype=values.dtype, device=values.device).index_add_(
        0, channel_of, torch.ones_like(values)
    )
    return sums / counts


def _smooth_channels(model: CheckpointModel, bid: int, pair: SmoothPair) -> int:
    if pair.smooth in model.adapter.linears:
        return model.linear_shape(bid, pair.smooth)[0]
    return int(model.block_tensor(bid, f"{pair.smooth}.weight").numel())


def _check_inputs(model: CheckpointModel, bid: int, inputs: torch.Tensor, schemes: Mapping[str, QuantScheme]) -> None:
    linears = model.adapter.linears
    unknown = sorted(set(schemes) - set(linears))
    if unknown:
        raise ConfigError(f"AWQ: {unknown} are not linears of a {model.adapter.model_type} block: {list(linears)}")
    for name, scheme in schemes.items():
        group_size_for(model.linear_shape(bid, name)[1], scheme, model.full_name(bid, name))
    hidden = int(model.config.hidden_size)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or inputs.shape[-1] != hidden or 0 in inputs.shape:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ConfigError(f"AWQ: block {bid} inputs must be [samples, length, {hidden}], got {shape}")
    if not inputs.is_floating_point() or not torch.isfinite(inputs).all():
        raise CalibrationError(f"AWQ: block {bid} inputs must be finite floats")


def awq_block(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    schemes: Mapping[str, QuantScheme],
    options: AWQOptions,
    *,
    grid_search: GridSearch | None = None,
    chunk: int = DEFAULT_CHUNK,
    store: torch.device | str | None = None,
    clip: Collection[str] | None = None,
) -> BlockTransform:
    """Search AWQ's scales (and clipping) for block `bid` on its inputs [S, L, H].

    `schemes` names the linears that will be quantized and how; a group is searched iff one of its balance
    linears is among them, and the others are scaled but enter the loss unquantized. `grid_search` is the
    grid fit the final solve uses. Samples run `chunk` at a time; the activations a search keeps (the
    inspected attention's or MLP's input and float output) live on `store` (default: the model's device).
    With `options.clip`, the clipping range is searched for the `clip` linears (default: every one in
    `schemes`); a pipeline names those rounded to nearest afterwards (`Plan.clip_targets`).
    """
    _check_inputs(model, bid, inputs, schemes)
    clipped = frozenset(schemes if clip is None else clip) & schemes.keys()
    device = model.device
    keep = torch.device(store) if store is not None else device
    adapter = model.adapter
    pairs = [pair for pair in adapter.smooth_pairs if any(name in schemes for name in pair.balance)]
    stride = max(1, inputs.shape[0] * inputs.shape[1] // options.clip_tokens)

    scaled: dict[str, torch.Tensor] = {}  # changed by the scales alone: the block computes the float function
    final: dict[str, torch.Tensor] = {}  # scaled and clipped: what is returned
    searches: list[ScaleSearch] = []
    clips: list[ClipSearch] = []

    def current(table: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return table[name] if name in table else model.block_tensor(bid, name)

    def rescale(name: str, factor: torch.Tensor) -> None:
        scaled[name] = current(scaled, name) * factor
        final[name] = current(final, name) * factor

    for pair in pairs:
        stats = _PairStats(
            model.linear_shape(bid, pair.balance[0])[1],
            keep_inputs=not _is_single_linear(pair),
            stride=stride,
            length=inputs.shape[1],
            device=device,
            store=keep,
        )
        run_with_input_hooks(model, bid, inputs, {pair.balance[0]: stats.add}, scaled, chunk=chunk)
        weights = {name: current(scaled, f"{name}.weight") for name in pair.balance}
        context = {name: t for name, t in scaled.items() if name.startswith(f"{pair.inspect}.")}
        scales, search = _search_pair(model, bid, pair, stats, weights, context, schemes, options, grid_search, chunk)
        searches.append(search)
        clip_hessian = stats.sampled_hessian
        del stats
        if scales is not None:
            for name, factor in scale_factors(model, bid, pair, scales).items():
                rescale(name, factor)
            column_scales = scales[_channel_map(model, bid, pair, scales.numel())]
            clip_hessian = clip_hessian / torch.outer(column_scales, column_scales)
        for name in pair.balance:
            if name not in clipped or not options.clip or name in adapter.score_linears:
                continue
            weight, search_report = search_clip(
                current(final, f"{name}.weight"), clip_hessian, schemes[name], options, grid_search, name=name
            )
            clips.append(search_report)
            final[f"{name}.weight"] = weight
    return BlockTransform(
        tensors={name: t.float().contiguous() for name, t in final.items()},
        report=AWQReport(scales=tuple(searches), clips=tuple(clips)),
        references={name: current(scaled, name).float().contiguous() for name in final
                    if name.removesuffix(".weight") in schemes and not torch.equal(final[name], current(scaled, name))},
    )


def scaled_errors(original: torch.Tensor, reference: torch.Tensor, solved: torch.Tensor, hessian: torch.Tensor,
                  scheme: QuantScheme, search: GridSearch | None = None) -> tuple[float, float, float]:
    """(error, RTN's error, energy) of one AWQ-scaled linear, all in its scaled basis.

    `original` is the checkpoint's weight, `reference` the float weight AWQ's scaling made of it (before
    clipping: the block computes the float function with it), `solved` the dequantized result, `hessian`
    the Hessian of the scaled input. The error is tr(ΔW·H·ΔWᵀ) with ΔW = solved - reference, so clipping's
    share counts; RTN's is round-to-nearest of the original weight, carried into the scaled basis by the
    same per-element factor reference / original (scaling is diagonal on both sides, and a zero weight
    rounds to zero on any grid), so both say how far the same outputs move.
    """
    factor = torch.where(original == 0, 0.0, reference / torch.where(original == 0, 1.0, original))
    rtn = (fake_quantize(original, scheme, search) - original) * factor
    error = hessian_row_errors(solved - reference, hessian).sum()
    return float(error), float(hessian_row_errors(rtn, hessian).sum()), weight_energy(reference, hessian)


def _search_pair(
    model: CheckpointModel,
    bid: int,
    pair: SmoothPair,
    stats: _PairStats,
    weights: Mapping[str, torch.Tensor],
    context: Mapping[str, torch.Tensor],
    schemes: Mapping[str, QuantScheme],
    options: AWQOptions,
    search: GridSearch | None,
    chunk: int,
) -> tuple[torch.Tensor | None, ScaleSearch]:
    """The best per-channel scales of one group (None: none beat no scaling) and the search's report.

    `weights` are the balance linears' current float weights, `context` the inspected module's other changed
    parameters: the float module the loss compares with."""
    channels = _smooth_channels(model, bid, pair)
    channel_of = _channel_map(model, bid, pair, channels)
    quantized = tuple(name for name in pair.balance if name in schemes)

    # AWQ's w_mean over the rows of all balance linears, each normalised within its own scheme's groups.
    magnitudes = [
        weight_magnitude(w, group_size_for(w.shape[1], schemes[name]) if name in schemes else w.shape[1]) * w.shape[0]
        for name, w in weights.items()
    ]
    w_mean = torch.stack(magnitudes).sum(dim=0) / sum(w.shape[0] for w in weights.values())
    x_mean = _per_channel(stats.x_mean, channel_of, channels)
    w_mean = _per_channel(w_mean, channel_of, channels)

    def quantized_weights(column_scales: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        for name in quantized:
            if column_scales is None:
                out[name] = fake_quantize(weights[name], schemes[name], search)
            else:
                out[name] = fake_quantize(weights[name] * column_scales, schemes[name], search) / column_scales
        return out

    if _is_single_linear(pair):
        hessian = stats.hessian

        def loss(column_scales: torch.Tensor | None) -> float:
            return sum(
                _hessian_loss(q - weights[name], hessian) for name, q in quantized_weights(column_scales).items()
            )

    else:
        inputs = torch.cat(stats.inputs or [])
        stats.inputs = None
        parts = chunks(len(inputs), chunk)
        float_weights = {**context, **{f"{name}.weight": w for name, w in weights.items()}}
        reference = torch.cat(
            [model.module_forward(bid, pair.inspect, inputs[p], float_weights).to(inputs.device) for p in parts]
        )

        def loss(column_scales: torch.Tensor | None) -> float:
            overrides = dict(float_weights)
            overrides.update({f"{name}.weight": q for name, q in quantized_weights(column_scales).items()})
            total = torch.zeros((), dtype=torch.float64)
            for part in parts:
                out = model.module_forward(bid, pair.inspect, inputs[part], overrides)
                total += (out.double() - reference[part].to(out.device).double()).pow(2).sum().cpu()
            return float(total) / reference.numel()

    plain = loss(None)
    best: tuple[float | None, torch.Tensor | None, float] = (None, None, plain)
    for ratio, scales in candidate_scales(x_mean, w_mean, options):
        value = loss(scales[channel_of])
        if value < best[2]:
            best = (ratio, scales, value)
    report = ScaleSearch(
        smooth=pair.smooth,
        balance=pair.balance,
        quantized=quantized,
        inspect=pair.inspect,
        ratio=best[0],
        loss_plain=plain,
        loss_scaled=best[2],
    )
    return best[1], report


__all__ = [
    "AWQReport",
    "BlockTransform",
    "ClipSearch",
    "ScaleSearch",
    "awq_block",
    "candidate_scales",
    "fake_quantize",
    "scale_factors",
    "search_clip",
    "weight_magnitude",
]
