"""Prometheus metrics of a registry instance: besides the RPC metrics (kit.metrics), gauges of its blob store read
at scrape time without touching Redis: uploads staged on disk and the blob file system's size and free space."""

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from services.kit.metrics import GaugeCollector
from services.registry.blobstore import LocalBlobStore


def registry_metrics(blobs: LocalBlobStore) -> CollectorRegistry:
    """The registry's Prometheus registry with its blob store gauges."""
    registry = CollectorRegistry()
    registry.register(GaugeCollector(lambda: blob_gauges(blobs)))
    return registry


def blob_gauges(blobs: LocalBlobStore) -> Iterator[tuple]:
    """Two directory listings (bounded by the uploads in progress) and one statvfs."""
    staged = _entries(blobs.tmp_dir) + _entries(blobs.uploads_dir)
    yield ("modelgrid_registry_staged_uploads", "Uploads in progress or resumable, staged on disk", (), [((), staged)])
    disk = os.statvfs(blobs.root)
    yield (
        "modelgrid_registry_blob_disk_bytes",
        "The blob directory's file system: total and free bytes",
        ("kind",),
        [(("total",), disk.f_blocks * disk.f_frsize), (("free",), disk.f_bavail * disk.f_frsize)],
    )


def _entries(directory: os.PathLike) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0
