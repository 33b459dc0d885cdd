"""The web console (`daemon: web:`), in a real browser and over raw HTTP.

One real daemon serves the module; Debian's headless Chromium, driven by
Selenium through Debian's chromedriver, looks at the page as a person would:
devices and their state, a counter rising while `vhostd bench blk` runs,
NEEDS_RESET after a hostile ring, a reload with a bad config, actions with
and without the token, VMs started and stopped.  The screenshot of the page
is kept at tests/.cache/web-console.png (the README shows one).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import Guest, free_port, wait_until
from vhostd.config import ConfigError, load_config
from vhostd.web.rates import Rates

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent / ".cache" / "web-console.png"
TOKEN = "s3cret-token-for-the-tests"
KVM = os.path.exists("/dev/kvm")


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
         host: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def web_up(port: int) -> None:
    def up():
        try:
            return request(port, "GET", "/api/status")[0] == 200
        except OSError:
            return False

    wait_until(up, 15, 0.05, "the web console")


# ---------------------------------------------------------------------- the daemon and the browser


@pytest.fixture(scope="module")
def socks():
    path = tempfile.mkdtemp(prefix="vdw-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def console(module_vhostd_factory, tmp_path_factory, socks, probe_elf):
    """The daemon: a disk for the load, a victim for hostile rings, a net
    device, and (with /dev/kvm) two VMs; the console with a token."""
    token = tmp_path_factory.mktemp("web") / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_port()
    vms = []
    if KVM:
        vms = [{"name": "hello", "memory": "8M", "payload": str(probe_elf), "args": "hello=1 exit=7",
                "devices": [{"type": "blk", "socket": os.path.join(socks, "vmdisk.sock")}]},
               {"name": "spinner", "memory": "8M", "payload": str(probe_elf), "args": "spin=1"}]
    vd = module_vhostd_factory(
        [{"name": "disk0", "type": "blk", "socket": os.path.join(socks, "disk0.sock"), "path": "disk0.img",
          "size": "4M"},
         {"name": "victim", "type": "blk", "socket": os.path.join(socks, "victim.sock"), "backend": "null",
          "size": "1M"},
         {"name": "net0", "type": "net", "socket": os.path.join(socks, "net0.sock"), "backend": "loopback",
          "mac": "52:54:00:12:34:56", "mtu": 9000},
         {"name": "vmdisk", "type": "blk", "socket": os.path.join(socks, "vmdisk.sock"), "path": "vmdisk.img",
          "size": "2M"}],
        daemon={"workers": 1, "web": f"127.0.0.1:{port}", "web_token_file": str(token),
                "control_socket": os.path.join(socks, "ctl.sock")}, vms=vms)
    web_up(port)
    vd.port = port
    return vd


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # Debian's: nothing downloads a browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,900",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, console):
    browser.get(f"http://127.0.0.1:{console.port}/")
    wait_until(lambda: text(browser, "live") == "live", 10, 0.05, "the page to go live")
    return browser


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def cell(driver, device: str, column: str) -> str:
    """What the page shows in one column of a device's row ("" if not there).
    (Read in one script: the page replaces its rows every second.)"""
    return shown(driver, f'tr.device[data-device="{device}"] td.{column}')


def shown(driver, css: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)


def wait_cell(driver, device: str, column: str, pattern: str, timeout: float = 10.0) -> str:
    try:
        return wait_until(lambda: (t := cell(driver, device, column)) and re.search(pattern, t) and t,
                          timeout, 0.05, f"{device}'s {column} to show {pattern!r}")
    except TimeoutError:
        raise AssertionError(f"{device}'s {column} shows {cell(driver, device, column)!r}, "
                             f"not {pattern!r}") from None


def click_action(driver, token: str, button_css: str) -> str:
    """Type the token (or clear it), click, and return the message shown."""
    field = find(driver, "#token")[0]
    field.clear()
    if token:
        field.send_keys(token)
    driver.execute_script("document.getElementById('message').hidden = true")
    # (clicked in one script: the page replaces its rows, buttons too, every second)
    driver.execute_script("document.querySelector(arguments[0]).click()", button_css)
    return wait_until(lambda: find(driver, "#message")[0].is_displayed() and text(driver, "message"), 10, 0.05,
                      "the action's outcome")


# ---------------------------------------------------------------------- what a person sees


def test_devices_are_listed_with_their_state(page, console):
    assert cell(page, "disk0", "frontend") == "not connected"
    assert cell(page, "disk0", "state") == "waiting"
    details = cell(page, "disk0", "details")
    assert "4 MiB" in details and str(console.image("disk0")) in details
    net = cell(page, "net0", "details")
    assert "MAC 52:54:00:12:34:56" in net and "MTU 9000" in net
    g = Guest(console, "disk0")
    try:
        wait_cell(page, "disk0", "frontend", rf"pid {os.getpid()} uid {os.getuid()}")
        wait_cell(page, "disk0", "state", "^running$")
        assert "VERSION_1" in cell(page, "disk0", "features")
    finally:
        g.close()
    wait_cell(page, "disk0", "frontend", "not connected")


def test_counters_rise_while_vhostd_bench_blk_runs(page, console):
    def total() -> int:
        m = re.search(r"([\d,]+) requests in all", cell(page, "disk0", "rate"))
        return int(m.group(1).replace(",", "")) if m else -1

    before = total()
    bench = subprocess.Popen([sys.executable, "-m", "vhostd", "bench", "blk", "--socket", console.socket("disk0"),
                              "--seconds", "4", "--iodepth", "8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        rate = wait_cell(page, "disk0", "rate", r"[1-9][\d.]* (k |M )?IOPS")
        first = total()
        assert first > before, rate
        wait_until(lambda: total() > first, 5, 0.05, "the request count to rise again")
        assert re.search(r"q0 [1-9]", shown(page, 'tr.queues[data-device="disk0"]'))
    finally:
        out, _ = bench.communicate(timeout=30)
    assert bench.returncode == 0, out
    # the graph has the load in it: some pixels of its line are drawn
    drawn = page.execute_script(
        "const c = document.querySelector('tr.device[data-device=\"disk0\"] canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 150 && d[i] < 100) n++; return n;")
    assert drawn > 10


def test_needs_reset_shows_in_red_with_its_log_line(page, console):
    g = Guest(console, "victim")
    try:
        q = g.queue(0, size=16)
        q.publish(99)  # a descriptor index past the ring
        state = wait_cell(page, "victim", "state", "NEEDS_RESET")
        assert "queue 0 marked NEEDS_RESET: queue 0: avail ring names descriptor 99" in state
        red = page.execute_script(
            "return getComputedStyle(document.querySelector("
            "'tr.device[data-device=\"victim\"] td.state .bad')).color")
        assert red == "rgb(196, 34, 26)"
        assert "1 need a reset" in text(page, "summary")
        assert cell(page, "disk0", "state") != "" and "NEEDS_RESET" not in cell(page, "disk0", "state")
        # the README's picture: load in disk0's graph, a broken victim
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.save_screenshot(str(SCREENSHOT))
    finally:
        g.close()


def test_actions_are_refused_without_the_token(page, console):
    mark = console.log_mark()
    message = click_action(page, "", "#reload")
    assert "refused" in message and "needs the token" in message
    message = click_action(page, "not-the-token", "#reload")
    assert "that one is wrong" in message
    assert find(page, "#message.bad")
    console.wait_log(mark, r"web console: refused POST /api/reload from 127\.0\.0\.1: wrong token")
    assert not console.log_lines(mark, "reload:")  # nothing was reloaded


def test_reload_with_a_bad_config_shows_the_errors_then_a_good_one_applies(page, console):
    path = console.config_path
    good = path.read_text()
    bad = good.replace("  size: 1M\n", "  size: 1M\n  queues: 0\n", 1)
    assert bad != good
    line = bad.splitlines().index("  queues: 0") + 1
    path.write_text(bad)
    try:
        message = click_action(page, TOKEN, "#reload")
        assert "Reload refused; the running devices are unchanged" in message
        assert f"{path}:{line}: devices[1].queues: must be" in message
        assert find(page, "#message.bad")
    finally:
        path.write_text(good)
    message = click_action(page, TOKEN, "#reload")
    assert message.startswith("Reloaded.") and "kept: disk0, victim, net0, vmdisk" in message, message
    assert not find(page, "#message.bad")


@pytest.mark.skipif(not KVM, reason="/dev/kvm does not exist on this machine: no VMs to run")
def test_vms_start_and_stop_from_the_console(page, console):
    def vm_cell(name: str, column: str) -> str:
        return shown(page, f'tr.vm[data-vm="{name}"] td.{column}')

    def console_tail(name: str) -> str:
        return shown(page, f'tr.vm-console[data-vm="{name}"] pre')

    assert vm_cell("hello", "state") == "not started"
    click_action(page, TOKEN, 'tr.vm[data-vm="hello"] button.start')
    wait_until(lambda: "exit status 7" in vm_cell("hello", "state"), 15, 0.05, "the VM to end")
    assert "the guest wrote 0x7 to the exit port" in vm_cell("hello", "state")
    assert "probe: dev0 base=0xd0000000" in console_tail("hello") and "probe: bye" in console_tail("hello")

    message = click_action(page, TOKEN, 'tr.vm[data-vm="spinner"] button.start')
    assert "start spinner: done" in message
    wait_until(lambda: vm_cell("spinner", "state") == "running", 10, 0.05, "the VM to run")
    wait_until(lambda: "probe: hello" in console_tail("spinner"), 10, 0.05, "the spinner's console")
    message = click_action(page, "", 'tr.vm[data-vm="spinner"] button.stop')
    assert "refused" in message  # no token, no action
    assert vm_cell("spinner", "state") == "running"
    click_action(page, TOKEN, 'tr.vm[data-vm="spinner"] button.stop')
    wait_until(lambda: "stopped by the host" in vm_cell("spinner", "state"), 10, 0.05, "the VM to stop")
    # `vhostd status` shows the same
    r = subprocess.run([sys.executable, "-m", "vhostd", "status", "--config", str(console.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert re.search(r"^VM hello  ended: the guest wrote 0x7 to the exit port.*\(status 7\)", r.stdout, re.M), r.stdout
    assert "  | probe: bye" in r.stdout and "VM spinner  ended: stopped by the host" in r.stdout


# ---------------------------------------------------------------------- HTTP, as an attacker would


def test_the_console_is_the_status_snapshot(console):
    status, _, body = request(console.port, "GET", "/api/status")
    assert status == 200
    web = json.loads(body)
    r = subprocess.run([sys.executable, "-m", "vhostd", "status", "--json", "--config", str(console.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    ctl = json.loads(r.stdout)
    assert [d["name"] for d in web["devices"]] == [d["name"] for d in ctl["devices"]]
    assert set(web["devices"][0]) == set(ctl["devices"][0])
    assert [vm["name"] for vm in web["vms"]] == [vm["name"] for vm in ctl["vms"]]
    status, headers, body = request(console.port, "GET", "/metrics")
    assert status == 200 and b'vhostd_device_info{device="disk0"' in body


def test_host_header_must_name_the_console(console):
    mark = console.log_mark()
    for host in ("evil.example", f"evil.example:{console.port}", f"127.0.0.1.nip.io:{console.port}"):
        status, headers, body = request(console.port, "GET", "/api/status", host=host)
        assert status == 421, (host, body)
        assert b"disk0" not in body
    console.wait_log(mark, r"refused a request for host 'evil\.example'")
    for host in (f"localhost:{console.port}", f"127.0.0.1:{console.port}"):
        assert request(console.port, "GET", "/", host=host)[0] == 200


def test_no_cors_and_no_framing(console):
    status, headers, _ = request(console.port, "GET", "/api/status", {"Origin": "http://evil.example"})
    assert status == 200
    assert not [h for h in headers if h.startswith("access-control-")]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    status, headers, _ = request(console.port, "OPTIONS", "/api/reload",
                              {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 405 and not [h for h in headers if h.startswith("access-control-")]


def test_token_only_counts_in_its_header(console):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(console.port, "POST", f"/api/reload?token={TOKEN}")[0] == 401
    assert request(console.port, "POST", "/api/reload", {"Cookie": f"token={TOKEN}"})[0] == 401
    # a page of another site cannot act even if it had the token
    status, _, body = request(console.port, "POST", "/api/reload", {**auth, "Origin": "http://evil.example"})
    assert status == 403 and b"may not act" in body
    status, _, body = request(console.port, "POST", "/api/reload", {**auth, "Origin": f"http://127.0.0.1:{console.port}"})
    assert status == 200 and json.loads(body)["ok"]


def test_request_sizes_are_bounded(console):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(console.port, "POST", "/api/reload", auth, b"x" * (1 << 20))[0] == 413
    assert request(console.port, "GET", "/" + "a" * 10000)[0] in (400, 414)
    assert request(console.port, "GET", "/", {"X-Big": "b" * 10000})[0] in (400, 431)
    assert request(console.port, "GET", "/static/../../etc/passwd")[0] == 404
    assert console.alive() and request(console.port, "GET", "/")[0] == 200


def test_read_only_without_a_token_file(vhostd_factory, browser):
    port = free_port()
    vd = vhostd_factory([{"name": "d0"}], daemon={"web": f"127.0.0.1:{port}"})
    web_up(port)
    status, _, body = request(port, "POST", "/api/reload", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 403 and b"read-only" in body
    browser.get(f"http://127.0.0.1:{port}/")
    wait_until(lambda: text(browser, "live") == "live", 10, 0.05, "the page to go live")
    assert "read-only" in text(browser, "mode")
    assert not find(browser, "#reload")[0].is_enabled()
    assert vd.log_lines(0, r"web console on http://127\.0\.0\.1:\d+/ \(read-only")


def test_listening_on_every_address_takes_the_token(vhostd_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    port = free_port()
    vhostd_factory([{"name": "d0"}], daemon={"web": f"0.0.0.0:{port}", "web_token_file": str(token)})
    web_up(port)  # Host 127.0.0.1:PORT: the address the connection came in on
    assert request(port, "GET", "/", host=f"evil.example:{port}")[0] == 421
    assert request(port, "POST", "/api/reload")[0] == 401
    status, _, body = request(port, "POST", "/api/reload", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["kept"] == ["d0"]


# ---------------------------------------------------------------------- config and rates


def test_config_refuses_an_open_console_and_a_readable_token(tmp_path):
    cfg = tmp_path / "vhostd.yaml"
    base = "devices:\n  - name: d0\n    type: blk\n    backend: null\n    size: 1M\n    socket: d0.sock\n"
    cfg.write_text("daemon:\n  web: 0.0.0.0:8090\n" + base)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:2: daemon.web: 0.0.0.0 is not a loopback address" in str(e.value)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o644)
    cfg.write_text("daemon:\n  web: 0.0.0.0:8090\n  web_token_file: token\n" + base)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:3: daemon.web_token_file: {token} has mode 0644: others may read the token" in str(e.value)
    token.chmod(0o600)
    assert load_config(cfg).daemon.web == ("0.0.0.0", 8090)
    token.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(cfg)
    cfg.write_text("daemon:\n  web: '[::1]:8090'\n" + base)  # loopback: read-only without a token
    assert load_config(cfg).daemon.web_token_file is None


def test_rates_from_two_snapshots():
    def snap(requests, nbytes, frames, running=True):
        return {"devices": [
            {"name": "b", "type": "blk", "state": "serving",
             "queues": [{"requests": requests, "bytes_in": nbytes, "bytes_out": 0}]},
            {"name": "n", "type": "net", "state": "serving" if running else "opening",
             "queues": [{"requests": 0, "bytes_in": 0, "bytes_out": 0}] * 3,
             "counters": [{"tx_frames": frames, "rx_frames": frames, "tx_bytes": 0, "rx_bytes": 64 * frames,
                           "tx_dropped": 1, "rx_dropped": 0, "tx_bad": 0}]}]}

    r = Rates()
    assert r.update(snap(100, 4096, 10), 10.0, 1000.0)["b"]["ops"] == 0  # nothing to compare with yet
    out = r.update(snap(300, 4096 * 3, 30), 12.0, 1002.0)
    assert out["b"]["ops"] == 100 and out["b"]["bytes"] == 4096 and out["b"]["queues"][0]["ops"] == 100
    assert out["n"]["ops"] == 20 and out["n"]["bytes"] == 640 and out["n"]["drops"] == 0
    assert out["n"]["pairs"][0] == {"frames": 20, "bytes": 640, "drops": 0}
    out = r.update(snap(5, 0, 30, running=False), 13.0, 1003.0)  # b restarted, n is opening
    assert out["b"]["ops"] == 0 and "n" not in out
    assert [h["time"] for h in r.history] == [1002.0, 1003.0]
    assert r.history[0]["devices"]["b"] == {"ops": 100, "bytes": 4096, "drops": 0}
