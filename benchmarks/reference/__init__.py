"""The project's own small trained reference model (no weights can be downloaded here).

A byte-level Llama (4 layers, width 128, GQA 8 query / 2 KV heads of 32, RoPE base 10000)
trained on Python standard-library text and RULER-style long-context tasks, so that every
``sparse_attn`` estimator can be evaluated on learned attention:

* ``tasks``: seeded byte-level instances (text, multi-query associative recall, needles,
  variable tracking, common words) with loss masks and answer spans.
* ``attention``: blockwise causal attention (masked blocks cost nothing) and the training
  forward of ``models.Llama`` that uses it.
* ``evaluation``: per-task teacher-forced exact match on fixed held-out instances.
* ``export``: a ``models.Llama`` -> Hugging Face folder (``models.load_hf`` loads it).
* ``train``: the seeded, resumable training script
  (``python -m benchmarks.reference.train --out DIR [--minutes N] [--resume]``).

Committed runs live in ``benchmarks/reference/runs/<name>/`` (``hf/`` and ``train_log.jsonl``).
"""
