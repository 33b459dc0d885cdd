"""Run inside the nested guest (tests/nested): `vhostd serve` on a config,
then groups of `vhostd vm run` at once, and report as one JSON line.

    python3 tests/nested/linux_vms.py SPEC.json

SPEC: {"config": path, "sockets": [path...], "groups": [[vm name...]...],
       "timeout": s, "reads": {label: [path, offset, length]}}
Printed: `NESTED-RESULT {"vms": {name: {"status", "seconds", "console",
"stderr"}}, "reads": {label: hex}, "serve_log": text}`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    env = {**os.environ, "PYTHONPATH": ROOT}
    log = open(spec["config"] + ".serve.log", "w+")
    serve = subprocess.Popen([sys.executable, "-m", "vhostd", "serve", "--config", spec["config"]],
                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    result: dict = {"vms": {}, "reads": {}}
    try:
        deadline = time.monotonic() + 120
        while not all(listening(s) for s in spec["sockets"]):
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("vhostd serve did not listen on every socket")
            time.sleep(0.05)
        for group in spec["groups"]:
            procs = {}
            for name in group:
                procs[name] = (time.monotonic(), subprocess.Popen(
                    [sys.executable, "-m", "vhostd", "vm", "run", "--config", spec["config"], name,
                     "--timeout", str(spec["timeout"])],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT))
            for name, (t0, p) in procs.items():
                out, err = p.communicate(timeout=spec["timeout"] + 60)
                result["vms"][name] = {"status": p.returncode, "seconds": round(time.monotonic() - t0, 2),
                                       "console": out.decode(errors="replace"),
                                       "stderr": err.decode(errors="replace")[-4000:]}
        for label, (path, offset, length) in spec.get("reads", {}).items():
            with open(path, "rb") as f:
                f.seek(offset)
                result["reads"][label] = f.read(length).hex()
    except Exception as e:  # reported, not raised: the host side says what failed
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        serve.terminate()
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.seek(0)
        result["serve_log"] = log.read()[-4000:]
    print("NESTED-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
