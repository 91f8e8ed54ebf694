"""Optional behaviours of the train loop, one module each: metrics file, progress bar,
evaluation cadence, checkpointing, tracking (MLflow), hang watchdog, preemption, fault
injection, memory report, scheduled sampling. Each subclasses ``trainer.loop.Callback``.

May import: everything below the loop and ``trainer.loop`` itself; the loop imports none of them
(``trainer/train.py`` assembles them). Hooks run on every rank: a hook that runs a collective
(evaluation, checkpointing) must be reached by all ranks alike.
"""
