"""Load YAML while remembering where every value came from, so errors can name the line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, ValidationFailed

PathPart = str | int


def render_path(parts: tuple[PathPart, ...] | list[PathPart]) -> str:
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
    lines: dict[tuple[PathPart, ...], int] = field(default_factory=dict)

    def line(self, parts: tuple[PathPart, ...]) -> int | None:
        # Fall back to the nearest enclosing node that has a position.
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return self.lines.get((), None)

    def problem(self, parts: tuple[PathPart, ...], message: str) -> Problem:
        return Problem(self.file, render_path(parts), message, self.line(parts))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: a repeated key silently wins otherwise."""


def _construct(node: yaml.Node, loader: _StrictLoader, path: tuple[PathPart, ...],
               lines: dict[tuple[PathPart, ...], int], file: str,
               problems: list[Problem]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                problems.append(Problem(file, render_path(path), f"unsupported key {key!r}",
                                        key_node.start_mark.line + 1))
                continue
            kpath = (*path, str(key))
            if key in result:
                problems.append(Problem(
                    file, render_path(kpath),
                    f"key {key!r} appears twice in the same mapping; keep one",
                    key_node.start_mark.line + 1))
            result[key] = _construct(value_node, loader, kpath, lines, file, problems)
            lines[kpath] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, loader, (*path, i), lines, file, problems)
            for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


def load_located(path: Path, display: str | None = None) -> Located:
    """Parse ``path``; a syntax error becomes a located user error, never a traceback."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ValidationFailed([Problem(name, "", "file not found")]) from exc
    except UnicodeDecodeError as exc:
        raise ValidationFailed([Problem(name, "", f"not UTF-8 text ({exc.reason})")]) from exc
    loader = _StrictLoader(text)
    problems: list[Problem] = []
    try:
        node = loader.get_single_node()
        lines: dict[tuple[PathPart, ...], int] = {}
        data = (
            None if node is None else _construct(node, loader, (), lines, name, problems)
        )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ValidationFailed([
            Problem(name, "", f"YAML syntax error: {exc.problem or exc.context}", line)
        ]) from exc
    finally:
        loader.dispose()
    if problems:
        raise ValidationFailed(problems)
    return Located(name, data, lines)
