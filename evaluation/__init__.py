"""icl-ser evaluation: what train.py, eval.py and bench/ need to score models, never the model itself.

* :mod:`evaluation.episodic` - episodes -> model inputs (cached encoder features or audio
  paths) and per-episode label probabilities (``predict_episodes``); shared by train.py's
  validation and eval.py.
* :mod:`evaluation.metrics` - UA, WA and macro-F1 (an ``evaluate`` metric), bootstrap and
  paired confidence intervals, per-speaker UA.
* :mod:`evaluation.baselines` - the conventional (non-ICL) methods on pooled frozen-encoder
  features: speaker-independent, speaker-normalized, fine-tuned, prototypes, speaker embedding.

Layers, each importing only the ones below it::

    bench/  ->  train.py / eval.py  ->  evaluation  ->  dataset_builder  ->  modeling_icl_ser

``modeling_icl_ser`` holds only what a Hub checkpoint loads (tests/test_layout.py checks the
imports). The submodules are imported by name; this package imports nothing eagerly.
"""
