"""A function's requirements.txt, read strictly before anything is resolved.

requirements.txt is more than a list of packages: pip's format (which uv reads too) has
options that point the installer somewhere else -- another index (``-i``,
``--extra-index-url``), a page of links (``-f``), a host to trust without TLS, other
files (``-r``, ``-c``), and requirements that are URLs or paths (``name @ url``, ``-e``,
a bare ``http://…/x.whl``).  Each makes the node fetch what a caller chose, from where
the caller chose: a host-local port, an address on the node's private network.

So a deploy's requirements.txt may hold requirement specifiers only -- a name, extras,
version specifiers, an environment marker -- each optionally with ``--hash``.  Anything
else is refused (``InvalidParameter``, naming the line) unless the operator allows
requirement sources.  What the resolver reads is not the caller's text but the
specifiers re-written from what ``packaging`` parsed, so no line the resolver would read
differently from this parser reaches it.
"""

from __future__ import annotations

import enum
import re
import shlex
from dataclasses import dataclass
from typing import NoReturn

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from warmstart.errors import InvalidParameter

ALLOW_HINT = "the node's operator may allow it with --allow-requirement-sources"
HASH_RE = re.compile(r"^[a-z0-9]+:[0-9a-fA-F]+$")
# pip's comment rule: '#' at the start of a line or after whitespace (a URL's fragment
# is not a comment).
COMMENT_RE = re.compile(r"(^|\s+)#.*$")
OPTION_START_RE = re.compile(r"\s+(?=-)")
QUOTE_MAX = 80
# A "name" that ends like an archive is a path to a file, for pip and uv alike.
ARCHIVE_SUFFIXES = (
    ".whl",
    ".zip",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz",
    ".tar.xz",
)  # how much of an offending line an error quotes


class SourceKind(enum.Enum):
    """Why a line of requirements.txt is refused."""

    INDEX = "names a package index"
    LINKS = "names a page or directory of links"
    HOST = "names a host to trust"
    INCLUDE = "includes another file"
    EDITABLE = "is an editable install (a path or URL)"
    URL = "is a direct URL or path, not a name and version"
    OPTION = "is an option this node does not accept in requirements.txt"


# Options of pip's requirements format, by what they do.
_OPTIONS: dict[str, SourceKind] = {
    "-i": SourceKind.INDEX,
    "--index-url": SourceKind.INDEX,
    "--extra-index-url": SourceKind.INDEX,
    "--no-index": SourceKind.INDEX,
    "-f": SourceKind.LINKS,
    "--find-links": SourceKind.LINKS,
    "--trusted-host": SourceKind.HOST,
    "-r": SourceKind.INCLUDE,
    "--requirement": SourceKind.INCLUDE,
    "-c": SourceKind.INCLUDE,
    "--constraint": SourceKind.INCLUDE,
    "-e": SourceKind.EDITABLE,
    "--editable": SourceKind.EDITABLE,
}


@dataclass(frozen=True)
class Requirements:
    """What a requirements.txt asks for, as the resolver will read it."""

    names: tuple[str, ...]  # canonical names, in the file's order
    text: str  # the requirements the resolver reads (normalised, or as given)


def parse_requirements(text: str, *, allow_sources: bool = False) -> Requirements:
    """Check a requirements.txt; ``InvalidParameter`` names the first line refused.

    With ``allow_sources`` the operator lets callers name their own sources: the text
    goes to the resolver as it is (its egress rules still apply).
    """
    names: list[str] = []
    out: list[str] = []
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            if allow_sources:
                continue
            _refuse(number, line, _OPTIONS.get(_option_name(line), SourceKind.OPTION))
        spec, options = _split_options(number, line)
        hashes = _hashes(number, line, options, allow_sources)
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            if allow_sources:
                continue
            if "/" in spec or "\\" in spec or spec.startswith("."):
                _refuse(number, line, SourceKind.URL)
            raise InvalidParameter(
                f"requirements.txt line {number} ({_quote(line)}) is not a requirement "
                "specifier (a name, optional [extras], version specifiers and a marker)"
            ) from None
        if (
            req.url is not None or req.name.lower().endswith(ARCHIVE_SUFFIXES)
        ) and not allow_sources:
            _refuse(number, line, SourceKind.URL)
        names.append(canonicalize_name(req.name))
        out.append(" ".join([str(req), *(f"--hash={h}" for h in hashes)]))
    if allow_sources:
        return Requirements(tuple(names), text)
    return Requirements(tuple(names), "".join(f"{line}\n" for line in out))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, text) per logical line: continuations joined,
    comments and blank lines dropped, as pip reads them."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending.append(raw[:-1])
            continue
        pending.append(raw)
        line = COMMENT_RE.sub("", "".join(pending)).strip()
        pending = []
        if line:
            lines.append((start, line))
    if pending and (line := COMMENT_RE.sub("", "".join(pending)).strip()):
        lines.append((start, line))
    return lines


def _split_options(number: int, line: str) -> tuple[str, list[str]]:
    """A requirement line's specifier and the options after it (as pip does, at the
    first word that starts with '-')."""
    m = OPTION_START_RE.search(line)
    if m is None:
        return line, []
    try:
        options = shlex.split(line[m.end() :])
    except ValueError:
        _refuse(number, line, SourceKind.OPTION)
    return line[: m.start()].strip(), options


def _hashes(number: int, line: str, options: list[str], allow_sources: bool) -> list[str]:
    hashes: list[str] = []
    i = 0
    while i < len(options):
        option, _, value = options[i].partition("=")
        if option == "--hash" and not value and i + 1 < len(options):
            i += 1
            value = options[i]
        if option == "--hash" and HASH_RE.match(value):
            hashes.append(value)
        elif not allow_sources:
            _refuse(number, line, _OPTIONS.get(_option_name(options[i]), SourceKind.OPTION))
        i += 1
    return hashes


def _option_name(word: str) -> str:
    """'--index-url=x' -> '--index-url'; '-ihttp://x' -> '-i' (a short option's value
    may follow it directly)."""
    name = word.split("=", 1)[0].split(None, 1)[0]
    return name if name.startswith("--") else name[:2]


def _refuse(number: int, line: str, kind: SourceKind) -> NoReturn:
    raise InvalidParameter(
        f"requirements.txt line {number} ({_quote(line)}) {kind.value}: this node installs "
        f"packages only from its configured index ({ALLOW_HINT})"
    )


def _quote(line: str) -> str:
    return repr(line if len(line) <= QUOTE_MAX else line[: QUOTE_MAX - 1] + "…")
