"""The cost model: how long a job takes on a server and what it costs, with provenance.

One implementation for the daemon, `stratosctl plan`, the budget, the report and every
selector (built-in or third-party): selectors receive a `JobCosting` and read per-offer columns
from it. See `model` for the formulas, `capacity` for speeds, `work` for the job's work,
`learn` for the learned efficiencies and `costs` for the daemon's view of a run.
"""

from stratosd.costmodel.model import JobCosting, OfferCosts

__all__ = ["JobCosting", "OfferCosts"]
