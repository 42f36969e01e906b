"""``openxlstm serve``: load a model, start the engine, serve the OpenAI API until SIGTERM / SIGINT.

``add_parser(subparsers)`` adds the command to the ``openxlstm`` parser and ``run(args)`` runs it; ``main``
runs it alone (``python -m openxlstm.serving ...``). Mistakes in the options, the model directory or the
address end as one ``UserError`` line.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from ..device import DEVICE_RE
from ..errors import UserError
from ..options import arg_type, int_range, number

API_KEY_ENV = "OPENXLSTM_API_KEY"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _int(lo: int, hi: int = None):
    return arg_type(int_range(lo, hi), int)


_seconds = arg_type(number(0, lo_open=True), float)
_device = arg_type(((lambda v: DEVICE_RE.match(v) is not None), "auto, cpu, cuda or cuda:N"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``serve`` subcommand (its parser inherits the parent's class, so errors stay one line)."""
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI API (completions, chat, streaming) with continuous batching",
        description="Serve a recurrent model (xLSTM, xLSTM-7B, the LSTM baseline) over HTTP with OpenAI's API: "
                    "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics. "
                    "Every request's state lives in a preallocated slot; one decode loop runs them all.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", metavar="DIR", help="run or checkpoint directory of openxlstm train")
    g.add_argument("--model", metavar="DIR", help="pretrained model directory: transformers' xLSTMForCausalLM "
                                                  "(e.g. xLSTM-7B), the authors' xlstm_large layout, or a run")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; another than loopback without --api-key prints a warning")
    p.add_argument("--port", type=_int(0, 65535), default=8000, help="TCP port; 0 picks a free one (printed)")
    p.add_argument("--api-key", default=None,
                   help=f"requests to /v1/ need 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set, "
                        f"else no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the name of the model directory)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype the weights are loaded in (default: auto, the checkpoint's)")
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N, or auto: a GPU if there is one")
    p.add_argument("--max-batch-size", type=_int(1, 4096), default=32,
                   help="slots of the state pool: the most sequences decoded at once; memory is fixed by it")
    p.add_argument("--max-queue", type=_int(0), default=256,
                   help="requests that may wait for a slot; beyond, requests get 429 at once")
    p.add_argument("--max-prompt-tokens", type=_int(1), default=8192, help="longest prompt accepted, in tokens")
    p.add_argument("--max-tokens", type=_int(1), default=1024,
                   help="most tokens a request may ask for (max_tokens); the default of chat requests")
    p.add_argument("--prefill-chunk", type=_int(1), default=1024,
                   help="prompt tokens prefilled between two decode steps (and the piece a prompt is read in)")
    p.add_argument("--request-timeout", type=_seconds, default=600.0,
                   help="seconds a request may take from its arrival, queueing included, before it ends with 504")
    p.add_argument("--grace-period", type=_seconds, default=30.0,
                   help="on SIGTERM: seconds the running requests get to finish before they are ended")
    p.add_argument("--max-body-bytes", type=_int(1), default=1 << 20,
                   help="largest request body accepted; a larger one gets 413 before it is read")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the decode step (inductor when BACKEND is left out); it compiles at start-up, "
                        "minutes on a CPU, and then decodes several times faster there (default: off)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template (default: the model directory's, else the plain template of "
                        "docs/serving.md)")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _device_name(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _build(args, path: str, device: str, api_key):
    """(app, engine, model) of the options: the model loaded, its chat template found, the pool allocated."""
    import openxlstm

    from . import server
    from .chat import ChatTemplate
    from .engine import Engine
    from .metrics import Metrics

    model = openxlstm.from_pretrained(path, dtype=None if args.dtype == "auto" else args.dtype, device=device)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError(f"{path!r} has no tokenizer (the model reads token ids); openxlstm serve needs one to "
                        f"read prompts and write text")
    directory = Path(path).expanduser()
    chat = (ChatTemplate.from_file(args.chat_template) if args.chat_template is not None else
            ChatTemplate.from_directory(directory if directory.is_dir() else directory.parent))
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, metrics=Metrics(), compile=args.compile or False)
    settings = server.ServerSettings(model_name=args.served_model_name or directory.resolve().name, api_key=api_key,
                                     max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                                     request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                                     grace_period=args.grace_period)
    return server.create_app(engine, settings, chat), engine, model


def run(args) -> int:
    """Run ``openxlstm serve`` (``args`` from ``add_parser``'s parser); returns 0 after a clean shutdown."""
    try:
        import uvicorn  # noqa: F401

        from . import server  # starlette, pydantic
    except ImportError as e:
        raise UserError(f"openxlstm serve needs {e.name}: pip install 'openxlstm[serve]'") from None
    import torch

    path = args.checkpoint if args.checkpoint is not None else args.model
    if not Path(path).expanduser().exists():
        raise UserError(f"{'checkpoint' if args.checkpoint is not None else 'model'} {path!r} does not exist")
    device = _device_name(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    sock = server.bind(args.host, args.port)  # before loading: a taken port fails in a second, not a minute
    if not _is_loopback(args.host) and api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the "
              f"model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    try:
        app, engine, model = _build(args, path, device, api_key)
    except BaseException:
        sock.close()
        raise
    service = app.state.service
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"openxlstm serve: model {service.settings.model_name!r} ({type(model).__name__}, {device}) on "
          f"http://{shown}:{port}/v1 ({args.max_batch_size} slots, state pool {engine.pool.nbytes / 2**20:.1f} MiB; "
          f"chat template: {service.chat.source})", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server.run(app, sock)
    return 0


class _Parser(argparse.ArgumentParser):
    """Parse errors as one ``UserError`` line (as the ``openxlstm`` command's parser does); help shows the
    defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv=None) -> int:
    """``openxlstm serve`` on its own: ``python -m openxlstm.serving --checkpoint DIR ...``."""
    parser = _Parser(prog="openxlstm")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser(sub)
    try:
        return run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["add_parser", "run", "main", "API_KEY_ENV"]
