"""The Textual app (`streamchat chat`, `streamchat demo`). The engine never imports this package."""

from .app import ChatApp
from .worker import ChunkGate, Launch

__all__ = ["ChatApp", "ChunkGate", "Launch"]
