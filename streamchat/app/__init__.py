"""The Textual app (`streamchat chat`, `streamchat demo`). The engine never imports this package."""

from .app import ChatApp, binding_ids
from .worker import ChunkGate, Launch

__all__ = ["ChatApp", "binding_ids", "ChunkGate", "Launch"]
