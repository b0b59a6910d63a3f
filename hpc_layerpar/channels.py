"""A stage's channel: the messages of one kind that flow through a rank in one direction of the
pipeline (activations forward, targets or adjoints backward). It owns a ring of preallocated slots
for what it receives from one neighbour and for what it sends to the other, and the requests in
flight; allocated once per parallel phase. At the ends of the chain a side has no peer and its
operations do nothing, so the engines need no first/last branches around their messages."""
from __future__ import annotations

import torch

AHEAD = 2  # micro-batches whose receives a pipeline stage posts ahead of need


class Channel:
    """recv_from / send_to: neighbour ranks, or None at the chain's end. Message j uses slot j % slots
    on either side; its tag is j modulo MPI's guaranteed tag range (messages between two ranks do not
    overtake each other and receives are posted in order, so reused tags cannot mismatch)."""

    TAGS = 32768

    def __init__(self, comm, name: str, *, recv_from, send_to, recv_shape, send_shape, rows: int,
                 dtype, device, slots: int):
        self.comm, self.name, self.slots = comm, name, slots
        self.recv_from, self.send_to = recv_from, send_to
        self.inbox = [torch.empty((rows,) + tuple(recv_shape), dtype=dtype, device=device)
                      for _ in range(slots)] if recv_from is not None else []
        self.outbox = [torch.empty((rows,) + tuple(send_shape), dtype=dtype, device=device)
                       for _ in range(slots)] if send_to is not None else []
        self.recv_req: dict = {}   # j -> Pending
        self.send_req = [None] * slots

    @property
    def receives(self) -> bool:
        """Whether this channel has a neighbour to receive from (False at the chain's end)."""
        return self.recv_from is not None

    @property
    def sends(self) -> bool:
        """Whether this channel has a neighbour to send to (False at the chain's end)."""
        return self.send_to is not None

    def post(self, j: int, n: int) -> None:
        """Post the receive of message j (n rows) into its slot, unless posted already."""
        if self.receives and j not in self.recv_req:
            buf = self.inbox[j % self.slots][:n]
            self.recv_req[j] = self.comm.irecv(buf, self.recv_from, tag=j % self.TAGS,
                                               key=(self.name, "in", j % self.slots))

    def recv(self, j: int, n: int) -> torch.Tensor:
        """Message j (posting it if needed), waited for; a view of its slot, valid until message
        j + slots is posted: copy it before that."""
        self.post(j, n)
        self.recv_req.pop(j).wait()
        return self.inbox[j % self.slots][:n]

    def ready(self, j: int) -> bool:
        """Whether message j has arrived (drives MPI progress; never blocks)."""
        req = self.recv_req.get(j)
        return req is not None and req.test()

    def send(self, j: int, t: torch.Tensor) -> None:
        """Copy t into the slot of message j (after that slot's previous send completed) and send it."""
        if not self.sends:
            return
        s = j % self.slots
        if self.send_req[s] is not None:
            self.send_req[s].wait()
        buf = self.outbox[s][:len(t)]
        buf.copy_(t)
        self.send_req[s] = self.comm.isend(buf, self.send_to, tag=j % self.TAGS, key=(self.name, "out", s))

    def cancel(self) -> None:
        """Withdraw every receive posted ahead (an epoch halted before their messages were sent)."""
        for r in self.recv_req.values():
            r.cancel()
        self.recv_req = {}

    def drain(self) -> None:
        """Complete every send in flight (the end of an epoch)."""
        for r in self.send_req:
            if r is not None:
                r.wait()
        self.send_req = [None] * self.slots
