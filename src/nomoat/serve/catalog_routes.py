"""`nomoat serve --catalog`: every catalog adapter whose base is the served model, under its catalog name,
kept in step with the catalog while the server runs; and adapters loaded and unloaded over HTTP without a
restart (`POST /v1/adapters`, `DELETE /v1/adapters/{name}`, behind the same API key as the rest of /v1).

Why in-flight requests are not disturbed:
- Loading attaches new weights under a key no request can name yet (the name is registered only after),
  and the engine's forward passes run each row with exactly the adapters its request resolved to, so a
  new adapter is invisible to requests already running. LoRA wrappers are put on every projection when
  the server starts, so a hot load never swaps a module under a running forward pass.
- Unloading forgets the name at once (new requests get 404), but the weights stay until no request that
  resolved to them is left: each resolution is counted, and the count drops when the request's job is
  released, then the weights are freed.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import threading
import time
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request

from nomoat.adapters import adapter_name_for, base_fingerprint, read_adapter
from nomoat.catalog import Catalog, parse_ref
from nomoat.catalog.store import Artifact
from nomoat.digests import adapter_digest
from nomoat.errors import NomoatError
from nomoat.lora import ALL_LINEAR, LoraConfig, add_adapter, load_adapter_weights, lora_modules, remove_adapter
from nomoat.serve.app import ModelRegistry
from nomoat.serve.schemas import ApiError

POLL_SECONDS = 1.0
IDLE_SECONDS = 0.5  # how long a dropped adapter must sit unused by the engine before its weights are freed


class _Uses(dict):
    """The adapters one request resolved to; counted while alive (a plain dict cannot be weakly referenced)."""


@dataclass
class Served:
    """One name a client may send: which loaded weights it runs, and where they came from."""

    key: str  # the weights' name inside the model's LoRA layers
    digest: str
    source: str  # "catalog", "api" or "startup"
    path: str
    weight: float = 1.0
    parent: str | None = None


class CatalogRegistry(ModelRegistry):
    """A registry whose adapters come and go while the server runs, and that knows when none is in use."""

    def __init__(self, base: str, served: dict[str, Served]) -> None:
        super().__init__(base, {n: s.weight for n, s in served.items()})
        self.served = dict(served)
        self.lock = threading.RLock()
        self.uses: dict[str, int] = {}  # weights key -> requests holding it
        self.doomed: set[str] = set()  # keys no name points at any more, freed once unused

    # ---- what clients see ----
    def ids(self) -> list[str]:
        # The base and every adapter alone: a catalog holds many, and their stacks would drown them.
        with self.lock:
            return [self.base, *sorted(self.served)]

    def resolve(self, model: str) -> dict[str, float]:
        with self.lock:
            picked = super().resolve(model)
            out = _Uses({self.served[n].key: w for n, w in picked.items()})
            for k in out:
                self.uses[k] = self.uses.get(k, 0) + 1
        weakref.finalize(out, self._release, list(out))
        return out

    def card_fields(self, model: str) -> dict[str, Any]:
        """Each adapter's base and parent, for /v1/models."""
        with self.lock:
            parts = [p for p in model.split("+") if p != self.base]
            if len(parts) != 1 or parts[0] not in self.served:
                return {"base": self.base}
            s = self.served[parts[0]]
            return {"base": self.base, "parent": s.parent, "digest": s.digest, "source": s.source}

    # ---- bookkeeping ----
    def _release(self, keys: list[str]) -> None:
        with self.lock:
            for k in keys:
                self.uses[k] = self.uses.get(k, 1) - 1

    def add(self, name: str, s: Served) -> None:
        if not name or "+" in name or name == self.base:
            raise NomoatError(f"adapter name {name!r} must be non-empty, without '+', and differ from the base's")
        with self.lock:
            self.served[name] = s
            self.adapters[name] = s.weight
            self.doomed.discard(s.key)

    def drop(self, name: str) -> Served | None:
        with self.lock:
            s = self.served.pop(name, None)
            self.adapters.pop(name, None)
            if s is not None and not any(o.key == s.key for o in self.served.values()):
                self.doomed.add(s.key)
            return s

    def key_for(self, digest: str) -> str | None:
        with self.lock:
            return next((s.key for s in self.served.values() if s.digest == digest), None)

    def free_unused(self, idle: Collection[str] = ()) -> list[str]:
        """Keys of dropped adapters that no request holds any more, or that the engine has shown idle (taken
        out of `doomed`)."""
        with self.lock:
            done = [k for k in self.doomed if self.uses.get(k, 0) <= 0 or k in idle]
            self.doomed.difference_update(done)
            for k in done:
                self.uses.pop(k, None)
            return done


