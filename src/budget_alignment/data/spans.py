"""What machine translation must leave alone, and the markers that stand for it.

`protect` replaces LaTeX math, `\\boxed{...}` and other LaTeX commands, code, numbers and choice letters by markers
`⟦0⟧, ⟦1⟧, ...`; a translation must hold each marker exactly once (`check_markers`), and `restore` puts the spans
back. `split_paragraphs` cuts a protected text at blank lines into chunks; `renumber` gives a chunk its own markers.
The data contracts use `protected_spans` to check that every span of the English text is in its translation.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MARKER = "⟦{}⟧"
MARKER_RE = re.compile(r"⟦(\d+)⟧")
_MARKER_BRACKETS = re.compile(r"[⟦⟧]")

# Tried in this order at every position; the first that matches is one protected span.
_SPAN_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("code block", re.compile(r"```.*?(?:```|\Z)", re.DOTALL)),
    ("inline code", re.compile(r"`[^`\n]+`")),
    ("asymptote figure", re.compile(r"\[asy\].*?(?:\[/asy\]|\Z)", re.DOTALL)),
    ("display math", re.compile(r"\$\$.+?\$\$", re.DOTALL)),
    ("display math", re.compile(r"\\\[.+?\\\]", re.DOTALL)),
    ("inline math", re.compile(r"\\\(.+?\\\)", re.DOTALL)),
    ("inline math", re.compile(r"(?<!\\)\$(?:[^$\\]|\\.)+?(?<!\\)\$", re.DOTALL)),
    ("escaped character", re.compile(r"\\[^A-Za-z\s]")),
    ("number", re.compile(r"\d+(?:[.,]\d+)*")),
    ("choice letter", re.compile(r"\([A-J]\)")),
    ("choice letter", re.compile(r"(?m)^[ \t]*[A-J][.)](?=\s)")),
]
_COMMAND = re.compile(r"\\[A-Za-z]+\*?")
_ENV_BEGIN = re.compile(r"\\begin\{([^{}]+)\}")


def _balanced_group_end(text: str, start: int, open_char: str = "{", close_char: str = "}") -> int | None:
    """Index after the group that opens at `start`, or None if it never closes."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == open_char:
            depth += 1
        elif char == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _latex_span_end(text: str, start: int) -> int | None:
    """End of a LaTeX environment or command (with its brace and bracket arguments) starting at `start`."""
    begin = _ENV_BEGIN.match(text, start)
    if begin:
        name = re.escape(begin.group(1))
        depth, position = 0, start
        for tag in re.finditer(rf"\\(begin|end)\{{{name}\}}", text[start:]):
            depth += 1 if tag.group(1) == "begin" else -1
            position = start + tag.end()
            if depth == 0:
                return position
        return None
    command = _COMMAND.match(text, start)
    if not command:
        return None
    end = command.end()
    while end < len(text) and text[end] in "{[":
        close = _balanced_group_end(text, end, text[end], "}" if text[end] == "{" else "]")
        if close is None:
            break
        end = close
    return end


def protected_spans(text: str, *, merge: bool = True) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) of everything translation must leave alone; adjacent spans merged (one marker
    for `\\$` and the number after it) unless `merge` is False."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        end = None
        if text[i] == "\\":
            end = _latex_span_end(text, i)
        if end is None and text[i] in "`[$\\0123456789(ABCDEFGHIJ \t":
            for _, pattern in _SPAN_PATTERNS:
                match = pattern.match(text, i)
                if match and match.end() > i:
                    end = match.end()
                    break
        if end is None:
            i += 1
            continue
        # A line-start choice letter pattern may have matched leading blanks: keep them translatable text.
        start = i + len(text[i:end]) - len(text[i:end].lstrip(" \t"))
        if merge and spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
        i = end
    return spans


@dataclass(frozen=True)
class Protected:
    """Text with markers `⟦i⟧` in place of its protected spans (numbered in order of appearance)."""

    text: str
    spans: tuple[str, ...]


def protect(text: str) -> Protected:
    pieces, spans, last = [], [], 0
    for start, end in protected_spans(text):
        pieces.append(text[last:start])
        pieces.append(MARKER.format(len(spans)))
        spans.append(text[start:end])
        last = end
    pieces.append(text[last:])
    return Protected("".join(pieces), tuple(spans))


class MarkerError(ValueError):
    """A reply that lost, duplicated, invented or damaged a marker."""


def check_markers(reply: str, count: int) -> None:
    found = Counter(int(number) for number in MARKER_RE.findall(reply))
    problems = []
    missing = [i for i in range(count) if found[i] == 0]
    if missing:
        problems.append("lost " + ", ".join(MARKER.format(i) for i in missing))
    repeated = sorted(i for i, n in found.items() if n > 1 and i < count)
    if repeated:
        problems.append("repeated " + ", ".join(MARKER.format(i) for i in repeated))
    invented = sorted(i for i in found if i >= count)
    if invented:
        problems.append("invented " + ", ".join(MARKER.format(i) for i in invented))
    if _MARKER_BRACKETS.search(MARKER_RE.sub("", reply)):
        problems.append("damaged a marker (a stray ⟦ or ⟧)")
    if problems:
        raise MarkerError("; ".join(problems))


def restore(reply: str, spans: Sequence[str]) -> str:
    """Put the protected spans back; raises MarkerError if the reply did not keep every marker exactly once."""
    check_markers(reply, len(spans))
    return MARKER_RE.sub(lambda m: spans[int(m.group(1))], reply)


def renumber(text: str, spans: Sequence[str]) -> Protected:
    """A chunk of a protected text as a Protected of its own, its markers numbered from 0."""
    local: list[str] = []

    def replace(match: re.Match[str]) -> str:
        local.append(spans[int(match.group(1))])
        return MARKER.format(len(local) - 1)

    return Protected(MARKER_RE.sub(replace, text), tuple(local))


_PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n\s*)")


def split_paragraphs(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(chunk, separator after it) pairs, cut only at blank lines, each chunk at most `max_chars` if possible.

    A single paragraph longer than `max_chars` stays whole: cutting inside it would cut a sentence.
    """
    parts = _PARAGRAPH_BREAK.split(text)
    paragraphs, separators = parts[0::2], [*parts[1::2], ""]
    chunks: list[tuple[str, str]] = []
    current: tuple[str, str] | None = None
    for paragraph, separator in zip(paragraphs, separators, strict=True):
        if (
            current is not None
            and current[0].strip()
            and len(current[0]) + len(current[1]) + len(paragraph) > max_chars
        ):
            chunks.append(current)
            current = None
        current = (paragraph, separator) if current is None else (current[0] + current[1] + paragraph, separator)
    assert current is not None
    chunks.append(current)
    return chunks


_LETTER = re.compile(r"[^\W\d_]")


def needs_translation(protected_text: str) -> bool:
    """False for a chunk that is only markers, digits, punctuation and blanks: it reads the same in any language."""
    return bool(_LETTER.search(MARKER_RE.sub("", protected_text)))
