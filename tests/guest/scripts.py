"""Shell lines that test scripts run inside the test guest (busybox sh)."""


def net_up_and_ping(guest_ip: str, host_ip: str, fail: int) -> str:
    """eth0 up with guest_ip/24, wait (up to 30 s) for host_ip to answer,
    then 3 pings without loss; `exit fail` otherwise."""
    return f"""ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0 || exit {fail}
ok=
for i in $(seq 30); do
    if ping -c 1 -W 1 {host_ip} >/dev/null 2>&1; then ok=1; break; fi
done
[ -n "$ok" ] || exit {fail}
ping -c 3 -W 2 {host_ip} | grep -q " 0% packet loss" || exit {fail}
"""


VIRTIO_ID_NET, VIRTIO_ID_BLOCK = 1, 2


def virtio_features(device_id: int, key: str = "features") -> str:
    """Print `VHOSTD-RESULT <key>=<bits>` for each virtio device of this type
    (VIRTIO_ID_NET, VIRTIO_ID_BLOCK): the features the driver negotiated, as
    /sys/bus/virtio/devices/*/features shows them, a '0'/'1' per bit, bit 0 first."""
    return (
        'for d in /sys/bus/virtio/devices/*; do '
        f'if [ "$(cat $d/device)" = 0x{device_id:04x} ]; then echo "VHOSTD-RESULT {key}=$(cat $d/features)"; fi; '
        'done\n'
    )
