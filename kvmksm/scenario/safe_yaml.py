"""Reading a scenario's YAML so that no file, however broken or hostile, gives a traceback or
takes long: bytes to UTF-8 text, events to nodes (with their lines), then Python values.

The nodes are composed here from the parser's event stream rather than by PyYAML's composer,
so that every limit is checked as the document is read: the size of the file, how deeply it
nests, how many nodes it expands to once aliases are followed (a "billion laughs" file is
small but expands to billions), aliases that refer to the node containing them, tags,
duplicate keys (both lines), and numbers that are not finite or cannot be read. Problems that
leave the document readable are all collected; the others stop reading at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

# A scenario is a few kilobytes; these bounds are far above any real one and keep the worst
# file well under a second to refuse.
MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 10_000  # after following aliases

# libyaml's parser is ten times faster than PyYAML's; both produce the same events.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STD = "tag:yaml.org,2002:"
# Explicit tags a scenario may carry: the plain types. Anything else (!vms, !!python/...,
# !!binary, !!set) is refused rather than silently constructed.
_ALLOWED_TAGS = {_STD + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


@dataclass(order=True)
class Problem:
    """One thing wrong with a file: its line, the dotted path of the field ("" when the
    problem is not in a field), and what was expected."""

    line: int
    path: str
    message: str

    def render(self, filename: str) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{filename}:{self.line}: {where}{self.message}"


class _Stop(Exception):
    """A problem after which the document cannot be read further."""


@dataclass
class _Frame:
    node: SequenceNode | MappingNode
    path: list[Any]
    anchor: str | None
    size: int = 1
    key: Node | None = None  # a mapping's key waiting for its value
    keys: dict[Any, int] = field(default_factory=dict)  # key -> line, for duplicates


@dataclass
class Document:
    """A read document: its root node (for locating fields), its Python value, and every
    problem found. `data` is None when the problems leave nothing to validate."""

    root: Node | None
    data: Any
    problems: list[Problem]


def decode(raw: bytes) -> tuple[str | None, list[Problem]]:
    """UTF-8 text from the bytes of a file, or the line of the first byte that is not."""
    if len(raw) > MAX_BYTES:
        return None, [_too_big(len(raw))]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return None, [
            Problem(
                line,
                "",
                f"expected UTF-8 text, found byte 0x{raw[e.start]:02x} at column {column} "
                "(save the file as UTF-8)",
            )
        ]


def _too_big(n: int) -> Problem:
    return Problem(
        1, "", f"expected a scenario of at most {MAX_BYTES // 1024} KiB, got {n // 1024} KiB"
    )


def read(text: str) -> Document:
    """The document in `text`, with every problem found."""
    if len(text) > MAX_BYTES:  # characters: at least as many bytes
        return Document(None, None, [_too_big(len(text))])
    reader = _Reader()
    try:
        root = reader.compose(text)
    except _Stop:
        return Document(None, None, sorted(reader.problems))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        return Document(None, None, [Problem(line, "", f"invalid YAML: {e.problem}")])
    except yaml.reader.ReaderError as e:
        char = e.character if isinstance(e.character, int) else ord(e.character)
        if _LOADER is yaml.SafeLoader:  # PyYAML counts characters, libyaml bytes
            line = text.count("\n", 0, e.position) + 1
        else:
            line = text.encode("utf-8", "replace").count(b"\n", 0, e.position) + 1
        return Document(
            None,
            None,
            [Problem(line, "", f"expected printable text, found character #x{char:04x}")],
        )
    except yaml.YAMLError as e:  # anything else the parser may raise
        return Document(None, None, [Problem(1, "", f"invalid YAML: {e}")])
    if root is None:
        return Document(None, None, reader.problems)
    try:
        data = SafeConstructor().construct_document(root)
    except yaml.MarkedYAMLError as e:  # e.g. a merge key (<<) given something not a mapping
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        reader.problems.append(Problem(line, "", f"invalid YAML: {e.problem}"))
        data = None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        reader.problems.append(Problem(1, "", f"cannot read the document: {e}"))
        data = None
    return Document(root, data, sorted(reader.problems))


class _Reader:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.resolver = Resolver()
        self.constructor = SafeConstructor()
        self.anchors: dict[str, tuple[Node, int]] = {}  # name -> (node, expanded size)
        self.open: set[str] = set()  # anchors of nodes still being read
        self.stack: list[_Frame] = []
        self.total = 0
        self.aliased = False
        self.root: Node | None = None

    def stop(self, line: int, path: list[Any], message: str) -> None:
        self.problems.append(Problem(line, dotted(path), message))
        raise _Stop

    def compose(self, text: str) -> Node | None:
        documents = 0
        for event in yaml.parse(text, Loader=_LOADER):
            line = event.start_mark.line + 1 if event.start_mark else 1
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    self.stop(line, [], "expected one YAML document, found a second one")
            elif isinstance(event, yaml.ScalarEvent):
                self._scalar(event, line)
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                self._start(event, line)
            elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                frame = self.stack.pop()
                if frame.anchor is not None:
                    self.open.discard(frame.anchor)
                    self.anchors[frame.anchor] = (frame.node, frame.size)
                self._add(frame.node, frame.size, line, new=1)  # children counted already
            elif isinstance(event, yaml.AliasEvent):
                self._alias(event, line)
        if self.root is None and not self.problems:
            return None
        return self.root

    # -- the path of the node being read ---------------------------------------------------
    def _child_path(self) -> list[Any]:
        if not self.stack:
            return []
        top = self.stack[-1]
        if isinstance(top.node, SequenceNode):
            return [*top.path, len(top.node.value)]
        if top.key is None:  # a key is being read: problems belong to the mapping
            return top.path
        return [*top.path, _key_text(top.key)]

    # -- events ------------------------------------------------------------------------------
    def _tag(self, tag: str | None, kind: type, value: Any, implicit: Any, line: int) -> str:
        if tag not in (None, "!") and tag not in _ALLOWED_TAGS:
            self.problems.append(
                Problem(
                    line,
                    dotted(self._child_path()),
                    f"unknown YAML tag '{_show_tag(tag)}' (a scenario is plain YAML: "
                    "remove the tag)",
                )
            )
            tag = None
        if tag in (None, "!"):
            return str(self.resolver.resolve(kind, value, implicit))
        return str(tag)

    def _scalar(self, event: yaml.ScalarEvent, line: int) -> None:
        tag = self._tag(event.tag, ScalarNode, event.value, event.implicit, line)
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        self._check_scalar(node, line)
        if event.anchor is not None:
            self.anchors[event.anchor] = (node, 1)
        self._add(node, 1, line)

    def _start(self, event: Any, line: int) -> None:
        path = self._child_path()
        if len(self.stack) >= MAX_DEPTH:
            self.stop(line, path, f"expected at most {MAX_DEPTH} levels of nesting")
        is_seq = isinstance(event, yaml.SequenceStartEvent)
        kind = SequenceNode if is_seq else MappingNode
        tag = self._tag(event.tag, kind, None, event.implicit, line)
        node = kind(tag, [], event.start_mark, event.end_mark, flow_style=event.flow_style)
        if event.anchor is not None:
            self.open.add(event.anchor)
        self.stack.append(_Frame(node, path, event.anchor))

    def _alias(self, event: yaml.AliasEvent, line: int) -> None:
        path = self._child_path()
        if event.anchor in self.open:
            self.stop(
                line,
                path,
                f"alias *{event.anchor} refers to a node that contains it (a recursive structure)",
            )
        if event.anchor not in self.anchors:
            self.stop(line, path, f"alias *{event.anchor} refers to no anchor &{event.anchor}")
        node, size = self.anchors[event.anchor]
        self.aliased = True
        self._add(node, size, line)

    def _add(self, node: Node, size: int, line: int, new: int | None = None) -> None:
        """Attach a finished node of `size` nodes once expanded; `new` of them are not
        counted yet (all for a scalar or an alias, the node itself for a collection)."""
        self.total += size if new is None else new
        if self.total > MAX_NODES:
            hint = " (aliases of aliases multiply: an alias bomb?)" if self.aliased else ""
            self.stop(
                line,
                self._child_path(),
                f"expected at most {MAX_NODES} values, aliases followed{hint}",
            )
        if not self.stack:
            self.root = node
            return
        top = self.stack[-1]
        top.size += size
        if isinstance(top.node, SequenceNode):
            top.node.value.append(node)
            return
        if top.key is None:
            self._key(top, node, line)
            return
        top.node.value.append((top.key, node))
        top.key = None

    def _key(self, top: _Frame, node: Node, line: int) -> None:
        if not isinstance(node, ScalarNode):
            self.stop(line, top.path, "expected a plain key (a name), got a list or a mapping")
        key = node.value if node.tag != _STD + "merge" else "<<"
        if key in top.keys and key != "<<":
            self.problems.append(
                Problem(
                    line,
                    dotted([*top.path, key]),
                    f"duplicate key (also on line {top.keys[key]})",
                )
            )
        top.keys.setdefault(key, line)
        top.key = node

    def _check_scalar(self, node: ScalarNode, line: int) -> None:
        """Numbers and dates are constructed here, one by one, so that a value that cannot be
        read is reported with its line (and NaN or infinity anywhere is refused)."""
        if node.tag not in (_STD + "float", _STD + "int", _STD + "timestamp"):
            return
        path = dotted(self._child_path())
        try:
            value = self.constructor.construct_object(node)
        except (ValueError, OverflowError, yaml.YAMLError) as e:
            if node.tag == _STD + "int":
                why = "expected a number of at most 4300 digits"
            else:
                why = f"cannot read {short(node.value)}: {_first_line(e)}"
            self.problems.append(Problem(line, path, why))
            node.tag = _STD + "str"  # reported: read it as text so the rest can be checked
            return
        if isinstance(value, float) and not math.isfinite(value):
            self.problems.append(
                Problem(line, path, f"expected a finite number, got {short(node.value)}")
            )


def _show_tag(tag: str | None) -> str:
    text = str(tag)
    return "!!" + text.removeprefix(_STD) if text.startswith(_STD) else text


def _key_text(node: Node) -> Any:
    return node.value if isinstance(node, ScalarNode) else "?"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def dotted(path: list[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def short(value: Any, limit: int = 40) -> str:
    """A value as messages quote it: its repr, cut to about `limit` characters (a number of
    4,000 digits is not worth printing)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
