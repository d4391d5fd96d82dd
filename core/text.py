r"""Untrusted text made inert where it leaves the app: Markdown exports, CSV cells, terminal lines.

Text from a dataset (premises, labels, tags), a config (the model's name, a seed group) or a run
folder (report.json, metrics.jsonl) may hold markup or control characters. Every export writes it
through one of these, so that it shows as typed and nothing in it becomes live:

    markdown_text("<b>x</b> [a](http://e)")   # \<b\>x\</b\> [a\](http:<U+2060>//e): text in CommonMark and GFM
    code_span("a`b")                          # ``a`b``: a code span no backtick in the text can close
    csv_cell("=HYPERLINK(...)")               # '=HYPERLINK(...): OWASP, no cell starts a formula
    terminal_text("\x1b[2J ok")               # \x1b[2J ok: an escape sequence written out, not run

The app's pages escape for Streamlit's own Markdown with app_pages/ui.plain (its renderer has more
syntax: directives, emoji shortcodes, autolinks found after escapes are resolved).
"""

from __future__ import annotations

import re
import unicodedata

# --- characters that change how text looks without being seen -----------------------------------

# Bidirectional overrides, embeddings and isolates, the marks, and the Arabic letter mark: they
# reorder what a terminal or a page shows ("Trojan Source", CVE-2021-42574).
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _hidden(ch: str, keep: str) -> bool:
    """Whether `ch` is a control character (C0, DEL, C1) or a bidirectional control, not in `keep`."""
    if ch in keep:
        return False
    return ch in BIDI_CONTROLS or unicodedata.category(ch) == "Cc"


def show_controls(text: str, keep: str = "") -> str:
    """`text` with every control character (C0, DEL, C1: escape sequences, bells, carriage
    returns) and every bidirectional control written out as `\\x1b` / `\\u202e`, except those in
    `keep` (e.g. "\\n\\t")."""
    text = str(text)
    if all(ch.isprintable() or ch in keep for ch in text):  # the common case, in one pass
        return text
    return "".join(_escaped(ch) if _hidden(ch, keep) else ch for ch in text)


def terminal_text(text) -> str:
    """`text` for a terminal line: escape sequences, carriage returns and bidirectional controls
    shown as `\\x1b`, `\\x0d`, `\\u202e` (so data can neither colour, move the cursor, set a link
    or a window title, nor reorder the line); line breaks and tabs are kept."""
    return show_controls(str(text), keep="\n\t")


# --- Markdown (CommonMark and GitHub's extensions) -----------------------------------------------

# A backslash makes any ASCII punctuation character literal (CommonMark 2.4). These start or end
# inline syntax anywhere: emphasis and strikethrough (* _ ~), code (`), HTML, autolinks and entities
# (< > &), table cells (|), math on the Hub ($); a backslash before punctuation (or at the end,
# where the caller's syntax follows) would escape the next character.
_INLINE_SPECIAL = re.compile(r"[`*_~<>&|$]|\\(?=[!-/:-@\[-`{-~]|$)")
# A link, an image or a reference definition needs "](", "][" or "]:" after its text: with that
# bracket escaped no link can form, and brackets that open nothing ("[27.6, 40.5]") stay as they are.
_LINK_CLOSE = re.compile(r"\](?=[(\[:])")
# What starts a block at the start of a line: a heading (#), a list (- + * or 1. 1)), a quote (>),
# a setext underline (= -), a table row (|), an indented code block (4 spaces).
_LINE_START = re.compile(r"^(\d{0,9})([#>+=.)-])")
# GitHub's autolink literals (www.x, http://x, a@b.c) are found in text after escapes are resolved:
# an invisible word joiner (U+2060) breaks them.
WORD_JOINER = "\u2060"
_AUTOLINK = re.compile(r"(?<=:)(?=//)|(?<=www)(?=\.)|(?<=\w@)|(?<=mailto:)|(?<=xmpp:)", re.IGNORECASE)
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]")


def markdown_text(text, line_start: bool = False) -> str:
    """`text` (anything from data, a config or a run folder) for a Markdown file, on one line: it
    renders as itself in CommonMark and GitHub Flavored Markdown (a Hub model page): no HTML, no
    link, image or autolink, no emphasis or code, no table cell break; line breaks become spaces,
    control characters are written out (show_controls). `line_start`: the text begins a line,
    where a leading #, >, -, +, =, or "1." would start a block; it is escaped too. None is ""."""
    if text is None:
        return ""
    text = show_controls(_LINE_BREAKS.sub(" ", str(text)))
    text = _AUTOLINK.sub(WORD_JOINER, text)
    text = _INLINE_SPECIAL.sub(lambda m: "\\" + m.group(), text)
    text = _LINK_CLOSE.sub(r"\\]", text)
    if line_start:
        text = text.lstrip(" \t")  # four spaces would start a code block
        start = _LINE_START.match(text)
        if start and (start.group(1) or start.group(2) not in ".)"):  # "1." or "1)" is a list, "." alone is not
            text = f"{start.group(1)}\\{text[start.start(2) :]}"
    return text


def code_span(text) -> str:
    """`text` as one Markdown code span that shows it literally: delimited by one backtick more
    than its longest run of backticks (CommonMark 6.1), padded with a space where it begins or
    ends with a backtick; line breaks become spaces and control characters are written out."""
    text = show_controls(_LINE_BREAKS.sub(" ", "" if text is None else str(text)))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# --- CSV ------------------------------------------------------------------------------------------

# A spreadsheet reads a cell that starts with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value):
    """`value` for a CSV cell that a spreadsheet opens: a string that starts with = + - @, a tab,
    a carriage return or a line feed gets a leading single quote, so it is shown as text and never
    run as a formula (OWASP's advice; the csv module quotes and doubles any double quote). Numbers
    and booleans are written as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
