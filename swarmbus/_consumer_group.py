"""Many agents on one durable consumer: the consumer group of a process.

With ``Settings.consumer_group`` set (``SWARMBUS_CONSUMER_GROUP``), every agent served
on a bus shares one durable consumer named exactly that, instead of one per agent id:
a server holds one consumer per process however many agents it serves (~54 KB of
server memory each otherwise: 553 MB at 10,000 agents).

- The consumer's ``filter_subjects`` are the union of the members' handlers' filters
  (deduplicated, bounded: ``consumer_filters``); each message goes in process to the
  handlers whose own filters match (``RouteTable``), each run as its agent
  (``ignore_own``, dead letters, spans) holding its agent's ``max_concurrency`` slots.
- Joins and leaves at run time (an agent served, ``update_handlers``) update the
  filters in place; concurrent joins are applied together (one update for many).
- The name is stable, so a restarted process resumes where it stopped (within
  ``consumer_inactive_threshold``). Processes with the same name are replicas: they
  share the work, so they must serve the same agents (the filters are the last
  updater's), as replicas of one agent id do.
- Leaving: the last member (or ``serving``'s exit, all members at once) stops the
  pull and lets every fetched message finish with all handlers in place; the filters
  stay (a restart resumes), and ``leave=True`` deletes the consumer. A member that
  leaves while others stay stops receiving at once (events meanwhile are not kept for
  it); ``leave=True`` also drops its interest from the filters. If it ran the pull
  loop (the loop lives in a member's task group, structured), the loop moves to
  another member's.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from swarmbus._bus import Bus, consume_routes
from swarmbus._consumer import DurableConsumer, Route, Routes, RouteTable

#: Messages the group's consumer handles at once (each handler also holds a slot of
#: its agent's ``max_concurrency``).
GROUP_SLOTS: Final = 64

_groups: weakref.WeakKeyDictionary[Bus, dict[str, ConsumerGroup]] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class Member:
    """An agent served in a group: its routes, slots and the task group it serves in."""

    agent_id: str
    limiter: anyio.Semaphore
    capacity: int
    task_group: anyio.abc.TaskGroup
    routes: tuple[Route, ...] = ()

    def bind(self, routes: Routes) -> tuple[Route, ...]:
        """``routes`` run as this agent, holding its slots."""
        return tuple(
            Route(r.name, r.filters, r.handler, self.agent_id, self.limiter) for r in routes.routes
        )


class Membership:
    """What a served agent holds of its group: ``set_routes`` after handlers changed."""

    def __init__(self, group: ConsumerGroup, member: Member) -> None:
        self._group = group
        self._member = member

    async def set_routes(self, routes: Routes) -> None:
        """Serve these handlers from now on (the group's filters updated in place)."""
        await self._group.update(self._member, self._member.bind(routes))


class ConsumerGroup:
    """The agents served on one bus that share the durable ``name``."""

    def __init__(self, bus: Bus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.table = RouteTable()
        self._members: dict[Member, None] = {}  # in order of joining
        self._host: Member | None = None  # whose task group runs the pull loop
        self._consumer: DurableConsumer | None = None
        self._ended = anyio.Event()  # the current loop ended
        self._lock = anyio.Lock()
        self._version = 0  # changes to the members' routes
        self._applied = 0  # the version the server's filters reflect
        self._closing = False
        self._kept = False  # a member left not for good while closing

    @classmethod
    def of(cls, bus: Bus, name: str) -> ConsumerGroup:
        """The open group ``name`` of ``bus`` (a new one if none is open)."""
        groups = _groups.setdefault(bus, {})
        group = groups.get(name)
        if group is None or group._closing:
            group = groups[name] = cls(bus, name)
        return group

    @classmethod
    def close_for(cls, bus: Bus, agent_ids: set[str]) -> None:
        """All members are about to leave together: stop pulling now.

        Every message fetched then finishes with all handlers in place; the members'
        exits wait for it. Nothing happens if the group has members not leaving.
        """
        name = bus.settings.consumer_group
        group = _groups.get(bus, {}).get(name or "")
        if group is None or not all(m.agent_id in agent_ids for m in group._members):
            return
        group._closing = True
        if group._consumer is not None:
            group._consumer.stop.set()

    async def serve(
        self,
        member: Member,
        routes: Routes,
        stop: anyio.Event,
        *,
        leave: bool,
        task_status: anyio.abc.TaskStatus[Membership] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Join, serve until ``stop``, then leave (``leave``: for good)."""
        await self.join(member, member.bind(routes))
        task_status.started(Membership(self, member))
        await stop.wait()
        await self.leave(member, for_good=leave)

    async def join(self, member: Member, routes: tuple[Route, ...]) -> None:
        """Add ``member`` with ``routes``; returns once the server's filters cover them."""
        self._members[member] = None
        member.routes = routes
        self.table.add(routes)
        self._version += 1
        try:
            await self._sync()
        except BaseException:
            self._members.pop(member, None)
            self.table.remove(routes)
            raise

    async def update(self, member: Member, routes: tuple[Route, ...]) -> None:
        """Replace ``member``'s routes (a session joined or left)."""
        self.table.remove(member.routes)
        member.routes = routes
        self.table.add(routes)
        self._version += 1
        await self._sync()

    async def _sync(self) -> None:
        """Bring the server's filters up to the routes: one update for concurrent changes."""
        target = self._version
        async with self._lock:
            if self._applied >= target:
                return  # an update made meanwhile covered this change
            version = self._version
            if self._consumer is None:
                await self._start_loop()
            else:
                await self._consumer.set_routes(self.table)
            self._applied = version

    async def _start_loop(self) -> None:
        """Run the pull loop in the first member's task group (creates or updates the durable)."""
        host = next(iter(self._members))
        self._ended = ended = anyio.Event()
        self._consumer = await host.task_group.start(self._loop, ended)
        self._host = host

    async def _loop(
        self,
        ended: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[DurableConsumer] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await consume_routes(
                self.bus,
                self.name,
                self.table,
                receiver=self.name,
                limiter=anyio.Semaphore(GROUP_SLOTS, fast_acquire=True),
                stop=anyio.Event(),
                task_status=task_status,
            )
        finally:
            ended.set()

    async def leave(self, member: Member, *, for_good: bool) -> None:
        """Remove ``member``, after its in-flight handlers (or the whole loop) finished."""
        with anyio.CancelScope(shield=True):
            # Shielded: the members, the table and the loop's host change together.
            async with self._lock:
                ended = await self._remove(member, for_good)
        if ended is not None:
            await ended.wait()  # the loop drained, every handler in place
            self.table.remove(member.routes)
            return
        # Its routes are gone: wait for the handlers it was running.
        for _ in range(member.capacity):
            await member.limiter.acquire()
        for _ in range(member.capacity):
            member.limiter.release()

    async def _remove(self, member: Member, for_good: bool) -> anyio.Event | None:
        """Take ``member`` out; the loop's end to wait for if it was the last one."""
        del self._members[member]
        consumer = self._consumer
        if consumer is None:  # never started (its start failed): nothing runs
            self.table.remove(member.routes)
            return None
        if not self._members or self._closing:
            self._kept = self._kept or not for_good
            consumer.stop.set()
            if not self._members:  # a member joining later starts a new loop
                consumer.delete_at_end = for_good and not self._kept
                self._consumer = self._host = None
                self._applied, self._kept = 0, False
            return self._ended
        self.table.remove(member.routes)
        if self._host is member:  # the loop moves to another member's task group
            version = self._version
            await self._start_loop()  # with the filters of the members left
            self._applied = version
            consumer.stop.set()  # the old loop drains in the leaving member's
        elif for_good:  # its interest goes for good
            self._version += 1
            version = self._version
            await consumer.set_routes(self.table)
            self._applied = version
        return None
