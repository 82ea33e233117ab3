"""The Prime Spark policy pack: `pulumi preview --policy-pack policies` (spark preview/up attach it)."""

from pulumi_policy import EnforcementLevel, PolicyPack

from policies.rules import POLICIES

PolicyPack(name="primespark", enforcement_level=EnforcementLevel.MANDATORY, policies=POLICIES)
