"""How every key of a format users bring is treated: modelled (a scenario field), neutral (accepted and listed,
no memory effect), or not modelled (refused, saying what it changes). The tables live beside each reader
(training_args, deepspeed, peft); a key in none of them stays an unknown key for the schema to refuse."""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sim.errors import ScenarioError


class KeyClass(Enum):
    """What the simulator does with a key a user's file may hold: maps it, accepts it as changing no memory, or
    refuses it as changing memory in a way not modelled."""

    MODELLED = "modelled"
    NEUTRAL = "neutral"
    NOT_MODELLED = "not modelled"


@dataclass(frozen=True, slots=True)
class KeyRule:
    """One key's treatment. `why`: for NEUTRAL why memory does not change, for NOT_MODELLED what it changes;
    `field`: the scenario field a MODELLED key is another name of; `neutral_when`: the values (the tool's default,
    off) at which a NOT_MODELLED key changes nothing and is accepted as neutral."""

    key_class: KeyClass
    why: str = ""
    field: str = ""
    neutral_when: Callable[[Any], bool] | None = None


@dataclass(frozen=True, slots=True)
class IgnoredKey:
    """A key accepted with no memory effect: where it was, its value, and why it changes nothing."""

    path: str
    value: Any
    why: str


def modelled(field: str = "") -> KeyRule:
    """A key the scenario models, under its own name or as another name of `field`."""
    return KeyRule(KeyClass.MODELLED, field=field)


def neutral(why: str) -> KeyRule:
    """A key that changes no device memory the simulator tracks."""
    return KeyRule(KeyClass.NEUTRAL, why)


def not_modelled(why: str, *neutral_values: Any, when: Callable[[Any], bool] | None = None) -> KeyRule:
    """A key that changes memory in a way not modelled; accepted as neutral at `neutral_values` (or `when`)."""
    return KeyRule(KeyClass.NOT_MODELLED, why, neutral_when=when or (lambda value: _among(value, neutral_values)))


def disabled(value: Any) -> bool:
    """Off as DeepSpeed reads a feature section: absent, null, false, empty, or {"enabled": false, ...}."""
    if isinstance(value, dict):
        return not value or value.get("enabled", False) is False
    return value is None or value is False


def _among(value: Any, values: tuple) -> bool:
    """`value` equals one of `values`, a bool only a bool (True == 1 in Python)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)


def classify(mapping: dict, table: dict[str, KeyRule], path: str, where: str = "") -> list[IgnoredKey]:
    """In place: neutral keys are removed and returned, modelled keys under another name renamed to their field
    (both given and different: an error), not-modelled keys refused in one line naming path, value and file;
    keys in no table are left for the schema to refuse as unknown."""
    ignored = []
    for key in list(mapping):
        rule = table.get(key)
        if rule is None:
            continue
        value = mapping[key]
        if rule.key_class is KeyClass.MODELLED:
            if rule.field and rule.field != key:
                if rule.field in mapping and mapping[rule.field] != value:
                    raise ScenarioError(f"{path}.{key}: {value!r} conflicts with {path}.{rule.field} "
                                        f"{mapping[rule.field]!r}{where} (two names of one setting; give one)")
                mapping[rule.field] = mapping.pop(key)
            continue
        if rule.key_class is KeyClass.NOT_MODELLED and not rule.neutral_when(value):
            raise ScenarioError(f"{path}.{key}: {_shown(value)}: not modelled (affects memory: {rule.why}){where}")
        ignored.append(IgnoredKey(f"{path}.{key}", value, rule.why if rule.key_class is KeyClass.NEUTRAL
                                  else "at its default, off"))
        del mapping[key]
    return ignored


def _shown(value: Any) -> str:
    """A value for a one-line message: mappings shortened."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
