"""Load YAML while remembering where every value came from, so errors can name the line.

Besides the plain data, a :class:`Located` keeps, for each path, the line it starts on and, for
plain (unquoted) scalars that YAML 1.1 turned into something other than text, the text as written:
``departement: 036`` is the octal number 30 to PyYAML and Ansible, and a message that only showed
``30`` would leave the user puzzled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, ValidationFailed

PathPart = str | int
YamlPath = tuple[PathPart, ...]

# Past this many nodes a document is an alias bomb, not a farm description.
MAX_NODES = 200_000


def render_path(parts: YamlPath | list[PathPart]) -> str:
    """('etablissements', 2, 'uai') -> 'etablissements[2].uai'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Located:
    """A YAML document as plain data plus the line of each path (1-based)."""

    file: str
    data: Any
    lines: dict[YamlPath, int] = field(default_factory=dict)
    # Plain scalars YAML resolved to a non-string (number, boolean, null, date): text as written.
    written: dict[YamlPath, str] = field(default_factory=dict)
    # Problems found while reading (duplicate keys …): the document is still usable.
    problems: list[Problem] = field(default_factory=list)

    def line(self, parts: YamlPath) -> int | None:
        # Fall back to the nearest enclosing node that has a position.
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return self.lines.get((), None)

    def problem(self, parts: YamlPath, message: str) -> Problem:
        return Problem(self.file, render_path(parts), message, self.line(parts))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader driven node by node, so that duplicate keys and positions can be recorded."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Builder:
    def __init__(self, loader: _StrictLoader, file: str):
        self.loader = loader
        self.file = file
        self.lines: dict[YamlPath, int] = {}
        self.written: dict[YamlPath, str] = {}
        self.problems: list[Problem] = []
        self.count = 0

    def build(self, node: yaml.Node, path: YamlPath, ancestors: frozenset[int]) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig
        self.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in ancestors:
            self.problems.append(Problem(
                self.file, render_path(path), "an alias refers to a node that contains it; "
                "recursive structures are not allowed", node.start_mark.line + 1))
            return None
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, inner)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), inner) for i, item in enumerate(node.value)]
        try:
            value = self.loader.construct_object(node, deep=True)  # type: ignore[no-untyped-call]
        except ValueError as exc:  # e.g. 2024-13-45 matches the date pattern, but is no date
            self.problems.append(Problem(
                self.file, render_path(path), f"{node.value} looks like a date to YAML but is "
                f"not one ({exc}); quote it if it is text", node.start_mark.line + 1))
            return str(node.value)
        if not isinstance(value, str) and isinstance(node, yaml.ScalarNode) and node.style is None:
            self.written[path] = node.value
        return value

    def _mapping(self, node: yaml.MappingNode, path: YamlPath, inner: frozenset[int]) -> Any:
        explicit = sum(1 for k, _ in node.value if k.tag != _MERGE_TAG)
        try:
            self.loader.flatten_mapping(node)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark or node.start_mark
            self.problems.append(Problem(
                self.file, render_path(path), f"invalid merge (<<): {exc.problem}", mark.line + 1))
            return {}
        # flatten_mapping puts merged pairs first; only the mapping's own keys may not repeat,
        # a merged key is meant to be overridden.
        first_own = len(node.value) - explicit
        result: dict[str, Any] = {}
        own: set[str] = set()
        for index, (key_node, value_node) in enumerate(node.value):
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(Problem(
                    self.file, render_path(path),
                    "a key must be a plain name, not a list or a mapping", key_line))
                continue
            # Keys are names: keep them as written (`yes:` stays 'yes', `036:` stays '036').
            key = str(key_node.value)
            kpath = (*path, key)
            if index >= first_own:
                if key in own:
                    self.problems.append(Problem(
                        self.file, render_path(kpath),
                        f"key {key!r} appears twice in the same mapping (line "
                        f"{self.lines.get(kpath, '?')} and line {key_line}); keep one",
                        key_line))
                    continue
                own.add(key)
                self.lines.pop(kpath, None)  # an own key overrides a merged one, and its line
            elif key in result:
                continue
            self.lines[kpath] = key_line
            result[key] = self.build(value_node, kpath, inner)
            self.lines[kpath] = key_line
        return result


class _TooBig(Exception):
    pass


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValidationFailed([Problem(
            name, "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded "
            "(save the file as UTF-8)", line)]) from None


def load_located(path: Path, display: str | None = None, *, strict: bool = True) -> Located:
    """Parse ``path``; a syntax error becomes a located user error, never a traceback.

    With ``strict`` (the default) problems found while reading, such as duplicate keys, raise
    :class:`ValidationFailed`; otherwise they are returned in :attr:`Located.problems`, for a
    caller that goes on validating and reports everything at once.
    """
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValidationFailed([Problem(name, "", "file not found")]) from None
    except IsADirectoryError:
        raise ValidationFailed([Problem(name, "", "is a directory, not a file")]) from None
    except OSError as exc:
        raise ValidationFailed([Problem(name, "", f"cannot read: {exc.strerror}")]) from None
    text = _decode(raw, name)
    try:
        loader = _StrictLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character the YAML reader refuses
        at = exc.position or 0
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1])
        raise ValidationFailed([Problem(
            name, "", f"control character U+{char:04X} is not allowed in YAML (column "
            f"{at - text.rfind(chr(10), 0, at)})", text[:at].count("\n") + 1)]) from None
    builder = _Builder(loader, name)
    try:
        node = loader.get_single_node()
        data = None if node is None else builder.build(node, (), frozenset())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        where = f" (column {mark.column + 1})" if mark else ""
        what = ", ".join(p for p in (exc.context, exc.problem) if p) or "unreadable YAML"
        raise ValidationFailed([
            Problem(name, "", f"YAML syntax error: {what}{where}", line)
        ]) from None
    except yaml.YAMLError as exc:  # e.g. a reader error on a control character
        raise ValidationFailed([Problem(name, "", f"YAML error: {exc}")]) from None
    except _TooBig:
        raise ValidationFailed([Problem(
            name, "", f"more than {MAX_NODES} YAML nodes (alias expansion?); refusing to load",
        )]) from None
    except RecursionError:
        raise ValidationFailed([Problem(name, "", "YAML nested too deeply to load")]) from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]
    if strict and builder.problems:
        raise ValidationFailed(builder.problems)
    return Located(name, data, builder.lines, builder.written, builder.problems)
