"""Rates for the web console: per device and per queue, from two snapshots
of the daemon (vhostd.control.daemon_status) a second or so apart, and the
device rates of the last minutes for its graphs.

Counters only grow while a device runs; one that shrank belongs to a new
run of the device (a restart by reload), so its rate starts again from 0.
"""

from __future__ import annotations

import collections

HISTORY = 300  # samples kept (one a second: five minutes)


def _per_queue(d: dict) -> list[tuple[int, int]]:
    """(requests, bytes both ways) of each queue."""
    return [(q["requests"], q["bytes_in"] + q["bytes_out"]) for q in d.get("queues", ())]


def _per_pair(d: dict) -> list[tuple[int, int, int]]:
    """(frames, bytes, drops) of each net queue pair, both directions."""
    return [(c["tx_frames"] + c["rx_frames"], c["tx_bytes"] + c["rx_bytes"],
             c["tx_dropped"] + c["rx_dropped"] + c["tx_bad"]) for c in d.get("counters", ())]


def _delta(now: int, before: int | None) -> int:
    return now - before if before is not None and now >= before else 0


class Rates:
    """Feed it snapshots (update); it returns the rates since the last one
    and keeps a history of each device's main rates."""

    def __init__(self, history: int = HISTORY) -> None:
        self._last: dict[str, tuple[list, list]] = {}
        self._last_time: float | None = None
        self.history: collections.deque[dict] = collections.deque(maxlen=history)

    def update(self, status: dict, now: float, wall: float) -> dict[str, dict]:
        """Rates per device name: "ops" (requests/s; frames/s for net),
        "bytes" (bytes/s), "drops" (net: frames dropped or bad /s), and the
        same per queue ("queues") and, for net, per queue pair ("pairs").
        now: a monotonic clock; wall: the time to show (time.time())."""
        elapsed = now - self._last_time if self._last_time is not None else 0.0
        out: dict[str, dict] = {}
        seen: dict[str, tuple[list, list]] = {}
        for d in status["devices"]:
            if d.get("state") != "serving":
                continue
            queues, pairs = _per_queue(d), _per_pair(d) if d["type"] == "net" else []
            seen[d["name"]] = (queues, pairs)
            old_q, old_p = self._last.get(d["name"], ([], []))

            def rate(value: int, before: int | None) -> float:
                return round(_delta(value, before) / elapsed, 1) if elapsed > 0 else 0.0

            q_rates = [{"ops": rate(r, old_q[i][0] if i < len(old_q) else None),
                        "bytes": rate(b, old_q[i][1] if i < len(old_q) else None)}
                       for i, (r, b) in enumerate(queues)]
            p_rates = [{"frames": rate(f, old_p[i][0] if i < len(old_p) else None),
                        "bytes": rate(b, old_p[i][1] if i < len(old_p) else None),
                        "drops": rate(x, old_p[i][2] if i < len(old_p) else None)}
                       for i, (f, b, x) in enumerate(pairs)]
            if d["type"] == "net":
                total = {"ops": sum(p["frames"] for p in p_rates), "bytes": sum(p["bytes"] for p in p_rates),
                         "drops": sum(p["drops"] for p in p_rates)}
            else:
                total = {"ops": sum(q["ops"] for q in q_rates), "bytes": sum(q["bytes"] for q in q_rates),
                         "drops": 0.0}
            out[d["name"]] = {**{k: round(v, 1) for k, v in total.items()}, "queues": q_rates, "pairs": p_rates}
        self._last, self._last_time = seen, now
        if elapsed > 0:
            self.history.append({"time": round(wall, 3),
                                 "devices": {name: {k: r[k] for k in ("ops", "bytes", "drops")}
                                             for name, r in out.items()}})
        return out
