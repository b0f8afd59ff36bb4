#!/usr/bin/env bash
# GPU machine (after setup.sh): where llama-cpp-python crashes on these machines.  Loads a tiny random
# model through llama_cpp with a SIGSEGV backtrace preloaded (segv_trace.c) and symbolises the
# libllama / libggml frames with addr2line.
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1
M=/tmp/trace/m.gguf; mkdir -p /tmp/trace
python3 - <<'PY'
import torch
from repq.model.config import ModelConfig
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
cfg = ModelConfig(arch="llama", n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262, tied=True)
save_gguf(random_model(cfg, seed=1), "/tmp/trace/m.gguf", kv=byte_vocab_kv())
PY
gcc -shared -fPIC -O1 -o /tmp/segv_trace.so benchmarks/gpu/segv_trace.c
python3 --version; ls /usr/bin/python3* 2>/dev/null | tr '\n' ' '; echo; which gdb addr2line
python3 -c "import ctypes, sys; print('libffi', ctypes.__file__, sys.version)"
ldd native/build/bin/libllama.so | grep -E "ggml|llama|std|gomp"
for verbose in True False; do
  LD_PRELOAD=/tmp/segv_trace.so python3 -X faulthandler -c "
import llama_cpp as l
print('lib', l.llama_cpp._lib, flush=True)
m = l.Llama(model_path='$M', n_ctx=64, verbose=$verbose, n_threads=2)
print('loaded ok', m.n_vocab())" > /tmp/trace/out.txt 2>&1
  echo "== verbose=$verbose rc=$?"; grep -v "^llama_model_loader: - \|^print_info" /tmp/trace/out.txt | tail -45
  grep -o '/[^ ]*\.so[^(]*([^)]*)' /tmp/trace/out.txt | grep -E "llama|ggml" | while read -r f; do
    lib=${f%%(*}; off=${f##*(}; off=${off%)}
    case $off in +*) echo "$f -> $(addr2line -f -C -e "$lib" "${off#+}" | tr '\n' ' ')";; *) echo "$f";; esac
  done
done
# which libraries export C++ standard-library symbols, and workarounds, each in its own process
for lib in native/build/bin/libggml*.so.0 native/build/bin/libllama.so; do
  echo "$lib: $(nm -D --defined-only "$lib" | grep -c ' _ZNSt\| _ZNKSt\| _ZTVSt\| _ZTSSt') std:: symbols exported"
done
g++ --version | head -1; locale 2>/dev/null | head -3
try() { echo "== $1"; env $2 python3 -c "$3
import llama_cpp as l
m = l.Llama(model_path='$M', n_ctx=64, verbose=False, n_threads=2)
print('loaded ok', m.n_vocab())" 2>&1 | tail -2; }
try "LD_PRELOAD libstdc++" "LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)" ""
try "RTLD_GLOBAL libstdc++ first" "" "import ctypes; ctypes.CDLL('libstdc++.so.6', mode=ctypes.RTLD_GLOBAL)"
try "LC_ALL=C PYTHONCOERCECLOCALE=0" "LC_ALL=C PYTHONCOERCECLOCALE=0" ""
try "setlocale C" "" "import locale; locale.setlocale(locale.LC_ALL, 'C')"
try "RTLD_GLOBAL libggml first" "" "import ctypes; ctypes.CDLL('$PWD/native/build/bin/libggml.so', mode=ctypes.RTLD_GLOBAL)"
