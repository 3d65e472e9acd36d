"""Entry points only: the Litestar app, the CLI, SAQ worker settings, Lambda handlers,
and the composition root (``bootstrap``) that wires adapters from settings."""
