"""One job per output prefix: the lease a running `run` holds on it, renewed by a heartbeat that `status` reads.

Under `{output.uri}/_LEASE/`, one generation N per run that held the prefix (older ones pruned by the next holder):

    {N:08d}.lease     created create-only (S3 `If-None-Match: *`, a local hard link): run id, host, pid, nonce, ttl
    {N:08d}.beat      rewritten by the holder of N alone, every ttl / 6 s: its progress, for `status`
    {N:08d}.released  created by the holder as it ends: the prefix is free

Who holds the prefix is whoever created the newest `.lease`; a contender takes a stale one over by creating the next
generation, so of two contenders exactly one create succeeds. Staleness is read off the store's clock alone: the
contender writes a probe object and compares its modification time with the heartbeat's, so no two hosts' clocks
are ever compared. The holder counts its lease as lapsed once no renewal has landed within the ttl (less a margin)
by its own monotonic clock, or once it sees a newer generation; it then stops committing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from kandinsky_batch.errors import LeaseHeld, LeaseLost
from kandinsky_batch.output.layout import LEASE_DIR
from kandinsky_batch.output.storage import Storage

RENEWALS_PER_TTL = 6
"""Renewals a holder attempts within one ttl: five can fail (or be slow) before it lapses."""
_NAME = re.compile(r"(\d{8})\.(lease|beat|released)")
# The nonces of the leases this process holds: one of ours that is not here belongs to a job that ended.
_HELD: set[str] = set()


def _machine() -> str | None:
    """This boot of this machine and this pid namespace: where a pid names the same process (Linux), else None."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def gone(holder: dict) -> bool:
    """Whether the holder's driver has certainly ended: it ran where our pids are its pids, and its pid is not a
    live process (or is ours, without the lease). A pid reused since reads as alive: then the ttl decides."""
    machine = _machine()
    pid = holder.get("pid")
    if machine is None or holder.get("machine") != machine or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return holder.get("nonce") not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def margin_seconds(ttl: float) -> float:
    """How much sooner than a contender the holder counts its lease as lapsed: S3's `LastModified` has whole
    seconds, so an age read off two of them can be up to 1 s long; 5 % more for the two hosts' clock rates."""
    return 1.0 + 0.05 * ttl


def _key(generation: int, kind: str) -> str:
    return f"{LEASE_DIR}/{generation:08d}.{kind}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _generations(storage: Storage) -> dict[int, set[str]]:
    """The lease objects under `_LEASE/`: generation -> the kinds it has."""
    found: dict[int, set[str]] = {}
    for key in storage.list(LEASE_DIR):
        match = _NAME.fullmatch(key.rsplit("/", 1)[-1])
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return found


@dataclass
class State:
    """What an output prefix's newest lease generation says (read only: `status`, contenders)."""

    generation: int | None = None
    holder: dict | None = None
    """The `.lease` record: run_id, host, pid, machine, nonce, generation, ttl_seconds, started_at."""
    beat: dict | None = None
    """The holder's last heartbeat: its record plus updated_at (its own clock), rows_total, rows_settled."""
    released: bool = False
    beat_modified: datetime | None = None
    """When the store last wrote the heartbeat (or the lease, before the first beat), by the store's clock."""

    @property
    def live(self) -> bool:
        """A lease not released: held by a running job, or left by one that died."""
        return self.generation is not None and not self.released

    @property
    def ttl(self) -> float:
        return float((self.holder or {}).get("ttl_seconds", 0.0))

    def names(self) -> str:
        """`run R (host H, pid P)` of the holder."""
        h = self.holder or {}
        return f"run {h.get('run_id', '?')} (host {h.get('host', '?')}, pid {h.get('pid', '?')})"


def read(storage: Storage) -> State:
    """The newest lease generation under the prefix, its heartbeat and whether it was released."""
    found = _generations(storage)
    if not found:
        return State()
    generation = max(found)
    kinds = found[generation]

    def load(kind: str) -> dict | None:
        try:
            return json.loads(storage.get_bytes(_key(generation, kind)))
        except (FileNotFoundError, ValueError):  # pruned meanwhile, or a record cut short by a dead writer
            return None

    stamps = [storage.modified(_key(generation, kind)) for kind in ("lease", "beat") if kind in kinds]
    stamps = [s for s in stamps if s is not None]
    return State(generation, load("lease"), load("beat") if "beat" in kinds else None, "released" in kinds,
                 max(stamps) if stamps else None)


