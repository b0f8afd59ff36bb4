"""Self-generated calibration data (``repq calib``): the model answers varied prompts through its own
chat template, in llama.cpp, reproducibly (answer i uses sampling seed ``seed + i``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError, UsageError
from .chat import chat_tokens
from .jsonl import check_messages
from .tokenizer import Tokenizer, read_utf8

#: A small, varied prompt set: explanation, reasoning, code, writing, facts, instructions.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Explain how a hash table works and when it performs badly.",
    "What causes the seasons on Earth?",
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "Summarize the causes of the French Revolution in a short paragraph.",
    "A train leaves at 9:40 and arrives at 13:15. How long is the journey? Show your reasoning.",
    "Give three tips for writing clear technical documentation.",
    "What is the difference between a process and a thread?",
    "Write a short poem about autumn rain.",
    "How does photosynthesis convert light into chemical energy?",
    "Explain recursion to a beginner with a simple example.",
    "List the planets of the solar system in order and one fact about each.",
    "What are the pros and cons of remote work?",
    "Translate to French: 'The library opens at nine and closes at six.'",
    "Write a SQL query that finds the five customers with the highest total order value.",
    "Why is the sky blue?",
    "Describe how vaccines train the immune system.",
    "If a shirt costs $25 after a 20% discount, what was the original price? Explain.",
    "Write an email asking a colleague to review a pull request by Friday.",
    "What is the Pythagorean theorem and how is it used?",
    "Compare lists and tuples in Python.",
    "Give a recipe for a simple vegetable soup.",
    "Explain what inflation is and why central banks raise interest rates.",
    "Write a bash one-liner that counts the lines of all .py files in a directory tree.",
    "What were the main achievements of the Apollo program?",
    "How do you make a good first impression in a job interview?",
    "Explain the difference between weather and climate.",
    "Write a JavaScript function that debounces another function.",
    "What is a black hole?",
    "Outline a one-week study plan for learning basic statistics.",
    "Explain big-O notation with examples.",
    "Tell a short story about a robot who learns to paint.",
    "What is the role of mitochondria in a cell?",
)


def read_prompts(spec: str) -> list[list[dict]]:
    """Prompts for ``repq calib``: ``builtin``, a text file (one prompt per line) or JSONL
    (``prompt`` string, or ``messages`` ending with a user turn). Returns message lists.

    Raises:
        InputFileError: missing file, bad record, or no prompts.
    """
    if spec == "builtin":
        return [[{"role": "user", "content": p}] for p in BUILTIN_PROMPTS]
    p = Path(spec)
    if not p.is_file():
        raise InputFileError(f"{p}: no such prompts file (or use --prompts builtin)")
    out: list[list[dict]] = []
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for i, line in enumerate(read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{p}:{i}: not JSON ({e.msg})") from e
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                out.append([{"role": "user", "content": rec["prompt"]}])
            elif isinstance(rec, dict) and "messages" in rec:
                msgs = check_messages(rec["messages"], f"{p}:{i}")
                if msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]
                if not msgs:
                    raise InputFileError(f"{p}:{i}: no prompt left after dropping the assistant turn")
                out.append(msgs)
            else:
                raise InputFileError(f"{p}:{i}: expected a 'prompt' string or a 'messages' list")
    else:
        out = [[{"role": "user", "content": s.strip()}] for s in read_utf8(p).splitlines()
               if s.strip()]
    if not out:
        raise InputFileError(f"{p}: no prompts")
    return out


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``repq calib`` (self-generated calibration data)."""

    n: int = 32                 #: conversations to generate (prompts are cycled)
    max_tokens: int = 256       #: generated tokens per answer at most
    seed: int = 0               #: sampling seed (answer i uses seed + i)
    temperature: float = 0.0    #: 0 = greedy
    top_p: float = 0.95         #: nucleus sampling when temperature > 0
    n_ctx: int = 2048           #: context of the generating llama.cpp instance
    threads: int = 0            #: 0 = all cores

    def __post_init__(self):
        if self.n < 1 or self.max_tokens < 1:
            raise UsageError("--n and --max-tokens must be at least 1")
        if self.temperature < 0:
            raise UsageError("--temperature must be ≥ 0")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def generate_conversations(model_path: str | os.PathLike, prompts: list[list[dict]], cfg: GenerateConfig,
                           on_item=None) -> list[dict]:
    """The model answers ``prompts`` through its own chat template (llama.cpp, deterministic).

    Answer i is generated from prompt ``i % len(prompts)`` with sampling seed ``cfg.seed + i``
    (greedy when temperature is 0), so a run is reproducible and cycling prompts still varies.

    Returns:
        ``[{"messages": [..., {"role": "assistant", "content": answer}]}, ...]``

    Raises:
        UsageError: the model has no chat template.
    """
    from ..llama import llama_cpp

    with Tokenizer(model_path) as tok:
        if not tok.chat_template:
            raise UsageError(f"{model_path}: no chat template (tokenizer.chat_template); `repq calib` makes the "
                             "model answer prompts through it", hint="use plain text calibration data instead")
        prompt_tokens = [chat_tokens(tok, m, add_generation_prompt=True) for m in prompts]
    lc = llama_cpp()
    from ..ggml.quants import default_threads

    threads = cfg.threads or default_threads()
    llm = lc.Llama(str(model_path), n_ctx=cfg.n_ctx, n_threads=threads, n_threads_batch=threads,
                   seed=cfg.seed, verbose=False)
    out = []
    try:
        for i in range(cfg.n):
            msgs, toks = prompts[i % len(prompts)], prompt_tokens[i % len(prompts)]
            budget = min(cfg.max_tokens, cfg.n_ctx - len(toks))
            if budget < 1:
                raise UsageError(f"prompt {i % len(prompts) + 1} is {len(toks)} tokens, too long for n_ctx {cfg.n_ctx}")
            llm.reset()
            r = llm.create_completion([int(t) for t in toks], max_tokens=budget, temperature=cfg.temperature,
                                      top_p=cfg.top_p, top_k=0 if cfg.temperature > 0 else 40,
                                      seed=cfg.seed + i)
            answer = r["choices"][0]["text"].strip()
            out.append({"messages": [*msgs, {"role": "assistant", "content": answer}]})
            if on_item:
                on_item(i, cfg.n)
    finally:
        llm.close()
    return out
