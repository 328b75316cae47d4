"""Modules the ``synthetic`` kind's ``lazy_import`` option imports during a load.

Real model libraries import most of their code lazily, inside the load (``from_pretrained``
imports a model's modelling code), and a zygote learns those imports from its workers
(:mod:`workers.import_manifest`). These stand in for such library modules, so the learning,
and the zygote's checks on what it learned, can be tried without model weights: ``plain``
is a module like most, ``starts_thread`` starts a thread as it is imported (which makes
forking the process that imported it unsafe).
"""

#: The names the option accepts.
NAMES = ("plain", "starts_thread")
