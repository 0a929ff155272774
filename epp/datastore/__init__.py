"""Immutable snapshots of what the picker routes over: endpoints, objectives, rewrites, classes.

Sources (manifest files, static endpoints, the operator) hand Kubernetes-shaped objects to
the reconciler, which builds a new :class:`~epp.datastore.snapshot.Snapshot` and swaps it
in atomically. Requests read the snapshot they started with and never lock.
"""
