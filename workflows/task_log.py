"""TaskLog: a task's event log, what ``GET /v1/tasks/{id}/events`` streams.

TaskWorkflow's record of its own story, read with its ``events`` query: each stage it enters
(answering with the routing decision that chose its experts), each contribution as an expert's
ask ends, then its result or the error that ended it. It lives in the workflow's memory (a
deterministic function of its history, so a replay rebuilds it) and in no history event of its
own. Event ids are positions, 1, 2, 3, …: a follower resumes after the last id it has. The log
stays small: a stage is announced once (waiting for experts goes back and forth to planning),
each ask once (a task asks a bounded number of experts and standbys), then one last event.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from xpando.contracts import (
        Contribution,
        RoutingReport,
        TaskError,
        TaskEvent,
        TaskEvents,
        TaskEventType,
        TaskResult,
        TaskStage,
    )


class TaskLog:
    def __init__(self) -> None:
        self._events: list[TaskEvent] = []
        self._announced: list[TaskStage] = []

    def stage(self, stage: TaskStage, routing: RoutingReport | None = None) -> None:
        """``routing``: the decision that chose the experts (with the answering stage)."""
        if stage not in self._announced:
            self._announced.append(stage)
            self._add(TaskEventType.STAGE, stage=stage, routing=routing)

    def contribution(self, contribution: Contribution) -> None:
        self._add(TaskEventType.CONTRIBUTION, contribution=contribution)

    def result(self, result: TaskResult) -> None:
        self._add(TaskEventType.RESULT, result=result)

    def error(self, error: TaskError) -> None:
        self._add(TaskEventType.ERROR, error=error)

    def since(self, after: int) -> TaskEvents:
        """The events after event ``after``."""
        return TaskEvents(events=self._events[after:], ended=self.ended)

    @property
    def ended(self) -> bool:
        """The last event is in: a result or an error."""
        return bool(self._events) and self._events[-1].type in (
            TaskEventType.RESULT,
            TaskEventType.ERROR,
        )

    def _add(self, type: TaskEventType, **fields: Any) -> None:
        self._events.append(
            TaskEvent(id=len(self._events) + 1, type=type, at=workflow.now(), **fields)
        )


def task_error(err: BaseException) -> TaskError:
    """What failed a task: the first ApplicationError in the chain (a step's own error, e.g.
    AllExpertsFailed), else the error itself."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return TaskError(type=cause.type or "ApplicationError", message=cause.message)
        cause = cause.__cause__
    return TaskError(type=type(err).__name__, message=str(err))
