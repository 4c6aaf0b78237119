"""The task queue: distribute a session's work across agents, exactly-once completion.

Two JetStream pieces (see docs/use/tasks.md):

* **Dispatch**: a work-queue stream ``SWARMBUS_TASKS``, one queue per session, task
  type and priority (``swarmbus.task.<session>.<type>.<priority>``, a task's message on
  ``<queue>.<task id>``) and one durable pull consumer per queue, shared by every
  claimer. A claimer drains the highest non-empty priority first; within a priority
  the stream is FIFO. Until its first claim the dispatch message *is* the task; it
  carries the task and the revision a claim compares against (0: no record yet), and
  is acked once the task is final.
* **State**: the KV bucket ``swarmbus-tasks`` holds one record per claimed (or
  approval-gated) task under ``<session>.<task id>``, created by the first claim
  (create-once), and each task's creation copy under ``=created.<session>.<task id>``,
  written with its dispatch (the sweep re-offers a task whose dispatch was removed
  before any claim from it: ``queue.offer_lost``). Every transition is a
  compare-and-set on the record's revision, and
  each claim increments ``attempts``, which is the claim's fencing token: the CAS on
  the record, not the JetStream ack, is the commit point, so a redelivered dispatch
  message can never make a task complete twice.

Lifecycle events are notifications published after the record changed, without
waiting for their acks. Writes are pipelined in batches (``AckPublisher``) for throughput;
each keeps its own compare-and-set outcome.

With ``SWARM_BACKEND=redis|postgres`` there is no dispatch stream: ``TaskQueue(...)``
is then a ``StoreTaskQueue`` whose records on the ``StateStore`` are the whole queue
(claims by listing and compare-and-set; see ``store_claims``), with the same API and
guarantees and the same lifecycle events on NATS.

What goes where: ``model`` (Task, TaskSpec, Claim, the wire structs, pure helpers),
``queue`` (TaskQueue: creation, reads, listing, prune, approval), ``claims`` (claiming,
transitions and fencing, the batched CAS writes), ``worker`` (the ``work()`` loop),
``store_queue`` / ``store_claims`` (the same on Redis or PostgreSQL).
NATS itself is spoken in ``swarmbus._jetstream.workqueue`` and the rest of that layer.
"""

from swarmbus._jetstream.headers import (
    EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_HEADER,  # noqa: F401 - tests use it
)
from swarmbus._tasks.model import MAX_PRIORITY as MAX_PRIORITY
from swarmbus._tasks.model import MIN_PRIORITY as MIN_PRIORITY
from swarmbus._tasks.model import STATUSES as STATUSES
from swarmbus._tasks.model import TASKS_BUCKET as TASKS_BUCKET
from swarmbus._tasks.model import TASKS_STREAM as TASKS_STREAM
from swarmbus._tasks.model import TERMINAL as TERMINAL
from swarmbus._tasks.model import Claim, Task, TaskSpec
from swarmbus._tasks.model import Handler as Handler
from swarmbus._tasks.model import TaskConstraints as TaskConstraints
from swarmbus._tasks.model import TaskParameters as TaskParameters
from swarmbus._tasks.model import claimed as _claimed  # noqa: F401 - tests use it
from swarmbus._tasks.queue import TaskQueue
from swarmbus._tasks.store_queue import StoreTaskQueue

TaskQueue.on_store = StoreTaskQueue

__all__ = ["Claim", "Task", "TaskQueue", "TaskSpec"]
