"""Tenants (ACME in Stratos): private data stays on its agents; signatures, similarity,
per-tenant students and similarity-weighted aggregation run here, in the daemon.

Modules: `signature` (aggregates of a tenant's data, and their distance), `similarity`
(distance → similarity → softmax weights with a temperature; grouping by student),
`aggregation` (the math of the built-in rules), `selection` (per-tenant student under limits),
`orchestrator` (a tenants job round by round), `service` (the `tenants` command and KV),
`report` (the per-tenant report). numpy only: the daemon never imports torch.
"""
