"""Run inside the nested guest (tests/nested): `vhostd serve` on a config,
then groups of `vhostd vm run` at once, and report as one JSON line.

    python3 tests/nested/linux_vms.py SPEC.json

SPEC: {"config": path, "sockets": [path...], "groups": [[vm name...]...],
       "timeout": s, "reads": {label: [path, offset, length]},
       "host_setup": [[argv...]...], "listen": port, "autostart": path}
host_setup runs once serve listens (say, addresses for its TAP devices);
listen: a TCP port on which the first connection's bytes are counted.
autostart: afterwards, `vhostd serve` on that config until its autostart
VMs have ended; its log is returned as "autostart_log".
Printed: `NESTED-RESULT {"vms": {name: {"status", "seconds", "console",
"stderr"}}, "reads": {label: hex}, "received": n, "serve_log": text}`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def count_one_connection(port: int, result: dict) -> socket.socket:
    """Listen on port; a thread counts the bytes of the first connection."""
    srv = socket.create_server(("0.0.0.0", port))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            n = 0
            while chunk := conn.recv(1 << 16):
                n += len(chunk)
            result["received"] = n

    threading.Thread(target=serve, daemon=True).start()
    return srv


def start_serve(config: str, env: dict) -> tuple[subprocess.Popen, typing.TextIO]:
    """`vhostd serve --config config`, logging to config.serve.log."""
    log = open(config + ".serve.log", "w+")
    return subprocess.Popen([sys.executable, "-m", "vhostd", "serve", "--config", config],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log


def stop_serve(serve: subprocess.Popen, log, keep: int) -> str:
    """Stop serve; the last `keep` characters of its log."""
    serve.terminate()
    try:
        serve.wait(20)
    except subprocess.TimeoutExpired:
        serve.kill()
    log.seek(0)
    return log.read()[-keep:]


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    env = {**os.environ, "PYTHONPATH": ROOT}
    serve, log = start_serve(spec["config"], env)
    result: dict = {"vms": {}, "reads": {}}
    try:
        deadline = time.monotonic() + 120
        while not all(listening(s) for s in spec["sockets"]):
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("vhostd serve did not listen on every socket")
            time.sleep(0.05)
        for argv in spec.get("host_setup", []):
            subprocess.run(argv, check=True, capture_output=True, text=True)
        if spec.get("listen"):
            count_one_connection(spec["listen"], result)
        for group in spec["groups"]:
            procs = {}
            for name in group:
                # Files, not pipes: a VM whose console pipe is full (nobody
                # reads it while we wait for the other) would stop in its
                # UART write.
                out = open(f"{spec['config']}.{name}.out", "w+b")
                err = open(f"{spec['config']}.{name}.err", "w+b")
                procs[name] = (time.monotonic(), out, err, subprocess.Popen(
                    [sys.executable, "-m", "vhostd", "vm", "run", "--config", spec["config"], name,
                     "--timeout", str(spec["timeout"])],
                    stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT))
            for name, (t0, out, err, p) in procs.items():
                p.wait(timeout=spec["timeout"] + 30)
                out.seek(0)
                err.seek(0)
                result["vms"][name] = {"status": p.returncode, "seconds": round(time.monotonic() - t0, 2),
                                       "console": out.read().decode(errors="replace"),
                                       "stderr": err.read().decode(errors="replace")[-4000:]}
                out.close()
                err.close()
        for label, (path, offset, length) in spec.get("reads", {}).items():
            with open(path, "rb") as f:
                f.seek(offset)
                result["reads"][label] = f.read(length).hex()
    except subprocess.CalledProcessError as e:
        result["error"] = f"{e.cmd} failed: {e.stderr}"
    except Exception as e:  # reported, not raised: the host side says what failed
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["serve_log"] = stop_serve(serve, log, 4000)
    if spec.get("autostart"):
        result["autostart_log"] = autostart(spec["autostart"], env, spec["timeout"])
    print("NESTED-RESULT " + json.dumps(result), flush=True)
    return 0


def autostart(config: str, env: dict, timeout: float) -> str:
    """`vhostd serve` on a config whose VM autostarts; returns its log once
    the VM has ended (or after timeout)."""
    serve, log = start_serve(config, env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and serve.poll() is None:
            log.seek(0)
            text = log.read()
            if "VM ended" in text or "VM did not start" in text:
                break
            time.sleep(0.5)
    finally:
        text = stop_serve(serve, log, 6000)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
