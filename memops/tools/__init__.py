"""Tooling around the ops, not part of the op API: the ``memops`` command (cli), the training demo, the
benchmark harness and its report, the API-doc generator and the ahead-of-time GPU compile check."""
