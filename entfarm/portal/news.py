"""The Département's news: Markdown files in the inventory, newest first.

One file per item, named ``AAAA-MM-JJ-titre.md``: the date in the name orders the items and is
the date shown, so an editor sees the order with ``ls`` and needs no front-matter syntax. The
first ``# heading`` is the title (else the name, hyphens as spaces). An item dated in the future
is published on that day. Files of any other name are ignored.

Markdown is rendered by markdown-it-py without raw HTML (a ``<script>`` is shown as text) and with
its link validation (no ``javascript:`` links); headings are shifted down two levels so that an
item's own ``#`` sits under the page's "Actualités" section heading.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup

log = logging.getLogger("entfarm.portal")

NEWS_FILE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})-([a-z0-9][a-z0-9-]*)\.md$")
MAX_NEWS_BYTES = 256 * 1024
MONTHS = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre",
          "octobre", "novembre", "décembre")
HEADING_SHIFT = 2


@dataclass(frozen=True)
class NewsItem:
    date: datetime.date
    slug: str
    title: str
    html: Markup

    @property
    def date_fr(self) -> str:
        return french_date(self.date)


def french_date(day: datetime.date) -> str:
    number = "1er" if day.day == 1 else str(day.day)
    return f"{number} {MONTHS[day.month - 1]} {day.year}"


def _markdown() -> MarkdownIt:
    # js-default: CommonMark with raw HTML off; typographer off keeps the text as written.
    return MarkdownIt("js-default", {"html": False, "linkify": False, "typographer": False})


class NewsStore:
    """Reads and renders news on demand, re-rendering a file only when it changes."""

    def __init__(self) -> None:
        self._md = _markdown()
        self._cache: dict[Path, tuple[tuple[int, int], NewsItem]] = {}

    def items(self, directory: Path | None, limit: int,
              today: datetime.date | None = None) -> list[NewsItem]:
        if directory is None or limit <= 0:
            return []
        today = today or datetime.date.today()
        dated: list[tuple[datetime.date, str, Path]] = []
        try:
            entries = list(directory.iterdir())
        except OSError as exc:
            log.warning("news directory %s unreadable: %s", directory, exc.strerror)
            return []
        for path in entries:
            match = NEWS_FILE.match(path.name)
            if not match:
                continue
            try:
                day = datetime.date(int(match[1]), int(match[2]), int(match[3]))
            except ValueError:
                log.warning("news file %s: no such date", path.name)
                continue
            if day <= today:
                dated.append((day, path.name, path))
        dated.sort(reverse=True)
        out = []
        for day, _name, path in dated:
            item = self._read(path, day)
            if item is not None:
                out.append(item)
            if len(out) >= limit:
                break
        return out

    def _read(self, path: Path, day: datetime.date) -> NewsItem | None:
        try:
            stat = path.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(path)
            if cached and cached[0] == key:
                return cached[1]
            if stat.st_size > MAX_NEWS_BYTES:
                log.warning("news file %s: larger than %d bytes, skipped", path.name,
                            MAX_NEWS_BYTES)
                return None
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError as exc:
            log.warning("news file %s unreadable: %s", path.name, exc.strerror)
            return None
        match = NEWS_FILE.match(path.name)
        slug = match[4] if match else path.stem
        item = self.render(text, day, slug)
        self._cache[path] = (key, item)
        return item

    def render(self, text: str, day: datetime.date, slug: str) -> NewsItem:
        tokens = self._md.parse(text)
        title = ""
        if (len(tokens) >= 3 and tokens[0].type == "heading_open" and tokens[0].tag == "h1"
                and tokens[1].type == "inline"):
            title = tokens[1].content.strip()
            tokens = tokens[3:]
        for token in tokens:
            _shift_heading(token)
        html = self._md.renderer.render(tokens, self._md.options, {})
        title = title or slug.replace("-", " ").capitalize()
        # markdown-it escapes every character of the source it does not interpret.
        return NewsItem(day, slug, title, Markup(html))


def _shift_heading(token: Token) -> None:
    if token.type in ("heading_open", "heading_close"):
        level = min(6, int(token.tag[1]) + HEADING_SHIFT)
        token.tag = f"h{level}"