def store_now(storage: Storage, nonce: str) -> datetime:
    """The store's clock now: the modification time of a probe object written for the purpose (then removed)."""
    key = f"{LEASE_DIR}/probe-{nonce}"
    storage.put_bytes(key, b"")
    try:
        stamp = storage.modified(key)
    finally:
        storage.delete(key)
    assert stamp is not None, f"the probe {key!r} vanished as it was written"
    return stamp


@dataclass
class Takeover:
    """A lease taken over: whose, its heartbeat's age by the store's clock, and why it was free."""

    state: State
    age: float
    why: str


def judge(storage: Storage, state: State, ttl: float, now: Callable[[Storage, str], datetime] = store_now,
          nonce: str | None = None) -> Takeover | None:
    """None if the prefix is free (no lease, or released); a `Takeover` if its lease is stale (its heartbeat, by
    the store's clock `now`, older than the holder's ttl and ours) or its driver is gone (`gone`); else `LeaseHeld`
    naming the holder. Writes nothing but `now`'s probe (under a `_LEASE/` that exists already)."""
    if not state.live:
        return None
    age = ((now(storage, nonce or uuid.uuid4().hex) - state.beat_modified).total_seconds()
           if state.beat_modified is not None else float("inf"))
    limit = max(ttl, state.ttl)
    if gone(state.holder or {}):
        return Takeover(state, age, f"its driver (pid {state.holder['pid']}) is gone")
    if age > limit:
        return Takeover(state, age, f"its heartbeat was {age:.0f} s old (ttl {limit:g} s)")
    raise _held_error(storage, state, age)


def _held_error(storage: Storage, state: State, age: float) -> LeaseHeld:
    return LeaseHeld(
        f"output.uri={storage.uri!r} is being written by {state.names()}: its heartbeat is {max(age, 0):.0f} s old "
        f"(lease generation {state.generation}, ttl {state.ttl:g} s); one job per output prefix: wait for it to end "
        "or stop it (a job that died is taken over once its heartbeat is older than the ttl; --force never takes "
        "a live lease)")


