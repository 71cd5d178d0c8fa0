"""The one config mechanism of every sftgo command: typed dataclasses, YAML files, command-line overrides.

A command's options are a (nested) dataclass whose fields carry their help text (:func:`option`).
:func:`load` builds it: defaults <- each ``--config FILE`` in turn <- each override in turn, where an
override is ``a.b=c``, ``--a.b=c`` or ``--a.b c`` (dashes in a key read as underscores:
``--max-length 256`` is ``max_length=256``). In the ``--key value`` form a list option takes every
following word up to the next ``--flag`` or ``key=value`` (``--input a.jsonl b.jsonl``) and a bool
option may stand alone (``--strict``). A ``dict`` option takes nested keys (``scorer_options.tfidf.term=word``)
or one word of pairs (``--columns instruction=Question,output='Best Answer'``);
a field may name a repeatable flag for that (``--scorer-option tfidf.term=word``).

Values on the command line are parsed with ``yaml.safe_load`` (``loss.rho1_rho=null``,
``optim.betas=[0.9,0.95]``) except for string options, which take the text as written
(``data.train=007``) unless quoted (``data.validation="''"`` is empty; so is ``data.validation=``).
Every value is checked against the field's type (``1e-5`` is a float although YAML 1.1 reads it as a
string); list options also take comma-separated text. Unknown keys are errors that name the key,
where it came from and the nearest known key. Every problem is reported, not only the first.

:func:`help_text` and :func:`markdown_reference` print the same keys, types, defaults and help from
the dataclass: ``--help`` and the README tables have one source.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from schemas.shard import atomic_write_text


class ConfigError(ValueError):
    """A bad key or value; the message names the option (and the file it came from)."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, key: str | None = None, factory: Any = None,
           flag: str | None = None) -> Any:
    """A dataclass field with its help text kept beside it.

    ``key``: the YAML / command-line name when the field name cannot be it (``lambda`` is a Python
    keyword: field ``lambda_``, key ``lambda``). ``flag``: a repeatable command-line flag that sets
    one entry of a dict option (``--scorer-option tfidf.term=word``).
    """
    metadata = {"help": help}
    if key is not None:
        metadata["key"] = key
    if flag is not None:
        metadata["flag"] = flag
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Keys and types
# ---------------------------------------------------------------------------------------------


def _key(f: dataclasses.Field) -> str:
    """The YAML / command-line name of a field."""
    return f.metadata.get("key", f.name)


def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """External key -> (field, resolved type) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {_key(f): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every option as (dotted key, field, type), sections expanded, in declaration order."""
    out = []
    for key, (f, tp) in fields_of(cls).items():
        if dataclasses.is_dataclass(tp):
            out.extend(leaves(tp, f"{prefix}{key}."))
        else:
            out.append((prefix + key, f, tp))
    return out


def _all_keys(cls: type) -> list[str]:
    sections = [k for k, (_, tp) in fields_of(cls).items() if dataclasses.is_dataclass(tp)]
    return [k for k, _, _ in leaves(cls)] + sections


