"""Client-level differential privacy of the server's aggregate (docs/privacy.md): each client's
update clipped to an L2 bound, the per-key mean of the clipped updates noised with Gaussian
noise, and the privacy spent (ε at δ) from an RDP accountant.

The model is DP-FedAvg's (McMahan et al., ICLR 2018) with a trusted server: the server sees
every raw update, clips it, and releases only noised aggregates. For every parameter key k
some client returned this round, with n_k the clients that hold it (ScaleFL: per element,
the clients whose slice covers it):

    Δ_i = w_i − w (over every tensor of i's tier),   Δ̃_i = Δ_i · min(1, C / ‖Δ_i‖₂)
    w_k ← w_k + (Σ_{i holds k} Δ̃_i,k + z·C·ξ_k) / n_k,      ξ_k ~ N(0, I), seeded

so the noise on the averaged update has standard deviation z·C/n_k. The sum over clients has
L2 sensitivity C (one client's clipped update, all keys together), so adding N(0, z²C²) to
each of its coordinates is the Gaussian mechanism with noise multiplier z; dividing by n_k
(the number of holders, fixed by the sampled clients' tiers, which this treats as public) is
post-processing. That is why the mean is *unweighted* (one vote per client) when DP is on:
an example-weighted mean would let a client's weight, and so its sensitivity, grow with its
example count.

``epsilon`` turns (z, q, rounds, δ) into ε with Google's ``dp-accounting`` (the ``privacy``
extra), imported only when called.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reefl.methods.aggregate import leading_region, slice_to

Tensors = dict[str, torch.Tensor]

NOISE_STREAM = 0x4450
"""Third entry of the noise's seed, (seed, round, NOISE_STREAM): keeps the noise apart from
every other generator seeded by (seed, round)."""

MISSING_ACCOUNTANT = ("dp-clip-norm > 0 needs the dp-accounting package to report the privacy "
                      "spent: pip install 'reefl[privacy]'")


def noise_generator(seed: int, server_round: int) -> torch.Generator:
    """The generator of round ``server_round``'s noise, fixed by (seed, round) alone."""
    state = np.random.SeedSequence([seed, server_round, NOISE_STREAM]).generate_state(
        1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def clip_update(delta: Tensors, clip_norm: float) -> tuple[Tensors, float]:
    """``delta`` (all tensors together) scaled by min(1, C/‖delta‖₂), and its norm before."""
    norm = math.sqrt(sum(float(d.to(torch.float64).pow(2).sum()) for d in delta.values()))
    if norm <= clip_norm:
        return dict(delta), norm
    scale = clip_norm / norm
    return {k: d * scale for k, d in delta.items()}, norm


def noised_mean(global_state: Tensors, states: Sequence[Tensors], clip_norm: float,
                noise_multiplier: float, generator: torch.Generator | None) -> Tensors:
    """The clients' ``states`` merged into ``global_state`` privately (module docstring):
    each client's update from the global values it was sent (``slice_to`` of the global
    tensor, the whole tensor unless its tier is narrower), clipped to ``clip_norm``, averaged
    per key over its holders with one vote each, plus z·C·ξ/n per element. ξ is drawn from
    ``generator`` in the order of ``global_state``, one full-size standard normal tensor per
    key that some state holds (float64); a key nobody holds keeps its value and draws
    nothing. Sums run in float64 in the order of ``states``."""
    clipped = []
    for state in states:
        delta = {k: v.to(torch.float64) - slice_to(global_state[k], v.shape).to(torch.float64)
                 for k, v in state.items() if v.is_floating_point()}
        clipped.append(clip_update(delta, clip_norm)[0])
    merged = dict(global_state)
    for key, value in global_state.items():
        holders = [delta[key] for delta in clipped if key in delta]
        if not holders:
            continue
        total = torch.zeros(value.shape, dtype=torch.float64)
        count = torch.zeros(value.shape, dtype=torch.float64)
        for delta in holders:
            region = leading_region(delta.shape, value.shape)
            total[region] += delta
            count[region] += 1
        if noise_multiplier > 0:
            if generator is None:
                raise RuntimeError("noised_mean with noise needs the round's generator")
            total += noise_multiplier * clip_norm * torch.randn(
                value.shape, generator=generator, dtype=torch.float64)
        covered = count > 0
        mean = total / torch.where(covered, count, torch.ones_like(count))
        base = value.to(torch.float64)
        merged[key] = torch.where(covered, base + mean, base).to(value.dtype)
    return merged


class GaussianMechanism:
    """The run's ``dp-clip-norm`` C and ``dp-noise-multiplier`` z, and the round's noise
    generator (``start_round``). One per method object, on the server."""

    def __init__(self, clip_norm: float, noise_multiplier: float, seed: int) -> None:
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.generator: torch.Generator | None = None

    @property
    def on(self) -> bool:
        """Whether DP is on (``dp-clip-norm`` > 0)."""
        return self.clip_norm > 0

    def start_round(self, server_round: int) -> None:
        """Seed the noise of ``server_round`` (every aggregate of the round draws from it)."""
        self.generator = noise_generator(self.seed, server_round)

    def mean(self, global_state: Tensors, states: Sequence[Tensors]) -> Tensors:
        """``noised_mean`` with this run's C, z and the round's generator."""
        if self.noise_multiplier > 0 and self.generator is None:
            raise RuntimeError("GaussianMechanism.start_round must seed the round's noise first")
        return noised_mean(global_state, states, self.clip_norm, self.noise_multiplier,
                           self.generator)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism
    (sampling rate q, noise multiplier z), from dp-accounting's RDP accountant. inf when
    z = 0, 0 before the first round."""
    return epsilon_over_rounds(noise_multiplier, [sampling_rate] * rounds, delta)


def epsilon_over_rounds(noise_multiplier: float, sampling_rates: Sequence[float],
                        delta: float) -> float:
    """ε at ``delta`` after one round at each of ``sampling_rates`` (the rate may change
    with the roster); ``epsilon`` when they are all equal."""
    if not sampling_rates:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        import dp_accounting
    except ImportError:
        raise RuntimeError(MISSING_ACCOUNTANT) from None
    # its fractional orders may fail to converge at large q; they are then left out of the
    # bound (it says so on absl's logger, once per order): a tighter ε is lost, never a looser
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return _rdp_epsilon(dp_accounting, noise_multiplier, sampling_rates, delta)
    finally:
        absl_logger.setLevel(level)


def _rdp_epsilon(dp_accounting: Any, noise_multiplier: float, sampling_rates: Sequence[float],
                 delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    for rate, count in sorted(Counter(r for r in sampling_rates if r > 0).items()):
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, gaussian), count))
    return float(accountant.get_epsilon(delta))


def accountant_available() -> bool:
    """Whether dp-accounting can be imported."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True
