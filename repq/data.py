"""Calibration data: text → llama.cpp tokens → chunks of n_ctx, exactly as llama-imatrix makes them.

Inputs:

* a plain text file: one document (a trailing newline is dropped, as llama.cpp's ``-f`` does);
* JSONL: one document per line, ``{"text": "..."}`` or a chat ``{"messages": [{"role", "content"}...]}``
  rendered with the model's own chat template (GGUF ``tokenizer.chat_template``, through jinja2).

Tokenization is llama.cpp's (``llama_tokenize`` on the GGUF's vocabulary, loaded vocab-only), with
``add_special`` (BOS when the model adds one) like ``common_tokenize(ctx, text, true, false)``;
rendered chats are tokenized with ``parse_special`` so that ``<|im_start|>`` is one token.

Chunking (tools/imatrix/imatrix.cpp ``compute_imatrix``)::

    tokens = tokenize(whole text)                     # JSONL: documents tokenized one by one, concatenated
    n_chunk = min(--chunks, len(tokens) // n_ctx)     # the tail that does not fill a chunk is dropped
    chunk i = tokens[i·n_ctx : (i+1)·n_ctx], with chunk[0] := BOS when the vocabulary adds BOS

Every chunk is evaluated as an independent sequence (KV cache cleared), positions 0..n_ctx-1.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import InputFileError, MismatchError, UsageError

# --------------------------------------------------------------------------------------------------
# llama.cpp's tokenizer
# --------------------------------------------------------------------------------------------------

class Tokenizer:
    """The vocabulary of a GGUF, loaded vocab-only into libllama (no weights)."""

    def __init__(self, gguf_path: str | os.PathLike):
        from .io.gguf_file import GGUFModel
        from .llama import llama_cpp

        self.path = Path(gguf_path)
        with GGUFModel(self.path) as g:  # also validates the file before libllama sees it
            self.chat_template: str | None = g.get("tokenizer.chat_template")
            if g.get("tokenizer.ggml.model") is None:
                raise InputFileError(f"{self.path}: no tokenizer in this GGUF (tokenizer.ggml.model missing)")
        self._lc = lc = llama_cpp()
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        # Through the high-level class: building llama_model_params by hand from
        # llama_model_default_params() segfaults with the CUDA build (seen on an H100).
        try:
            self._llm = lc.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise InputFileError(f"{self.path}: llama.cpp could not load this model's vocabulary ({e})") from e
        self._model = self._llm._model.model
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(lc.llama_vocab_bos(self._vocab))
        self.eos = int(lc.llama_vocab_eos(self._vocab))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """``common_tokenize``: int32 token ids of ``text``."""
        lc, raw = self._lc, text.encode("utf-8")
        n_max = len(raw) + 2 * int(add_special)
        for _ in range(2):
            buf = np.empty(max(n_max, 1), dtype=np.int32)
            n = lc.llama_tokenize(self._vocab, raw, len(raw), buf.ctypes.data_as(ctypes.POINTER(lc.llama_token)),
                                  n_max, add_special, parse_special)
            if n >= 0:
                return buf[:n].copy()
            n_max = -n
        raise InputFileError("llama_tokenize failed")  # pragma: no cover

    def token_text(self, token: int) -> str:
        t = self._lc.llama_vocab_get_text(self._vocab, token)
        return t.decode("utf-8", errors="replace") if t else ""

    def close(self) -> None:
        if getattr(self, "_llm", None) is not None:
            self._llm.close()  # frees the model once (llama-cpp-python owns it)
            self._llm = None
            self._model = None

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------------

def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with a Hugging Face / GGUF chat template (jinja2, sandboxed).

    The environment is the one transformers uses (``trim_blocks``, ``lstrip_blocks``,
    ``raise_exception``, ``strftime_now``, a non-ASCII-escaping ``tojson``).

    Raises:
        UsageError: the template fails to render these messages.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"chat template failed: {e}") from e


def chat_tokens(tok: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                where: str = "") -> np.ndarray:
    """Tokens of a conversation rendered with the model's template (special tokens parsed).

    BOS is added only when the vocabulary adds one and the template did not already write it.

    Raises:
        UsageError: the model has no chat template.
    """
    if not tok.chat_template:
        raise UsageError(f"{where or tok.path}: chat messages need a chat template, and {tok.path} has none "
                         "(no tokenizer.chat_template)", hint="use {\"text\": ...} records or plain text instead")
    bos_text = tok.token_text(tok.bos) if tok.bos >= 0 else ""
    text = render_chat(tok.chat_template, messages, bos_token=bos_text, eos_token=tok.token_text(tok.eos),
                       add_generation_prompt=add_generation_prompt)
    add_special = not (bos_text and text.startswith(bos_text))
    return tok.tokenize(text, add_special=add_special, parse_special=True)


# --------------------------------------------------------------------------------------------------
# documents → tokens → chunks
# --------------------------------------------------------------------------------------------------

def _check_messages(msgs, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise InputFileError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return msgs


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, each with a ``text`` string or a ``messages`` list.

    Raises:
        InputFileError: a line is not JSON, or has neither field.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{where}: not JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise InputFileError(f"{where}: expected an object with 'text' or 'messages'")
            if isinstance(rec.get("text"), str):
                out.append({"text": rec["text"]})
            elif "messages" in rec:
                out.append({"messages": _check_messages(rec["messages"], where)})
            else:
                raise InputFileError(f"{where}: expected a 'text' string or a 'messages' list")
    return out


def tokenize_file(path: str | os.PathLike, tok: Tokenizer) -> np.ndarray:
    """All tokens of a calibration file (plain text or JSONL), int32.

    Raises:
        InputFileError: unreadable or malformed file.
        UsageError: chat records for a model without a chat template.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such data file")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        parts = []
        for i, rec in enumerate(read_jsonl(p), 1):
            if "text" in rec:
                parts.append(tok.tokenize(rec["text"]))
            else:
                parts.append(chat_tokens(tok, rec["messages"], where=f"{p}:{i}"))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{p}: not UTF-8 text (byte {e.start})") from e
    if text.endswith("\n"):  # llama.cpp's -f drops one trailing newline
        text = text[:-1]
    return tok.tokenize(text)