def _suggest(cls: type, dotted: str) -> str:
    """' (did you mean X?)' for an unknown key, or ''."""
    keys = _all_keys(cls)
    # A bare name that is some section's key (``lr``: optim.lr) beats a look-alike section name (``lora``).
    close = [k for k in keys if "." not in dotted and "." in k and k.rsplit(".", 1)[-1] == dotted]
    close = close or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not close:
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        if not close:
            names = sorted({k.rsplit(".", 1)[-1] for k in keys})
            near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
            close = [k for k in keys if near and k.rsplit(".", 1)[-1] == near[0]]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def type_name(tp: Any) -> str:
    """A field type as the help shows it (``float | None``, ``list[str]``)."""
    if tp in (str, int, float, bool):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _BadValue(Exception):
    pass


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.strip("()[] ").split(",") if v.strip()]


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (str, int, float, bool, Any, X | None, tuple[...], list[...], dict[...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _BadValue(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        number = _as_float(value, "an integer")
        if not number.is_integer():
            raise _BadValue(f"expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise _BadValue(f"expected a number, got {value!r}")
        return _as_float(value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise _BadValue(f"expected a string, got {value!r} ({type(value).__name__}); quote it")
    if origin is tuple:
        if isinstance(value, str):
            value = _split(value)
        if not isinstance(value, (list, tuple)):
            raise _BadValue(f"expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _BadValue(f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a) for v, a in zip(value, args))
    if origin is list:
        if value is None:
            return []
        if isinstance(value, str):
            value = _split(value)
        if not isinstance(value, (list, tuple)):
            raise _BadValue(f"expected a list, got {value!r}")
        return [coerce(v, args[0]) for v in value]
    if origin is dict:
        if value is None:
            return {}
        if isinstance(value, str) and "=" in value:  # --columns instruction=Question,output=Best Answer
            value = _pairs(value)
        if not isinstance(value, dict):
            raise _BadValue(f"expected a mapping, got {value!r}")
        return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
    raise TypeError(f"config field type {tp!r} is not supported")  # a programming error, not a user one


def _pairs(text: str) -> dict[str, str]:
    """``a=b,c=d`` as ``{"a": "b", "c": "d"}`` (values may be quoted: ``output='Best Answer'``)."""
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise _BadValue(f"expected KEY=VALUE,... got {item.strip()!r} in {text!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _BadValue(f"expected {what}, got {value!r}")


def _apply(obj: Any, mapping: Any, source: str, prefix: str, problems: list[str], root: type,
           origins: dict[str, str] | None = None) -> None:
    """Set the options in ``mapping`` (nested dicts, external keys) on the dataclass ``obj``; each key set is
    recorded in ``origins`` with ``source``."""
    if not isinstance(mapping, dict):
        where = prefix.rstrip(".") or "the file"
        problems.append(f"{source}: {where}: expected a mapping of option: value, got {mapping!r}")
        return
    fields = fields_of(type(obj))
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{source}: unknown key {dotted!r}{_suggest(root, str(dotted))}")
            continue
        f, tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            _apply(getattr(obj, f.name), value, source, dotted + ".", problems, root, origins)
            continue
        try:
            setattr(obj, f.name, coerce(value, tp))
            if origins is not None:
                origins[dotted] = source
        except _BadValue as exc:
            problems.append(f"{source}: {dotted}: {exc} (type {type_name(tp)})")


def _set_dotted(config: Any, dotted: str, raw: Any, source: str, problems: list[str],
                origins: dict[str, str] | None = None) -> None:
    """One command-line override ``dotted=raw``; string options take ``raw`` as written.

    ``raw`` is the text after ``=``, or a list of words (``--input a b``).
    """
    root = type(config)
    obj: Any = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = fields_of(type(obj))
        here = ".".join(parts[: i + 1])
        if part not in fields:
            problems.append(f"{source}: unknown key {dotted!r}{_suggest(root, dotted)}")
            return
        f, tp = fields[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:  # a whole section: optim={lr: 1e-4, eps: 1e-6}
                _apply(getattr(obj, f.name), _parse_value(raw), source, here + ".", problems, root, origins)
                return
            obj = getattr(obj, f.name)
            continue
        if typing.get_origin(tp) is dict and not last:  # scorer_options.tfidf.term=word
            entry = getattr(obj, f.name)
            *path, leaf = parts[i + 1:]
            for name in path:
                entry = entry.setdefault(name, {})
                if not isinstance(entry, dict):
                    problems.append(f"{source}: {dotted}: {here}.{name} is a value, not a mapping")
                    return
            entry[leaf] = _parse_value(raw)
            try:
                setattr(obj, f.name, coerce(getattr(obj, f.name), tp))
            except _BadValue as exc:
                problems.append(f"{source}: {dotted}: {exc} (type {type_name(tp)})")
            return
        if not last:
            problems.append(f"{source}: unknown key {dotted!r}: {here} is an option, not a section")
            return
        if isinstance(raw, list):
            value: Any = raw
        elif typing.get_origin(tp) is dict and "=" in raw:  # KEY=VALUE,... (coerce splits it)
            value = raw
        else:
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            value = raw if tp is str and not quoted else _parse_value(raw)
        try:
            setattr(obj, f.name, coerce(value, tp))
            if origins is not None:
                origins[dotted] = source
        except _BadValue as exc:
            problems.append(f"{source}: {dotted}: {exc} (type {type_name(tp)})")


def _parse_value(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _field_at(cls: type, dotted: str) -> tuple[dataclasses.Field, Any] | None:
    """The field a dotted key names, or None (unknown keys are reported when the override is applied)."""
    for i, part in enumerate(dotted.split(".")):
        found = fields_of(cls).get(part)
        if found is None:
            return None
        if dataclasses.is_dataclass(found[1]):
            cls = found[1]
            continue
        return found if i == dotted.count(".") else None
    return None


def _flags(cls: type) -> dict[str, str]:
    """Repeatable dict-entry flags (``scorer_option``) -> the dotted key of their dict option."""
    return {f.metadata["flag"].replace("-", "_"): dotted for dotted, f, _ in leaves(cls) if "flag" in f.metadata}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def from_dict(cls: type, mapping: dict[str, Any], source: str = "config", what: str = "") -> Any:
    """Defaults overridden by a nested mapping with external keys (what :func:`to_dict` writes)."""
    config = cls()
    problems: list[str] = []
    _apply(config, mapping or {}, source, "", problems, cls)
    if problems:
        raise ConfigError(f"invalid {what + ' ' if what else ''}config:\n  " + "\n  ".join(problems))
    return config


def load(cls: type, argv: list[str] | None, *, what: str, help: Any) -> Any:
    """Defaults <- ``--config FILE`` (repeatable, in order) <- overrides (in order); see the module docstring.

    ``--help`` / ``-h`` prints ``help()`` and exits. Raises ConfigError listing every unknown key and
    badly typed value, each naming its source (file or command line). Values are not range-checked.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = _flags(cls)
    files: list[str] = []
    overrides: list[tuple[str, Any]] = []
    problems: list[str] = []
    origins: dict[str, str] = {}  # dotted key -> the file or command line that set it last

    def takes_value(word: str) -> bool:
        return not word.startswith("--") and "=" not in word

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help())
            raise SystemExit(0)
        if arg.startswith(("--local_rank", "--local-rank")):
            # The deepspeed launcher appends --local_rank=N; the rank also comes from LOCAL_RANK.
            if "=" not in arg and i + 1 < len(argv) and argv[i + 1].isdigit():
                i += 1
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                files.append(arg.split("=", 1)[1])
            elif i + 1 < len(argv):
                i += 1
                files.append(argv[i])
            else:
                problems.append("command line: --config needs a file")
        elif arg.startswith("--") and arg[2:].replace("-", "_") in flags:  # --scorer-option tfidf.term=word
            entry = argv[i + 1] if i + 1 < len(argv) else ""
            name, sep, raw = entry.partition("=")
            if not sep or "." not in name.strip("."):
                problems.append(f"command line: {arg} {entry!r}: expected NAME.KEY=VALUE")
            else:
                overrides.append((f"{flags[arg[2:].replace('-', '_')]}.{name}", raw))
            i += 1
        elif "=" in arg:
            key, raw = arg.split("=", 1)
            overrides.append((key.lstrip("-").replace("-", "_"), raw))
        elif arg.startswith("--") and len(arg) > 2:
            key = arg[2:].replace("-", "_")
            found = _field_at(cls, key)
            tp = found[1] if found else None
            words: list[str] = []
            pairs = typing.get_origin(tp) is dict  # --columns instruction=Question,output=Answer: one word of pairs
            while i + 1 < len(argv) and (takes_value(argv[i + 1]) or pairs and not argv[i + 1].startswith("--")):
                words.append(argv[i + 1])
                i += 1
                if tp is None or typing.get_origin(tp) is not list:
                    break  # one value, except for a list option
            if tp is bool and not words:
                overrides.append((key, "true"))  # --strict
            elif typing.get_origin(tp) is list and words:
                overrides.append((key, [w for word in words for w in _split(word)]))
            elif words:
                overrides.append((key, words[0]))  # --optim.lr 1e-4
            else:
                problems.append(f"command line: {arg} needs a value (see --help)")
        else:
            problems.append(f"command line: {arg!r} is not KEY=VALUE or --config FILE (see --help)")
        i += 1

    config = cls()
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as exc:
            problems.append(f"--config {path}: cannot read ({exc.strerror or exc})")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: not valid YAML ({exc})")
            continue
        _apply(config, loaded if loaded is not None else {}, path, "", problems, cls, origins)
    for key, raw in overrides:
        _set_dotted(config, key, raw, COMMAND_LINE, problems, origins)
    if problems:
        raise ConfigError(f"invalid {what} config:\n  " + "\n  ".join(problems))
    config._origins = origins  # read by origin(): an error about a value names where it was set
    return config


COMMAND_LINE = "command line"


def origin(config: Any, key: str) -> str:
    """Where ``key``'s value of a :func:`load`-ed config was last set, for an error about it: ``on the command
    line``, ``in FILE`` (the last ``--config`` file that set it) or ``by default``."""
    source = getattr(config, "_origins", {}).get(key)
    return "by default" if source is None else "on the command line" if source == COMMAND_LINE else f"in {source}"


# ---------------------------------------------------------------------------------------------
# Help and the README tables
# ---------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def reference(cls: type) -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    """(section, title, [(key, type, default, help)]) from the dataclasses: one source for --help and the README."""
    groups: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {"": []}
    for leaf in leaves(cls):  # top-level options first, then one block per section
        groups.setdefault(leaf[0].split(".", 1)[0] if "." in leaf[0] else "", []).append(leaf)
    sections = []
    for head, members in groups.items():
        if not members:
            continue
        title = fields_of(cls)[head][0].metadata.get("help", "") if head else "run"
        rows = []
        for dotted, f, tp in members:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((dotted, type_name(tp), _shown(default), f.metadata.get("help", "")))
        sections.append((head or "top level", title, rows))
    return sections


def _flag(key: str, metadata: Any) -> str:
    """A top-level key as its command-line flag: ``max_length`` -> ``--max-length``."""
    return "--" + metadata.get("flag", key).replace("_", "-")


def _rows(cls: type, flags: bool) -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    sections = reference(cls)
    if not flags:
        return sections
    metadata = {dotted: f.metadata for dotted, f, _ in leaves(cls)}
    return [(head, title, [(_flag(key, metadata[key]), tp, shown, text) for key, tp, shown, text in rows])
            for head, title, rows in sections]


def help_text(cls: type, usage: list[str], flags: bool = False) -> str:
    """``usage`` lines, then every key with its type, default and description, from the dataclasses.

    ``flags``: show top-level keys as the flags a user types (``--max-length``) rather than keys.
    """
    lines = [*usage, ""]
    sections = _rows(cls, flags)
    width = max(len(row[0]) for _, _, rows in sections for row in rows)
    for head, title, rows in sections:
        if len(sections) > 1:
            lines.append(f"{head}: {title}")
        lines.extend(f"  {key:<{width}}  {tp:<19} = {shown:<24} {text}" for key, tp, shown, text in rows)
    return "\n".join(lines)


def markdown_reference(cls: type, flags: bool = False) -> str:
    """A README configuration table: the same keys, defaults and help as ``--help``.

    ``flags``: a first column with the flag and the YAML key (``--max-length`` (``max_length``)).
    """
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    sections = reference(cls)
    shown_as = dict(zip([k for _, _, rows in sections for k, *_ in rows],
                        [k for _, _, rows in _rows(cls, flags) for k, *_ in rows]))
    for head, title, rows in sections:
        if len(sections) > 1:
            lines.append(f"| **{head}** | | | {title} |")
        for key, tp, shown, text in rows:
            name = f"`{shown_as[key]}` (`{key}`)" if flags else f"`{key}`"
            lines.append(f"| {name} | {tp.replace('|', 'or')} | `{shown}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Saving and printing
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict with the external keys (``lambda``, not ``lambda_``); tuples become lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def format_config(config: Any) -> str:
    """The resolved config as YAML, for logs."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def save_config(config: Any, path: str | os.PathLike, header: str) -> Path:
    """Write the resolved config as YAML after a ``# header`` line (reloadable with ``--config``); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"# {header}\n" + format_config(config))
    return path
