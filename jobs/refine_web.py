"""The refinement web page: a small Starlette app over one `RefineSession` (jobs.refine).

The page shows an anchor patch, its place in the image and ten candidate patches; the
person says whether the anchor is a defect, marks the candidates that are the same, may
shift a candidate's centre onto the defect, undoes the last answer or retrains the patch
model. Every change goes through the session's own methods, which store it durably; this
module only checks requests and turns the session's answers into HTTP.

Security: the server listens on a loopback address only, and every route (the page
included) needs the session token, as ``?token=`` or an ``X-Token`` header; the page
carries it on to its own requests. The token is random per `serve` unless given.

Concurrency: the session is not thread-safe, so every call into it runs in a worker
thread under one lock (a retrain takes seconds; the event loop stays free meanwhile, and
the other requests wait for the lock instead of interleaving with it).

    from poolscout.jobs.refine import RefineSession
    from poolscout.jobs.refine_web import serve
    serve(RefineSession("runs/steel"), port=8765)   # prints http://127.0.0.1:8765/?token=...
"""
from __future__ import annotations

import html
import ipaddress
import json
import logging
import math
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from poolscout.jobs.refine import RefineError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024        # bytes: an answer is a few hundred
MAX_IDS = 1000              # patch ids in one answer's `same` / `shifts`
MAX_SHIFT = 100_000         # px: far beyond any patch; the session applies the real bound
OVERLAYS = ("mask", "pred", "none")
ANSWER_FIELDS = {"anchor_id", "anchor_label", "same", "shifts", "who"}
_INT = re.compile(r"-?[0-9]{1,19}")
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class BadRequest(ValueError):
    """A request refused before it reaches the session (answered 400, or `status`)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- responses
def _plain(obj: Any) -> Any:
    """`obj` with non-finite floats as None and NumPy scalars as Python numbers: JSON that a
    browser's JSON.parse accepts (it has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # a NumPy scalar
        return _plain(obj.item())
    return obj


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(_plain(obj), allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=_NO_STORE)


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


def script_json(obj: Any) -> str:
    """JSON to place inside a <script> element: `<`, `>` and `&` (and the two JavaScript line
    separators) as \\u escapes, so no value can close the element or open a comment."""
    s = json.dumps(_plain(obj), allow_nan=False)
    for ch in ("<", ">", "&", "\u2028", "\u2029"):
        s = s.replace(ch, f"\\u{ord(ch):04x}")
    return s


# --------------------------------------------------------------------------- request checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _query_int(request: Request, name: str, default: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not _INT.fullmatch(raw) or abs(int(raw)) > MAX_SHIFT:
        raise BadRequest(f"query parameter {name!r} must be an integer, got {raw!r}")
    return int(raw)


