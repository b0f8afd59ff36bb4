#!/usr/bin/env bash
# GPU machine: which llama-cpp-python entry points work on the device machine (each probe in its own
# process, with faulthandler, so one crash does not hide the others).
export PYTHONPATH=/tmp/site:$PWD LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
M=${1:-/tmp/smoke/m.gguf}
probe() { echo "== $1"; timeout 120 python3 -c "$2" 2>&1 | grep -v '^llama_\|^load\|^print_info\|^\.\.\.' | tail -8; echo "rc=${PIPESTATUS[0]}"; }
probe import "import llama_cpp as l; print(l.__file__); print(l.llama_print_system_info().decode()[:200])"
probe vocab_only "import llama_cpp as l; m=l.Llama(model_path='$M', vocab_only=True, verbose=False); print('ok', m.n_vocab())"
probe vocab_verbose "import llama_cpp as l; m=l.Llama(model_path='$M', vocab_only=True, verbose=True); print('ok')"
probe tokenizer "from repq.data.tokenizer import Tokenizer; t=Tokenizer('$M'); print(t.tokenize('hello the world')[:8]); t.close(); print('closed')"
probe full "import llama_cpp as l; m=l.Llama(model_path='$M', n_ctx=128, verbose=False, n_threads=4); print(m.tokenize(b'the cat')); m.eval(m.tokenize(b'the cat')); print('eval ok')"
probe ppl "import sys; sys.argv=['repq','ppl','$M','--data','/tmp/smoke/d.txt','-c','64','--chunks','4','-t','4']; from repq.cli import app; app()"
