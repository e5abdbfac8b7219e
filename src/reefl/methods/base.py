"""The interface every federated method implements (ReeFL and the baselines).

A method is one class in one file of ``reefl.methods``: subclassing ``Method`` with a ``name``
registers it, with its own run-config ``settings``, the ``server_updates`` it implements and
a ``check_config`` for rules across keys (``reefl.config`` knows no method).

Two classes, so that what a method writes stays small:

* ``Method``'s **hooks** are what a method writes: the architecture a tier trains
  (``build_architecture``), the local loss (``new_loss_state``, ``local_loss``), and, where
  the defaults do not fit, how the server merges the replies (``merge`` or the whole
  ``aggregate``), how global tensors are named per tier (``global_name``), which tiers train
  (``takes_part``), a held-out split (``held_out_fraction``), a local penalty and client state
  kept across rounds (``local_penalty``, ``finish_local``), and how exits are evaluated.
* ``TierModels`` holds the **framework** that no method overrides: the run's regime applied
  on top of the architecture (``build_model``), the layout of every tier (names, shapes,
  what trains), the tensors a tier is sent, and the seeded (and pretrained) initial state.

The federation and training code only talk to these two.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from reefl.config import ConfigError, MethodSpec, RunConfig, Setting, register_method
from reefl.methods.aggregate import AdamHyperParams, FedAdam, slice_to, weighted_mean_per_key
from reefl.methods.privacy import GaussianMechanism
from reefl.models import EarlyExitModel, PerExitHeads, VisionTransformer
from reefl.models.checkpoints import backbone_weights, fit_to
from reefl.models.finetune import Regime, apply_regime

HeldOutCE = Callable[[], list[float]]
"""Per-exit CE of the model being trained on the next batch of the client's held-out data."""


@dataclass(frozen=True)
class TaskSpec:
    """What the data fixes about the model: classes and input channels."""

    num_classes: int
    in_chans: int


