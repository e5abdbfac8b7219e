"""Communication and compute per tier, for any method behind the ``Method`` interface.

For every tier ``t`` (the client sub-model with exits 0..t):

* ``params_down`` / ``params_up``: elements of the parameters the server sends to a client of
  the tier each round and the client sends back (``Method.trainable_keys(t)``). Equal for every
  method today; kept apart because a method or regime may send back less than it receives.
* ``bytes_down`` / ``bytes_up``: the same in bytes, with each tensor's own element size
  (4 for fp32). Payload only: message framing and metadata are not counted.
* ``params_model``: every parameter of the tier's model, trained or frozen (the run's regime
  included: LoRA, adapter and SSF parameters count).
* ``share_of_full_model``: ``params_up`` over ``params_model`` of the deepest tier, i.e. the
  share of the full model (all blocks, all exits, in the run's regime) the tier trains.
* ``forward_flops``: FLOPs of one forward pass of **one image** through the tier's sub-model,
  i.e. the cost of reaching exit ``t`` (with early-exit inference, exits 0..t-1 are computed
  on the way). Counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix products
  (``mm``/``addmm``/``bmm``, so every Linear), convolutions and attention, 2 FLOPs per
  multiply-add. Element-wise work (LayerNorm, GELU, softmax, additions, the attention scaling)
  is **not** counted. ``forward_flops_by_op`` splits the total by aten op.

The models are built on the ``meta`` device (no memory, no weights, no RNG use), where
``scaled_dot_product_attention`` runs as its math decomposition, so attention is counted as
its two batched products (2·heads·n²·d_head each). If a model cannot run on ``meta`` it is
run on the CPU with the math attention kernel, which counts the same ops (CPU's fused
attention kernel would otherwise not be counted at all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from reefl.config import RunConfig
    from reefl.methods import Method, TaskSpec
    from reefl.outputs.tables import Table

ACCOUNTING_FILE = "accounting.json"
REGIME_TABLE_FILE = "costs.md"
FLOPS_NOTE = (
    "forward_flops: one image, one forward pass of the tier's sub-model (cost of reaching exit "
    "= tier), counted by torch.utils.flop_counter.FlopCounterMode: matmul, conv and attention "
    "products at 2 FLOPs per multiply-add; element-wise ops (norms, activations, softmax, "
    "additions) are not counted"
)


def _forward_flops(model: torch.nn.Module, x: torch.Tensor, reached: list[int] | None = None
                   ) -> tuple[int, dict[str, int]]:
    """Total and per-op FLOPs of one forward pass; with ``reached``, the pass is the exit
    loop and the running total is appended to it at every exit."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if reached is None:
            model(x)
        else:
            model.exit_loop(x, lambda k, logits: reached.append(int(counter.get_total_flops())))
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), dict(sorted(by_op.items()))


def _tier_cost(method: Method, tier: int, img_size: int, device: str) -> dict[str, Any]:
    with torch.device(device):
        model = method.build_model(tier)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                     torch.get_default_dtype())
        x = torch.zeros(1, method.task.in_chans, img_size, img_size, dtype=dtype)
    tensors = model.state_dict(keep_vars=True)
    keys = list(method.trainable_keys(tier))
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise KeyError(f"tier {tier}: trainable keys not in the tier's model: {missing[:5]}")
    numel = sum(tensors[k].numel() for k in keys)
    nbytes = sum(tensors[k].numel() * tensors[k].dtype.itemsize for k in keys)
    if device == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            flops, by_op = _forward_flops(model, x)
    else:
        flops, by_op = _forward_flops(model, x)
    return {
        "tier": tier,
        "exit_block": method.exit_blocks[tier],
        "params_down": numel,
        "params_up": numel,
        "bytes_down": nbytes,
        "bytes_up": nbytes,
        "params_model": sum(p.numel() for p in model.parameters()),
        "share_of_full_model": 0.0,  # set by tier_costs, which knows the deepest tier
        "forward_flops": flops,
        "forward_flops_by_op": by_op,
    }


def tier_costs(method: Method, img_size: int | None = None) -> list[dict[str, Any]]:
    """One dict per tier (shallowest first): ``tier``, ``exit_block``, ``params_down``,
    ``params_up``, ``bytes_down``, ``bytes_up``, ``params_model``, ``forward_flops`` and
    ``forward_flops_by_op`` (see the module docstring for what is and is not counted).

    ``img_size`` defaults to the method's run config. The global torch RNG is left untouched.
    """
    size = int(img_size if img_size is not None else method.cfg.img_size)
    costs = []
    with torch.random.fork_rng(devices=[]):
        for tier in range(method.num_exits):
            try:
                costs.append(_tier_cost(method, tier, size, "meta"))
            except (NotImplementedError, RuntimeError):  # e.g. .item() in a forward
                costs.append(_tier_cost(method, tier, size, "cpu"))
    for cost in costs:
        cost["share_of_full_model"] = cost["params_up"] / costs[-1]["params_model"]
    return costs


