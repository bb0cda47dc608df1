"""Safety of the review app: binding, login, which files it serves, escaping."""

from __future__ import annotations

import http.cookiejar
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from store.db import open_db, utc_now
from ui.security import (
    ImageRefusedError, SecurityError, check_bind, escape_text, image_url, parse_auth, resolve_image,
)
from ui_store_builder import build_review_store


def test_bind_beyond_loopback_needs_auth():
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    with pytest.raises(SecurityError, match="--auth"):
        check_bind("0.0.0.0", None)
    with pytest.raises(SecurityError):
        check_bind("192.168.1.5", [])
    check_bind("0.0.0.0", [("a", "b")])


def test_parse_auth_inline_and_file(tmp_path):
    assert parse_auth(None) is None
    assert parse_auth("ann:se:cret") == [("ann", "se:cret")]
    users = tmp_path / "users.txt"
    users.write_text("# reviewers\nann:one\n\nbob:two\n")
    assert parse_auth(str(users)) == [("ann", "one"), ("bob", "two")]
    users.write_text("ann:one\nbroken\n")
    with pytest.raises(SecurityError, match="line 2"):
        parse_auth(str(users))
    with pytest.raises(SecurityError):
        parse_auth("nopassword:")


def test_escape_text_defuses_html_and_template_syntax():
    out = escape_text("<script>x</script> ${a} {{b}} `c` \"q\" 'q'")
    for bad in ("<", ">", "${", "{{", "`", '"', "'"):
        assert bad not in out
    assert image_url("ab/../c") == "/g4c/image/ab%2F..%2Fc"


def _add_image(db, image_id, path, root):
    db.execute(
        "INSERT INTO images (id, name, path, root, created_at) VALUES (?, ?, ?, ?, ?)",
        [image_id, image_id, str(path), str(root) if root else None, utc_now()],
    )


def test_resolve_image_refuses_crafted_rows(tmp_path):
    info = build_review_store(tmp_path, 1)
    db = open_db(info["db_path"])
    good = db.execute("SELECT id FROM images LIMIT 1").fetchone()[0]
    assert resolve_image(db, good).media_type == "image/png"
    root = tmp_path / "dataset"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    text_as_png = root / "images" / "notes.png"
    text_as_png.write_text("password=hunter2")
    link = root / "images" / "link.png"
    os.symlink(secret, link)
    _add_image(db, "outside", secret, root)                       # path outside its root
    _add_image(db, "dotdot", root / "images" / ".." / ".." / "secret.png", root)
    _add_image(db, "symlink", link, root)                         # symlink out of the root
    _add_image(db, "passwd", "/etc/passwd", None)                 # no root: not an image
    _add_image(db, "fake", text_as_png, root)                     # right place, not an image
    for image_id, why in [("outside", "outside"), ("dotdot", "outside"), ("symlink", "outside"),
                          ("passwd", "image file extension"), ("fake", "not an image"),
                          ("missing", "not in the store")]:
        with pytest.raises(ImageRefusedError, match=why):
            resolve_image(db, image_id)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ui.server import AppServer

    root = tmp_path_factory.mktemp("sec")
    info = build_review_store(root, 2)
    db = open_db(info["db_path"])
    _add_image(db, "outside", "/etc/hostname", root / "dataset")
    with AppServer(info["db_path"], auth=[("ann", "pw1")]) as server:
        yield server, info, db


