"""``openxlstm serve``: an OpenAI-compatible HTTP server with continuous batching of recurrent states.

``engine`` (torch only) holds the decode loop and the slot pool; ``protocol``, ``chat`` and ``server`` the HTTP
layer (the ``serve`` extra: starlette, uvicorn, pydantic); ``cli`` the command. See docs/serving.md.
"""

from .engine import Draining, Engine, QueueFull, Request, SamplingParams, SlotPool, Update

__all__ = ["Engine", "Request", "SamplingParams", "SlotPool", "Update", "QueueFull", "Draining"]
