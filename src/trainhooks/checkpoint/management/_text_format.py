"""Protobuf text format for the one fixed schema of TensorFlow's ``CheckpointState``.

A hand-written, strict reader and writer, so that the state file is byte-for-byte what
TensorFlow writes without depending on protobuf.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainhooks.checkpoint.management.state_file import CheckpointState

__all__ = ["CheckpointStateParseError", "format_state", "parse_state"]


class CheckpointStateParseError(ValueError):
    """The state file is not a ``CheckpointState`` in protobuf text format."""


# field name -> (is a string field, is repeated); the others are doubles.
_FIELDS: dict[str, tuple[bool, bool]] = {
    "model_checkpoint_path": (True, False),
    "all_model_checkpoint_paths": (True, True),
    "all_model_checkpoint_timestamps": (False, True),
    "last_preserved_timestamp": (False, False),
}
_TOKEN = re.compile(
    r"""(?P<space>\s+|\#[^\n]*)
      |(?P<string>"(?:[^"\n\\]|\\.)*"|'(?:[^'\n\\]|\\.)*')
      |(?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?)
      |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      |(?P<symbol>[:\[\],;-])""",
    re.VERBOSE,
)
_NON_FINITE = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
_SIMPLE_ESCAPES.update({c: ord(c) for c in "\\'\"?"})
_ESCAPE = re.compile(
    r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))"
)
# protobuf's CEscape(as_utf8=True), what current TensorFlow writes: non-ASCII text stays
# UTF-8; control characters, quotes, backslashes and bytes that are not UTF-8 are escaped.
_STR_ESCAPES = {i: f"\\{i:03o}" for i in range(128) if not 32 <= i < 127}
_STR_ESCAPES.update({ord(c): "\\" + e for c, e in zip("\t\n\r\"'\\", "tnr\"'\\")})


def _escape(text: str) -> str:
    data = text.encode("utf-8", "surrogateescape")
    out = []
    while data:
        try:
            out.append(data.decode("utf-8").translate(_STR_ESCAPES))
            break
        except UnicodeDecodeError as e:
            out.append(data[: e.start].decode("utf-8").translate(_STR_ESCAPES))
            out.append(f"\\{data[e.start]:03o}")
            data = data[e.start + 1 :]
    return "".join(out)


def format_state(state: CheckpointState) -> str:
    """``state`` in protobuf text format, as TensorFlow writes it."""
    # proto3 text format: fields in number order, default values left out.
    lines = [f'model_checkpoint_path: "{_escape(state.model_checkpoint_path)}"']
    lines = lines if state.model_checkpoint_path else []
    lines += [
        f'all_model_checkpoint_paths: "{_escape(p)}"' for p in state.all_model_checkpoint_paths
    ]
    lines += [
        f"all_model_checkpoint_timestamps: {float(t)!s}"
        for t in state.all_model_checkpoint_timestamps
    ]
    if state.last_preserved_timestamp:
        lines.append(f"last_preserved_timestamp: {float(state.last_preserved_timestamp)!s}")
    return "".join(line + "\n" for line in lines)


class _Tokens:
    """The tokens of a text-format message, with positions for error messages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None and text[pos] in "\"'":
                raise self.error(
                    pos, f"String missing ending quote: {text[pos:].split(chr(10))[0]!r}"
                )
            if m is None:
                raise self.error(pos, f"Expected identifier or number, got {text[pos]}.")
            if m.lastgroup != "space":
                self.items.append((m.lastgroup or "", m.group(), pos))
            pos = m.end()
        self.i = 0

    def error(self, pos: int, message: str) -> CheckpointStateParseError:
        line = self.text.count("\n", 0, pos) + 1
        column = pos - self.text.rfind("\n", 0, pos)
        return CheckpointStateParseError(f"{line}:{column} : {message}")

    def peek(self) -> tuple[str, str, int]:
        return self.items[self.i] if self.i < len(self.items) else ("eof", "", len(self.text))

    def next(self) -> tuple[str, str, int]:
        token = self.peek()
        self.i += 1
        return token

    def accept(self, symbol: str) -> bool:
        if self.peek()[:2] == ("symbol", symbol):
            self.i += 1
            return True
        return False

    def expect(self, symbol: str) -> None:
        _, tok, pos = self.peek()
        if not self.accept(symbol):
            raise self.error(pos, f'Expected "{symbol}", found {tok!r}.')

    def string(self) -> str:
        kind, tok, pos = self.next()
        if kind != "string":
            raise self.error(pos, f"Expected string but found: {tok!r}")
        data = self._unescape(tok, pos)
        while self.peek()[0] == "string":  # adjacent literals concatenate, as in C
            _, tok, pos = self.next()
            data += self._unescape(tok, pos)
        return data.decode("utf-8", "surrogateescape")

    def _unescape(self, literal: str, pos: int) -> bytes:
        body = literal[1:-1]
        out = bytearray()
        done = 0
        for m in _ESCAPE.finditer(body):
            out += body[done : m.start()].encode("utf-8", "surrogateescape")
            octal, hexa, short_u, long_u, simple = m.groups()
            code = int(short_u or long_u, 16) if (short_u or long_u) else 0
            if octal is not None and int(octal, 8) <= 0xFF:
                out.append(int(octal, 8))
            elif hexa is not None:
                out.append(int(hexa, 16))
            elif (short_u or long_u) and code <= 0x10FFFF:
                out += chr(code).encode("utf-8", "surrogatepass")
            elif simple in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[simple])
            else:
                raise self.error(pos, f"Invalid escape sequence {m.group()!r} in string.")
            done = m.end()
        out += body[done:].encode("utf-8", "surrogateescape")
        return bytes(out)

    def double(self) -> float:
        kind, tok, pos = self.next()
        sign = 1.0
        if (kind, tok) == ("symbol", "-"):
            sign, (kind, tok, pos) = -1.0, self.next()
        if kind == "number":
            return sign * float(tok.rstrip("fF"))
        word = tok.lower()
        word = word[:-1] if word.endswith("f") and word[:-1] in _NON_FINITE else word
        if kind == "ident" and word in _NON_FINITE:
            return sign * _NON_FINITE[word]
        raise self.error(pos, f"Couldn't parse float: {tok}")


def parse_state(text: str | bytes) -> CheckpointState:
    """Parse a ``CheckpointState`` in protobuf text format (strict; raises CheckpointStateParseError)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointStateParseError(f"The state file is not UTF-8 text: {e}") from None
    tokens = _Tokens(text)
    from trainhooks.checkpoint.management.state_file import CheckpointState

    state = CheckpointState()
    while tokens.peek()[0] != "eof":
        kind, name, pos = tokens.next()
        if kind != "ident":
            raise tokens.error(pos, f"Expected identifier or number, got {name}.")
        if name not in _FIELDS:
            raise tokens.error(
                pos, f'Message type "tensorflow.CheckpointState" has no field named "{name}".'
            )
        is_string, repeated = _FIELDS[name]
        read = tokens.string if is_string else tokens.double
        tokens.expect(":")
        if tokens.accept("["):
            if not repeated:
                raise tokens.error(pos, f'Field "{name}" is not repeated; it takes one value.')
            values = []
            if not tokens.accept("]"):
                values.append(read())
                while tokens.accept(","):
                    values.append(read())
                tokens.expect("]")
            getattr(state, name).extend(values)
        elif repeated:
            getattr(state, name).append(read())
        else:  # a singular field given twice keeps the last value (text_format.Merge)
            setattr(state, name, read())
        if not tokens.accept(","):
            tokens.accept(";")
    return state
