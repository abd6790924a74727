"""Where things are stored: every decision between a local path and a URI (``s3://``, ``gs://``,
``file://``, ...) in one place. Pure string and path logic, torch- and Ray-free: the config
validates locations with it, the runtime joins and stages them.
"""

from __future__ import annotations

from pathlib import Path


def is_uri(location: str) -> bool:
    """A location with a scheme (``s3://bucket/x``, ``file:///x``), not a plain local path."""
    return "://" in location


def scheme(location: str) -> str:
    """``s3`` for ``s3://bucket/x``; ``""`` for a local path."""
    return location.partition("://")[0] if is_uri(location) else ""


def local_path(location: str) -> Path | None:
    """The local path of a plain path or a ``file://`` URI; None for remote storage."""
    if not is_uri(location):
        return Path(location)
    if scheme(location) == "file":
        return Path(location.removeprefix("file://"))
    return None


def absolute(location: str) -> str:
    """Local paths become absolute (Ray workers run elsewhere); URIs stay as given."""
    if is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path and a URI alike."""
    return "/".join([base.rstrip("/"), *parts])


def durable(location: str) -> bool:
    """An absolute local path or a URI with a scheme that is not a relative local file: what
    outlives a Ray job's temporary working dir."""
    kind, _, rest = location.partition("://")
    if not is_uri(location):
        return Path(location).is_absolute()
    if kind == "file":
        return rest.startswith("/")  # file:///abs
    if kind == "sqlite":
        return rest.startswith("//")  # sqlite:////abs (sqlite:///rel.db is relative)
    return True


def checkpoint_location(path: str, storage: str) -> str:
    """A checkpoint path as a URI or an absolute local path (Ray tasks run elsewhere).

    Ray reports checkpoint paths without the storage's scheme (``bucket/...`` for ``s3://``).
    """
    if is_uri(path):
        return path
    if is_uri(storage) and not Path(path).exists():
        return f"{scheme(storage)}://{path}"
    return absolute(path)
