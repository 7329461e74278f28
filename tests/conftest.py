from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpleader.localetcd import EtcdCluster


def _need_etcd() -> None:
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        pytest.fail("etcd and etcdctl are required (scripts/bootstrap.sh installs them)")


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on loopback ports."""
    _need_etcd()
    cluster = EtcdCluster(tmp_path / "etcd", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A single etcd member, for tests that do not need quorum behaviour."""
    _need_etcd()
    cluster = EtcdCluster(tmp_path / "etcd", size=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
