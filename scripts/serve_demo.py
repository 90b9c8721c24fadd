"""Demo step: serve a merged checkpoint with `mergeserve serve`, ask it one chat question with the
official openai client, print the answer, and shut the server down (SIGTERM, as Ctrl-C would).

    .venv/bin/python scripts/serve_demo.py FP8_CHECKPOINT [BF16_FALLBACK]

The FP8 checkpoint is served with its FP8 weights on GPUs and on every x86-64 CPU (vLLM's AMX
kernels where the CPU has AMX, mergeserve's vLLM plugin elsewhere). Only on another CPU (Arm)
does `mergeserve serve` refuse it, with the reason, and the demo serves the bf16 merge instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(path: str, port: int, log: str) -> subprocess.Popen | None:
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", path, "--name", "marcoro14-tiny", "--port", str(port),
           "--metrics-port", str(free_port())]
    # Ray's and vLLM's logs go to a file: an undrained pipe would fill up and stall the server.
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    t0 = time.time()
    for line in proc.stdout:  # the command prints one line when it is ready
        if line.startswith("serving"):
            print(f"{line.strip()}  (ready after {time.time() - t0:.0f} s; logs in {log})", flush=True)
            return proc
    proc.wait()
    lines = [x for x in open(log).read().strip().splitlines() if x.startswith("mergeserve: error")]
    print(lines[-1] if lines else f"mergeserve serve exited with {proc.returncode} (see {log})", flush=True)
    return None


def main() -> int:
    fp8, bf16 = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    port = free_port()
    print(f"starting Ray Serve + vLLM for {fp8} on 127.0.0.1:{port} (about a minute on CPU)", flush=True)
    log = os.path.join(os.path.dirname(os.path.abspath(fp8)), "serve.log")
    proc = serve(fp8, port, log)
    if proc is None and bf16:
        print(f"serving the bf16 merge instead: {bf16}", flush=True)
        proc = serve(bf16, port, log)
    if proc is None:
        return 1
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        # Greedy decoding of a model this small collapses to newlines; seeded sampling with a
        # repetition penalty (a vLLM sampling parameter, passed through the OpenAI API) shows
        # what it learned.
        sampling = dict(temperature=0.7, top_p=0.95, seed=0, extra_body={"repetition_penalty": 1.3})
        question = "Write a Python function that reverses a list."
        r = client.chat.completions.create(model="marcoro14-tiny", messages=[{"role": "user", "content": question}],
                                           max_tokens=48, **sampling)
        print(f"\nchat: user: {question}\nmarcoro14-tiny: {r.choices[0].message.content!r}")
        print(f"usage: {r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} completion tokens")
        prefix = "def reverse_list(items):\n"
        print(f"\nstreamed completion of {prefix!r}:\n{prefix}", end="", flush=True)
        stream = client.completions.create(model="marcoro14-tiny", prompt=prefix, max_tokens=48, stream=True,
                                           stream_options={"include_usage": True}, **sampling)
        chunks = 0
        for chunk in stream:
            if chunk.choices:
                chunks += 1
                print(chunk.choices[0].text, end="", flush=True)
        print(f"\n[{chunks} streamed chunks]\n")
        print("(a 4M-parameter model trained for two minutes: expect Python-flavoured babble, not an answer)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        print(f"server stopped (exit code {proc.returncode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
