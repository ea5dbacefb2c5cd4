"""The live dashboard: one self-contained HTML page the stats endpoint serves at ``/``.

The page (dashboard.html, package data) carries its CSS and JavaScript inline
and polls ``/stats`` once a second.  It is read once per process and its
response built once, so serving it costs the loop what ``/stats`` costs: a
route call and a write.  Its Content-Security-Policy allows exactly the
page's own inline blocks, by hash, and fetches to its own origin: nothing
from elsewhere can load, even if the page were changed to ask for it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from .http import Response

PAGE_RESOURCE = "dashboard.html"
CONTENT_TYPE = "text/html; charset=utf-8"

_INLINE_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def source_hashes(html: str, element: str) -> list[str]:
    """CSP hash sources ('sha256-...') of the inline <script> or <style> blocks, in page order."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for name, body in _INLINE_BLOCK.findall(html)
        if name == element
    ]


def content_security_policy(html: str) -> str:
    """Nothing by default; the page's own inline blocks by hash; fetches to its origin only."""
    scripts = " ".join(source_hashes(html, "script")) or "'none'"
    styles = " ".join(source_hashes(html, "style")) or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@functools.cache
def page() -> Response:
    """The whole response to ``GET /``, built once per process."""
    html = resources.files("pollserve").joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")
    headers = (
        ("Content-Security-Policy", content_security_policy(html)),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    )
    return Response(CONTENT_TYPE, html.encode(), headers=headers)
