"""The run config a launch uses: the app's defaults, then a preset, then the user's
overrides (``key=value`` strings and TOML files), merged, completed (absolute
``output-dir``, a fresh ``run-name``) and checked by ``reefl.config`` before anything
starts. ``reefl run``, ``deploy``, ``compare``, ``data``, ``costs`` and ``pretrain`` all take
their config from here; nothing here probes devices or starts a process.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reefl.launch.errors import RunConfigError, one_line
from reefl.outputs.run_folder import (
    CHECKPOINT_FILE,
    CLIENT_STATES_DIR,
    RunFolderError,
    check_resumable,
    holds_run_files,
)

if TYPE_CHECKING:
    from reefl.config import RunConfig

def _read_pyproject(app_dir: Path) -> dict[str, Any] | None:
    """The parsed pyproject.toml of ``app_dir`` if it declares a Flower app, else None."""
    path = app_dir / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    app = data.get("tool", {}).get("flwr", {}).get("app")
    return data if isinstance(app, dict) else None


def _installed_repo_root() -> Path | None:
    """The checkout this module comes from (``<repo>/src/reefl/launch/run_config.py``), if any."""
    here = Path(__file__).resolve()
    return here.parents[3] if here.parents[2].name == "src" else None


def find_app_dir(start: Path | None = None) -> Path:
    """The Flower app to run when ``--app`` is not given.

    The nearest directory from ``start`` (default: cwd) upwards whose pyproject.toml has
    ``[tool.flwr.app]``; else the repository this module was installed from
    (``src/reefl/launch/run_config.py`` -> two levels above ``src/reefl``); else a LaunchError.
    """
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if _read_pyproject(directory) is not None:
            return directory
    repo = _installed_repo_root()
    if repo is not None and _read_pyproject(repo) is not None:
        return repo
    raise RunConfigError(
        f"no Flower app found: no pyproject.toml with [tool.flwr.app] in {start} or its "
        "parents; pass --app DIR"
    )


def resolve_app_dir(app_dir: Path | str | None, cwd: Path | None = None) -> Path:
    """``app_dir`` made absolute and checked, or the discovered default."""
    cwd = cwd or Path.cwd()
    if app_dir is None:
        return find_app_dir(cwd)
    path = (cwd / Path(app_dir).expanduser()).resolve()
    if _read_pyproject(path) is None:
        raise RunConfigError(f"{path} is not a Flower app (no pyproject.toml with [tool.flwr.app])")
    return path


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's flat ``[tool.flwr.app.config]``, as Flower flattens it."""
    from flwr.common.config import flatten_dict

    data = _read_pyproject(app_dir) or {}
    return flatten_dict(data["tool"]["flwr"]["app"].get("config", {}))


# Flower's pattern for one key=value pair. It is local to flwr.common.config.parse_config_args
# (no public name to import); parse_pairs still parses with that function and uses the pattern
# only to find the tokens Flower would silently drop. A test pins it to Flower's source.
FLOWER_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_pairs(text: str, where: str) -> dict[str, Any]:
    """One ``k=v k2=v2`` string parsed exactly like ``flwr run --run-config`` parses it.

    Flower silently drops what its pattern does not match (``key=`` with no value, a stray
    word); here that is a RunConfigError naming the token, prefixed by ``where``. Where
    Flower rejects the whole string ("invalid format"), the error names the first pair it
    cannot read: "<key> must be <its type>; got '<value>'" (prefixed by ``where`` unless
    that is ``--run-config``: run-config keys are named as validation names them).
    """
    from flwr.common.config import parse_config_args

    leftover = FLOWER_PAIR.sub(" ", text).split()
    if leftover:
        token = leftover[0]
        problem = "has no value" if token.endswith("=") else "is not key=value"
        raise RunConfigError(f"{where}: '{token}' {problem} (in '{text}')")
    try:
        return parse_config_args([text])
    except Exception as err:  # ValueError, click.ClickException: Flower's messages
        message = _unreadable_pair(text) or one_line(getattr(err, "message", None) or str(err))
        prefix = "" if where == "--run-config" else f"{where}: "
        raise RunConfigError(prefix + message) from None


