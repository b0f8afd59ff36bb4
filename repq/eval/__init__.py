"""Evaluation in llama.cpp's own kernels: perplexity, KL divergence, speed.

Drivers (one per command):

* :mod:`repq.eval.ppl`     perplexity (``llama-perplexity``), optionally saving base logits.
* :mod:`repq.eval.kld`     KL divergence against base logits (``llama-perplexity --kl-divergence``).
* :mod:`repq.eval.bench`   ``llama-bench``'s pp/tg tokens-per-second method.
* :mod:`repq.eval.report`  several quantizations side by side (Markdown table, plot, cache).

What they share:

* :mod:`repq.eval.config`       :class:`~repq.eval.config.EvalConfig`, the run's settings.
* :mod:`repq.eval.session`      one model + context in llama.cpp, set up as llama-perplexity sets
  them up, and the capture of llama.cpp's log.
* :mod:`repq.eval.chunks`       the text cut into chunks and decoded, logits per chunk.
* :mod:`repq.eval.logits_file`  the ``--kl-divergence-base`` file format (rows, reader, writer).
* :mod:`repq.eval.scoring`      the arithmetic: per-token nll and KLD, sums, statistics, printed lines.
* :mod:`repq.eval.pool`         the scoring threads, and the allocator setting for the entry point.

Every number is computed with the float/double arithmetic llama-perplexity uses, so the printed
values are equal to llama-perplexity's on the same files, text and settings.
"""
