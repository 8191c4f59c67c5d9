"""The front-end processes (`--workers N`): `frontend` (a process that parses, checks and
converts requests into shared memory), `supervisor` (the owner's side: starts them, queues their
records, answers them) and `ipc` (the arena and the record link between the two)."""
