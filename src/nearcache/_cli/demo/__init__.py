"""``nearcache demo``: a private Redis, instance processes serving a catalog from SQLite, and
a scenario played over them with a live view.

- ``scenario``: the coordinator (``run_demo``).
- ``fleet``: starting and talking to the instance processes.
- ``instance``: one instance process (``python -m nearcache._cli.demo.instance``).
- ``catalog``: the SQLite source of truth.
- ``server``: the private ``redis-server``.
- ``view``: the terminal board.
"""
