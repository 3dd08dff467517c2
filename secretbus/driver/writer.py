"""The driver's writes: planned where they are asked for, committed in batches by one I/O thread.

A write (define, set value, undefine) is an `Op`. `Writes.submit` runs in the caller's thread
(a front end's event loop): under the driver's mutex it checks the op against the table and
plans it — libvirt's rules, XML formatting, encryption, the file names: CPU work, all of it —
and hands only the plan's syscalls to the I/O thread. That thread takes every plan queued at
that moment and commits them as one batch (store/commit.py: temp files, their data synced
together, renames and unlinks, one directory fsync), then, under the mutex, applies each op to
the table, announces it (log line, events) and resolves its future. A lone write costs one
hand-off to the I/O thread and one back (as the worker thread it replaces did), and never
waits for a batch to fill: the I/O thread commits whatever is queued when it wakes.

Order: an op holds keys — its secret's UUID and the usages it claims or releases — from
planning until it is announced. An op whose keys are held, or that shares a key with an op
waiting before it, waits, and is planned only once they are released: against the table the
earlier op left. So the writes to one secret are planned, committed, applied and announced in
the order they were submitted (per-secret FIFO), and the ops of one batch are independent.

A store without write plans (`store.group_commit` False: the fleet store, whose writes are etcd
transactions) is written op by op in the I/O thread, under the mutex, as before; if it
`batches_writes`, the ops the I/O thread took together are planned as recorded calls and
handed to it at once (`store.write_many`: the fleet store sends them in one transaction).

The caller never waits long for the mutex: if it is held for more than 2 ms (a reload, an etcd
write of the fleet store), the op is handed to the I/O thread unstarted, and started there in
its arrival order.
"""
from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from secretbus.core import errors, loophop
from secretbus.core.model import SecretDef
from secretbus.store.calls import StoreCall, write_definition
from secretbus.store.commit import (
    EMPTY_IDLE,
    SPARE_IDLE,
    Batch,
    Plan,
    drop_idle_spares,
    empty_idle_spares,
    finish_batches,
    prepare_batch,
)
from secretbus.store.filestore import SecretStore

# Seconds between two chunks of an idle sweep of spare files (a chunk: ~6 ms, 64 truncates).
SWEEP_PAUSE = 0.02
log = logging.getLogger("secretbus.driver")

T = TypeVar("T")
U = TypeVar("U")
Key = tuple[str, object]   # ("uuid", uuid) or ("usage", UsageKey)


class Files:
    """What a planner asks of the store. PlanFiles describes the changes (group commit);
    DirectFiles makes them at once, one by one (a store without plans)."""

    def value(self, d: SecretDef, data: bytes) -> None:
        raise NotImplementedError

    def definition(self, d: SecretDef, *, undo_values: bool = False) -> None:
        """`undo_values`: if this fails, remove the value files written before it."""
        raise NotImplementedError

    def delete_values(self, uuid: str) -> None:
        raise NotImplementedError

    def delete_definition(self, uuid: str) -> None:
        raise NotImplementedError


class PlanFiles(Files):
    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self.plan = Plan()

    def value(self, d: SecretDef, data: bytes) -> None:
        self.plan.add(self.store.plan_value(d, data))

    def definition(self, d: SecretDef, *, undo_values: bool = False) -> None:
        self.plan.add(self.store.plan_definition(d))
        if undo_values:
            self.plan.undo = self.store.plan_delete_values(d.uuid)

    def delete_values(self, uuid: str) -> None:
        self.plan.add(self.store.plan_delete_values(uuid))

    def delete_definition(self, uuid: str) -> None:
        self.plan.add(self.store.plan_delete_definition(uuid))


class DirectFiles(Files):
    def __init__(self, store: SecretStore) -> None:
        self.store = store

    def value(self, d: SecretDef, data: bytes) -> None:
        self.store.write_value(d, data)

    def definition(self, d: SecretDef, *, undo_values: bool = False) -> None:
        write_definition(self.store, d, undo_values=undo_values)

    def delete_values(self, uuid: str) -> None:
        self.store.delete_values(uuid)

    def delete_definition(self, uuid: str) -> None:
        self.store.delete_definition(uuid)