@dataclass(frozen=True)
class TierLayout:
    """Every parameter of a tier's model (name -> shape) and the names it trains."""

    shapes: dict[str, torch.Size]
    trainable: list[str]
    architecture: list[str]
    """The names the architecture has before the regime adds its own (what a checkpoint or
    another regime's model also has)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its trained parameters, its number of training examples, and the
    training metrics it reported."""

    partition_id: int
    tier: int
    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class TierModels:
    """The framework side of a method, shared by all: tiers' models in the run's regime, their
    layouts, the tensors a tier is sent, and the initial global state. Not overridden; it
    calls the hooks that ``Method`` declares (``build_architecture``, ``global_name``...)."""

    def __init__(self, cfg: RunConfig, task: TaskSpec) -> None:
        self.cfg = cfg
        self.task = task
        self.exit_blocks = cfg.exit_block_list if cfg.exit_blocks.strip() else \
            self.default_exit_blocks()
        self._layouts: dict[int, TierLayout] = {}

    @property
    def num_exits(self) -> int:
        return len(self.exit_blocks)

    @property
    def regime(self) -> Regime:
        """The run's fine-tuning regime (``regime``, ``lora-rank``, ``lora-alpha``,
        ``adapter-dim``)."""
        cfg = self.cfg
        return Regime(cfg.regime, cfg.lora_rank, cfg.lora_alpha, cfg.adapter_dim)

    def build_model(self, tier: int) -> EarlyExitModel:
        """The sub-model a client of ``tier`` trains: the architecture in the run's regime
        (its adapters added, only the regime's parameters trainable)."""
        return apply_regime(self.build_architecture(tier), self.regime)

    def build_global_model(self) -> nn.Module:
        """The model the server holds and evaluates, in the run's regime."""
        return apply_regime(self.build_global_architecture(), self.regime)

    def build_backbone(self, tier: int, **widths: int) -> VisionTransformer:
        """The backbone cut after the block of exit ``tier``: full width, unless ``widths``
        sets ``embed_dim``, ``attn_dim`` or ``mlp_hidden`` (ScaleFL's narrower tiers)."""
        cfg, bb = self.cfg, self.cfg.backbone
        return VisionTransformer(**{
            "img_size": cfg.img_size, "patch_size": bb["patch_size"],
            "in_chans": self.task.in_chans, "embed_dim": bb["embed_dim"],
            "depth": self.exit_blocks[tier] + 1, "num_heads": bb["num_heads"],
            "mlp_ratio": bb["mlp_ratio"], "layer_scale": bb.get("layer_scale"), **widths,
        })

    def build_heads_model(self, tier: int) -> EarlyExitModel:
        """The baselines' sub-model (docs/method.md §6): the backbone cut at exit ``tier`` and one
        LayerNorm + Linear head per exit 0..tier."""
        heads = PerExitHeads(self.cfg.backbone["embed_dim"], self.task.num_classes,
                             self.exit_blocks[: tier + 1], self.cfg.exit_standardise)
        return EarlyExitModel(self.build_backbone(tier), heads)

    def _layout(self, tier: int) -> TierLayout:
        """Names and shapes of ``tier``'s model, built once on the meta device. Float buffers
        (the running statistics of ``exit-standardise``) count as trained: training updates
        them, so they travel and are averaged like the parameters."""
        if tier not in self._layouts:
            with torch.device("meta"):
                model = self.build_architecture(tier)
                architecture = [name for name, _ in model.named_parameters()]
                architecture += [name for name, _ in _float_buffers(model)]
                model = apply_regime(model, self.regime)
                params = dict(model.named_parameters())
                buffers = dict(_float_buffers(model))
            self._layouts[tier] = TierLayout(
                shapes={name: t.shape for name, t in {**params, **buffers}.items()},
                trainable=[name for name, p in params.items() if p.requires_grad]
                + list(buffers),
                architecture=architecture,
            )
        return self._layouts[tier]

    def trainable_keys(self, tier: int) -> list[str]:
        """Names of the parameters a tier trains, receives and sends back."""
        return self._layout(tier).trainable

    def tier_shapes(self, tier: int) -> dict[str, torch.Size]:
        """Name and shape of every parameter of ``tier``'s model, trained or frozen."""
        return self._layout(tier).shapes

    def tier_state(self, global_state: dict[str, torch.Tensor], tier: int,
                   keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Parameters ``keys`` (default: all) of ``tier``'s model, taken from the global
        state: renamed by ``global_name`` and cut to the tier's shape (``slice_to``: the
        leading block, which is the whole tensor unless the tier is narrower, as in
        ScaleFL)."""
        shapes = self.tier_shapes(tier)
        return {name: slice_to(global_state[self.global_name(name, tier)],
                               shapes[name]).contiguous()
                for name in (keys if keys is not None else shapes)}

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The global model every run starts from: initialised from ``seed`` alone, then the
        pretrained backbone when ``pretrained`` is set. The server and every client compute
        the same tensors, so frozen parameters never travel: a client takes them from here."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            state = {k: v.detach() for k, v in self.build_global_model().state_dict().items()}
        if self.cfg.pretrained:
            state.update(self.pretrained_state(state))
        return state

    def pretrained_state(self, global_state: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        """The global tensors that come from the pretrained checkpoint: every backbone
        parameter of every tier's architecture (at the global model's width), under its
        global name; the position embedding is interpolated if the image size differs."""
        targets: dict[str, str] = {}  # global name -> backbone name in the checkpoint
        for tier in range(self.num_exits):
            targets.update({self.global_name(n, tier): n.removeprefix("backbone.")
                            for n in self._layout(tier).architecture
                            if n.startswith("backbone.")})
        shapes = {source: global_state[name].shape for name, source in targets.items()}
        weights = fit_to(backbone_weights(self.cfg.pretrained, self.cfg.model), shapes)
        return {name: weights[source] for name, source in targets.items()}

    def client_payload(self, global_state: dict[str, torch.Tensor], tier: int
                       ) -> dict[str, torch.Tensor]:
        """What the server sends a client of ``tier``, named as in that tier's model; the
        client returns the same names and shapes: the tier's trainable parameters."""
        return self.tier_state(global_state, tier, self.trainable_keys(tier))


