"""Load, validate and render the Ansible inventory for generated fleets of 100 and 1,000 hosts.

Target: 1,000 hosts under 1 s end to end. Each figure is the best of five runs.
"""

from __future__ import annotations

from timing import best_of

from primespark.fleet.generate import generate_fleet_yaml
from primespark.fleet.loader import parse_yaml, validate_data
from primespark.inventory import build_inventory

RUNS = 5



def main() -> None:
    print(f"{'hosts':>6} {'parse':>9} {'validate':>9} {'inventory':>10} {'total':>9}  target")
    for size in (100, 1000):
        text = generate_fleet_yaml(size)
        data, lines = parse_yaml(text, "bench.yaml")
        fleet = validate_data(data, "bench.yaml", lines)
        parse = best_of(lambda text=text: parse_yaml(text, "bench.yaml"), RUNS)
        validate = best_of(lambda data=data, lines=lines: validate_data(data, "bench.yaml", lines), RUNS)
        render = best_of(lambda fleet=fleet: build_inventory(fleet), RUNS)
        total = parse + validate + render
        target = "< 1 s" if size == 1000 else ""
        verdict = ("met" if total < 1 else "MISSED") if target else ""
        print(f"{size:>6} {parse:>8.3f}s {validate:>8.3f}s {render:>9.3f}s {total:>8.3f}s  {target} {verdict}")


if __name__ == "__main__":
    main()
