"""Run the CrossGuard policies (policies/rules.py) over a recorded graph, as the engine would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyProviderResource,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from primespark.cloud.mockengine import STACK_TYPE, Graph


@dataclass(frozen=True)
class Violation:
    policy: str
    level: str
    message: str
    urn: str | None

    @property
    def mandatory(self) -> bool:
        return self.level == EnforcementLevel.MANDATORY.value


def policies() -> list[Any]:
    from policies.rules import POLICIES

    return list(POLICIES)


def policy_resources(graph: Graph, stack_urn: str) -> list[PolicyResource]:
    """PolicyResources with parents linked; the stack itself carries the stack outputs as its props."""
    by_urn: dict[str, PolicyResource] = {}
    stack = PolicyResource(STACK_TYPE, graph.outputs, stack_urn, stack_urn.rsplit("::", 1)[-1],
                           _options(None, [], [], False), None, None, [], {})
    by_urn[stack_urn] = stack
    recorded = {r.urn: r for r in graph.resources}
    for r in graph.resources:
        provider = _provider(recorded, r.provider)
        by_urn[r.urn] = PolicyResource(
            r.type, r.outputs, r.urn, r.name, _options(r.parent, r.ignore_changes, r.additional_secret_outputs,
                                                        r.protect), provider, None, [], {})
    for r in graph.resources:
        by_urn[r.urn].parent = by_urn.get(r.parent or "")
        by_urn[r.urn].dependencies = [by_urn[d] for d in r.dependencies if d in by_urn]
    return list(by_urn.values())


def _options(parent: str | None, ignore: list[str], secret_outputs: list[str], protect: bool) -> PolicyResourceOptions:
    return PolicyResourceOptions(protect, ignore, None, [], PolicyCustomTimeouts(0, 0, 0), secret_outputs, parent)


def _provider(recorded: dict[str, Any], reference: str | None) -> PolicyProviderResource | None:
    if not reference:
        return None
    urn = reference.rsplit("::", 1)[0]
    provider = recorded.get(urn)
    if provider is None:
        return None
    return PolicyProviderResource(provider.type, provider.outputs, provider.urn, provider.name)


def run_policies(graph: Graph, stack_urn: str, only: list[Any] | None = None) -> list[Violation]:
    violations: list[Violation] = []
    resources = policy_resources(graph, stack_urn)
    for policy in only if only is not None else policies():
        level = (policy.enforcement_level or EnforcementLevel.ADVISORY).value

        def report(message: str, urn: str | None = None, _name: str = policy.name, _level: str = level) -> None:
            violations.append(Violation(_name, _level, message, urn))

        if isinstance(policy, ResourceValidationPolicy):
            for resource in resources:
                args = ResourceValidationArgs(resource.resource_type, resource.props, resource.urn, resource.name,
                                              resource.opts, resource.provider)
                def report_on(message: str, urn: str | None = None, _resource: str = resource.urn) -> None:
                    report(message, urn or _resource)

                policy.validate(args, report_on)
        elif isinstance(policy, StackValidationPolicy):
            policy.validate(StackValidationArgs(resources), report)
    return violations
