"""Prefect glue in one place: named locks, the retry predicate, in-process runs, pool and queue names.

Every flow has one shape: parameters → `FleetContext` → tasks that each wrap one core step (retries and
timeouts on the decorator) → publish (an artifact rendered by the core, metrics through the registry). Flows
take the locks; core code never receives a lock or a step callable.
"""
