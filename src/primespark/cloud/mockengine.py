"""Run the Pulumi program offline under Pulumi's mock engine and record the resource graph it registers.

The mock monitor is process-global state in the Pulumi SDK; `run_program` resets it before and after, so it can
run any number of times in one process (homelab, then lab, in one pytest session).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import mocks, rpc, settings
from pulumi.runtime import resource as pulumi_resource
from pulumi.runtime.proto import source_pb2
from pulumi.runtime.stack import run_in_stack
from pulumi.runtime.sync_await import _sync_await

from primespark.cloud.vault import TYPE_TOKEN, generate_values

PROJECT = "primespark"
STACK_TYPE = "pulumi:pulumi:Stack"


@dataclass
class Recorded:
    """One registered resource, as the engine would see it."""

    urn: str
    type: str
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    custom: bool
    parent: str | None
    provider: str | None
    protect: bool = False
    ignore_changes: list[str] = field(default_factory=list)
    additional_secret_outputs: list[str] = field(default_factory=list)
    dependencies: list[str] = field(default_factory=list)


@dataclass
class Graph:
    resources: list[Recorded]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    secret_values: set[str] = field(default_factory=set)

    def of_type(self, type_: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == type_]

    def by_urn(self) -> dict[str, Recorded]:
        return {r.urn: r for r in self.resources}


def _secret_strings(value: Any, inside: bool = False) -> set[str]:
    """Every string that sits under a secret marker."""
    if rpc.is_rpc_secret(value):
        return _secret_strings(rpc.unwrap_rpc_secret(value), True)
    if isinstance(value, dict):
        return set().union(*(_secret_strings(v, inside) for k, v in value.items() if k != "__provider")) \
            if value else set()
    if isinstance(value, list):
        return set().union(*(_secret_strings(v, inside) for v in value)) if value else set()
    return {value} if inside and isinstance(value, str) else set()


def _plain(value: Any) -> Any:
    """Drop the RPC wrappers (secrets, unknowns) the mock monitor hands over."""
    if rpc.is_rpc_secret(value):
        return _plain(rpc.unwrap_rpc_secret(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "__provider"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Mocks(pulumi.runtime.Mocks):
    """Resources echo their inputs; the Vault provider's values are generated as its `create` would."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        outputs = dict(args.inputs)
        if args.typ == TYPE_TOKEN:
            outputs["values"] = generate_values({"secrets": args.inputs["secrets"]})
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


class _RecordingMonitor(mocks.MockMonitor):
    def __init__(self, mocks_: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks_)
        self.recorded: list[Recorded] = []
        self.stack_outputs: dict[str, Any] = {}
        self.secret_outputs: set[str] = set()
        self.secret_values: set[str] = set()

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type == STACK_TYPE:
            return response
        inputs = rpc.deserialize_properties(request.object)
        state = self.resources[response.urn].state
        self.secret_values |= _secret_strings(inputs)
        self.recorded.append(Recorded(
            urn=response.urn, type=request.type, name=request.name, inputs=_plain(inputs), outputs=_plain(state),
            custom=bool(request.custom), parent=request.parent or None, provider=request.provider or None,
            protect=bool(request.protect), ignore_changes=list(request.ignoreChanges),
            additional_secret_outputs=list(request.additionalSecretOutputs), dependencies=list(request.dependencies),
        ))
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        outputs = rpc.deserialize_properties(request.outputs)
        self.secret_values |= _secret_strings(outputs)
        if "::" + STACK_TYPE + "::" in request.urn:
            self.secret_outputs = {k for k, v in outputs.items() if rpc.is_rpc_secret(v)}
            self.stack_outputs = _plain(outputs)
        else:  # a component's registered outputs join its recorded state, as the engine keeps them
            for recorded in self.recorded:
                if recorded.urn == request.urn:
                    recorded.outputs = {**recorded.outputs, **_plain(outputs)}
        return super().RegisterResourceOutputs(request)


def _reset() -> None:
    settings.ROOT.set(None)
    pulumi.runtime.set_all_config({})


def run_program(program: Callable[[], Any], stack: str, config: dict[str, str] | None = None) -> Graph:
    """Run `program` (which registers resources) under mocks as stack `stack`; return what it registered."""
    _reset()
    monitor = _RecordingMonitor(_Mocks())
    # Source positions (a full traceback per resource) mean nothing offline and cost a third of the run.
    saved_trace = getattr(pulumi_resource, "_get_stack_trace", None)
    if saved_trace is not None:
        pulumi_resource._get_stack_trace = lambda: source_pb2.StackTrace()
    try:
        try:  # Pulumi's runtime asks for the thread's event loop; an asyncio.run before us leaves the thread none
            asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            asyncio.set_event_loop(asyncio.new_event_loop())
        mocks.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=True, monitor=monitor)
        settings.ROOT.set(None)  # set_mocks made a root stack already; run_in_stack makes the real one
        pulumi.runtime.set_all_config({f"{PROJECT}:{k}": v for k, v in (config or {}).items()})
        _sync_await(run_in_stack(program))
    finally:
        _reset()
        if saved_trace is not None:
            pulumi_resource._get_stack_trace = saved_trace
    return Graph(monitor.recorded, monitor.stack_outputs, monitor.secret_outputs, monitor.secret_values)
