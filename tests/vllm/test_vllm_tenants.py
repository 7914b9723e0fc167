"""50 concurrent clients over 20 tenants' adapters on the vLLM engine, with 4 of vLLM's device slots
(max_loras) and 6 of its host slots (max_cpu_loras) for them: every answer is its own tenant's (PEFT's
greedy text for the adapter version that was registered under that name while the request ran), also
while adapters are registered for the first time, unregistered and registered again, replaced by a
new digest of the same version and rolled to a new version, all during the load. The unmodified
``openai`` client, streaming and not."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from lorafleet.localstack.procs import wait_for
from support.models import PeftOracle, make_generation_suite, put_adapter, start_runtime

PROMPTS = ["hello world , how are", "please refund me , the invoice"]
NEW = 6
N = 20
STABLE = [f"t{i}" for i in range(10)]  # registered before the load, never touched
RELOADED = ["t10", "t11", "t12"]  # unregistered and registered again, over and over
ADDED = ["t13", "t14", "t15"]  # first registered during the load, then unregistered and registered again
REPLACED = "t16"  # version 1 registered again with another adapter's files (a new digest)
ROLLED = ["t17", "t18", "t19"]  # version 2 (other files) takes the weight, version 1 drains and goes; and back
CLIENTS, PER_CLIENT, CYCLES = 50, 8, 4


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-tenants")
    first = make_generation_suite(model, root / "v1", N, prefix="t")
    # The other files of the replaced and the rolled names (other seeds, the same mixed shapes).
    other = make_generation_suite(model, root / "other", 1 + len(ROLLED), seed0=500, prefix="o")
    alt = dict(zip([REPLACED, *ROLLED], other.values()))
    return first, alt


@pytest.fixture(scope="module")
def expected(model, adapters):
    """PEFT's greedy text for every adapter directory (and None: the base model), per prompt."""
    first, alt = adapters
    oracle = PeftOracle(model, "text-generation")
    out = {str(p): oracle.greedy_texts(p, PROMPTS, NEW) for p in [*first.values(), *alt.values()]}
    out[None] = oracle.greedy_texts(None, PROMPTS, NEW)
    for prompt in PROMPTS:  # no two adapters answer alike: another tenant's answer could not pass as one's own
        assert len({texts[prompt] for texts in out.values()}) == len(out), prompt
    return out


@pytest.fixture(scope="module")
def server(model, adapters):
    first, _ = adapters
    srv = start_runtime(model, engine="vllm", vllm_gpu_memory_utilization=0.3,  # a shared card
                        device_slots=4, host_adapters=6, max_rank=16, max_batch_size=16,
                        max_queue_delay_ms=0)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name, path in first.items():
            if name not in ADDED:
                assert put_adapter(admin, name, "1", path).status_code == 200
        assert admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0}).json()["ready"]
    yield srv
    srv.stop()


@dataclass
class Change:
    """One admin call that changed what ``served`` (``name@version``) is: its files, or None (unregistered)."""
    begun: float
    ended: float
    served: str
    path: str | None


class Registry:
    """The admin calls made, with when each began and ended: what a request may have been answered by."""

    def __init__(self, admin: httpx.Client):
        self.admin, self.changes, self.lock = admin, [], threading.Lock()

    def put(self, name, version, path, weight=100, log=True):
        begun = time.monotonic()
        assert put_adapter(self.admin, name, version, path, weight=weight).status_code == 200
        if log:
            with self.lock:
                self.changes.append(Change(begun, time.monotonic(), f"{name}@{version}", str(path)))

    def delete(self, name, version):
        begun = time.monotonic()
        assert self.admin.delete(f"/admin/adapters/{name}/{version}").status_code == 200
        with self.lock:
            self.changes.append(Change(begun, time.monotonic(), f"{name}@{version}", None))

    def possible(self, served: str, start: float, end: float) -> set[str | None]:
        """The files ``served`` may have had for a request that ran from ``start`` to ``end``: what it had
        when the request began, and what any change under way or made meanwhile gave it."""
        with self.lock:
            mine = [c for c in self.changes if c.served == served]
        before = [c for c in mine if c.ended <= start]
        out = {before[-1].path} if before else {None}
        out |= {c.path for c in mine if c.begun < end and c.ended > start}
        return out