def _unreadable_pair(text: str) -> str | None:
    """Why Flower cannot read ``text`` (its pairs, one TOML line each), pair by pair: a key
    that is no TOML key, a value that is no TOML value (in the key's own words), a key given
    twice; None when no single pair explains it."""
    from reefl.config import unparsed_value_problem

    seen: set[str] = set()
    for key, value in FLOWER_PAIR.findall(text):
        try:
            tomllib.loads(f"{key} = 0")
        except tomllib.TOMLDecodeError:
            return f"'{key}' is not a run-config key (in '{key}={value}')"
        try:
            tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError:
            return unparsed_value_problem(key, value)
        if key in seen:
            return f"{key} is given twice in '{text}'"
        seen.add(key)
    return None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` values, in order (later wins): key=value strings (``parse_pairs``)
    and TOML files (presets: their ``base`` resolved).

    Unlike Flower, files and key=value strings may be mixed, and anything in a string that
    is not a ``key=value`` pair is an error, not ignored.
    """
    return parse_overrides_with_origins(overrides)[0]


def parse_overrides_with_origins(overrides: Sequence[str]
                                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """``parse_overrides``, and for every key the TOML file that set it last (keys set by a
    ``key=value`` string are not in it): errors about a key can name its file."""
    from reefl.presets import PresetError, PresetValueError, read_config_file

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for item in (item for item in overrides if item):
        if item.endswith(".toml"):
            try:
                read = read_config_file(Path(item))
            except PresetValueError as err:  # names its key, as validation does
                raise RunConfigError(str(err)) from None
            except PresetError as err:
                raise RunConfigError(f"--run-config: {err}") from None
            values.update(read)
            origins.update(dict.fromkeys(read, item))
        elif "=" not in item:
            raise RunConfigError(f"--run-config '{item}' is neither key=value nor a .toml file")
        else:
            pairs = parse_pairs(item, "--run-config")
            values.update(pairs)
            for key in pairs:
                origins.pop(key, None)
    return values, origins


def with_preset(preset: str | None, overrides: Sequence[str]) -> list[str]:
    """``overrides`` with the file of preset ``preset`` first (so the command line wins)."""
    if not preset:
        return list(overrides)
    from reefl.presets import PresetError, preset_path

    try:
        return [str(preset_path(preset)), *overrides]
    except PresetError as err:
        raise RunConfigError(str(err)) from None


def merge_config(defaults: dict[str, Any], overrides: dict[str, Any],
                 origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Defaults updated with overrides; a key the app does not declare is an error, naming
    the file it came from (``origins``) and the declared key it most resembles."""
    for key in overrides:
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f" in {origins[key]}" if origins and key in origins else ""
            raise RunConfigError(f"unknown run-config key '{key}'{where} (not in the app's "
                                 f"[tool.flwr.app.config]){hint}")
    return {**defaults, **overrides}


def pack_method_options(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``user`` with every key that a method declares but the app's pyproject does not list
    moved into ``method-options`` (Flower accepts only the keys an app declares; a method
    outside the package, or a new one, need not be listed there)."""
    from reefl.config import format_method_options, method_setting_keys, parse_method_options

    if "method-options" not in defaults:
        return user
    declared = method_setting_keys()
    moved = {k: v for k, v in user.items() if k not in defaults and k in declared}
    if not moved:
        return user
    options = {**parse_method_options(str(user.get("method-options", ""))), **moved}
    kept = {k: v for k, v in user.items() if k not in moved}
    return {**kept, "method-options": format_method_options(options)}


def make_run_name(config: dict[str, Any], now: float | None = None) -> str:
    """``<method>-s<seed>-<YYYYmmdd-HHMMSS>``, e.g. ``reefl-s0-20250101-120000``."""
    from reefl.outputs.run_folder import default_run_name

    return default_run_name(config.get("method", "run"), config.get("seed", 0), now)


def _unique_run_name(output_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if that folder already exists."""
    candidate, k = name, 1
    while (output_dir / candidate).exists():
        k += 1
        candidate = f"{name}-{k}"
    return candidate


def is_reefl_app(app_dir: Path) -> bool:
    """Whether the app's components are reefl's (so reefl's validator/report apply)."""
    data = _read_pyproject(app_dir) or {}
    components = data["tool"]["flwr"]["app"].get("components", {})
    return str(components.get("serverapp", "")).startswith("reefl.")


def _validate(merged: dict[str, Any]) -> tuple[str, str]:
    """``reefl.config``'s checks of a merged flat config (``RunConfig.from_flat``), turned
    into the launcher's one-line error; returns the config's ``config_digests`` (today's
    and the legacy one), computed as the ServerApp computes them (over
    ``RunConfig.from_flat(merged).to_flat()``)."""
    from reefl.config import ConfigError, RunConfig
    from reefl.outputs.run_folder import config_digests

    try:
        config = RunConfig.from_flat(merged)
        config.check_machine()  # one batch must fit this machine's memory
        return config_digests(config)
    except ConfigError as err:
        raise RunConfigError(one_line(str(err))) from None


def resolved_config(overrides: Sequence[str], app_dir: Path | str | None = None
                    ) -> RunConfig:
    """The run config ``reefl run`` would use (``prepare_run``'s, so validated the same way;
    RunConfigError otherwise), as a typed object. Starts nothing."""
    from reefl.config import RunConfig  # deferred, as in _validate

    return RunConfig.from_flat(prepare_run(overrides, app_dir).config)


@dataclass
class PreparedRun:
    """Everything decided before Flower starts."""

    app_dir: Path
    config: dict[str, Any]  # merged run config, as the ServerApp will see it
    overrides: dict[str, Any]  # what is sent with `flwr run --run-config`
    federation_overrides: tuple[str, ...]  # the user's --federation-config (a simulation's)
    run_dir: Path
    digest: str | None = None  # config_digest of a reefl run config, as the ServerApp has it
    legacy_digest: str | None = None  # the digest older reefl wrote for it (config_digest)
    warnings: tuple[str, ...] = ()  # to print before the run starts (one line each)

    @property
    def digests(self) -> tuple[str, ...]:
        """The config digests a final.json or checkpoint of this run may hold."""
        return tuple(d for d in (self.digest, self.legacy_digest) if d is not None)


def prepare_run(
    overrides: Sequence[str],
    app_dir: Path | str | None = None,
    federation_overrides: Sequence[str] = (),
    cwd: Path | None = None,
    now: float | None = None,
    existing_ok: bool = False,
) -> PreparedRun:
    """Merge, complete and validate the config; raises RunConfigError. Starts nothing.

    An explicit ``run-name`` whose folder already holds something is an error unless
    ``existing_ok`` (``reefl compare`` decides itself what to do with such a folder).
    """
    cwd = (cwd or Path.cwd()).resolve()
    app = resolve_app_dir(app_dir, cwd)
    values, origins = parse_overrides_with_origins(overrides)
    return _prepare(app, values, federation_overrides, cwd, now, existing_ok, origins)


def prepare_resume(
    run_dir: Path | str,
    app_dir: Path | str | None = None,
    federation_overrides: Sequence[str] = (),
    cwd: Path | None = None,
) -> PreparedRun:
    """The run that continues ``run_dir``: exactly its config.json (the resolved flat config
    the ServerApp wrote) plus ``resume = true``, in the folder where it is now: its
    output-dir and run-name say where a run lives, not what it computes (they are no part
    of ``config_digest``), so a moved folder resumes in its new place (config.json keeps
    the place where the run started). RunConfigError if there is no readable config.json."""
    cwd = (cwd or Path.cwd()).resolve()
    folder = (cwd / Path(run_dir).expanduser()).resolve()
    try:
        stored = json.loads((folder / "config.json").read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise RunConfigError(f"--resume: {folder} has no readable config.json, so it is no run "
                             f"folder ({one_line(str(err))})") from None
    app = resolve_app_dir(app_dir, cwd)
    here = {"output-dir": str(folder.parent), "run-name": folder.name}
    return _prepare(app, {**stored, **here, "resume": True}, federation_overrides, cwd, None,
                    True)


def _started_in(run_dir: Path, app_dir: Path) -> tuple[Path, str] | None:
    """Where ``run_dir``'s config.json says the run started, with the legacy digest of the
    run there, if that is another place; else None."""
    from reefl.config import ConfigError, RunConfig
    from reefl.outputs.run_folder import config_digest

    try:
        stored = json.loads((run_dir / "config.json").read_text())
        started = Path(str(stored["output-dir"])) / str(stored["run-name"])
        if started == run_dir or not is_reefl_app(app_dir):
            return None
        defaults = app_defaults(app_dir)
        merged = {**defaults, **pack_method_options(defaults, stored)}
        return started, config_digest(RunConfig.from_flat(merged), legacy=True)
    except (OSError, ValueError, TypeError, KeyError, ConfigError):
        return None


def _prepare(app: Path, user: dict[str, Any], federation_overrides: Sequence[str], cwd: Path,
             now: float | None, existing_ok: bool, origins: dict[str, str] | None = None
             ) -> PreparedRun:
    """``prepare_run`` once the user's overrides are parsed."""
    defaults = app_defaults(app)
    if is_reefl_app(app):
        user = pack_method_options(defaults, user)
    merged = merge_config(defaults, user, origins)
    sent = dict(user)
    for key in ("output-dir", "run-name"):
        if key not in merged:
            raise RunConfigError(f"the app's [tool.flwr.app.config] has no '{key}' key")
    from reefl.config import ConfigError, check_output_dir  # deferred, as in _validate

    try:
        check_output_dir(str(merged["output-dir"]))  # cwd / "" would be the current folder
    except ConfigError as err:
        where = f" (set in {origins['output-dir']})" if origins and "output-dir" in origins else ""
        raise RunConfigError(f"{err}{where}") from None
    output_dir = (cwd / Path(str(merged["output-dir"])).expanduser()).resolve()
    explicit = str(merged["run-name"]).strip()
    run_name = explicit or _unique_run_name(output_dir, make_run_name(merged, now))
    if "/" in run_name or run_name in (".", ".."):
        raise RunConfigError(f"run-name must be a plain folder name (no '/'); got '{run_name}'")
    if explicit:
        _check_run_folder(output_dir, run_name, existing_ok)
    sent["output-dir"] = merged["output-dir"] = str(output_dir)
    sent["run-name"] = merged["run-name"] = run_name
    try:
        digest, legacy = _validate(merged) if is_reefl_app(app) else (None, None)
    except RunConfigError as err:  # "<key> must be ...": name the file that set the key
        key = str(err).split(" ", 1)[0].split("=", 1)[0]
        if origins and key in origins:
            raise RunConfigError(f"{err} (set in {origins[key]})") from None
        raise
    return PreparedRun(app, merged, sent, tuple(federation_overrides), output_dir / run_name,
                       digest, legacy)


def _check_run_folder(output_dir: Path, run_name: str, existing_ok: bool) -> None:
    """An explicit run-name must not name a folder that already holds something (a run's
    files would be mixed, and the ServerApp refuses it), unless ``existing_ok``."""
    folder = output_dir / run_name
    if existing_ok or not holds_run_files(folder):
        return
    raise RunConfigError(f"run-name '{run_name}': {folder} already exists and is not empty; "
                         f"continue that run with `reefl run --resume {folder}` or choose "
                         "another run-name")


def _accepted(digest: str | Sequence[str] | None) -> tuple[str, ...]:
    return () if digest is None else (digest,) if isinstance(digest, str) else tuple(digest)


def finished_final(run_dir: Path, digest: str | Sequence[str] | None
                   ) -> dict[str, Any] | None:
    """``run_dir``'s final.json if it is there and says it is of the config with ``digest``
    (its ``config_digest``; or one of several, ``PreparedRun.digests``), else None."""
    try:
        final = json.loads((run_dir / "final.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(final, dict) and final.get("config_digest") in _accepted(digest)
    return final if ok else None


def can_resume(run_dir: Path, digest: str | Sequence[str] | None) -> bool:
    """Whether ``run_dir`` holds a checkpoint of a run whose config.json has ``digest`` (or
    one of several). Whether its files are whole is ``prepare_resumable``'s to check."""
    from reefl.config import ConfigError, RunConfig
    from reefl.outputs.run_folder import config_digests

    if not _accepted(digest) or not (run_dir / CHECKPOINT_FILE).is_file():
        return False
    try:
        stored = RunConfig.from_flat(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, ConfigError):
        return False
    return bool(set(config_digests(stored)) & set(_accepted(digest)))



def toml_value(value: Any) -> str:
    """A value as Flower's ``k=v`` parser reads it back (it knows no escapes, so a string
    takes whichever quote kind it does not contain)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"  # TOML literal string
    raise RunConfigError(f"--run-config: a value with both quote kinds is not supported: {text}")


def prepare_resumable(overrides: Sequence[str], run_dir: Path | str,
                      app_dir: Path | str | None = None,
                      federation_overrides: Sequence[str] = ()) -> PreparedRun:
    """``prepare_resume``, after checking that no other run config was asked for, and that
    the folder can be continued: it finished, or it has a checkpoint whose files are whole
    (``run_folder.check_resumable``: the checkpoint, config.json and every client state it
    names, against the digests it recorded; one RunConfigError naming the file if not).
    Then the temporary files a killed write left in the folder are deleted (the run
    stopped: nothing writes there). The warnings of an older checkpoint are in
    ``PreparedRun.warnings``."""
    import dataclasses

    from reefl.outputs.files import remove_orphans

    if any(overrides):
        raise RunConfigError("--resume runs the folder's own config.json; --run-config and "
                             "--preset cannot be given with it (--federation-config can)")
    prepared = prepare_resume(run_dir, app_dir, federation_overrides)
    folder = prepared.run_dir
    if finished_final(folder, prepared.digests) is not None:
        return prepared
    if not (folder / CHECKPOINT_FILE).is_file():
        raise RunConfigError(f"--resume: {folder} has no {CHECKPOINT_FILE} (no "
                             "round was saved), so there is nothing to resume")
    if prepared.digest is None:  # not reefl's app: its checkpoint is its own affair
        return prepared
    try:
        warnings = check_resumable(folder, prepared.digests,
                                   _started_in(folder, prepared.app_dir))
    except RunFolderError as err:
        raise RunConfigError(f"--resume: {err}") from None
    remove_orphans(folder)
    remove_orphans(folder / CLIENT_STATES_DIR)
    return dataclasses.replace(prepared, warnings=tuple(warnings))