class RecordFiles(Files):
    """Records the calls (a store that commits a batch's writes together: store.write_many)."""

    def __init__(self) -> None:
        self.calls: list[StoreCall] = []

    def value(self, d: SecretDef, data: bytes) -> None:
        self.calls.append(StoreCall("write_value", (d, data)))

    def definition(self, d: SecretDef, *, undo_values: bool = False) -> None:
        self.calls.append(StoreCall("write_definition", (d,), undo_values))

    def delete_values(self, uuid: str) -> None:
        self.calls.append(StoreCall("delete_values", (uuid,)))

    def delete_definition(self, uuid: str) -> None:
        self.calls.append(StoreCall("delete_definition", (uuid,)))


@dataclass
class Planned:
    """A checked op: its file changes, and what to do once they are durable."""

    apply: Callable[[], Any]             # under the mutex: change the table; returns the op's result
    announce: Callable[[], None]         # after apply, mutex released: log line and events
    plan: Plan = field(default_factory=Plan)


@dataclass
class Op:
    """One write. `keys` and `plan` run under the driver's mutex; `static` are the keys known
    before looking at the table (its UUID; a define's new usage)."""

    static: frozenset[Key]
    keys: Callable[[], set[Key]]
    plan: Callable[[Files], Planned]
    future: Future[Any] = field(default_factory=Future)
    ctx: contextvars.Context = field(default_factory=contextvars.copy_context)
    held: set[Key] = field(default_factory=set)
    seq: int = 0                         # arrival order (set by submit)
    planned: Planned | None = None
    direct: bool = False                 # no plans: planned and written in the I/O thread
    result: Any = None
    error: BaseException | None = None


@dataclass
class WriterStats:
    """Counters for tests and benchmarks (updated by the I/O thread, under the mutex)."""

    batches: int = 0
    plans: int = 0
    dir_syncs: int = 0
    largest: int = 0


