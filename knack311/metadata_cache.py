"""The Knack app metadata, kept in STATE_DIR between runs, so that a run with nothing to send makes one request.

The metadata (scenes, views, objects, field types, timezone) changes when someone edits the app in the Knack
builder, which is rare; reading it on every 5-minute run doubles an idle run's cost to the app's daily API
budget. A cached copy is used for a day, and refetched at once when the configured view, object or a field is
missing from it (the app was edited: the fresh metadata may have it). A copy that cannot be read, is not JSON, is
for another app id or was written in the future is ignored and refetched: the cache never fails a run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutageError
from .knack import AppSchema, app_schema_from

if TYPE_CHECKING:
    from .knack import KnackClient
    from .settings import Settings

MAX_AGE = 24 * 3600.0  # seconds a cached copy is trusted
FORMAT = 1


class MetadataCache:
    """`<state_dir>/<app_name>.metadata.json`, owner-only, replaced atomically."""

    def __init__(self, state_dir: Path, app_name: str, app_id: str, *, clock: Callable[[], float] = time.time):
        self.path = Path(state_dir) / f"{app_name}.metadata.json"
        self.app_id = app_id
        self._clock = clock

    def load(self, max_age: float = MAX_AGE) -> dict | None:
        """The cached metadata if it is for this app id and younger than max_age seconds; else None."""
        try:
            with self.path.open("rb") as file:
                saved = json.load(file)
        except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
            return None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("app_id") != self.app_id:
            return None
        fetched_at, metadata = saved.get("fetched_at"), saved.get("metadata")
        if not isinstance(fetched_at, int | float) or isinstance(fetched_at, bool) or not isinstance(metadata, dict):
            return None
        age = self._clock() - fetched_at
        if not 0 <= age < max_age:  # a copy from the future means the clock moved: do not trust it
            return None
        return metadata

    def store(self, metadata: dict) -> bool:
        """Save a freshly fetched copy; False if it could not be written (the run goes on without a cache)."""
        saved = {"format": FORMAT, "app_id": self.app_id, "fetched_at": self._clock(), "metadata": metadata}
        temporary = None
        try:
            # mkstemp creates the file owner-only; os.replace swaps it in whole, so a reader never sees half a file
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(saved, file, ensure_ascii=False, separators=(",", ":"))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            return True
        except (OSError, TypeError, ValueError):  # no space, no directory, or metadata that is not JSON
            if temporary is not None:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass
            return False

    def forget(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def missing_from(metadata: dict, *, view: str, obj: str, fields: Iterable[str]) -> list[str]:
    """What of the configuration the metadata does not describe: the view, the object, fields of the object."""
    app = metadata.get("application") if isinstance(metadata, dict) else None
    if not isinstance(app, dict):
        return ["application"]
    missing = []
    views = {v.get("key") for s in app.get("scenes") or [] if isinstance(s, dict)
             for v in s.get("views") or [] if isinstance(v, dict)}
    if view not in views:
        missing.append(view)
    objects = {o.get("key"): o for o in app.get("objects") or [] if isinstance(o, dict)}
    if obj not in objects:
        return [*missing, obj]
    keys = {f.get("key") for f in objects[obj].get("fields") or [] if isinstance(f, dict)}
    return missing + [key for key in fields if key not in keys]


def load_or_fetch(cache: MetadataCache, fetch: Callable[[], Any], fits: Callable[[dict], bool],
                  max_age: float = MAX_AGE) -> tuple[Any, bool]:
    """(metadata, came_from_cache): the cached copy if it is fresh and fits the configuration, else fetch() and
    cache what it returns. A fetched copy that does not fit is cached too (the next run refetches it anyway, and
    the caller reports the configuration error)."""
    cached = cache.load(max_age)
    if cached is not None and fits(cached):
        return cached, True
    fresh = fetch()
    if isinstance(fresh, dict):
        cache.store(fresh)
    return fresh, False


class AppMetadata:
    """The app metadata for a run, from the cache in STATE_DIR when it is fresh and describes the configured view,
    object and fields, else fetched. A dry run, which keeps no state, always fetches."""

    def __init__(self, settings: Settings, knack: KnackClient):
        app = settings.app
        self._knack = knack
        self._obj, self._view = app.obj, app.view
        self._fields = [key for variable, key in app.fields.items() if variable != "id"]
        self._cache = None if settings.dry_run else MetadataCache(settings.state_dir, app.name, settings.knack_app_id)
        self.from_cache = False
        self.scene = ""

    def schema(self) -> AppSchema:
        if self._cache is None:
            return self._take(self._knack.app_metadata())
        data, self.from_cache = load_or_fetch(self._cache, self._knack.app_metadata, self._fits)
        try:
            return self._take(data)
        except OutageError:
            if not self.from_cache:
                raise
            return self._fresh()  # a cached copy that cannot be read is no reason to fail

    def refresh(self) -> bool:
        """Fetch afresh when the schema came from the cache (True); False when it was fresh already."""
        if not self.from_cache:
            return False
        self._fresh()
        return True

    def _fresh(self) -> AppSchema:
        self._cache.forget()
        data, self.from_cache = self._knack.app_metadata(), False
        schema = self._take(data)
        if isinstance(data, dict):
            self._cache.store(data)
        return schema

    def _fits(self, data: dict) -> bool:
        return not missing_from(data, view=self._view, obj=self._obj, fields=self._fields)

    def _take(self, data: object) -> AppSchema:
        schema = app_schema_from(data, self._obj, self._view)
        self.scene = schema.scene
        return schema
