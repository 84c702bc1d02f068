"""`turbollm serve`: load the model, start the engine thread, serve the API with uvicorn
(server/app.py); `launch` starts one in a child process for tests and benchmarks."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from turbollm.cli import flags
from turbollm.config import RunConfig


@dataclass(frozen=True)
class ServeArgs:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    alias: str | None = None
    reasoning: str = "auto"  # "on", "off", "auto" (on for Gemma 4)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed (CORS): none by default
    # run.ctx_size is all slots together, split between run.parallel slots, as llama-server's -c / -np
    run: RunConfig = RunConfig()


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with parallel slots and a web chat page")
    flags.model_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context of all slots together, split evenly between them as in llama-server "
                        "(default: the model's training context)")
    p.add_argument("-np", "--parallel", type=int, default=1, help="slots: requests decoded at once (default 1)")
    flags.threads_flag(p)
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="prompt tokens fed per step, between decode steps of the other slots (default 512)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but / and /health")
    p.add_argument("-a", "--alias", default=None, help="model id in /v1/models and responses (default: the file name)")
    p.add_argument("--reasoning", choices=("auto", "on", "off"), default="auto",
                   help="whether the model thinks unless a request says otherwise (auto: on for Gemma 4)")
    p.add_argument("--cors-origins", default="", metavar="ORIGINS",
                   help="comma-separated browser origins allowed to call the API (CORS), e.g. "
                        "http://localhost:3000; '*' any, 'localhost' any page served from this machine "
                        "(default: none, no CORS headers: other sites' pages cannot read the API; "
                        "llama-server's default is '*')")
    p.add_argument("--jinja", action="store_true",
                   help="accepted for llama-server scripts: the GGUF's chat template is always used when present")
    flags.backend_flag(p)
    flags.prefill_flag(p)
    flags.cache_flags(p)
    flags.spec_flags(p)
    flags.placement_flags(p)
    p.set_defaults(handler=lambda args: serve(ServeArgs(host=args.host, port=args.port, api_key=args.api_key,
                                                        alias=args.alias, reasoning=args.reasoning,
                                                        cors_origins=cors_origins(args.cors_origins),
                                                        run=flags.run_config(args))))


def cors_origins(value: str) -> tuple[str, ...]:
    """--cors-origins' comma-separated list."""
    return tuple(o.strip() for o in value.split(",") if o.strip())


def build(a: ServeArgs):
    """The model, engine and app of these settings (the engine not yet started)."""
    from turbollm.api import Model
    from turbollm.engine.engine import Engine
    from turbollm.server.app import ServerSettings, create_app

    # planned for every slot full, before any weight is read; refused with the numbers if it does not fit
    model = Model.load(run=a.run)
    engine = Engine(model, n_slots=a.run.parallel, n_batch=a.run.n_batch, prompt_cache=True)
    thinking = {"on": True, "off": False, "auto": model.config.arch == "gemma4"}[a.reasoning]
    model_id = a.alias or Path(model.gguf.path).name
    settings = ServerSettings(model_id=model_id, api_key=a.api_key, thinking_default=thinking, cors_origins=a.cors_origins)
    return model, engine, create_app(engine, settings)


def serve(a: ServeArgs) -> int:
    import uvicorn

    model, engine, app = build(a)
    plan = model.network.new_cache_plan(engine.slot_ctx, model.cache)
    print(model.plan.format(), file=sys.stderr)
    print(f"turbollm: {model.gguf.path.name}, {a.run.parallel} slot(s) of {engine.slot_ctx} tokens, "
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
