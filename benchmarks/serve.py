"""openxlstm serve under load on CPU: tokens/s and time to first token against the number of concurrent
streaming clients, beside the same requests run one after another through ``openxlstm.generate`` and
through transformers' ``generate`` for a transformers ``xLSTMForCausalLM`` of the same size, in one run.

The model is ``openxlstm train``'s default xLSTM[3:1] (4 blocks of width 128, sLSTM at block 1, byte
vocabulary of 257: 0.502M parameters) with random weights (its reference initialization, seed 0): speed
does not depend on what the weights learned. Every request is greedy with ``ignore_eos``, so each makes
exactly ``--max-tokens`` tokens from a ``--prompt-tokens``-byte prompt (slices of openxlstm's own sources).

The server runs in its own process (this script with ``--serve``), one intra-op thread, and gets C clients
(the official ``openai`` client, asyncio) that each send ``--requests-per-client`` streaming requests back
to back. tokens/s = all completion tokens / the row's wall time; TTFT = median over the row's requests of
the time from sending a request to its first streamed token. The sequential rows run ``--sequential``
requests one after another in this process (one thread): tokens/s over all of them, TTFT of a request alone
(the best case: with C clients at once, the k-th waits for k-1 whole requests first). Memory is the server's
resident set after each row (``/proc``), and its peak. Rows of the ``--repeats`` rounds are interleaved
(server rows, then the sequential ones, then the next round) and the table gives medians. Bounded: every
request has a timeout, the run stops after ``--budget-s`` seconds (rows not reached are left out), and the
server is stopped with SIGTERM at the end.

    OMP_NUM_THREADS=1 python benchmarks/serve.py                # about 3 minutes on 2 cores
    python benchmarks/serve.py --clients 1,8,32 --repeats 1     # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_XLSTM = dict(vocab_size=257, embedding_dim=128, num_blocks=4, slstm_at=[1], mlstm_num_heads=4,
                     slstm_num_heads=4, context_length=128)


def default_model():
    import torch

    from openxlstm.models import build_model

    torch.manual_seed(0)
    return build_model("xlstm", DEFAULT_XLSTM).eval()


def prompts(count: int, length: int) -> list[str]:
    """``count`` distinct ASCII prompts of ``length`` bytes, cut from openxlstm's sources."""
    import openxlstm

    text = "".join(p.read_text() for p in sorted(Path(openxlstm.__file__).parent.rglob("*.py")))
    text = text.encode("ascii", "ignore").decode()
    step = max(1, (len(text) - length) // max(count, 1))
    return [text[k * step:k * step + length] for k in range(count)]


# --- the server process ----------------------------------------------------------------------------------
def serve(args) -> int:
    import torch

    from openxlstm.data import ByteTokenizer
    from openxlstm.serving.engine import Engine
    from openxlstm.serving.metrics import Metrics
    from openxlstm.serving.server import ServerSettings, bind, create_app, run

    torch.set_num_threads(1)
    engine = Engine(default_model(), ByteTokenizer(), max_batch_size=args.max_batch_size, max_queue=1024,
                    prefill_chunk=args.prefill_chunk, metrics=Metrics(), compile=args.compile)
    sock = bind("127.0.0.1", 0)
    app = create_app(engine, ServerSettings(model_name="default", max_tokens=args.max_tokens, grace_period=2))
    print(f"port {sock.getsockname()[1]}", flush=True)
    run(app, sock)
    return 0


def _memory(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of a process (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


# --- clients ---------------------------------------------------------------------------------------------
class SSEClient:
    """One streaming client on one keep-alive HTTP/1.1 connection: ``POST /v1/completions`` with
    ``stream: true``, the chunked response read as server-sent events. Plain asyncio, so that the clients
    (here on the same 2 cores as the server) cost little; the tests talk to the server with the official
    ``openai`` client, and ``--client openai`` uses it here too."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def complete(self, body: dict) -> tuple[float, int]:
        """(seconds to the first streamed text, completion tokens) of one request."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        start = time.perf_counter()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"the server answered {status!r}")
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass
        first, tokens, pending = None, 0, b""
        while True:
            size = int((await self.reader.readline()).strip() or b"0", 16)
            if size == 0:
                await self.reader.readline()
                return (first if first is not None else time.perf_counter() - start), tokens
            pending += (await self.reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - start

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load_row(url: str, clients: int, per_client: int, texts: list[str], max_tokens: int, timeout: float,
                   kind: str = "raw") -> dict:
    """C clients, each sending ``per_client`` streaming requests back to back."""
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    ttfts, tokens = [], [0]
    body = dict(model="default", max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True)
    if kind == "openai":
        import openai

        shared = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)

    async def one_client(k: int):
        if kind == "raw":
            client = SSEClient(host, int(port))
        for j in range(per_client):
            prompt = texts[(k * per_client + j) % len(texts)]
            if kind == "raw":
                first, n = await client.complete(dict(body, prompt=prompt))
            else:
                start, first, n = time.perf_counter(), None, 0
                extra = {"ignore_eos": True}
                fields = {key: value for key, value in body.items() if key != "ignore_eos"}
                stream = await shared.completions.create(**fields, prompt=prompt, extra_body=extra)
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - start
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
            ttfts.append(first)
            tokens[0] += n
        if kind == "raw":
            client.close()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one_client(k) for k in range(clients))), timeout)
    wall = time.perf_counter() - start
    if kind == "openai":
        await shared.close()
    return {"tok_s": tokens[0] / wall, "ttft": statistics.median(t for t in ttfts if t is not None),
            "tokens": tokens[0]}


