"""``kvprobe serve``: a generator folder behind an OpenAI-compatible HTTP API (``kvprobe.serve.app``), decoded by
one engine thread (``kvprobe.serve.worker``); the wire protocol lives in ``kvprobe.serve.protocol``.
Needs the ``serve`` extra: ``pip install 'kvprobe[serve]'``."""

from kvprobe.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
