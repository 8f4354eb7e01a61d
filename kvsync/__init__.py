"""kvsync: replicate each conversation's KV cache and transcript through Redis.

The sidecar (``python -m kvsync``) runs beside a replica; the replica's engine talks to it through
:class:`kvsync.client.KVSyncClient`. See ``docs/kvsync.md``.
"""
