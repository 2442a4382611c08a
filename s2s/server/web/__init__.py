"""The web client's files, shipped inside the package and served by ``s2s-server`` at ``/``.

Plain HTML, CSS and JavaScript modules: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
FILES = ("index.html", "app.js", "capture.js", "playback.js", "style.css")


def _name(path: str) -> str:
    return "index.html" if path in ("/", "/index.html") else path.lstrip("/")


def serves(path: str) -> bool:
    """True for the page and its files (nothing else: no directory walking)."""
    return _name(path) in FILES


@cache
def page(path: str) -> tuple[bytes, str]:
    """A file's bytes and content type."""
    name = _name(path)
    body = resources.files(__package__).joinpath(name).read_bytes()
    return body, CONTENT_TYPES[name[name.rindex(".") :]]
