"""The one frozen config tree every other part of the supervisor reads.

Settings come from four layers, highest first: CLI flags, ``LEMONADE_*`` environment
variables, ``lemonade.toml`` (plus extra recipe files), and built-in defaults. This module
merges them, validates every value once, and hands out immutable objects, so the rest of the
supervisor never re-parses a string or wonders whether a value was checked. Each error names
the file (or env var, or flag), the key, and what would have been accepted; ``sources``
records which layer set each server-level value, so status output can say why a timeout is
what it is.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from supervisor.config_values import (
    LOG_LEVELS,
    MODEL_NAME_RE,
    ConfigError,
    Parser,
    as_bool,
    as_int,
    as_str,
    duration,
    fail,
    parse_bool,
    parse_budget,
    parse_host,
    parse_log_level,
    parse_max_loaded,
    parse_model_name,
    parse_path,
    parse_port,
    parse_positive_int,
    parse_preload,
    parse_zygotes,
)
from supervisor.cluster_config import parse_cluster, parse_resources
from supervisor.device_config import DeviceBudget, parse_budget_list, parse_device_table
from supervisor.device_config import merge as merge_device_budgets
from supervisor.units import parse_size
from workers import registry
from workers.protocol import BUILTIN_KINDS, MODEL_TYPES

__all__ = [
    "DEFAULT_PRIORITY_BY_TYPE",
    "DEVICE_RE",
    "LOG_LEVELS",
    "MODEL_NAME_RE",
    "ConfigError",
    "FrozenDict",
    "Group",
    "Recipe",
    "Settings",
    "effective_preload",
    "is_loopback_host",
    "known_kinds",
    "load_settings",
]

_K = TypeVar("_K")
_V = TypeVar("_V")


class FrozenDict(dict[_K, _V]):
    """A dict that refuses changes.

    It stays a real dict (not a ``MappingProxyType``) so that msgpack, ``json`` and
    ``dataclasses.asdict`` accept config objects as they are, and so they can be copied.
    """

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = _refuse
    __delitem__ = _refuse
    __ior__ = _refuse
    clear = _refuse
    pop = _refuse
    popitem = _refuse
    setdefault = _refuse
    update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        # The default dict pickling protocol refills the copy item by item, which we refuse.
        return (type(self), (dict(self),))


DEFAULT_PRIORITY_BY_TYPE: Mapping[str, int] = FrozenDict(
    {"llm": 0, "embedding": 1, "tts": 1, "asr": 2}
)
DEVICE_RE = re.compile(r"^(auto|cpu|npu|cuda(:\d+)?)$")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class Group:
    name: str
    exclusive: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str
    type: str
    device: str = "auto"
    idle_timeout_s: float | None = None
    priority: int = 1
    memory_bytes: int | None = None
    #: Expected VRAM on the GPU the model is placed on (until measured); without it a GPU
    #: placement takes ``memory`` as the VRAM estimate.
    vram_bytes: int | None = None
    #: Where ``device = "auto"`` goes when no GPU has room: "cpu" or "none" (refuse).
    fallback: str = "cpu"
    group: str | None = None
    pinned: bool = False
    preload: bool = False
    warmup: bool = False
    max_concurrency: int = 4
    #: Requests that may wait beyond ``max_concurrency``; more get 429 (None: no limit).
    max_queue: int | None = None
    options: Mapping[str, Any] = field(default_factory=FrozenDict)
    #: Ray resources one worker needs on its node (cluster mode only; cluster_config.py).
    resources: Mapping[str, float] = field(default_factory=FrozenDict)
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _freeze(self.options))
        object.__setattr__(self, "resources", _freeze(self.resources))


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    auto_unload_timer_s: float = 300.0
    max_loaded_models: int | None = None
    max_loaded_per_type: Mapping[str, int] = field(default_factory=FrozenDict)
    memory_budget: int | Literal["auto"] | None = "auto"
    #: Budgets of the devices other than the CPU (``[devices."cuda:0"]``, device_config.py).
    devices: Mapping[str, DeviceBudget] = field(default_factory=FrozenDict)
    default_model: str | None = None
    max_parallel_loads: int = 1
    min_residency_s: float = 0.0
    stop_grace_s: float = 10.0
    drain_timeout_s: float = 60.0
    # The phases of a load, each with its own deadline; the error names the one that ran out.
    #: Process start (spawn, or fork from a zygote, and a zygote's own start) to the hello.
    handshake_timeout_s: float = 60.0
    #: The load itself, stall-based: each progress report starts the window again.
    load_timeout_s: float = 120.0
    #: The recipe's warmup call after the load.
    warmup_timeout_s: float = 120.0
    #: Waiting for room: other models' loads and stops to settle before this one may start.
    admission_timeout_s: float = 120.0
    call_timeout_s: float = 600.0
    load_failure_cooldown_s: float = 10.0
    load_failure_cooldown_max_s: float = 300.0
    heartbeat_interval_s: float = 10.0
    #: A worker that leaves a ping unanswered this long is hung and gets killed.
    heartbeat_timeout_s: float = 30.0
    log_level: str = "info"
    api_key: str | None = field(default=None, repr=False)
    preload: tuple[str, ...] = ()
    groups: Mapping[str, Group] = field(default_factory=FrozenDict)
    models: Mapping[str, Recipe] = field(default_factory=FrozenDict)
    #: Where workers keep caches (converted weights, assembled models); made on first use.
    data_dir: str = ".lemonade"
    #: Worker start: "off" (always spawn), "lazy" or "eager" (fork from a per-kind zygote).
    zygotes: str = "lazy"
    #: A zygote with no live worker for this long ends (math.inf = never). Twice the shipped
    #: 5-minute model idle timer: a zygote outlives its last worker long enough for a user
    #: who alternates models to keep fast swaps, and its memory still comes back a few
    #: minutes after everything has unloaded.
    zygote_idle_timeout_s: float = 600.0
    #: One INFO line per request under the ``supervisor.access`` logger.
    access_log: bool = True
    # Slow and greedy clients (slow_clients.py, manager.ensure_ready).
    #: A new connection must send its first request's whole header block within this.
    header_timeout_s: float = 10.0
    #: A request body (JSON, form) must arrive within this; else 408.
    body_timeout_s: float = 60.0
    #: Open connections at most; one more gets a 503 and is closed (None: no cap).
    max_connections: int | None = 512
    #: Requests waiting for a model (a load, a stop, a free slot) across all models; one more
    #: is a 503 with Retry-After (None: no cap).
    max_waiting: int | None = 256
    #: After a GPU worker exits, the next load on that GPU waits at most this long for the
    #: driver to show its memory free (devices.py).
    vram_release_wait_s: float = 5.0
    #: Where models run: None = this machine; "local", "auto" or an address = a Ray cluster
    #: (cluster_config.py, supervisor/cluster/).
    cluster: str | None = None
    config_path: str | None = None
    sources: Mapping[str, str] = field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        for name in ("max_loaded_per_type", "groups", "models", "sources", "devices"):
            object.__setattr__(self, name, FrozenDict(getattr(self, name)))
        object.__setattr__(self, "preload", tuple(self.preload))


@dataclass(frozen=True)
class _ServerKey:
    key: str  # the [server] key, and the CLI dict key
    field: str  # the Settings field
    parse: Parser
    env: str  # the environment variable

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


_ENV = "LEMONADE_"
_SERVER_KEYS: tuple[_ServerKey, ...] = tuple(
    _ServerKey(key, field, parse, env or _ENV + key.upper())
    for key, field, parse, env in (
        ("host", "host", parse_host, ""),
        ("port", "port", parse_port, ""),
        (
            "auto_unload_timer",
            "auto_unload_timer_s",
            duration(zero_means_never=True),
            "LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER",
        ),
        ("max_loaded_models", "max_loaded_models", parse_max_loaded, ""),
        ("memory_budget", "memory_budget", parse_budget, ""),
        ("default_model", "default_model", parse_model_name, ""),
        ("max_parallel_loads", "max_parallel_loads", parse_positive_int, ""),
        ("min_residency", "min_residency_s", duration(), ""),
        ("stop_grace", "stop_grace_s", duration(), ""),
        ("drain_timeout", "drain_timeout_s", duration(), ""),
        ("handshake_timeout", "handshake_timeout_s", duration(positive=True), ""),
        ("load_timeout", "load_timeout_s", duration(positive=True), ""),
        ("warmup_timeout", "warmup_timeout_s", duration(positive=True), ""),
        ("admission_timeout", "admission_timeout_s", duration(positive=True), ""),
        ("call_timeout", "call_timeout_s", duration(positive=True), ""),
        ("load_failure_cooldown", "load_failure_cooldown_s", duration(), ""),
        ("load_failure_cooldown_max", "load_failure_cooldown_max_s", duration(), ""),
        ("heartbeat_interval", "heartbeat_interval_s", duration(positive=True), ""),
        ("heartbeat_timeout", "heartbeat_timeout_s", duration(positive=True), ""),
        ("log_level", "log_level", parse_log_level, ""),
        ("preload", "preload", parse_preload, ""),
        ("data_dir", "data_dir", parse_path, ""),
        ("zygotes", "zygotes", parse_zygotes, ""),
        ("zygote_idle_timeout", "zygote_idle_timeout_s", duration(zero_means_never=True), ""),
        ("access_log", "access_log", parse_bool, ""),
        ("vram_release_wait", "vram_release_wait_s", duration(), ""),
        ("header_timeout", "header_timeout_s", duration(positive=True), ""),
        ("body_timeout", "body_timeout_s", duration(positive=True), ""),
        ("max_connections", "max_connections", parse_max_loaded, ""),
        ("max_waiting", "max_waiting", parse_max_loaded, ""),
        ("cluster", "cluster", parse_cluster, ""),
    )
)
_SERVER_FILE_KEYS = (*(k.key for k in _SERVER_KEYS), "max_loaded_per_type")
_CLI_KEYS = ("config", "recipes", "device_budget", *(k.key for k in _SERVER_KEYS))
_DEVICE_BUDGETS_ENV = "LEMONADE_DEVICE_BUDGETS"
_MODEL_KEYS = tuple(
    "recipe type device fallback idle_timeout priority memory vram group pinned preload warmup "
    "max_concurrency max_queue resources options".split()
)
_GROUP_KEYS = ("exclusive",)
_SERVER_FIELDS = (*(k.field for k in _SERVER_KEYS), "max_loaded_per_type", "api_key")


# --- helpers -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)  # asked on every request, with the same few Host values
def is_loopback_host(host: str) -> bool:
    """True for names that only this machine can reach: localhost, 127.0.0.0/8, ::1."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def known_kinds() -> tuple[str, ...]:
    """Worker kinds a recipe may name: the built-in ones and installed plugins.

    Plugins are found by entry-point name only; their code is not imported here.
    """
    plugins = {ep.name for ep in entry_points(group="lemonade.workers")}
    return tuple(sorted(set(BUILTIN_KINDS) | plugins))


