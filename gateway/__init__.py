"""pg-ws-gateway: committed PostgreSQL rows to WebSocket clients, nothing lost.

``__version__`` is the one place the version is written: pyproject.toml reads it
(``[tool.setuptools.dynamic]``), ``gateway --version`` prints it, ``/healthz`` and the
``welcome`` frame carry it. docs/release.md says when it changes.
"""

__version__ = "0.1.0"
