"""Colour contrast (WCAG 2.x, used by RGAA criterion 3.2): brand colours made readable.

A Département chooses its colours; the portal must still reach 4.5:1 for text. Rather than
refusing a colour, the palette keeps it where it is decorative (header background) and picks the
text colour on it, and darkens it where it is text (links, focus rings on white).
"""

from __future__ import annotations

from dataclasses import dataclass

WHITE = "#ffffff"
BLACK = "#000000"
# Body text: near black reads softer than pure black and still gives 17:1 on white.
INK = "#1b1b1b"
TEXT_RATIO = 4.5  # WCAG AA, normal text
UI_RATIO = 3.0  # WCAG 1.4.11, focus rings and other non-text marks


def _rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"{color!r} is not a colour written #rrggbb")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c))):02x}" for c in rgb)


def relative_luminance(color: str) -> float:
    """WCAG relative luminance of ``#rrggbb``, from 0 (black) to 1 (white)."""

    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in _rgb(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(first: str, second: str) -> float:
    """WCAG contrast ratio between two colours, from 1 to 21."""
    a, b = relative_luminance(first), relative_luminance(second)
    light, dark = max(a, b), min(a, b)
    return (light + 0.05) / (dark + 0.05)


def text_on(background: str, preferred: str = WHITE, ratio: float = TEXT_RATIO) -> str:
    """``preferred`` when it is readable on ``background``, else white or black, the better.

    One of white and black always reaches 4.5:1 on any colour (the worst case is about 4.6:1).
    """
    if contrast_ratio(preferred, background) >= ratio:
        return preferred
    return max((WHITE, BLACK, INK), key=lambda c: contrast_ratio(c, background))


def darken_until(color: str, backgrounds: tuple[str, ...] = (WHITE,),
                 ratio: float = TEXT_RATIO) -> str:
    """``color`` darkened just enough to be readable on every one of ``backgrounds``.

    Darkening keeps the hue, so a link stays recognisably the brand's colour.
    """
    r, g, b = (float(c) for c in _rgb(color))
    candidate = color.lower()
    for _ in range(100):
        if all(contrast_ratio(candidate, bg) >= ratio for bg in backgrounds):
            return candidate
        r, g, b = r * 0.96, g * 0.96, b * 0.96
        candidate = _hex((r, g, b))
    return BLACK


@dataclass(frozen=True)
class Palette:
    """The colours a page uses, each pair at least 4.5:1."""

    header_bg: str  # the brand's primary colour, as configured
    header_text: str  # white or black, whichever is readable on it
    accent: str  # links, focus rings, tile borders on white cards
    page_bg: str  # the brand's secondary colour, as configured
    page_text: str  # text written directly on page_bg (section titles, footer)
    focus: str  # focus rings drawn over page_bg and white cards


def palette(primary: str, secondary: str) -> Palette:
    page_text = text_on(secondary, preferred=INK)
    accent = darken_until(primary, (WHITE,))
    ring_ok = all(contrast_ratio(accent, bg) >= UI_RATIO for bg in (WHITE, secondary))
    return Palette(
        header_bg=primary.lower(),
        header_text=text_on(primary),
        accent=accent,
        page_bg=secondary.lower(),
        page_text=page_text,
        # A dark ring (with the white halo the stylesheet adds) is visible on anything.
        focus=accent if ring_ok else INK,
    )
