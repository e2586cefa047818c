"""Dotted ``KEY=VALUE`` overrides on top of a run YAML: ``training.learning_rate=2e-5 distributed.node_rank=1``.

Values are typed as YAML would type them (``2e-5`` float, ``true`` bool, ``[a%50, b]`` list, empty -> null),
merged into the parsed file, then validated together with it, so an override error reads like a file error::

    override 'training.learnig_rate=2e-5': error: [training.learnig_rate] unknown key (hint: did you mean
    'training.learning_rate'?)

Keys are ``section.key``; ``training.extra`` takes deeper keys (``training.extra.optim=adamw_torch``), and so do
sub-sections (``model.lora.r=16``).
"""

from __future__ import annotations

from typing import Any

import yaml

from qwenvl.problems import Problem, did_you_mean
from vlsft.schema import SECRET_FIELDS, SECTIONS, SUBSECTIONS
from vlsft.training_args import SECRET_NAMES
from vlsft.yamlmarks import Mark, Marks, load_value


def parse_override_value(text: str) -> Any:
    """Type an override value the way the YAML file would (``2e-5`` -> float, ``true`` -> bool, ``[a, b]``)."""
    if text.strip() == "":
        return None
    return load_value(text)



def _text_field(section: str, name: str) -> bool:
    """A plain text key (``output.run_name``, ``model.name_or_path``, ...), as opposed to numbers, booleans,
    lists and choices: its override value is taken as typed, so ``output.run_name=no`` stays the text "no"
    (YAML would read a boolean) and ``output.run_name=1e5`` stays "1e5" (not 100000.0)."""
    import typing

    info = SECTIONS[section].model_fields.get(name)
    if info is None:
        return False
    args = set(typing.get_args(info.annotation)) or {info.annotation}
    return str in args and args <= {str, type(None)}


def _secret_key(key: str) -> bool:
    """A key whose value must never be shown: a secret field, a name that reads as a secret (secret, token,
    password, api_key ...), or a misspelling of a secret field (``storage.secret_acces_key``)."""
    from qwenvl.secrets import is_secret_name

    last = key.rsplit(".", 1)[-1].strip().lower()
    secrets = (*SECRET_FIELDS, *SECRET_NAMES)
    return last in secrets or is_secret_name(last) or bool(did_you_mean(last, secrets))


def _known_dotted_keys() -> list[str]:
    return [f"{sec}.{name}" for sec, model in SECTIONS.items() for name in model.model_fields]


def _printable(text: str) -> str:
    """The override as typed, with control characters escaped so every problem stays on one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def apply_overrides(data: dict, marks: Marks, overrides: list[str]) -> list[Problem]:
    problems: list[Problem] = []
    for raw in overrides:
        shown = _printable(raw)
        where = f"override '{shown}'"
        if "=" not in raw:
            problems.append(Problem("error", "expected KEY=VALUE", file=where,
                                    hint="e.g. training.learning_rate=2e-5"))
            continue
        key, _, text = raw.partition("=")
        key = key.strip()
        if _secret_key(key):  # never echo a secret from the command line, a misspelt secret key's value neither
            shown = f"{key}=***"
            where = f"override '{shown}'"
        parts = tuple(key.split("."))
        section = parts[0]
        if section in SECTIONS and len(parts) == 1:
            problems.append(Problem("error", f"'{section}' is a section: set one key at a time", file=where,
                                    key=_printable(key), hint=f"e.g. {section}.{next(iter(SECTIONS[section].model_fields))}=..."
                                    f" (keys: {', '.join(SECTIONS[section].model_fields)})"))
            continue
        if section not in SECTIONS or len(parts) < 2 or any(not p for p in parts):
            hint = did_you_mean(key, _known_dotted_keys()) or did_you_mean(section, SECTIONS)
            problems.append(Problem("error", "unknown key" if section not in SECTIONS else "expected section.key",
                                    file=where, key=_printable(key), hint=hint or "keys look like training.learning_rate"))
            continue
        fields = SECTIONS[section].model_fields
        if parts[1] not in fields:
            problems.append(Problem("error", "unknown key", file=where, key=key,
                                    hint=did_you_mean(key, _known_dotted_keys()) or did_you_mean(parts[1], fields)))
            continue
        if len(parts) > 3 and parts[:2] == ("training", "extra"):
            problems.append(Problem("error", "training.extra takes one level: training.extra.NAME=value", file=where,
                                    key=_printable(key), hint="for a mapping value write "
                                    f"training.extra.{parts[2]}='{{{parts[3]}: ...}}'"))
            continue
        sub = SUBSECTIONS.get(".".join(parts[:2]))  # model.lora.r=16: a key of a sub-section
        if sub is not None and len(parts) == 3 and parts[2] not in sub.model_fields:
            problems.append(Problem("error", "unknown key", file=where, key=_printable(key),
                                    hint=did_you_mean(parts[2], sub.model_fields)
                                    or f"keys: {', '.join(sub.model_fields)}"))
            continue
        if len(parts) > 2 and parts[:2] != ("training", "extra") and not (sub is not None and len(parts) == 3):
            problems.append(Problem("error", f"'{section}.{parts[1]}' has no sub-keys", file=where, key=_printable(key)))
            continue
        stripped = text.strip()
        try:
            if len(parts) == 2 and _text_field(section, parts[1]) and stripped not in ("", "null", "~") \
                    and stripped[0] not in "[{" \
                    and not (len(stripped) > 1 and stripped[0] == stripped[-1] and stripped[0] in "'\""):
                value = stripped
            else:
                value = parse_override_value(text)
        except (yaml.YAMLError, ValueError) as exc:
            what = " ".join(str(getattr(exc, "problem", None) or exc).split())
            problems.append(Problem("error", f"value is not valid YAML: {what}",
                                    file=where, key=_printable(key), hint="quote it: KEY='value'"))
            continue
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            marks.key.setdefault(parts[: i + 1], Mark(None, None, shown))
            node = child
        node[parts[-1]] = value
        for table in (marks.key, marks.value):
            for path in [p for p in table if p[: len(parts)] == parts]:
                del table[path]
        marks.key[parts] = marks.value[parts] = Mark(None, None, shown)
    return problems
