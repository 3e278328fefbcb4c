"""An in-memory Flower grid for tests: the real ServerApp logic and ClientApp handlers, no SuperLink.

Each node has its own Flower ``Context`` (node config, persistent state), as a SuperNode keeps it;
``send_and_receive`` hands each message to the ClientApp in turn. ``tamper`` may rewrite a reply
before the server sees it (a misbehaving client), ``fail`` may make a node's handler raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from splitfed.federated.flower.client_app import app as client_app

FIRST_NODE = 1000


class LocalGrid(Grid):
    """Nodes ``FIRST_NODE + i`` with ``node_configs[i]``, all in this process."""

    def __init__(
        self,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        *,
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=1,
                node_id=FIRST_NODE + i,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=run_config,
            )
            for i, nc in enumerate(node_configs)
        }
        self.tamper = tamper
        self.sent: list[tuple[int, str]] = []

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid only sends and receives")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid only sends and receives")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            try:
                reply = client_app(message, self.contexts[node])
            except Exception as err:  # a SuperNode turns a raising ClientApp into an error reply
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            replies.append(reply)
        return replies
