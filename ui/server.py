"""Serving the app: a FastAPI app with the image route, Gradio mounted at '/'.

`create_server_app` builds it (tests use it directly); `serve` runs it with uvicorn in
the foreground; `AppServer` runs it on a background thread (tests, benchmarks).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the app reaches no network

import fastapi  # noqa: E402
from fastapi.responses import FileResponse, PlainTextResponse  # noqa: E402

from store.errors import ImageError  # noqa: E402

from .assets import CSS, HEAD  # noqa: E402

log = logging.getLogger(__name__)
from .connections import Connections  # noqa: E402
from .security import (  # noqa: E402
    ImageRefusedError, LoginThrottle, check_bind, converted_png, login_checker, loopback_host_header,
    resolve_image,
)


def create_server_app(
    db_path: str | Path,
    *,
    auth: Optional[list[tuple[str, str]]] = None,
    index_path: Optional[str] = None,
):
    """(FastAPI app, Blocks) for the store at db_path; nothing is started."""
    import gradio as gr

    from .app import _theme, build_app

    blocks = build_app(db_path, index_path=index_path, auth_enabled=bool(auth))
    conns = Connections(db_path)
    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    holder: dict = {}

    def logged_in(request: fastapi.Request) -> bool:
        if not auth:
            return True
        gradio_app = holder.get("gradio")
        if gradio_app is None:
            return False
        token = request.cookies.get(f"access-token-{gradio_app.cookie_id}") or request.cookies.get(
            f"access-token-unsecure-{gradio_app.cookie_id}")
        return bool(token) and gradio_app.tokens.get(token) is not None

    @app.middleware("http")
    async def refuse_foreign_hosts(request: fastapi.Request, call_next):
        # With no login the app listens on loopback only; a request naming another host
        # comes from a page that re-pointed its own name here (DNS rebinding).
        if not auth and not loopback_host_header(request.headers.get("host")):
            return PlainTextResponse(
                "this app answers only at http://127.0.0.1 (or localhost) unless started with --auth",
                status_code=403)
        # A web page elsewhere may still send simple requests (a form POST: an upload) to
        # 127.0.0.1; the browser names that page in Origin ("null" from a sandbox or file).
        origin = request.headers.get("origin")
        if not auth and origin is not None and request.method not in ("GET", "HEAD", "OPTIONS") \
                and not loopback_host_header(urlsplit(origin).netloc if "://" in origin else "null"):
            return PlainTextResponse(f"requests from a page at {origin} are refused", status_code=403)
        return await call_next(request)

    @app.middleware("http")
    async def refuse_framing(request: fastapi.Request, call_next):
        # In a page elsewhere, an invisible frame of the app sends the app's own Origin and
        # Host: the user could be led to click Start (a run paid with the server's key) or
        # Approve through it. Browsers are told never to frame it.
        response = await call_next(request)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        return response

    throttle = LoginThrottle()

    @app.middleware("http")
    async def throttle_logins(request: fastapi.Request, call_next):
        if not auth or request.method != "POST" or not request.url.path.rstrip("/").endswith("/login"):
            return await call_next(request)
        client = request.client.host if request.client else "unknown"
        wait = throttle.wait_seconds(client)
        if wait:
            seconds = math.ceil(wait)
            return PlainTextResponse(f"too many failed logins from this address; try again in {seconds} s",
                                     status_code=429, headers={"Retry-After": str(seconds)})
        response = await call_next(request)
        if response.status_code == 200:
            throttle.succeeded(client)
        elif 400 <= response.status_code < 500:
            throttle.failed(client)
        return response

    @app.middleware("http")
    async def refuse_remote_fetches(request: fastapi.Request, call_next):
        # Gradio's file route fetches http(s) URLs on the server's behalf; this app
        # makes no network requests, so such requests are refused outright.
        path = request.url.path.lower()
        if "/file=http" in path or "/file=//" in path or "/proxy=" in path:
            return PlainTextResponse("remote files are not served", status_code=403)
        # Gradio's custom-component route (this app has none) answers before any login and
        # prints its URL's parts to the console first: anyone could write made-up lines and
        # terminal escape sequences there.
        if path.startswith("/gradio_api/custom_component/"):
            return PlainTextResponse("not found", status_code=404)
        return await call_next(request)

    @app.get("/g4c/image/{image_id}")
    def image(image_id: str, request: fastapi.Request):
        if not logged_in(request):
            return PlainTextResponse("log in first", status_code=401)
        try:
            served = resolve_image(conns.get(), image_id)
        except ImageRefusedError as exc:
            log.warning("image refused: %s", exc)
            return PlainTextResponse(f"refused: {exc.public}", status_code=404)
        if served.convert:
            try:
                return fastapi.Response(converted_png(served.path), media_type=served.media_type,
                                        headers={"Cache-Control": "private, max-age=86400",
                                                 "X-Content-Type-Options": "nosniff"})
            except ImageError as exc:
                log.warning("image refused: %s", exc)
                return PlainTextResponse(f"refused: image {image_id!r} cannot be decoded", status_code=404)
        return FileResponse(
            served.path, media_type=served.media_type,
            headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    blocked = [str(Path(db_path).resolve().parent / (Path(db_path).name + suffix)) for suffix in ("", "-wal", "-shm")]
    gr.mount_gradio_app(
        app, blocks, path="/", auth=login_checker(auth) if auth else None, theme=_theme(), css=CSS, head=HEAD,
        allowed_paths=[], blocked_paths=blocked, footer_links=[], show_error=True,
        ssr_mode=False, mcp_server=False, run_history=False,
        auth_message="good4cir review: log in with the user name and password you were given.",
    )
    # Gradio checks that a file an event receives was uploaded (and not any path a
    # crafted API call names) only once the Blocks "has launched", which a mounted app
    # never does; without this it copies the named file into its cache for the handler.
    blocks.has_launched = True
    for route in app.routes:
        if getattr(route, "path", None) in ("", "/") and hasattr(route, "app"):
            holder["gradio"] = route.app
    return app, blocks


def serve(db_path: str | Path, *, host: str = "127.0.0.1", port: int = 7860,
          auth: Optional[list[tuple[str, str]]] = None, index_path: Optional[str] = None) -> None:
    """Run the app in the foreground until interrupted."""
    import uvicorn

    check_bind(host, auth)
    app, _ = create_server_app(db_path, auth=auth, index_path=index_path)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown  # an IPv6 address in a URL is bracketed
    print(f"good4cir review app on http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        # A run started in the Pipeline tab lives on a daemon thread, which the exit would
        # end with its calls in flight: answers paid for and lost
        from pipeline.runner import stop_runs_in_threads

        stop_runs_in_threads(on_stop=_say_stopping)


def _say_stopping(handle) -> None:
    try:  # after a SIGHUP the terminal may be gone
        print(f"stopping run {handle.run_id} of the Pipeline tab: calls in flight finish and are stored "
              "(Ctrl-C again to abort); start it again in the Pipeline tab to resume", flush=True)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """The app on a background thread: `with AppServer(db) as server: server.url`."""

    def __init__(self, db_path, *, auth=None, index_path=None, host="127.0.0.1", port: Optional[int] = None):
        import uvicorn

        check_bind(host, auth)
        self.app, self.blocks = create_server_app(db_path, auth=auth, index_path=index_path)
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}/"
        config = uvicorn.Config(self.app, host=host, port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "AppServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the review app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
