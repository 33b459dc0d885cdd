#!/usr/bin/env bash
# guest-drivers blkbench in vhostd's VMM against vhostd and qemu-storage-daemon:
# same guest program, same 256 MiB image in tmpfs, back-end on CPU 0, VM on CPU 1.
#   bash benchmarks/blk_vmm.sh [rw] [iodepth] [seconds]      (default randread 32 5)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RW=${1:-randread}; QD=${2:-32}; SECS=${3:-5}
W=$(mktemp -d /dev/shm/vhostd-bench-XXXX)
trap 'pkill -f "$W" 2>/dev/null || true; rm -rf "$W"' EXIT
make -s -C "$ROOT/guest-drivers" >/dev/null
truncate -s 256M "$W/d.img"; truncate -s 256M "$W/q.img"
cat > "$W/d.yaml" <<EOT
daemon: {workers: 1, log_level: warning}
devices:
  - {name: d0, type: blk, socket: $W/d.sock, path: $W/d.img}
EOT
args="rw=$RW bs=4096 iodepth=$QD seconds=$SECS"
cat > "$W/vm.yaml" <<EOT
vms:
  - {name: b, memory: 64M, payload: $ROOT/guest-drivers/build/blkbench.elf, args: "$args", devices: [{type: blk, socket: $W/d.sock}]}
  - {name: q, memory: 64M, payload: $ROOT/guest-drivers/build/blkbench.elf, args: "$args", devices: [{type: blk, socket: $W/q.sock}]}
EOT
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no $1" >&2; exit 1; }
iops() { sed -n 's/.*IOPS=\([0-9]*\).*/\1/p'; }
cd "$ROOT"
taskset -c 0 python3 -m vhostd serve -c "$W/d.yaml" > "$W/d.log" 2>&1 & D=$!
wait_sock "$W/d.sock"
V=$(taskset -c 1 python3 -m vhostd vm run --config "$W/vm.yaml" b | iops)
kill $D; wait $D || true
taskset -c 0 qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$W/q.img" \
  --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$W/q.sock,writable=on" > "$W/q.log" 2>&1 & Q=$!
wait_sock "$W/q.sock"
A=$(taskset -c 1 python3 -m vhostd vm run --config "$W/vm.yaml" q | iops)
kill $Q; wait $Q || true
echo "blkbench $args: vhostd IOPS=$V qemu-storage-daemon IOPS=$A ratio=$(python3 -c "print(f'{$V/$A:.2f}')")"
