"""Command line: `vhostd serve|check|status|reload`, `vhostd vm run` and `vhostd bench blk`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from vhostd import __version__

DEFAULT_CONFIG = "config/vhostd.yaml"


def _setup_logging(level: str, log_format: str = "text") -> None:
    """One line per event on stderr; under systemd (or log_format: journal)
    with `<N>` priority prefixes and no timestamps, as the journal wants."""
    from vhostd.systemd import JournalFormatter, stderr_is_journal

    handler = logging.StreamHandler(sys.stderr)
    if log_format == "journal" or (log_format == "auto" and stderr_is_journal()):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def _load(path: str):
    from vhostd.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_check(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    vms = f", {len(config.vms)} VM(s)" if config.vms else ""
    print(f"{args.config}: ok ({len(config.devices)} device(s){vms})")
    return 0


def cmd_serve(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    if (config.daemon.user is not None or config.daemon.group is not None) and os.geteuid() != 0:
        print(f"{args.config}: daemon.user/daemon.group need vhostd to be started as root", file=sys.stderr)
        return 1
    return serve_config(config, args.log_level or config.daemon.log_level)


def serve_config(config, log_level: str, passed=None) -> int:
    """Serve a loaded config on uvloop until stopped (serve, and the one-device mode)."""
    _setup_logging(log_level, config.daemon.log_format)
    from vhostd.daemon import serve

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        runner = asyncio.run
    try:
        return runner(serve(config, passed))
    except (OSError, ValueError) as exc:
        logging.getLogger("vhostd").error("cannot start: %s", exc)
        return 1


def cmd_vm_run(args) -> int:
    """Run one VM of the config in the foreground: the guest's serial console
    on stdout, exit status = the guest's (value & 0xff); 124 when --timeout
    ran out, 128+N when stopped by signal N, 1 when the VM cannot start."""
    config = _load(args.config)
    if config is None:
        return 1
    try:
        vm_config = config.vm(args.name)
    except KeyError:
        names = ", ".join(vm.name for vm in config.vms) or "none"
        print(f"{args.config}: no VM named {args.name!r} (VMs: {names})", file=sys.stderr)
        return 1
    _setup_logging(args.log_level or "warning")
    import signal
    import time

    from vhostd.vmm import VirtualMachine, VmError

    vm = VirtualMachine(vm_config)
    stopped_by: list[int] = []

    def on_signal(signum, frame):
        stopped_by.append(signum)
        vm.stop(None, f"stopped by signal {signum}")

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        vm.start()
    except VmError as exc:
        print(f"vhostd vm run: {exc}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout if args.timeout else None
    timed_out = False
    try:
        while vm.wait(0.2) is None and vm.running:
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                vm.stop(None, f"timed out after {args.timeout:g} s")
    finally:
        vm.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    log = logging.getLogger("vhostd.vmm")
    c = vm.counts
    log.info("%s: %s; ran %.3f s; exits: %d pio (%s), %d mmio (and %d answered in C), %d other", vm.name,
             vm.exit_reason, vm.run_time, c.pio, c.busiest(), c.mmio, c.mmio_in_c, c.other)
    if stopped_by:
        return 128 + stopped_by[0]
    if timed_out:
        print(f"vhostd vm run: {vm.name}: {vm.exit_reason}", file=sys.stderr)
        return 124
    if vm.exit_status is None:
        return 1
    if vm.exit_status:
        print(f"vhostd vm run: {vm.name}: {vm.exit_reason}", file=sys.stderr)
    return vm.exit_status & 0xFF


def _control_path(args) -> str | None:
    if args.control:
        return args.control
    config = _load(args.config)
    if config is None:
        return None
    if not config.daemon.control_socket:
        print(f"{args.config}: no daemon.control_socket is set; set one (and restart vhostd) or pass --control",
              file=sys.stderr)
        return None
    return config.daemon.control_socket


def _ask(args, cmd: str) -> dict | None:
    from vhostd.control import request

    path = _control_path(args)
    if path is None:
        return None
    try:
        return request(path, cmd)
    except (OSError, ValueError) as exc:
        print(f"vhostd {cmd}: cannot reach the daemon at {path}: {exc}", file=sys.stderr)
        return None


def cmd_status(args) -> int:
    import json

    reply = _ask(args, "status")
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply, indent=1))
        return 0 if reply.get("ok") else 1
    if not reply.get("ok"):
        print(f"vhostd status: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"vhostd pid {reply['pid']}, config {reply['config']}, {len(reply['devices'])} device(s)")
    for d in reply["devices"]:
        if d.get("state") == "opening":
            print(f"\n{d['name']}  {d['type']}  {d['socket']}  opening its {d['backend']} store "
                  f"(attempt {d['attempts']}{': ' + d['error'] if d['error'] else ''})")
            continue
        peer = d["peer"]
        state = f"connected (pid {peer['pid']} uid {peer['uid']})" if peer else "not connected"
        if d["needs_reset"]:
            state += ", NEEDS_RESET"
        print(f"\n{d['name']}  {d['type']}  {d['socket']}  {state}  sessions={d['sessions']}")
        if d.get("reset_reason"):
            print(f"  {d['reset_reason']}")
        print(f"  features {d['features']:#x}: {' '.join(d['feature_names']) or '-'}")
        if "aio" in d:
            print(f"  aio {d['aio']}" + (f" ({d['aio_note']})" if d.get("aio_note") else ""))
        if "store" in d:
            st = dict(d["store"])
            server, up = st.pop("server"), st.pop("up")
            print(f"  store {server}: {'answers' if up else 'DOES NOT ANSWER'}  "
                  + " ".join(f"{k}={v}" for k, v in st.items()))
        for q in d["queues"]:
            qs = "broken" if q["broken"] else "started" if q["started"] else "stopped"
            qs += "" if q["enabled"] else ",disabled"
            qs += ",packed" if q.get("packed") else ""
            print(f"  queue {q['index']}: {qs} size={q['size']} avail={q['last_avail']}/{q['driver_avail']} "
                  f"used={q['used_idx']} "
                  f"requests={q['requests']} kicks={q['kicks']} notifies={q['notifies']} "
                  f"bytes_out={q['bytes_out']} bytes_in={q['bytes_in']} pending={q['pending']}")
        for i, counters in enumerate(d["counters"]):
            print(f"  {'pair' if d['type'] == 'net' else 'queue'} {i} counters: "
                  + " ".join(f"{k}={v}" for k, v in counters.items()))
    for vm in reply.get("vms", []):
        how = {"ended": f"ended: {vm['exit_reason']} (status {vm['exit_status']})",
               "failed": f"did not start: {vm['error']}"}.get(vm["state"], vm["state"])
        print(f"\nVM {vm['name']}  {how}  ran {vm['run_time']:g} s  devices: "
              + (" ".join(f"{dev['type']}={dev['socket']}" for dev in vm["devices"]) or "-"))
        for line in vm["console"][-5:]:
            print(f"  | {line}")
    return 0


def cmd_reload(args) -> int:
    reply = _ask(args, "reload")
    if reply is None:
        return 1
    if "errors" in reply:
        print("vhostd reload: refused; the running devices are unchanged:", file=sys.stderr)
        for line in reply["errors"]:
            print(line, file=sys.stderr)
        return 1
    if "error" in reply:
        print(f"vhostd reload: {reply['error']}", file=sys.stderr)
        return 1
    for key in ("started", "stopped", "restarted", "kept"):
        if reply.get(key):
            print(f"{key}: {', '.join(reply[key])}")
    for name, why in reply.get("failed", {}).items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    return 0 if reply.get("ok") else 1


def cmd_bench_blk(args) -> int:
    """Drive a vhost-user-blk back-end; print one line with IOPS= (or JSON)."""
    import json
    from dataclasses import asdict

    from vhostd.loadgen import BenchError, run_blk

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        result = run_blk(args.socket, args.rw, bs=args.bs, iodepth=args.iodepth, queues=args.queues,
                         seconds=args.seconds, poll=args.poll, dirty_log=args.dirty_log, packed=args.packed)
    except BenchError as exc:
        print(f"vhostd bench blk: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)) if args.json else result.line(), flush=True)
    if not result.drained:
        print("vhostd bench blk: some requests never completed", file=sys.stderr)
    if result.errors:
        print(f"vhostd bench blk: {result.errors} request(s) failed", file=sys.stderr)
    return 0 if result.drained and not result.errors else 1


def blk_main() -> int:
    """`vhostd-blk`: `vhostd blk` under a name of its own, for vhost-user.json's "binary"."""
    return main(["blk", *sys.argv[1:]])


