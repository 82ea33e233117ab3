"""Agent tasks: AI and compute jobs placed on the fleet's hosts by capacity, power and data locality.

Built so far: the task spec (`fleet.model.TaskSpec`, templates under `tasks:`), the placement decision
(`placement.place`, a pure function) and the live host facts it reads (`facts`). Execution on hosts is not built
yet (docs/agents.md says what is left).
"""
