"""DepthFL (Kim et al., ICLR 2023): depth-scaled tiers with one head per exit and mutual
self-distillation; FedAvg or FedDyn server update (docs/method.md §6).

A tier-t client trains the backbone cut at exit t and heads 0..t (``PerExitHeads``: no Ree,
no modulation) with

    loss = Σ_k CE_k + (λ(r)/t)·Σ_k Σ_{j≠k} τ²·KL(p_j.detach() ‖ p_k),   t = exits − 1,

λ(r) the KD ramp and τ = ``kd-temperature`` (1 in the paper, where τ² changes nothing). A
single-exit client has no KL.

``server-update``:

* ``fedavg`` (default): per-parameter example-weighted mean over the clients holding it.
* ``feddyn`` (Acar et al., ICLR 2021), α = ``feddyn-alpha`` (0.1). Client i keeps g_i (zero
  at first; held by the server, sent with each training message and checkpointed, so it
  survives restarts of the client and of the run) and trains on
  loss − ⟨g_i, w⟩ + (α/2)·‖w − w_server‖², then sets g_i ← g_i − α·(w_new − w_server). The
  server keeps h (zero at first) and, for every parameter p returned this round,
  h_p ← h_p − α·(m_p/N)·(avg_p − w_p);  w_p ← avg_p − h_p/α.

Choices for FedDyn where docs/method.md is silent:

* m_p (the "#updaters") is the number of this round's clients that returned p, and avg_p
  their *plain* mean (FedDyn's Algorithm 1), with N = ``num-clients`` for every p. Then
  (m_p/N)·(avg_p − w_p) = (1/N)·Σ_{i returned p}(w_i,p − w_p), so h_p stays exactly the mean
  of g_i,p over all N clients (a client whose tier lacks p has g_i,p = 0): FedDyn's invariant
  holds per parameter even though tiers hold different parameters. A parameter nobody
  returned keeps its value and its h.
* The penalty covers exactly the parameters the client trains and sends.
* The server's h lives in the server process's ``DepthFL`` object (one per run).
* The paper's FedDyn runs use lr 0.1 → 0.01 and weight decay 1e-3; this project's defaults are
  not changed: set ``lr-max``, ``lr-min`` and ``weight-decay``.
"""

from __future__ import annotations

from collections import Counter

import torch

from reefl.config import ConfigError, RunConfig, Setting
from reefl.methods.aggregate import weighted_mean_per_key
from reefl.methods.base import ClientUpdate, HeldOutCE, Method, TaskSpec
from reefl.methods.losses import exit_cross_entropies, kd_weight, mutual_distillation
from reefl.models import EarlyExitModel

Tensors = dict[str, torch.Tensor]


def feddyn_penalty(params: Tensors, sent: Tensors, g: Tensors, alpha: float) -> torch.Tensor:
    """−⟨g, w⟩ + (α/2)·‖w − w_server‖², summed over the parameters (a missing g is 0)."""
    quadratic = torch.stack([(w - sent[name]).pow(2).sum() for name, w in params.items()])
    linear = [(g[name] * w).sum() for name, w in params.items() if name in g]
    return alpha / 2 * quadratic.sum() - (torch.stack(linear).sum() if linear else 0.0)


def feddyn_client_state(params: Tensors, sent: Tensors, g: Tensors, alpha: float) -> Tensors:
    """The client's next g: g − α·(w_new − w_server), per parameter (a missing g is 0)."""
    return {name: g.get(name, torch.zeros_like(w)) - alpha * (w.detach() - sent[name])
            for name, w in params.items()}


def feddyn_server_step(global_state: Tensors, mean: Tensors, counts: dict[str, int], h: Tensors,
                       alpha: float, num_clients: int) -> tuple[Tensors, Tensors]:
    """One FedDyn server update of the parameters in ``counts`` (name -> m_p, the clients
    that returned it): h_p ← h_p − α·(m_p/N)·(mean_p − w_p), w_p ← mean_p − h_p/α. Returns
    the new global state and the new h; other parameters keep their value and h."""
    state, new_h = dict(global_state), dict(h)
    for name, count in counts.items():
        old = h.get(name, torch.zeros_like(global_state[name]))
        new_h[name] = old - alpha * count / num_clients * (mean[name] - global_state[name])
        state[name] = mean[name] - new_h[name] / alpha
    return state, new_h


class DepthFL(Method):
    """Per-exit heads, Σ CE + normalised mutual KL; FedAvg or FedDyn on the server."""

    name = "depthfl"
    settings = (Setting("feddyn-alpha", 0.1, "a number > 0", lambda v: v > 0),)
    server_updates = ("fedavg", "fedadam", "feddyn")
    private_aggregate = True  # FedAvg/FedAdam go through Method.merge; FedDyn is refused

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """FedDyn cannot be made private here (docs/privacy.md): the server keeps every
        client's g_i, built from its raw updates, in the checkpoint, and h = mean g_i breaks
        once updates are clipped and noised."""
        if cfg.server_update == "feddyn" and cfg.dp_clip_norm > 0:
            raise ConfigError(
                "server-update must be fedavg or fedadam when dp-clip-norm > 0 (FedDyn keeps "
                "each client's g_i, built from its raw updates, on the server and in the "
                "checkpoint); got 'feddyn'")

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        super().__init__(cfg, task)
        self.feddyn = self.cfg.server_update == "feddyn"
        self.keeps_client_state = self.feddyn
        self.server_h: Tensors = {}

    def build_architecture(self, tier: int) -> EarlyExitModel:
        return self.build_heads_model(tier)

    def new_loss_state(self, held_out: HeldOutCE | None = None) -> None:
        return None

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """Σ_k CE_k + λ(r)·(all-pairs KL / (exits − 1))."""
        ces = exit_cross_entropies(logits, labels)
        kd = mutual_distillation(logits, self.cfg.kd_temperature)
        loss = torch.stack(ces).sum() + kd_weight(server_round, self.cfg.kd_rounds) * kd
        return loss, [ce.item() for ce in ces]

    def local_penalty(self, params: Tensors, sent: Tensors, client_state: Tensors
                      ) -> torch.Tensor | None:
        """FedDyn's linear + quadratic penalty; none under FedAvg."""
        if not self.feddyn:
            return None
        return feddyn_penalty(params, sent, client_state, self.cfg.feddyn_alpha)

    def finish_local(self, params: Tensors, sent: Tensors, client_state: Tensors) -> Tensors:
        """FedDyn's g update; nothing to keep under FedAvg."""
        if not self.feddyn:
            return {}
        return feddyn_client_state(params, sent, client_state, self.cfg.feddyn_alpha)

    def server_state(self) -> Tensors:
        """FedAdam's moments and FedDyn's h (``feddyn-h/<name>``)."""
        return {**super().server_state(), **{f"feddyn-h/{k}": v for k, v in self.server_h.items()}}

    def load_server_state(self, tensors: Tensors) -> None:
        super().load_server_state(tensors)
        self.server_h = {k.removeprefix("feddyn-h/"): v for k, v in tensors.items()
                         if k.startswith("feddyn-h/")}

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        """FedAvg or FedAdam (``Method.aggregate``), or FedDyn's step from the plain per-key
        mean."""
        if not self.feddyn:
            return super().aggregate(global_state, updates)
        mean = weighted_mean_per_key(global_state, [(u.state, 1) for u in updates])
        counts = Counter(name for u in updates for name in u.state)
        state, self.server_h = feddyn_server_step(
            global_state, mean, counts, self.server_h, self.cfg.feddyn_alpha,
            self.cfg.num_clients)
        return state