class Writes:
    def __init__(self, mutex: threading.RLock, store: Callable[[], SecretStore]) -> None:
        self._mutex = mutex
        self._store = store
        self._idle = threading.Condition(mutex)      # notified whenever keys are released
        self._busy: set[Key] = set()                 # keys held by ops planned, not yet finished
        self._waiting: list[Op] = []                 # ops that wait for keys, in arrival order
        self._draining = 0                           # threads in exclusive(): nothing starts
        self._closed = False
        self._queue: list[Op] = []                   # planned, for the I/O thread
        # Submitted while the mutex was held elsewhere (a reload, an etcd write of the fleet
        # store): the I/O thread starts them, so that the caller, an event loop, never waits.
        self._unstarted: list[Op] = []
        self._seq = itertools.count()
        qlock = threading.Lock()                      # the stages' queues; two conditions on it:
        self._qcond = threading.Condition(qlock)      # stage 1 waits on this one,
        self._thread: threading.Thread | None = None      # stage 1 (see _loop)
        self._stage2: list[_Staged] = []                   # prepared batches for stage 2
        self._qcond2 = threading.Condition(qlock)     # stage 2 on this one
        self._stage2_busy = False
        self._stopping2 = False
        self._thread2: threading.Thread | None = None
        self.stats = WriterStats()
        self._announcing = threading.local()          # .active: this thread runs announcements
        # Tests only: the I/O thread calls it before it takes a batch (to let a batch queue up).
        self.gate: Callable[[], None] | None = None

    # -- the callers' side ---------------------------------------------------------------
    def submit(self, op: Op) -> Future[Any]:
        """Plan `op` now if its keys are free, else queue it behind the ops holding them."""
        op.future.set_running_or_notify_cancel()     # once submitted, a write cannot be cancelled
        op.seq = next(self._seq)
        if self._closed:
            raise errors.OperationFailed("the secret store is shutting down")
        # A short wait covers the I/O thread's own short holds; a long hold goes round it.
        if not self._mutex.acquire(timeout=0.002):
            with self._qcond:
                self._unstarted.append(op)
                self._wake_stage1()
            return op.future
        done: list[Op] = []
        try:
            with self._qcond:
                before = self._waiting + self._unstarted
            if self._draining or _blocked(op, before) or not self._start(op, done):
                self._waiting.append(op)
        finally:
            self._mutex.release()
        self._finish(done)
        return op.future

    def run(self, op: Op) -> Any:
        """submit and wait (the synchronous API). From an event callback of a write (embedded,
        a handler runs in the thread that finishes the write, maybe the I/O thread): written at
        once in this thread, see _run_nested."""
        if getattr(self._announcing, "active", False):
            return self._run_nested(op)
        return self.submit(op).result()

    def _run_nested(self, op: Op) -> Any:
        """A write from an event callback, as the driver did before group commit: planned,
        written (each file synced, then its directory: the store's direct path), applied and
        announced here and now, its events nested in the callback's. Waiting for the I/O thread
        instead could wait for this very thread. The keys the finishing ops of this thread
        hold are no obstacle (those writes are applied already; only their events are going
        out); a key held by another write still in flight is, and is refused rather than
        waited for, which could deadlock the same way."""
        mine: set[Key] = getattr(self._announcing, "keys", set())
        with self._mutex:
            if self._closed:
                raise errors.OperationFailed("the secret store is shutting down")
            if not (op.keys() & self._busy) <= mine:
                raise errors.InternalError("a write from an event callback to a secret that another "
                                           "write in flight also changes is not possible")
            self._direct(op)
        if op.error is not None:
            raise op.error
        assert op.planned is not None
        op.ctx.run(op.planned.announce)
        return op.result

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The mutex, with no write in flight (a reload or bulk rewrite replaces the table or
        writes files itself). New writes wait meanwhile, so a stream of them cannot starve it."""
        done: list[Op] = []
        try:
            with self._mutex:
                self._draining += 1
                try:
                    while self._busy:
                        self._idle.wait()
                    yield
                finally:
                    self._draining -= 1
                    self._start_waiting(done)
        finally:
            self._finish(done)

    def close(self) -> None:
        """Refuse new writes, let those submitted finish, stop the I/O thread."""
        with self._mutex:
            self._closed = True
            while self._busy or self._waiting or self._unstarted:
                self._idle.wait()
        with self._qcond:
            thread, self._thread = self._thread, None
            self._qcond.notify()
        if thread is not None:
            thread.join()

    # -- keys and planning (mutex held) --------------------------------------------------
    def _start(self, op: Op, done: list[Op]) -> bool:
        """Plan `op` if its keys are free (False if not: it waits). A plan with nothing to
        write is applied at once; a failed check fails the op at once."""
        if not op.static.isdisjoint(self._busy):
            return False
        keys = op.keys()
        if not keys.isdisjoint(self._busy):
            return False
        op.held = keys
        self._busy |= keys
        store = self._store()
        if not store.group_commit:
            op.direct = True
            self._put(op)
            return True
        try:
            files = PlanFiles(store)
            op.planned = op.plan(files)
            op.planned.plan = files.plan
            if not files.plan:
                op.result = op.planned.apply()
                done.append(op)
                return True
        except Exception as e:  # noqa: BLE001 - the op's error, for its caller
            op.error = e
            done.append(op)
            return True
        self._put(op)
        return True

    def _start_waiting(self, done: list[Op]) -> None:
        with self._qcond:
            unstarted, self._unstarted = self._unstarted, []
        if unstarted:
            # in arrival order among those already waiting (each waited for the ones before it)
            self._waiting = sorted(self._waiting + unstarted, key=lambda o: o.seq)
        if self._draining or not self._waiting:
            return
        still: list[Op] = []
        for op in self._waiting:
            if _blocked(op, still) or not self._start(op, done):
                still.append(op)
        self._waiting = still

    # -- finishing (mutex not held) ------------------------------------------------------
    def _finish(self, ops: list[Op]) -> None:
        """Announce and answer finished ops in order, then release their keys (only then may
        a later op on the same secret be applied and announced), and start those waiting.
        A front end's event loop is woken once for the lot (core/loophop.py)."""
        with loophop.held():
            self._finish_all(ops)

    def _finish_all(self, ops: list[Op]) -> None:
        while ops:
            for op in ops:
                if op.future.done():
                    continue        # finished already (a stage failed after finishing it)
                if op.error is None and op.planned is not None:
                    self._announcing.active = True
                    self._announcing.keys = set().union(*(o.held for o in ops))
                    try:
                        op.ctx.run(op.planned.announce)
                    except Exception:
                        log.exception("announcing a write failed")
                    finally:
                        self._announcing.active = False
                        self._announcing.keys = set()
                if op.error is not None:
                    op.future.set_exception(op.error)
                else:
                    op.future.set_result(op.result)
            more: list[Op] = []
            with self._mutex:
                for op in ops:
                    self._busy -= op.held
                    op.held = set()
                self._start_waiting(more)
                self._idle.notify_all()
            ops = more

    # -- the I/O thread --------------------------------------------------------------------
    def _put(self, op: Op) -> None:
        with self._qcond:
            self._queue.append(op)
            self._wake_stage1()

    def _wake_stage1(self) -> None:
        """(_qcond held) Start stage 1 if needed, and wake it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="secretbus-writer", daemon=True)
            self._thread.start()
        self._qcond.notify()

    def _loop(self) -> None:
        """Stage 1: take what is queued, write its files and sync their data (prepare_batch);
        then finish the batch here (a lone write: one hand-off in all), or, if more writes
        queued meanwhile or stage 2 is busy, hand it to stage 2 and prepare the next one, so
        that one batch's data syncs overlap the renames and directory fsync of the one before."""
        me = threading.current_thread()
        try:
            while True:
                with self._qcond:
                    idle = 0      # 0: a write came; 1: spares emptied; 2: spares removed
                    while not self._queue and not self._unstarted and self._thread is me:
                        # Without writes the spare files are emptied after SPARE_IDLE s (an
                        # earlier content of a file is kept only while writes come) and removed
                        # after EMPTY_IDLE s (store/commit.py).
                        if idle == 2:
                            self._qcond.wait()
                        elif not self._qcond.wait(SPARE_IDLE if idle == 0 else EMPTY_IDLE - SPARE_IDLE):
                            # Without the queue's lock: a submitter (the event loop) must not
                            # wait for thousands of truncates or unlinks; a write that comes
                            # meanwhile stops the sweep (the rest goes the next idle time).
                            sweep = empty_idle_spares if idle == 0 else drop_idle_spares
                            idle += 1
                            self._qcond.release()
                            try:
                                sweep(partial(self._sweep_pause, me))
                            finally:
                                self._qcond.acquire()
                    if not self._queue and not self._unstarted:
                        return
                    unstarted = bool(self._unstarted)
                if unstarted:
                    done: list[Op] = []
                    with self._mutex:           # here, unlike in the caller, waiting is fine
                        self._start_waiting(done)
                    self._finish(done)
                    with self._qcond:
                        if not self._queue:
                            continue
                gate = self.gate
                if gate is not None:
                    gate()
                with self._qcond:
                    ops, self._queue = self._queue, []
                staged = self._guarded(ops, partial(self._prepare, ops))
                if staged is None:
                    continue
                with self._qcond:
                    handoff = bool(self._queue) or self._stage2_busy or bool(self._stage2)
                    if handoff:
                        self._stage2.append(staged)
                        if self._thread2 is None:
                            self._thread2 = threading.Thread(target=self._loop2, name="secretbus-commit",
                                                             daemon=True)
                            self._thread2.start()
                        self._qcond2.notify()
                if not handoff:
                    self._guarded(ops, partial(self._complete, [staged]))
        finally:
            with self._qcond:
                self._stopping2 = True
                self._qcond2.notify()
            t2 = self._thread2
            if t2 is not None:
                t2.join()

    def _sweep_pause(self, me: threading.Thread) -> bool:
        """Between two chunks of an idle sweep of spare files: True (stop) if a write is waiting
        or the writer is closing; else a pause first, so that the sweep (truncates and unlinks,
        thousands after a burst of undefines) takes a small share of a CPU from the readers."""
        with self._qcond:
            if not (self._queue or self._unstarted) and self._thread is me:
                self._qcond.wait(SWEEP_PAUSE)
            return bool(self._queue or self._unstarted) or self._thread is not me

    def _loop2(self) -> None:
        """Stage 2: finish every prepared batch handed over, together (one directory fsync)."""
        while True:
            with self._qcond:
                while not self._stage2 and not self._stopping2:
                    self._qcond2.wait()
                if not self._stage2:
                    return
                staged, self._stage2 = self._stage2, []
                self._stage2_busy = True
            ops = [op for st in staged for op in st.ops]
            self._guarded(ops, partial(self._complete, staged))
            with self._qcond:
                self._stage2_busy = False

    def _guarded(self, ops: list[Op], step: Callable[[], T]) -> T | None:
        """Run a stage's step; if it fails unexpectedly, fail and finish its ops (no caller may
        wait forever)."""
        try:
            return step()
        except BaseException as e:  # noqa: BLE001
            log.error("a batch of %d writes failed: %s", len(ops), type(e).__name__)
            for op in ops:
                if op.error is None:
                    op.error = e if isinstance(e, errors.SecretError) else errors.SystemError("the write failed")
            self._finish(ops)
            return None

    def _prepare(self, ops: list[Op]) -> _Staged:
        planned = [op for op in ops if not op.direct]
        batch = prepare_batch([op.planned.plan for op in planned if op.planned is not None]) if planned else None
        return _Staged(ops, planned, batch)

    def _complete(self, staged: list[_Staged]) -> None:
        """Renames, unlinks and directory fsyncs of prepared batches; then each op applied to
        the table (only now durable) and finished."""
        batches = [st.batch for st in staged if st.batch is not None]
        syncs = finish_batches(batches) if batches else 0
        with self._mutex:
            for st in staged:
                if st.batch is not None:
                    _apply(st.planned, st.batch.errors)
            n = sum(len(st.planned) for st in staged)
            stats = self.stats
            stats.batches += len(batches)
            stats.plans += n
            stats.dir_syncs += syncs
            stats.largest = max(stats.largest, *(len(st.planned) for st in staged))
        self._direct_all([op for st in staged for op in st.ops if op.direct])
        self._finish([op for st in staged for op in st.ops])

    def _direct_all(self, ops: list[Op]) -> None:
        """The ops of a store without plans: one by one, or, for a store that commits a batch's
        writes together (the fleet store: one etcd transaction), all planned first, then
        written in one `store.write_many`, then applied. (Their keys are disjoint: planning
        one does not depend on applying another.)"""
        store = self._store()
        if len(ops) < 2 or not store.batches_writes:
            for op in ops:
                self._direct(op)
            return
        with self._mutex:
            recorded: list[tuple[Op, RecordFiles]] = []
            for op in ops:
                files = RecordFiles()
                try:
                    op.planned = op.ctx.run(op.plan, files)
                except Exception as e:  # noqa: BLE001 - the op's error, for its caller
                    op.error = e
                    continue
                recorded.append((op, files))
            _apply([op for op, _ in recorded], store.write_many([files.calls for _, files in recorded]))

    def _direct(self, op: Op) -> None:
        """A store without plans: plan, write and apply under the mutex, as one call did before."""
        with self._mutex:
            try:
                op.planned = op.ctx.run(op.plan, DirectFiles(self._store()))
                op.result = op.planned.apply()
            except Exception as e:  # noqa: BLE001 - the op's error, for its caller
                op.error = e


