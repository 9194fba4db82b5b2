"""Training: the single-process loop and the Ray Train + DeepSpeed job, on the base library.

    config.py            TrainConfig: the typed config of `emf train`, checked on the driver
    setup.py             what both loops build from it: model, objective, optimizer, schedule
    local.py             the single-process loop (benchmarks, and the reference for the distributed one)
    driver.py            `emf train`: driver-side checks, then Ray Train's TorchTrainer
    worker.py            the per-rank loop: DeepSpeed engine, shard stream, MeanFlow step, checkpoints
    engine.py            the DeepSpeed config and engine from the typed config
    zero3_forward_ad.py  the identity `jvp` that lets ZeRO-3's hooks run under forward-mode AD
    zero3_gather.py      ZeRO-3's parameters, gathered piece by piece, for the hand-written JVP pass
    shard_loader.py      resampled, seeded, resumable WebDataset streaming per rank
    checkpoint.py        checkpoints: DeepSpeed shards + EMA + RNG + data position, loaded with weights_only
    train_state.py       TrainState: one rank's step, data position and counters, as checkpoints hold it
    faults.py            fault injection (a rank that dies, NaN losses), built once and asked by the loop
    run_logger.py        progress lines, wandb, sample grids
    loss_curve.py        the run's metrics.jsonl and loss.png, rewritten at checkpoints, trimmed on resume
"""
