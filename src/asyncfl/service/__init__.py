"""The asyncfl service: the simulator's aggregation core served over gRPC (Papaya's shape).

Roles (one process runs all of them by default):

* selector (``selector.py``): check-in, eligibility, rate limits, concurrency slots;
* aggregator (``task.py``): a task's model, version, buffer and server optimizer;
* coordinator (``coordinator.py``, ``store.py``): tasks, assignment, durable state.

``server.py`` is the gRPC front (grpc.aio), ``client.py`` the device runtime, ``errors.py``
the one error catalog, ``auth.py`` tokens and leases. Protocol: ``proto/asyncfl/v1``.
Nothing outside ``asyncfl.cli`` imports this package.
"""
