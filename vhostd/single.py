"""One-device mode: `vhostd blk ...` and `vhostd net ...` follow QEMU's
"Backend program conventions" (docs/interop/vhost-user.rst), so management
tools can start one vhostd per device as they start vhost-user-blk or
qemu-storage-daemon:

* --socket-path PATH (vhostd binds and listens) or --fd N (a listening unix
  socket the caller made); one of them is required;
* --print-capabilities prints the JSON capabilities and exits;
* no daemonising; logs on stderr; exit status 1 when the device cannot start.

The options become a one-device config that the config loader checks like
any file, so the checks and messages are the ones `vhostd check` gives;
a problem is reported against the option that caused it.
"""

from __future__ import annotations

import json
import os
import re
import sys

#: vhost-user.json's VHostUserBackendType of each device type
BACKEND_TYPES = {"blk": "block", "net": "net"}
#: per type: option -> config key (the options a user may give)
OPTIONS = {
    "blk": {"blk_file": "path", "read_only": "readonly", "size": "size", "queues": "queues",
            "queue_size": "queue_size", "aio": "aio", "serial": "serial"},
    "net": {"backend": "backend", "tap": "tap", "mac": "mac", "queues": "queues", "queue_size": "queue_size"},
}
#: vhost-user.json's VHostUserBackendBlockFeature: the block options we take
BLOCK_FEATURES = ["read-only", "blk-file"]


def capabilities(kind: str) -> dict:
    caps: dict = {"type": BACKEND_TYPES[kind]}
    if kind == "blk":
        caps["features"] = BLOCK_FEATURES
    return caps


def add_parser(sub, kind: str) -> None:
    what = {"blk": "a virtio-blk disk", "net": "a virtio-net port"}[kind]
    p = sub.add_parser(kind, help=f"serve {what} alone (QEMU's back-end program conventions)",
                       description=f"Serve {what} on one vhost-user socket, in the foreground.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="bind and listen on this unix socket")
    where.add_argument("--fd", type=int, help="serve on this inherited listening unix socket")
    p.add_argument("--print-capabilities", action="store_true", help="print the capabilities as JSON and exit")
    if kind == "blk":
        p.add_argument("--blk-file", "--path", dest="blk_file", help="the disk image (a file or block device)")
        p.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
        p.add_argument("--size", help="create the image with this size if it does not exist (e.g. 10G)")
        p.add_argument("--aio", help="I/O engine: auto, io_uring, threads")
        p.add_argument("--serial", help="the disk's serial (GET_ID)")
    else:
        p.add_argument("--backend", default="loopback", help="where frames go: tap, switch, loopback")
        p.add_argument("--tap", help="the TAP interface (backend tap)")
        p.add_argument("--mac", help="the port's MAC address")
    p.add_argument("--queues", type=int, help="virtqueues (blk) or queue pairs (net)")
    p.add_argument("--queue-size", type=int, help="largest ring size offered")
    p.add_argument("--name", default=f"{kind}0", help="the device's name in logs and status")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.set_defaults(func=run, kind=kind)


def config_text(kind: str, args, socket_path: str) -> tuple[str, dict[str, str]]:
    """The one-device config, and which option each of its keys came from."""
    lines = ["devices:", f"  - name: {json.dumps(args.name)}", f"    type: {kind}", f"    socket: {json.dumps(socket_path)}"]
    origin = {"name": "--name", "socket": "--socket-path" if args.socket_path else "--fd"}
    for option, key in OPTIONS[kind].items():
        value = getattr(args, option)
        if value is None or value is False:
            continue
        lines.append(f"    {key}: {json.dumps(value)}")
        origin[key] = "--" + option.replace("_", "-")
    return "\n".join(lines) + "\n", origin


def run(args) -> int:
    from vhostd.cli import serve_config
    from vhostd.config import ConfigError, load_config
    from vhostd.systemd import bound_path, listening_socket

    kind = args.kind
    prog = f"vhostd {kind}"
    if args.print_capabilities:
        print(json.dumps(capabilities(kind), indent=2))
        return 0
    if args.socket_path is None and args.fd is None:
        print(f"{prog}: one of --socket-path or --fd is required", file=sys.stderr)
        return 1
    if kind == "blk" and not args.blk_file:
        print(f"{prog}: --blk-file (the disk image) is required", file=sys.stderr)
        return 1
    passed = []
    socket_path = args.socket_path
    if args.fd is not None:
        try:
            sock = listening_socket(args.fd)
        except ValueError as exc:
            why = " (vhostd needs a listening socket to accept front-ends on)" if str(exc) == "not listening" else ""
            print(f"{prog}: --fd {args.fd} is {exc}{why}", file=sys.stderr)
            return 1
        socket_path = bound_path(sock)
        socket_path = socket_path or f"/proc/self/fd/{args.fd}"
        passed.append((args.name, sock))
    text, origin = config_text(kind, args, os.path.abspath(socket_path))
    try:
        config = load_config(os.path.join(os.getcwd(), "<command line>"), text=text)
    except ConfigError as exc:
        options = {key: "--" + option.replace("_", "-") for option, key in OPTIONS[kind].items()}
        for p in exc.problems:
            key = re.sub(r"^devices\[0\]\.?", "", p.key)
            # the message may name other keys ("set 'size' to ..."): name their options
            message = re.sub(r"'(\w+)'", lambda m: options.get(m.group(1), m.group(0)), p.message)
            print(f"{prog}: {origin.get(key, key or 'options')}: {message}", file=sys.stderr)
        return 1
    return serve_config(config, args.log_level, passed)
