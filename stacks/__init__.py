"""The Pulumi program: ComponentResources composed from the fleet (see program.py)."""