def effective_preload(settings: Settings) -> tuple[str, ...]:
    """Models to load at start: those with ``preload = true`` (in config order), then
    ``settings.preload``, each once."""
    names = [name for name, recipe in settings.models.items() if recipe.preload]
    names.extend(name for name in settings.preload if name not in names)
    return tuple(names)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(where, "a table", value)
    return value


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def _read_toml(path: Path, named_by: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (named by {named_by})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _check_option_values(value: Any, where: str) -> None:
    # TOML dates and times cannot cross the msgpack wire to the worker.
    if isinstance(value, datetime | date | time):
        fail(where, "a string, number, boolean, array or table (not a date/time)", value)
    if isinstance(value, dict):
        for key, item in value.items():
            _check_option_values(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_option_values(item, f"{where}[{index}]")


def _model_type(table: Mapping[str, Any], options: Mapping[str, Any], kind: str, at: str) -> str:
    allowed = ", ".join(MODEL_TYPES)
    if "type" in table:
        type_, where = table["type"], f"{at} type"
    elif isinstance(options.get("type"), str):
        type_, where = options["type"], f"{at} options.type"
    else:
        type_ = BUILTIN_KINDS.get(kind)
        if type_ is None:
            raise ConfigError(
                f"{at}: recipe {kind!r} has no default model type; set type = one of {allowed}"
            )
        where = f"{at} recipe"
    if type_ not in MODEL_TYPES:
        fail(where, f"a model type: one of {allowed}", type_)
    return str(type_)


def _check_recipe_options(kind: str, options: Mapping[str, Any], at: str) -> None:
    """Check the options against the kind's declared spec, so a typo fails the start, not
    the first request. A plugin kind that declares no spec is left to its own ``load``."""
    try:
        spec = registry.option_spec(kind)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{at} recipe: the option spec of worker kind {kind!r} cannot be "
                          f"loaded: {type(exc).__name__}: {exc}") from None
    if spec is None:
        return
    problem = spec.problem(options)
    if problem is not None:
        raise ConfigError(f"{at} options: {problem}")


def _parse_model(name: str, raw: Any, path: str, kinds: Callable[[], tuple[str, ...]]) -> Recipe:
    at = f"{path}: [models.{name}]"
    if not MODEL_NAME_RE.match(name):
        fail(at, f"a model name matching {MODEL_NAME_RE.pattern}", name)
    table = _table(raw, at)
    _check_keys(table, _MODEL_KEYS, at)

    if "recipe" not in table:
        raise ConfigError(
            f"{at}: missing required key 'recipe' (the worker kind; one of {', '.join(kinds())})"
        )
    kind = as_str(table["recipe"], f"{at} recipe", "a worker kind name")
    if kind not in kinds():
        raise ConfigError(
            f"{at} recipe: unknown worker kind {kind!r}; known kinds: {', '.join(kinds())}"
        )

    options = _table(table.get("options", {}), f"{at} options")
    _check_option_values(options, f"{at} options")
    _check_recipe_options(kind, options, at)
    type_ = _model_type(table, options, kind, at)

    device = table.get("device", "auto")
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        fail(f"{at} device", "auto, cpu, cuda, cuda:N or npu", device)

    idle_timeout_s = None
    if "idle_timeout" in table:
        idle_timeout_s = duration(zero_means_never=True)(
            table["idle_timeout"], f"{at} idle_timeout", False
        )

    priority = DEFAULT_PRIORITY_BY_TYPE.get(type_, 1)
    if "priority" in table:
        priority = as_int(table["priority"], f"{at} priority", False, "an integer")

    memory_bytes = None
    if "memory" in table:
        try:
            memory_bytes = parse_size(table["memory"], where=f"{at} memory")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    vram_bytes = None
    if "vram" in table:
        try:
            vram_bytes = parse_size(table["vram"], where=f"{at} vram")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    fallback = table.get("fallback", "cpu")
    if fallback not in ("cpu", "none"):
        fail(f"{at} fallback", '"cpu" (run on the CPU when no GPU has room) or "none"', fallback)
    if fallback == "cpu" and device.startswith("cuda") and "fallback" in table:
        raise ConfigError(f"{at} fallback: a model with device = {device!r} stays on the GPU; "
                          f"fallback applies to device = \"auto\" only")

    group = None
    if "group" in table:
        group = as_str(table["group"], f"{at} group", "the name of a [groups.NAME] table")

    max_concurrency = 4
    if "max_concurrency" in table:
        max_concurrency = parse_positive_int(
            table["max_concurrency"], f"{at} max_concurrency", False
        )

    max_queue = None
    if "max_queue" in table:
        max_queue = as_int(table["max_queue"], f"{at} max_queue", False, "an integer >= 0")
        if max_queue < 0:
            fail(f"{at} max_queue", "an integer >= 0", table["max_queue"])

    return Recipe(
        name=name,
        kind=kind,
        type=type_,
        device=device,
        idle_timeout_s=idle_timeout_s,
        priority=priority,
        memory_bytes=memory_bytes,
        vram_bytes=vram_bytes,
        fallback=str(fallback),
        group=group,
        pinned=as_bool(table.get("pinned", False), f"{at} pinned"),
        preload=as_bool(table.get("preload", False), f"{at} preload"),
        warmup=as_bool(table.get("warmup", False), f"{at} warmup"),
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        options=options,
        resources=parse_resources(table["resources"], at) if "resources" in table else {},
        source=path,
    )


def _parse_per_type(value: Any, where: str) -> dict[str, int]:
    table = _table(value, where)
    _check_keys(table, MODEL_TYPES, where)
    return {
        type_: parse_positive_int(count, f"{where}.{type_}", False)
        for type_, count in table.items()
    }


class _Builder:
    """Collects values layer by layer, remembering where each one came from."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = dict.fromkeys(_SERVER_FIELDS, "default")
        # Where each value was set, in the form error messages use ("x.toml: [server] key").
        self.where: dict[str, str] = {}
        self.groups: dict[str, Group] = {}
        self.models: dict[str, Recipe] = {}
        self.devices: dict[str, DeviceBudget] = {}
        self._defined_in: dict[tuple[str, str], str] = {}

    def set(self, name: str, value: Any, source: str, where: str) -> None:
        self.values[name] = value
        self.sources[name] = source
        self.where[name] = where

    def add_file(
        self,
        path: str,
        data: dict[str, Any],
        *,
        is_recipe_file: bool,
        kinds: Callable[[], tuple[str, ...]],
    ) -> None:
        sections = (("groups", "models") if is_recipe_file
                    else ("server", "devices", "groups", "models"))
        if is_recipe_file and "server" in data:
            raise ConfigError(
                f"{path}: a recipe file may only hold [models.*] and [groups.*] tables; "
                "move [server] to the main config file"
            )
        for key in data:
            if key not in sections:
                raise ConfigError(
                    f"{path}: unknown top-level key {key!r}; allowed: "
                    + ", ".join(f"[{s}]" for s in sections)
                )
        if "server" in data:
            self._add_server(path, _table(data["server"], f"{path}: [server]"))
        for name, raw in _table(data.get("devices", {}), f"{path}: [devices]").items():
            self.devices[name] = parse_device_table(name, raw, path)
        for name, raw in _table(data.get("groups", {}), f"{path}: [groups]").items():
            self._define("group", name, path)
            at = f"{path}: [groups.{name}]"
            if not MODEL_NAME_RE.match(name):
                fail(at, f"a group name matching {MODEL_NAME_RE.pattern}", name)
            table = _table(raw, at)
            _check_keys(table, _GROUP_KEYS, at)
            exclusive = as_bool(table.get("exclusive", False), f"{at} exclusive")
            self.groups[name] = Group(name=name, exclusive=exclusive)
        for name, raw in _table(data.get("models", {}), f"{path}: [models]").items():
            self._define("model", name, path)
            self.models[name] = _parse_model(name, raw, path, kinds)

    def _define(self, what: str, name: str, path: str) -> None:
        first = self._defined_in.get((what, name))
        if first is not None:
            raise ConfigError(f"{what} {name!r} is defined twice: in {first} and in {path}")
        self._defined_in[(what, name)] = path

    def _add_server(self, path: str, table: dict[str, Any]) -> None:
        where = f"{path}: [server]"
        if "api_key" in table:
            raise ConfigError(
                f"{where} api_key: the API key is not read from files; "
                "set the LEMONADE_API_KEY environment variable instead"
            )
        _check_keys(table, _SERVER_FILE_KEYS, where)
        for key in _SERVER_KEYS:
            if key.key in table:
                at = f"{where} {key.key}"
                self.set(key.field, key.parse(table[key.key], at, False), f"file {path}", at)
        if "max_loaded_per_type" in table:
            at = f"{where} max_loaded_per_type"
            per_type = _parse_per_type(table["max_loaded_per_type"], at)
            self.set("max_loaded_per_type", per_type, f"file {path}", at)


def _given(value: Any) -> bool:
    # click hands `multiple=True` options over as () when the flag was not used.
    return value is not None and value != () and value != []


def _find_config(
    cli: Mapping[str, Any], env: Mapping[str, str], cwd: Path
) -> tuple[Path | None, str]:
    if "config" in cli:
        return cwd / str(cli["config"]), "--config"
    if "LEMONADE_CONFIG" in env:
        return cwd / env["LEMONADE_CONFIG"], "env LEMONADE_CONFIG"
    default = cwd / "lemonade.toml"
    if default.is_file():
        return default, "the working directory"
    return None, ""


def _recipe_paths(
    cli: Mapping[str, Any], env: Mapping[str, str], cwd: Path
) -> list[tuple[Path, str]]:
    if "recipes" in cli:
        raw = cli["recipes"]
        items = [raw] if isinstance(raw, str | os.PathLike) else list(raw)
        return [(cwd / str(item), "--recipes") for item in items]
    if "LEMONADE_RECIPES" in env:
        parts = env["LEMONADE_RECIPES"].split(os.pathsep)
        return [(cwd / part, "env LEMONADE_RECIPES") for part in parts if part]
    return []


def _cross_check(b: _Builder) -> None:
    def where(name: str) -> str:
        return b.where.get(name, name)

    configured = ", ".join(b.models) or "none"
    default_model = b.values.get("default_model")
    if default_model is not None and default_model not in b.models:
        raise ConfigError(
            f"{where('default_model')}: {default_model!r} is not a configured model; "
            f"configured models: {configured}"
        )
    for name in b.values.get("preload", ()):
        if name not in b.models:
            raise ConfigError(
                f"{where('preload')}: {name!r} is not a configured model; "
                f"configured models: {configured}"
            )
    for recipe in b.models.values():
        if recipe.group is not None and recipe.group not in b.groups:
            defined = ", ".join(b.groups) or "none"
            raise ConfigError(
                f"{recipe.source}: [models.{recipe.name}] group: no group {recipe.group!r}; "
                f"add a [groups.{recipe.group}] table (defined groups: {defined})"
            )
    cooldown = b.values.get("load_failure_cooldown_s", Settings.load_failure_cooldown_s)
    cooldown_max = b.values.get("load_failure_cooldown_max_s", Settings.load_failure_cooldown_max_s)
    if cooldown_max < cooldown:
        raise ConfigError(
            f"{where('load_failure_cooldown_max_s')}: load_failure_cooldown_max "
            f"({cooldown_max:g}s) must be at least load_failure_cooldown ({cooldown:g}s)"
        )
    host = b.values.get("host", Settings.host)
    if not is_loopback_host(host) and not b.values.get("api_key"):
        raise ConfigError(
            f"{where('host')}: binding to {host} exposes the server to the network; "
            "set LEMONADE_API_KEY (or bind 127.0.0.1)"
        )


def _anchor_data_dir(b: _Builder, config_path: Path | None, cwd: Path) -> None:
    """Make ``data_dir`` absolute: a file's relative path is taken from that file's folder.

    The default, ``.lemonade``, sits next to the config file (or in the working directory
    when there is none), so caches stay with the project rather than in the user's home.
    """
    raw = Path(b.values.get("data_dir", Settings.data_dir)).expanduser()
    source = b.sources["data_dir"]
    if raw.is_absolute():
        path = raw
    elif source.startswith("file "):
        path = Path(source.removeprefix("file ")).parent / raw
    elif source == "default" and config_path is not None:
        path = config_path.parent / raw
    else:  # env, CLI, or no config file: the working directory
        path = cwd / raw
    b.values["data_dir"] = str(path.resolve())


def load_settings(
    *,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Settings:
    """Build the Settings from defaults < config file (+ recipe files) < env < CLI.

    ``cli`` maps option names (``port``, ``auto_unload_timer``, ``config``, ``recipes``, ...,
    i.e. the ``[server]`` keys) to raw values; None or an empty list means "not given".
    ``env`` defaults to ``os.environ``; an empty value counts as unset. Relative paths are
    taken from ``cwd`` (default: the process's working directory).
    Raises ConfigError with a message fit to show the user.
    """
    cli_given = {k: v for k, v in (cli or {}).items() if _given(v)}
    env_given = {k: v for k, v in (os.environ if env is None else env).items() if v != ""}
    base = Path.cwd() if cwd is None else Path(cwd)

    if "api_key" in cli_given:
        raise ConfigError(
            "--api-key: the API key is never taken from the command line (other users can "
            "read it); set the LEMONADE_API_KEY environment variable instead"
        )
    for name in cli_given:
        if name not in _CLI_KEYS:
            raise ConfigError(
                f"--{name.replace('_', '-')}: unknown option; known options: "
                + ", ".join(_CLI_KEYS)
            )

    kinds_cache: list[tuple[str, ...]] = []

    def kinds() -> tuple[str, ...]:
        # Scanning entry points costs a little; do it at most once, and only if needed.
        if not kinds_cache:
            kinds_cache.append(known_kinds())
        return kinds_cache[0]

    builder = _Builder()
    config_path, named_by = _find_config(cli_given, env_given, base)
    if config_path is not None:
        data = _read_toml(config_path, named_by)
        builder.add_file(str(config_path), data, is_recipe_file=False, kinds=kinds)
    for path, named in _recipe_paths(cli_given, env_given, base):
        builder.add_file(str(path), _read_toml(path, named), is_recipe_file=True, kinds=kinds)

    for key in _SERVER_KEYS:
        if key.env in env_given:
            where = f"env {key.env}"
            builder.set(key.field, key.parse(env_given[key.env], where, True), where, where)
    if "LEMONADE_API_KEY" in env_given:
        where = "env LEMONADE_API_KEY"
        builder.set("api_key", env_given["LEMONADE_API_KEY"], where, where)
    for key in _SERVER_KEYS:
        if key.key in cli_given:
            where = key.flag
            value = key.parse(cli_given[key.key], where, True)
            builder.set(key.field, value, f"cli {key.flag}", where)

    if _DEVICE_BUDGETS_ENV in env_given:
        where = f"env {_DEVICE_BUDGETS_ENV}"
        builder.devices = merge_device_budgets(
            builder.devices, parse_budget_list(env_given[_DEVICE_BUDGETS_ENV], where))
    if "device_budget" in cli_given:
        builder.devices = merge_device_budgets(
            builder.devices, parse_budget_list(list(cli_given["device_budget"]), "--device-budget"))

    _cross_check(builder)
    _anchor_data_dir(builder, config_path, base)
    return Settings(
        **builder.values,
        devices=builder.devices,
        groups=builder.groups,
        models=builder.models,
        config_path=None if config_path is None else str(config_path),
        sources=builder.sources,
    )
