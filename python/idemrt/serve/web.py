"""The decode service's web page (``GET /``, ``GET /static/{name}``): static files shipped in
``idemrt/serve/static`` (HTML, CSS and plain JavaScript; no build step, nothing external).

Only the names of :data:`STATIC` are served, read from the package (never a path made from a
request), each with a strict Content-Security-Policy: the page loads nothing from elsewhere, runs
no inline script or style, and talks only to its own origin.
"""

from functools import lru_cache
from importlib import resources

from .problems import Problem

CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}
STATIC = {  # the shipped files (the allow-list) and their media types
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def static_response(name: str):
    """The shipped file ``name`` (one of :data:`STATIC`) with the page's headers; a 404 problem
    for any other name."""
    from starlette.responses import Response

    if name not in STATIC:
        problem = Problem(404, "not-found", "no such file")
        return problem.response(HEADERS)
    return Response(_read(name), media_type=STATIC[name], headers=HEADERS)
