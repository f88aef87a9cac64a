"""The counter-based random numbers of :mod:`pipelines.rng` as torch ops on any device: same bits.

torch has no full unsigned 64-bit arithmetic, so a uint64 value lives in an int64 tensor with the same
bits (two's complement). Addition, multiplication and XOR give the same bits either way (wrapping
modulo 2**64); only the right shift differs — torch's ``>>`` on int64 is arithmetic — so a logical
shift is an arithmetic one with the copied sign bits masked off.

Layouts: keys (N,) int64; draws (N, count) float64 in [0, 1), exactly numpy's values (the top 53 bits
of each SplitMix64 output, an exact int→float conversion and a multiplication by 2**-53). Normals use
Box–Muller with the same draw layout as :func:`pipelines.rng.normals` (radii from the first half of the
uniforms, angles from the second); ``log1p``/``cos``/``sin`` are the device's own, within a few ulp
of numpy's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .rng import _GAMMA, _M1, _M2, _SEED_SALT, normal_draws


def as_int64(value) -> int:
    """The int64 with the same 64 bits as the uint64 ``value`` (a Python int, like numpy refuses
    values outside 0 .. 2**64 - 1)."""
    return int(np.array([value], dtype=np.uint64).view(np.int64)[0])


GAMMA, M1, M2, SEED_SALT = (as_int64(c) for c in (_GAMMA, _M1, _M2, _SEED_SALT))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` seen as uint64."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (the bits of :func:`pipelines.rng._mix`)."""
    z = (z ^ _shift_right(z, 30)) * M1
    z = (z ^ _shift_right(z, 27)) * M2
    return z ^ _shift_right(z, 31)


def batch_base(seed: int, epoch: int) -> int:
    """The (seed, epoch) half of :func:`pipelines.rng.sample_keys`: one number per batch, as an int64
    Python int (hashed with CPU tensors: no device work)."""
    base = mix(torch.tensor([as_int64(seed)], dtype=torch.int64) ^ SEED_SALT)
    return int(mix(base ^ as_int64(epoch))[0])


def keys_from_base(sample_ids: torch.Tensor, base) -> torch.Tensor:
    """Keys of ``sample_ids`` ((N,) int64, non-negative) for a batch whose :func:`batch_base` is ``base``
    (a Python int, or an int64 tensor that broadcasts against the ids)."""
    return mix(sample_ids ^ base)


def sample_keys(seed: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One key per sample id: (N,) int64 on ``sample_ids``' device, the bits of
    :func:`pipelines.rng.sample_keys`. ``sample_ids``: (N,) int64, non-negative."""
    return keys_from_base(sample_ids.to(torch.int64), batch_base(seed, epoch))


def raw_bits(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Outputs ``start .. start+count-1`` of every key's SplitMix64 stream: (N, count) int64 (uint64 bits)."""
    steps = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=keys.device)
    return mix(keys[:, None] + steps[None, :] * GAMMA)


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Raw outputs (int64, uint64 bits) → float64 in [0, 1) from their top 53 bits."""
    return _shift_right(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


def uniforms(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Draws ``start .. start+count-1`` of every key's stream: float64 (N, count) — :func:`pipelines.rng.uniforms`."""
    return to_uniform(raw_bits(keys, start, count))


def box_muller(u: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` standard normals per row from ``u``: float64 (N, 2 * ceil(count / 2)) uniforms laid out
    as :func:`pipelines.rng.normals` consumes them. Returns (N, count)."""
    pairs = (count + 1) // 2
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :pairs]))  # 1 - u in (0, 1]: never log(0)
    angle = (2.0 * math.pi) * u[:, pairs : 2 * pairs]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count]


def normals(keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Standard normals (N, count) float64 from the draws at ``start``: :func:`pipelines.rng.normals`."""
    return box_muller(uniforms(keys, start, normal_draws(count)), count)
