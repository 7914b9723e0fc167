"""The runtime's admin API (127.0.0.1:8001) as the sidecar speaks it (contracts/runtime_api.py)."""

from __future__ import annotations

from urllib.parse import quote

import httpx

from lorafleet.contracts.runtime_api import AdapterList, AdapterLoadRequest, ModelStatus, SyncState


class RuntimeUnavailable(Exception):
    """The runtime did not answer (starting, restarting): the sidecar tries again on its next pass."""


class RuntimeRefused(Exception):
    """The runtime answered a load with an error for this adapter (reason in the message). ``permanent``:
    the runtime says the content itself is refused (``errorKind``), so loading it again cannot help."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class RuntimeAdmin:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise RuntimeUnavailable(f"runtime admin API {self.http.base_url}{path}: {type(e).__name__}: {e}") from None

    def adapters(self) -> AdapterList:
        r = self._call("GET", "/admin/adapters", timeout=10.0)
        if r.status_code != 200:
            raise RuntimeUnavailable(f"GET /admin/adapters: HTTP {r.status_code}: {r.text[:200]}")
        return AdapterList.model_validate_json(r.content)

    def model(self) -> ModelStatus | None:
        """Where the runtime is with its base model; None from a runtime without ``GET /admin/model``."""
        r = self._call("GET", "/admin/model", timeout=10.0)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RuntimeUnavailable(f"GET /admin/model: HTTP {r.status_code}: {r.text[:200]}")
        return ModelStatus.model_validate_json(r.content)

    def load(self, name: str, version: str, req: AdapterLoadRequest) -> None:
        r = self._call("PUT", f"/admin/adapters/{quote(name, safe='')}/{quote(version, safe='')}",
                       content=req.model_dump_json(by_alias=True), headers={"content-type": "application/json"})
        if r.status_code >= 300:  # retried with backoff for this adapter only, unless permanent
            raise RuntimeRefused(f"runtime refused the load (HTTP {r.status_code}): {_message(r)}",
                                 permanent=_error_kind(r) == "permanent")

    def unload(self, name: str, version: str) -> None:
        r = self._call("DELETE", f"/admin/adapters/{quote(name, safe='')}/{quote(version, safe='')}")
        if r.status_code >= 300 and r.status_code != 404:
            raise RuntimeUnavailable(f"DELETE {name}@{version}: HTTP {r.status_code}: {_message(r)}")

    def sync(self, state: SyncState) -> None:
        r = self._call("PUT", "/admin/sync", content=state.model_dump_json(by_alias=True),
                       headers={"content-type": "application/json"})
        if r.status_code >= 300:
            raise RuntimeUnavailable(f"PUT /admin/sync: HTTP {r.status_code}: {_message(r)}")


def _error_kind(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    adapter = body.get("adapter") if isinstance(body, dict) else None
    return adapter.get("errorKind") if isinstance(adapter, dict) else None


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
            if body.get("detail"):
                return str(body["detail"])
    except ValueError:
        pass
    return r.text[:300]
