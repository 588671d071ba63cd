"""HTTP headers a registry sends that scangate must read: `WWW-Authenticate` challenges
(RFC 9110 §11.6.1) and `Link` (RFC 8288), parsed in one pass each.

A registry is not trusted to send sensible headers. The regular expressions these
replace backtracked: an unterminated `Bearer realm="…` of 16,000 characters took a
second of the event loop, during which no review was answered. These scanners look at
each character once, and a header longer than MAX_HEADER is refused outright (no
registry needs more than a few hundred characters for either).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEADER = 8 << 10
"""The longest WWW-Authenticate or Link value read at all (8 KiB)."""

# Single character classes matched once from a position: no alternatives, no
# backtracking, so each is linear (and runs at C speed).
_SPACES = re.compile(r"[ \t]*")
_TOKEN = re.compile(r'[^ \t,;="<>]*')
_PLAIN = re.compile(r'[^"\\]*')
# One link-param up to its value: `; name =` (spaces anywhere). Each part is a single
# character class or a literal, so it is as linear as the classes above; a quoted value
# is then read by the scanner (it unescapes), a token by _TOKEN.
_LINK_PARAM = re.compile(r'[ \t]*;[ \t]*([^ \t,;="<>]*)[ \t]*(=[ \t]*)?')


class HeaderError(ValueError):
    """A header scangate cannot use (too long, or malformed); says why in one line."""


@dataclass(frozen=True)
class Challenge:
    """An authentication challenge: its scheme (lower case) and auth-params (names lower
    case, values unquoted)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def _check_length(value: str, name: str) -> None:
    if len(value) > MAX_HEADER:
        raise HeaderError(f"the {name} header is {len(value)} characters long, more than "
                          f"the {MAX_HEADER} scangate reads")


class _Scanner:
    """A cursor over one header value; every method moves forward only."""

    def __init__(self, text: str, name: str) -> None:
        self.text, self.name, self.at = text, name, 0

    def done(self) -> bool:
        return self.at >= len(self.text)

    def peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def _run(self, pattern: re.Pattern[str]) -> str:
        found = pattern.match(self.text, self.at)
        assert found is not None  # each pattern matches the empty string
        self.at = found.end()
        return found.group()

    def skip_space(self) -> None:
        self._run(_SPACES)

    def skip_separators(self) -> None:
        """Space and the commas between list elements (RFC 9110 allows empty ones)."""
        self.skip_space()
        while self.peek() == ",":
            self.at += 1
            self.skip_space()

    def token(self) -> str:
        return self._run(_TOKEN)

    def quoted(self) -> str:
        """A quoted-string starting at the opening quote, unescaped."""
        assert self.peek() == '"'
        self.at += 1
        out: list[str] = []
        while True:
            out.append(self._run(_PLAIN))
            c = self.peek()
            if c == '"':
                self.at += 1
                return "".join(out)
            if c != "\\" or self.at + 1 >= len(self.text):
                break
            out.append(self.text[self.at + 1])  # a quoted-pair: the character itself
            self.at += 2
        raise HeaderError(f"the {self.name} header has an unterminated quoted string")

    def value(self) -> str:
        return self.quoted() if self.peek() == '"' else self.token()


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a WWW-Authenticate value (registries send one), or None
    when there is none; raises HeaderError for one too long or malformed."""
    _check_length(header, "WWW-Authenticate")
    s = _Scanner(header, "WWW-Authenticate")
    s.skip_space()
    scheme = s.token()
    if not scheme:
        return None
    params: dict[str, str] = {}
    while True:
        s.skip_separators()
        if s.done():
            break
        name = s.token()
        s.skip_space()
        if not name or s.peek() != "=":
            # A token68 or the next challenge's scheme: the first challenge ends here.
            break
        s.at += 1  # "="
        s.skip_space()
        params.setdefault(name.lower(), s.value())
    return Challenge(scheme.lower(), params)


def next_link(header: str) -> str | None:
    """The target of the `rel="next"` link of a Link value, or None; raises HeaderError for
    one too long or malformed."""
    _check_length(header, "Link")
    s = _Scanner(header, "Link")
    while True:
        s.skip_separators()
        if s.done():
            return None
        if s.peek() != "<":
            raise HeaderError("the Link header has a link without <target>")
        end = header.find(">", s.at + 1)
        if end < 0:
            raise HeaderError("the Link header has an unterminated <target>")
        target = header[s.at + 1:end]
        s.at = end + 1
        rels: list[str] = []
        while (param := _LINK_PARAM.match(header, s.at)) is not None:
            s.at = param.end()
            value = s.value() if param.group(2) else ""
            if param.group(1).lower() == "rel":
                rels += value.lower().split()
        if "next" in rels:
            return target
        s.skip_space()
        if not s.done() and s.peek() != ",":
            raise HeaderError(f"the Link header has an unexpected {s.peek()!r} after a link")
