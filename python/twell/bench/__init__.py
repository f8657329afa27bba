"""Benchmark drivers (each times twell against a dense baseline on the same shapes and keeps JSON,
Markdown and plots):

* ``twell.bench.ffn``     ``twell bench``: runs the CUDA program bench_ffn (inference vs cuBLASLt)
* ``twell.bench.train``   ``twell bench-train``: training steps vs PyTorch bf16 autograd
* ``twell.bench.pytorch`` ``twell bench-torch``: ``twell.torch`` as PyTorch users call it
* ``twell.bench.model``   ``twell bench-model``: a Llama trained and served dense and through twell

Methodology and field meanings: bench/README.md.
"""