def make_chunks(tokens: np.ndarray, n_ctx: int, n_chunks: int | None, bos: int | None) -> np.ndarray:
    """(n_chunk, n_ctx) int64 chunks, llama-imatrix's way (BOS over each chunk's first token)."""
    n = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks >= 0:
        n = min(n, n_chunks)
    chunks = np.asarray(tokens[: n * n_ctx], dtype=np.int64).reshape(n, n_ctx).copy()
    if bos is not None and n:
        chunks[:, 0] = bos
    return chunks


@dataclass
class Calibration:
    """Token chunks ready for the model, and how to name them in output metadata."""

    chunks: np.ndarray   #: (n_chunk, n_ctx) int64
    dataset: str         #: the data path as given (llama-imatrix's imatrix.datasets entry)
    n_tokens_file: int   #: tokens in the whole file

    @property
    def n_ctx(self) -> int:
        return int(self.chunks.shape[1])

    @property
    def fingerprint(self) -> str:
        """sha256 of n_ctx and the chunk tokens: names the data whatever file it came from."""
        h = hashlib.sha256(f"n_ctx={self.n_ctx};".encode())
        h.update(self.chunks.astype("<i4").tobytes())
        return h.hexdigest()


def load_calibration_with(path: str | os.PathLike, gguf_path: str | os.PathLike, *, n_ctx: int = 512,
                          n_chunks: int | None = None) -> tuple[Calibration, int]:
    """:func:`load_calibration` with llama.cpp's tokenizer of ``gguf_path``: (calibration, the
    tokenizer's vocabulary size)."""
    with Tokenizer(gguf_path) as tok:
        return load_calibration(path, tok, n_ctx=n_ctx, n_chunks=n_chunks), tok.n_vocab


def load_calibration(path: str | os.PathLike, tok: Tokenizer, *, n_ctx: int = 512,
                     n_chunks: int | None = None) -> Calibration:
    """Tokenize and chunk a calibration file.

    Raises:
        UsageError: the data holds no full chunk, or ``n_ctx`` < 16 (llama-imatrix ignores
            matrix products of fewer than 16 rows).
    """
    if n_ctx < 16:
        raise UsageError(f"-c/--ctx-size {n_ctx}: must be at least 16")
    if n_chunks is not None and n_chunks == 0:
        raise UsageError("--chunks 0: nothing to do")
    tokens = tokenize_file(path, tok)
    chunks = make_chunks(tokens, n_ctx, n_chunks, tok.bos if tok.add_bos else None)
    if len(chunks) == 0:
        raise UsageError(f"{path}: {len(tokens)} tokens, too short for one chunk of {n_ctx}",
                         hint="give more text or a smaller -c/--ctx-size")
    return Calibration(chunks, str(path), int(len(tokens)))


