"""The Knack app metadata, kept in STATE_DIR between runs, so that a run with nothing to send makes one request.

The metadata (scenes, views, objects, field types, timezone) changes when someone edits the app in the Knack
builder, which is rare; reading it on every 5-minute run doubles an idle run's cost to the app's daily API
budget. The cache serves that idle run only: it names the scene of the view, which is all a run needs to find
that nothing waits. A run whose first page holds records reads the metadata afresh before its first message is
built (`AppMetadata.for_messages`), so no message is ever built from cached field types or a cached timezone.

A cached copy is used for a day, and refetched at once when the configured view, object or a field is missing
from it, or a field has a type that cannot fill its element (the app was edited, or the copy is wrong: the fresh
metadata may fit). A copy that cannot be read, is not JSON, is for another app id or was written in the future is
ignored and refetched: the cache never fails a run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from .errors import ConfigError, OutageError
from .fields import resolve_timezone, type_problem
from .knack import AppSchema, app_schema_from

if TYPE_CHECKING:
    from .knack import KnackClient
    from .settings import AppConfig, Settings

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


def unfit_types(metadata: dict, *, obj: str, fields: dict[str, str]) -> list[str]:
    """The configured fields (template variable -> field key) whose type in the metadata cannot fill their element,
    as `--check` judges them; fields the metadata lacks are missing_from's."""
    app = metadata.get("application") if isinstance(metadata, dict) else None
    objects = [o for o in (app.get("objects") or [] if isinstance(app, dict) else []) if isinstance(o, dict)]
    fields_of_obj = next((o.get("fields") or [] for o in objects if o.get("key") == obj), [])
    return unfit_fields(fields, {f.get("key"): str(f.get("type", "")) for f in fields_of_obj if isinstance(f, dict)})


def unfit_fields(fields: dict[str, str], field_types: dict[str, str]) -> list[str]:
    """What is wrong with each configured field whose Knack type cannot fill its element (`--check`'s rule)."""
    return [problem for variable, key in fields.items() if variable != "id" and key in field_types
            for problem in [type_problem(variable, key, field_types[key])] if problem]


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
        self._app: AppConfig = app
        self._knack = knack
        self._obj, self._view = app.obj, app.view
        self._fields = [key for variable, key in app.fields.items() if variable != "id"]
        self._cache = None if settings.dry_run else MetadataCache(settings.state_dir, app.name, settings.knack_app_id)
        self._schema: AppSchema | None = None
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

    def for_messages(self) -> tuple[dict[str, str], ZoneInfo]:
        """The field types and the app's zone that messages are built with, from metadata this run fetched (one
        request when the schema came from the cache, none otherwise).

        ConfigError (exit 2, nothing sent) when a configured field is missing from the activity object or has a
        type that cannot fill its element (the rule `--check` applies), or the timezone is unknown.
        """
        schema = self._fresh() if self.from_cache else (self._schema or self.schema())
        app = self._app
        missing = [f"{key} ({variable})" for variable, key in app.fields.items()
                   if variable != "id" and key not in schema.field_types]
        if missing:
            raise ConfigError(f"config.py {app.name!r}: field(s) not in Knack object {app.obj}: {', '.join(missing)}")
        unfit = unfit_fields(app.fields, schema.field_types)
        if unfit:
            raise ConfigError(f"config.py {app.name!r}: Knack field(s) of a type that cannot fill the message: "
                              f"{'; '.join(unfit)}")
        return schema.field_types, resolve_timezone(schema.timezone_name, app.timezone)

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
        return (not missing_from(data, view=self._view, obj=self._obj, fields=self._fields)
                and not unfit_types(data, obj=self._obj, fields=self._app.fields))

    def _take(self, data: object) -> AppSchema:
        schema = app_schema_from(data, self._obj, self._view)
        self.scene, self._schema = schema.scene, schema
        return schema