async def _body(request: Request, *, required: bool) -> dict:
    """The request's JSON object ({} for an empty body where that is allowed)."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
    if not raw.strip():
        if required:
            raise BadRequest("the request needs a JSON object body")
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _who(data: dict) -> str:
    who = data.get("who", "web")
    if not isinstance(who, str) or not 1 <= len(who) <= 64 or not who.isprintable():
        raise BadRequest("'who' must be a name of 1 to 64 printable characters")
    return who


def parse_answer(data: dict) -> dict:
    """The keyword arguments of `session.answer` from an /api/answer body, or BadRequest
    naming the first field that is missing or of the wrong type."""
    unknown = sorted(set(data) - ANSWER_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; an answer has "
                         f"{', '.join(sorted(ANSWER_FIELDS))}")
    anchor_id = data.get("anchor_id")
    if not isinstance(anchor_id, str) or not 1 <= len(anchor_id) <= 200:
        raise BadRequest("'anchor_id' must be the anchor's id (a string), as /api/anchor gave it")
    label = data.get("anchor_label")
    if not _is_int(label) or label not in (0, 1):
        raise BadRequest(f"'anchor_label' must be 0 (not a defect) or 1 (a defect), got {label!r}")
    same = data.get("same", [])
    if not isinstance(same, list) or len(same) > MAX_IDS or not all(_is_int(p) for p in same):
        raise BadRequest("'same' must be a list of patch ids (integers)")
    raw_shifts = data.get("shifts", {})
    if not isinstance(raw_shifts, dict) or len(raw_shifts) > MAX_IDS:
        raise BadRequest("'shifts' must be an object {\"<patch_id>\": [dx, dy]}")
    shifts: dict[int, tuple[int, int]] = {}
    for k, v in raw_shifts.items():
        if not _INT.fullmatch(k):
            raise BadRequest(f"'shifts' keys must be patch ids, got {k!r}")
        if (not isinstance(v, list) or len(v) != 2 or not all(_is_int(d) for d in v)
                or any(abs(d) > MAX_SHIFT for d in v)):
            raise BadRequest(f"the shift of patch {k} must be [dx, dy], two integers, got {v!r}")
        shifts[int(k)] = (v[0], v[1])
    return {"anchor_id": anchor_id, "anchor_label": label, "same": list(same), "shifts": shifts,
            "who": _who(data)}


# --------------------------------------------------------------------------- the app
class _TokenGate:
    """ASGI middleware: a request without the session token gets 403 and reaches nothing."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        req = Request(scope)
        given = req.query_params.get("token") or req.headers.get("x-token") or ""
        if secrets.compare_digest(given.encode(), self.token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        msg = ("missing token: open the URL that `poolscout refine` printed (it ends in ?token=...)"
               if not given else "wrong token: open the URL that `poolscout refine` printed")
        await _error(msg, 403)(scope, receive, send)


def make_app(session, token: str, *, title: str | None = None) -> Starlette:
    """The web app for `session` (a jobs.refine.RefineSession or anything with its methods),
    behind `token`. `title` defaults to the session's run folder name."""
    if not isinstance(token, str) or len(token) < 8:
        raise ValueError("refine web: the token must be a string of at least 8 characters")
    if title is None:
        root = getattr(getattr(session, "run", None), "root", None)
        title = f"poolscout refine: {Path(root).name}" if root is not None else "poolscout refine"
    lock = threading.Lock()

    def locked(fn: Callable, *args, **kwargs):
        with lock:
            return fn(*args, **kwargs)

    async def call(fn: Callable, *args, **kwargs):
        """`fn` under the session lock in a worker thread; a RefineError becomes a BadRequest
        with the session's status and message."""
        try:
            return await run_in_threadpool(locked, fn, *args, **kwargs)
        except RefineError as e:
            status = int(getattr(e, "status", 400))
            raise BadRequest(str(e), status if 400 <= status < 600 else 400) from None

    def handler(fn):
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except BadRequest as e:
                return _error(str(e), e.status)
            except Exception as e:  # a bug, not a bad request: say so, keep the server up
                log.exception("refine web: %s %s failed", request.method, request.url.path)
                return _error(f"internal error: {type(e).__name__}: {e}", 500)
        return endpoint

    async def page(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        body = (PAGE.replace("{{title}}", html.escape(title))
                .replace("{{config}}", script_json({"token": token}))
                .replace("{{nonce}}", nonce))
        csp = (f"default-src 'none'; img-src 'self' blob: data:; connect-src 'self'; "
               f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; base-uri 'none'; "
               f"form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(body, headers={**_NO_STORE, "Content-Security-Policy": csp})

    async def state(request: Request) -> Response:
        return _json(await call(session.state))

    async def anchor(request: Request) -> Response:
        return _json(await call(session.next_anchor))

    async def answer(request: Request) -> Response:
        kw = parse_answer(await _body(request, required=True))
        return _json(await call(session.answer, kw.pop("anchor_id"), **kw))

    async def undo(request: Request) -> Response:
        who = _who(await _body(request, required=False))
        return _json(await call(session.undo, who=who))

    async def retrain(request: Request) -> Response:
        await _body(request, required=False)
        return _json(await call(session.retrain))

    async def patch(request: Request) -> Response:
        pid = request.path_params["patch_id"]
        dx, dy = _query_int(request, "dx"), _query_int(request, "dy")
        png = await call(session.patch_png, pid, dx, dy)
        return Response(png, media_type="image/png", headers=_NO_STORE)

    async def image(request: Request) -> Response:
        raw = request.path_params["image_id"]
        if not _INT.fullmatch(raw):
            raise BadRequest(f"{raw!r} is not an image id", 404)
        overlay = request.query_params.get("overlay", "mask")
        if overlay not in OVERLAYS:
            raise BadRequest(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
        png = await call(session.image_png, int(raw), overlay)
        return Response(png, media_type="image/png", headers=_NO_STORE)

    routes = [
        Route("/", handler(page), methods=["GET"]),
        Route("/api/state", handler(state), methods=["GET"]),
        Route("/api/anchor", handler(anchor), methods=["GET"]),
        Route("/api/answer", handler(answer), methods=["POST"]),
        Route("/api/undo", handler(undo), methods=["POST"]),
        Route("/api/retrain", handler(retrain), methods=["POST"]),
        Route("/api/patch/{patch_id:int}.png", handler(patch), methods=["GET"]),
        Route("/api/image/{image_id}.png", handler(image), methods=["GET"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _error(f"{request.method} is not allowed on {request.url.path}", 405)
        return _error(f"no route {request.url.path}", status)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.add_middleware(_TokenGate, token=token)
    return app


# --------------------------------------------------------------------------- serving
def _loopback(host: str) -> str:
    """`host` when it is a loopback address ("localhost" as 127.0.0.1); ValueError otherwise:
    the page changes the session's answers and must not be reachable from other machines."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"refine web: host must be a loopback address (127.0.0.1, ::1 or localhost), got "
                         f"{host!r}; to reach the page from another machine, forward the port over SSH "
                         f"(ssh -L PORT:127.0.0.1:PORT)")
    return host


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise ValueError(f"refine web: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _url(host: str, sock: socket.socket, token: str) -> str:
    port = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    return f"http://{where}:{port}/?token={token}"


def _server(app, host: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, log_level="warning", access_log=False,
                                         lifespan="off", timeout_graceful_shutdown=2))


def serve(session, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          open_browser: bool = False) -> None:
    """Serve the page for `session` until interrupted (Ctrl-C). Prints the URL, token
    included; `port` 0 takes a free one; `token` None draws a random one."""
    host = _loopback(host)
    token = token or secrets.token_urlsafe(16)
    sock = _bind(host, port)
    url = _url(host, sock, token)
    print(f"poolscout refine: open {url}", flush=True)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    _server(make_app(session, token), host).run(sockets=[sock])


def start_in_thread(session, token: str, port: int = 0, *, host: str = "127.0.0.1",
                    timeout: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Serve `session` from a background thread; returns (url, stop) once the server
    accepts connections. `stop()` shuts it down and waits for the thread."""
    host = _loopback(host)
    sock = _bind(host, port)
    url = _url(host, sock, token)
    server = _server(make_app(session, token), host)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="refine-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("refine web: the server thread ended before it started (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"refine web: the server did not start within {timeout:.0f} s")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return url, stop


# --------------------------------------------------------------------------- the page
# One self-contained page: no build step, no external resources. Only {{title}} (HTML-escaped),
# {{config}} (script_json) and {{nonce}} are filled in. The script writes server data with
# textContent / dataset only, never as HTML.
PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{{title}}</title>
<style nonce="{{nonce}}">
  :root { --same: #1a7f37; --diff: #8c959f; --sel: #0969da; --bad: #cf222e; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
  header { display: flex; gap: 1.5em; align-items: baseline; flex-wrap: wrap; padding: .6em 1em;
           background: #fff; border-bottom: 1px solid #d0d7de; }
  header h1 { font-size: 1.1em; margin: 0; }
  #progress.due { color: #9a6700; font-weight: 600; }
  #error { color: var(--bad); font-weight: 600; white-space: pre-wrap; }
  #error:empty { display: none; }
  main { display: grid; grid-template-columns: minmax(260px, 360px) 1fr; gap: 1em; padding: 1em; }
  section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: .8em; }
  h2 { font-size: 1em; margin: 0 0 .5em; }
  img { image-rendering: pixelated; }
  #anchor { width: 256px; height: 256px; border: 2px solid #1f2328; display: block; background: #ddd; }
  #context-wrap { position: relative; display: inline-block; margin-top: .5em; overflow: hidden; }
  #context { display: block; max-width: 320px; width: 320px; background: #ddd; }
  #context-box { position: absolute; border: 2px solid #ffd33d; box-shadow: 0 0 0 1px #000; pointer-events: none; }
  .row { display: flex; gap: .6em; align-items: center; flex-wrap: wrap; margin: .5em 0; }
  .muted { color: #656d76; font-size: .9em; }
  #candidates { display: grid; grid-template-columns: repeat(5, minmax(120px, 1fr)); gap: .6em; }
  .cand { border: 3px solid var(--diff); border-radius: 6px; padding: .3em; background: #fff;
          cursor: pointer; user-select: none; outline: none; }
  .cand[data-same="1"] { border-color: var(--same); background: #dafbe1; }
  .cand.selected { box-shadow: 0 0 0 3px var(--sel); }
  .cand .view { position: relative; width: 128px; height: 128px; margin: 0 auto; cursor: move; }
  .cand .view img { width: 128px; height: 128px; display: block; background: #ddd; }
  .cand .cross { position: absolute; left: 50%; top: 50%; width: 14px; height: 14px; margin: -7px 0 0 -7px;
                 pointer-events: none; border: 2px solid #ffd33d; border-radius: 50%; box-shadow: 0 0 0 1px #000; }
  .cand .verdict { font-weight: 600; }
  .cand[data-same="1"] .verdict { color: var(--same); }
  button { font: inherit; padding: .35em 1em; border-radius: 6px; border: 1px solid #d0d7de; background: #f6f8fa; cursor: pointer; }
  button#submit { background: #1f883d; color: #fff; border-color: #1a7f37; }
  button:disabled { opacity: .5; cursor: progress; }
  label.toggle { font-weight: 600; }
</style>
</head>
<body data-busy="1">
<header>
  <h1>{{title}}</h1>
  <span id="progress">loading…</span>
  <span id="message" class="muted"></span>
  <span id="retrain-result"></span>
  <span id="error" role="alert"></span>
</header>
<main>
  <section>
    <h2>Anchor</h2>
    <img id="anchor" alt="anchor patch">
    <div id="anchor-info" class="muted"></div>
    <div class="row">
      <label class="toggle"><input type="checkbox" id="anchor-label"> the anchor is a defect</label>
    </div>
    <div class="row">
      <span id="context-caption" class="muted">image</span>
      <select id="overlay" title="what the image shows over the picture">
        <option value="mask">current mask</option>
        <option value="pred">model prediction</option>
        <option value="none">no overlay</option>
      </select>
    </div>
    <div id="context-wrap"><img id="context" alt="the patch's image"><div id="context-box"></div></div>
  </section>
  <section>
    <h2>Candidates: which are the same as the anchor?</h2>
    <p class="muted">Click a candidate to mark it same / different (Space does too). A selected candidate's
      centre moves with the arrow keys (Shift: 4 px) or by dragging its ring onto the defect; 0 resets it.</p>
    <div id="candidates"></div>
    <div class="row">
      <button id="submit" type="button">Submit</button>
      <button id="undo" type="button">Undo last answer</button>
      <button id="retrain" type="button">Retrain</button>
      <label class="muted">answered by <input id="who" size="10" maxlength="64" value="web"></label>
    </div>
  </section>
</main>
<script type="application/json" id="config">{{config}}</script>
<script nonce="{{nonce}}">
"use strict";
const CFG = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
let anchor = null;      // the /api/anchor answer on screen
let selected = null;    // the selected .cand element
let busy = false;
let focusItem = null;   // what the context image shows: {image_id, x, y, dx, dy, what}

function url(path, params) {
  const q = new URLSearchParams(Object.assign({}, params || {}, {token: CFG.token}));
  return path + "?" + q.toString();
}

async function api(method, path, body) {
  const opts = {method: method, headers: {"X-Token": CFG.token}, cache: "no-store"};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try { res = await fetch(path, opts); }
  catch (e) { throw new Error("the server does not answer (" + e.message + ")"); }
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const err = new Error((data && data.error) || ("HTTP " + res.status + " from " + path));
    err.status = res.status;
    throw err;
  }
  return data;
}

// Loads a PNG route into an <img>; a refusal raises the server's message instead of showing a
// broken image. When loads into one <img> overlap, the last one started wins (false for the others).
let loadSeq = 0;
async function loadPng(img, path, params) {
  const seq = String(++loadSeq);
  img.dataset.loading = seq;
  const res = await fetch(url(path, params), {cache: "no-store"});
  if (!res.ok) {
    let msg = "HTTP " + res.status + " from " + path;
    try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  const blobUrl = URL.createObjectURL(await res.blob());
  const probe = new Image();
  probe.src = blobUrl;
  try { await probe.decode(); }
  catch (e) { URL.revokeObjectURL(blobUrl); throw new Error("the server sent a broken PNG for " + path); }
  if (img.dataset.loading !== seq) { URL.revokeObjectURL(blobUrl); return false; }
  const old = img.dataset.blob;
  img.src = blobUrl;
  img.dataset.blob = blobUrl;
  try { await img.decode(); } catch (e) { /* replaced meanwhile */ }
  if (old) URL.revokeObjectURL(old);
  return true;
}

function showError(msg) { $("error").textContent = msg || ""; }
function say(msg) { $("message").textContent = msg || ""; }

function setBusy(on) {
  busy = on;
  document.body.dataset.busy = on ? "1" : "0";
  for (const id of ["submit", "undo", "retrain"]) $(id).disabled = on;
  if (!on && !anchor) $("submit").disabled = true;
}

// One action at a time; its failure is shown in #error.
async function act(what, fn) {
  if (busy) return;
  setBusy(true);
  try { await fn(); showError(""); }
  catch (e) { showError(what + ": " + e.message); }
  finally { setBusy(false); }
}

function fmt(v, digits) { return (v === null || v === undefined) ? "–" : Number(v).toFixed(digits); }

async function loadState() {
  const s = await api("GET", "/api/state");
  const p = $("progress");
  p.textContent = "answers " + s.answers + " · since retrain " + s.since_retrain + "/" + s.retrain_every
    + " · model v" + s.model_version + " · F1 " + fmt(s.f1, 3);
  p.classList.toggle("due", s.since_retrain >= s.retrain_every);
  p.title = s.since_retrain >= s.retrain_every ? "time to retrain" : "";
  p.dataset.answers = s.answers;
  p.dataset.modelVersion = s.model_version;
}

async function loadAnchor() {
  let a;
  try { a = await api("GET", "/api/anchor"); }
  catch (e) {
    if (e.status !== 409) throw e;
    anchor = null;
    $("anchor-info").textContent = e.message;
    $("candidates").replaceChildren();
    return;
  }
  anchor = a;
  selected = null;
  const an = a.anchor;
  const img = $("anchor");
  img.dataset.anchorId = a.anchor_id;
  img.dataset.patchId = an.patch_id;
  img.dataset.patch = a.patch;
  $("anchor-label").checked = an.label === 1;
  $("anchor-info").textContent = "patch " + an.patch_id + " · image " + an.image_id + " at (" + an.x + ", "
    + an.y + ") · p(defect) " + fmt(an.p_defect, 2) + " · now labelled " + (an.label === 1 ? "defect" : "background");
  const box = $("candidates");
  for (const old of box.querySelectorAll("img")) if (old.dataset.blob) URL.revokeObjectURL(old.dataset.blob);
  box.replaceChildren();
  const loads = [loadPng(img, "/api/patch/" + encodeURIComponent(an.patch_id) + ".png")];
  for (const c of a.candidates) {
    const el = candidate(c);
    box.appendChild(el);
    loads.push(loadPng(el.querySelector("img"), "/api/patch/" + encodeURIComponent(c.patch_id) + ".png"));
  }
  focusItem = {image_id: an.image_id, x: an.x, y: an.y, dx: 0, dy: 0, what: "anchor"};
  loads.push(showContext());
  await Promise.all(loads);
}

function candidate(c) {
  const el = document.createElement("div");
  el.className = "cand";
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  Object.assign(el.dataset, {patchId: c.patch_id, imageId: c.image_id, x: c.x, y: c.y, kind: c.kind,
                             same: "0", dx: "0", dy: "0"});
  el.setAttribute("aria-pressed", "false");
  const view = document.createElement("div");
  view.className = "view";
  const img = document.createElement("img");
  img.alt = "candidate patch " + c.patch_id;
  img.draggable = false;
  const cross = document.createElement("div");
  cross.className = "cross";
  view.append(img, cross);
  const verdict = document.createElement("div");
  verdict.className = "verdict";
  verdict.textContent = "different";
  const info = document.createElement("div");
  info.className = "muted";
  info.textContent = c.kind + " · p " + fmt(c.p_defect, 2) + " · " + (c.label === 1 ? "defect" : "bg");
  const shift = document.createElement("div");
  shift.className = "shift muted";
  shift.textContent = "shift (0, 0)";
  el.append(view, verdict, info, shift);
  el.addEventListener("click", () => {
    if (el.dataset.dragged === "1") { el.dataset.dragged = "0"; return; }
    select(el);
    el.focus({preventScroll: true});  // the arrow keys go to it (mousedown on the picture does not focus)
    toggleSame(el);
  });
  el.addEventListener("focus", () => select(el));
  view.addEventListener("mousedown", (e) => startDrag(e, el));
  return el;
}

function cands() { return Array.from(document.querySelectorAll("#candidates .cand")); }

function select(el) {
  if (selected === el) return;
  if (selected) selected.classList.remove("selected");
  selected = el;
  if (el) {
    el.classList.add("selected");
    focusItem = {image_id: el.dataset.imageId, x: +el.dataset.x, y: +el.dataset.y, dx: +el.dataset.dx,
                 dy: +el.dataset.dy, what: "candidate " + el.dataset.patchId};
  } else if (anchor) {
    const an = anchor.anchor;
    focusItem = {image_id: an.image_id, x: an.x, y: an.y, dx: 0, dy: 0, what: "anchor"};
  }
  showContext().catch((e) => showError("image: " + e.message));
}

function toggleSame(el) {
  const same = el.dataset.same !== "1";
  el.dataset.same = same ? "1" : "0";
  el.setAttribute("aria-pressed", same ? "true" : "false");
  el.querySelector(".verdict").textContent = same ? "same" : "different";
}

// Moves a candidate's centre to (dx, dy) from where the engine put it; the picture reloads
// first, so a shift the server refuses (outside the image) leaves the old one in place.
async function shiftTo(el, dx, dy) {
  const half = anchor ? Math.floor(anchor.patch / 2) : 16;
  dx = Math.max(-half, Math.min(half, dx));
  dy = Math.max(-half, Math.min(half, dy));
  if (dx === +el.dataset.wantDx && dy === +el.dataset.wantDy) return;
  const seq = String(Number(el.dataset.seq || 0) + 1);
  Object.assign(el.dataset, {seq: seq, wantDx: dx, wantDy: dy});
  try {
    await loadPng(el.querySelector("img"), "/api/patch/" + encodeURIComponent(el.dataset.patchId) + ".png",
                  {dx: dx, dy: dy});
  } catch (e) {
    if (el.dataset.seq === seq) Object.assign(el.dataset, {wantDx: el.dataset.dx, wantDy: el.dataset.dy});
    showError("shift: " + e.message);
    return;
  }
  if (el.dataset.seq !== seq) return;  // a later shift is on its way
  Object.assign(el.dataset, {dx: dx, dy: dy});
  el.querySelector(".shift").textContent = "shift (" + dx + ", " + dy + ")";
  showError("");
  if (selected === el) {
    focusItem.dx = dx; focusItem.dy = dy;
    placeBox();
  }
}

function shiftBy(el, ddx, ddy) {
  const dx = Number(el.dataset.wantDx ?? el.dataset.dx), dy = Number(el.dataset.wantDy ?? el.dataset.dy);
  return shiftTo(el, dx + ddx, dy + ddy);
}

let drag = null;
function startDrag(e, el) {
  if (e.button !== 0) return;
  e.preventDefault();
  drag = {el: el, x0: e.clientX, y0: e.clientY, moved: false};
}
document.addEventListener("mousemove", (e) => {
  if (!drag) return;
  const ddx = e.clientX - drag.x0, ddy = e.clientY - drag.y0;
  if (Math.abs(ddx) + Math.abs(ddy) > 3) drag.moved = true;
  drag.el.querySelector(".cross").style.transform = "translate(" + ddx + "px, " + ddy + "px)";
});
document.addEventListener("mouseup", (e) => {
  if (!drag) return;
  const d = drag;
  drag = null;
  d.el.querySelector(".cross").style.transform = "";
  if (!d.moved) return;  // a click: the click handler toggles
  d.el.dataset.dragged = "1";  // the click that ends a drag does not toggle
  setTimeout(() => { d.el.dataset.dragged = "0"; }, 0);
  select(d.el);
  d.el.focus({preventScroll: true});
  const img = d.el.querySelector("img");
  const scale = img.clientWidth / (anchor ? anchor.patch : 32);  // screen px per image px
  shiftBy(d.el, Math.round((e.clientX - d.x0) / scale), Math.round((e.clientY - d.y0) / scale));
});

const ARROWS = {ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1]};
document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "BUTTON")) return;
  if (!selected) return;
  if (e.key in ARROWS) {
    e.preventDefault();
    const step = e.shiftKey ? 4 : 1;
    shiftBy(selected, ARROWS[e.key][0] * step, ARROWS[e.key][1] * step);
  } else if (e.key === " " || e.key === "Enter") {
    e.preventDefault();
    toggleSame(selected);
  } else if (e.key === "0") {
    shiftTo(selected, 0, 0);
  } else if (e.key === "Escape") {
    selected.blur();
    select(null);
  }
});

async function showContext() {
  if (!focusItem) return;
  $("context-caption").textContent = focusItem.what + " · image " + focusItem.image_id;
  const overlay = $("overlay").value;
  if (await loadPng($("context"), "/api/image/" + encodeURIComponent(focusItem.image_id) + ".png",
                    {overlay: overlay})) {
    Object.assign($("context").dataset, {imageId: focusItem.image_id, overlay: overlay});
    placeBox();
  }
}

function placeBox() {
  const img = $("context"), box = $("context-box");
  if (!focusItem || !img.naturalWidth || !anchor) return;
  const s = img.clientWidth / img.naturalWidth, p = anchor.patch;
  const cx = focusItem.x + focusItem.dx, cy = focusItem.y + focusItem.dy;
  Object.assign(box.style, {left: ((cx - p / 2) * s) + "px", top: ((cy - p / 2) * s) + "px",
                            width: (p * s) + "px", height: (p * s) + "px"});
}

$("overlay").addEventListener("change", () => showContext().catch((e) => showError("image: " + e.message)));
window.addEventListener("resize", placeBox);

try { $("who").value = localStorage.getItem("poolscout-refine-who") || "web"; } catch (e) { /* no storage */ }
$("who").addEventListener("change", () => {
  try { localStorage.setItem("poolscout-refine-who", $("who").value); } catch (e) { /* no storage */ }
});
function who() { return $("who").value.trim() || "web"; }

$("submit").addEventListener("click", () => act("submit", async () => {
  if (!anchor) throw new Error("there is no anchor to answer");
  const same = [], shifts = {};
  for (const el of cands()) {
    if (el.dataset.same === "1") same.push(Number(el.dataset.patchId));
    const dx = Number(el.dataset.dx), dy = Number(el.dataset.dy);
    if (dx || dy) shifts[el.dataset.patchId] = [dx, dy];
  }
  let r;
  try {
    r = await api("POST", "/api/answer", {anchor_id: anchor.anchor_id, anchor_label: $("anchor-label").checked ? 1 : 0,
                                          same: same, shifts: shifts, who: who()});
  } catch (e) {
    if (e.status === 409) await loadAnchor();  // another tab answered it: show the current one
    throw e;
  }
  say("answer " + r.answer_id + " saved");
  await loadState();
  await loadAnchor();
}));

$("undo").addEventListener("click", () => act("undo", async () => {
  const r = await api("POST", "/api/undo", {who: who()});
  say("answer " + r.undone + " undone");
  await loadState();
  await loadAnchor();
}));

$("retrain").addEventListener("click", () => act("retrain", async () => {
  say("retraining…");
  $("retrain-result").textContent = "";
  const r = await api("POST", "/api/retrain");
  const res = $("retrain-result");
  res.textContent = "model v" + r.model_version + " from " + r.answers_used + " answers in " + fmt(r.seconds, 1)
    + " s · F1 " + fmt(r.f1, 3);
  res.dataset.modelVersion = r.model_version;
  say("");
  await loadState();
  await loadAnchor();
}));

act("loading", async () => { await loadState(); await loadAnchor(); });
</script>
</body>
</html>
"""
