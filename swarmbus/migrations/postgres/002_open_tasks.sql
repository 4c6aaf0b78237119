-- The open rows of agent_tasks, by session and type: a task queue's claimers read a
-- session's unfinished tasks through it (swarmbus/_tasks/store_reads.py), so their
-- reads do not grow with the session's finished tasks.
CREATE INDEX IF NOT EXISTS agent_tasks_open ON agent_tasks (session_id, task_type)
  WHERE status IN ('pending', 'assigned', 'running');
