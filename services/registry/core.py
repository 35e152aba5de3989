"""The registry's transport-free core: validates requests, runs uploads into the blob store, resolves references
and keeps metadata consistent through RegistryStore."""

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from modelgrid.client.artifacts import check_digest
from modelgrid.client.convert import parse_number
from modelgrid.client.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from modelgrid.client.modelref import ModelRef, check_alias, check_model_name, shown
from modelgrid.client.registry.types import (
    KIND_TAG,
    Alias,
    Artifact,
    ArtifactFormat,
    Lineage,
    ModelVersion,
    RegisteredModel,
    RegistryEvent,
    VersionStatus,
    is_recipe,
)
from services.registry.blobstore import BlobStore, BlobWriter
from services.registry.recipes import check_kind_tag, check_kind_unchanged, check_recipe_format, check_recipe_source
from services.registry.settings import RegistrySettings
from services.registry.signatures import read_signatures
from services.registry.store import RegistryStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


class _EndedEarly(InvalidArgument):
    """An upload stream that ended before its declared size."""


MAX_REQUEST_ID = 128
MAX_KEY_CHARS = 128


@dataclass
class NewVersion:
    """Metadata of a version being uploaded (the first CreateVersion message)."""

    model_name: str
    artifact_digest: str
    artifact_size: int = 0
    artifact_format: ArtifactFormat = ArtifactFormat.RAW
    description: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    request_id: str = ""
    from_blob: bool = False
    """The artifact is the blob already stored under artifact_digest (no bytes follow)."""


@dataclass
class Page:
    """A page of a list: its items and the token for the next page (empty on the last)."""

    items: list
    next_token: str = ""