# --------------------------------------------------------------------------------------------------
# self-generated data (`repq calib`)
# --------------------------------------------------------------------------------------------------

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
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{p}:{i}: not JSON ({e.msg})") from e
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                out.append([{"role": "user", "content": rec["prompt"]}])
            elif isinstance(rec, dict) and "messages" in rec:
                msgs = _check_messages(rec["messages"], f"{p}:{i}")
                if msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]
                if not msgs:
                    raise InputFileError(f"{p}:{i}: no prompt left after dropping the assistant turn")
                out.append(msgs)
            else:
                raise InputFileError(f"{p}:{i}: expected a 'prompt' string or a 'messages' list")
    else:
        out = [[{"role": "user", "content": s.strip()}] for s in p.read_text(encoding="utf-8").splitlines()
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
    from .llama import llama_cpp

    with Tokenizer(model_path) as tok:
        if not tok.chat_template:
            raise UsageError(f"{model_path}: no chat template (tokenizer.chat_template); `repq calib` makes the "
                             "model answer prompts through it", hint="use plain text calibration data instead")
        prompt_tokens = [chat_tokens(tok, m, add_generation_prompt=True) for m in prompts]
    lc = llama_cpp()
    from .ggml.quants import default_threads

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


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records as JSONL atomically (temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# a tiny vocabulary (tests and synthetic models)
# --------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_vocab_kv(*, chat_template: bool = True, add_bos: bool = True) -> list[tuple[str, int, object, int | None]]:
    """GGUF tokenizer keys of a byte-level GPT-2 BPE vocabulary: 256 byte tokens, three merges,
    then ``<|endoftext|>`` (BOS/EOS), ``<|im_start|>``, ``<|im_end|>``: 262 tokens in all.

    Enough for llama.cpp to load and tokenize with a tiny synthetic model (pass to
    :func:`repq.model.save_gguf`); not meant to compress text.
    """
    from .io import gguf_file as G

    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = {b: b for b in keep}, 0
    for b in range(256):
        if b not in cs:
            cs[b] = 256 + n
            n += 1
    tokens = [chr(cs[b]) for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 259 + [3, 3, 3]
    kv = [("tokenizer.ggml.model", G.STRING, "gpt2", None), ("tokenizer.ggml.pre", G.STRING, "default", None),
          ("tokenizer.ggml.tokens", G.ARRAY, tokens, G.STRING),
          ("tokenizer.ggml.token_type", G.ARRAY, types, G.INT32),
          ("tokenizer.ggml.merges", G.ARRAY, ["Ġ t", "h e", "Ġt he"], G.STRING),
          ("tokenizer.ggml.bos_token_id", G.UINT32, 259, None), ("tokenizer.ggml.eos_token_id", G.UINT32, 261, None),
          ("tokenizer.ggml.add_bos_token", G.BOOL, add_bos, None)]
    if chat_template:
        kv.append(("tokenizer.chat_template", G.STRING, CHATML_TEMPLATE, None))
    return kv


# --------------------------------------------------------------------------------------------------
# pre-tokenized chunks (`repq tokenize`)
# --------------------------------------------------------------------------------------------------

def save_token_chunks(path: str | os.PathLike, cal: Calibration) -> None:
    """Write ``cal.chunks`` as a 2-D int32 ``.npy`` (atomically)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, cal.chunks.astype(np.int32), allow_pickle=False)
    os.replace(tmp, p)


def load_token_chunks(path: str | os.PathLike, *, n_ctx: int, n_vocab: int, n_chunks: int | None = None) -> Calibration:
    """Chunks written by ``repq tokenize`` (no tokenizer needed: llama.cpp's ran when they were made).

    Raises:
        InputFileError: not a 2-D integer .npy.
        UsageError: another chunk length, or no chunk.
        MismatchError: token ids outside the model's vocabulary (tokens of another model).
    """
    p = Path(path)
    try:
        a = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputFileError(f"{p}: not a readable .npy of token chunks ({e})") from None
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise InputFileError(f"{p}: expected a 2-D integer array of token chunks (from `repq tokenize`), "
                             f"got {a.dtype} {a.shape}")
    if a.shape[1] != n_ctx:
        raise UsageError(f"{p}: chunks of {a.shape[1]} tokens, this run uses {n_ctx}",
                         hint=f"pass -c {a.shape[1]}, or tokenize the text again with -c {n_ctx}")
    if n_chunks is not None:
        a = a[:n_chunks]
    if len(a) == 0:
        raise UsageError(f"{p}: no token chunks")
    if a.min() < 0 or a.max() >= n_vocab:
        raise MismatchError(f"{p}: token ids up to {int(a.max())} for a vocabulary of {n_vocab} "
                            "(tokens of another model?)")
    return Calibration(a.astype(np.int64), str(p), int(a.size))
