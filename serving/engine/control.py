"""Model control: which model versions are served, and changing that while serving.

Protocol-free: the repository RPCs (and any other front end) call the same three operations,
`index()`, `load(name)` and `unload(name)`. The modes are Triton's (`model_control`):

- `none`: every model is loaded at start and the repository is never read again;
  RepositoryModelLoad/Unload answer FAILED_PRECONDITION.
- `poll`: as `none`, then the repository is rescanned every `repository_poll_s`: new and
  changed versions are loaded, versions the policy no longer names or whose folders were
  removed are unloaded, a removed model folder is unloaded whole.
- `explicit`: only `load_models` at start; afterwards what load/unload ask for.

Each model's `version_policy` (config.yaml) names the versions to serve, Triton's default
being the latest one. A version swap fails no request: the new version is loaded and started,
then routed to (it becomes the default), then the old one is taken out of routing, what it
accepted finishes, and it is closed.

A model that fails to load is UNAVAILABLE with the reason (in the index, NOT_SERVING in the
health service, ready=false in ModelReady) and the others serve. If a version that replaces a
loaded one fails, the loaded one keeps serving. Files still being written: in `poll` mode a
version loads only once its files (names, sizes, modification times) are equal on two
consecutive scans; a file that is complete but corrupt fails to load as above. The dependable
way to publish a version is to write it elsewhere on the same filesystem (`REPO/m/.3/`: names
starting with "." are ignored) and rename the folder into place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from serving.config import ServerConfig
from serving.engine.repository import NAME, Fingerprint, ModelFolder, ModelSource, scan_model, scan_repository
from serving.engine.repository import single_model as single_model_source
from serving.engine.service import DataPlane, LoadedModel, load_model
from serving.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    ModelNotFound,
    ServingError,
    Unavailable,
)

log = logging.getLogger(__name__)

READY = "READY"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"
# Called with a model name and whether some version of it now serves: the health service.
HealthCallback = Callable[[str, bool], Awaitable[None]]
# Called once the data plane's set of versions changed (one was added or taken out of routing):
# the front-end processes (`--workers`) route by a copy of it.
ModelsCallback = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index (Triton's RepositoryIndexResponse.ModelIndex)."""

    name: str
    version: str  # empty for a model folder none of whose versions can be loaded
    state: str  # READY, LOADING, UNLOADING or UNAVAILABLE
    reason: str = ""  # why it is not READY (or why an older version is kept)


@dataclass
class _Version:
    """What the control knows of one version beyond its files."""

    model: LoadedModel | None = None  # the instance being served
    state: str = UNAVAILABLE
    reason: str = ""
    loaded_from: Fingerprint | None = None  # the files `model` was loaded from
    failed_on: Fingerprint | None = None  # the files of the last failed attempt


