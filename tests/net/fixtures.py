"""pytest fixtures and hooks for vhost-user-net tests (plugin loaded by tests/conftest.py).

    @pytest.mark.dpdk
    def test_x(testpmd, sock_dir):
        be = testpmd([VhostPort(sock_dir / "n.sock")], forward_mode="macswap", auto_start=True)
        ...

    def test_y(netns):
        ns = netns()                      # NetNs, deleted at teardown
        ns.add_tap("tap0", addr="10.9.0.1/24")

Tests marked `dpdk` are skipped only when dpdk-testpmd is not installed
(scripts/test-deps.sh installs it); the `netns` fixture skips only when the
machine cannot make namespaces or TAP devices (not root, no /dev/net/tun).
"""

from __future__ import annotations

import functools

import pytest

from .netns import NetNs, netns_available
from .testpmd import Testpmd, testpmd_available


@functools.lru_cache(maxsize=None)
def _testpmd_status() -> tuple[bool, str]:
    return testpmd_available()


def require_testpmd() -> None:
    ok, why = _testpmd_status()
    if not ok:
        pytest.skip(f"DPDK testpmd unavailable: {why}")


def require_netns() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"network namespaces/TAP unavailable: {why}")


def pytest_report_header(config):
    ok, why = _testpmd_status()
    return f"dpdk-testpmd: {why}" if ok else f"dpdk-testpmd: UNAVAILABLE, dpdk tests will be skipped: {why}"


def pytest_runtest_setup(item):
    if item.get_closest_marker("dpdk") is not None:
        require_testpmd()


@pytest.fixture
def testpmd(tmp_path):
    """Factory: testpmd(ports, **Testpmd kwargs) -> started Testpmd.

    Logs (testpmd-<name>.log) stay in tmp_path; every instance is stopped at
    teardown.  Pass start=False to get it unstarted."""
    require_testpmd()
    made: list[Testpmd] = []

    def make(ports, *, start: bool = True, **kw) -> Testpmd:
        kw.setdefault("workdir", tmp_path)
        tp = Testpmd(ports, **kw)
        made.append(tp)
        return tp.start() if start else tp

    yield make
    for tp in made:
        tp.close()


@pytest.fixture
def netns():
    """Factory: netns() -> NetNs (created); all deleted at teardown."""
    require_netns()
    made: list[NetNs] = []

    def make(name: str | None = None) -> NetNs:
        ns = NetNs(name)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()