def _float_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]


class Method(TierModels, ABC):
    """A federated early-exit method; one instance per process, built from the run config.

    Class attributes a subclass sets: ``name`` (its ``method`` value; setting it registers
    the class), ``settings`` (its own run-config keys), ``server_updates`` (the values of
    ``server-update`` it implements; every method has FedAvg and FedAdam by default).
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = ()
    server_updates: ClassVar[tuple[str, ...]] = ("fedavg", "fedadam")

    keeps_client_state: bool = False
    """Whether ``finish_local`` keeps per-client state across rounds (FedDyn's g_i). The
    server holds it, sends it with each training message and checkpoints it, so that it
    survives restarts of clients and of the run."""

    private_aggregate: ClassVar[bool] = True
    """Whether the server update clips and noises every aggregate it uses with
    ``self.privacy`` when DP is on (docs/privacy.md): true of ``Method``'s own. A class that
    overrides ``merge`` or ``aggregate`` must set it again (true once it does so), or it is
    refused with ``dp-clip-norm`` > 0."""

    held_out_fraction: float = 0.0
    """Share of each client's training data split off (seeded, the same every round) and not
    trained on; when > 0, ``new_loss_state`` receives the CE on it (``held_out``)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            register_method(cls.spec())


    @classmethod
    def spec(cls) -> MethodSpec:
        """What ``reefl.config`` needs to validate and build this method."""
        return MethodSpec(cls.name, cls.settings, cls.server_updates, cls._check_all, cls)

    @classmethod
    def _check_all(cls, cfg: RunConfig) -> None:
        """The framework's rules for every method, then the method's ``check_config``."""
        if cfg.dp_clip_norm > 0 and not cls._aggregates_privately():
            raise ConfigError(
                f"dp-clip-norm must be 0 for method {cfg.method}: its server "
                "update (merge/aggregate) is its own and does not declare "
                f"private_aggregate; got '{cfg.dp_clip_norm}'")
        cls.check_config(cfg)

    @classmethod
    def _aggregates_privately(cls) -> bool:
        """Whether no class from ``cls`` up to ``Method`` overrides ``merge`` or
        ``aggregate`` before (below) one that declares ``private_aggregate`` (which vouches
        for what it inherits)."""
        for klass in cls.__mro__:
            if "private_aggregate" in klass.__dict__ or klass is Method:
                return bool(klass.__dict__["private_aggregate"])
            if "merge" in klass.__dict__ or "aggregate" in klass.__dict__:
                return False
        return True

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Raise ``ConfigError`` for a combination of values this method does not allow (each
        setting's own rule is checked already). Nothing by default."""

    def default_exit_blocks(self) -> list[int]:
        """Exit blocks when ``exit-blocks`` is not given: docs/method.md §1's even spacing
        (``RunConfig.exit_block_list``)."""
        return self.cfg.exit_block_list

    @abstractmethod
    def build_architecture(self, tier: int) -> EarlyExitModel:
        """The sub-model of ``tier`` as the method defines it, before the fine-tuning regime:
        blocks up to exit ``tier``'s block, exits 0..tier."""

    def build_global_architecture(self) -> nn.Module:
        """The model the server holds, before the regime: by default the deepest tier's (a
        method whose tiers keep parameters apart, like InclusiveFL, builds one of its own)."""
        return self.build_architecture(self.num_exits - 1)

    def global_name(self, name: str, tier: int) -> str:
        """Name in the global state of parameter ``name`` of ``tier``'s model (the same
        name, unless the method keeps per-tier copies, like InclusiveFL)."""
        return name

    def exit_ids(self, tier: int) -> list[int]:
        """The global index of every exit the tier's model returns, in order (names its
        training metrics): exits 0..tier by default."""
        return list(range(tier + 1))

    def takes_part(self, tier: int) -> bool:
        """Whether clients of ``tier`` may be sampled at all (ExclusiveFL: the deepest tier
        only). The round's quota is drawn from the clients that may."""
        return True

    def exit_evaluator(self, global_state: dict[str, torch.Tensor]) -> nn.Module:
        """A module whose forward returns the logits of every exit of the global model. By
        default the global model itself: depth is causal, so one pass serves every exit."""
        model = self.build_global_model()
        model.load_state_dict(global_state)
        return model

    @abstractmethod
    def new_loss_state(self, held_out: HeldOutCE | None = None) -> object:
        """Per-round state of the local loss (e.g. the dynamic teacher's averages).
        ``held_out`` is None unless the method's ``held_out_fraction`` is > 0."""

    @abstractmethod
    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        """The training loss of one batch and each exit's CE (for logging)."""

    def local_penalty(self, params: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                      client_state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to every batch's training loss, from the trainable parameters (by
        name), the values the server sent, and this client's state; None adds nothing."""
        return None

    def finish_local(self, params: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                     client_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Entries of this client's state to set after local training (the server keeps the
        state per client across rounds, see ``keeps_client_state``). By default none."""
        return {}

    def merge(self, global_state: dict[str, torch.Tensor],
              updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """The replies merged into one state: per-parameter example-weighted mean over the
        clients holding it (docs/method.md §4); a parameter nobody returned keeps its value.
        With DP on (``dp-clip-norm`` > 0): the unweighted mean of the clipped updates plus
        the seeded Gaussian noise (``privacy``, docs/privacy.md)."""
        if self.privacy.on:
            return self.privacy.mean(global_state, [u.state for u in updates])
        return weighted_mean_per_key(
            global_state, [(u.state, u.num_examples) for u in updates]
        )

    def aggregate(self, global_state: dict[str, torch.Tensor],
                  updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """The server update: ``merge``, then the ``server-update``: ``fedavg`` takes the
        merged state; ``fedadam`` takes one FedAdam step (``methods.aggregate.FedAdam``,
        moments per parameter, kept across rounds) along the pseudo-gradient merged − w of
        every parameter some client returned. With DP on, ``merge`` has noised the mean
        already, so FedAdam's moments see only the noised aggregate."""
        merged = self.merge(global_state, updates)
        if self.cfg.server_update != "fedadam":
            return merged
        returned = {name for u in updates for name in u.state}
        deltas = {name: merged[name] - w for name, w in global_state.items() if name in returned}
        return self.fedadam.step(global_state, deltas)

    def server_state(self) -> dict[str, torch.Tensor]:
        """Everything the server keeps across rounds besides the global model (FedAdam's
        moments here; a method adds its own, e.g. FedDyn's h), by name: what a checkpoint
        saves so that a resumed run continues exactly. Empty before the first round."""
        if "fedadam" not in self.__dict__:  # never made: nothing to keep
            return {}
        return {f"fedadam/{k}": v for k, v in self.fedadam.state_dict().items()}

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``server_state`` returned (a resumed run)."""
        adam = {k.removeprefix("fedadam/"): v for k, v in tensors.items()
                if k.startswith("fedadam/")}
        if adam:
            self.fedadam.load_state_dict(adam)

    @functools.cached_property
    def privacy(self) -> GaussianMechanism:
        """Clipping and noise of the server's aggregates (``dp-clip-norm``,
        ``dp-noise-multiplier``, seeded by (``seed``, round): ``start_round``); off at 0."""
        cfg = self.cfg
        return GaussianMechanism(cfg.dp_clip_norm, cfg.dp_noise_multiplier, cfg.seed)

    @functools.cached_property
    def fedadam(self) -> FedAdam:
        """The server's FedAdam optimiser (moments kept across rounds), made on first use."""
        return FedAdam(AdamHyperParams(lr=self.cfg.fedadam_lr))