def sequential_openxlstm(model, tok, texts: list[str], max_tokens: int, compile: bool = False) -> dict:
    import openxlstm

    ttft = statistics.median(_timed(lambda p: openxlstm.generate(model, p, tok, max_new_tokens=1, temperature=0), t)
                             for t in texts[:3])
    start = time.perf_counter()
    for t in texts:
        openxlstm.generate(model, t, tok, max_new_tokens=max_tokens, temperature=0, compile=compile)
    return {"tok_s": len(texts) * max_tokens / (time.perf_counter() - start), "ttft": ttft}


def hf_model(target_params: int):
    """transformers' xLSTMForCausalLM of width 128, 4 layers, 4 heads, its FFN sized to ``target_params``."""
    import torch
    from transformers import xLSTMConfig, xLSTMForCausalLM

    best = None
    for factor in [0.5 + 0.02 * k for k in range(60)]:
        cfg = xLSTMConfig(vocab_size=257, hidden_size=128, num_hidden_layers=4, num_heads=4, ffn_proj_factor=factor,
                          eos_token_id=None, pad_token_id=0, bos_token_id=None)
        n = sum(p.numel() for p in xLSTMForCausalLM(cfg).parameters())
        if best is None or abs(n - target_params) < abs(best[0] - target_params):
            best = (n, cfg)
    torch.manual_seed(0)
    return xLSTMForCausalLM(best[1]).eval(), best[0]


def sequential_hf(model, texts: list[str], max_tokens: int) -> dict:
    import torch

    rows = [torch.tensor([list(t.encode())]) for t in texts]

    def gen(ids, n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)

    with torch.no_grad():
        ttft = statistics.median(_timed(lambda ids: gen(ids, 1), r) for r in rows[:3])
        start = time.perf_counter()
        for r in rows:
            gen(r, max_tokens)
    return {"tok_s": len(texts) * max_tokens / (time.perf_counter() - start), "ttft": ttft}


