"""A subset of Go's ``text/template``, enough to render Ollama chat templates in Python.

Ollama renders a Modelfile's ``TEMPLATE`` with Go's ``text/template``; this renderer lets
sloth check, without Go or Ollama, that a translated template writes a conversation
exactly as the tokenizer's Jinja chat template does.

Supported: text; actions with ``{{-``/``-}}`` trimming; comments; ``if``/``else if``/
``else``/``end``; ``range`` (with ``$i, $v :=`` and ``else``); ``$x := ...`` and
``$x = ...``; fields (``.Role``, ``$.Messages``, ``(index $.Messages 0).Role``);
string, raw-string, number, ``true``/``false``/``nil`` literals; parenthesised pipelines
and ``|`` pipes; the functions ``and or not eq ne lt le gt ge len index slice print``.
Anything else raises :class:`GoTemplateError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GoTemplateError", "render"]


class GoTemplateError(ValueError):
    """The template uses Go template syntax outside the subset, or fails to render."""


_TOKEN = re.compile(
    r"""(?P<space>\s+)|(?P<string>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)
    |(?P<decl>:=)|(?P<punct>[()|,=])|(?P<number>-?\d+)
    |(?P<var>\$[A-Za-z0-9_]*)|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)""",
    re.X,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'"}


@dataclass
class _Tok:
    kind: str
    text: str
    attached: bool  # no space before it: a field right after ``)`` applies to the group


def _lex(source: str) -> list[_Tok]:
    tokens, pos, spaced = [], 0, True
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise GoTemplateError(f"unsupported syntax in action: {source[pos : pos + 20]!r}")
        pos = match.end()
        if match.lastgroup == "space":
            spaced = True
            continue
        assert match.lastgroup is not None  # every alternative of _TOKEN is a named group
        tokens.append(_Tok(match.lastgroup, match.group(), not spaced))
        spaced = False
    return tokens


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), text[1:-1])


# -- nodes ------------------------------------------------------------------------------------
@dataclass
class _Pipe:
    variables: list[str]
    assign: bool  # ``=`` rather than ``:=``
    commands: list[list[Any]]  # each command: operands (first may be a function name)


@dataclass
class _Node:
    kind: str  # text, action, if, range
    text: str = ""
    pipe: _Pipe | None = None
    body: list[_Node] = field(default_factory=list)
    branches: list[tuple[_Pipe, list[_Node]]] = field(default_factory=list)
    otherwise: list[_Node] = field(default_factory=list)


def _closing(source: str, pos: int) -> int:
    """Offset of the ``}}`` that ends the action starting at ``pos`` (strings skipped)."""
    if source.startswith("/*", pos):
        end = source.find("*/", pos)
        pos = end if end >= 0 else pos
    quote = None
    while pos < len(source):
        char = source[pos]
        if quote:
            if char == "\\" and quote == '"':
                pos += 2
                continue
            if char == quote:
                quote = None
        elif char in '"`':
            quote = char
        elif source.startswith("}}", pos):
            return pos
        pos += 1
    raise GoTemplateError("unclosed action")


class _Parser:
    def __init__(self, source: str) -> None:
        self.items = self._split(source)
        self.pos = 0

    @staticmethod
    def _split(source: str) -> list[tuple[str, str]]:
        """``("text", s)`` and ``("action", inner)`` items, trim markers applied."""
        items: list[tuple[str, str]] = []
        pos = 0
        while True:
            start = source.find("{{", pos)
            if start < 0:
                items.append(("text", source[pos:]))
                return items
            text = source[pos:start]
            inner_start = start + 2
            if source.startswith("- ", inner_start) or source.startswith("-\n", inner_start):
                text = text.rstrip(" \t\r\n")
                inner_start += 1
            close = _closing(source, inner_start)
            inner = source[inner_start:close]
            pos = close + 2
            if inner.endswith(" -") or inner.endswith("\n-"):
                inner = inner[:-1]
                skip = len(source[pos:]) - len(source[pos:].lstrip(" \t\r\n"))
                pos += skip
            items.append(("text", text))
            inner = inner.strip()
            if not (inner.startswith("/*") and inner.endswith("*/")):
                items.append(("action", inner))

    def parse(self, stop: tuple[str, ...] = ()) -> tuple[list[_Node], str]:
        nodes: list[_Node] = []
        while self.pos < len(self.items):
            kind, value = self.items[self.pos]
            self.pos += 1
            if kind == "text":
                if value:
                    nodes.append(_Node("text", text=value))
                continue
            word = value.split(None, 1)[0] if value else ""
            if word in ("end", "else"):
                if word not in stop and not (word == "else" and "else" in stop):
                    raise GoTemplateError(f"unexpected {{{{{value}}}}}")
                return nodes, value
            if word == "if":
                nodes.append(self._if(value[2:]))
            elif word == "range":
                nodes.append(self._range(value[5:]))
            elif word in ("with", "define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"{{{{{word}}}}} is outside the supported subset")
            else:
                nodes.append(_Node("action", pipe=_pipe(value)))
        if stop:
            raise GoTemplateError("missing {{end}}")
        return nodes, ""

    def _if(self, condition: str) -> _Node:
        node = _Node("if")
        pipe = _pipe(condition)
        while True:
            body, closer = self.parse(("end", "else"))
            node.branches.append((pipe, body))
            if closer == "end":
                return node
            rest = closer[4:].strip()
            if rest.startswith("if "):
                pipe = _pipe(rest[3:])
                continue
            node.otherwise, closer = self.parse(("end",))
            return node

    def _range(self, header: str) -> _Node:
        node = _Node("range", pipe=_pipe(header))
        node.body, closer = self.parse(("end", "else"))
        if closer != "end":
            node.otherwise, _ = self.parse(("end",))
        return node


def _pipe(source: str) -> _Pipe:
    tokens = _lex(source)
    variables: list[str] = []
    assign = False
    declared = next((i for i, t in enumerate(tokens) if t.kind == "decl" or t.text == "="), None)
    if declared is not None:
        names = [t for t in tokens[:declared] if t.text != ","]
        if not names or any(t.kind != "var" for t in names):
            raise GoTemplateError(f"bad declaration: {source!r}")
        variables = [t.text for t in names]
        assign = tokens[declared].text == "="
        tokens = tokens[declared + 1 :]
    commands, pos = _commands(tokens, 0, source)
    if pos != len(tokens):
        raise GoTemplateError(f"unexpected ')' in {source!r}")
    return _Pipe(variables, assign, commands)


def _commands(tokens: list[_Tok], pos: int, source: str) -> tuple[list[list[Any]], int]:
    commands: list[list[Any]] = [[]]
    while pos < len(tokens):
        tok = tokens[pos]
        if tok.text == ")":
            break
        if tok.text == "|":
            commands.append([])
            pos += 1
            continue
        operand, pos = _operand(tokens, pos, source)
        commands[-1].append(operand)
    if any(not c for c in commands):
        raise GoTemplateError(f"empty command in {source!r}")
    return commands, pos


def _operand(tokens: list[_Tok], pos: int, source: str) -> tuple[Any, int]:
    tok = tokens[pos]
    pos += 1
    if tok.text == "(":
        inner, pos = _commands(tokens, pos, source)
        if pos >= len(tokens) or tokens[pos].text != ")":
            raise GoTemplateError(f"missing ')' in {source!r}")
        pos += 1
        operand: Any = ("group", _Pipe([], False, inner))
    elif tok.kind in ("string", "raw"):
        operand = ("literal", _unquote(tok.text))
    elif tok.kind == "number":
        operand = ("literal", int(tok.text))
    elif tok.kind == "ident" and tok.text in ("true", "false", "nil"):
        operand = ("literal", {"true": True, "false": False, "nil": None}[tok.text])
    elif tok.kind == "ident":
        if tok.text not in _FUNCTIONS:
            raise GoTemplateError(f"function {tok.text!r} is outside the supported subset")
        operand = ("function", tok.text)
    elif tok.kind == "var":
        name, _, rest = tok.text.partition(".")
        operand = ("var", name, rest.split(".") if rest else [])
    elif tok.kind == "field":
        operand = ("dot", [p for p in tok.text.split(".") if p])
    else:
        raise GoTemplateError(f"unexpected {tok.text!r} in {source!r}")
    if pos < len(tokens) and tokens[pos].kind == "field" and tokens[pos].attached:
        operand = ("chain", operand, [p for p in tokens[pos].text.split(".") if p])
        pos += 1
    return operand, pos


# -- evaluation ---------------------------------------------------------------------------------
def _truth(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


def _field(value: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(value, dict):
            if name not in value:
                raise GoTemplateError(f"no field {name!r}")
            value = value[name]
        elif hasattr(value, name):
            value = getattr(value, name)
        else:
            raise GoTemplateError(f"can't evaluate field {name} in {type(value).__name__}")
    return value


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise GoTemplateError("eq needs at least two arguments")
    return any(first == other for other in others)


def _slice(value: Any, *bounds: int) -> Any:
    if len(bounds) > 2:
        raise GoTemplateError("slice takes at most two indexes here")
    start = bounds[0] if bounds else 0
    stop = bounds[1] if len(bounds) > 1 else len(value)
    if not 0 <= start <= stop <= len(value):
        raise GoTemplateError(f"slice index out of range [{start}:{stop}]")
    return value[start:stop]


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        try:
            value = value[key]
        except (IndexError, KeyError, TypeError):
            raise GoTemplateError(f"index {key!r} out of range") from None
    return value


def _print(*args: Any) -> str:
    return "".join(_text(a) for a in args)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "and": lambda *args: None,  # evaluated by _Renderer.command: they short-circuit
    "or": lambda *args: None,
    "not": lambda value: not _truth(value),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": len,
    "index": _index,
    "slice": _slice,
    "print": _print,
}


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Renderer:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.scopes: list[dict[str, Any]] = [{"$": root}]
        self.out: list[str] = []

    def lookup(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")

    def operand(self, operand: Any, dot: Any) -> Any:
        kind = operand[0]
        if kind == "literal":
            return operand[1]
        if kind == "dot":
            return _field(dot, operand[1])
        if kind == "var":
            return _field(self.lookup(operand[1]), operand[2])
        if kind == "group":
            return self.pipe(operand[1], dot)
        if kind == "chain":
            return _field(self.operand(operand[1], dot), operand[2])
        raise GoTemplateError(f"{operand[1]} is a function, not a value")

    def command(self, command: list[Any], dot: Any, piped: list[Any]) -> Any:
        head = command[0]
        if head[0] != "function":
            if len(command) > 1 or piped:
                raise GoTemplateError("only functions take arguments")
            return self.operand(head, dot)
        name = head[1]
        if name in ("and", "or"):  # short-circuit, as Go 1.18+ does
            value = None
            for arg in [*command[1:]]:
                value = self.operand(arg, dot)
                if _truth(value) != (name == "and"):
                    return value
            return piped[0] if piped else value
        args = [self.operand(arg, dot) for arg in command[1:]] + piped
        return _FUNCTIONS[name](*args)

    def pipe(self, pipe: _Pipe, dot: Any) -> Any:
        value: list[Any] = []
        for command in pipe.commands:
            value = [self.command(command, dot, value)]
        return value[0]

    def declare(self, pipe: _Pipe, value: Any) -> None:
        for name in pipe.variables:
            if pipe.assign:
                self.assign(name, value)
            else:
                self.scopes[-1][name] = value

    def run(self, nodes: list[_Node], dot: Any) -> None:
        for node in nodes:
            if node.kind == "text":
                self.out.append(node.text)
            elif node.kind == "action":
                assert node.pipe is not None  # an action has one
                value = self.pipe(node.pipe, dot)
                if node.pipe.variables:
                    self.declare(node.pipe, value)
                else:
                    self.out.append(_text(value))
            elif node.kind == "if":
                self._if(node, dot)
            else:
                self._range(node, dot)

    def _block(self, nodes: list[_Node], dot: Any) -> None:
        self.scopes.append({})
        try:
            self.run(nodes, dot)
        finally:
            self.scopes.pop()

    def _if(self, node: _Node, dot: Any) -> None:
        for pipe, body in node.branches:
            if _truth(self.pipe(pipe, dot)):
                self._block(body, dot)
                return
        self._block(node.otherwise, dot)

    def _range(self, node: _Node, dot: Any) -> None:
        pipe = node.pipe
        assert pipe is not None  # a range has one
        items = self.pipe(_Pipe([], False, pipe.commands), dot)
        if items is None:
            items = []
        if not isinstance(items, (list, tuple, dict)):
            raise GoTemplateError(f"range over {type(items).__name__}")
        pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items))
        if not pairs:
            self._block(node.otherwise, dot)
            return
        for key, item in pairs:
            self.scopes.append({})
            try:
                if len(pipe.variables) == 1:
                    self.scopes[-1][pipe.variables[0]] = item
                elif len(pipe.variables) == 2:
                    self.scopes[-1][pipe.variables[0]] = key
                    self.scopes[-1][pipe.variables[1]] = item
                self.run(node.body, item)
            finally:
                self.scopes.pop()


def render(template: str, data: Any) -> str:
    """Render Go ``template`` with ``data`` as the dot (dicts stand for Go structs)."""
    nodes, _ = _Parser(template).parse()
    renderer = _Renderer(data)
    renderer.run(nodes, data)
    return "".join(renderer.out)
