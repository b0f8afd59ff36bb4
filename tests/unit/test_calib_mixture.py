"""`repq calib`: the self-generated mixture on a tiny synthetic model (seconds, CPU).

Oracles: the calibration loader's own token count (tokenize_file), the answers of one sequence at a
time (batched decoding must not change them; --free's texts are those of the start-of-document prompt), a softmax computed here (the sampler), exact
re-runs (determinism), and the refusal rules for bad input (exit 2, no output).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from support.models import random_model, save_gguf
from support.vocab import CHATML_TEMPLATE, byte_vocab_kv
from typer.testing import CliRunner

from repq.cli import app
from repq.data.calibration import tokenize_file
from repq.data.chat import chat_tokens, render_chat
from repq.data.mixture import build_mixture, document_start, parse_mix
from repq.data.prompt_set import builtin_prompts
from repq.data.selfgen import GenerateConfig, generate_answers, read_prompts, sample_token
from repq.data.tokenizer import Tokenizer
from repq.errors import UsageError
from repq.model.config import ModelConfig
from repq.paths import native_dir

pytestmark = pytest.mark.skipif(not (native_dir() / "libllama.so").exists(),
                                reason="native build missing: run `make native`")

CFG = ModelConfig(arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262,
                  rms_eps=1e-5, rope_base=10000.0, tied=True)

#: Chat templates of the common families, written here in their published shape.
TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
}
MARKERS = {"chatml": "<|im_start|>assistant", "llama3": "<|start_header_id|>assistant", "mistral": "[/INST]",
           "gemma": "<start_of_turn>model"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from repq.io import gguf_file as G

    d = tmp_path_factory.mktemp("mixture")
    model = random_model(CFG, seed=3)
    out = {}
    for name, tpl in TEMPLATES.items():
        kv = byte_vocab_kv(chat_template=False) + [("tokenizer.chat_template", G.STRING, tpl, None)]
        save_gguf(model, d / f"{name}.gguf", kv=kv)
        out[name] = d / f"{name}.gguf"
    save_gguf(model, d / "plain.gguf", kv=byte_vocab_kv(chat_template=False))
    out["plain"] = d / "plain.gguf"
    paras = [f"Paragraph {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(30)) for i in range(60)]
    (d / "notes.txt").write_text("\n\n".join(paras + paras[:10]) + "\n")   # 10 exact repeats
    out["notes"] = d / "notes.txt"
    return out


def invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if "--json" in args and r.exit_code == 0 else None)


SMALL = ["--max-tokens", 12, "-c", 1024, "--parallel", 4]


def test_prompt_set_is_varied_and_fixed():
    ps = builtin_prompts()
    assert ps == builtin_prompts() and len({p.text for p in ps}) == len(ps) > 500
    cats = Counter(p.category for p in ps)
    assert set(cats) == {"knowledge", "code", "math", "reasoning", "writing", "chat", "rewrite", "multilingual"}
    first = Counter(p.category for p in ps[:40])      # every prefix mixes the categories
    assert len(first) == len(cats)
    assert any("\u4e00" <= ch <= "\u9fff" for p in ps for ch in p.text)   # not English only


def test_sampler_matches_softmax_and_respects_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    greedy = GenerateConfig(temperature=0)
    assert sample_token(logits, greedy, rng) == 0
    full = GenerateConfig(temperature=0.7, top_k=0, top_p=1.0)
    n = 40000
    freq = np.bincount([sample_token(logits, full, rng) for _ in range(n)], minlength=6) / n
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / n)
    k2 = GenerateConfig(temperature=1.0, top_k=2, top_p=1.0)
    assert {sample_token(logits, k2, rng) for _ in range(500)} == {0, 1}
    # top-p 0.7 keeps the smallest prefix whose probability reaches 0.7: tokens 0 and 1 (0.54, 0.74)
    p1 = np.exp(logits) / np.exp(logits).sum()
    assert p1[0] < 0.7 <= p1[:2].sum()
    nuc = GenerateConfig(temperature=1.0, top_k=0, top_p=0.7)
    assert {sample_token(logits, nuc, rng) for _ in range(500)} == {0, 1}


def test_batched_decoding_gives_the_answers_of_one_sequence_at_a_time(models):
    with Tokenizer(models["chatml"]) as tok:
        pt = [chat_tokens(tok, m, add_generation_prompt=True) for _, m in read_prompts("builtin")[:5]]
    def first(n, **kw):
        cfg = GenerateConfig(max_tokens=10, n_ctx=128, **kw)
        gen = generate_answers(models["chatml"], pt, cfg)
        out = [next(gen) for _ in range(n)]
        gen.close()
        return out
    one = first(9, parallel=1, temperature=0.9, seed=4)
    many = first(9, parallel=4, temperature=0.9, seed=4)
    assert [i for i, _, _ in many] == list(range(9))
    assert [t for _, t, _ in one] == [t for _, t, _ in many]
    assert len({tuple(t) for _, t, _ in one}) > 1
    # end=7: the generator ends after answers 0..6 (unbounded, it never ends), equal to the unbounded run's
    bounded = list(generate_answers(models["chatml"], pt, GenerateConfig(max_tokens=10, n_ctx=128, parallel=4,
                                                                         temperature=0.9, seed=4), end=7))
    assert [(i, t) for i, t, _ in bounded] == [(i, t) for i, t, _ in many[:7]]


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_mixture_budget_determinism_and_template(models, tmp_path, template):
    args = ["calib", models[template], "--tokens", 1500, "--seed", 7, *SMALL, "--json"]
    r1, j = invoke(*args, "-o", tmp_path / "a.jsonl")
    assert r1.exit_code == 0, r1.output
    a = (tmp_path / "a.jsonl").read_text()
    if template == "chatml":
        invoke(*args, "-o", tmp_path / "b.jsonl")
        assert a == (tmp_path / "b.jsonl").read_text()                 # deterministic for a seed
        invoke(*args[:-1], "--seed", 8, "-o", tmp_path / "c.jsonl")
        assert (tmp_path / "c.jsonl").read_text() != a
    recs = [json.loads(line) for line in a.splitlines()]
    with Tokenizer(models[template]) as tok:
        n = [len(chat_tokens(tok, r["messages"])) for r in recs]
        rendered = render_chat(tok.chat_template, recs[0]["messages"])
        n_loader = len(tokenize_file(tmp_path / "a.jsonl", tok))
    assert MARKERS[template] in rendered
    assert j["tokens"] == sum(n) == n_loader
    assert 1500 <= j["tokens"] < 1500 + max(n)                          # budget, overshoot < one record
    assert len({json.dumps(r["messages"]) for r in recs}) == len(recs)  # no exact repeats
    assert {r["source"].split(":")[0] for r in recs} == {"selfgen"}


def test_mix_share_and_dedup_of_text(models, tmp_path):
    r, j = invoke("calib", models["chatml"], "-o", tmp_path / "m.jsonl", "--tokens", 3000,
                  "--mix", f"{models['notes']}:0.4", *SMALL, "--json")
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    texts = [x for x in recs if "text" in x]
    assert len({x["text"] for x in texts}) == len(texts)
    with Tokenizer(models["chatml"]) as tok:
        mix_tokens = sum(len(tok.tokenize(x["text"])) for x in texts)
        biggest = max(len(tok.tokenize(x["text"])) for x in texts)
    assert j["by_source"]["mix:notes.txt"]["tokens"] == mix_tokens
    assert 1200 <= mix_tokens < 1200 + biggest
    assert 3000 <= j["tokens"]
    kinds = ["text" in x for x in recs]                                  # shuffled, not two blocks
    assert sum(a != b for a, b in zip(kinds, kinds[1:], strict=False)) > 2


def test_greedy_repeats_are_dropped_and_an_unreachable_budget_is_refused(models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say something.\nName a colour.\n")
    cfg = GenerateConfig(max_tokens=8, n_ctx=64, parallel=2, temperature=0)
    plist = read_prompts(str(prompts))
    recs, st = build_mixture(models["chatml"], plist, cfg, 60)
    assert len(recs) <= 2 and st.duplicates_dropped == 0
    with pytest.raises(UsageError, match="out of reach"):
        build_mixture(models["chatml"], plist, cfg, 10_000)
    out = tmp_path / "g.jsonl"
    r, _ = invoke("calib", models["chatml"], "-o", out, "--prompts", prompts, "--temperature", 0,
                  "--tokens", 10_000, *SMALL)
    assert r.exit_code == 2 and "out of reach" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_free_text_share_source_and_oracle(tmp_path):
    # untied: a tied random model answers the start of a document (<|endoftext|>, an end of generation
    # too) with the same token, so every free text would be empty
    m = tmp_path / "untied.gguf"
    save_gguf(random_model(dataclasses.replace(CFG, tied=False), seed=3), m, kv=byte_vocab_kv())
    args = ["calib", m, "--tokens", 2500, "--free", 0.4, "--seed", 5, *SMALL, "--json"]
    r, j = invoke(*args, "-o", tmp_path / "f.jsonl")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "f.jsonl").read_text()
    invoke(*args, "-o", tmp_path / "g.jsonl")
    assert (tmp_path / "g.jsonl").read_text() == text                   # deterministic for a seed
    recs = [json.loads(line) for line in text.splitlines()]
    free = [x for x in recs if x["source"] == "selfgen:free"]
    assert free and all(set(x) == {"text", "source"} and x["text"] for x in free)
    assert {x["source"].split(":")[0] for x in recs} == {"selfgen"} and any("messages" in x for x in recs)
    with Tokenizer(m) as tok:
        n_free = [len(tok.tokenize(x["text"])) for x in free]
        start = document_start(tok)
        n_loader = len(tokenize_file(tmp_path / "f.jsonl", tok))
    assert j["by_source"]["selfgen:free"]["tokens"] == sum(n_free)
    assert 1000 <= sum(n_free) < 1000 + max(n_free)                      # its share, overshoot < one record
    assert j["tokens"] == n_loader and j["config"]["free"] == 0.4
    # the oracle: the same sampler continuing the start of a document, one answer at a time
    gen = generate_answers(m, [np.asarray(start, np.int32)],
                           GenerateConfig(max_tokens=12, n_ctx=1024, parallel=1, seed=5))
    direct = {t.decode("utf-8", "replace").strip() for _, _, t in (next(gen) for _ in range(len(free) + 20))}
    gen.close()
    assert {x["text"] for x in free} <= direct


def test_free_and_mix_alone_need_no_chat_template(models, tmp_path):
    m = tmp_path / "plain-untied.gguf"
    save_gguf(random_model(dataclasses.replace(CFG, tied=False), seed=3), m, kv=byte_vocab_kv(chat_template=False))
    r, j = invoke("calib", m, "-o", tmp_path / "t.jsonl", "--tokens", 1500, "--free", 0.5, "--mix",
                  f"{models['notes']}:0.5", *SMALL, "--json")
    assert r.exit_code == 0, r.output
    assert set(j["by_source"]) == {"selfgen:free", "mix:notes.txt"}
    assert all("text" in json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines())


def test_document_start_follows_the_vocabulary(tmp_path):
    from repq.io import gguf_file as G

    model = random_model(CFG, seed=3)
    starts = {}
    for add_bos in (True, False):   # BOS is <|im_start|> (260) here: with add_bos False, <|endoftext|> (259) wins
        kv = [(k, t, 260 if k == "tokenizer.ggml.bos_token_id" else v, s)
              for k, t, v, s in byte_vocab_kv(chat_template=False, add_bos=add_bos)]
        save_gguf(model, tmp_path / f"m{add_bos}.gguf", kv=kv + [("tokenizer.chat_template", G.STRING, CHATML_TEMPLATE, None)])
        with Tokenizer(tmp_path / f"m{add_bos}.gguf") as tok:
            starts[add_bos] = document_start(tok)
    assert starts == {True: [260], False: [259]}


@pytest.mark.parametrize("extra, message", [
    (["--free", "1.2"], "share between 0 and 1"),
    (["--free", "-0.1"], "share between 0 and 1"),
    (["--free", "0.6", "--mix", "NOTES:0.5"], "add up to 1.1"),
    (["--mix", "NOTES:1.5"], "weight between 0 and 1"),
    (["--mix", "NOTES:0"], "weight between 0 and 1"),
    (["--mix", "NOTES"], "expected FILE:WEIGHT"),
    (["--mix", "NOTES:0.6", "--mix", "NOTES:0.5"], "add up to 1.1"),
    (["--mix", "missing.txt:0.3"], "missing.txt: no such file"),
    (["--mix", "NOTES:0.9", "--tokens", 100000], "tokens of distinct text"),
    (["--prompts", "EMPTY"], "no prompts"),
    (["--prompts", "BADJSONL"], "not JSON"),
])
def test_bad_input_exit_2_no_output(models, tmp_path, extra, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    subst = {"NOTES": str(models["notes"]), "EMPTY": str(tmp_path / "empty.txt"),
             "BADJSONL": str(tmp_path / "bad.jsonl")}
    extra = [subst.get(str(a).split(":")[0], str(a).split(":")[0]) + (":" + str(a).split(":", 1)[1] if ":" in str(a) else "")
             if str(a).split(":")[0] in subst else a for a in extra]
    out = tmp_path / "o.jsonl"
    r, _ = invoke("calib", models["chatml"], "-o", out, *SMALL, *(["--tokens", 500] if "--tokens" not in extra else []),
                  *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_no_chat_template_is_refused(models, tmp_path):
    r, _ = invoke("calib", models["plain"], "-o", tmp_path / "o.jsonl", "--tokens", 100)
    assert r.exit_code == 2 and "no chat template" in r.output


def test_parse_mix():
    m = parse_mix("dir:with:colons/file.txt:0.25")
    assert m.path == Path("dir:with:colons/file.txt") and m.weight == 0.25
