"""Agent tasks: AI and compute jobs placed on the fleet's hosts by capacity, power and data locality.

Built so far: the task spec (`fleet.model.TaskSpec`, templates under `tasks:`), the placement decision
(`placement.place`, a pure function), the live host facts it reads (`facts`), and running a task on its host
(`execute`, with the host-side `taskside.py`). Power for running tasks and requeue on host loss are not built yet
(docs/agents.md says what is left).
"""