class ModelControl:
    """Loads, swaps and unloads model versions in `plane` as the mode and the repository say."""

    def __init__(
        self,
        config: ServerConfig,
        plane: DataPlane,
        on_health: HealthCallback | None = None,
        on_models: ModelsCallback | None = None,
        cores: int | None = None,
    ) -> None:
        self.config = config
        self.plane = plane
        self._on_health = on_health
        self._on_models = on_models
        self._cores = cores
        self._versions: dict[str, dict[str, _Version]] = {}
        self._errors: dict[str, str] = {}  # model name -> why no version of it can load
        self._previous: dict[tuple[str, str], Fingerprint] = {}  # the last scan, for `poll`
        self._single: ModelFolder | None = None  # `--model FILE` instead of a repository
        self._lock = asyncio.Lock()  # one change at a time
        self._stopping = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    @property
    def mode(self) -> str:
        return self.config.model_control

    @property
    def repo(self) -> Path:
        return Path(self.config.repo)

    def names(self) -> list[str]:
        """Every model name the control knows of, served or not."""
        return sorted(set(self._versions) | set(self._errors))

    def knows(self, name: str) -> bool:
        """Whether `name` is a model of the repository, served or not (else it is a typo)."""
        if name in self._versions or name in self._errors:
            return True
        if self._single is not None or not NAME.match(name):
            return False
        return (self.repo / name).is_dir()

    # --- the three operations -------------------------------------------------------------

    async def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version in the repository (and any still served whose folder is gone)."""
        folders = {f.name: f for f in await asyncio.to_thread(self._scan)}
        entries: list[IndexEntry] = []
        for name in sorted(set(folders) | set(self._versions)):
            entries.extend(self._entries(name, folders.get(name)))
        return [e for e in entries if e.state == READY] if ready_only else entries

    async def load(self, name: str) -> None:
        """Load or reload model `name` from the repository as its version policy says.

        Versions the policy names are loaded (again, if their files changed), then versions it no
        longer names are drained and unloaded. ModelLoadError with every reason when a version
        the policy names could not be loaded (a version loaded before keeps serving).
        """
        self._check_control("load")
        async with self._lock:
            folder = await asyncio.to_thread(self._folder, name)
            failures = await self._apply([folder], settle=False, retry=True)
        if failures:
            raise ModelLoadError(f"model {name!r} failed to load: {'; '.join(failures)}")

    async def unload(self, name: str) -> None:
        """Drain and unload every served version of `name`; nothing to do when none is served."""
        self._check_control("unload")
        async with self._lock:
            records = self._versions.get(name, {})
            if not any(r.model for r in records.values()):
                await asyncio.to_thread(self._folder, name)  # NOT_FOUND unless it exists on disk
                return
            for record in records.values():
                if record.model is not None:
                    await self._retire(record, "unloaded")
            await self._publish(name)

    # --- start, poll, stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Load what the mode loads at start, then (poll) start rescanning.

        ModelLoadError, with every reason, when `exit_on_error` is set and anything failed, or
        when the mode is `none` and nothing at all could be loaded (it would never load later).
        The caller closes the plane then, which closes what was loaded.
        """
        cfg = self.config
        async with self._lock:
            if cfg.model:
                source = single_model_source(Path(cfg.model), cfg.model_name, cfg.model_defaults)
                self._single = ModelFolder(source.name, source.config, {"1": source}, fingerprints={"1": ()})
                folders = [self._single]
            elif self.mode == "explicit" and "*" not in cfg.load_models:
                folders = [scan_model(self.repo, name, cfg.model_defaults) for name in cfg.load_models]
            else:
                folders = await asyncio.to_thread(self._scan)
            failures = await self._apply(folders, settle=False, retry=True)
            self._remember(folders)
        if failures and cfg.exit_on_error:
            raise ModelLoadError("; ".join(failures) + " (exit_on_error)")
        if self.mode == "none" and not self.plane.models:
            if cfg.model:
                raise ModelLoadError("; ".join(failures))
            why = "; ".join(failures) or f"it holds no models (expected {cfg.repo}/<model>/1/model.onnx)"
            raise ModelLoadError(f"nothing to serve in {cfg.repo}: {why}")
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def poll(self) -> None:
        """One rescan (the `poll` mode runs this every `repository_poll_s`)."""
        async with self._lock:
            folders = await asyncio.to_thread(self._scan)
            await self._apply(folders, settle=True, retry=False)
            present = {f.name for f in folders}
            for name in [n for n in self._versions if n not in present]:
                for record in self._versions.pop(name).values():
                    if record.model is not None:
                        await self._retire(record, "removed from the repository")
                self._errors.pop(name, None)
                await self._publish(name, "removed from the repository")
            self._remember(folders)

    async def stop(self) -> None:
        """No more changes: the poller ends after its current scan, load/unload are refused."""
        self._stopping.set()
        if self._poller is not None:
            await self._poller
        async with self._lock:  # a load or unload in progress finishes first
            pass

    async def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.config.repository_poll_s)
                return
            except TimeoutError:
                pass
            try:
                await self.poll()
            except ServingError as exc:  # the repository itself is gone: keep serving what is loaded
                log.warning("repository poll failed: %s", exc)
            except Exception:
                log.exception("repository poll failed")

    # --- the work -------------------------------------------------------------------------

    def _check_control(self, operation: str) -> None:
        if self.mode != "explicit":
            raise FailedPrecondition(
                f"model {operation} is not allowed with model_control {self.mode} "
                "(start the server with --model-control explicit)"
            )
        if self._stopping.is_set():
            raise Unavailable("the server is shutting down")

    def _scan(self) -> list[ModelFolder]:
        if self._single is not None:
            return [self._single]
        return scan_repository(self.repo, self.config.model_defaults)

    def _folder(self, name: str) -> ModelFolder:
        """`REPO/<name>/` for load/unload: INVALID_ARGUMENT for a name that is no folder name,
        NOT_FOUND when there is no such folder."""
        if not NAME.match(name):
            raise InvalidArgument(f"model name {name[:200]!r}: use letters, digits, '_', '-' and '.'")
        if not (self.repo / name).is_dir():
            raise ModelNotFound(name, reason=f"no folder {self.repo / name}", known=self.plane.names())
        return scan_model(self.repo, name, self.config.model_defaults)

    def _remember(self, folders: list[ModelFolder]) -> None:
        self._previous = {(f.name, v): fp for f in folders for v, fp in f.fingerprints.items()}

    def _instances_after(self, folders: list[ModelFolder]) -> int:
        """Instances served once `folders` are applied: the CPU cores are shared among them."""
        names = {f.name for f in folders}
        others = sum(m.source.config.instances for m in self.plane.models if m.name not in names)
        mine = sum(f.config.instances * len(f.wanted()) for f in folders if f.config and not f.error)
        return others + mine

    async def _apply(self, folders: list[ModelFolder], *, settle: bool, retry: bool) -> list[str]:
        """Bring each model of `folders` to what its folder and policy say; the failures."""
        instances = self._instances_after(folders)
        failures: list[str] = []
        for folder in folders:
            failures += await self._sync(folder, instances, settle=settle, retry=retry)
        return failures

    async def _sync(self, folder: ModelFolder, instances: int, *, settle: bool, retry: bool) -> list[str]:
        name = folder.name
        records = self._versions.setdefault(name, {})
        if folder.error:  # a broken config.yaml must not take down versions that serve
            if self._errors.get(name) != folder.error:
                log.error("model not loadable", extra={"model": name, "reason": folder.error})
            self._errors[name] = folder.error
            for record in records.values():
                if record.model is not None:
                    record.reason = f"kept loaded: {folder.error}"
            await self._publish(name)
            return [folder.error]
        self._errors.pop(name, None)
        failures: list[str] = []
        wanted = folder.wanted()
        for version in wanted:
            record = records.setdefault(version, _Version())
            files = folder.fingerprints[version]
            problem = folder.problems.get(version)
            if problem:
                if record.model is None and record.reason != problem:
                    where = {"model": name, "version": version, "reason": problem}
                    log.error("model not loadable", extra=where)
                    record.state, record.reason = UNAVAILABLE, problem
                failures.append(problem)
            elif record.model is not None and record.loaded_from == files:
                record.reason = ""
            elif settle and self._previous.get((name, version)) != files:
                if record.model is None:
                    record.reason = "waiting for its files to stop changing (checked at each poll)"
            elif retry or record.failed_on != files:
                failure = await self._load_version(folder.sources[version], record, files, instances)
                failures += [failure] if failure else []
        serving = [v for v in wanted if records[v].model is not None]
        for version, record in list(records.items()):
            if version in wanted:
                continue
            if record.model is not None:
                if version not in folder.fingerprints:
                    await self._retire(record, "removed from the repository")
                elif serving:
                    policy = folder.config.version_policy.describe() if folder.config else ""
                    await self._retire(record, f"unloaded: not in the version policy ({policy})")
                else:
                    record.reason = f"kept: version(s) {', '.join(wanted)} named by the policy do not load"
            if record.model is None and version not in folder.fingerprints:
                del records[version]
        await self._publish(name)
        return failures

    async def _load_version(
        self, source: ModelSource, record: _Version, files: Fingerprint, instances: int
    ) -> str:
        """Load `source` and route to it (draining what it replaces); the failure, or ""."""
        config = source.config
        if not config.threads_per_instance:
            threads = config.intra_op_threads(self._cores, instances_served=instances)
            config = dataclasses.replace(config, threads_per_instance=threads)
            source = dataclasses.replace(source, config=config)
        if record.model is None:
            record.state, record.reason = LOADING, ""
        cfg = self.config
        try:
            model = await asyncio.to_thread(
                load_model,
                source,
                self.plane.metrics,
                cfg.decode_threads(),
                cfg.max_image_pixels,
                cfg.max_request_pixels,
            )
        except Exception as exc:
            reason = str(exc)
            if not isinstance(exc, ServingError):
                reason = f"{source.path}: {type(exc).__name__}: {exc}"
            where = {"model": source.name, "version": source.version, "reason": reason}
            log.error("model failed to load", extra=where)
            record.failed_on = files
            if record.model is None:
                record.state, record.reason = UNAVAILABLE, reason
            else:
                record.reason = f"kept the files loaded before; the new ones failed: {reason}"
            return reason
        replaced = await self.plane.add(model)
        await self._models_changed()
        record.model, record.state, record.reason = model, READY, ""
        record.loaded_from, record.failed_on = files, None
        if replaced is not None:  # the same version, reloaded from changed files
            await self.plane.retire(replaced, self.config.grace_period_s)
        return ""

    async def _retire(self, record: _Version, reason: str) -> None:
        model = record.model
        assert model is not None
        record.state, record.reason = UNLOADING, reason
        self.plane.remove(model)
        await self._models_changed()
        drained = await self.plane.retire(model, self.config.grace_period_s)
        record.model, record.state, record.loaded_from = None, UNAVAILABLE, None
        log.info(
            "unloaded model",
            extra={"model": model.name, "version": model.version, "reason": reason, "drained": drained},
        )

    async def _models_changed(self) -> None:
        if self._on_models is not None:
            await self._on_models()

    async def _publish(self, name: str, reason: str = "") -> None:
        """Tell the data plane's errors and the health service whether `name` serves now."""
        serving = bool(self.plane.versions(name))
        if serving:
            self.plane.reasons.pop(name, None)
        else:
            self.plane.reasons[name] = reason or self._why_not(name)
        if self._on_health is not None:
            await self._on_health(name, serving)

    def _why_not(self, name: str) -> str:
        if name in self._errors:
            return self._errors[name]
        records = sorted(self._versions.get(name, {}).items())
        reasons = [f"version {v}: {r.reason}" for v, r in records if r.reason]
        return "; ".join(reasons) or "not loaded"

    def _entries(self, name: str, folder: ModelFolder | None) -> list[IndexEntry]:
        records = self._versions.get(name, {})
        on_disk = folder.fingerprints if folder else {}
        if folder is not None and folder.error and not records:
            return [IndexEntry(name, "", UNAVAILABLE, folder.error)]
        wanted = folder.wanted() if folder else []
        entries = []
        for version in sorted(set(records) | set(on_disk), key=int):
            record = records.get(version)
            if record is not None and (record.model is not None or record.reason):
                entries.append(IndexEntry(name, version, record.state, record.reason))
            else:
                reason = self._idle_reason(folder, version, wanted)
                entries.append(IndexEntry(name, version, UNAVAILABLE, reason))
        return entries

    def _idle_reason(self, folder: ModelFolder | None, version: str, wanted: list[str]) -> str:
        if folder is None:
            return "removed from the repository"
        if version in folder.problems:
            return folder.problems[version]
        if version not in wanted and folder.config is not None:
            return f"not in the version policy ({folder.config.version_policy.describe()})"
        return {
            "explicit": "not loaded (model_control explicit: RepositoryModelLoad loads it)",
            "poll": "not loaded yet (the next scans load it once its files stop changing)",
        }.get(self.mode, "not loaded (model_control none loads at start only)")
