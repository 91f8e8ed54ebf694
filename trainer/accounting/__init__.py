"""What a step costs: FLOPs and device peaks (``flops``), the collectives a process runs
(``comm``, measured), their analytic volumes (``comm_volume``) and the layout planner
(``planner``: memory and step time per layout).

May import: ``models``, the core (``config``, ``errors``, ``families``) and ``trainer.parallel``
(the meta-device reference model, the tensor-parallel plan). Nothing that runs a step.
"""