def test_50_clients_20_tenants_4_slots_every_answer_its_own_tenants_during_churn(server, adapters, expected):
    import openai

    first, alt = adapters
    admin = httpx.Client(base_url=server.admin_url, timeout=120)
    reg = Registry(admin)
    for name, path in first.items():  # what the fixture registered, as of the start
        if name not in ADDED:
            reg.changes.append(Change(0.0, 0.0, f"{name}@1", str(path)))
    base = server.rt.base_name
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answered = threading.Event()  # the churn starts once the load is under way
    churned = threading.Event()
    results, lock = [], threading.Lock()
    seen: set[str] = set()  # served name@version answered so far
    cycles = [0]

    def churn():
        answered.wait(timeout=120)
        rolled_at = dict.fromkeys(ROLLED, "1")
        try:
            for i in range(CYCLES):
                for name in ADDED:  # cycle 0 registers them for the first time
                    if i:
                        reg.delete(name, "1")
                    reg.put(name, "1", first[name])
                for name in RELOADED:
                    reg.delete(name, "1")
                    reg.put(name, "1", first[name])
                reg.put(REPLACED, "1", alt[REPLACED] if i % 2 == 0 else first[REPLACED])
                for name in ROLLED:
                    old = rolled_at[name]
                    new = "2" if old == "1" else "1"
                    reg.put(name, new, alt[name] if new == "2" else first[name])
                    reg.put(name, old, alt[name] if old == "2" else first[name], weight=0, log=False)  # drains
                    reg.delete(name, old)
                    rolled_at[name] = new
                # Each rolled tenant answered at its new version before the next roll (the load keeps
                # going until the churn ends), so both versions are seen however fast vLLM serves.
                wanted = {f"{n}@{v}" for n, v in rolled_at.items()}
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with lock:
                        if wanted <= seen:
                            break
                    time.sleep(0.02)
                cycles[0] += 1
        finally:
            churned.set()

    def ask(n: int):
        rng = random.Random(n)
        done = 0
        while done < PER_CLIENT or not churned.is_set():
            name = rng.choice([*first, None])
            prompt = rng.choice(PROMPTS)
            stream = rng.random() < 0.3
            start = time.monotonic()
            try:
                if stream:
                    chunks = list(client.completions.create(model=name or base, prompt=prompt, max_tokens=NEW,
                                                            temperature=0, stream=True))
                    text, served = "".join(c.choices[0].text for c in chunks if c.choices), chunks[0].model
                else:
                    r = client.completions.create(model=name or base, prompt=prompt, max_tokens=NEW, temperature=0)
                    text, served = r.choices[0].text, r.model
            except openai.NotFoundError:
                text, served = None, 404
            except openai.APIError as e:  # any other failure is recorded, not raised: the check names it
                text, served = repr(e), "error"
            with lock:
                results.append((name, prompt, start, time.monotonic(), served, text))
                if isinstance(served, str):
                    seen.add(served)
                if len(results) >= 20:
                    answered.set()
            done += 1

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(ask, range(CLIENTS)))
    finally:
        answered.set()
        churner.join(timeout=300)
    assert cycles[0] == CYCLES, "the churn did not finish"

    wrong, not_found, served_versions = [], [], set()
    for name, prompt, start, end, served, text in results:
        if served == 404:
            not_found.append(name)
            if name not in RELOADED + ADDED:
                wrong.append((name, "404"))
            continue
        if name is None:
            if served != base or text != expected[None][prompt]:
                wrong.append((None, served, prompt, text))
            continue
        if served == "error" or served.split("@")[0] != name:
            wrong.append((name, served, text))
            continue
        paths = reg.possible(served, start, end)
        if text not in {expected[p][prompt] for p in paths if p is not None}:
            wrong.append((name, served, prompt, text, paths))
        served_versions.add(served)
    assert not wrong, wrong[:5]
    assert len(results) >= CLIENTS * PER_CLIENT and len(results) - len(not_found) >= 0.8 * len(results)
    assert {s.split("@")[0] for s in served_versions} == set(first)  # every tenant answered
    assert all(f"{n}@2" in served_versions and f"{n}@1" in served_versions for n in ROLLED)

    # Every version unregistered or replaced has left vLLM; what is registered is all it holds.
    engine, manager = server.rt.engine, server.rt.manager
    registered = {e.key for e in manager.all()}
    zero = {engine.base_lora.lora_int_id} if engine.base_lora else set()
    wait_for(lambda: set(engine.loras()) - zero <= registered,
             timeout=60, what="vLLM to hold only the registered adapter versions")

    # A version replaced by a new digest leaves vLLM as an unregistered one does.
    old = manager.resolve(f"{REPLACED}@1").key
    client.completions.create(model=f"{REPLACED}@1", prompt=PROMPTS[0], max_tokens=1, temperature=0)  # in vLLM now
    wait_for(lambda: old in engine.loras(), timeout=60, what=f"{REPLACED}@1 in vLLM")
    current = manager.resolve(f"{REPLACED}@1").path
    reg.put(REPLACED, "1", first[REPLACED] if str(current) == str(alt[REPLACED]) else alt[REPLACED])
    admin.close()
    assert manager.resolve(f"{REPLACED}@1").key != old
    wait_for(lambda: old not in engine.loras(), timeout=60, what=f"the replaced {REPLACED}@1 to leave vLLM")