class Lease:
    """This run's hold on its output prefix: `acquire` it, `start` the renewals, ask `held()` before each commit,
    `release` it at the end."""

    def __init__(self, storage: Storage, record: dict, ttl: float, valid_until: float,
                 clock: Callable[[], float] = time.monotonic):
        self.storage, self.record, self.ttl, self.clock = storage, record, ttl, clock
        self.generation: int = record["generation"]
        self.interval = ttl / RENEWALS_PER_TTL
        self.took_over: Takeover | None = None
        """The lease this one replaced, if it was stale or its driver gone."""
        self.progress = {"rows_total": None, "rows_settled": 0}
        self._valid_until = valid_until
        self._lost: str | None = None
        self._failure = ""
        self._released = False
        self._overtaken = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, storage: Storage, run_id: str, ttl: float, clock: Callable[[], float] = time.monotonic,
                now: Callable[[Storage, str], datetime] = store_now) -> "Lease":
        """Take the prefix: free, released, stale or its driver gone (see `judge`). `LeaseHeld` naming the holder
        if it is alive, or naming the winner if another contender created the same generation first."""
        nonce = uuid.uuid4().hex
        for _ in range(3):  # a lost create race is read again, to name the winner
            state = read(storage)
            stale = judge(storage, state, ttl, now, nonce)
            generation = 0 if state.generation is None else state.generation + 1
            record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
                      "nonce": nonce, "generation": generation, "ttl_seconds": ttl, "started_at": _now_iso()}
            sent = clock()
            key = _key(generation, "lease")
            if storage.put_bytes_if_absent(key, _json(record)) or cls._ours(storage, key, nonce):
                _HELD.add(nonce)
                lease = cls(storage, record, ttl, sent + ttl - margin_seconds(ttl), clock)
                lease.took_over = stale
                lease.renew()  # the first heartbeat, and a check that no newer generation beat us to it
                if not lease.held():
                    _HELD.discard(nonce)
                    lease.check()
                lease._prune()
                return lease
        raise _held_error(storage, state, 0.0)

    def follows(self, state: State) -> bool:
        """Whether this lease directly follows `state` read earlier, released or empty: no other job held the
        prefix in between, so what was read of the output since then is still what it holds."""
        expected = 0 if state.generation is None else state.generation + 1
        return not state.live and self.generation == expected

    @staticmethod
    def _ours(storage: Storage, key: str, nonce: str) -> bool:
        """Whether the existing `key` is our own create, retried after its answer was lost."""
        try:
            return json.loads(storage.get_bytes(key)).get("nonce") == nonce
        except (FileNotFoundError, ValueError):
            return False

    def _prune(self) -> None:
        """Remove the objects of older generations: their holders have ended, or lapsed and see ours."""
        for generation, kinds in _generations(self.storage).items():
            if generation < self.generation:
                for kind in kinds:
                    self.storage.delete(_key(generation, kind))

    def start(self) -> "Lease":
        """Renew from a thread of its own: the driver's main thread may block (Ray starting, a model loading)."""
        self._thread = threading.Thread(target=self._renewing, name="output-lease", daemon=True)
        self._thread.start()
        return self

    def _renewing(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew()
            if self._lost is not None:
                return

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = why

    def held(self) -> bool:
        """Whether this run may still commit: no newer generation seen and a renewal landed within the ttl."""
        with self._lock:
            if self._lost is None and self.clock() >= self._valid_until:
                self._lost = f"no renewal landed within its ttl of {self.ttl:g} s{self._failure}"
            return self._lost is None

    def check(self) -> None:
        """Raise `LeaseLost` (naming why) unless `held()`."""
        if not self.held():
            raise LeaseLost(f"lost the lease on output.uri={self.storage.uri!r} (generation {self.generation}): "
                            f"{self._lost}; it stopped committing")

    def renew(self) -> None:
        """Write the heartbeat, then look for a newer generation. A renewal counts only if it completes before the
        lease lapses: one that lands later may have come after a contender judged the lease stale."""
        if not self.held():
            return
        sent = self.clock()
        beat = {**self.record, **self.progress, "updated_at": _now_iso()}
        try:
            self.storage.put_bytes(_key(self.generation, "beat"), _json(beat))
            newer = [g for g in _generations(self.storage) if g > self.generation]
        except Exception as exc:  # noqa: BLE001 - the store past its retry budget: tried again until the ttl runs out
            self._failure = f" (the last try: {type(exc).__name__}: {exc})"
            return
        if newer:
            self._overtaken = True
            taker = read(self.storage)
            self._lose(f"{taker.names()} took it over (generation {taker.generation})")
            return
        with self._lock:
            if self._lost is None and self.clock() >= self._valid_until:
                self._lost = f"its renewal landed too late (no renewal within its ttl of {self.ttl:g} s)"
            elif self._lost is None:
                self._valid_until = sent + self.ttl - margin_seconds(self.ttl)
                self._failure = ""

    def stop_renewing(self, wait: float = 1.0) -> None:
        """Stop the renewal thread; a renewal in flight (a store retrying) is waited for `wait` s at most: one that
        lands later changes nothing, the lease being lost or released by then."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def release(self) -> bool:
        """The job ended: mark the prefix free (one create-only write). Skipped once a newer generation was seen.
        False if the store refused; the lease then goes stale after its ttl."""
        self.stop_renewing()
        _HELD.discard(self.record["nonce"])
        if self._released or self._overtaken:
            return False
        self._released = True
        self._lose("released")
        released = _json({"run_id": self.record["run_id"], "released_at": _now_iso()})
        try:  # one retry only: a store that is down must not hold up the exit (or `ray job stop`'s window)
            self.storage.with_budget(1, 0.2).put_bytes_if_absent(_key(self.generation, "released"), released)
        except Exception:  # noqa: BLE001 - the store is down: the job's own error says so; the lease goes stale
            return False
        return True
