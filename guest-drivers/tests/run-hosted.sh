#!/bin/sh
# Runs the hosted builds of the programs (make check) against the fake
# devices of tests/fakedev.c in several device configurations.  Each case
# must exit as expected and print its marker line; the fake devices fail a
# run (exit 3) if the driver broke a rule of the spec.
set -u
B=${1:-build}
T=2000000   # any TSC rate: the hosted CPU reports none
fails=0
n=0
run() { # expect_rc marker args...
    want=$1 marker=$2
    shift 2
    n=$((n + 1))
    out=$(timeout 120 "$@" 2>&1)
    rc=$?
    if [ "$rc" -ne "$want" ] || ! printf '%s\n' "$out" | grep -q -- "$marker" ||
        { [ -n "${ring:-}" ] && printf '%s\n' "$out" | grep -q -- "ring=$other"; }; then
        echo "run-hosted: FAIL (rc=$rc, want $want, marker '$marker'${ring:+, every ring $ring}): $*"
        printf '%s\n' "$out" | tail -25 | sed 's/^/    /'
        fails=$((fails + 1))
    else
        echo "run-hosted: ok: $*"
    fi
}
# runp: the same, on devices offering VIRTIO_F_RING_PACKED (-p), and every
# ring the program reports must be packed
runp() {
    want=$1 marker=$2
    shift 2
    prog=$1
    shift
    ring=packed other=split
    run "$want" "$marker" "$prog" -p "$@"
    ring= other=
}

S=$B/hosted-selftest
run 0 '^SELFTEST PASS$' $S -c "tsc_khz=$T"
run 0 '^SELFTEST PASS$' $S -b 2097152 -n loopback -c "tsc_khz=$T"
run 0 '^SELFTEST PASS$' $S -b 2097152 -n loopback -E -I -M 0 -c "tsc_khz=$T"
run 0 '^SELFTEST PASS$' $S -b 65536 -n loopback -M 2 -R -Q 4 -S 65536 -c "tsc_khz=$T"
run 0 '^SELFTEST PASS$' $S -b 4096 -n loopback -q 8 -R -c "tsc_khz=$T net_count=300"
run 0 '^SELFTEST PASS$' $S -b 64 -b 20 -n loopback -n loopback -q 16 -c "tsc_khz=$T"
run 0 '^SELFTEST PASS$' $S -b 2097152 -n loopback -c "tsc_khz=$T event_idx=0 indirect=0 mrg_rxbuf=0"
run 0 'read-only: ' $S -B 8192 -c "tsc_khz=$T"
run 0 '^SELFTEST PASS$' $S -n sink -c "tsc_khz=$T net=none"
run 1 '^SELFTEST FAIL: net0: net=loopback' $S -n sink -c "tsc_khz=$T net_timeout_ms=300"
run 1 '^SELFTEST FAIL: net0: unknown net=' $S -n loopback -c "tsc_khz=$T net=bogus"
run 0 '^\[A\] SELFTEST PASS$' $S -P -c "tsc_khz=$T net=peer"
run 0 '^\[B\] SELFTEST PASS$' $S -P -M 2 -q 64 -c "tsc_khz=$T net=peer net_count=1000"
for k in 1 loop addr len next head indirect idx; do
    run 0 '^SELFTEST GARBAGE DONE' $S -V -b 4096 -n loopback -c "tsc_khz=$T garbage=$k garbage_wait_ms=50"
done
run 1 'SELFTEST FAIL: garbage=' $S -b 4096 -c "tsc_khz=$T garbage=bogus"

