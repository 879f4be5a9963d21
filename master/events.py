"""What happens in the master, as events: key pending/accepted, node up/down, job started/finished,
network rollback, reboot progress. `pimaster events` streams them.

Rooms publish with ``master.events.publish(TYPE, **fields)``; every event gets a time. Subscribers
(one per `pimaster events`) each have a bounded queue: a subscriber that does not read loses
events (counted, and told so), never costs the master unbounded memory.
"""

from __future__ import annotations

import asyncio
import time

QUEUE_LIMIT = 1000


class EventBus:
    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue] = set()

    def publish(self, type_: str, **fields) -> None:
        event = {"time": time.time(), "type": type_, **fields}
        for queue in list(self.subscribers):
            if queue.qsize() < QUEUE_LIMIT:
                queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)