@dataclass
class _Staged:
    """A batch between the stages: its ops, those with plans, and their prepared files."""

    ops: list[Op]
    planned: list[Op]
    batch: Batch | None


def _apply(ops: list[Op], outcomes: Sequence[BaseException | None]) -> None:
    """(mutex held) Each op whose write is durable applied to the table; the others fail."""
    for op, err in zip(ops, outcomes, strict=True):
        if err is not None:
            op.error = err
            continue
        try:
            assert op.planned is not None
            op.result = op.planned.apply()
        except Exception as e:  # noqa: BLE001 - the op's error, for its caller
            op.error = e


def _blocked(op: Op, before: list[Op]) -> bool:
    """Whether an op waiting before `op` shares a key with it (it must go first)."""
    return any(not op.static.isdisjoint(w.static) for w in before)


async def until_unchanged(first: Awaitable[T], again: Callable[[], Awaitable[T]]) -> T:
    """For a front end: a checked write's outcome. `first` is its act; while the driver refuses
    it because its secret was redefined during the checks (errors.ChangedMeanwhile), `again()`
    looks the secret up, checks the write on it as it is now and acts, up to
    ChangedMeanwhile.retries times; the last refusal stands."""
    attempt = first
    for _ in range(errors.ChangedMeanwhile.retries):
        try:
            return await attempt
        except errors.ChangedMeanwhile:
            attempt = again()
    return await attempt


async def outcome(fut: Future[T], then: Callable[[T], U]) -> U:
    """For a front end on an event loop: await a submitted write, then map its result (its
    outcome handed to the loop with the others of its batch, core/loophop.py)."""
    return then(await loophop.wrap(fut))
