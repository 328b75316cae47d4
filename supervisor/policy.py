"""Eviction planning: which loaded models must go so that one more can come in.

Every decision about *who gets unloaded to make room* lives here, as one pure function,
so that it can be reasoned about and tested with plain data and a fake clock. It does no
I/O, reads no clock and knows nothing about processes: the manager describes the world
(the target, the residents, the limits, ``now``), calls :func:`plan_admission`, and then
either retires the victims of the returned :class:`Plan` or turns the :class:`Refusal`
into an HTTP error (409 = waiting will not help, 503 = it will).

The rules, all of which must hold at once with the target counted as resident:

* exclusive groups: no other member of the target's exclusive group stays;
* count caps: ``max_loaded_per_type[target.type]`` and ``max_loaded_models``, least
  recently used first, whatever the priority;
* memory budgets, one per device: on each device (``cpu`` = RAM, ``cuda:N`` = a GPU's
  VRAM) the costs charged to it add up to at most its budget; victims are the lowest
  priority first and never a model of higher priority than the target. Only models that
  hold memory on the device that is short are victims for it: a CPU model is never
  evicted to make VRAM room, and a GPU model only for the RAM it really holds.

Pinned models, models younger than ``min_residency_s`` and models that are loading or
stopping are never victims. Idle models are preferred to busy ones (a busy victim is
drained by the manager, never cut off). The greedy choice is pruned afterwards, so a
plan never evicts a model whose eviction is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

__all__ = [
    "Eviction",
    "EvictionReason",
    "Limits",
    "Plan",
    "Refusal",
    "Resident",
    "ResidentState",
    "Target",
    "plan_admission",
]


class ResidentState(StrEnum):
    """The part of a slot's lifecycle the policy cares about."""

    READY = "ready"
    LOADING = "loading"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Resident:
    """A model that holds a slot (and memory) right now."""

    name: str
    type: str
    group: str | None
    priority: int
    pinned: bool
    cost_bytes: int
    last_used: float
    loaded_at: float
    busy: bool
    state: ResidentState = ResidentState.READY
    #: Memory on devices other than the CPU (``{"cuda:0": vram_bytes}``); ``cost_bytes`` is
    #: what it holds on the CPU.
    device_costs: Mapping[str, int] = field(default_factory=dict)

    def charge(self, device: str) -> int:
        return self.cost_bytes if device == CPU else self.device_costs.get(device, 0)


@dataclass(frozen=True)
class Target:
    """The model that wants to be loaded."""

    name: str
    type: str
    group: str | None
    priority: int
    cost_bytes: int
    device_costs: Mapping[str, int] = field(default_factory=dict)

    def charge(self, device: str) -> int:
        return self.cost_bytes if device == CPU else self.device_costs.get(device, 0)


#: The device whose budget is ``Limits.memory_budget_bytes`` (RAM).
CPU = "cpu"


@dataclass(frozen=True)
class Limits:
    """The rules a set of residents must obey. ``None`` switches a rule off."""

    max_loaded_models: int | None = None
    max_loaded_per_type: Mapping[str, int] = field(default_factory=dict)
    memory_budget_bytes: int | None = None
    exclusive_groups: frozenset[str] = frozenset()
    min_residency_s: float = 0.0
    #: Budgets of the devices other than the CPU (``{"cuda:0": 16 << 30}``).
    device_budgets: Mapping[str, int] = field(default_factory=dict)

    def budgets(self) -> list[tuple[str, int]]:
        """Every device with a budget, the CPU first, then by name."""
        out = [] if self.memory_budget_bytes is None else [(CPU, self.memory_budget_bytes)]
        return out + sorted(self.device_budgets.items())

    def __post_init__(self) -> None:
        # A cap below 1 would make a model type unloadable with nobody to blame, and a
        # refusal must always be explainable; such values are configuration mistakes.
        if self.max_loaded_models is not None and self.max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be at least 1, got {self.max_loaded_models}")
        for kind, cap in self.max_loaded_per_type.items():
            if cap < 1:
                raise ValueError(f"max_loaded_per_type[{kind!r}] must be at least 1, got {cap}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {self.memory_budget_bytes}")
        for device, budget in self.device_budgets.items():
            if device == CPU or budget < 0:
                raise ValueError(f"device_budgets[{device!r}] must be a non-CPU device with a "
                                 f"budget >= 0, got {budget}")
        if self.min_residency_s < 0:
            raise ValueError(f"min_residency_s must be >= 0, got {self.min_residency_s}")


class EvictionReason(StrEnum):
    """Which rule chose a victim; becomes the ``reason`` of ``retire()``."""

    EXCLUSIVE = "exclusive"
    LRU = "lru"
    MEMORY = "memory"


@dataclass(frozen=True)
class Eviction:
    name: str
    reason: EvictionReason


