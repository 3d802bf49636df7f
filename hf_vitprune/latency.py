"""Measured latency of PrunedViT blocks as a look-up table, interpolated multilinearly (NViT's latency model).

NViT (Yang et al., CVPR 2023, spec §3.1) prices a model by the sum over its blocks of the measured latency of one
transformer block with the block's dims (embedding E, heads H, per-head Q/K dim, per-head V dim, MLP width),
read from a table measured on the target hardware and interpolated multilinearly between grid points. Patch
embedding, tokens, final norm and classifier are not modelled there; `LatencyTable` is that model for any device,
plus one measured constant, `overhead`: the dense model's time outside its blocks (patch embedding, final norm,
classifier). NViT leaves it out, which makes a latency target optimistic when that part is large (high resolution,
few blocks); in two runs of `make bench` on the digits ViT it was 1.7 ms of 55.9 ms (3 %) and 6.9 ms of 68.9 ms
(10 %). A constant changes which plan meets a target, not how units rank.

    table = LatencyTable.measure(model.config, batch_size=64)   # times real PrunedViT blocks here (CPU or CUDA)
    table.save("latency.json")
    budget = make_budget(target_latency_ratio=0.5, latency_model=LatencyTable.load("latency.json"))

`table(config)` returns seconds for a config (overhead + its blocks), `table.block(embed, heads, qk, v, mlp)` for
one block. The table is generic: any method that accepts a `latency_model(config) -> seconds` can use it. NViT's
own `latency_head.json` (V100, batch 256) is read by `LatencyTable.from_nvit_json`.

Interpolation is multilinear on the grid, like scipy's `RegularGridInterpolator` that NViT uses, written with
numpy (scipy is not a dependency). Queries outside the grid raise, as NViT's `bounds_error=True`; the default grid
spans 1 to the dense dims on every axis, so every geometry pruning can reach is inside it. A measured table need
not be monotone (timing noise, kernel choices), so the latency saved by removing a unit can be negative.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration_pruned_vit import PrunedViTConfig
from .modeling_pruned_vit import PrunedViTForImageClassification, PrunedViTLayer
from .structure import write_json_atomically

logger = logging.getLogger(__name__)

#: Table axes, in order: residual width read by the block, heads, per-head Q/K dim, per-head V dim, MLP width.
AXES = ("embed", "heads", "qk", "v", "mlp")
FORMAT = "hf_vitprune.LatencyTable"


def _dense_dims(config: PrunedViTConfig) -> dict[str, int]:
    """The largest value of every axis over the blocks of `config` (the top of the default grid)."""
    return dict(zip(AXES, map(max, zip(*_block_dims(config)))))


#: Largest share of a model's time `LatencyTable.measure` attributes to what lies outside its blocks.
MAX_OVERHEAD_SHARE = 0.9

#: Grid values of the matrix dimensions (all axes but heads) are multiples of this, the widths pruning keeps.
GRID_ALIGNMENT = 8


def default_grid(config: PrunedViTConfig, points: int = 4) -> dict[str, list[int]]:
    """1 and `points - 1` values up to the largest dim of `config` per axis, evenly spaced; on every axis but heads
    they are rounded to multiples of 8 (aligned widths are what hardware-aligned pruning produces, and an unaligned
    width times slower than its neighbours, which would skew the interpolation)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"grid must be an integer >= 2 (points per axis) or a dict of axis values, got {points!r}.")
    grid = {}
    for axis, top in _dense_dims(config).items():
        step = 1 if axis == "heads" or top < 2 * GRID_ALIGNMENT else GRID_ALIGNMENT
        values = {1, top}
        for k in range(1, points - 1):
            values.add(max(step, step * round(top * k / (points - 1) / step)))
        grid[axis] = sorted(values)
    return grid


def _check_axes(axes: dict[str, Any]) -> dict[str, list[int]]:
    if set(axes) != set(AXES):
        raise ValueError(f"grid axes must be exactly {AXES}, got {sorted(axes)}.")
    checked = {}
    for axis in AXES:
        values = [int(v) for v in axes[axis]]
        if not values or values != sorted(set(values)) or values[0] < 0:
            raise ValueError(f"grid[{axis!r}] must be non-empty, ascending, unique, non-negative: got {axes[axis]}.")
        checked[axis] = values
    return checked