def regime_costs(method: Method) -> list[dict[str, Any]]:
    """What every fine-tuning regime would cost ``method``'s run, per tier: one dict per
    (regime, tier) with ``regime``, ``tier``, ``params_trained`` (= sent each way per round),
    ``bytes_per_round_each_way``, ``params_model`` and ``share_of_full_model`` (trained over
    every parameter of the deepest tier's model in that regime). Parameter counts only: the
    models are built on the meta device, nothing runs."""
    from reefl.config import REGIMES
    from reefl.methods import build_method

    rows = []
    for regime in REGIMES:
        other = build_method(dataclasses.replace(method.cfg, regime=regime), method.task)
        full = sum(s.numel() for s in other.tier_shapes(other.num_exits - 1).values())
        for tier in range(other.num_exits):
            shapes = other.tier_shapes(tier)
            trained = sum(shapes[k].numel() for k in other.trainable_keys(tier))
            rows.append({
                "regime": regime, "tier": tier, "params_trained": trained,
                "bytes_per_round_each_way": 4 * trained,  # fp32 payload
                "params_model": sum(s.numel() for s in shapes.values()),
                "share_of_full_model": trained / full,
            })
    return rows


def regime_table(rows: list[dict[str, Any]], current: str | None = None) -> Table:
    """``regime_costs`` as a table: one row per regime, one column per tier, each cell
    "parameters · MB · share": the parameters trained (and sent each way) per round, their
    MB, and their share of the full model; ``current`` marks the run's own regime
    "(this run)"."""
    from reefl.outputs.tables import table

    tiers = sorted({r["tier"] for r in rows})
    body = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        cells = [
            f"{r['params_trained']:,} · {r['bytes_per_round_each_way'] / 1e6:.2f} · "
            f"{100 * r['share_of_full_model']:.2f}%"
            for r in sorted((r for r in rows if r["regime"] == regime), key=lambda r: r["tier"])
        ]
        body.append([f"{regime} (this run)" if regime == current else regime, *cells])
    return table(["regime", *(f"tier {t}" for t in tiers)], body)


def exit_flops(method: Method, img_size: int | None = None) -> list[int]:
    """FLOPs of one image to reach each exit (= ``forward_flops`` of tier k)."""
    return [c["forward_flops"] for c in tier_costs(method, img_size)]


