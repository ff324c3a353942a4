"""Event payloads for the rules' unit tests, laid out by the shared header."""

from __future__ import annotations

from pybpftune import libbpf
from pybpftune.events import Event


def observation_event(tuner_id: int, scenario: int, cookie: int, type_name: str, **fields: object) -> Event:
    """An event carrying ``type_name`` with ``fields`` set (the rest zero),
    as the BPF side sends it."""
    data = bytearray(libbpf.struct_size(type_name))
    view = libbpf.struct_view(type_name, data)
    for name, value in fields.items():
        setattr(view, name, value)
    return Event.build(tuner_id, scenario, cookie, raw=bytes(data))
