"""Evaluation: which text encoder to use, how well a model follows prompts, and a report.

One concern per file:

    detector.py            objects in a generated scene image, scored against GenEval-style clauses
    benchmark.py           the compositional benchmark: prompts per task, a steps-vs-quality sweep
    sampling.py            batched, seeded generation (benchmark and exports); latent models decoded by their VAE
    encoders.py            text-encoder selection: every candidate scored, the decision
    encoder_config.py      its config: candidates, baselines, metric data, selection thresholds
    encoder_candidates.py  the candidates and baselines behind one encode interface
    discriminability.py    whether an encoding tells prompts apart (caption retrieval)
    disentanglement.py     how an encoding changes when words, phrases or sentences go away
    scene_truth.py         a generated scene's facts (ground-truth similarity) and long description
    encoder_table.py       the markdown table of the result and the decision
    baselines.py           reference encoders for that ranking (hashed bag of words, random init)
    backbone.py            a `transformers` vision model from a folder, as an image feature extractor
    frechet.py             Frechet distance on a backbone's features, named after the backbone
    export_layouts.py      generated images in the official GenEval and DPG-Bench folder layouts
    report.py              one folder per evaluation: report.md, metrics.json, grids, plot
    run.py                 `emf eval ...`: configs and the jobs that tie the pieces together
"""
