"""A text-generation or classification model in a process of its own (``--model-process process``).

On CPU the model worker shares one interpreter lock with the event loop that parses requests and
streams answers: under load neither gets a core of its own (docs/benchmarks.md). Here the model, its
KV cache and its adapter slots live in a child process (``python -m lorafleet.runtime.model_process``)
that computes each step, and the runtime keeps everything else: the HTTP layer, the scheduler, the model
worker thread (which now spends a step waiting on a socket, with the lock released) and the device
slots' bookkeeping (which adapter is in which slot, reference counts, evictions).

``RemoteGenerationEngine`` is a ``GenerationEngine`` to the model worker: ``prefill``, ``decode``, ``step``
and ``finish`` have its semantics and are computed by the child's real ``GenerationEngine``, so answers
are the in-process engine's bit for bit. The parent keeps a mirror of each ``Sequence`` (its tokens,
position and logprobs, sent back with every step) for the HTTP layer to read. Finishes are sent with the
next step (nothing in between reads the child). The model worker keeps a step in flight (``send_step`` /
``collect_step``; ``ModelWorker._pipelined_step``): a step names rows that continue from the tokens the child
holds, and the child skips and frees a row the step before ended; a failed pipelined step frees its new rows,
and the child skips the steps sent behind it until ``resync``. Writing an adapter into a slot is a call of its own where
it can fail (the first adapter on a module wraps it, a higher rank than the slots have grows them), so
that its error reaches the request that needed it; every other write is a copy into tensors that exist,
sent with the next call (each install a round trip of its own left the model idle a sixth of the time at
N = 1,000 in serve_bench), and one failing there (it cannot, short of memory corruption) ends the model
process, as the slots can no longer be trusted. If the child dies, every call fails with
``ModelProcessDied`` and ``on_death`` is called once (the runtime exits 1 so that its container restarts).

``RemoteClassificationEngine`` does the same for a classification pool: a batch is one call, texts in and
each row's label probabilities out.

One message each way per call: pickled tuples over a socketpair (``multiprocessing.connection``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path

from lorafleet.runtime.engines import ClassificationEngine, GenerationEngine
from lorafleet.runtime.peft_format import HostAdapter, LoRAWeights

log = logging.getLogger("lorafleet.runtime")

SWITCH_INTERVAL_S = 0.0005  # the interpreter's time slice in a server whose model is in a model process
MODEL_PROCESS_NICE = 10  # the model process's niceness behind the server's own event loop, added to the server's


def model_nice(settings, task: str) -> int:
    """The model process's niceness, added to the server's. With the server's event loop on the public port,
    ``MODEL_PROCESS_NICE``: when the cores are short, the loop (admission: a refusal must be fast) goes first
    and the model takes what is left (5x overload p99 29.1 s -> 4.4 s). Behind the HTTP front process, which
    refuses before the server sees a request, 0: niced there, the model lost its core to the server and the
    front (serve_bench, N = 1,000 / N = 1 over three rounds: 0.84x niced, 0.95x not; docs/benchmarks.md)."""
    from lorafleet.runtime.lifecycle import choose_front

    return MODEL_PROCESS_NICE if choose_front(settings, task) == "inline" else 0

# The Sequence fields a request sets (sent once, when it starts); the rest is state the child computes.
_STATE = {"slot", "row", "pos", "generated", "token_logprobs", "top_logprobs", "prompt_token_logprobs", "generator"}


class StepSkipped(RuntimeError):
    """A pipelined step the model process skipped: one sent before it failed (``collect_step``)."""


class ModelProcessDied(RuntimeError):
    """The model process exited: nothing it held (KV cache rows, adapter slots) exists any more."""


def _tensor(dtype: str, shape: tuple, data: bytes):
    import torch

    if not data:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


def _view(blob, offset: int, shape: tuple):
    return blob[offset: offset + math.prod(shape)].view(shape)


def _packed_host(blob, modules: dict, heads: dict, rest: dict) -> HostAdapter:
    """A HostAdapter from its one buffer and where each tensor lies in it (``_Pickler._host``)."""
    return HostAdapter(
        modules={p: LoRAWeights(_view(blob, *a), _view(blob, *b), rank, scale)
                 for p, (a, b, rank, scale) in modules.items()},
        heads={p: {k: _view(blob, *span) for k, span in h.items()} for p, h in heads.items()},
        blob=blob, **rest)


def _unpacked_host(rest: dict) -> HostAdapter:
    return HostAdapter(**rest)


class _Pickler(pickle.Pickler):
    """Tensors (an adapter's factors, on their way into a slot) as their raw bytes: torch's own pickling
    writes each storage as a small torch.save archive, which made an adapter's trip 3-4x slower. An adapter
    packed into one buffer (``peft_format.pack``) goes as that buffer's bytes and each tensor's place in it:
    one copy instead of a few tensor operations per factor, on the model worker's thread."""

    def reducer_override(self, obj):
        import torch

        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return _tensor, (str(t.dtype).removeprefix("torch."), tuple(t.shape), data)
        if isinstance(obj, HostAdapter):
            return self._host(obj)
        return NotImplemented

    @staticmethod
    def _host(host: HostAdapter):
        rest = {f.name: getattr(host, f.name) for f in fields(HostAdapter) if f.name not in ("modules", "heads", "blob")}
        blob = host.blob
        if blob is not None:
            base = blob.data_ptr()

            def span(t):  # where t lies in the blob; LookupError if it is not a contiguous view of it
                if t.dtype != blob.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != \
                        blob.untyped_storage().data_ptr():
                    raise LookupError
                return (t.data_ptr() - base) // t.element_size(), tuple(t.shape)

            try:
                modules = {p: (span(w.a), span(w.b), w.rank, w.scale) for p, w in host.modules.items()}
                heads = {p: {k: span(t) for k, t in h.items()} for p, h in host.heads.items()}
                return _packed_host, (blob, modules, heads, rest)
            except LookupError:
                pass
        # Not packed (or no longer): each tensor on its own, and no buffer beside them.
        return _unpacked_host, ({**rest, "modules": host.modules, "heads": host.heads},)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (its class and message reach the caller), else a RuntimeError naming it."""
    try:
        pickle.loads(_dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


# --- the runtime's side ----------------------------------------------------------------------------------
class _RemotePatch:
    """What ``Engine.acquire`` and the adapter manager use of ``LoRAModelPatch``: the fit check, made here
    from the child's description of its model, and ``install``, made in the child."""

    def __init__(self, engine: "_RemoteModel", base_info, max_rank: int):
        self.engine = engine
        self._base = base_info
        self.max_rank = max_rank

    def base_info(self):
        return self._base

    def check(self, adapter) -> None:
        from lorafleet.runtime.multilora import check_fit

        check_fit(adapter, self._base, self.max_rank)

    def install(self, slot: int, adapter) -> None:
        engine = self.engine
        if engine._writes_only(adapter):
            engine._installs.append((slot, adapter))  # goes with the next call, before what it carries
            return
        # The reply is the engine's memory figures and slot layout: a first adapter on a module wraps it,
        # a higher rank grows its slots.
        engine._memory, engine._layout = engine._call(("install", slot, adapter))


class _RemoteModel:
    """The channel to a model process and what every engine computed there shares: the tokenizer (read
    here, for the event loop's tokenising), the device slots' bookkeeping, the fit check, memory figures
    and CPU time, the death watch. Mixed in before the engine class it stands for; its ``__init__`` replaces
    the engine's (there is no model in this process)."""

    def __init__(self, model_dir: Path, settings, kwargs: dict):
        from transformers import AutoTokenizer

        from lorafleet.runtime.multilora import SlotAllocator

        self.settings = settings
        self.manager = None
        self._encoder = None
        self._lock = threading.Lock()  # one call at a time (the worker's; close may come from another thread)
        self.child_cpu = 0.0
        self.closing = False
        self.dead: str | None = None
        self.on_death = None  # called once (from a watcher thread) with the reason, unless closing
        self._installs: list = []  # (slot, adapter) writes into existing slot tensors, sent with the next call
        self._layout: tuple[dict, dict] = ({}, {})  # the child's wrapped modules' ranks, heads' widths
        self.round_trips = 0  # calls made on the channel (installs that went with another call not counted)
        self._in_flight = 0  # pipelined steps sent whose replies have not been read
        self._early: deque = deque()  # their replies, read while a later call waited for its own
        parent, child = socket.socketpair()
        for sock in (parent, child):  # an adapter's factors in one write, not a few hundred KiB at a time
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        import lorafleet

        env = dict(os.environ)  # the child imports this same lorafleet (a checkout or an installed wheel)
        home = str(Path(lorafleet.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([home] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.nice = model_nice(settings, self.task)
        cmd = [sys.executable, "-m", "lorafleet.runtime.model_process", str(child.fileno()), str(self.nice)]
        self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env)
        child.close()
        self.conn = Connection(parent.detach())
        log.info("%s model process %d: loading %s", self.task, self.proc.pid, model_dir)
        try:
            hello = self._call(("load", self.task, str(model_dir), kwargs, settings.log_level))
        except BaseException:
            self.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="lorafleet-model-process-watch", daemon=True)
        self._watcher.start()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._dtype = hello.pop("dtype")
        self._memory = hello.pop("memory")
        self._layout = hello.pop("layout")
        self.patch = _RemotePatch(self, hello.pop("base_info"), kwargs["max_rank"])
        for k, v in hello.items():
            setattr(self, k, v)
        self.slots = SlotAllocator(kwargs["device_slots"])
        # This process's threads now compute little: the model worker waits on the channel, takes a step's
        # answer and sends the next while the model process waits. Its wake-up should not wait out the event
        # loop's 5 ms time slice (serve_bench, N = 1,000, one run each: 3,504 against 3,161 tok/s).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        log.info("%s model process %d: %s loaded", self.task, self.proc.pid, self.architecture)

    @property
    def dtype(self):
        return self._dtype

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory_bytes(self) -> dict[str, int]:
        return dict(self._memory)

    def cpu_time(self) -> float:
        """CPU seconds the child spent computing this engine's calls (the worker's batch metric)."""
        return self.child_cpu

    def _writes_only(self, adapter) -> bool:
        """Whether installing ``adapter`` only copies into slot tensors the child has (every module it
        names wrapped at a rank at least its own, every head at least as wide): nothing there can refuse it."""
        layers, heads = self._layout
        return all(layers.get(path, -1) >= w.a.shape[1] for path, w in adapter.modules.items()) and \
            all(heads.get(path, -1) >= h["weight"].shape[0] for path, h in adapter.heads.items())

    def _send(self, msg) -> None:
        """Send ``msg`` (with the installs waiting to go, ahead of what it carries); the lock is held."""
        if self.dead:
            raise ModelProcessDied(self.dead)
        if self._installs:
            msg, self._installs = ("installs", self._installs, msg), []
        self.round_trips += 1
        try:
            self.conn.send_bytes(_dumps(msg))
        except (EOFError, OSError) as e:
            self.dead = self.dead or self._death_reason(e)
            raise ModelProcessDied(self.dead) from None

    def _recv(self):
        try:
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as e:
            self.dead = self.dead or self._death_reason(e)
            raise ModelProcessDied(self.dead) from None

    def _value(self, reply):
        status, value, cpu = reply
        self.child_cpu += cpu
        if status == "error":
            raise value
        return value

    def _call(self, msg):
        with self._lock:
            self._send(msg)
            while self._in_flight:  # replies to pipelined steps sent before this call come first
                self._early.append(self._recv())
                self._in_flight -= 1
            reply = self._recv()
        return self._value(reply)

    def _death_reason(self, e: BaseException | None = None) -> str:
        code = self.proc.poll()
        if code is None:
            try:
                code = self.proc.wait(2)
            except subprocess.TimeoutExpired:
                code = None
        how = f"exit code {code}" if code is not None and code >= 0 else \
            f"signal {-code}" if code is not None else f"channel lost: {e}"
        return f"the {self.task} model process {self.proc.pid} died ({how}); its model and adapter slots are " \
               "gone: the runtime must restart"

    def _watch(self) -> None:
        self.proc.wait()
        if self.closing:
            return
        self.dead = self.dead or self._death_reason()
        log.error("%s", self.dead)
        if self.on_death is not None:
            try:
                self.on_death(self.dead)
            except Exception:
                log.exception("reporting the model process's death failed")

    def close(self) -> None:
        self.closing = True
        try:  # wakes a call blocked on the channel; the child exits at end of file
            s = socket.socket(fileno=os.dup(self.conn.fileno()))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        except OSError:
            pass
        with self._lock:
            self.conn.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("model process %d did not exit in 10 s: killed", self.proc.pid)
            self.proc.kill()
            self.proc.wait(10)


class RemoteGenerationEngine(_RemoteModel, GenerationEngine):
    """``GenerationEngine`` computed by a model process (module docstring)."""

    pipelined = True  # the model worker keeps a step in flight (send_step / collect_step)

    def __init__(self, model_dir: Path, settings, kwargs: dict):
        self._finished: list[int] = []  # rids to free before the next step
        self._next_rid = 0
        self._row_seq: dict[int, object] = {}  # rid -> mirror Sequence, for the rows in use
        self.last_logits = None
        super().__init__(model_dir, settings, kwargs)

    def _spec(self, seq) -> tuple[int, dict]:
        rid = self._next_rid
        self._next_rid += 1
        seq.rid = rid
        spec = {f.name: getattr(seq, f.name) for f in fields(seq) if f.name not in _STATE}
        spec["slot"] = seq.slot
        self._row_seq[rid] = seq
        return rid, spec

    @staticmethod
    def _apply(seq, row) -> int:
        tok, pos, lp, plp = row
        seq.generated.append(tok)
        seq.pos = pos
        if seq.row < 0:
            seq.row = 0  # in a row (which one is the child's business; finish only asks whether)
        if lp is not None:
            seq.token_logprobs.append(lp[0])
            seq.top_logprobs.append(lp[1])
        if plp is not None:
            seq.prompt_token_logprobs = plp
        return tok

    def _run(self, mode: str, new: list, running: list):
        finished, self._finished = self._finished, []
        specs = [self._spec(s) for s in new]
        try:
            rows_new, rows_run = self._call((mode, finished, specs, [s.rid for s in running]))
        except ModelProcessDied:
            raise
        except Exception:
            if mode == "step":  # the child freed the new rows (GenerationEngine.step's contract)
                for s in new:
                    self._row_seq.pop(s.rid, None)
                    s.row = -1
            else:  # prefill: the rows stay the caller's to finish; decode moved nothing
                for s in new:
                    s.row = 0
            raise
        return [self._apply(s, r) for s, r in zip(new, rows_new)], \
            [self._apply(s, r) for s, r in zip(running, rows_run)]

    # --- the pipeline (ModelWorker._pipelined_step) ----------------------------------------------------
    def send_step(self, new: list, running: list):
        """Send a step and return without its answer (``collect_step`` reads it), so that the model computes
        while the model worker hands out the last step's tokens and takes the next work. ``running`` rows
        continue from the tokens the model process holds, the one the step still in flight adds included;
        one that step ends (the model process sees it done) is skipped and freed there. Sent with it: the
        finishes since the last call and the installs waiting to go."""
        finished, self._finished = self._finished, []
        specs = [self._spec(s) for s in new]
        for s in new:
            s.row = 0  # in the model process's rows from now on: a finish must reach it
        op = "step" if new and running else "prefill" if new else "decode"
        with self._lock:
            self._send((op, finished, specs, [s.rid for s in running], True))
            self._in_flight += 1
        return new, running

    def collect_step(self, handle) -> tuple[list, list]:
        """The answer to the oldest step ``send_step`` sent: each row's token in the order given, None for a
        row that step skipped (ended by the step before) or that was finished here since. On an error the
        new rows are free again and the running ones have not moved, and every step sent after it is
        skipped (``StepSkipped``) until ``resync``."""
        new, running = handle
        with self._lock:
            if self._early:
                reply = self._early.popleft()
            else:
                reply = self._recv()
                self._in_flight -= 1
        try:
            value = self._value(reply)
            if value == "skipped":
                raise StepSkipped("a step sent after one that failed: nothing of it ran")
        except Exception:
            for s in new:
                if self._row_seq.pop(s.rid, None) is not None:
                    s.row = -1
            raise
        rows_new, rows_run = value
        return [self._live(s, r) for s, r in zip(new, rows_new)], [self._live(s, r) for s, r in zip(running, rows_run)]

    def _live(self, seq, row):
        if row is None or seq.rid not in self._row_seq:  # skipped there, or finished here meanwhile
            return None
        return self._apply(seq, row)

    def resync(self) -> None:
        """After a failed pipelined step and the skipped ones behind it: the model process takes steps again."""
        self._call(("resync",))

    def prefill(self, seqs: list) -> list[int]:
        return self._run("prefill", seqs, [])[0]

    def decode(self, seqs: list) -> list[int]:
        return self._run("decode", [], seqs)[1]

    def step(self, new: list, running: list) -> tuple[list[int], list[int]]:
        if not self.packs(new, running):  # the child's engine would run these apart too
            return (self.prefill(new) if new else []), (self.decode(running) if running else [])
        return self._run("step", new, running)

    def finish(self, seq) -> None:
        if seq.row < 0:
            return
        seq.row = -1
        rid = getattr(seq, "rid", None)
        if rid is not None and self._row_seq.pop(rid, None) is not None:
            self._finished.append(rid)


class RemoteClassificationEngine(_RemoteModel, ClassificationEngine):
    """``ClassificationEngine`` computed by a model process: a batch is one call (texts in, each row's
    label probabilities out); the event loop counts tokens on its own copy of the tokenizer, as before."""

    def __init__(self, model_dir: Path, settings, kwargs: dict):
        super().__init__(model_dir, settings, kwargs)
        from lorafleet.runtime.engines import token_encoder

        self._encoder = token_encoder(self.tokenizer)  # now, not on the first request's time

    def max_input_tokens(self) -> int:
        return self.max_input

    def classify(self, texts: list[str], slots: list[int], label_counts: list[int]) -> list[list[float]]:
        return self._call(("classify", texts, slots, label_counts))


REMOTE = {"text-generation": RemoteGenerationEngine, "sequence-classification": RemoteClassificationEngine}


def make_remote_engine(model_dir: Path, settings, task: str = "text-generation", **engine_kwargs):
    """The engine for ``task`` (``REMOTE``) with its model in a process of its own, loaded there with
    ``engine_kwargs`` (the engine's ``from_dir`` arguments, and ``threads``: torch's intra-op threads)."""
    return REMOTE[task](model_dir, settings, engine_kwargs)


# --- the model process -------------------------------------------------------------------------------------
def _row(s, new: bool):
    lp = (s.token_logprobs[-1], s.top_logprobs[-1]) if s.logprobs is not None and s.token_logprobs else None
    plp = s.prompt_token_logprobs if new and s.prompt_logprobs is not None else None
    return s.generated[-1], s.pos, lp, plp


def _hello(engine) -> dict:
    """What the runtime's side of a model process needs to know of its engine (``_RemoteModel``)."""
    out = {"quantization": engine.quantization, "weights_bytes": engine.weights_bytes,
           "unquantized_weights_bytes": engine.unquantized_weights_bytes, "device": engine.device,
           "dtype": engine.dtype, "memory": engine.memory_bytes(), "base_info": engine.patch.base_info(),
           "layout": _layout(engine)}
    if isinstance(engine, GenerationEngine):
        out.update(max_len=engine.max_len, max_seqs=engine.max_seqs, model_len=engine.model_len,
                   eos_ids=engine.eos_ids, kv_cache_bytes=engine.kv_cache_bytes, architecture=engine.plan.architecture)
    else:
        out.update(max_input=engine.max_input_tokens(), architecture=type(engine.model).__name__)
    return out


def _layout(engine) -> tuple[dict, dict]:
    """The slots as they are: each wrapped module's rank, each head's width (``_RemoteModel._writes_only``)."""
    return ({p: layer.rank for p, layer in engine.patch.layers.items()},
            {p: head.width for p, head in engine.patch.heads.items()})


def _write_all(engine, installs) -> None:
    """The installs that came with a call: copies into existing slot tensors (the runtime sent only such).
    One failing leaves a slot the runtime believes written half written: this process ends rather than
    let any request compute with it."""
    for slot, adapter in installs:
        try:
            # The runtime checked this adapter against this model's layout when it loaded it (_RemotePatch).
            engine.patch.install(slot, adapter, check=False)
        except BaseException:
            log.critical("writing an adapter into slot %d failed; the model process exits, as its slots can no "
                         "longer be trusted", slot, exc_info=True)
            os._exit(70)


def _generation_call(engine, seqs: dict, msg, pipeline: dict):
    from lorafleet.runtime.engines import Sequence

    op, finished, specs, running_ids = msg[:4]
    pipelined = len(msg) > 4 and msg[4]
    for rid in finished:
        s = seqs.pop(rid, None)  # None: a row of a step that failed or was skipped
        if s is not None:
            engine.finish(s)
    if pipelined and pipeline["skipping"]:
        return "skipped"
    new = []
    for rid, spec in specs:
        s = seqs[rid] = Sequence(**spec)
        new.append(s)
    if pipelined:  # rows the step before ended were freed then: they are skipped
        listed = [seqs.get(rid) for rid in running_ids]
        running = [s for s in listed if s is not None and s.row >= 0]
        op = "step" if new and running else "prefill" if new else "decode"
    else:
        running = listed = [seqs[rid] for rid in running_ids]
    try:
        if op == "prefill":
            engine.prefill(new)
        elif op == "decode":
            if running:
                engine.decode(running)
        else:
            engine.step(new, running)
    except BaseException:
        if op == "step" or pipelined:  # step freed the new rows (as does this, pipelined): they start again
            for (rid, _), s in zip(specs, new):
                seqs.pop(rid, None)
                engine.finish(s)
        if pipelined:  # the steps already sent behind this one are skipped until the runtime resyncs
            pipeline["skipping"] = True
        raise
    if pipelined:  # a row this step ended leaves its row now, so the next step (sent already) packs
        ran = set(map(id, running))
        out = [_row(s, True) for s in new], [_row(s, False) if s is not None and id(s) in ran else None for s in listed]
        for s in new + running:
            if engine.is_done(s):
                engine.finish(s)
        return out
    return [_row(s, True) for s in new], [_row(s, False) for s in running]


def serve(conn: Connection) -> int:
    """Load the engine the first message names, then answer calls until the runtime closes the channel."""
    import torch

    _, task, model_dir, kwargs, level = pickle.loads(conn.recv_bytes())
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[model process]: %(message)s")
    threads = kwargs.pop("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    c0 = time.thread_time()
    try:
        engine = (GenerationEngine if task == "text-generation" else ClassificationEngine).from_dir(model_dir, **kwargs)
        engine.patch.base_info()  # before any layer is wrapped: the model's own layout
        conn.send_bytes(_dumps(("ok", _hello(engine), time.thread_time() - c0)))
    except BaseException as e:
        conn.send_bytes(_dumps(("error", _portable(e), time.thread_time() - c0)))
        return 1
    seqs: dict = {}
    pipeline = {"skipping": False}  # after a pipelined step failed, until the runtime resyncs
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return 0
        c0 = time.thread_time()
        try:
            if msg[0] == "installs":
                _write_all(engine, msg[1])
                msg = msg[2]
            op = msg[0]
            if op == "install":
                engine.patch.install(msg[1], msg[2])
                reply = engine.memory_bytes(), _layout(engine)
            elif op == "classify":
                reply = engine.classify(msg[1], msg[2], msg[3])
            elif op == "resync":
                pipeline["skipping"] = False
                reply = None
            else:
                reply = _generation_call(engine, seqs, msg, pipeline)
            conn.send_bytes(_dumps(("ok", reply, time.thread_time() - c0)))
        except (BrokenPipeError, ConnectionResetError):
            return 0
        except Exception as e:
            log.debug("call %s failed", msg[0], exc_info=True)
            conn.send_bytes(_dumps(("error", _portable(e), time.thread_time() - c0)))


def main(argv: list[str]) -> int:
    # The runtime decides when this process stops (it closes the channel): a terminal's Ctrl-C or a
    # SIGTERM to the process group must not take the model away from requests still being answered.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The runtime's choice (model_nice): niced behind its own event loop, not behind its front process.
    os.nice(int(argv[1]))
    conn = Connection(int(argv[0]))
    return serve(conn)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
