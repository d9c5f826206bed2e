"""One LoRA / QLoRA training step per configuration, side by side: ``python -m benchmarks.train_step --help``.

Run from the repository root. The modules:

    driver.py       the command: runs every configuration, the largest-batch search, the ``report`` tables
    processes.py    the child processes it starts (prepare a model, run one configuration) and their entry points
    specs.py        what is measured: the models, the configurations, the suites
    checkpoints.py  the real-size random checkpoints (and ``vlmtune.tiny``'s for the CPU)
    batches.py      the batches every configuration trains on, padded and packed
    worker.py       one configuration in its own process: set up, warm up, time, measure memory
    profiling.py    one more step under ``torch.profiler``, split by tower and by kernel kind
    report.py       tables of the JSON records: ratios, targets, where the time goes
"""
