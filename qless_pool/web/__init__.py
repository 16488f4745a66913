"""The web dashboard (``pip install 'qless-pool[web]'``): qless's queues, jobs, failed jobs and
workers, and every running pool, with the actions an operator needs.

    app.py     the WSGI application: who may see and act, headers, Redis away
    pages.py   the pages (server-rendered; usable without JavaScript)
    api.py     the JSON API under /api
    views.py   what is shown: secrets hidden, times, qless's statistics as chart bars
    tokens.py  the token file: hashed tokens, scopes read and write
    serve.py   ``qless-pool web``: serve it with waitress; ``hash-token``

Mount it in your own service with ``create_app(...)`` (README: "Web dashboard").
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The dashboard as a WSGI application (app.py's create_app)."""
    from .app import create_app as make

    return make(*args, **kwargs)


__all__ = ["create_app"]
