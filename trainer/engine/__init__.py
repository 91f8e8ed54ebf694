"""The engine room: our config ► DeepSpeed's (or the plain PyTorch engine of one fp32 process),
the optimizer and schedule, and the train modules that run a step for the loop; the
non-finite guard wraps the optimizer's step.

May import: ``models``, the core, ``trainer.parallel``, ``trainer.accounting`` (FLOPs, peaks) and
``trainer.checkpoint`` (the engines' own checkpoint files). Never the loop or callbacks.
"""