@dataclass(frozen=True)
class Plan:
    """Residents to retire before the target may load, in the order they were chosen."""

    evictions: tuple[Eviction, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """Why the target cannot load.

    ``status`` is 409 when waiting cannot help (pinned models, higher priorities, a target
    larger than the whole budget) and 503 when it can. For a 503, ``wait_for`` names the
    blockers that are loading or stopping (the manager waits for them and plans again) and
    ``retry_after_s`` is set when some blocker is only waiting out ``min_residency_s``.
    ``blocking`` is empty only when the target alone exceeds the memory budget.
    """

    status: int
    message: str
    blocking: tuple[str, ...]
    retry_after_s: float | None = None
    wait_for: tuple[str, ...] = ()


class _Obstacle(Enum):
    """Why a resident cannot be a victim right now."""

    PINNED = "pinned"
    STOPPING = "stopping"
    LOADING = "loading"
    YOUNG = "young"


# Among residents that cannot go now, the order in which waiting frees them: a stopping
# model is leaving anyway, a young one is free once its residency ends, a loading one
# still has its whole residency ahead of it. Pinned models are never freed by waiting.
_TRANSIENT_RANK = {_Obstacle.STOPPING: 1, _Obstacle.YOUNG: 2, _Obstacle.LOADING: 3}

# Sort key of a candidate victim: (wait rank, busy, priority, last_used, name). The name
# makes every choice independent of the order in which residents were passed in.
_Key = tuple[int, bool, int, float, str]
# Maps a resident to its wait rank, or None when it may not be a victim in this pass.
_Rank = Callable[[Resident], int | None]


@dataclass(frozen=True)
class _Pick:
    resident: Resident
    reason: EvictionReason
    rule: str  # the rule that chose it, in words, for refusal messages


@dataclass(frozen=True)
class _Stuck:
    """A rule that cannot be satisfied, with every resident in its way and why."""

    rule: str
    blockers: tuple[tuple[Resident, str], ...]


def plan_admission(
    target: Target, residents: Sequence[Resident], limits: Limits, now: float
) -> Plan | Refusal:
    """Return the victims that make room for ``target``, or explain why there is none."""
    _check_names(target, residents)
    for device, budget in limits.budgets():
        if target.charge(device) > budget:
            return Refusal(
                status=409,
                message=(
                    f"cannot load {target.name!r}: it needs "
                    f"{_fmt_amount(device, target.charge(device))} "
                    f"{'' if device == CPU else f'on {device} '}but "
                    f"{_budget_name(device)} is {_fmt_amount(device, budget)}"
                ),
                blocking=(),
            )

    def now_rank(r: Resident) -> int | None:
        return 0 if _obstacle(r, limits, now) is None else None

    found = _greedy(target, residents, limits, now, now_rank)
    if not isinstance(found, _Stuck):
        kept = _prune(target, residents, limits, found)
        return Plan(tuple(Eviction(p.resident.name, p.reason) for p in kept))

    # No plan today. Would there be one once every loading, stopping or young model has
    # settled? Plan again as if they could go (after every model that can go today, so
    # the fewest possible are named); that decides between 409 and 503, and the models
    # that plan needs but cannot have yet are the ones to wait for. It is an estimate: the
    # plan made after the wait may choose differently (LRU order can change meanwhile).
    def later_rank(r: Resident) -> int | None:
        obstacle = _obstacle(r, limits, now)
        if obstacle is None:
            return 0
        return _TRANSIENT_RANK.get(obstacle)

    eventual = _greedy(target, residents, limits, now, later_rank)
    if isinstance(eventual, _Stuck):
        return _refuse_for_good(target, eventual)
    waits = [p for p in _prune(target, residents, limits, eventual) if now_rank(p.resident) is None]
    if not waits:
        # Cannot happen: a plan made only of models evictable now would have been found
        # above. Fall back to the models that stopped the first attempt.
        return _refuse_for_now(target, [found], limits, now)
    stucks: dict[str, list[tuple[Resident, str]]] = {}
    for p in waits:
        stucks.setdefault(p.rule, []).append((p.resident, _why(p.resident, target, limits, now)))
    return _refuse_for_now(
        target, [_Stuck(rule, tuple(b)) for rule, b in stucks.items()], limits, now
    )


def _check_names(target: Target, residents: Sequence[Resident]) -> None:
    names = [r.name for r in residents]
    if target.name in names:
        raise ValueError(f"target {target.name!r} is already resident")
    if len(set(names)) != len(names):
        raise ValueError(f"resident names are not unique: {sorted(names)}")


def _obstacle(r: Resident, limits: Limits, now: float) -> _Obstacle | None:
    if r.state == ResidentState.STOPPING:
        # Checked before `pinned`: a stopping model is leaving whatever its pin says.
        return _Obstacle.STOPPING
    if r.pinned:
        return _Obstacle.PINNED
    if r.state == ResidentState.LOADING:
        return _Obstacle.LOADING
    if now - r.loaded_at < limits.min_residency_s:
        return _Obstacle.YOUNG
    return None


def _lru_key(r: Resident) -> tuple[bool, int, float, str]:
    return (r.busy, 0, r.last_used, r.name)


def _memory_key(r: Resident) -> tuple[bool, int, float, str]:
    return (r.busy, r.priority, r.last_used, r.name)


def _candidates(
    pool: Iterable[Resident], rank: _Rank, key: Callable[[Resident], tuple[bool, int, float, str]]
) -> list[Resident]:
    """The members of ``pool`` that may be victims, best victim first."""
    scored: list[tuple[_Key, Resident]] = []
    for r in pool:
        wait = rank(r)
        if wait is not None:
            scored.append(((wait, *key(r)), r))
    scored.sort(key=lambda item: item[0])
    return [r for _, r in scored]


def _greedy(
    target: Target, residents: Sequence[Resident], limits: Limits, now: float, rank: _Rank
) -> list[_Pick] | _Stuck:
    """Apply the rules in order, each choosing the victims it needs; or name the blockers."""
    picks: list[_Pick] = []
    gone: set[str] = set()

    def left() -> list[Resident]:
        return [r for r in residents if r.name not in gone]

    def take(r: Resident, reason: EvictionReason, rule: str) -> None:
        picks.append(_Pick(r, reason, rule))
        gone.add(r.name)

    def unmovable(pool: Iterable[Resident]) -> tuple[tuple[Resident, str], ...]:
        return tuple(
            (r, _why(r, target, limits, now))
            for r in sorted(pool, key=lambda r: r.name)
            if rank(r) is None
        )

    group = target.group
    if group is not None and group in limits.exclusive_groups:
        rule = f"group {group!r} is exclusive"
        members = [r for r in left() if r.group == group]
        blockers = unmovable(members)
        if blockers:
            return _Stuck(rule, blockers)
        for r in _candidates(members, rank, _lru_key):
            take(r, EvictionReason.EXCLUSIVE, rule)

    caps: list[tuple[str, int, Callable[[Resident], bool]]] = []
    type_cap = limits.max_loaded_per_type.get(target.type)
    if type_cap is not None:
        caps.append(
            (
                f"max_loaded_per_type[{target.type!r}]={type_cap} is reached",
                type_cap,
                lambda r: r.type == target.type,
            )
        )
    if limits.max_loaded_models is not None:
        caps.append(
            (
                f"max_loaded_models={limits.max_loaded_models} is reached",
                limits.max_loaded_models,
                lambda r: True,
            )
        )
    for rule, cap, counted in caps:
        pool = [r for r in left() if counted(r)]
        need = len(pool) + 1 - cap
        if need <= 0:
            continue
        movable = _candidates(pool, rank, _lru_key)
        if len(movable) < need:
            return _Stuck(rule, unmovable(pool))
        for r in movable[:need]:
            take(r, EvictionReason.LRU, rule)

    for device, budget in limits.budgets():
        # The CPU's budget is checked even for a target that adds nothing to it (an
        # over-full RAM budget is made good at the next admission); another device only
        # when the target needs room there.
        if device != CPU and target.charge(device) == 0:
            continue
        need = target.charge(device)
        used = sum(r.charge(device) for r in left())
        if used + need <= budget:
            continue
        name = _budget_name(device)
        rule = (f"{name}={_fmt_amount(device, budget)} is exceeded "
                f"({_fmt_amount(device, used)} in use + {_fmt_amount(device, need)} needed)")
        # Freeing a model that holds nothing on this device does not help, so it is never
        # chosen. A stopping model is leaving whatever its priority, so it may be counted on.
        pool = [
            r
            for r in left()
            if r.charge(device) > 0
            and (r.priority <= target.priority or r.state == ResidentState.STOPPING)
        ]
        for r in _candidates(pool, rank, _memory_key):
            if used + need <= budget:
                break
            take(r, EvictionReason.MEMORY, rule)
            used -= r.charge(device)
        if used + need > budget:
            rule = (f"{name}={_fmt_amount(device, budget)} is exceeded "
                    f"({_fmt_amount(device, used)} cannot be freed + "
                    f"{_fmt_amount(device, need)} needed)")
            in_the_way = sorted((r for r in left() if r.charge(device) > 0),
                                key=lambda r: r.name)
            return _Stuck(
                rule, tuple((r, _why(r, target, limits, now, memory=True)) for r in in_the_way)
            )
    return picks


def _rules_hold(
    target: Target, residents: Sequence[Resident], limits: Limits, gone: set[str]
) -> bool:
    stay = [r for r in residents if r.name not in gone]
    group = target.group
    if group is not None and group in limits.exclusive_groups:
        if any(r.group == group for r in stay):
            return False
    type_cap = limits.max_loaded_per_type.get(target.type)
    if type_cap is not None and sum(r.type == target.type for r in stay) + 1 > type_cap:
        return False
    if limits.max_loaded_models is not None and len(stay) + 1 > limits.max_loaded_models:
        return False
    for device, budget in limits.budgets():
        if device != CPU and target.charge(device) == 0:
            continue
        if sum(r.charge(device) for r in stay) + target.charge(device) > budget:
            return False
    return True


def _budget_name(device: str) -> str:
    """``memory_budget`` for the CPU (its config key), ``the budget of cuda:0`` otherwise."""
    return "memory_budget" if device == CPU else f"the budget of {device}"


def _prune(
    target: Target, residents: Sequence[Resident], limits: Limits, picks: list[_Pick]
) -> list[_Pick]:
    """Drop every victim the others make unnecessary.

    Greedy choice can over-evict: the LRU rule may take a small model and the memory rule
    then a big one that would have satisfied the cap by itself. Trying the latest choices
    first keeps the earliest (most preferred) ones. One pass is enough: the rules only get
    easier as more models go, so a victim found necessary stays necessary when others are
    dropped later.
    """
    kept = list(picks)
    for pick in reversed(picks):
        if pick.reason is EvictionReason.EXCLUSIVE:
            continue  # always necessary: the group rule names every member
        trial = [p for p in kept if p is not pick]
        if _rules_hold(target, residents, limits, {p.resident.name for p in trial}):
            kept = trial
    return kept


def _why(r: Resident, target: Target, limits: Limits, now: float, *, memory: bool = False) -> str:
    """Why ``r`` is in the way, as a clause that starts with its name.

    For the memory rule a higher priority is the lasting reason (waiting for a young or
    loading model to settle would not make it evictable), unless the model is pinned or
    already on its way out.
    """
    obstacle = _obstacle(r, limits, now)
    if obstacle is _Obstacle.PINNED:
        return f"{r.name!r} is pinned"
    if obstacle is _Obstacle.STOPPING:
        return f"{r.name!r} is still stopping"
    # An evictable model only blocks the memory rule, and only by outranking the target.
    if obstacle is None or (memory and r.priority > target.priority):
        return f"{r.name!r} has priority {r.priority} > {target.priority}"
    if obstacle is _Obstacle.YOUNG:
        left = math.ceil(limits.min_residency_s - (now - r.loaded_at))
        return f"{r.name!r} is within min_residency_s={limits.min_residency_s:g} ({left}s left)"
    return f"{r.name!r} is still loading"


def _message(target: Target, stucks: Sequence[_Stuck]) -> str:
    clauses = (f"{s.rule} and {', '.join(why for _, why in s.blockers)}" for s in stucks)
    return f"cannot load {target.name!r}: {'; '.join(clauses)}"


def _refuse_for_good(target: Target, stuck: _Stuck) -> Refusal:
    return Refusal(409, _message(target, [stuck]), tuple(r.name for r, _ in stuck.blockers))


def _refuse_for_now(
    target: Target, stucks: Sequence[_Stuck], limits: Limits, now: float
) -> Refusal:
    blockers = [r for stuck in stucks for r, _ in stuck.blockers]
    young = [
        limits.min_residency_s - (now - r.loaded_at)
        for r in blockers
        if _obstacle(r, limits, now) is _Obstacle.YOUNG
    ]
    return Refusal(
        status=503,
        message=_message(target, stucks),
        blocking=tuple(r.name for r in blockers),
        # Every named blocker is needed, so the wait ends when the last of them is free.
        retry_after_s=float(max(1, math.ceil(max(young)))) if young else None,
        wait_for=tuple(
            r.name for r in blockers if r.state in (ResidentState.LOADING, ResidentState.STOPPING)
        ),
    )


def _fmt_amount(device: str, n: int) -> str:
    """Bytes, except on a device named ``NODE/RESOURCE`` other than ``NODE/ram``: a Ray
    resource of a cluster node, planned in thousandths of a unit (supervisor/cluster/nodes.py)."""
    _node, slash, resource = device.partition("/")
    if slash and resource != "ram":
        return f"{n / 1000:g} {resource}"
    return _fmt_bytes(n)


def _fmt_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': precise enough for a message, not for accounting."""
    value = float(n)
    units = ("B", "KiB", "MiB", "GiB")
    for unit in units:
        if abs(value) < 1024:
            return f"{value:.1f}".rstrip("0").rstrip(".") + f" {unit}"
        value /= 1024
    return f"{value:.1f}".rstrip("0").rstrip(".") + " TiB"