def check_metadata(
    limits: RegistrySettings,
    *,
    description: str | None = None,
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
) -> None:
    """Descriptions, tags, metrics and parameters within the registry's limits (settings), keys 1-128 characters
    without control characters, metric values finite; InvalidArgument saying which limit, echoing no more than the
    start of a key."""
    if description is not None and len(description) > limits.max_description_chars:
        raise InvalidArgument(
            f"description is longer than {limits.max_description_chars} characters "
            "(setting MODELGRID_REGISTRY_MAX_DESCRIPTION_CHARS)"
        )
    for what, entries in (("tags", tags), ("metrics", metrics), ("params", params)):
        if not entries:
            continue
        if len(entries) > limits.max_entries:
            raise InvalidArgument(f"at most {limits.max_entries} {what} (setting MODELGRID_REGISTRY_MAX_ENTRIES)")
        for key, value in entries.items():
            if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
                raise InvalidArgument(f"{what} key {shown(key)} must be 1-{MAX_KEY_CHARS} printable characters")
            if isinstance(value, str) and len(value) > limits.max_value_chars:
                raise InvalidArgument(
                    f"the value of {what} key {shown(key)} is longer than {limits.max_value_chars} characters "
                    "(setting MODELGRID_REGISTRY_MAX_VALUE_CHARS)"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgument(f"metric {shown(key)} must be a finite number")


class ModelRegistry:
    """Registry operations. `actor` is the client identity recorded in the audit trail."""

    def __init__(self, store: RegistryStore, blobs: BlobStore, settings: RegistrySettings) -> None:
        self._store = store
        self._blobs = blobs
        self._settings = settings

    def _page_size(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument("page_size must be >= 0")
        return min(requested or self._settings.default_page_size, self._settings.max_page_size)

    # -- models ------------------------------------------------------------------------------------------------

    async def create_model(self, name: str, description: str, tags: dict[str, str], actor: str) -> RegisteredModel:
        check_model_name(name)
        check_metadata(self._settings, description=description, tags=tags)
        check_kind_tag(tags.get(KIND_TAG))
        return await self._store.create_model(RegisteredModel(name, description, dict(tags)), actor)

    async def get_model(self, name: str) -> RegisteredModel:
        return await self._store.get_model(check_model_name(name))

    async def list_models(self, prefix: str, tag: str, page_size: int, page_token: str) -> Page:
        """Models in name order; `tag` is "key" or "key=value"."""
        limit = self._page_size(page_size)
        key, _, value = tag.partition("=")
        models: list[RegisteredModel] = []
        if page_token:  # the previous page's last name: anything else was not made by this service
            try:
                check_model_name(page_token)
            except InvalidArgument:
                raise InvalidArgument("page_token is not one this service returned; start again without one") from None
        after = page_token
        while len(models) < limit:
            names, more = await self._store.list_models(prefix, after, limit)
            for name in names:
                after = name
                try:
                    model = await self._store.get_model(name)
                except NotFound:  # deleted between the two reads
                    continue
                if not tag or (key in model.tags and (not value or model.tags[key] == value)):
                    models.append(model)
                    if len(models) == limit:
                        break
            if not more:
                return Page(models)
        return Page(models, after)

    async def update_model(
        self, name: str, description: str | None, set_tags: dict[str, str], remove_tags: list[str], actor: str
    ) -> RegisteredModel:
        check_model_name(name)
        check_metadata(self._settings, description=description, tags=set_tags)
        check_kind_unchanged(set_tags, remove_tags)

        def change(model: RegisteredModel) -> dict[str, str]:
            changed = []
            if description is not None:
                model.description = description
                changed.append("description")
            if set_tags or remove_tags:
                model.tags.update(set_tags)
                for tag_key in remove_tags:
                    model.tags.pop(tag_key, None)
                changed.append("tags")
            check_metadata(self._settings, tags=model.tags)  # the whole set stays within the limit
            return {"fields": ",".join(changed)}

        return await self._store.update_model(name, change, actor)

    async def delete_model(self, name: str, force: bool, actor: str) -> int:
        return await self._store.delete_model(check_model_name(name), force, actor)

    # -- versions ----------------------------------------------------------------------------------------------

    async def create_version(self, meta: NewVersion, chunks: AsyncIterator[bytes], actor: str) -> ModelVersion:
        """Streams the artifact into the blob store while hashing, verifies the declared digest, reads the
        SavedModel signature, then commits the version with the next number. Any failure leaves nothing behind:
        the staged bytes are dropped and no number is consumed. With `meta.from_blob` the artifact is a blob
        uploaded before (UploadBlob, e.g. by a trainer's worker agent): no bytes move, the blob is inspected where
        it is."""
        check_model_name(meta.model_name)
        check_digest(meta.artifact_digest)
        check_metadata(
            self._settings, description=meta.description, tags=meta.tags, metrics=meta.metrics, params=meta.params
        )
        if len(meta.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        model = await self._store.get_model(meta.model_name)  # NotFound before any byte is stored
        inspect = read_signatures if meta.artifact_format == ArtifactFormat.SAVEDMODEL_TAR else None
        if is_recipe(model.tags):  # a training recipe: its source is checked before the version is committed
            check_recipe_format(meta.artifact_format)
            limit = self._settings.max_recipe_bytes
            if meta.artifact_size > limit:
                raise InvalidArgument(
                    f"a recipe is at most {limit} bytes of Python source (setting MODELGRID_REGISTRY_MAX_RECIPE_BYTES)"
                )
            inspect = functools.partial(check_recipe_source, max_bytes=limit)
        if meta.from_blob:
            digest, size, signatures = await self._adopt(meta.artifact_digest, meta.artifact_size, chunks, inspect)
        else:
            digest, size, signatures = await self._receive(meta.artifact_digest, meta.artifact_size, chunks, inspect)
        version = ModelVersion(
            model_name=meta.model_name,
            version=0,
            artifact=Artifact(digest, size, meta.artifact_format),
            status=VersionStatus.READY,
            metrics=dict(meta.metrics),
            params=dict(meta.params),
            tags=dict(meta.tags),
            description=meta.description,
            lineage=meta.lineage,
            signatures=signatures or [],
            created_by=actor,
        )
        committed, created = await self._store.commit_version(version, meta.request_id)
        if created:
            logger.info("%s:%d committed (%s, %d bytes)", committed.model_name, committed.version, digest, size)
        return committed

    async def _receive(
        self, digest: str, declared_size: int, chunks: AsyncIterator[bytes], inspect: Callable[[Path], T] | None
    ) -> tuple[str, int, T | None]:
        """Streams bytes into the blob store while hashing, checks the declared size and digest, runs
        `inspect(staged file)` before committing, and commits. Any failure drops the staged bytes."""
        check_digest(digest)
        self._check_declared_size(declared_size)
        writer = self._blobs.writer(self._settings.max_artifact_bytes)
        return await self._write(writer, digest, declared_size, chunks, inspect)

    def _check_declared_size(self, declared_size: int) -> None:
        limit = self._settings.max_artifact_bytes
        if declared_size > limit:
            raise ResourceExhausted(
                f"artifact of {declared_size} bytes is larger than the registry's limit of {limit} bytes "
                "(setting MODELGRID_REGISTRY_MAX_ARTIFACT_BYTES)"
            )

    async def _write(
        self,
        writer: BlobWriter,
        digest: str,
        declared_size: int,
        chunks: AsyncIterator[bytes],
        inspect: Callable[[Path], T] | None,
    ) -> tuple[str, int, T | None]:
        """Writes the chunks, checks size and digest, inspects, commits. A call cut short (the client went away:
        the call is cancelled, or the stream ends before the declared size) suspends the writer, which keeps a
        resumable upload's bytes; any other failure drops them."""
        step: asyncio.Future | None = None

        async def in_thread(fn: Callable[..., U], *args) -> U:
            nonlocal step
            step = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            return await asyncio.shield(step)  # a cancelled call does not leave the thread using the file

        try:
            async for chunk in chunks:
                await in_thread(writer.write, chunk)
            if declared_size and writer.size < declared_size:  # the client went away, or stopped early
                kept = f"; they are kept: upload from offset {writer.size} to finish" if writer.resumable else ""
                raise _EndedEarly(f"the upload ended after {writer.size} of its {declared_size} bytes{kept}")
            if declared_size and writer.size != declared_size:
                raise InvalidArgument(f"size mismatch: declared {declared_size} bytes, received {writer.size}")
            inspected = await in_thread(inspect, writer.staged_path) if inspect else None
            committed = await in_thread(writer.commit, digest)
        except (asyncio.CancelledError, _EndedEarly):
            if step is not None:
                await asyncio.wait([step])  # the step under way in its thread ends before the file is closed
            writer.suspend()
            raise
        except BaseException:
            writer.abort()
            raise
        return committed, writer.size, inspected

    async def _adopt(
        self, digest: str, declared_size: int, chunks: AsyncIterator[bytes], inspect: Callable[[BinaryIO], T] | None
    ) -> tuple[str, int, T | None]:
        """A stored blob as a version's artifact: its size checked against the declared one and the limit, and
        `inspect(blob file)` run. Blobs are immutable and named by their digest, so the bytes are verified already."""
        async for _ in chunks:
            raise InvalidArgument("a version created from a blob (from_blob) takes no artifact bytes")
        size = await self.stat_blob(digest)
        limit = self._settings.max_artifact_bytes
        if size > limit:
            raise ResourceExhausted(
                f"blob {digest} of {size} bytes is larger than the registry's artifact limit of {limit} bytes "
                "(setting MODELGRID_REGISTRY_MAX_ARTIFACT_BYTES)"
            )
        if declared_size and declared_size != size:
            raise InvalidArgument(f"size mismatch: declared {declared_size} bytes, blob {digest} has {size}")
        if inspect is None:
            return digest, size, None

        def inspect_blob() -> T:
            with self._blobs.open(digest) as blob:
                return inspect(blob)

        return digest, size, await asyncio.to_thread(inspect_blob)

    # -- blobs -------------------------------------------------------------------------------------------------

    async def upload_blob(
        self, digest: str, declared_size: int, chunks: AsyncIterator[bytes], offset: int = 0
    ) -> tuple[str, int]:
        """Stores bytes by their digest (data sets, batch results, SavedModels pushed before their version);
        returns (digest, size). The chunks start at `offset`, which resumes an upload cut short (`stat_upload`)."""
        check_digest(digest)
        self._check_declared_size(declared_size)
        if offset < 0 or (declared_size and offset > declared_size):
            raise InvalidArgument(f"offset {offset} is outside the blob (0..{declared_size})")
        writer = await asyncio.to_thread(
            self._blobs.resumable_writer, digest, offset, self._settings.max_artifact_bytes
        )
        digest, size, _ = await self._write(writer, digest, declared_size, chunks, None)
        return digest, size

    async def stat_upload(self, digest: str) -> tuple[bool, int]:
        """(True, size) when the blob is stored, else (False, bytes an interrupted upload left to resume from)."""
        check_digest(digest)
        if await asyncio.to_thread(self._blobs.exists, digest):
            return True, await asyncio.to_thread(self._blobs.size, digest)
        return False, await asyncio.to_thread(self._blobs.received, digest)

    async def stat_blob(self, digest: str) -> int:
        """Size of a stored blob; NotFound when absent."""
        check_digest(digest)
        if not await asyncio.to_thread(self._blobs.exists, digest):
            raise NotFound(f"no blob with digest {digest}")
        return await asyncio.to_thread(self._blobs.size, digest)

    async def open_blob(self, digest: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """A blob's size and an iterator over its bytes from `offset`."""
        size = await self.stat_blob(digest)
        if offset < 0 or offset > size:
            raise InvalidArgument(f"offset {offset} is outside the blob (0..{size})")
        return size, self._blobs.read(digest, offset, self._settings.download_chunk_bytes)

    async def get_version(self, name: str, number: int) -> ModelVersion:
        check_model_name(name)
        if number < 1:
            raise InvalidArgument("version must be >= 1")
        return await self._store.get_version(name, number)

    async def list_versions(self, name: str, status: VersionStatus | None, page_size: int, page_token: str) -> Page:
        """Versions newest first; the page token is the last version number of the previous page."""
        check_model_name(name)
        limit = self._page_size(page_size)
        below = parse_number(page_token, "page_token") if page_token else None
        versions = [
            v
            for v in await self._store.list_versions(name)
            if (status is None or v.status == status) and (below is None or v.version < below)
        ]
        page = versions[:limit]
        return Page(page, str(page[-1].version) if len(versions) > limit else "")

    async def update_version(
        self,
        name: str,
        number: int,
        description: str | None,
        set_metrics: dict[str, float],
        set_tags: dict[str, str],
        remove_tags: list[str],
        status: VersionStatus | None,
        actor: str,
    ) -> ModelVersion:
        await self.get_version(name, number)
        check_metadata(self._settings, description=description, tags=set_tags, metrics=set_metrics)
        if status not in (None, VersionStatus.READY, VersionStatus.ARCHIVED):
            raise InvalidArgument("status can only be set to ARCHIVED, or to READY to unarchive")

        def change(version: ModelVersion, aliases: dict[str, int]) -> dict[str, str]:
            changed: dict[str, str] = {}
            if status is not None and status != version.status:
                if version.status not in (VersionStatus.READY, VersionStatus.ARCHIVED):
                    raise FailedPrecondition(f"version {number} is {version.status.value} and cannot change status")
                pointing = sorted(a for a, v in aliases.items() if v == number)
                if status == VersionStatus.ARCHIVED and pointing:
                    raise FailedPrecondition(
                        f"version {number} of {name!r} is the target of aliases {pointing}; move them first"
                    )
                version.status = status
                changed["status"] = status.value
            if description is not None:
                version.description = description
                changed["description"] = "changed"
            if set_metrics:
                version.metrics.update(set_metrics)
                changed["metrics"] = ",".join(sorted(set_metrics))
            if set_tags or remove_tags:
                version.tags.update(set_tags)
                for tag_key in remove_tags:
                    version.tags.pop(tag_key, None)
                changed["tags"] = "changed"
            check_metadata(self._settings, tags=version.tags, metrics=version.metrics)  # the whole sets
            return changed

        return await self._store.update_version(name, number, change, actor)

    async def resolve(self, ref: ModelRef) -> ModelVersion:
        """The READY version a reference names: an exact number, an alias target, or the newest READY version."""
        check_model_name(ref.name)
        if ref.version:
            version = await self._store.get_version(ref.name, ref.version)
        elif ref.alias:
            check_alias(ref.alias)
            version = await self._store.get_version(ref.name, await self._store.alias_target(ref.name, ref.alias))
        else:
            ready = [v for v in await self._store.list_versions(ref.name) if v.status == VersionStatus.READY]
            if not ready:
                raise NotFound(f"model {ref.name!r} has no READY version")
            return ready[0]
        if version.status != VersionStatus.READY:
            raise FailedPrecondition(f"{ref} is version {version.version}, which is {version.status.value}")
        return version

    async def open_artifact(self, ref: ModelRef, offset: int) -> tuple[ModelVersion, Iterator[bytes]]:
        """The resolved version and an iterator over its artifact's bytes from `offset`."""
        version = await self.resolve(ref)
        size = await asyncio.to_thread(self._blobs.size, version.artifact.digest)
        if offset < 0 or offset > size:
            raise InvalidArgument(f"offset {offset} is outside the artifact (0..{size})")
        chunks = self._blobs.read(version.artifact.digest, offset, self._settings.download_chunk_bytes)
        return version, chunks

    # -- aliases -----------------------------------------------------------------------------------------------

    async def set_alias(self, name: str, alias: str, number: int, expected: int | None, actor: str) -> Alias:
        check_model_name(name)
        check_alias(alias)
        if number < 1:
            raise InvalidArgument("version must be >= 1")
        if expected is not None and expected < 0:
            raise InvalidArgument("expected_version must be >= 0 (0: the alias must be unset)")
        return await self._store.set_alias(name, alias, number, expected, actor)

    async def delete_alias(self, name: str, alias: str, actor: str) -> int:
        return await self._store.delete_alias(check_model_name(name), check_alias(alias), actor)

    # -- events ------------------------------------------------------------------------------------------------

    async def watch(self, cursor: str, model_name: str) -> AsyncIterator[RegistryEvent]:
        """Every event after `cursor` ("": from now, "0": from the first kept), then new ones as they come."""
        if model_name:
            check_model_name(model_name)
        if cursor == "":
            cursor = await self._store.last_cursor()
        elif cursor != "0" and not _is_stream_id(cursor):
            raise InvalidArgument(f'invalid cursor {cursor!r}: pass back an event\'s cursor, "0" or nothing')
        while True:
            for event in await self._store.events_after(cursor, count=256, block_ms=5000):
                cursor = event.cursor
                if not model_name or event.model_name == model_name:
                    yield event

    async def history(self, name: str, alias: str, version: int, page_size: int, page_token: str) -> Page:
        """A model's audit trail, oldest first, narrowed to an alias or a version when given."""
        check_model_name(name)
        if alias:
            check_alias(alias)
        if page_token and not _is_stream_id(page_token):
            raise InvalidArgument(f"invalid page_token {page_token!r}")
        limit = self._page_size(page_size)
        events: list[RegistryEvent] = []
        after = page_token
        while len(events) < limit:
            batch = await self._store.history(name, after, limit)
            if not batch:
                if not events and not page_token:
                    await self._store.get_model(name)  # NotFound for a model that never existed
                return Page(events)
            for event in batch:
                after = event.cursor
                if (not alias or event.alias == alias) and (not version or event.version == version):
                    events.append(event)
                    if len(events) == limit:
                        break
        return Page(events, after)


def _is_stream_id(text: str) -> bool:
    ms, sep, seq = text.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()