def exit_flops_in(model: torch.nn.Module, in_chans: int, img_size: int) -> list[int]:
    """FLOPs of one image to reach each exit of one ``EarlyExitModel``, counted in one pass
    (the total so far as the exit loop reaches each exit), as ``tier_costs`` counts them:
    on the CPU with the math attention kernel. For a causal method this equals
    ``forward_flops`` of tier k for exit k; for a tier whose exits live in its own model
    (ScaleFL's narrower tiers) it is the cost inside that model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(1, in_chans, img_size, img_size, dtype=dtype)
    reached: list[int] = []
    was_training = model.training
    with sdpa_kernel([SDPBackend.MATH]):
        _forward_flops(model, x, reached)
    model.train(was_training)
    return reached


def accounting_record(method: Method, img_size: int | None = None) -> dict[str, Any]:
    """What ``accounting.json`` holds: the tiers plus what the numbers mean."""
    size = int(img_size if img_size is not None else method.cfg.img_size)
    return {
        "method": method.cfg.method,
        "regime": method.cfg.regime,
        "img_size": size,
        "in_chans": method.task.in_chans,
        "num_classes": method.task.num_classes,
        "exit_blocks": list(method.exit_blocks),
        "note": FLOPS_NOTE,
        "tiers": tier_costs(method, size),
        "regimes": regime_costs(method),
    }


NOT_IN_ACCOUNTING = ("seed", "run-name", "output-dir", "resume", "num-server-rounds",
                     "eval-every", "round-timeout", "roll-call-timeout")
"""Run-config keys that cannot change what ``accounting_record`` counts: left out of its
cache key, so that runs differing only in them share one entry."""


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 over reefl's own source files: a cached count is only reused by the code
    that made it."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def accounting_cache_path(method: Method, img_size: int) -> Path:
    """Where ``cached_accounting_record`` keeps the record of ``method`` at ``img_size``:
    under reefl's cache folder, named by a digest of the run config (less
    ``NOT_IN_ACCOUNTING``), the task, the size, torch's version and reefl's source."""
    from reefl.data.cache import cache_root

    config = {k: v for k, v in method.cfg.identity().items() if k not in NOT_IN_ACCOUNTING}
    key = json.dumps([config, method.task.num_classes, method.task.in_chans, img_size,
                      torch.__version__, _source_digest()], sort_keys=True, default=str)
    return cache_root() / "accounting" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def cached_accounting_record(method: Method, img_size: int | None = None) -> dict[str, Any]:
    """``accounting_record``, counted once per model and kept in reefl's cache (a second
    run of the same model, e.g. another seed, reads it back instead of spending a second
    or more counting FLOPs on the meta device before its first round). Written to a
    temporary file and renamed, so a reader never sees half a record; with a plain file's
    mode (``as_if_opened``), like the rest of the cache."""
    from reefl.outputs.files import atomic_write

    size = int(img_size if img_size is not None else method.cfg.img_size)
    path = accounting_cache_path(method, size)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    record = accounting_record(method, size)
    with contextlib.suppress(OSError), atomic_write(path) as tmp:  # read-only: recount
        tmp.write_text(json.dumps(record))
    return record


def write_accounting(folder_path: Path, method: Method, img_size: int | None = None
                     ) -> list[dict[str, Any]]:
    """Write ``<folder_path>/accounting.json`` (see ``accounting_record``; from the cache
    when this model was counted before) and the regime cost table ``costs.md``; return the
    tiers."""
    from reefl.outputs.tables import markdown

    record = cached_accounting_record(method, img_size)
    Path(folder_path, ACCOUNTING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(regime_table(record["regimes"], current=method.cfg.regime))
    Path(folder_path, REGIME_TABLE_FILE).write_text(
        f"# Cost per round of every fine-tuning regime: {method.cfg.method}, "
        f"{method.num_exits} exits, {method.task.num_classes} classes\n\n"
        "Parameters a client of each tier trains and sends each way per round (fp32), and "
        "their share of the full model (every block and exit, in that regime). Each cell: "
        "parameters · MB each way · share.\n\n"
        f"{table}\n")
    return record["tiers"]


def read_accounting(folder_path: Path) -> list[dict[str, Any]] | None:
    """The tiers of ``<folder_path>/accounting.json``, or None if there is none."""
    path = Path(folder_path, ACCOUNTING_FILE)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["tiers"] if isinstance(data, dict) else data


def costs_from_config(flat: dict[str, Any]) -> list[dict[str, Any]]:
    """Tier costs of a run from its flat config (e.g. a run folder's ``config.json``)."""
    from reefl.config import RunConfig
    from reefl.federation.inputs import source_task
    from reefl.methods import build_method

    cfg = RunConfig.from_flat(flat)
    return tier_costs(build_method(cfg, source_task(cfg)), cfg.img_size)


def human(n: float) -> str:
    """A count in 3–4 significant digits: 950, 52.3k, 1.21M, 4.98G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n:.0f}"


def tier_table(costs: list[dict[str, Any]]) -> Table:
    """``tier_costs`` as a table: one row per tier with its exit's block, the parameters
    sent up and down per round, MB up, the share of the full model and the forward MFLOPs
    of one image."""
    from reefl.outputs.tables import table

    rows = [[str(c["tier"]), str(c.get("exit_block", "")), f"{c['params_up']:,}",
             f"{c['params_down']:,}", f"{c['bytes_up'] / 1e6:.3f}",
             f"{100 * c['share_of_full_model']:.2f}%", f"{c['forward_flops'] / 1e6:.3f}"]
            for c in costs]
    return table(["tier", "block", "params up", "params down", "MB up", "share",
                  "MFLOPs/img"], rows)


def format_tier_table(costs: list[dict[str, Any]]) -> str:
    """``tier_table`` as text (what ``reefl costs`` prints)."""
    from reefl.outputs.tables import text

    return text(tier_table(costs))


def print_costs(cfg: RunConfig, task: TaskSpec) -> None:
    """``reefl costs``: the run config's per-tier table (parameters sent, forward FLOPs to
    each exit), then every regime's trained parameters per tier; counted once per model
    and kept in the cache (``cached_accounting_record``), as a run does."""
    from reefl.methods import build_method
    from reefl.outputs.tables import print_table

    method = build_method(cfg, task)
    record = cached_accounting_record(method)
    print(f"{cfg.method}, {cfg.model} backbone, exits after blocks {method.exit_blocks}, "
          f"{task.num_classes} classes, regime {cfg.regime}: per tier, per round", flush=True)
    print_table(tier_table(record["tiers"]))
    print("\nEvery regime: trained parameters · MB sent each way per round · share of the "
          "full model", flush=True)
    print_table(regime_table(record["regimes"], current=cfg.regime))
