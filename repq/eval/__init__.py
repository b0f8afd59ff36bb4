"""Evaluation in llama.cpp's own kernels: perplexity, KL divergence, speed.

* :mod:`repq.eval.ppl`    one model + context set up as ``llama-perplexity`` sets them up
  (:class:`~repq.eval.ppl.Session`), the chunked evaluation loop, and perplexity.
* :mod:`repq.eval.kld`    the ``--kl-divergence-base`` file format and every statistic
  ``llama-perplexity --kl-divergence`` prints.
* :mod:`repq.eval.bench`  ``llama-bench``'s pp/tg tokens-per-second method.
* :mod:`repq.eval.report` several quantizations side by side (Markdown table, plot, cache).

Every number is computed with the float/double arithmetic llama-perplexity uses, so the printed
values are equal to llama-perplexity's on the same files, text and settings.
"""
