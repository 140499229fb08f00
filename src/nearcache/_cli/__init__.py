"""The ``nearcache`` command (``main``: ``monitor``, ``invalidate``, ``demo``) and, under
``demo``, the live demo's coordinator, instance processes and terminal view."""