class CatalogServing:
    """Keeps a server's adapters in step with the catalog, and loads/unloads them on request."""

    def __init__(self, srv: Any, cat: Catalog, poll: float = POLL_SECONDS) -> None:
        self.srv, self.cat, self.poll = srv, cat, poll
        self.lm = srv.lm
        self.fingerprint = base_fingerprint(self.lm)
        self.excluded: dict[str, str] = {}  # catalog name -> digest unloaded over HTTP: not reloaded until it changes
        self.errors: dict[str, str] = {}  # catalog name -> why it could not be loaded (said once)
        self.write = threading.Lock()  # one load or unload at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = -1
        self._counter = itertools.count()
        self._idle_since: dict[str, float] = {}  # dropped key -> since when the engine has not used it
        old: ModelRegistry = srv.registry
        self.registry = CatalogRegistry(old.base, {n: Served(n, "", "startup", "", w) for n, w in old.adapters.items()})
        srv.registry = self.registry

    # ---- loading and unloading ----
    def _key(self, name: str) -> str:
        # Unique per load: a name re-pointed at new content must not collide with weights still in use.
        return f"{name.replace('.', '_')}#{next(self._counter)}"

    def load(self, name: str, path: Path, digest: str, source: str, parent: str | None = None,
             weight: float = 1.0, catalog_fingerprint: str | None = None) -> Served:
        """Read and attach an adapter (unless the same content is loaded already), then serve it as `name`."""
        with self.write:
            key = self.registry.key_for(digest)
            if key is None:
                cfg, tensors, scales, meta = read_adapter(path, self.lm.config)
                want = catalog_fingerprint or meta.get("base_fingerprint")
                if want and want != self.fingerprint:
                    raise NomoatError(f"{name}: the adapter is for base {want}, this server runs {self.fingerprint}")
                key = self._key(name)
                load_adapter_weights(self.lm.model, tensors, scales, name=key, dropout=0.0)
                for _, mod in lora_modules(self.lm.model):  # attached switched off; rows pick adapters per request
                    if key in mod.active:
                        mod.active = [n for n in mod.active if n != key]
                        mod._changed()
            s = Served(key, digest, source, str(path), weight, parent)
            self.registry.add(name, s)
            return s

    def unload(self, name: str) -> Served | None:
        with self.write:
            s = self.registry.drop(name)
        self.collect()
        return s

    def _engine_idle_keys(self) -> set[str]:
        """Dropped keys that no sequence in the engine runs and no queued request may name, continuously for
        IDLE_SECONDS. A finished request's job can outlive it (the engine's loop keeps its last one), so the
        resolution count alone could hold weights forever; a request that resolved before the drop is queued
        or running well within IDLE_SECONDS."""
        engine = self.srv.engine
        batch = getattr(engine, "batch", None)
        seqs = [*getattr(batch, "running", ()), *getattr(batch, "prefilling", ())]
        busy = {k for s in seqs for k in getattr(s, "adapters", {})}
        now = time.monotonic()
        if batch is None or engine.queued:
            self._idle_since.clear()
            return set()
        for k in list(self._idle_since):
            if k in busy or k not in self.registry.doomed:
                del self._idle_since[k]
        for k in self.registry.doomed - busy:
            self._idle_since.setdefault(k, now)
        return {k for k, t in self._idle_since.items() if now - t >= IDLE_SECONDS}

    def collect(self) -> None:
        """Free the weights of unloaded adapters that no request uses any more."""
        with self.write:
            for key in self.registry.free_unused(self._engine_idle_keys()):
                remove_adapter(self.lm.model, key)

    # ---- the catalog ----
    def _wanted(self) -> dict[str, Artifact]:
        return {n: a for a in self.cat.artifacts("adapter", self.fingerprint) for n in a.names}

    def _parent(self, art: Artifact) -> str | None:
        ps = self.cat.parents(art)
        return ", ".join(p.artifact.label if p.artifact else str(p.path) for p in ps) or None

    def sync(self) -> None:
        """Serve what the catalog holds for this base: load the new, reload the re-pointed, drop the removed."""
        wanted = self._wanted()
        for name, s in list(self.registry.served.items()):
            if s.source == "catalog" and (name not in wanted or wanted[name].digest != s.digest):
                self.unload(name)
        for name in [n for n, d in self.excluded.items() if n not in wanted or wanted[n].digest != d]:
            del self.excluded[name]
        for name, art in wanted.items():
            if name in self.registry.served or name in self.excluded:
                continue
            try:
                path = self.cat.verified_path(art)
                self.load(name, path, art.digest, "catalog", self._parent(art), catalog_fingerprint=art.fingerprint)
                self.errors.pop(name, None)
            except (NomoatError, OSError) as e:
                self.errors[name] = str(e)  # a corrupt or unreadable entry is skipped, not fatal
        self.collect()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                gen = self.cat.generation()
                if gen != self._generation:
                    self._generation = gen
                    self.sync()
                else:
                    self.collect()
            except Exception:  # a busy or damaged index: try again at the next poll
                continue

    def start(self) -> None:
        self._generation = self.cat.generation()
        self.sync()
        self._thread = threading.Thread(target=self._watch, name="nomoat-catalog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # ---- HTTP ----
    def card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nomoat", "root": self.registry.base,
                "adapters": [name], **self.registry.card_fields(name)}

    def post(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not (isinstance(body.get("name"), str) or isinstance(body.get("path"), str)):
            raise ApiError(400, 'send {"name": "NAME[:TAG]"} (a catalog adapter) or {"path": "...", "name": ...}',
                           code="invalid_request")
        weight = body.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise ApiError(400, "weight: must be a number", param="weight")
        name = body.get("name")
        try:
            if isinstance(body.get("path"), str):
                path = Path(body["path"])
                if not path.exists():
                    raise ApiError(404, f"path {path}: no such adapter", param="path")
                name = name or adapter_name_for(path)
                self._check_free(name, None)
                self.load(name, path, adapter_digest(path), "api", weight=float(weight))
            else:
                ref = parse_ref(name)
                art = self.cat.find("adapter", ref) if ref is not None else None
                if art is None:
                    raise ApiError(404, f"adapter {name!r} is not in the catalog", param="name",
                                   code="model_not_found")
                if art.fingerprint != self.fingerprint:
                    raise ApiError(422, f"adapter {name!r} is for base {art.fingerprint}, this server runs "
                                        f"{self.fingerprint}", param="name", code="wrong_base")
                self._check_free(name, art.digest)
                self.excluded.pop(name, None)
                self.load(name, self.cat.verified_path(art), art.digest, "catalog", self._parent(art),
                          float(weight), art.fingerprint)
        except NomoatError as e:
            raise ApiError(422, str(e), code="adapter_refused") from None
        return self.card(name)

    def _check_free(self, name: str, digest: str | None) -> None:
        s = self.registry.served.get(name)
        if s is not None and (digest is None or s.digest != digest):
            raise ApiError(409, f"{name!r} is already served; DELETE /v1/adapters/{name} first", param="name",
                           code="name_taken")

    def delete(self, name: str) -> dict[str, Any]:
        s = self.unload(name)
        if s is None:
            raise ApiError(404, f"adapter {name!r} is not served", param="name", code="model_not_found")
        if s.source == "catalog":
            self.excluded[name] = s.digest
        return {"id": name, "object": "model", "deleted": True}

    def listing(self) -> dict[str, Any]:
        with self.registry.lock:
            names = sorted(self.registry.served)
        return {"object": "list", "data": [self.card(n) for n in names],
                "errors": [{"name": n, "error": e} for n, e in sorted(self.errors.items())]}


def _prewrap(lm: Any) -> None:
    """Put LoRA wrappers on every projection now, so that loading an adapter later never replaces a module
    (or unfuses a fused one) while a forward pass runs."""
    add_adapter(lm.model, LoraConfig(r=1, alpha=1, targets=list(ALL_LINEAR)), name="__wrap__", init=False)
    remove_adapter(lm.model, "__wrap__")


def mount_catalog(app: FastAPI, cat: Catalog | None = None, poll: float = POLL_SECONDS,
                  start: bool = True) -> CatalogServing:
    """Serve the catalog's adapters on `app` (from `create_app`) and mount /v1/adapters; call before the server
    starts. Returns the watcher; `.stop()` it when the server ends."""
    srv = app.state.server
    _prewrap(srv.lm)
    live = CatalogServing(srv, cat or Catalog(), poll)
    key = srv.settings.api_key

    def auth(request: Request) -> None:
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.get("/adapters")
    async def list_adapters() -> dict[str, Any]:
        return live.listing()

    @router.post("/adapters", status_code=201)
    async def post_adapter(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "malformed JSON body", code="invalid_json") from None
        return await asyncio.to_thread(live.post, body)  # file reading off the event loop

    @router.delete("/adapters/{name:path}")
    async def delete_adapter(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(live.delete, name)

    app.include_router(router)
    app.state.catalog = live
    if start:
        live.start()
    return live
