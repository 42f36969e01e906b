"""The serve command: a server process started on a free port answers the openai client and exits 0 on
SIGTERM (running requests ended within the grace period, no new connections); mistakes in the options or
the model directory are one line, exit status 2."""

import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from helpers import one_line_error, tiny_args  # noqa: E402
from openxlstm.cli import main as openxlstm_main  # noqa: E402
from openxlstm.serving.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Tiny runs of openxlstm train: an xLSTM and a Transformer (whose KV cache cannot be served)."""
    root = tmp_path_factory.mktemp("serve_runs")
    for arch in ("xlstm", "transformer"):
        assert openxlstm_main(tiny_args(arch, corpus, root / arch, steps=2)) == 0
    return root


def _start(run_dir, *extra):
    """(process, base URL): ``python -m openxlstm.serving`` on port 0, the URL read from its first line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "openxlstm.serving", "--checkpoint", str(run_dir), "--port", "0",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # blocks until the server prints its address (or exits)
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")


def test_sigterm_ends_running_requests_and_exits_0(runs):
    proc, url = _start(runs / "xlstm", "--grace-period", "1", "--max-tokens", "1000000", "--api-key", "k1")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        assert c.completions.create(model="xlstm", prompt="def", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0, timeout=60).models.list()
        stream = c.completions.create(model="xlstm", prompt="The", max_tokens=900_000, stream=True,
                                      extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):  # ended after the grace period
            for _ in chunks:
                pass
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()
    log = proc.stderr.read()
    assert "POST /v1/completions 200" in log and "POST /v1/completions 503" in log  # one line per request
    assert "Traceback" not in log


def test_command_line_mistakes_are_one_line(runs, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--checkpoint", str(runs / "xlstm"), "--port", "70000"], "--port"),
        (["--checkpoint", str(runs / "xlstm"), "--max-batch-size", "0"], "--max-batch-size"),
        (["--checkpoint", str(runs / "xlstm"), "--request-timeout", "nan"], "--request-timeout"),
        (["--checkpoint", str(runs / "xlstm"), "--device", "tpu"], "--device"),
        (["--checkpoint", str(runs / "xlstm"), "--port", "0", "--chat-template", str(tmp_path / "none.jinja")],
         "cannot read the chat template"),
        (["--checkpoint", str(runs / "transformer"), "--port", "0"], "grows with the text"),
        ([], "--checkpoint"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        one_line_error(capsys, words)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["--checkpoint", str(runs / "xlstm"), "--port", str(taken.getsockname()[1])]) == 2
        one_line_error(capsys, "cannot listen on 127.0.0.1")


def test_a_public_address_without_a_key_warns(runs, capsys):
    assert main(["--checkpoint", str(runs / "transformer"), "--host", "0.0.0.0", "--port", "0"]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: serving on 0.0.0.0 without --api-key") and "grows with the text" in error
    assert main(["--checkpoint", str(runs / "transformer"), "--host", "127.0.0.1", "--port", "0"]) == 2
    assert "warning" not in capsys.readouterr().err

