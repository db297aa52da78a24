"""The planner proposes a group of servers when the job's deadline needs one.

A job that sets `train.nodes = N` trains on N agents (`stratosd.groups`). A job that does not,
but sets `constraints.deadline_hours`, gets one server when one can finish in time, as before.
When none can (the selector finds nothing that meets the deadline and the other constraints
on single servers), the planner adds group candidates and selects again over singles and
groups together, each group scored as one server:

- per region and kind of hardware, the live agents (free ones first, then the cheapest) form
  groups of 2, 3, ... up to `MAX_AUTO_NODES` (or as many as the region has);
- each group is costed with the cost model like any server: CPU groups at N ranks' scaling
  efficiency (`costmodel.model.scaling`: the learned record of N ranks when past runs left one,
  else the prior `PRIOR_SCALING`), GPU groups by the cost model's own device count;
- per region and kind only the smallest group that meets the deadline is kept (a larger one
  costs more: N x $/h for 1 / (N x efficiency) of the time, efficiency <= 1); where none does,
  the largest (the fastest achievable), so that an infeasible job names the best time it
  could get.

The job's selector then picks among what meets every constraint (`deadline_hours` is a hard
constraint, `plugins.selectors.objectives`), and the decision with its numbers opens the
selection's explanation ("no single server meets the 0.5 h deadline: cpu-a 0.9 h; group
cpu-a+cpu-b 0.52 h ..."), which the select_server result and `stratosctl plan` carry. Groups
never help a budget on their own (a group costs more than one of its members), and a job
without a deadline never gets one unless it asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.specs import RunSpec, Selection, ServerOffer
from stratosd.errors import ConfigError, Infeasible
from stratosd.groups import group_offer, group_offers, nodes_asked, same_kind_sets
from stratosd.offers import OfferTable

if TYPE_CHECKING:
    from stratosd.api import ServerSelector
    from stratosd.costmodel import JobCosting
    from stratosd.plugins import Plugins

log = structlog.stdlib.get_logger(__name__)

MAX_AUTO_NODES = 4  # the largest group the planner proposes on its own
_LISTED = 4  # singles named in the explanation


@dataclass(frozen=True)
class Plan:
    """A selection and the offers it chose among (singles, and groups when proposed)."""

    selection: Selection
    offers: Sequence[ServerOffer]


@dataclass(frozen=True)
class GroupOption:
    """One group the planner considered: its offer, time, and scaling efficiency used."""

    offer: ServerOffer
    hours: float
    efficiency: float
    source: str

    def describe(self) -> str:
        """'group a+b 0.52 h (2 nodes, eu, scaling efficiency 0.80 prior)'."""
        return (f"group {self.offer.id} {self.hours:.3g} h ({len(self.offer.members)} nodes, "
                f"{self.offer.region or 'no region'}, scaling efficiency {self.efficiency:.2f} "
                f"{self.source})")


def can_group(plugins: Plugins | None, trainer: str) -> bool:
    """Whether the job's trainer can train on a group (it launches ranks under torchrun)."""
    if plugins is None:
        return True
    try:
        return bool(getattr(plugins.trainers.get(trainer), "supports_ranks", False))
    except ConfigError:
        return False