def _timed(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,2,4,8,16,32,64", help="numbers of concurrent streaming clients")
    ap.add_argument("--openai-clients", default="32",
                    help="numbers of clients also run with the official openai client ('' for none)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--sequential", type=int, default=8, help="requests of the sequential rows")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=1024, help="the server's --prefill-chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=900)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step of the server and of openxlstm.generate (minutes first)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)

    import torch

    from openxlstm.data import ByteTokenizer

    torch.set_num_threads(1)
    deadline = time.monotonic() + args.budget_s
    plan = [(int(c), "raw") for c in args.clients.split(",")]
    plan += [(int(c), "openai") for c in args.openai_clients.split(",") if c.strip()]
    texts = prompts(max(c for c, _ in plan) * args.requests_per_client, args.prompt_tokens)
    model, tok = default_model(), ByteTokenizer()
    params = sum(p.numel() for p in model.parameters())
    hf, hf_params = hf_model(params)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--max-batch-size", str(args.max_batch_size),
                             "--max-tokens", str(args.max_tokens), "--prefill-chunk", str(args.prefill_chunk)]
                            + ["--compile"] * args.compile,
                            stdout=subprocess.PIPE, text=True, env=env)
    rows: dict = {}
    sequential = (("openxlstm.generate", lambda: sequential_openxlstm(model, tok, texts[:args.sequential],
                                                                      args.max_tokens, args.compile)),
                  ("transformers generate", lambda: sequential_hf(hf, texts[:args.sequential], args.max_tokens)))
    try:
        url = f"http://127.0.0.1:{proc.stdout.readline().split()[1]}/v1"
        asyncio.run(load_row(url, 2, 1, texts, args.max_tokens, 120))  # warm-up
        sequential_openxlstm(model, tok, texts[:1], 8, args.compile)
        sequential_hf(hf, texts[:1], 8)
        for r in range(args.repeats):
            for c, kind in plan:
                if time.monotonic() > deadline:
                    break
                row = asyncio.run(load_row(url, c, args.requests_per_client, texts, args.max_tokens,
                                           max(10.0, deadline - time.monotonic()), kind))
                row["rss"], row["peak"] = _memory(proc.pid)
                rows.setdefault((kind, c), []).append(row)
                print(f"round {r}: {c:3d} {kind} clients {row['tok_s']:8.1f} tok/s  ttft {row['ttft'] * 1e3:7.1f} ms  "
                      f"server RSS {row['rss'] / 2**20:.1f} MiB", flush=True)
            for name, fn in sequential:
                if time.monotonic() > deadline:
                    break
                row = fn()
                rows.setdefault((name, 1), []).append(row)
                print(f"round {r}: {name} {row['tok_s']:8.1f} tok/s  ttft {row['ttft'] * 1e3:7.1f} ms", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
    base = statistics.median(r["tok_s"] for r in rows.get(("openxlstm.generate", 1), [{"tok_s": float("nan")}]))
    print(f"\nmodel: openxlstm default xLSTM[3:1], {params:,} parameters, random weights; transformers "
          f"xLSTMForCausalLM {hf_params:,} parameters; {args.prompt_tokens}-token prompts, {args.max_tokens} new "
          f"tokens, greedy; torch threads 1; decode step {'compiled' if args.compile else 'eager'}; medians of "
          f"{args.repeats} interleaved rounds; server exit status {code}\n")
    print("| requests | tokens/s | x sequential | TTFT median (ms) | server RSS after (MiB) | peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for c, kind in plan:
        got = rows.get((kind, c))
        if not got:
            continue
        tps = statistics.median(r["tok_s"] for r in got)
        who = "asyncio SSE clients" if kind == "raw" else "openai clients"
        print(f"| openxlstm serve, {c} {who} | {tps:.0f} | {tps / base:.1f} | "
              f"{statistics.median(r['ttft'] for r in got) * 1e3:.0f} | "
              f"{statistics.median(r['rss'] for r in got) / 2**20:.0f} | {max(r['peak'] for r in got) / 2**20:.0f} |")
    for name, _ in sequential:
        got = rows.get((name, 1))
        if got:
            tps = statistics.median(r["tok_s"] for r in got)
            print(f"| one after another, {name} | {tps:.0f} | {tps / base:.1f} | "
                  f"{statistics.median(r['ttft'] for r in got) * 1e3:.0f} (alone) | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
