"""Data on the way to the model: text and chats → llama.cpp tokens → chunks, and self-generated data.

* :mod:`.tokenizer`: llama.cpp's tokenizer and how its tools read a text file (one rule for
  calibration and evaluation).
* :mod:`.chat`: conversations through the model's own chat template.
* :mod:`.jsonl`: JSONL records (``text`` or chat ``messages``), read and written.
* :mod:`.calibration`: files → token chunks as llama-imatrix makes them; pre-tokenized chunks
  (``repq tokenize``).
* :mod:`.selfgen`: ``repq calib``, the model answering prompts through its template.
"""
