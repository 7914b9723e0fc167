"""A minimal stand-in for the runtime's admin API (docs/architecture.md, contracts/runtime_api.py), so
sidecar tests run without a model. It checks what the real runtime relies on: the path is a complete
directory under the cache's ``adapters/`` and its digest is the one claimed. ``restart()`` comes back
empty with a new ``instance``, as a restarted runtime does. The real runtime is tested on its own.
``POST /v1/classify`` answers as the runtime resolves a request's adapter (``Runtime.resolve``): 200
naming this stand-in for an adapter it holds, 503 ``adapter_elsewhere`` for another one of the
pool's routes (``SyncState.pool_adapters``), 404 otherwise, so tests can see where requests go."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from lorafleet.contracts.digest import directory_digest
from lorafleet.contracts.runtime_api import AdapterList, AdapterLoadRequest, AdapterState, ModelStatus, SyncState
from lorafleet.localstack.procs import free_port, wait_for


class StandinRuntime:
    def __init__(self, cache_dir: Path, verify_digest: bool = True, name: str = ""):
        self.cache_dir = Path(cache_dir)
        self.name = name  # the pod it stands in for, in its answers
        self.served: dict[str, int] = {}  # served name -> requests answered 200
        self.verify_digest = verify_digest
        self.port = free_port()
        self.instance = ""
        self.adapters: dict[str, AdapterState] = {}
        self.sync: SyncState | None = None
        self.loads: list[str] = []  # name@version of every successful PUT, in order
        self.unloads: list[str] = []
        self.refuse: dict[str, str] = {}  # name@version -> error to answer
        self.refuse_kind: dict[str, str] = {}  # name@version -> errorKind of that refusal (permanent, transient)
        self.puts: list[str] = []  # name@version of every PUT, answered or refused
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.put("/admin/adapters/{name}/{version}")
        def load(name: str, version: str, req: AdapterLoadRequest):
            key = f"{name}@{version}"
            path = Path(req.path)
            self.puts.append(key)
            if key in self.refuse:
                return JSONResponse({"error": {"message": self.refuse[key], "type": "invalid_adapter"},
                                     "adapter": {"errorKind": self.refuse_kind.get(key)}}, 422)
            if path.parent != self.cache_dir / "adapters" or not path.is_dir():
                return JSONResponse({"error": {"message": f"{path} is not under the cache's adapters/"}}, 422)
            if self.verify_digest and directory_digest(path) != req.sha256:
                return JSONResponse({"error": {"message": f"{path}: digest is not {req.sha256}"}}, 422)
            self.adapters[key] = AdapterState(name=name, version=version, sha256=req.sha256, tenant=req.tenant,
                                              weight=req.weight, pinned=req.pinned, state="host")
            self.loads.append(key)
            return {"loaded": key}

        @app.delete("/admin/adapters/{name}/{version}")
        def unload(name: str, version: str):
            key = f"{name}@{version}"
            if self.adapters.pop(key, None) is None:
                return Response(status_code=404)
            self.unloads.append(key)
            return Response(status_code=204)

        @app.get("/admin/adapters")
        def listing() -> AdapterList:
            return AdapterList(adapters=list(self.adapters.values()), instance=self.instance)

        @app.get("/admin/model")
        def model() -> ModelStatus:
            return ModelStatus(state="loaded", instance=self.instance)

        @app.post("/v1/classify")
        def classify(body: dict):
            model = str(body.get("model") or "")
            name = model.partition("@")[0]
            held = [a for k, a in list(self.adapters.items()) if k.partition("@")[0] == name]
            if held:
                self.served[name] = self.served.get(name, 0) + 1
                held[0].requests += 1  # as the runtime counts them (GET /admin/adapters)
                return {"model": model, "replica": self.name}
            if self.sync is not None and name in self.sync.pool_adapters:
                return JSONResponse({"error": {"message": f"adapter {model!r} is not served by this replica",
                                               "type": "service_unavailable", "code": "adapter_elsewhere"}},
                                    503, headers={"Retry-After": "1"})
            return JSONResponse({"error": {"message": f"model {model!r} not found", "type": "invalid_request_error",
                                           "code": "model_not_found"}}, 404)

        @app.put("/admin/sync")
        def sync(state: SyncState):
            self.sync = state
            return {}

        return app

    def start(self) -> "StandinRuntime":
        self.instance = uuid.uuid4().hex
        self.adapters, self.sync = {}, None
        self._server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started, 20, what="stand-in runtime to start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None

    def restart(self) -> "StandinRuntime":
        self.stop()
        time.sleep(0)  # the port is reused at once (SO_REUSEADDR)
        return self.start()

    def loaded(self) -> dict[str, str]:
        """name@version -> sha256 of what is loaded now."""
        return {k: a.sha256 for k, a in list(self.adapters.items())}


if __name__ == "__main__":  # run in its own process (the benchmark): CACHE_DIR PORT
    import sys

    rt = StandinRuntime(Path(sys.argv[1]), verify_digest=False)
    rt.port = int(sys.argv[2])
    rt.start()
    threading.Event().wait()
