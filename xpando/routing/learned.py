"""Routing's learned fit: what each node answered well and badly, per topic region, in NumPy
arrays rebuilt from the database (``xpando/db/topics.py``). The formula that uses it is at the top
of :mod:`xpando.routing.index`.

Topic regions are prompt vectors of past tasks (a task whose prompt is at least ``topic_join``
similar to an existing region joins it; else it opens one, up to ``topics_max``, then it joins
the nearest). Per node and region: ``n`` scored contributions and their ``quality_sum``. Sparse:
a node holds entries only for the regions it answered in; the entries of each region are listed,
so a decision touches the entries of its few nearest regions only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


def topic_id_for(task_id: str) -> str:
    """The id of a region opened by ``task_id`` (the same on every retry of its record)."""
    return "topic-" + hashlib.sha256(task_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Evidence:
    """A prompt's learned terms for the node slots that have any (``slots``, ascending): ``n``
    the similarity-weighted count of their scored contributions near the prompt, ``quality``
    the weighted quality sum."""

    slots: NDArray[np.int64]
    n: NDArray[np.float64]
    quality: NDArray[np.float64]


class LearnedFit:
    """Topic regions and per node-and-region stats; not thread-safe (one event loop)."""

    def __init__(
        self,
        dim: int,
        *,
        low: float = 0.4,
        high: float = 0.7,
        near: int = 8,
        join: float = 0.8,
        topics_max: int = 4096,
    ) -> None:
        self.low, self.high, self.near = low, high, near
        self.join, self.topics_max = join, topics_max
        self._tvec = np.zeros((64, dim), np.float32)
        self._tids: list[str] = []
        self._tslot: dict[str, int] = {}
        cap = 1024
        self._e_node = np.zeros(cap, np.int32)
        self._e_n = np.zeros(cap, np.float32)
        self._e_q = np.zeros(cap, np.float32)
        self._entries = 0
        self._entry: dict[int, int] = {}  # node slot << 32 | topic slot -> entry
        self._by_topic: list[list[int]] = []
        self._by_topic_arr: list[NDArray[np.int64] | None] = []

    # --- size ----------------------------------------------------------------------------------

    @property
    def topics(self) -> int:
        return len(self._tids)

    @property
    def entries(self) -> int:
        return self._entries

    def nbytes(self) -> int:
        arrays = (self._tvec, self._e_node, self._e_n, self._e_q)
        return int(sum(a.nbytes for a in arrays))

    # --- loading -------------------------------------------------------------------------------

    def add_topic(self, topic_id: str, vector: NDArray[np.float32]) -> None:
        if topic_id in self._tslot or vector.shape != self._tvec.shape[1:]:
            return
        slot = len(self._tids)
        if slot >= len(self._tvec):
            self._tvec = np.resize(self._tvec, (len(self._tvec) * 2, self._tvec.shape[1]))
        self._tvec[slot] = vector
        self._tids.append(topic_id)
        self._tslot[topic_id] = slot
        self._by_topic.append([])
        self._by_topic_arr.append(None)

    def has_topic(self, topic_id: str) -> bool:
        return topic_id in self._tslot

    def put(self, node_slot: int, topic_id: str, n: float, quality_sum: float) -> None:
        """A node-topic row as the database holds it (absolute values, not a delta)."""
        topic = self._tslot.get(topic_id)
        if topic is None:
            return  # its topic row comes with the next refresh (and this row again after it)
        key = node_slot << 32 | topic
        index = self._entry.get(key)
        if index is None:
            index = self._entries
            if index >= len(self._e_node):
                grow = len(self._e_node) * 2
                self._e_node = np.resize(self._e_node, grow)
                self._e_n = np.resize(self._e_n, grow)
                self._e_q = np.resize(self._e_q, grow)
            self._entries += 1
            self._entry[key] = index
            self._e_node[index] = node_slot
            self._by_topic[topic].append(index)
            self._by_topic_arr[topic] = None
        self._e_n[index] = n
        self._e_q[index] = quality_sum

    # --- the record step's side ----------------------------------------------------------------

    def assign(self, vector: NDArray[np.float32], task_id: str) -> tuple[str, bool]:
        """The region a task's prompt belongs to, and whether it opens a new one."""
        count = len(self._tids)
        if count:
            sims = self._tvec[:count] @ vector.astype(np.float32, copy=False)
            best = int(np.argmax(sims))
            if sims[best] >= self.join or count >= self.topics_max:
                return self._tids[best], False
        return topic_id_for(task_id), True

    # --- the decision's side -------------------------------------------------------------------

    def nearest(self, vector: NDArray[np.float32]) -> tuple[NDArray[np.int64], NDArray[Any]]:
        """The regions near the prompt and their weights ``clip((s - low) / (high - low), 0, 1)``
        (``s``: cosine of prompt and region), only those with a weight above 0."""
        count = len(self._tids)
        if not count or not self._entries:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        sims = self._tvec[:count] @ vector.astype(np.float32, copy=False)
        m = min(self.near, count)
        top = np.argpartition(-sims, m - 1)[:m] if m < count else np.arange(count)
        weight = np.clip((sims[top] - self.low) / (self.high - self.low), 0.0, 1.0)
        keep = weight > 0
        return top[keep].astype(np.int64), weight[keep].astype(np.float64)

    def evidence(self, vector: NDArray[np.float32]) -> Evidence:
        """The evidence near the prompt of every node that has some (sparse: a decision's
        cost grows with the entries of its nearest regions, not with the nodes)."""
        topics, weights = self.nearest(vector)
        parts = [(self._arr(t), w) for t, w in zip(topics.tolist(), weights.tolist(), strict=True)]
        parts = [(idx, w) for idx, w in parts if len(idx)]
        if not parts:
            empty = np.zeros(0, np.float64)
            return Evidence(slots=np.zeros(0, np.int64), n=empty, quality=empty)
        idx = np.concatenate([p[0] for p in parts])
        w = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
        slots, inverse = np.unique(self._e_node[idx], return_inverse=True)
        n = np.bincount(inverse, weights=w * self._e_n[idx], minlength=len(slots))
        q = np.bincount(inverse, weights=w * self._e_q[idx], minlength=len(slots))
        keep = n > 0
        return Evidence(
            slots=slots[keep].astype(np.int64),
            n=n[keep].astype(np.float64),
            quality=q[keep].astype(np.float64),
        )

    def _arr(self, topic: int) -> NDArray[np.int64]:
        arr = self._by_topic_arr[topic]
        if arr is None:
            arr = self._by_topic_arr[topic] = np.asarray(self._by_topic[topic], np.int64)
        return arr
