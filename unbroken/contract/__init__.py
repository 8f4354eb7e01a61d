"""The contract between the project's processes, owned by none of them.

The ground floor: every process package (gateway, replica, kvsync) and the top floor (cli,
launcher, loadtest) may import it; it imports no process package (``tests/unit/test_layering.py``).

- :mod:`unbroken.contract.headers`: HTTP header names and how both ends read them;
- :mod:`unbroken.contract.heartbeat`: the replica's ``GET /state`` report, its one builder and parser;
- :mod:`unbroken.contract.kv`: the KV identity and snapshot types (the wire form is ``kvsync.protocol``,
  spoken only between kvsync's client and its sidecar);
- :mod:`unbroken.contract.openai`: the one typed OpenAI request, parsed once at each end with one
  precedence rule, and the one place where unsupported fields are refused.
"""
