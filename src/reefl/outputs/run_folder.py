"""The run folder (config, per-round metrics, final table, model) and the printed table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from reefl.config import RunConfig
    from reefl.outputs.tables import Table


RUN_LOCATION_KEYS = ("output-dir", "run-name")
"""Run-config keys that say where a run lives, not what it computes: a run folder that was
moved is the same run, resumed in its new place."""
RUN_OBSERVER_KEYS = ("tracking",)
"""Run-config keys that say who watches a run, not what it computes (a run with a tracker is
the same run as one without): left out of every digest, the legacy one included."""
RUN_CONTROL_KEYS = ("resume", *RUN_LOCATION_KEYS, *RUN_OBSERVER_KEYS)
"""Run-config keys that say how a run is driven, not what it computes: left out when two
runs' configs are compared (a resumed run, or a moved one, is the same run)."""


def config_digest(cfg: RunConfig, legacy: bool = False) -> str:
    """A short fingerprint of a run config (``RunConfig.identity``) without the
    ``RUN_CONTROL_KEYS``: the first 16 hex digits (64 bits) of its SHA-256. Equal digests,
    same run. Written into final.json and the checkpoint, so a finished or saved run is only
    reused or resumed for the same config. ``legacy``: the digest reefl wrote before the
    run's location (``RUN_LOCATION_KEYS``) was left out of it, which final.json files and
    checkpoints of older runs hold (still accepted, for a folder that was not moved)."""
    import hashlib

    left_out = ("resume", *RUN_OBSERVER_KEYS) if legacy else RUN_CONTROL_KEYS
    kept = {k: v for k, v in cfg.identity().items() if k not in left_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def config_digests(cfg: RunConfig) -> tuple[str, str]:
    """The digests a final.json or checkpoint of ``cfg`` may hold: today's, and the legacy
    one (``config_digest``) of a run in ``cfg``'s location."""
    return config_digest(cfg), config_digest(cfg, legacy=True)


def default_run_name(method: str, seed: int, now: float | None = None) -> str:
    """``<method>-s<seed>-<YYYYmmdd-HHMMSS>``: sortable and readable."""
    return f"{method}-s{seed}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


FLOWER_LOG = "flower.log"
"""Flower's log of the run, which ``reefl run`` writes into the run folder from before the
ServerApp starts: a folder holding only it holds no run yet."""
CHECKPOINT_FILE = "checkpoint.safetensors"  # what the ServerApp saves after every round
CONFIG_FILE = "config.json"
CLIENT_STATES_DIR = "client-states"  # the server's per-client states (federation.client_store)
SEALED_FORMAT = "reefl-checkpoint-3"
"""The checkpoint format that records digests (``federation.checkpoint``): its own, in its
metadata (``files.DIGEST_KEY``), config.json's SHA-256 and the digest of every client state
it names. Formats 1 and 2 (older reefl) recorded none."""
CHECKPOINT_FORMATS = ("reefl-checkpoint-1", "reefl-checkpoint-2", SEALED_FORMAT)


def client_state_name(partition_id: int, server_round: int) -> str:
    """The file name (in CLIENT_STATES_DIR) of ``partition_id``'s state returned in
    ``server_round``."""
    return f"{partition_id}.r{server_round}.safetensors"


def check_resumable(run_dir: Path, digests: tuple[str, ...],
                    moved_from: tuple[Path, str] | None = None) -> list[str]:
    """Check every file a resume of ``run_dir`` reads, without loading a tensor: the
    checkpoint (whole, of a config with one of ``digests``), config.json (the very file the
    run started with) and every client state the checkpoint names (there, whole, the very
    file it recorded). RunFolderError (one line naming the file) if one is not; else the
    warnings to print (a checkpoint of an older reefl, which recorded no digests, is checked
    as far as it can be: structure, config, the client states' presence). ``moved_from``:
    (where config.json says the run was, the legacy digest of the run there), to name it
    when a legacy checkpoint is resumed in another place."""
    from reefl.outputs.files import DIGEST_KEY, DamagedFile, sha256_file, verify_safetensors

    checkpoint = run_dir / CHECKPOINT_FILE
    try:
        metadata, _ = verify_safetensors(checkpoint)
    except DamagedFile as err:
        raise RunFolderError(f"{checkpoint} is damaged: {err}; the run cannot be resumed "
                             "from it") from None
    form = metadata.get("format")
    if form not in CHECKPOINT_FORMATS:
        raise RunFolderError(f"{checkpoint} is damaged or no reefl checkpoint (format "
                             f"{form!r})")
    sealed = form == SEALED_FORMAT
    config = run_dir / CONFIG_FILE
    try:
        index = {int(k): int(v) for k, v in json.loads(metadata.get("client_rounds", "{}")
                                                       ).items()}
        recorded = ({int(k): str(v) for k, v in json.loads(metadata["client_digests"]).items()}
                    if sealed else {})
        if sealed and (DIGEST_KEY not in metadata or "config_sha256" not in metadata):
            raise KeyError(DIGEST_KEY)
    except (ValueError, TypeError, AttributeError, KeyError):
        raise RunFolderError(f"{checkpoint} is damaged: its metadata is not what reefl "
                             "writes") from None
    if sealed and sha256_file(config) != metadata["config_sha256"]:
        raise RunFolderError(f"{config} is not the config the run was saved with (it changed "
                             f"since {CHECKPOINT_FILE} was written); resume needs the run's "
                             "own config.json")
    if metadata.get("config_digest") not in digests:
        if moved_from is not None and metadata.get("config_digest") == moved_from[1]:
            raise RunFolderError(f"{checkpoint} was saved by an older reefl, which tied a run "
                                 f"to its folder: move {run_dir} back to {moved_from[0]} to "
                                 "resume it")
        raise RunFolderError(f"{checkpoint} was saved by a run of another config than {config} "
                             "holds (edited since?); resume with the run folder's own "
                             "config.json")
    for pid, server_round in sorted(index.items()):
        state = run_dir / CLIENT_STATES_DIR / client_state_name(pid, server_round)
        if not state.is_file():
            raise RunFolderError(f"{state} is missing: the checkpoint needs this client "
                                 "state to resume")
        try:
            _, digest = verify_safetensors(state)
        except DamagedFile as err:
            raise RunFolderError(f"{state} is damaged: {err}") from None
        if sealed and recorded.get(pid) != digest:
            raise RunFolderError(f"{state} is not the client state the checkpoint recorded "
                                 "(it changed since)")
    if sealed:
        return []
    return [f"{checkpoint} was saved by an older reefl, without digests: checked for "
            "truncation, its config and its client states' presence only"]


def holds_run_files(path: Path) -> bool:
    """Whether ``path`` exists and is anything but a folder that is empty or holds only
    FLOWER_LOG."""
    return path.exists() and (not path.is_dir()
                              or any(entry.name != FLOWER_LOG for entry in path.iterdir()))


class RunFolderError(Exception):
    """A run folder that cannot be used as asked (one line)."""


class RunFolder:
    """``<output-dir>/<run-name>/`` holding config.json, metrics.jsonl, final.json,
    model.safetensors and the checkpoint. ``create`` starts a new run there (never over an
    old one); ``reopen`` continues one that was interrupted."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path) -> RunFolder:
        """A new, empty run folder; RunFolderError if ``path`` already holds something."""
        if holds_run_files(path):
            raise RunFolderError(
                f"run folder {path} already holds a run: resume it (reefl run --resume "
                f"{path}, or run-config resume=true) or choose another run-name")
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").write_text("")
        return cls(path)

    @classmethod
    def reopen(cls, path: Path, last_round: int) -> RunFolder:
        """The folder of an interrupted run, its metrics.jsonl cut back to the records of
        rounds 1..``last_round`` (those of a round after the checkpoint are redone)."""
        folder = cls(path)
        kept = [r for r in folder.read_metrics() if r.get("round", 0) <= last_round]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        (path / "final.json").unlink(missing_ok=True)
        return folder

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(payload, indent=2) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, in round order."""
        metrics = self.path / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return [json.loads(line) for line in lines if line.strip()]

    def append_metrics(self, record: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as stream:
            stream.write(json.dumps(record) + "\n")

    def save_model(self, state: dict[str, torch.Tensor]) -> None:
        """``model.safetensors``: the final global model (written like the checkpoint)."""
        from reefl.outputs.files import write_atomically

        write_atomically(self.path / "model.safetensors", state)


def final_title(final: dict[str, Any]) -> str:
    """The line over the final table: method, seed, rounds, the ServerApp's training time
    (Flower's start-up is not in it: the launcher says the whole command's time)."""
    from reefl.outputs.tables import plural

    rounds = plural(final.get("rounds_run", final["rounds"]), "round")
    title = (f"{final['method']} · seed {final['seed']} · {rounds} · "
             f"{final['wall_seconds']:.0f} s of training")
    diverged = final.get("diverged")
    return title if not diverged else f"{title} · diverged in round {diverged['round']}"


def final_table(final: dict[str, Any]) -> Table:
    """final.json's per-exit table: every exit's block, test accuracy % and loss, then
    (after a rule) the mean of the exits and their ensemble."""
    from reefl.outputs.tables import table

    rows = zip(final["exit_blocks"], final["exit_accuracy"], final["exit_loss"], strict=True)
    body = [[str(k), str(block), f"{accuracy:.2f}", f"{loss:.3f}"]
            for k, (block, accuracy, loss) in enumerate(rows)]
    summary = [["mean", "", f"{final['mean_accuracy']:.2f}", ""],
               ["ensemble", "", f"{final['ensemble_accuracy']:.2f}", ""]]
    return table(["exit", "block", "accuracy %", "loss"], body + summary,
                 sections=[len(body) - 1], title=final_title(final))


def format_final_table(final: dict[str, Any]) -> str:
    """The per-exit accuracy table printed at the end of a run (``final_table`` as text)."""
    from reefl.outputs.tables import text

    return text(final_table(final))
