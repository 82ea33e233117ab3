"""The cloud side: what the Pulumi program in stacks/ renders, and the offline plan runner around it."""
