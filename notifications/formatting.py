"""Pure text helpers for Telegram HTML: length as Telegram counts it, and splitting into sendable parts."""

from __future__ import annotations

import re

# Telegram's sendMessage limit is 4096 characters; parts stay strictly below it.
PART_MAX = 4095
# No single atom (word, whitespace run) is longer than this, so a part always makes progress.
_ATOM_MAX = 100

_ATOM = re.compile(r"<[^<>]*>|&#?[A-Za-z0-9]+;|\n|[ \t]+|[^<&\s]+|[\s\S]")
_TAG = re.compile(r"<\s*(/?)\s*([A-Za-z][A-Za-z0-9-]*)[^<>]*?(/?)\s*>")


def tg_len(text: str) -> int:
    """Length in UTF-16 code units (how Telegram counts); never less than len(text)."""
    return len(text.encode("utf-16-le")) // 2


def _atoms(text: str) -> list[str]:
    out: list[str] = []
    for atom in _ATOM.findall(text):
        if len(atom) > _ATOM_MAX and not atom.startswith("<"):
            out.extend(atom[i : i + _ATOM_MAX] for i in range(0, len(atom), _ATOM_MAX))
        else:
            out.append(atom)
    return out


def _apply(stack: tuple[tuple[str, str], ...], atom: str) -> tuple[tuple[str, str], ...]:
    """The open-tag stack (name, opening tag) after `atom`."""
    match = _TAG.fullmatch(atom)
    if not match:
        return stack
    closing, name, self_closing = match.group(1), match.group(2).lower(), match.group(3)
    if self_closing:
        return stack
    if not closing:
        return (*stack, (name, atom))
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] == name:
            return stack[:i]
    return stack  # a stray closing tag: the input was malformed already


def _closers(stack: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"</{name}>" for name, _ in reversed(stack))


def _openers(stack: tuple[tuple[str, str], ...]) -> str:
    return "".join(tag for _, tag in stack)


def _choose_cut(
    newline: tuple[int, int, tuple[tuple[str, str], ...]] | None,
    space: tuple[int, int, tuple[tuple[str, str], ...]] | None,
    here: tuple[int, int, tuple[tuple[str, str], ...]],
    limit: int,
) -> tuple[int, tuple[tuple[str, str], ...]]:
    """A line break if it keeps the part at least half full, else whitespace, else right here."""
    for candidate in (newline, space):
        if candidate is not None and candidate[0] >= limit // 2:
            return candidate[1], candidate[2]
    best = newline or space or here
    return best[1], best[2]


def text_split(text: str, *, limit: int = PART_MAX) -> list[str]:
    """Split Telegram HTML into parts of at most `limit` characters (UTF-16 units).

    Cuts at a line break when one is available, else at whitespace, else between atoms; never
    inside a tag or an entity. Tags open at a cut are closed at the end of the part and reopened
    (with their attributes) at the start of the next, so every part is well-formed on its own.
    """
    if tg_len(text) <= limit:
        return [text]
    parts: list[str] = []
    prefix_stack: tuple[tuple[str, str], ...] = ()
    pending = _atoms(text)
    while pending:
        prefix = _openers(prefix_stack)
        if tg_len(prefix) > limit // 2:
            raise ValueError("markup nested too deeply to split into Telegram messages")
        used = tg_len(prefix)
        stack = prefix_stack
        # (length so far, index after the atom, stack there) at the last line break and whitespace.
        last_newline: tuple[int, int, tuple[tuple[str, str], ...]] | None = None
        last_space: tuple[int, int, tuple[tuple[str, str], ...]] | None = None
        cut: tuple[int, tuple[tuple[str, str], ...]] | None = None
        for i, atom in enumerate(pending):
            after = _apply(stack, atom)
            if used + tg_len(atom) + tg_len(_closers(after)) > limit and i > 0:
                cut = _choose_cut(last_newline, last_space, (used, i, stack), limit)
                break
            used += tg_len(atom)
            stack = after
            if atom == "\n":
                last_newline = (used, i + 1, stack)
            elif atom.isspace():
                last_space = (used, i + 1, stack)
        if cut is None:
            parts.append(prefix + "".join(pending) + _closers(stack))
            break
        index, cut_stack = cut
        body = "".join(pending[:index]).rstrip()
        parts.append(prefix + body + _closers(cut_stack))
        pending = pending[index:]
        # The next part starts at a line: drop the blank space the cut left behind.
        while pending and pending[0].isspace() and not cut_stack:
            pending.pop(0)
        prefix_stack = cut_stack
    return [part for part in parts if part.strip()]
