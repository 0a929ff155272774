"""`WorkloadClass.status`: the only status the operator writes (it owns that kind).

``Accepted`` says whether the picker could use the class, with the validation message
when it could not; ``observedGeneration`` says which spec that verdict is about. The
condition's ``lastTransitionTime`` only moves when its status flips, and an unchanged
verdict produces no patch at all, so the MODIFIED event a status write causes settles.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from epp.datastore import kube_objects


def _for_pool(obj: Mapping[str, Any], pool_name: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef")
    return not isinstance(ref, Mapping) or not ref.get("name") or ref.get("name") == pool_name


def workload_class_status(
    obj: Mapping[str, Any], pool_name: str, *, now: datetime.datetime | None = None
) -> dict[str, Any] | None:
    """The status this operator wants on the object, or None when another pool owns it."""
    if not _for_pool(obj, pool_name):
        return None
    meta = obj.get("metadata") or {}
    generation = meta.get("generation") if isinstance(meta.get("generation"), int) else 0
    try:
        # No pool: membership was settled above, only the spec's validity is asked here.
        kube_objects.workload_class_from_object(obj, None)
    except kube_objects.ObjectError as error:
        accepted, reason, message = "False", "InvalidSpec", str(error)
    else:
        accepted, reason, message = "True", "Accepted", "the picker uses this workload class"
    old_status = obj.get("status") or {}
    previous = next(
        (
            c
            for c in old_status.get("conditions") or ()
            if isinstance(c, Mapping) and c.get("type") == "Accepted"
        ),
        None,
    )
    if previous is not None and previous.get("status") == accepted:
        transition = previous.get("lastTransitionTime")
    else:
        moment = now or datetime.datetime.now(datetime.UTC)
        transition = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": "Accepted",
        "status": accepted,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }
    others = [
        c
        for c in old_status.get("conditions") or ()
        if isinstance(c, Mapping) and c.get("type") != "Accepted"
    ]
    return {"observedGeneration": generation, "conditions": [*others, condition]}


def needs_update(obj: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    current = obj.get("status") or {}
    return any(current.get(key) != value for key, value in wanted.items())
