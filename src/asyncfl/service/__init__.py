"""The asyncfl service: the simulator's aggregation core served over gRPC (Papaya's shape).

Roles (one process runs all of them by default):

* selector (``selector.py``): check-in, eligibility, rate limits, concurrency slots;
* aggregator (``task.py``): a task's model, version, buffer and server optimizer;
* coordinator (``coordinator.py``, ``store.py``): tasks, assignment, durable state.

As separate processes (``asyncfl serve --role``): ``roles.py`` starts each role,
``routing.py`` is the selector process, ``ownership.py`` the coordinator's task -> aggregator
assignment (durable, with an epoch that fences the owner's ledger writes), and
``proto/asyncfl/v1/internal.proto`` the calls between them.

SecAgg / SecAgg+ rounds of FedAvg tasks: ``secagg_round.py`` (one round, sans-I/O),
``secagg_task.py`` (a task's rounds), ``secagg_wire.py`` (RPCs), ``secagg_client.py``
(the device side).

``server.py`` is the gRPC front (grpc.aio), ``client.py`` the device runtime, ``errors.py``
the one error catalog, ``auth.py`` tokens and leases. Protocol: ``proto/asyncfl/v1``.
Nothing outside ``asyncfl.cli`` imports this package.
"""