# packed rings (the same checks; tiny rings wrap the counters often)
runp 0 '^SELFTEST PASS$' $S -b 2097152 -n loopback -c "tsc_khz=$T"
runp 0 '^SELFTEST PASS$' $S -b 2097152 -n loopback -E -I -M 0 -c "tsc_khz=$T"
runp 0 '^SELFTEST PASS$' $S -b 65536 -n loopback -M 2 -R -Q 4 -S 65536 -c "tsc_khz=$T"
runp 0 '^SELFTEST PASS$' $S -b 4096 -n loopback -q 8 -R -c "tsc_khz=$T net_count=300"
runp 0 '^SELFTEST PASS$' $S -b 4096 -n loopback -q 12 -I -R -c "tsc_khz=$T net_count=300 blk_depth=4"
runp 0 '^SELFTEST PASS$' $S -b 64 -b 20 -n loopback -n loopback -q 16 -c "tsc_khz=$T"
runp 0 '^SELFTEST PASS$' $S -b 2097152 -n loopback -c "tsc_khz=$T event_idx=0 indirect=0 mrg_rxbuf=0"
runp 0 'read-only: ' $S -B 8192 -c "tsc_khz=$T"
runp 0 '^\[A\] SELFTEST PASS$' $S -P -c "tsc_khz=$T net=peer"
# (full-size rings: with 64 entries a busy host can make the peer's rx ring
# overflow with CTRL frames and lose a DATA frame, which net=peer cannot recover)
runp 0 '^\[B\] SELFTEST PASS$' $S -P -M 2 -c "tsc_khz=$T net=peer net_count=1000"
runp 1 '^SELFTEST FAIL: net0: net=loopback' $S -n sink -c "tsc_khz=$T net_timeout_ms=300"
# offered but declined: split rings
run 0 'blk0: .* ring=split$' $S -p -b 4096 -n loopback -c "tsc_khz=$T packed=0"
# garbage is written into split rings even when packed ones are offered
run 0 '^SELFTEST GARBAGE DONE' $S -p -V -b 4096 -n loopback -c "tsc_khz=$T garbage=all garbage_wait_ms=50"

BB=$B/hosted-blkbench
run 0 '^IOPS=[0-9]' $BB -b 2097152 -c "tsc_khz=$T rw=randread count=20000"
run 0 '^IOPS=[0-9]' $BB -b 2097152 -R -c "tsc_khz=$T rw=randwrite bs=65536 iodepth=8 count=2000"
run 0 '^IOPS=[0-9]' $BB -b 2097152 -Q 2 -S 16384 -c "tsc_khz=$T rw=write bs=131072 iodepth=4 queues=2 count=500"
run 0 '^IOPS=[0-9]' $BB -b 2097152 -I -q 16 -c "tsc_khz=$T rw=read iodepth=32 seconds=1"
run 0 '^IOPS=unknown ops=' $BB -b 2048 -c "rw=randread count=1000"
run 1 '^BLKBENCH FAIL: rw=' $BB -b 2048 -c "rw=trim"
run 1 '^BLKBENCH FAIL: rw=randwrite on a read-only' $BB -B 2048 -c "rw=randwrite count=10"
runp 0 '^IOPS=[0-9]' $BB -b 2097152 -c "tsc_khz=$T rw=randread count=20000"
runp 0 '^IOPS=[0-9]' $BB -b 2097152 -R -c "tsc_khz=$T rw=randwrite bs=65536 iodepth=8 count=2000"
runp 0 '^IOPS=[0-9]' $BB -b 2097152 -Q 2 -S 16384 -c "tsc_khz=$T rw=write bs=131072 iodepth=4 queues=2 count=500"
runp 0 '^IOPS=[0-9]' $BB -b 2097152 -I -q 16 -c "tsc_khz=$T rw=read iodepth=32 seconds=1"
run 0 'ring=split' $BB -p -b 2097152 -c "tsc_khz=$T count=1000 packed=0"

NB=$B/hosted-netbench
run 0 '^PPS=[0-9]' $NB -n loopback -c "tsc_khz=$T count=50000"
run 0 '^PPS=[0-9]' $NB -n loopback -M 2 -c "tsc_khz=$T size=1514 verify=2 count=5000"
run 0 '^PPS=[0-9]' $NB -n loopback -E -I -q 32 -c "tsc_khz=$T window=256 seconds=1"
run 0 '^PPS=unknown tx=' $NB -n loopback -c "count=1000"
run 1 '^NETBENCH FAIL: no frame came back' $NB -n sink -c "tsc_khz=$T count=100"
runp 0 '^PPS=[0-9]' $NB -n loopback -c "tsc_khz=$T count=50000"
runp 0 '^PPS=[0-9]' $NB -n loopback -M 2 -c "tsc_khz=$T size=1514 verify=2 count=5000"
runp 0 '^PPS=[0-9]' $NB -n loopback -E -I -q 32 -c "tsc_khz=$T window=256 seconds=1"

echo "run-hosted: $((n - fails)) of $n cases passed"
[ "$fails" -eq 0 ]
