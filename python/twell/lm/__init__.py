"""The NumPy reference LM: a small byte-level transformer trained with the L1 recipe on the CPU.

* ``twell.lm.model``    the model (pre-norm, Llama-like FFN, ReLU gate), forward and backward
* ``twell.lm.train``    training with the L1 term, checkpoints and ``twell train-ref``
* ``twell.lm.corpus``   the built-in corpus (standard-library source) and text files
* ``twell.lm.sparsity`` activity instruments (per-token counts, TwELL tile overflow, dead neurons)
* ``twell.lm.demo``     ``twell demo``: with and without L1, and a check of the kernels on a GPU

Pure NumPy: it needs neither a GPU nor the compiled library. See docs/reference_model.md.
"""
