"""The refinement web page (jobs.refine_web): the HTTP layer against a fake session whose
every call is recorded (the token gate, each route, refusals that must not reach the
session), and one round in a real headless Chromium against a real uvicorn server."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from poolscout.jobs import refine as refine_mod
from poolscout.jobs.refine import RefineError
from poolscout.jobs.refine_web import make_app, script_json, serve, start_in_thread

TOKEN = "test-token-0123456789"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MUTATING = {"answer", "undo", "retrain"}


# --------------------------------------------------------------------------- a fake session
class FakeSession:
    """RefineSession's web interface over 60 patches in two 64x64 images, with the real one's
    refusals (stale anchor 409, foreign candidate 400, nothing to undo 409, unknown id 404,
    outside the image 400). `calls` records every method called, in order."""

    patch = 16
    size = 64

    def __init__(self, n_patches: int = 60, retrain_every: int = 5, retrain_seconds: float = 0.0):
        self.n, self.retrain_every, self.retrain_seconds = n_patches, retrain_every, retrain_seconds
        self.images = {101: 60, 102: 160}  # image id -> grey level
        self.calls: list[str] = []
        self.live: list[dict] = []
        self.events = 0
        self.version = 0
        self.used = 0
        self._anchor = None
        self.active = 0
        self.max_active = 0

    def _track(self, name):
        self.calls.append(name)
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    def _done(self):
        self.active -= 1

    def _info(self, p: int, kind: str | None = None) -> dict:
        d = {"patch_id": p, "image_id": str(101 + p % 2), "x": 4 + (p * 7) % 56, "y": 4 + (p * 5) % 56,
             "label": p % 2, "p_defect": round(p / self.n, 3)}
        if kind:
            d["kind"] = kind
        return d

    def state(self) -> dict:
        self._track("state")
        self._done()
        return {"answers": len(self.live), "since_retrain": len(self.live) - self.used,
                "retrain_every": self.retrain_every, "model_version": self.version, "mode": "c",
                "anchors": "random", "patch": self.patch, "f1": float("nan") if self.version == 0 else 0.5,
                "images": [str(i) for i in self.images]}

    def next_anchor(self) -> dict:
        self._track("next_anchor")
        self._done()
        if self._anchor is None:
            a = (self.events * 11) % self.n
            cands = [(a + 1 + k) % self.n for k in range(10)]
            self._anchor = {"anchor_id": f"{self.version}.{self.events}.{a}", "patch": self.patch,
                            "anchor": self._info(a),
                            "candidates": [self._info(p, "positive" if k < 5 else "negative")
                                           for k, p in enumerate(cands)]}
        return self._anchor

    def answer(self, anchor_id, *, anchor_label, same, shifts, who="web") -> dict:
        self._track("answer")
        try:
            cur = self._anchor
            if cur is None or anchor_id != cur["anchor_id"]:
                raise RefineError(f"anchor {anchor_id!r} is not the current one", 409)
            ids = [c["patch_id"] for c in cur["candidates"]]
            for p in list(same) + list(shifts):
                if p not in ids:
                    raise RefineError(f"patch {p} is not a candidate of anchor {anchor_id}")
            for p, (dx, dy) in shifts.items():
                c = self._info(p)
                if not (0 <= c["x"] + dx < self.size and 0 <= c["y"] + dy < self.size):
                    raise RefineError(f"shifting patch {p} by ({dx}, {dy}) leaves the image")
            self.events += 1
            self.live.append({"answer_id": self.events, "anchor_patch": cur["anchor"]["patch_id"],
                              "anchor_label": anchor_label, "candidates": ids, "same": sorted(same),
                              "shifts": {str(k): list(v) for k, v in shifts.items()}, "who": who, "time": "now"})
            self._anchor = None
            return {"answer_id": self.events, "answers": len(self.live),
                    "since_retrain": len(self.live) - self.used}
        finally:
            self._done()

    def undo(self, who: str = "web") -> dict:
        self._track("undo")
        self._done()
        if len(self.live) <= self.used:
            raise RefineError("there is no answer to undo", 409)
        last = self.live.pop()
        self.events += 1
        self._anchor = None
        return {"undone": last["answer_id"], "answers": len(self.live)}

    def retrain(self) -> dict:
        self._track("retrain")
        time.sleep(self.retrain_seconds)
        self._done()
        self.version += 1
        self.used = len(self.live)
        self._anchor = None
        return {"model_version": self.version, "seconds": self.retrain_seconds, "f1": 0.5,
                "answers_used": self.used}

    def patch_png(self, patch_id: int, dx: int = 0, dy: int = 0) -> bytes:
        self._track("patch_png")
        self._done()
        if not 0 <= patch_id < self.n:
            raise RefineError(f"no patch {patch_id}", 404)
        c = self._info(patch_id)
        if not (0 <= c["x"] + dx < self.size and 0 <= c["y"] + dy < self.size):
            raise RefineError(f"a shift by ({dx}, {dy}) moves patch {patch_id} outside its image")
        arr = np.full((self.patch, self.patch), (patch_id * 4 + dx * 16 + dy) % 256, np.uint8)
        return _png(arr)

    def image_png(self, image_id, overlay: str = "mask") -> bytes:
        self._track("image_png")
        self._done()
        if int(image_id) not in self.images:
            raise RefineError(f"no image {image_id}", 404)
        if overlay not in ("mask", "pred", "none"):
            raise RefineError(f"bad overlay {overlay!r}")
        return _png(np.full((self.size, self.size), self.images[int(image_id)], np.uint8))

    def answers(self) -> list[dict]:
        return [dict(a) for a in self.live]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def fake():
    return FakeSession()


@pytest.fixture
def client(fake):
    with TestClient(make_app(fake, TOKEN), headers={"X-Token": TOKEN}) as c:
        yield c


def _answer_body(anchor: dict, **kw) -> dict:
    c = anchor["candidates"]
    return {"anchor_id": anchor["anchor_id"], "anchor_label": 1, "same": [c[0]["patch_id"]],
            "shifts": {}, **kw}


# --------------------------------------------------------------------------- the token
ROUTES = [("GET", "/"), ("GET", "/api/state"), ("GET", "/api/anchor"), ("POST", "/api/answer"),
          ("POST", "/api/undo"), ("POST", "/api/retrain"), ("GET", "/api/patch/3.png"),
          ("GET", "/api/image/101.png"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_refuses_a_missing_or_wrong_token_and_reaches_nothing(fake, method, path):
    with TestClient(make_app(fake, TOKEN)) as c:
        for kw in ({}, {"params": {"token": "wrong"}}, {"headers": {"X-Token": TOKEN[:-1]}},
                   {"params": {"token": ""}}):
            r = c.request(method, path, json={"anchor_id": "0.0.0", "anchor_label": 1}, **kw)
            assert r.status_code == 403, (kw, r.text)
            assert "token" in r.json()["error"]
    assert fake.calls == []


def test_the_token_is_accepted_as_query_or_header(fake):
    with TestClient(make_app(fake, TOKEN)) as c:
        assert c.get("/api/state", params={"token": TOKEN}).status_code == 200
        assert c.get("/api/state", headers={"X-Token": TOKEN}).status_code == 200
    with pytest.raises(ValueError, match="token"):
        make_app(fake, "short")


# --------------------------------------------------------------------------- happy paths
def test_page_is_self_contained_and_escapes_what_it_embeds(fake):
    token = 'tok</script><script>alert("x")</script>&'
    with TestClient(make_app(fake, token, title='<img src=x onerror="alert(1)">')) as c:
        r = c.get("/", params={"token": token})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<img src=x" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "</script><script>alert" not in page
    config = re.search(r'<script type="application/json" id="config">(.*?)</script>', page, re.DOTALL).group(1)
    assert json.loads(config) == {"token": token}
    # no external resources, and the stable ids the tests and people rely on
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for id_ in ("anchor", "anchor-label", "candidates", "submit", "undo", "retrain", "progress", "error", "context"):
        assert f'id="{id_}"' in page
    csp = r.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in page and "default-src 'none'" in csp
    assert r.headers["cache-control"] == "no-store"


def test_script_json_cannot_leave_its_script_element():
    s = script_json({"a": "</script><!-- & \u2028"})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"a": "</script><!-- & \u2028"}


def test_state_anchor_answer_undo_retrain(client, fake):
    st = client.get("/api/state").json()
    assert st["answers"] == 0 and st["f1"] is None  # NaN goes out as null: browsers' JSON.parse has no NaN
    a = client.get("/api/anchor").json()
    assert client.get("/api/anchor").json() == a  # the same anchor until answered
    c = [x["patch_id"] for x in a["candidates"]]
    body = {"anchor_id": a["anchor_id"], "anchor_label": 0, "same": [c[0], c[2]],
            "shifts": {str(c[1]): [1, -2]}, "who": "alice"}
    r = client.post("/api/answer", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer_id": 1, "answers": 1, "since_retrain": 1}
    got = fake.answers()[0]
    assert got["anchor_label"] == 0 and got["same"] == sorted([c[0], c[2]])
    assert got["shifts"] == {str(c[1]): [1, -2]} and got["who"] == "alice"
    # "who" defaults to "web"
    b = client.get("/api/anchor").json()
    assert b["anchor_id"] != a["anchor_id"]
    assert client.post("/api/answer", json=_answer_body(b)).status_code == 200
    assert fake.answers()[1]["who"] == "web"
    r = client.post("/api/undo", json={"who": "alice"})
    assert r.status_code == 200 and r.json() == {"undone": 2, "answers": 1}
    assert client.post("/api/undo").status_code == 200  # an empty body is fine
    r = client.post("/api/retrain")
    assert r.status_code == 200 and r.json()["model_version"] == 1
    st = client.get("/api/state").json()
    assert st["model_version"] == 1 and st["answers"] == 0 and st["f1"] == 0.5


def test_patch_and_image_pngs(client, fake):
    r = client.get("/api/patch/3.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(PNG_MAGIC)
    shifted = client.get("/api/patch/3.png", params={"dx": 1, "dy": -2})
    assert shifted.status_code == 200 and shifted.content != r.content
    assert np.asarray(Image.open(io.BytesIO(shifted.content)))[0, 0] == (3 * 4 + 16 - 2) % 256
    for overlay in ("mask", "pred", "none"):
        r = client.get("/api/image/101.png", params={"overlay": overlay})
        assert r.status_code == 200 and r.content.startswith(PNG_MAGIC)
    assert client.get("/api/image/102.png").status_code == 200  # overlay defaults to the mask


# --------------------------------------------------------------------------- refusals
DROP = "<drop this field>"
BAD_ANSWERS = [
    ("not json", b"{anchor_id: 1"),
    ("a list", []),
    ("empty", b""),
    ("no anchor_id", {"anchor_id": DROP}),
    ("anchor_id an int", {"anchor_id": 3, "anchor_label": 1}),
    ("label 2", {"anchor_label": 2}),
    ("label true", {"anchor_label": True}),
    ("label a string", {"anchor_label": "1"}),
    ("label missing", {"anchor_label": DROP}),
    ("same not a list", {"same": 5}),
    ("same with a string", {"same": ["5"]}),
    ("same with a float", {"same": [5.0]}),
    ("same with a bool", {"same": [True]}),
    ("shifts a list", {"shifts": [[1, 2]]}),
    ("shift key not an id", {"shifts": {"x": [1, 0]}}),
    ("shift of one number", {"shifts": {"SAME0": [1]}}),
    ("shift of floats", {"shifts": {"SAME0": [1.5, 0]}}),
    ("shift of strings", {"shifts": {"SAME0": ["1", 0]}}),
    ("who a number", {"who": 7}),
    ("who empty", {"who": ""}),
    ("who too long", {"who": "x" * 65}),
    ("unknown field", {"label": 1}),
]


@pytest.mark.parametrize("name,body", BAD_ANSWERS, ids=[n for n, _ in BAD_ANSWERS])
def test_malformed_answers_are_400_and_never_reach_the_session(client, fake, name, body):
    a = client.get("/api/anchor").json()
    if isinstance(body, dict):
        good = _answer_body(a)
        body = {k: v for k, v in {**good, **body}.items() if v != DROP}
        if "shifts" in body and isinstance(body["shifts"], dict) and "SAME0" in body["shifts"]:
            body["shifts"] = {str(a["candidates"][0]["patch_id"]): body["shifts"]["SAME0"]}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/api/answer", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    assert not MUTATING & set(fake.calls)
    assert fake.answers() == []


def test_refine_errors_answer_with_their_status(client, fake):
    a = client.get("/api/anchor").json()
    stale = client.post("/api/answer", json=_answer_body(a, anchor_id="9.9.9"))
    assert stale.status_code == 409 and "not the current one" in stale.json()["error"]
    foreign = client.post("/api/answer", json=_answer_body(a, same=[a["anchor"]["patch_id"]]))
    assert foreign.status_code == 400 and "not a candidate" in foreign.json()["error"]
    assert fake.answers() == []
    assert client.post("/api/undo").status_code == 409
    assert client.get("/api/patch/999.png").status_code == 404
    outside = client.get("/api/patch/0.png", params={"dx": -50})  # patch 0 is centred at x = 4
    assert outside.status_code == 400 and "outside" in outside.json()["error"]
    assert client.get("/api/image/103.png").status_code == 404


def test_bad_urls_and_queries(client, fake):
    for path, status in (("/api/image/101.png?overlay=heat", 400), ("/api/patch/3.png?dx=1.5", 400),
                         ("/api/patch/3.png?dy=x", 400), ("/api/image/abc.png", 404), ("/api/patch/-1.png", 404),
                         ("/api/nothing", 404)):
        r = client.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]
    r = client.get("/api/answer")
    assert r.status_code == 405 and r.json()["error"]
    assert client.post("/api/undo", content=b"[1]").status_code == 400
    assert client.post("/api/undo", json={"who": 3}).status_code == 400
    assert client.post("/api/answer", content=b"x" * 70_000).status_code == 413
    assert not MUTATING & set(fake.calls)


def test_a_crash_in_the_session_is_a_json_500_and_the_server_goes_on(fake):
    def broken():
        raise KeyError("boom")

    fake.state = broken
    with TestClient(make_app(fake, TOKEN), headers={"X-Token": TOKEN}) as c:
        r = c.get("/api/state")
        assert r.status_code == 500 and "KeyError" in r.json()["error"]
        assert c.get("/api/anchor").status_code == 200


# --------------------------------------------------------------------------- serving
def test_session_calls_never_overlap(tmp_path):
    fake = FakeSession(retrain_seconds=0.3)
    url, stop = start_in_thread(fake, TOKEN)
    try:
        base = url.split("/?")[0]
        out = []

        def hit(path, method):
            out.append(httpx.request(method, base + path, headers={"X-Token": TOKEN}, timeout=20).status_code)

        threads = [threading.Thread(target=hit, args=p) for p in
                   [("/api/retrain", "POST"), ("/api/state", "GET"), ("/api/anchor", "GET"),
                    ("/api/retrain", "POST"), ("/api/patch/1.png", "GET")]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == [200] * 5
        assert fake.max_active == 1
        assert httpx.get(url).status_code == 200  # the printed URL opens the page
    finally:
        stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com", ""])
def test_serve_refuses_any_host_but_loopback(fake, host):
    with pytest.raises(ValueError, match="loopback"):
        serve(fake, host=host)
    with pytest.raises(ValueError, match="loopback"):
        start_in_thread(fake, TOKEN, host=host)


# --------------------------------------------------------------------------- a real browser
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_session(tmp_path):
    """The session the browser drives: the real engine on a tiny synthetic run where
    jobs.refine has demo_session, else the fake."""
    if hasattr(refine_mod, "demo_session"):
        return refine_mod.demo_session(tmp_path / "demo", steps=3)
    return FakeSession()


def _driver(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        msg = f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("POOLSCOUT_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_a_refinement_round_in_a_real_browser(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with contextlib.ExitStack() as cleanup:
        driver = _driver(tmp_path)  # before the session: a missing browser skips at once
        cleanup.callback(driver.quit)
        session = _browser_session(tmp_path)
        url, stop = start_in_thread(session, TOKEN)
        cleanup.callback(stop)
        wait = WebDriverWait(driver, 30, poll_frequency=0.05)

        def el(id_):
            return driver.find_element(By.ID, id_)

        def idle():
            return driver.execute_script("return document.body.dataset.busy") == "0"

        def answers_shown(n):
            wait.until(lambda d: idle() and el("progress").get_attribute("data-answers") == str(n))

        driver.get(url)
        answers_shown(0)
        assert el("error").text == ""
        expected = []  # (anchor patch, label, same ids, shifts) per submitted answer
        shifted = None
        for i in range(10):
            anchor = el("anchor")
            assert anchor.get_attribute("data-anchor-id")
            cands = driver.find_elements(By.CSS_SELECTOR, "#candidates .cand")
            assert len(cands) == 10
            label = 1 if el("anchor-label").is_selected() else 0
            if i == 3:  # the person disagrees with the mask once
                el("anchor-label").click()
                label = 1 - label
            same = {int(cands[i % 5].get_attribute("data-patch-id")), int(cands[5 + i % 3].get_attribute("data-patch-id"))}
            for k in sorted({i % 5, 5 + i % 3}):
                cands[k].click()
                assert cands[k].get_attribute("data-same") == "1"
            shifts = {}
            if i == 5:  # move candidate 9's centre 5 px sideways (1 + 4 with shift) and 1 px vertically
                c = cands[9]
                c.click()
                c.click()  # select it, and back to "different"
                assert c.get_attribute("data-same") == "0"
                x, y = int(c.get_attribute("data-x")), int(c.get_attribute("data-y"))
                kx, sx = (Keys.ARROW_RIGHT, 1) if x <= 16 else (Keys.ARROW_LEFT, -1)
                ky, sy = (Keys.ARROW_DOWN, 1) if y <= 16 else (Keys.ARROW_UP, -1)
                ActionChains(driver).send_keys(kx).perform()
                wait.until(lambda d, c=c, sx=sx: c.get_attribute("data-dx") == str(sx))
                ActionChains(driver).key_down(Keys.SHIFT).send_keys(kx).key_up(Keys.SHIFT).send_keys(ky).perform()
                wait.until(lambda d, c=c, want=(str(5 * sx), str(sy)):
                           (c.get_attribute("data-dx"), c.get_attribute("data-dy")) == want)
                assert f"({5 * sx}, {sy})" in c.text
                shifted = int(c.get_attribute("data-patch-id"))
                shifts = {shifted: (5 * sx, sy)}
            if i == 7:  # drag candidate 8's ring 2 image px sideways
                c = cands[8]
                img = c.find_element(By.CSS_SELECTOR, ".view img")
                per_px = img.size["width"] / int(anchor.get_attribute("data-patch"))  # screen px per image px
                sx = 1 if int(c.get_attribute("data-x")) <= 16 else -1
                ActionChains(driver).click_and_hold(img).move_by_offset(round(sx * per_px), 0) \
                    .move_by_offset(round(sx * per_px), 0).release().perform()
                wait.until(lambda d, c=c, want=str(2 * sx): c.get_attribute("data-dx") == want)
                assert c.get_attribute("data-same") == "0"  # the click that ends a drag is no toggle
                shifts = {int(c.get_attribute("data-patch-id")): (2 * sx, 0)}
            expected.append((int(anchor.get_attribute("data-patch-id")), label, same, shifts))
            el("submit").click()
            answers_shown(i + 1)
            assert el("error").text == "", el("error").text
        el("undo").click()
        answers_shown(9)
        el("retrain").click()
        wait.until(lambda d: idle() and el("retrain-result").get_attribute("data-model-version") == "1")
        assert "model v1" in el("retrain-result").text
        assert el("error").text == ""
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []  # no CSP or JS errors
        el("undo").click()  # the answers went into the model: the session refuses (409), the page says so
        wait.until(lambda d: idle() and el("error").text.startswith("undo: "))
        assert el("progress").get_attribute("data-answers") == "9"
        Select(el("overlay")).select_by_value("pred")  # the context image with the model's prediction
        wait.until(lambda d: idle() and el("context").get_attribute("data-overlay") == "pred")
        shot = tmp_path / "refine.png"
        assert driver.save_screenshot(str(shot))

    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 0
    got = session.answers()
    assert len(got) == 9  # ten submitted, the last undone
    for a, (anchor_patch, label, same, shifts) in zip(got, expected[:9]):
        assert a["anchor_patch"] == anchor_patch and a["anchor_label"] == label and a["who"] == "web"
        assert set(a["same"]) == same
        assert {int(k): tuple(v) for k, v in (a["shifts"] or {}).items()} == shifts
    assert shifted is not None and any(str(shifted) in a["shifts"] for a in got)
    assert session.state()["model_version"] == 1
