"""ci/serve.sh, the README's first command, as a user runs it: a serving instance keeps answering
while a second ``ci/serve.sh --smoke`` installs the library into the same backend folder, serves,
checks the demo answer and exits 0. (Before the library was renamed into place, the second run's
``cp -f`` rewrote the file the first server had mapped, and the first server died of SIGBUS.)
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import REPO, _free_port, _gguf, _tritonserver


def _ask(port: int) -> dict:
    body = {"text_input": "What is the capital of France?", "max_tokens": 16,
            "apply_chat_template": True, "temperature": 0.0}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/smollm2/generate",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))


def test_second_serve_smoke_leaves_the_running_server_alive(tmp_path):
    _gguf()  # fails with how to fetch it when the demo model is missing
    env = dict(os.environ, TRITONSERVER=_tritonserver(), FERRUM_BACKEND_DIR=str(tmp_path / "backends"))
    logs_dir = REPO / "build" / "logs"
    before = set(logs_dir.glob("*.log")) if logs_dir.exists() else set()
    http = _free_port()
    first = subprocess.Popen(
        [str(REPO / "ci" / "serve.sh"), "--http-port", str(http), "--grpc-port", str(_free_port()),
         "--metrics-port", str(_free_port())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        out = ""
        while "Press Ctrl-C" not in out:
            line = first.stdout.readline()
            assert line or first.poll() is None, f"first serve.sh exited: {first.stderr.read()}"
            out += line
            assert time.time() < deadline, f"first serve.sh never served: {out}"
        assert "Paris" in out, out
        first_logs = {p: p.stat().st_size for p in set(logs_dir.glob("*.log")) - before}
        assert len(first_logs) == 1, first_logs

        second = subprocess.run([str(REPO / "ci" / "serve.sh"), "--smoke"], env=env,
                                capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-4000:]
        assert "smoke test passed" in second.stderr, second.stderr[-2000:]

        # The first server is still alive and still answers.
        assert first.poll() is None, "the first serve.sh exited while the second ran"
        answer = _ask(http)
        assert "Paris" in answer["text_output"], answer

        # Each run wrote its own log; the first one's was not truncated by the second.
        second_logs = set(re.findall(r"log: (\S+?\.log)", second.stderr))
        assert second_logs and all(Path(p).exists() for p in second_logs), second.stderr[-2000:]
        assert not {str(p) for p in first_logs} & second_logs
        assert all(p.stat().st_size >= size for p, size in first_logs.items())
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGINT)
            try:
                first.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
