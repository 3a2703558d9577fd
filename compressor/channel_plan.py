"""ChannelPlan: which channels of each group survive pruning.

Indices are in the group's *original* index space (output channels of the
group's root before any pruning), sorted ascending. A group that is absent
from the plan is kept whole. The JSON form is what `pruning.save_pruned`
stores next to the weights, so a plan always travels with its checkpoint.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from compressor.errors import BadInput


@dataclass
class ChannelPlan:
    kept: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kept, Mapping):
            raise BadInput(f"channel plan must map group names to index lists, got {type(self.kept).__name__}")
        clean: dict[str, list[int]] = {}
        for name, idxs in self.kept.items():
            if not isinstance(name, str) or not name:
                raise BadInput(f"channel plan: group names must be non-empty strings, got {name!r}")
            if isinstance(idxs, (str, bytes)) or not isinstance(idxs, Iterable):
                raise BadInput(f"channel plan: group {name!r} needs a list of channel indices")
            values = list(idxs)
            if not values:
                raise BadInput(f"channel plan: group {name!r} keeps no channels")
            ints: list[int] = []
            for v in values:
                try:
                    if isinstance(v, bool):
                        raise TypeError
                    iv = operator.index(v)
                except TypeError:
                    raise BadInput(f"channel plan: group {name!r} has a non-integer index {v!r}") from None
                if iv < 0:
                    raise BadInput(f"channel plan: group {name!r} has a negative index {iv}")
                ints.append(iv)
            if len(set(ints)) != len(ints):
                raise BadInput(f"channel plan: group {name!r} repeats a channel index")
            clean[name] = sorted(ints)
        self.kept = clean

    def counts(self) -> dict[str, int]:
        """Kept channels per group."""
        return {name: len(idxs) for name, idxs in self.kept.items()}

    def validate(self, channels: Mapping[str, int]) -> None:
        """BadInput unless every group is known and every index is below its channel count."""
        for name, idxs in self.kept.items():
            if name not in channels:
                raise BadInput(f"channel plan names unknown group {name!r}")
            if idxs[-1] >= channels[name]:
                raise BadInput(
                    f"channel plan: group {name!r} has {channels[name]} channels, index {idxs[-1]} is out of range"
                )

    @classmethod
    def full(cls, channels: Mapping[str, int]) -> "ChannelPlan":
        """The plan that keeps everything."""
        return cls({name: list(range(int(c))) for name, c in channels.items()})

    def to_dict(self) -> dict[str, list[int]]:
        return {name: list(idxs) for name, idxs in self.kept.items()}

    @classmethod
    def from_dict(cls, data: Any) -> "ChannelPlan":
        if not isinstance(data, Mapping):
            raise BadInput("channel plan JSON must be an object mapping group names to index lists")
        return cls(dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "ChannelPlan":
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"channel plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


__all__ = ["ChannelPlan"]
