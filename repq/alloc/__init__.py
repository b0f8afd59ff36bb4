"""Automatic bit allocation to a size target (issue 15): per-tensor sensitivities
(:mod:`repq.alloc.sensitivity`), the knapsack solver (:mod:`repq.alloc.solver`) and the chosen mix as
plans and llama-quantize recipes (:mod:`repq.alloc.recipe`)."""
