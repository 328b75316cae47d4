"""The optional Ray backend: models run as processes on the nodes of a Ray cluster.

Turned on by ``[server] cluster`` (``--cluster``, ``LEMONADE_CLUSTER``; see
:mod:`supervisor.cluster_config`). The router stays the one owner of every slot, of the
planner and of the one retire path; Ray supplies what one machine cannot: the list of nodes
and their resources, launching a process on a chosen node, and telling us when one dies.

* :mod:`.nodes` (no Ray import): a node's name, the planner's devices for it (``NODE/ram``
  and one per Ray resource a recipe asks for) and what a model is charged on them.
* :mod:`.admission`: the planner over those devices, choosing the node.
* :mod:`.worker_host`: the Ray actor that starts a model's worker process on its node.
* :mod:`.ray_backend`: connecting to Ray, the node list, launching a worker and the handle
  the router keeps for it.

Nothing here is imported unless ``cluster`` is set, so the single-machine server never
imports Ray.
"""
