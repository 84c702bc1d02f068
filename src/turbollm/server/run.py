"""`turbollm serve`: load the model, start the engine thread, serve the API with uvicorn."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from turbollm.api import LoadOptions
from turbollm.errors import TurbollmError


@dataclass(frozen=True)
class ServeArgs:
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1
    batch_size: int = 512  # prompt chunk per step
    api_key: str | None = None
    alias: str | None = None
    reasoning: str = "auto"  # "on", "off", "auto" (on for Gemma 4)
    # load.ctx_size is all slots together, as llama-server's -c (None: the model's training context)
    load: LoadOptions = LoadOptions()


def build(a: ServeArgs):
    """The model, engine and app of these settings (the engine not yet started)."""
    from turbollm.api import read_config
    from turbollm.engine.engine import Engine
    from turbollm.server.app import ServerSettings, create_app

    if a.parallel <= 0:
        raise TurbollmError(f"--parallel must be positive, got {a.parallel}")
    if a.batch_size <= 0:
        raise TurbollmError(f"--batch-size must be positive, got {a.batch_size}")
    total = a.load.ctx_size if a.load.ctx_size is not None else read_config(a.load.model).n_ctx_train
    slot_ctx = total // a.parallel  # llama-server: -c is all slots together
    if slot_ctx < 2:
        raise TurbollmError(f"--ctx-size {total} split over --parallel {a.parallel} leaves {slot_ctx} tokens per slot")
    # planned for every slot full, before any weight is read; refused with the numbers if it does not fit
    model = replace(a.load, ctx_size=slot_ctx).load(parallel=a.parallel)
    engine = Engine(model, n_slots=a.parallel, slot_ctx=slot_ctx, n_batch=a.batch_size)
    thinking = {"on": True, "off": False, "auto": model.config.arch == "gemma4"}[a.reasoning]
    model_id = a.alias or Path(model.gguf.path).name
    return model, engine, create_app(engine, ServerSettings(model_id=model_id, api_key=a.api_key, thinking_default=thinking))


def serve(a: ServeArgs) -> int:
    import uvicorn

    model, engine, app = build(a)
    plan = model.network.new_cache_plan(engine.slot_ctx, model.cache)
    print(model.plan.format(), file=sys.stderr)
    print(f"turbollm: {model.gguf.path.name}, {a.parallel} slot(s) of {engine.slot_ctx} tokens, "
          f"KV cache {plan.nbytes / 2**20:,.1f} MiB per full slot ({model.cache.label}), "
          f"listening on http://{a.host}:{a.port}", file=sys.stderr, flush=True)
    engine.start()
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def free_port() -> int:
    """A loopback port nobody listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(flags: list[str], log=None, timeout: float = 120.0):
    """`turbollm serve FLAGS` in a child process on a free loopback port: (process, base URL)
    once /health answers (the tests and benchmarks/serve_load.py start servers this way).
    `log`: a file for its output (a pipe could fill and block a server that logs a lot)."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "turbollm.cli", "serve", "--port", str(port), *flags],
                            stdout=log if log is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            output = ""
            if log is not None:
                log.seek(0)
                output = ": " + log.read()
            raise RuntimeError(f"the server exited with status {proc.returncode}{output}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s")