def net_main() -> int:
    """`vhostd-net`: `vhostd net` (see blk_main)."""
    return main(["net", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhostd", description="vhost-user device back-end daemon")
    parser.add_argument("--version", action="version", version=f"vhostd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    config_help = f"the config file (default: {DEFAULT_CONFIG}, relative to the current directory)"
    p = sub.add_parser("serve", help="serve the devices of a config file",
                       description="Serve the devices (and autostart the VMs) of a config file until SIGTERM; "
                                   "SIGHUP or `vhostd reload` re-reads it.")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=config_help)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="overrides the config's daemon.log_level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a config file and exit",
                       description="Validate a config file as `vhostd serve` would (image files and socket "
                                   "directories looked at too) and exit: 0 and one summary line when it is good, "
                                   "else 1 and one FILE:LINE: KEY: problem line per problem.")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=config_help)
    p.set_defaults(func=cmd_check)

    for name, func, text in (("status", cmd_status, "show every device of the running daemon"),
                             ("reload", cmd_reload, "make the running daemon re-read its config")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ", through its control socket "
                           "(daemon.control_socket of the config, or --control).")
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                       help=f"find the control socket in this config (default: {DEFAULT_CONFIG}, relative to the "
                            "current directory)")
        p.add_argument("--control", help="the daemon's control socket (instead of --config)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print everything as JSON")
        p.set_defaults(func=func)

    from vhostd import single

    for kind in single.BACKEND_TYPES:
        single.add_parser(sub, kind)

    p = sub.add_parser("vm", help="the built-in VMM")
    vm_sub = p.add_subparsers(dest="vm_command", required=True)
    p = vm_sub.add_parser("run", help="run one VM of the config in the foreground (console on stdout)")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=config_help)
    p.add_argument("--timeout", type=float, default=None, help="stop the VM after this many seconds (exit 124)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("name", help="the VM's name in the config")
    p.set_defaults(func=cmd_vm_run)

    p = sub.add_parser("bench", help="load generators for any vhost-user back-end")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("blk", help="drive a vhost-user-blk socket; prints IOPS, bandwidth, latency")
    p.add_argument("--socket", required=True, help="the back-end's vhost-user socket")
    p.add_argument("--rw", default="randread", choices=["randread", "randwrite", "read", "write"])
    p.add_argument("--bs", type=int, default=4096, help="bytes per request, a multiple of 512 (default 4096)")
    p.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue (default 32)")
    p.add_argument("--queues", type=int, default=1, help="virtqueues to use (default 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="run time (default 10)")
    p.add_argument("--poll", action="store_true", help="spin on the used ring instead of waiting for calls")
    p.add_argument("--cpu", type=int, help="pin the load generator to this CPU")
    p.add_argument("--dirty-log", action="store_true",
                   help="log dirty pages as during a live migration (what logging costs the back-end)")
    p.add_argument("--packed", action="store_true",
                   help="use packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones; "
                        "refused if the back-end does not offer them")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_bench_blk)

    args = parser.parse_args(argv)
    return args.func(args)
