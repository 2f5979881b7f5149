"""Counter-based seeds and per-device generators.

Every random draw of a ZO step is addressed by a tuple of integers, e.g.
``(run_seed, step, query, param_index, chunk)``. :func:`derive_seed` hashes that tuple
to a 63-bit seed, and :class:`DeviceGenerators` re-seeds a *dedicated* ``torch.Generator``
on the tensor's device before the draw. Consequences:

* the same address always gives the same numbers (perturbation and update agree, a
  resumed run agrees with an uninterrupted one), whatever order the draws happen in;
* the global torch / numpy / python RNGs are never read or changed;
* parameters living on different devices (``device_map="auto"``) each get their own
  generator, seeded from the same address.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mixer with good
    # avalanche, so neighbouring addresses give unrelated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*address: int) -> int:
    """Hash a tuple of non-negative integers to a seed in [0, 2**63)."""
    h = 0x5A07_0E5D  # arbitrary non-zero start so that (0,) and () differ
    for part in address:
        if part < 0:
            raise ValueError(f"seed address parts must be non-negative, got {address}")
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 1


class DeviceGenerators:
    """One ``torch.Generator`` per device, re-seeded from an address before each draw."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def seeded(self, device: torch.device, *address: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        gen.manual_seed(derive_seed(*address))
        return gen
