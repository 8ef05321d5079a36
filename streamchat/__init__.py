"""streamchat: chat with a video while it is being encoded into Qwen2.5-VL's KV cache."""

__version__ = "0.1.0"
