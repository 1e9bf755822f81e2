"""SQL calls as keys: one canonical form shared by every SQL driver shim.

The key is the statement (comments stripped, whitespace folded) plus typed parameters plus the
database name; never the server host or port, since replay usually runs elsewhere. The shape
drops the parameters and normalises names that drivers and ORMs generate from process
counters (``__asyncpg_savepoint_3__``, ``__asyncpg_stmt_1a__``, ``sa_savepoint_2``, ``_pg3_0``)::

    >>> call = sql_call("asyncpg", "SELECT * FROM users WHERE id = $1 /* traceparent='00-..' */",
    ...                 (42,), database="app")
    >>> call.identity["statement"]
    'SELECT * FROM users WHERE id = $1'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

from timetracer_otel.codec import to_tree
from timetracer_otel.keys import Call, stable_hash
from timetracer_otel.replay_shims.base import STATE

# --- reading SQL as PostgreSQL's lexer does ---------------------------------------------------

# Where ordinary text ends: a quote, a dollar, a statement's end, whitespace, a comment.
_SPECIAL = re.compile(r"['\"$;\s]|--|/\*")
_SPACES = re.compile(r"\s+")
_QUOTED = {"'": re.compile(r"'(?:[^']|'')*'?"), '"': re.compile(r'"(?:[^"]|"")*"?')}
_ESCAPED = re.compile(r"'(?:[^'\\]|\\.|'')*'?", re.S)  # an E'' string: backslash escapes
# A dollar-quote opening ($$, $tag$); $1 is a parameter, not one.
_DOLLAR = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_WORD = re.compile(r"[^\W\d]\w*")


def _in_word(c: str) -> bool:
    return c.isalnum() or c in "_$"


def lex(sql: str) -> Iterator[tuple[str, int, int]]:
    """``sql`` as ``(kind, start, end)`` pieces: ``quoted`` (a string literal, ``E''`` ones
    with their backslash escapes, a quoted identifier, a dollar-quoted string: each whole, an
    unterminated one to the end), ``comment`` (``--`` to the line's end, ``/* */`` nested as
    PostgreSQL nests them), ``space``, ``;`` and ``text`` (anything else)."""
    i, n = 0, len(sql)
    while i < n:
        m = _SPECIAL.search(sql, i)
        if m is None:
            yield "text", i, n
            return
        j = m.start()
        if j > i:
            yield "text", i, j
        c = sql[j]
        if c == ";":
            yield ";", j, j + 1
            i = j + 1
        elif c.isspace():
            i = _SPACES.match(sql, j).end()  # type: ignore[union-attr]
            yield "space", j, i
        elif c == "-":
            end = sql.find("\n", j)
            i = n if end < 0 else end
            yield "comment", j, i
        elif c == "/":
            depth, i = 1, j + 2
            while depth:
                close = sql.find("*/", i)
                if close < 0:
                    i = n
                    break
                opened = sql.find("/*", i, close)
                depth, i = (depth + 1, opened + 2) if opened >= 0 else (depth - 1, close + 2)
            yield "comment", j, i
        elif c in "'\"":
            escapes = c == "'" and j > 0 and sql[j - 1] in "eE" and not (j > 1 and _in_word(sql[j - 2]))
            i = (_ESCAPED if escapes else _QUOTED[c]).match(sql, j).end()  # type: ignore[union-attr]
            yield "quoted", j, i
        elif not (j > 0 and _in_word(sql[j - 1])) and (tag := _DOLLAR.match(sql, j)) is not None:
            end = sql.find(tag.group(), tag.end())
            i = n if end < 0 else end + len(tag.group())
            yield "quoted", j, i
        else:  # a parameter ($1), or a dollar inside a name
            i = j + 1
            yield "text", j, i


def first_words(sql: str) -> Iterator[str]:
    """The first keyword of each statement of ``sql`` (upper case), read past comments,
    string literals, quoted identifiers and dollar-quoted strings (see :func:`lex`)."""
    start = True
    for kind, a, b in lex(sql):
        if kind == ";":
            start = True
        elif kind in ("space", "comment"):
            continue
        else:
            if start and kind == "text" and (word := _WORD.match(sql, a, b)) is not None:
                yield word.group().upper()
            start = False

# Names a driver or ORM makes from a process counter; they differ between runs.
_GENERATED = [
    (re.compile(r"__asyncpg_(savepoint|stmt|cursor)_[0-9a-f_]+__"), r"__asyncpg_\1_N__"),
    (re.compile(r"\bsa_savepoint_\d+\b"), "sa_savepoint_N"),
    (re.compile(r"\b_pg3_\d+\b"), "_pg3_N"),
    (re.compile(r"\b(savepoint|SAVEPOINT)\s+(\"?)([A-Za-z_]+?)_?\d+\2"), r"\1 \2\3_N\2"),
]


# How statements were read before 2026-11-30: whitespace folded inside literals too, and a
# "--" or "/*" inside a dollar-quoted or E'' string taken for a comment. A statement that reads
# otherwise now is also looked up under the key it had then (see Call.before).
_OLD_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|/\*.*?\*/|--[^\n]*", re.S)


@functools.lru_cache(maxsize=4096)
def _normalised_before_20261130(statement: str | bytes) -> str:
    if isinstance(statement, bytes):
        statement = statement.decode("utf-8", "replace")
    cut = _OLD_TOKENS.sub(lambda m: " " if m.group(0)[0] in "/-" else m.group(0), statement)
    text = _SPACES.sub(" ", cut).strip()
    return text[:-1].rstrip() if text.endswith(";") else text


# Apps repeat a small set of statements: the lexing runs once per distinct text.
@functools.lru_cache(maxsize=4096)
def normalise_statement(statement: str | bytes) -> str:
    """The statement as a key sees it: comments (sqlcommenter's traceparent too) removed,
    whitespace between tokens folded to one space, a trailing semicolon dropped; string
    literals, quoted identifiers and dollar-quoted strings kept as written (``'a  b'`` and
    ``'a b'`` are two statements, and a ``--`` inside ``$$...$$`` is no comment)."""
    if isinstance(statement, bytes):
        statement = statement.decode("utf-8", "replace")
    parts: list[str] = []
    gap = False
    for kind, a, b in lex(statement):
        if kind == "space" or kind == "comment":
            gap = True
            continue
        if gap and parts:
            parts.append(" ")
        gap = False
        parts.append(statement[a:b])
    text = "".join(parts)
    return text[:-1].rstrip() if text.endswith(";") else text


@functools.lru_cache(maxsize=4096)
def begins_transaction(statement: str) -> bool:
    """Whether ``statement`` begins a transaction (BEGIN, START TRANSACTION)."""
    words = statement.split(None, 2)
    first = words[0].upper().rstrip(";") if words else ""
    second = words[1].upper().rstrip(";") if len(words) > 1 else ""
    return first == "BEGIN" or (first == "START" and second == "TRANSACTION")


def statement_shape(statement: str) -> str:
    """The normalised statement with driver-generated names replaced by ``_N``."""
    for pattern, repl in _GENERATED:
        statement = pattern.sub(repl, statement)
    return statement


def sql_call(
    library: str,
    statement: str | bytes,
    params: Any = None,
    *,
    database: str | None = None,
    operation: str = "execute",
    extra: dict[str, Any] | None = None,
    redact_params: Iterable[int] = (),
) -> Call:
    """The :class:`Call` of one SQL statement.

    ``operation`` separates calls whose results differ in form (``fetch`` vs ``execute`` vs
    ``executemany``); ``extra`` adds identifying fields (a cursor name, a row format).
    ``redact_params`` lists parameter positions replaced by their redaction token.
    """
    text = normalise_statement(statement)
    tree = to_tree(params) if params is not None else None
    r = STATE.redactor
    tree = r.sql_params(text, tree, redact_params)  # shim and configured rules
    if tree:  # a secret seen elsewhere (a bearer token) given as a parameter: its token
        tree = r.scrub(tree)
    call = _keyed(library, text, tree, database, operation, extra)
    old = _normalised_before_20261130(statement)
    if old != text:  # (cassettes recorded before read this statement so: found there too)
        call.before = functools.partial(_keyed, library, old, tree, database, operation, extra)
    return call


def _keyed(library: str, text: str, tree: Any, database: str | None, operation: str,
           extra: dict[str, Any] | None) -> Call:
    if extra is not None:
        identity = {"db": database, "op": operation, "statement": text, "params": tree, **extra}
        shape = {"db": database, "op": operation, "statement": statement_shape(text), **extra}
        return Call(library, identity, identity, shape, _label(operation, text))
    empty = _empty(tree)
    shape, shape_key, label, key = _statement_keys(library, database, operation, text, empty)
    identity = {"db": database, "op": operation, "statement": text, "params": tree}
    return Call(library, identity, identity, shape, label, key, shape_key)


def _label(operation: str, text: str) -> str:
    return f"{operation} {text if len(text) <= 120 else text[:117] + '...'}"


# The parameter trees of a call without parameters: None, () and [].
_EMPTY_TREES: dict[str, Any] = {"none": None, "tuple": {"$tuple": []}, "list": []}


def _empty(tree: Any) -> str | None:
    if tree is None:
        return "none"
    if type(tree) is dict:
        return "tuple" if tree == _EMPTY_TREES["tuple"] else None
    return "list" if type(tree) is list and not tree else None


@functools.lru_cache(maxsize=4096)
def _statement_keys(
    library: str, database: str | None, operation: str, text: str, empty: str | None
) -> tuple[dict[str, Any], str, str, str | None]:
    # Services repeat their statements: the shape, its key and the label are the same every
    # time, and so is the exact key of a call without parameters (``empty``). The shape dict
    # is shared: read, never mutate.
    shape = {"db": database, "op": operation, "statement": statement_shape(text)}
    key = None
    if empty is not None:
        key = stable_hash(library, {"db": database, "op": operation, "statement": text,
                                    "params": _EMPTY_TREES[empty]})
    return shape, stable_hash(library, shape), _label(operation, text), key
