"""repq: higher-quality llama.cpp GGUF quantization, measured in llama.cpp's own kernels.

Importing this package has no side effects: native libraries load lazily on first use.
"""

__version__ = "0.1.0"
