"""The lorafleet operator's kopf handlers (all of them, in one place)."""