def plan_select(selector: ServerSelector, offers: Sequence[ServerOffer], spec: RunSpec,
                costing: JobCosting, *, plugins: Plugins | None = None,
                max_nodes: int = MAX_AUTO_NODES) -> Plan:
    """Select a server, or a group of servers, for a job (see the module docstring).
    Raises Infeasible like the selector; with a deadline the message names the fastest option
    among singles and groups."""
    c = spec.constraints
    nodes, _min = nodes_asked(spec.train)
    if nodes > 1:  # train.nodes = N: groups of N agents, each scored as one server
        groups = group_offers(offers, nodes)
        return Plan(selector.select(groups, c, costing=costing, seed=spec.seed), groups)
    deadline = c.deadline_hours
    if deadline is None:
        return Plan(selector.select(offers, c, costing=costing, seed=spec.seed), offers)
    try:
        selection = selector.select(offers, c, costing=costing, seed=spec.seed)
    except Infeasible as exc:
        if exc.field == "constraints.busy":  # the run queues for a server that would do
            raise
        failure = exc
    else:
        hours = _hours([selection.chosen], costing)[0]
        return Plan(_noted(selection, f"Deadline {deadline:g} h: {selection.chosen.id} meets "
                           f"it alone ({hours:.3g} h); no group needed.", None), offers)
    slow, singles = _fastest_singles(offers, costing, deadline)
    if not slow:  # every live server is fast enough: the deadline is not what binds
        raise failure
    why = ", ".join(f"{o.id} {h:.3g} h" for o, h in singles) or "none is up"
    if not can_group(plugins, spec.trainer):
        raise Infeasible(f"{failure.message}; a group of servers could be faster, but trainer "
                         f"{spec.trainer!r} runs on one device",
                         hint=failure.hint + "; or use a trainer that launches ranks (lora-sft, "
                         "full-sft)", field=failure.field) from None
    options = deadline_groups(offers, deadline, costing, max_nodes=max_nodes)
    if not options:
        raise Infeasible(f"{failure.message}; no group could help: no region has 2 live agents "
                         "of one kind", hint=failure.hint, field=failure.field) from None
    both = OfferTable.concat(OfferTable.from_offers(offers),
                             OfferTable.from_offers([g.offer for g in options]))
    considered = "; ".join(g.describe() + (" meets it" if g.hours <= deadline else "")
                           for g in options)
    try:
        selection = selector.select(both, c, costing=costing, seed=spec.seed)
    except Infeasible as exc:
        raise Infeasible(f"{exc.message} (singles: {why}; groups of up to {max_nodes} "
                         f"same-region agents: {considered})", hint=exc.hint,
                         field=exc.field) from None
    note = (f"Deadline {deadline:g} h: no single server meets it with the other constraints "
            f"(fastest: {why}); groups of same-region agents considered: {considered}. "
            f"Picked {'group ' if selection.chosen.members else ''}{selection.chosen.id}.")
    log.info("group_proposed", deadline_hours=deadline, chosen=selection.chosen.id,
             groups=[g.offer.id for g in options])
    return Plan(_noted(selection, note, options), both)


def deadline_groups(offers: Sequence[ServerOffer], deadline: float, costing: JobCosting, *,
                    max_nodes: int = MAX_AUTO_NODES) -> list[GroupOption]:
    """Per region and kind of hardware: the smallest group of 2..max_nodes live agents that
    meets the deadline, else the largest (the fastest there)."""
    live = [o for o in offers if o.status == "up" and o.agent_id and len(o.members) <= 1]
    kinds = same_kind_sets(sorted(live, key=lambda o: (o.region, o.busy,
                                                       o.price_usd_per_hour, o.id)))
    out: list[GroupOption] = []
    for kind in kinds:
        best: GroupOption | None = None
        for n in range(2, min(max_nodes, len(kind)) + 1):
            best = _option(kind[:n], costing)
            if best.hours <= deadline:
                break
        if best is not None:
            out.append(best)
    return sorted(out, key=lambda g: (g.hours, g.offer.id))


def _option(members: Sequence[ServerOffer], costing: JobCosting) -> GroupOption:
    """One group, costed: its training at N ranks' scaling efficiency (learned, else prior)."""
    from stratosd.costmodel.capacity import job_threads, offer_speed
    from stratosd.costmodel.model import TINY_PARAMS, scaling

    offer = group_offer(members)
    threads = job_threads(offer, costing.work.params < TINY_PARAMS) if offer.gpu_count == 0 \
        else None
    _r, eff, src = scaling(offer_speed(offer, threads), costing.work, costing.book)
    return GroupOption(offer=offer, hours=_hours([offer], costing)[0], efficiency=eff,
                       source=src)


def _hours(offers: Sequence[ServerOffer], costing: JobCosting) -> list[float]:
    return [float(s) / 3600.0 for s in costing.columns(offers).seconds]


def _fastest_singles(offers: Sequence[ServerOffer], costing: JobCosting, deadline: float
                     ) -> tuple[bool, list[tuple[ServerOffer, float]]]:
    """(whether a live server is slower than the deadline, the fastest live ones)."""
    import numpy as np

    table = OfferTable.from_offers(offers)
    hours = costing.columns(table).seconds / 3600.0
    up = np.flatnonzero(table.up)
    order = up[np.lexsort((table.ids[up].astype(str), hours[up]))][:_LISTED]
    return bool((hours[up] > deadline).any()), [(table[int(i)], float(hours[i])) for i in order]


def _noted(selection: Selection, note: str, options: list[GroupOption] | None) -> Selection:
    """The selection with the deadline decision first in its explanation and details."""
    details: dict[str, Any] = {**selection.details, "deadline": {
        "decision": note,
        "groups": [{"id": g.offer.id, "members": list(g.offer.members), "hours": round(g.hours, 4),
                    "region": g.offer.region, "scaling_efficiency": round(g.efficiency, 4),
                    "scaling_source": g.source} for g in options or []],
    }}
    return msgspec.structs.replace(selection, explanation=f"{note}\n{selection.explanation}",
                                   details=details)