def _get(url, opener=None):
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_refuses_paths_outside_the_dataset_and_requires_login(served):
    server, info, db = served
    image_id = db.execute("SELECT id FROM images WHERE path LIKE '%ref0.png'").fetchone()[0]
    # not logged in: no image, no page data
    assert _get(server.url + f"g4c/image/{image_id}")[0] == 401
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    bad_login = urllib.parse.urlencode({"username": "ann", "password": "wrong"}).encode()
    try:
        opener.open(server.url + "login", data=bad_login, timeout=10)
        raise AssertionError("a wrong password was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code in (400, 401)
    login = urllib.parse.urlencode({"username": "ann", "password": "pw1"}).encode()
    assert opener.open(server.url + "login", data=login, timeout=10).status == 200
    status, body = _get(server.url + f"g4c/image/{image_id}", opener)
    assert status == 200 and body.startswith(b"\x89PNG")
    crafted = [
        "g4c/image/outside",                                     # a row pointing outside its root
        "g4c/image/..%2F..%2F..%2Fetc%2Fpasswd",
        "g4c/image/../../etc/passwd",
        "gradio_api/file=/etc/passwd",
        f"gradio_api/file={info['image_dir']}/ref0.png",          # only by id, never by path
        f"gradio_api/file={info['db_path']}",
        "gradio_api/file=http://example.com/x.png",               # the server fetches nothing
        "gradio_api/file=HTTPS://example.com/x.png",
        "gradio_api/file=%68ttp://example.com/x.png",
    ]
    for path in crafted:
        status, body = _get(server.url + path, opener)
        assert status in (403, 404), (path, status)
        assert b"root:" not in body
        if "example.com" in path:  # refused before Gradio could fetch it
            assert body == b"remote files are not served", path
    # A refusal says why without showing where files lie on the server.
    status, body = _get(server.url + "g4c/image/outside", opener)
    assert status == 404 and b"outside its dataset folder" in body, body
    assert b"/etc/hostname" not in body and str(info["db_path"].parent).encode() not in body, body


def test_app_command_refuses_an_open_address_without_login(tmp_path):
    from good4cir.cli import CommandError, main

    info = build_review_store(tmp_path, 1)
    with pytest.raises(CommandError, match="--auth"):
        main(["app", "--db", str(info["db_path"]), "--host", "0.0.0.0"])
    bad = tmp_path / "users.txt"
    bad.write_text("no-colon-here\n")
    with pytest.raises(CommandError, match="line 1"):
        main(["app", "--db", str(info["db_path"]), "--host", "0.0.0.0", "--auth", str(bad)])
    with pytest.raises(FileNotFoundError, match="no such store; create one with `good4cir import`"):
        main(["app", "--db", str(tmp_path / "missing.db")])
    with pytest.raises(CommandError, match="good4cir index"):
        main(["app", "--db", str(info["db_path"]), "--index", str(tmp_path / "no-index")])
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("these are notes, not a store\n" * 20)
    from store import StoreError
    with pytest.raises(StoreError, match="notes.db: not a good4cir store"):
        main(["app", "--db", str(not_a_store)])


def _login(url, user, password):
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    try:
        with urllib.request.urlopen(url + "login", data=data, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_wrong_user_and_a_wrong_password_get_the_same_answer_after_the_same_work(served, monkeypatch):
    import hmac

    server, _, _ = served
    real, compared = hmac.compare_digest, []

    def counting(a, b):
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    answers = set()
    for user, password in [("nobody", "pw1"), ("ann", "wrong"), ("ann", "pw1-and-longer")]:
        compared.clear()
        status, body = _login(server.url, user, password)
        answers.add((status, body, len(compared)))
    # One answer, after as many comparisons, whichever part was wrong: a name is not
    # answered sooner for not existing (Gradio's own check compares nothing then).
    assert len(answers) == 1, answers
    status, _, count = answers.pop()
    assert status == 400 and count > 0
    assert _login(server.url, "ann", "pw1")[0] == 200


def test_users_file_with_a_bom_or_not_utf8_or_unreadable(tmp_path):
    users = tmp_path / "users.txt"
    users.write_bytes("\ufeffann:one\r\nbob:tw\u00f6\r\n".encode("utf-8"))
    assert parse_auth(str(users)) == [("ann", "one"), ("bob", "tw\u00f6")]
    users.write_bytes(b"ann:caf\xe9\n")
    with pytest.raises(SecurityError, match=r"users\.txt: cannot read the users file: not UTF-8"):
        parse_auth(str(users))
    with pytest.raises(SecurityError, match="no such file"):
        parse_auth(str(tmp_path / "typo.txt"))
    if os.geteuid() != 0:  # root reads anything
        users.write_text("ann:one\n")
        users.chmod(0)
        with pytest.raises(SecurityError, match="cannot read the users file"):
            parse_auth(str(users))


def _retrieve_call(url, opener, upload):
    """The Retrieve tab's API ('retrieve') called as a crafted client would; its SSE answer."""
    body = json.dumps({"data": [None, upload, "make it red", 5]}).encode()
    request = urllib.request.Request(url + "gradio_api/call/retrieve", data=body,
                                     headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=10) as response:
        event_id = json.loads(response.read())["event_id"]
    with opener.open(url + f"gradio_api/call/retrieve/{event_id}", timeout=30) as response:
        return response.read().decode()


def test_an_api_call_cannot_make_the_app_open_a_file_that_was_not_uploaded(served, tmp_path):
    import uuid

    from PIL import Image
    from gradio.utils import get_upload_folder

    server, _, _ = served
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = urllib.parse.urlencode({"username": "ann", "password": "pw1"}).encode()
    opener.open(server.url + "login", data=login, timeout=10)
    secret = tmp_path / f"secret-{uuid.uuid4().hex}.png"
    Image.new("RGB", (16, 16), "red").save(secret)
    for upload in ({"path": str(secret)}, {"path": str(secret), "meta": {"_type": "gradio.FileData"}}):
        answer = _retrieve_call(server.url, opener, upload)
        # Refused before it is opened: not read (that would go on to "no retrieval index"),
        # and not copied into Gradio's cache, which the app serves.
        assert "no retrieval index" not in answer, (upload, answer)
        assert "event: error" in answer
        assert list(Path(get_upload_folder()).glob(f"*/{secret.name}")) == []
    # A real upload still reaches the search (which then says there is no index).
    boundary = "g4cboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + secret.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + "gradio_api/upload", data=form,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with opener.open(request, timeout=10) as response:
        uploaded = json.loads(response.read())[0]
    answer = _retrieve_call(server.url, opener, {"path": uploaded, "meta": {"_type": "gradio.FileData"}})
    assert "no retrieval index" in answer, answer


def test_without_a_login_the_app_answers_only_to_its_loopback_names(tmp_path):
    import http.client

    from ui.security import loopback_host_header
    from ui.server import AppServer

    for header in ("127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", "::1", "127.0.0.2", None):
        assert loopback_host_header(header), header
    for header in ("evil.example:7860", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]:80", "0.0.0.0"):
        assert not loopback_host_header(header), header
    info = build_review_store(tmp_path, 1)

    def status(port, host):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/config", headers={"Host": host})
        response = connection.getresponse()
        response.read()
        connection.close()
        return response.status

    with AppServer(info["db_path"]) as server:
        # a page at evil.example re-pointed to 127.0.0.1 (DNS rebinding) gets nothing
        assert status(server.port, f"evil.example:{server.port}") == 403
        assert status(server.port, f"127.0.0.1:{server.port}") == 200
        assert status(server.port, f"localhost:{server.port}") == 200


def test_failed_logins_from_one_address_are_throttled(tmp_path, monkeypatch):
    # Without a limit a guesser could try passwords as fast as the server answers.
    import time

    import ui.security as security
    from ui.server import AppServer

    monkeypatch.setattr(security, "LOGIN_FAILURES_ALLOWED", 3)
    monkeypatch.setattr(security, "LOGIN_WINDOW_S", 1.5)
    info = build_review_store(tmp_path, 1)
    with AppServer(info["db_path"], auth=[("ann", "pw1")]) as server:
        assert [_login(server.url, "ann", f"guess{i}")[0] for i in range(3)] == [400, 400, 400]
        status, body = _login(server.url, "ann", "pw1")  # even the right password waits
        assert status == 429 and b"too many failed logins" in body
        time.sleep(1.6)
        assert _login(server.url, "ann", "pw1")[0] == 200
        # A success clears the count: the next wrong guess is answered, not refused.
        assert _login(server.url, "ann", "wrong")[0] == 400


def test_login_throttle_window_slides():
    from ui.security import LoginThrottle

    now = [100.0]
    throttle = LoginThrottle(allowed=2, window=10.0, clock=lambda: now[0])
    throttle.failed("a")
    now[0] = 105.0
    throttle.failed("a")
    assert throttle.wait_seconds("a") == pytest.approx(5.0) and throttle.wait_seconds("b") == 0.0
    now[0] = 110.5  # the first failure aged out
    assert throttle.wait_seconds("a") == 0.0
    throttle.failed("a")
    assert throttle.wait_seconds("a") == pytest.approx(4.5)
    throttle.succeeded("a")
    assert throttle.wait_seconds("a") == 0.0


def test_the_address_printed_for_an_ipv6_host_is_bracketed(tmp_path):
    # `good4cir app --host ::1` printed http://::1:PORT/, which no browser or client opens.
    import socket
    import subprocess
    import sys

    from ui.server import free_port

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    info = build_review_store(tmp_path, 1)
    port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "good4cir", "app", "--db", str(info["db_path"]),
                            "--host", "::1", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        line = app.stdout.readline()
        url = line.split(" on ", 1)[1].split()[0]
        assert url == f"http://[::1]:{port}/", line
    finally:
        app.terminate()
        app.wait(timeout=30)


def test_an_unauthenticated_request_cannot_write_lines_into_the_servers_console(served, capfd):
    # Gradio's custom-component route (this app has none) answered anyone, before any
    # login, and first printed its URL parts to the server's stdout: a crafted request
    # wrote made-up lines and terminal escape sequences into the owner's console.
    server, _, _ = served
    capfd.readouterr()
    # a carriage return overwrites the line on a terminal; ESC starts a terminal command
    status, _ = _get(server.url + "gradio_api/custom_component/x/client/a/b%0dFAKE%20LINE%1b%5b31m")
    assert status == 404
    out, err = capfd.readouterr()
    assert "FAKE LINE" not in out + err and "\x1b" not in out + err and "\r" not in out + err, (out, err)


def test_a_password_typed_on_the_command_line_is_warned_about(tmp_path):
    # `--auth alice:secret` puts the password in the process's command line, which every
    # user of the machine reads with `ps`; nothing said so, nor pointed to --auth FILE.
    import subprocess
    import sys

    from ui.server import free_port

    info = build_review_store(tmp_path, 1)
    users = tmp_path / "users.txt"
    users.write_text("ann:pw-in-a-file\n")
    users.chmod(0o600)
    shared = tmp_path / "shared-users.txt"  # readable by everyone: the same exposure as ps
    shared.write_text("ann:pw-in-a-file\n")
    shared.chmod(0o644)
    for auth, warned in (("ann:pw-on-the-line", True), (str(users), False), (str(shared), True)):
        app = subprocess.Popen([sys.executable, "-m", "good4cir", "app", "--db", str(info["db_path"]),
                                "--port", str(free_port()), "--auth", auth],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            app.stdout.readline()  # the app is up once it says where
        finally:
            app.terminate()
            _, err = app.communicate(timeout=30)
        assert ("visible to other users" in err and "only you can read" in err) == warned, (auth, err)
        assert "pw-on-the-line" not in err and "pw-in-a-file" not in err


def _upload(url, origin, name):
    boundary = "g4cboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: text/plain\r\n\r\nfilling the disk\r\n--{boundary}--\r\n").encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if origin:
        headers["Origin"] = origin
    request = urllib.request.Request(url + "gradio_api/upload", data=form, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_without_a_login_a_foreign_web_page_cannot_post_to_the_app(tmp_path):
    # A multipart form POST is a "simple" request: any web page the user visits could send
    # one to http://127.0.0.1:7860 (the Host header is then the app's own), and the upload
    # route stored it, of any size, as often as asked; the browser only hid the answer.
    import uuid

    from gradio.utils import get_upload_folder

    from ui.server import AppServer

    info = build_review_store(tmp_path, 1)
    name = f"csrf-{uuid.uuid4().hex}.txt"
    with AppServer(info["db_path"]) as server:
        for origin in ("http://evil.example", "null"):
            status, body = _upload(server.url, origin, name)
            assert status == 403, (origin, status, body)
        assert list(Path(get_upload_folder()).glob(f"*/{name}")) == []
        # the app's own page, and a client that sends no Origin, still upload
        assert _upload(server.url, server.url.rstrip("/"), name)[0] == 200
        assert _upload(server.url, f"http://localhost:{server.port}", name)[0] == 200
        assert _upload(server.url, None, name)[0] == 200


def test_no_other_web_page_may_frame_the_app(tmp_path):
    # Framed in an invisible iframe, the app's own page sends its own Origin and Host, so a
    # page elsewhere could have the user click Start (a run paid with the server's key) or
    # Approve through it (clickjacking). The browser is told never to frame it.
    import http.client

    from ui.server import AppServer

    info = build_review_store(tmp_path, 1)
    with AppServer(info["db_path"]) as server:
        for path in ("/", "/config", "/g4c/image/missing"):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            connection.close()
            assert response.getheader("X-Frame-Options") == "DENY", path
            assert "frame-ancestors 'none'" in (response.getheader("Content-Security-Policy") or ""), path
