#!/usr/bin/env python3
"""Draw benchmarks/ratios.png from the saved results (benchmarks/results/*.json):
one bar per workload, vhostd's figure divided by the anchor's, with the line
at 1.0 (parity) and the issue's targets marked.

    pip install matplotlib && python3 benchmarks/plot.py
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, ROOT  # noqa: E402

ANCHORS = {"blk_qsd": "qemu-storage-daemon (tmpfs)", "blk_disk": "qemu-storage-daemon (own disk, O_DIRECT)",
           "blk_vmm": "qemu-storage-daemon (guest in vhostd's VMM)", "net_testpmd": "DPDK vhost PMD",
           "blk_nbd": "qemu-storage-daemon (nbdkit export)", "blk_rbd": "qemu-storage-daemon (Ceph RBD image)",
           "blk_log": "vhostd before dirty logging (null disk, logging off)"}
# Minimum ratios the issues ask for ((results file, workload label) -> target).
TARGETS = {("blk_disk", "4K randread qd32"): 1.0, ("blk_disk", "4K randread qd1"): 0.9,
           ("blk_qsd", "4K randread qd32"): 1.5, **{("net_testpmd", f"{path} {size} B"): 1.0 for path in ("loopback", "switch", "tap") for size in (64, 1500)},
           **{(store, f"4K {rw} qd32"): 1.0 for store in ("blk_nbd", "blk_rbd") for rw in ("randread", "randwrite")}}


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, colours, targets = [], [], [], []
    palette = {"blk_qsd": "#3b75af", "blk_disk": "#2a9d6f", "blk_vmm": "#6a9fd0", "net_testpmd": "#e08a2c",
               "blk_nbd": "#8e5ea2", "blk_rbd": "#c0504d", "blk_log": "#7f7f7f"}
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name not in ANCHORS:
            continue
        results = json.load(open(path))
        for row in results["rows"]:
            labels.append(f"{row['workload']}\nvs {ANCHORS[name]}, {results['date']}")
            ratios.append(row["ratio"])
            colours.append(palette[name])
            targets.append(TARGETS.get((name, row["workload"])))
    if not labels:
        print("no results in", RESULTS_DIR, file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(labels) + 1.5))
    y = range(len(labels))[::-1]
    ax.barh(list(y), ratios, color=colours)
    ax.axvline(1.0, color="black", linewidth=1)
    for yi, r, target in zip(y, ratios, targets):
        ax.text(r, yi, f" {r:.2f}x", va="center", fontsize=8)
        if target is not None:
            ax.plot([target, target], [yi - 0.4, yi + 0.4], color="red", linewidth=2)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("vhostd / anchor (higher is better; log scale; red tick = target)")
    ax.set_title("vhostd against the anchors, same run, back-end CPU 0, load CPU 1")
    fig.tight_layout()
    out = os.path.join(ROOT, "benchmarks", "ratios.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
