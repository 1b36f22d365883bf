"""Flower apps (flwr 1.42, Message API): the same job as ``edgetune collect`` + ``edgetune sync`` on
Flower's engine, for fleets past one machine (SuperLink, SuperNodes, TLS, node authentication).

* ``client_app.app``: a ``ClientApp`` whose ``train`` handler starts edgetune's on-device runtime
  from the received arrays, trains on the node's data and replies with the adapter + num-examples.
* ``server_app.app``: a ``ServerApp`` whose strategy (``strategy.EdgetuneStrategy``) admits each
  reply and aggregates with ``edgetune.federated.admission`` / ``aggregate`` — the code the HTTP
  collector runs, imported, not copied.

``flwr`` is imported only inside these modules (``pip install "edgetune[flower]"``).
"""