def _bracket(axis: str, values: list[int], x: float) -> list[tuple[int, float]]:
    """(grid index, weight) pairs of linear interpolation of `x` on one axis."""
    if not values[0] <= x <= values[-1]:
        raise ValueError(f"{axis}={x} is outside the latency table's grid [{values[0]}, {values[-1]}].")
    if len(values) == 1:
        return [(0, 1.0)]
    i = min(int(np.searchsorted(values, x, side="right")) - 1, len(values) - 2)
    t = (x - values[i]) / (values[i + 1] - values[i])
    return [(i, 1.0 - t), (i + 1, t)]


class LatencyTable:
    """Seconds of one PrunedViT block on a grid of dims, for a fixed token count and batch size.

    Args:
        axes: grid values per axis, `{"embed": [...], "heads": [...], "qk": [...], "v": [...], "mlp": [...]}`.
        seconds: array of shape `[len(axes[a]) for a in AXES]` (or the nested/flat list of it).
        tokens: tokens per image the blocks were timed with (CLS/distillation tokens + patches).
        batch_size: images per timed forward pass.
        overhead: seconds of the model outside its blocks, added to every estimate (0 for NViT's own tables).
        metadata: free-form record of the measurement (device, dtype, threads, torch version, ...).
    """

    def __init__(
        self,
        axes: dict[str, list[int]],
        seconds: Any,
        *,
        tokens: int,
        batch_size: int,
        overhead: float = 0.0,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.axes = _check_axes(axes)
        shape = tuple(len(self.axes[axis]) for axis in AXES)
        values = np.asarray(seconds, dtype=np.float64).reshape(shape)
        if not np.isfinite(values).all():
            raise ValueError("seconds must be finite.")
        self.seconds = values
        self.tokens = int(tokens)
        self.batch_size = int(batch_size)
        if not (np.isfinite(overhead) and overhead >= 0):
            raise ValueError(f"overhead must be finite seconds >= 0, got {overhead!r}.")
        self.overhead = float(overhead)
        self.metadata = dict(metadata or {})

    @classmethod
    @torch.no_grad()
    def measure(
        cls,
        config: PrunedViTConfig,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        grid: int | dict[str, list[int]] = 4,
        *,
        dtype: torch.dtype = torch.float32,
        repeats: int = 5,
        warmup: int = 2,
        seed: int = 0,
    ) -> LatencyTable:
        """Time single PrunedViT blocks of `config`'s token count and attention implementation on every grid point.

        The grid is swept `repeats` times, each time in a new random order, and a point keeps the fastest of its
        timings: load from elsewhere (other processes, a noisy neighbour, clock scaling) only ever adds time, and
        the random orders spread it over all points instead of biasing the ones measured at that moment. Once a
        sweep the whole dense model of `config` (random weights) is timed, then right after it each of its blocks
        alone: the median share of its time outside the blocks sets `overhead` (as that share of the table's own
        price of the blocks, so the table's level does not matter, only the measured proportion).

        On CPU under glibc, call `hf_vitprune.evaluation.tune_cpu_allocator()` first (the NViT recipe and `make
        bench` do): with the default allocator every pass page-faults on its large activations, more in the dense
        model than in a pruned one, and the table's prices mix in the faults.

        Args:
            config: the model to price (tokens, LayerNorm, activation, bias and attention implementation are
                taken from it; the grid's top defaults to its largest dims).
            device: where to time (default: the current accelerator if any, else CPU).
            batch_size: images per forward pass (NViT's table: 256 on a V100).
            grid: points per axis from 1 to the dense dim (`default_grid`), or explicit values `{axis: [ints]}` for
                all of `AXES`.
            dtype: parameter and input dtype.
            repeats: sweeps over the grid (timed forward passes per point).
            warmup: untimed forward passes before each timed one.
            seed: seeds the sweep orders and the random weights.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")
        axes = _check_axes(grid) if isinstance(grid, dict) else default_grid(config, grid)
        if any(axes[axis][0] < 1 for axis in AXES):
            raise ValueError("measured grid values must be >= 1 (a block needs at least one unit of each kind).")
        if device is None:
            device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else "cpu"
        device = torch.device(device)
        geometries = collections.Counter(_block_dims(config))
        for dims in geometries:  # the overhead is priced on the config's own blocks: fail now, not after timing
            for axis, x in zip(AXES, dims):
                if not axes[axis][0] <= x <= axes[axis][-1]:
                    raise ValueError(f"grid[{axis!r}]={axes[axis]} does not cover the config's {axis}={x}.")
        tokens = config.num_prefix_tokens + config.num_patches
        attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        shape = tuple(len(axes[axis]) for axis in AXES)
        points = list(itertools.product(*(range(n) for n in shape)))
        timings: dict[tuple[int, ...], list[float]] = {point: [] for point in points}
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = (
            PrunedViTForImageClassification(_timing_config(config, attn_implementation))
            .to(device=device, dtype=dtype)
            .eval()
        )
        pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, generator=generator)
        pixels = pixels.to(device=device, dtype=dtype)
        shares = []  # of the whole model's time spent outside its blocks, one per sweep

        def time_block(dims: tuple[int, ...]) -> float:
            embed, heads, qk, v, mlp = dims
            block_config = PrunedViTConfig(
                hidden_size=embed,
                num_hidden_layers=1,
                num_attention_heads=heads,
                qk_head_dim=qk,
                v_head_dim=v,
                intermediate_size=mlp,
                hidden_act=config.hidden_act,
                layer_norm_eps=config.layer_norm_eps,
                qkv_bias=config.qkv_bias,
            )
            block_config._attn_implementation = attn_implementation
            torch.manual_seed(seed)
            block = PrunedViTLayer(block_config, 0).to(device=device, dtype=dtype).eval()
            hidden = torch.randn(batch_size, tokens, embed, generator=generator).to(device=device, dtype=dtype)
            return _time(block, hidden, warmup)

        start = time.perf_counter()
        for _ in range(repeats):
            for position in torch.randperm(len(points) + 1, generator=generator).tolist():
                if position < len(points):
                    point = points[position]
                    timings[point].append(time_block(tuple(axes[axis][i] for axis, i in zip(AXES, point))))
                    continue
                whole = _time(model, pixels, warmup)  # and right after it its blocks, so drift hits both alike
                shares.append(1.0 - sum(n * time_block(dims) for dims, n in geometries.items()) / whole)
        seconds = np.zeros(shape)
        for point, values in timings.items():
            seconds[point] = min(values)
        logger.info("measured %d block latencies on %s in %.1f s", len(points), device, time.perf_counter() - start)
        table = cls(axes, seconds, tokens=tokens, batch_size=batch_size)
        blocks = table(config)
        share = min(max(statistics.median(shares), 0.0), MAX_OVERHEAD_SHARE)
        table.overhead = blocks * share / (1.0 - share)
        logger.info("dense model: %.2f ms in its blocks + %.2f ms overhead", 1e3 * blocks, 1e3 * table.overhead)
        metadata = {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "num_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "attn_implementation": attn_implementation,
            "repeats": repeats,
        }
        table.metadata = metadata
        return table

    def block(self, embed: float, heads: float, qk: float, v: float, mlp: float) -> float:
        """Interpolated seconds of one block with these dims (ValueError outside the grid)."""
        brackets = [_bracket(axis, self.axes[axis], x) for axis, x in zip(AXES, (embed, heads, qk, v, mlp))]
        total = 0.0
        for corner in itertools.product(*brackets):
            weight = float(np.prod([w for _, w in corner]))
            if weight:
                total += weight * float(self.seconds[tuple(i for i, _ in corner)])
        return total

    def __call__(self, config: PrunedViTConfig) -> float:
        """Estimated seconds of `config`: `overhead` plus the sum of its blocks (NViT's model latency)."""
        tokens = config.num_prefix_tokens + config.num_patches
        if tokens != self.tokens:
            raise ValueError(f"the latency table was measured with {self.tokens} tokens, the config has {tokens}.")
        return self.overhead + sum(self.block(*dims) for dims in _block_dims(config))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "axes": self.axes,
            "seconds": self.seconds.reshape(-1).tolist(),
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "overhead": self.overhead,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} (format={data.get('format')!r}); NViT's tables load with from_nvit_json.")
        tokens, batch_size = data["tokens"], data["batch_size"]
        overhead = data.get("overhead", 0.0)  # absent from tables written before it was measured
        return cls(
            data["axes"],
            data["seconds"],
            tokens=tokens,
            batch_size=batch_size,
            overhead=overhead,
            metadata=data["metadata"],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (through a temporary file)."""
        write_json_atomically(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_nvit_json(cls, path: str | os.PathLike, *, tokens: int = 198, batch_size: int = 256) -> LatencyTable:
        """Read NViT's `latency_head.json`: `{"EMB_e": {"QK_h_q": {"V_v": {"MLP_m": seconds}}}}` (spec §3.1).

        As NViT's interpolator does, an EMB = 0 slice of zeros is added below the measured widths (it is not
        measured), and the MLP_1 measurement is placed at MLP = 0. `tokens` and `batch_size` are those of NViT's
        measurement (DeiT-B distilled at 224: 198 tokens; V100, batch 256).
        """
        data = json.loads(Path(path).read_text())
        entries = {}
        for emb_key, by_qk in data.items():
            for qk_key, by_v in by_qk.items():
                for v_key, by_mlp in by_v.items():
                    for mlp_key, value in by_mlp.items():
                        _, heads, qk = qk_key.split("_")
                        mlp = int(mlp_key.split("_")[1])
                        point = (int(emb_key.split("_")[1]), int(heads), int(qk), int(v_key.split("_")[1]))
                        entries[(*point, 0 if mlp == 1 else mlp)] = float(value)
        values = [sorted({key[i] for key in entries}) for i in range(len(AXES))]
        values[0] = [0, *values[0]] if values[0][0] != 0 else values[0]
        axes = dict(zip(AXES, values))
        seconds = np.zeros([len(v) for v in values])
        positions = [{value: i for i, value in enumerate(v)} for v in values]
        for key, value in entries.items():
            seconds[tuple(p[k] for p, k in zip(positions, key))] = value
        expected = (len(values[0]) - 1) * int(np.prod([len(v) for v in values[1:]]))
        if len(entries) != expected:
            raise ValueError(f"{str(path)!r} is not a full grid: {len(entries)} entries, expected {expected}.")
        return cls(axes, seconds, tokens=tokens, batch_size=batch_size, metadata={"source": os.fspath(path)})

    def __repr__(self) -> str:
        sizes = "x".join(str(len(self.axes[axis])) for axis in AXES)
        return (
            f"LatencyTable({sizes} grid, {self.tokens} tokens, batch {self.batch_size}, "
            f"overhead {self.overhead:.3g} s, {self.metadata})"
        )


def _block_dims(config: PrunedViTConfig) -> list[tuple[int, int, int, int, int]]:
    """(embed, heads, qk, v, mlp) of every block of `config`, the table's axes."""
    return list(
        zip(
            config.block_dims,
            config.heads_per_layer,
            config.qk_head_dims,
            config.v_head_dims,
            config.intermediate_sizes,
        )
    )


def _timing_config(config: PrunedViTConfig, attn_implementation: str) -> PrunedViTConfig:
    """A copy of `config` timed like the table's blocks: this attention implementation, no NViT per-token
    multipliers (the blocks are timed without them)."""
    config = PrunedViTConfig.from_dict(config.to_dict())
    config.qkv_token_scale = False
    config._attn_implementation = attn_implementation
    return config


def _time(block: torch.nn.Module, hidden: torch.Tensor, warmup: int) -> float:
    """Seconds of one `block(hidden)` after `warmup` untimed passes, synchronising the accelerator around it."""
    device = hidden.device

    def synchronize() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    for _ in range(warmup):
        block(hidden)
    synchronize()
    start = time.perf_counter()
    block(hidden)
    synchronize()
    return time.perf_counter() - start


__all__ = ["AXES", "GRID_ALIGNMENT", "LatencyTable", "default_grid"]
